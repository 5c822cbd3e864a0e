"""GE converters for the npu_attn ops: one module per op, each registered with
TorchAir's ``register_fx_node_ge_converter``.

Importing this package needs TorchAir (``torchair`` importable, as
npu_attn_graph.torchair_bridge.load_torchair() arranges); nothing else in
npu_attn_graph imports it, so the package works without TorchAir.
"""

from . import (  # noqa: F401  (imported for their registrations)
    advance_step_flashattn,
    fused_infer_attention_score,
    fused_infer_attention_score_v2,
    fusion_attention,
    fusion_attention_grad,
    grouped_matmul,
    incre_flash_attention,
    moe_compute_expert_tokens,
    moe_gating_top_k_softmax_v2,
    nsa_compress_attention_infer,
    nsa_compress_attention_lengths,
    paged_attention,
    prompt_attention_packed,
    prompt_flash_attention,
    scatter_nd_update,
    scatter_pa_kv_cache,
    scatter_update,
    silu_backward,
    sparse_flash_attention,
    sym_max,
)
