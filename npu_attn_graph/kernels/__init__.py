"""The npu_attn op library: one module per fused op (schema, fake, reference, NPU kernel).

Importing this package registers every op under ``torch.ops.npu_attn``.
"""

from . import (  # noqa: F401  (imported for their registrations)
    advance_step_flashattn,
    fused_infer_attention_score,
    fused_infer_attention_score_v2,
    fusion_attention,
    fusion_attention_grad,
    fusion_attention_packed,
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
    sparse_flash_attention,
)
from ._library import NAMESPACE, NpuAttnArgumentError

__all__ = ["NAMESPACE", "NpuAttnArgumentError"]
