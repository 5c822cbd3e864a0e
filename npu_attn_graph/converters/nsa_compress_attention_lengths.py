"""GE converter for the NSA wrapper (kernels/nsa_compress_attention_lengths.py): the wrapped
op's converter (GE ``NsaCompressAttentionInfer``), with the lengths tensor fed into its
actualCmpKvSeqLenOptional input (int_list_input casts it to int64), so the GE graph reads
the lengths from the tensor, with no host read in the graph.
"""

from __future__ import annotations

import torch

from . import nsa_compress_attention_infer  # noqa: F401 (registered first)
from ._ge import Tensor, TensorSpec, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_nsa_compress_attention_infer_lengths.default)
def convert_nsa_compress_attention_infer_lengths(
    query: Tensor, key: Tensor, value: Tensor, scale_value: float, head_num: int, key_value_head_num: int,
    select_block_size: int, select_block_count: int, page_block_size: int, compress_block_size: int,
    compress_stride: int, *, block_table: Tensor, actual_cmp_seq_kvlen: Tensor, layout: str = "TND",
    meta_outputs: TensorSpec | None = None,
) -> tuple[Tensor, Tensor]:
    # TorchAir's decorator keeps the registered function, functools-wrapped, on the op.
    convert = torch.ops.npu_attn.npu_nsa_compress_attention_infer.default._ge_converter.__wrapped__
    return convert(
        query, key, value, scale_value, head_num, key_value_head_num, select_block_size, select_block_count,
        page_block_size, compress_block_size, compress_stride, layout=layout, block_table=block_table,
        actual_cmp_seq_kvlen=actual_cmp_seq_kvlen, meta_outputs=meta_outputs)
