"""GE converter for npu_attn::npu_incre_flash_attention -> GE ``IncreFlashAttention``."""

from __future__ import annotations

import torch

from ._ge import Tensor, TensorSpec, ge, int_list_input, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_incre_flash_attention.default)
def convert_incre_flash_attention(
    query: Tensor, key: Tensor, value: Tensor, *, padding_mask: Tensor | None = None,
    atten_mask: Tensor | None = None, pse_shift: Tensor | None = None, actual_seq_lengths=None,
    antiquant_scale: Tensor | None = None, antiquant_offset: Tensor | None = None,
    block_table: Tensor | None = None, dequant_scale1: Tensor | None = None, quant_scale1: Tensor | None = None,
    dequant_scale2: Tensor | None = None, quant_scale2: Tensor | None = None, quant_offset2: Tensor | None = None,
    kv_padding_size: Tensor | None = None, num_heads: int = 1, scale_value: float = 1.0,
    input_layout: str = "BSH", num_key_value_heads: int = 0, block_size: int = 0, inner_precise: int = 1,
    meta_outputs: TensorSpec | None = None,
) -> Tensor:
    """npu_attn::npu_incre_flash_attention(Tensor query, Tensor key, Tensor value, *, Tensor? padding_mask=None,
    Tensor? atten_mask=None, Tensor? pse_shift=None, SymInt[]? actual_seq_lengths=None,
    Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, Tensor? block_table=None,
    Tensor? dequant_scale1=None, Tensor? quant_scale1=None, Tensor? dequant_scale2=None,
    Tensor? quant_scale2=None, Tensor? quant_offset2=None, Tensor? kv_padding_size=None, int num_heads=1,
    float scale_value=1., str input_layout="BSH", int num_key_value_heads=0, int block_size=0,
    int inner_precise=1) -> Tensor

    GE op type: IncreFlashAttention. Its key and value are dynamic (tensor-list)
    inputs: one tensor each here. padding_mask is reserved and has no GE input.
    """
    return ge.IncreFlashAttention(
        query, [key], [value], pse_shift=pse_shift, atten_mask=atten_mask,
        actual_seq_lengths=int_list_input(actual_seq_lengths), dequant_scale1=dequant_scale1,
        quant_scale1=quant_scale1, dequant_scale2=dequant_scale2, quant_scale2=quant_scale2,
        quant_offset2=quant_offset2, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
        block_table=block_table, kv_padding_size=kv_padding_size, num_heads=num_heads, scale_value=scale_value,
        input_layout=input_layout, num_key_value_heads=num_key_value_heads, block_size=block_size,
        inner_precise=inner_precise)
