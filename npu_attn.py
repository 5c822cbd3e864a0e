"""Anchor for ``TORCH_LOGS="+npu_attn"`` (the code lives in ``npu_attn_graph``).

torch reads TORCH_LOGS when it is imported and accepts only its own log names
or names of importable modules; this module makes ``npu_attn`` one, so the
npu_attn_graph messages (logger "npu_attn": sites fused or left alone and why,
TorchAir's unconverted nodes) can be switched on from the environment before
npu_attn_graph is imported.
"""
