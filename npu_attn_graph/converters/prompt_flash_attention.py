"""GE converter for npu_attn::npu_prompt_flash_attention -> GE ``PromptFlashAttention``."""

from __future__ import annotations

import torch

from ._ge import INT_MAX, Tensor, TensorSpec, ge, int_list_input, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_prompt_flash_attention.default)
def convert_prompt_flash_attention(
    query: Tensor, key: Tensor, value: Tensor, *, padding_mask: Tensor | None = None,
    atten_mask: Tensor | None = None, pse_shift: Tensor | None = None, actual_seq_lengths=None,
    deq_scale1: Tensor | None = None, quant_scale1: Tensor | None = None, deq_scale2: Tensor | None = None,
    quant_scale2: Tensor | None = None, quant_offset2: Tensor | None = None, num_heads: int = 1,
    scale_value: float = 1.0, pre_tokens: int = INT_MAX, next_tokens: int = 0, input_layout: str = "BSH",
    num_key_value_heads: int = 0, actual_seq_lengths_kv=None, sparse_mode: int = 0,
    meta_outputs: TensorSpec | None = None,
) -> Tensor:
    """npu_attn::npu_prompt_flash_attention(Tensor query, Tensor key, Tensor value, *, Tensor? padding_mask=None,
    Tensor? atten_mask=None, Tensor? pse_shift=None, int[]? actual_seq_lengths=None, Tensor? deq_scale1=None,
    Tensor? quant_scale1=None, Tensor? deq_scale2=None, Tensor? quant_scale2=None, Tensor? quant_offset2=None,
    int num_heads=1, float scale_value=1., int pre_tokens=2147483647, int next_tokens=0, str input_layout="BSH",
    int num_key_value_heads=0, int[]? actual_seq_lengths_kv=None, int sparse_mode=0) -> Tensor

    GE op type: PromptFlashAttention (TorchAir's generated builder). padding_mask is
    reserved by torch_npu and has no GE input; the length lists become int64 inputs.
    """
    return ge.PromptFlashAttention(
        query, key, value, pse_shift=pse_shift, atten_mask=atten_mask,
        actual_seq_lengths=int_list_input(actual_seq_lengths),
        actual_seq_lengths_kv=int_list_input(actual_seq_lengths_kv),
        deq_scale1=deq_scale1, quant_scale1=quant_scale1, deq_scale2=deq_scale2, quant_scale2=quant_scale2,
        quant_offset2=quant_offset2, num_heads=num_heads, scale_value=scale_value, pre_tokens=pre_tokens,
        next_tokens=next_tokens, input_layout=input_layout, num_key_value_heads=num_key_value_heads,
        sparse_mode=sparse_mode)
