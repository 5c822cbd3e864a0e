"""GE converters for the packed-prefill wrappers (kernels/prompt_attention_packed.py):
the definition, i.e. the wrapped op's own converter called with the mask and
sparse_mode 1.

npu_attn::npu_prompt_flash_attention_packed -> GE ``PromptFlashAttention``;
npu_attn::npu_fused_infer_attention_score_packed -> GE ``FusedInferAttentionScore``;
both with ``atten_mask`` fed by the graph's (T, T) mask and sparse_mode 1.

Why not TND in the GE graph: the eager kernel chooses, per call, between TND and
the masked call by reading the mask on the host (packed_plan), and then splits
the tokens into causal segments (one TND call) and full segments (padding: a
second call), at host-known token offsets. A GE graph is built once and runs
without the host, so it would need (1) the decision as device-side control flow
(an If over a predicate computed from the mask; this project's converters emit
none), and (2) the segments as device data: the cumulative lengths could be fed
as a tensor (GE's PromptFlashAttention / FusedInferAttentionScore take
``actual_seq_lengths`` as an input, as the paged converters use), but their
number, and the token subsets of the two calls, are data-dependent shapes. One
fixed TND call in the graph would no longer equal the op's definition for other
masks (padding, non-packed batches). So the GE graph computes the definition,
the masked call: exact for every mask, one complete graph, the (T, T) mask still
materialised on the device.
"""

from __future__ import annotations

import torch

from . import fused_infer_attention_score as _fia, prompt_flash_attention as _pfa  # noqa: F401 (registered first)
from ._ge import INT_MAX, Tensor, TensorSpec, register_fx_node_ge_converter


def _converter_of(op: torch._ops.OpOverload):
    """The function registered as `op`'s converter (TorchAir's decorator keeps it,
    functools-wrapped, on the op)."""
    return op._ge_converter.__wrapped__


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_prompt_flash_attention_packed.default)
def convert_prompt_flash_attention_packed(
    query: Tensor, key: Tensor, value: Tensor, atten_mask: Tensor, *, num_heads: int = 1,
    scale_value: float = 1.0, input_layout: str = "BSH", num_key_value_heads: int = 0,
    meta_outputs: TensorSpec | None = None,
) -> Tensor:
    return _converter_of(torch.ops.npu_attn.npu_prompt_flash_attention.default)(
        query, key, value, atten_mask=atten_mask, num_heads=num_heads, scale_value=scale_value,
        pre_tokens=INT_MAX, next_tokens=INT_MAX, input_layout=input_layout,
        num_key_value_heads=num_key_value_heads, sparse_mode=1, meta_outputs=meta_outputs)


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_fused_infer_attention_score_packed.default)
def convert_fused_infer_attention_score_packed(
    query: Tensor, key: Tensor, value: Tensor, atten_mask: Tensor, *, num_heads: int = 1, scale: float = 1.0,
    input_layout: str = "BSH", num_key_value_heads: int = 0, meta_outputs: TensorSpec | None = None,
) -> tuple[Tensor, Tensor]:
    return _converter_of(torch.ops.npu_attn.npu_fused_infer_attention_score.default)(
        query, key, value, atten_mask=atten_mask, num_heads=num_heads, scale=scale, pre_tokens=INT_MAX,
        next_tokens=INT_MAX, input_layout=input_layout, num_key_value_heads=num_key_value_heads, sparse_mode=1,
        meta_outputs=meta_outputs)
