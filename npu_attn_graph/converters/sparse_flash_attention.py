"""GE converter for npu_attn::npu_sparse_flash_attention -> GE ``SparseFlashAttention`` (custom-op builder).

TorchAir's generated builders have no SparseFlashAttention. IR from CANN
ops-transformer attention/sparse_flash_attention (op_graph/sparse_flash_attention_proto.h,
op_host/sparse_flash_attention_def.cpp): inputs query, key, value,
sparse_indices, block_table, actual_seq_lengths_query, actual_seq_lengths_kv,
query_rope, key_rope, sinks (all after sparse_indices optional); outputs
attention_out, softmax_max, softmax_sum; attrs scale_value, sparse_block_size,
layout_query, layout_kv, sparse_mode, pre_tokens, next_tokens, attention_mode,
return_softmax_lse.
"""

from __future__ import annotations

import torch

from ..kernels.sparse_flash_attention import resolved_attention_mode
from ._ge import INT64_MAX, Tensor, attr, custom_op, register_fx_node_ge_converter, register_ir

OP_TYPE = "SparseFlashAttention"
INPUTS = [("query", "required"), ("key", "required"), ("value", "required"), ("sparse_indices", "required"),
          ("block_table", "optional"), ("actual_seq_lengths_query", "optional"),
          ("actual_seq_lengths_kv", "optional"), ("query_rope", "optional"), ("key_rope", "optional"),
          ("sinks", "optional")]
OUTPUTS = ["attention_out", "softmax_max", "softmax_sum"]
ATTRS = [("scale_value", "Float"), ("sparse_block_size", "Int"), ("layout_query", "String"),
         ("layout_kv", "String"), ("sparse_mode", "Int"), ("pre_tokens", "Int"), ("next_tokens", "Int"),
         ("attention_mode", "Int"), ("return_softmax_lse", "Bool")]
register_ir(OP_TYPE, INPUTS, [(name, "required") for name in OUTPUTS], ATTRS)


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_sparse_flash_attention.default)
def convert_sparse_flash_attention(
    query: Tensor, key: Tensor, value: Tensor | None, sparse_indices: Tensor, scale_value: float, *,
    block_table: Tensor | None = None, actual_seq_lengths_query: Tensor | None = None,
    actual_seq_lengths_kv: Tensor | None = None, query_rope: Tensor | None = None,
    key_rope: Tensor | None = None, sparse_block_size: int = 1, layout_query: str = "BSND",
    layout_kv: str = "BSND", sparse_mode: int = 3, pre_tokens: int = INT64_MAX, next_tokens: int = INT64_MAX,
    attention_mode: int = 0, return_softmax_lse: bool = False, sinks: Tensor | None = None, meta_outputs=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """npu_attn::npu_sparse_flash_attention(Tensor query, Tensor key, Tensor? value, Tensor sparse_indices,
    float scale_value, *, Tensor? block_table=None, Tensor? actual_seq_lengths_query=None,
    Tensor? actual_seq_lengths_kv=None, Tensor? query_rope=None, Tensor? key_rope=None,
    int sparse_block_size=1, str layout_query="BSND", str layout_kv="BSND", int sparse_mode=3,
    int pre_tokens=9223372036854775807, int next_tokens=9223372036854775807, int attention_mode=0,
    bool return_softmax_lse=False, Tensor? sinks=None) -> (Tensor, Tensor, Tensor)

    GE op type: SparseFlashAttention. value=None means value = key (MLA's shared
    latent cache), so key feeds both GE inputs. attention_mode 0 (the schema
    default, accepted by the op's fake only with query_rope/key_rope) is written
    as 2: CANN's tiling refuses every mode but 2 (see the kernel module's
    docstring). The seed's custom form (custom_npu_sparse_flash_attention) is
    this op with attention_mode=2, so it converts here too.
    """
    inputs = {
        "query": query, "key": key, "value": key if value is None else value, "sparse_indices": sparse_indices,
        "block_table": block_table, "actual_seq_lengths_query": actual_seq_lengths_query,
        "actual_seq_lengths_kv": actual_seq_lengths_kv, "query_rope": query_rope, "key_rope": key_rope,
        "sinks": sinks,
    }
    attrs = {
        "scale_value": attr.Float(scale_value), "sparse_block_size": attr.Int(sparse_block_size),
        "layout_query": attr.Str(layout_query), "layout_kv": attr.Str(layout_kv),
        "sparse_mode": attr.Int(sparse_mode), "pre_tokens": attr.Int(pre_tokens),
        "next_tokens": attr.Int(next_tokens), "attention_mode": attr.Int(resolved_attention_mode(attention_mode)),
        "return_softmax_lse": attr.Bool(return_softmax_lse),
    }
    attention_out, softmax_max, softmax_sum = custom_op(OP_TYPE, inputs=inputs, outputs=OUTPUTS, attrs=attrs)
    return attention_out, softmax_max, softmax_sum
