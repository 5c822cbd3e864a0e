"""GE converter for npu_attn::npu_nsa_compress_attention_infer -> GE ``NsaCompressAttentionInfer`` (custom-op builder).

TorchAir has no generated builder for it. IR from CANN ops-transformer
attention/nsa_compress_attention_infer/op_host/nsa_compress_attention_infer_def.cpp
(the OpDef; the op's docs/NsaCompressAttentionInfer.md shows an older, different
REG_OP): inputs query, key, value, attentionMaskOptional, blockTableOptional,
actualQSeqLenOptional, actualCmpKvSeqLenOptional, actualSelKvSeqLenOptional,
topkMaskOptional; outputs output, topkIndicesOut; attrs numHeads,
numKeyValueHeads, selectBlockSize, selectBlockCount, compressBlockSize,
compressStride, scaleValue, layoutOptional, pageBlockSize, sparseMode. The
tiling reads the three length inputs on the host, so they are int64 constants.
"""

from __future__ import annotations

import torch

from ._ge import Tensor, attr, custom_op, int_list_input, register_fx_node_ge_converter, register_ir

OP_TYPE = "NsaCompressAttentionInfer"
INPUTS = [("query", "required"), ("key", "required"), ("value", "required"), ("attentionMaskOptional", "optional"),
          ("blockTableOptional", "optional"), ("actualQSeqLenOptional", "optional"),
          ("actualCmpKvSeqLenOptional", "optional"), ("actualSelKvSeqLenOptional", "optional"),
          ("topkMaskOptional", "optional")]
OUTPUTS = ["output", "topkIndicesOut"]
ATTRS = [("numHeads", "Int"), ("numKeyValueHeads", "Int"), ("selectBlockSize", "Int"), ("selectBlockCount", "Int"),
         ("compressBlockSize", "Int"), ("compressStride", "Int"), ("scaleValue", "Float"),
         ("layoutOptional", "String"), ("pageBlockSize", "Int"), ("sparseMode", "Int")]
register_ir(OP_TYPE, INPUTS, [(name, "required") for name in OUTPUTS], ATTRS)


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_nsa_compress_attention_infer.default)
def convert_nsa_compress_attention_infer(
    query: Tensor, key: Tensor, value: Tensor, scale_value: float, head_num: int, key_value_head_num: int,
    select_block_size: int, select_block_count: int, page_block_size: int, compress_block_size: int,
    compress_stride: int, *, layout: str = "TND", atten_mask: Tensor | None = None,
    block_table: Tensor | None = None, topk_mask: Tensor | None = None, actual_seq_qlen=None,
    actual_cmp_seq_kvlen=None, actual_sel_seq_kvlen=None, meta_outputs=None,
) -> tuple[Tensor, Tensor]:
    """npu_attn::npu_nsa_compress_attention_infer(Tensor query, Tensor key, Tensor value, float scale_value,
    int head_num, int key_value_head_num, int select_block_size, int select_block_count, int page_block_size,
    int compress_block_size, int compress_stride, *, str layout='TND', Tensor? atten_mask=None,
    Tensor? block_table=None, Tensor? topk_mask=None, int[]? actual_seq_qlen=None,
    int[]? actual_cmp_seq_kvlen=None, int[]? actual_sel_seq_kvlen=None) -> (Tensor, Tensor)

    GE op type: NsaCompressAttentionInfer (outputs: attention output, top-k block
    indices). sparseMode is 0: the torch op has no sparse_mode argument.
    """
    inputs = {
        "query": query, "key": key, "value": value, "attentionMaskOptional": atten_mask,
        "blockTableOptional": block_table, "actualQSeqLenOptional": int_list_input(actual_seq_qlen),
        "actualCmpKvSeqLenOptional": int_list_input(actual_cmp_seq_kvlen),
        "actualSelKvSeqLenOptional": int_list_input(actual_sel_seq_kvlen), "topkMaskOptional": topk_mask,
    }
    attrs = {
        "numHeads": attr.Int(head_num), "numKeyValueHeads": attr.Int(key_value_head_num),
        "selectBlockSize": attr.Int(select_block_size), "selectBlockCount": attr.Int(select_block_count),
        "compressBlockSize": attr.Int(compress_block_size), "compressStride": attr.Int(compress_stride),
        "scaleValue": attr.Float(scale_value), "layoutOptional": attr.Str(layout),
        "pageBlockSize": attr.Int(page_block_size), "sparseMode": attr.Int(0),
    }
    output, topk_indices = custom_op(OP_TYPE, inputs=inputs, outputs=OUTPUTS, attrs=attrs)
    return output, topk_indices
