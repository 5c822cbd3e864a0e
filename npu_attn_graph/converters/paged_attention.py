"""GE converters for the paged wrappers (kernels/paged_attention.py): the wrapped
ops' own converters, with the lengths tensor fed into the GE op's
actual_seq_lengths input (int_list_input casts it to int64); paged K/V through
block_table, or dense K/V without it (the static-cache lengths rewrite).

npu_attn::npu_incre_flash_attention_paged -> GE ``IncreFlashAttention``;
npu_attn::npu_fused_infer_attention_score_paged -> GE ``FusedInferAttentionScore``
(``actual_seq_lengths_kv`` fed, ``actual_seq_lengths`` unfed: every query row).
"""

from __future__ import annotations

import torch

from . import fused_infer_attention_score as _fia, incre_flash_attention as _ifa  # noqa: F401 (registered first)
from ._ge import INT_MAX, Tensor, TensorSpec, register_fx_node_ge_converter


def _converter_of(op: torch._ops.OpOverload):
    """The function registered as `op`'s converter (TorchAir's decorator returns its
    Converter object and keeps the function, functools-wrapped, on the op)."""
    return op._ge_converter.__wrapped__


def convert_incre_flash_attention(*args, **kwargs):
    return _converter_of(torch.ops.npu_attn.npu_incre_flash_attention.default)(*args, **kwargs)


def convert_fused_infer_attention_score(*args, **kwargs):
    return _converter_of(torch.ops.npu_attn.npu_fused_infer_attention_score.default)(*args, **kwargs)


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_incre_flash_attention_paged.default)
def convert_incre_flash_attention_paged(
    query: Tensor, key: Tensor, value: Tensor, *, block_table: Tensor | None = None, actual_seq_lengths: Tensor,
    atten_mask: Tensor | None = None, pse_shift: Tensor | None = None, num_heads: int = 1,
    scale_value: float = 1.0, input_layout: str = "BSH", num_key_value_heads: int = 0, block_size: int = 0,
    inner_precise: int = 1, meta_outputs: TensorSpec | None = None,
) -> Tensor:
    return convert_incre_flash_attention(
        query, key, value, atten_mask=atten_mask, pse_shift=pse_shift, actual_seq_lengths=actual_seq_lengths,
        block_table=block_table, num_heads=num_heads, scale_value=scale_value, input_layout=input_layout,
        num_key_value_heads=num_key_value_heads, block_size=block_size, inner_precise=inner_precise,
        meta_outputs=meta_outputs)


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_fused_infer_attention_score_paged.default)
def convert_fused_infer_attention_score_paged(
    query: Tensor, key: Tensor, value: Tensor, *, block_table: Tensor | None = None,
    actual_seq_lengths_kv: Tensor,
    pse_shift: Tensor | None = None, atten_mask: Tensor | None = None, num_heads: int = 1, scale: float = 1.0,
    pre_tokens: int = INT_MAX, next_tokens: int = INT_MAX, input_layout: str = "BSH",
    num_key_value_heads: int = 0, sparse_mode: int = 0, inner_precise: int = 0, block_size: int = 0,
    softmax_lse_flag: bool = False, meta_outputs: TensorSpec | None = None,
) -> tuple[Tensor, Tensor]:
    return convert_fused_infer_attention_score(
        query, key, value, pse_shift=pse_shift, atten_mask=atten_mask, actual_seq_lengths_kv=actual_seq_lengths_kv,
        block_table=block_table, num_heads=num_heads, scale=scale, pre_tokens=pre_tokens, next_tokens=next_tokens,
        input_layout=input_layout, num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode,
        inner_precise=inner_precise, block_size=block_size, softmax_lse_flag=softmax_lse_flag,
        meta_outputs=meta_outputs)
