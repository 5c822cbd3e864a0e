"""GE converter for npu_attn::npu_fused_infer_attention_score -> GE ``FusedInferAttentionScore``."""

from __future__ import annotations

import torch

from ._ge import INT_MAX, Tensor, TensorSpec, ge, int_list_input, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_fused_infer_attention_score.default)
def convert_fused_infer_attention_score(
    query: Tensor, key: Tensor, value: Tensor, *, pse_shift: Tensor | None = None,
    atten_mask: Tensor | None = None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
    dequant_scale1: Tensor | None = None, quant_scale1: Tensor | None = None,
    dequant_scale2: Tensor | None = None, quant_scale2: Tensor | None = None,
    quant_offset2: Tensor | None = None, antiquant_scale: Tensor | None = None,
    antiquant_offset: Tensor | None = None, key_antiquant_scale: Tensor | None = None,
    key_antiquant_offset: Tensor | None = None, value_antiquant_scale: Tensor | None = None,
    value_antiquant_offset: Tensor | None = None, block_table: Tensor | None = None,
    query_padding_size: Tensor | None = None, kv_padding_size: Tensor | None = None,
    key_shared_prefix: Tensor | None = None, value_shared_prefix: Tensor | None = None,
    actual_shared_prefix_len=None, query_rope: Tensor | None = None, key_rope: Tensor | None = None,
    key_rope_antiquant_scale: Tensor | None = None, num_heads: int = 1, scale: float = 1.0,
    pre_tokens: int = INT_MAX, next_tokens: int = INT_MAX, input_layout: str = "BSH",
    num_key_value_heads: int = 0, sparse_mode: int = 0, inner_precise: int = 0, block_size: int = 0,
    antiquant_mode: int = 0, key_antiquant_mode: int = 0, value_antiquant_mode: int = 0,
    softmax_lse_flag: bool = False, meta_outputs: TensorSpec | None = None,
) -> tuple[Tensor, Tensor]:
    """npu_attn::npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *,
    Tensor? pse_shift=None, Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None,
    SymInt[]? actual_seq_lengths_kv=None, Tensor? dequant_scale1=None, Tensor? quant_scale1=None,
    Tensor? dequant_scale2=None, Tensor? quant_scale2=None, Tensor? quant_offset2=None,
    Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, Tensor? key_antiquant_scale=None,
    Tensor? key_antiquant_offset=None, Tensor? value_antiquant_scale=None, Tensor? value_antiquant_offset=None,
    Tensor? block_table=None, Tensor? query_padding_size=None, Tensor? kv_padding_size=None,
    Tensor? key_shared_prefix=None, Tensor? value_shared_prefix=None, SymInt[]? actual_shared_prefix_len=None,
    Tensor? query_rope=None, Tensor? key_rope=None, Tensor? key_rope_antiquant_scale=None, int num_heads=1,
    float scale=1., int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout="BSH",
    int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0,
    int antiquant_mode=0, int key_antiquant_mode=0, int value_antiquant_mode=0,
    bool softmax_lse_flag=False) -> (Tensor, Tensor)

    GE op type: FusedInferAttentionScore (outputs attention_out, softmax_lse). key
    and value are dynamic (tensor-list) inputs: one tensor each here. GE inputs
    this schema does not have (dequant_scale_query, learnable_sink, q_start_idx,
    kv_start_idx) stay unfed, their attrs at GE's defaults.
    """
    return ge.FusedInferAttentionScore(
        query, [key], [value], pse_shift=pse_shift, atten_mask=atten_mask,
        actual_seq_lengths=int_list_input(actual_seq_lengths),
        actual_seq_lengths_kv=int_list_input(actual_seq_lengths_kv), dequant_scale1=dequant_scale1,
        quant_scale1=quant_scale1, dequant_scale2=dequant_scale2, quant_scale2=quant_scale2,
        quant_offset2=quant_offset2, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
        block_table=block_table, query_padding_size=query_padding_size, kv_padding_size=kv_padding_size,
        key_antiquant_scale=key_antiquant_scale, key_antiquant_offset=key_antiquant_offset,
        value_antiquant_scale=value_antiquant_scale, value_antiquant_offset=value_antiquant_offset,
        key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
        actual_shared_prefix_len=int_list_input(actual_shared_prefix_len), query_rope=query_rope,
        key_rope=key_rope, key_rope_antiquant_scale=key_rope_antiquant_scale, dequant_scale_query=None,
        learnable_sink=None, q_start_idx=None, kv_start_idx=None, num_heads=num_heads, scale=scale,
        pre_tokens=pre_tokens, next_tokens=next_tokens, input_layout=input_layout,
        num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode, inner_precise=inner_precise,
        block_size=block_size, antiquant_mode=antiquant_mode, softmax_lse_flag=softmax_lse_flag,
        key_antiquant_mode=key_antiquant_mode, value_antiquant_mode=value_antiquant_mode)
