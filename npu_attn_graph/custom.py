"""The seeds' ``custom.`` forms: ops as CANN's custom-op packages expose them.

Seed 004 documents ``custom.npu_sparse_flash_attention`` (the form of CANN's
custom-op package, hicann/cann-recipes-infer ops/ascendc), whose signature
differs from torch_npu 2.13's ``npu_sparse_flash_attention``. Reached as
``npu_attn_graph.ops.custom``, so code written against either document runs
after one import change::

    import npu_attn_graph.ops as torch_npu

    out = torch_npu.custom.npu_sparse_flash_attention(
        query, key, value, sparse_indices, scale_value, sparse_block_size,
        query_rope=query_rope, key_rope=key_rope, sparse_mode=3)

Each function here is a thin Python wrapper over the matching
``torch.ops.npu_attn`` op (no second kernel); see the kernel module for the
mapping and its reasons.
"""

from .kernels.sparse_flash_attention import custom_npu_sparse_flash_attention as npu_sparse_flash_attention

__all__ = ["npu_sparse_flash_attention"]
