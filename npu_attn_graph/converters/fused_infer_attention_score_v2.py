"""GE converter for npu_attn::npu_fused_infer_attention_score_v2 -> GE ``FusedInferAttentionScore``.

The same GE op as npu_fused_infer_attention_score, wired as TorchAir 2.13's own
converter for torch.ops.npu.npu_fused_infer_attention_score_v2 wires it
(torchair/_ge_concrete_graph/ge_converter/custom/fused_infer_attention_score_v2.py
in the torch_npu 2.13.0 wheel):

    GE input / attr            <- v2 argument
    query, key0, value0        <- query, key, value (key/value: one-tensor lists)
    actual_seq_lengths(_kv)    <- actual_seq_qlen / actual_seq_kvlen (int64)
    quant_scale1               <- quant_scale_p
    quant_scale2, quant_offset2 <- quant_scale_out, quant_offset_out
    key/value_antiquant_scale/offset <- dequant_scale_key/value, dequant_offset_key/value
    key_rope_antiquant_scale   <- dequant_scale_key_rope
    dequant_scale_query, learnable_sink, query_rope, key_rope, pse_shift,
    atten_mask, block_table    <- the arguments of the same names
    dequant_scale1, dequant_scale2, antiquant_scale/offset, query/kv_padding_size,
    key/value_shared_prefix, actual_shared_prefix_len, q_start_idx, kv_start_idx: unfed
    num_heads <- num_query_heads; scale <- softmax_scale; softmax_lse_flag <- return_softmax_lse;
    key/value_antiquant_mode <- key/value_quant_mode; antiquant_mode = 0; pse_type = 0;
    query_quant_mode, pre/next_tokens, input_layout, num_key_value_heads, sparse_mode,
    inner_precise, block_size as given; out_dtype written only when given.

TorchAir's converter also reinterprets int4 (int32) and fp4/hifloat8 tensors
(Bitcast + Reshape) for the *_dtype overrides; our op refuses those inputs
(no reference semantics), so such a node never reaches this converter.
"""

from __future__ import annotations

import torch

from ._ge import INT_MAX, Tensor, TensorSpec, ge, int_list_input, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_fused_infer_attention_score_v2.default)
def convert_fused_infer_attention_score_v2(
    query: Tensor, key: Tensor, value: Tensor, *, query_rope: Tensor | None = None, key_rope: Tensor | None = None,
    pse_shift: Tensor | None = None, atten_mask: Tensor | None = None, actual_seq_qlen=None,
    actual_seq_kvlen=None, block_table: Tensor | None = None, dequant_scale_query: Tensor | None = None,
    dequant_scale_key: Tensor | None = None, dequant_offset_key: Tensor | None = None,
    dequant_scale_value: Tensor | None = None, dequant_offset_value: Tensor | None = None,
    dequant_scale_key_rope: Tensor | None = None, quant_scale_out: Tensor | None = None,
    quant_offset_out: Tensor | None = None, quant_scale_p: Tensor | None = None,
    learnable_sink: Tensor | None = None, num_query_heads: int = 1, num_key_value_heads: int = 0,
    softmax_scale: float = 1.0, pre_tokens: int = INT_MAX, next_tokens: int = INT_MAX, input_layout: str = "BSH",
    sparse_mode: int = 0, block_size: int = 0, query_quant_mode: int = 0, key_quant_mode: int = 0,
    value_quant_mode: int = 0, inner_precise: int = 0, return_softmax_lse: bool = False, query_dtype=None,
    key_dtype=None, value_dtype=None, query_rope_dtype=None, key_rope_dtype=None, key_shared_prefix_dtype=None,
    value_shared_prefix_dtype=None, dequant_scale_query_dtype=None, dequant_scale_key_dtype=None,
    dequant_scale_value_dtype=None, dequant_scale_key_rope_dtype=None, out_dtype=None,
    meta_outputs: TensorSpec | None = None,
) -> tuple[Tensor, Tensor]:
    """npu_attn::npu_fused_infer_attention_score_v2(Tensor query, Tensor key, Tensor value, *,
    Tensor? query_rope=None, Tensor? key_rope=None, Tensor? pse_shift=None, Tensor? atten_mask=None,
    SymInt[]? actual_seq_qlen=None, SymInt[]? actual_seq_kvlen=None, Tensor? block_table=None,
    Tensor? dequant_scale_query=None, Tensor? dequant_scale_key=None, Tensor? dequant_offset_key=None,
    Tensor? dequant_scale_value=None, Tensor? dequant_offset_value=None, Tensor? dequant_scale_key_rope=None,
    Tensor? quant_scale_out=None, Tensor? quant_offset_out=None, Tensor? quant_scale_p=None,
    Tensor? learnable_sink=None, int num_query_heads=1, int num_key_value_heads=0, float softmax_scale=1.,
    int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout="BSH", int sparse_mode=0,
    int block_size=0, int query_quant_mode=0, int key_quant_mode=0, int value_quant_mode=0,
    int inner_precise=0, bool return_softmax_lse=False, int? query_dtype=None, int? key_dtype=None,
    int? value_dtype=None, int? query_rope_dtype=None, int? key_rope_dtype=None,
    int? key_shared_prefix_dtype=None, int? value_shared_prefix_dtype=None,
    int? dequant_scale_query_dtype=None, int? dequant_scale_key_dtype=None,
    int? dequant_scale_value_dtype=None, int? dequant_scale_key_rope_dtype=None,
    int? out_dtype=None) -> (Tensor, Tensor)

    GE op type: FusedInferAttentionScore (outputs attention_out, softmax_lse); the
    wiring table is in the module docstring.
    """
    return ge.FusedInferAttentionScore(
        query, [key], [value], pse_shift=pse_shift, atten_mask=atten_mask,
        actual_seq_lengths=int_list_input(actual_seq_qlen), actual_seq_lengths_kv=int_list_input(actual_seq_kvlen),
        dequant_scale1=None, quant_scale1=quant_scale_p, dequant_scale2=None, quant_scale2=quant_scale_out,
        quant_offset2=quant_offset_out, antiquant_scale=None, antiquant_offset=None, block_table=block_table,
        query_padding_size=None, kv_padding_size=None, key_antiquant_scale=dequant_scale_key,
        key_antiquant_offset=dequant_offset_key, value_antiquant_scale=dequant_scale_value,
        value_antiquant_offset=dequant_offset_value, key_shared_prefix=None, value_shared_prefix=None,
        actual_shared_prefix_len=None, query_rope=query_rope, key_rope=key_rope,
        key_rope_antiquant_scale=dequant_scale_key_rope, dequant_scale_query=dequant_scale_query,
        learnable_sink=learnable_sink, q_start_idx=None, kv_start_idx=None, num_heads=num_query_heads,
        scale=softmax_scale, pre_tokens=pre_tokens, next_tokens=next_tokens, input_layout=input_layout,
        num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode, inner_precise=inner_precise,
        block_size=block_size, antiquant_mode=0, softmax_lse_flag=return_softmax_lse,
        key_antiquant_mode=key_quant_mode, value_antiquant_mode=value_quant_mode,
        query_quant_mode=query_quant_mode, pse_type=0, out_dtype=out_dtype)
