"""NSA compressed attention with the compressed KV lengths as a tensor: a thin wrapper over
npu_nsa_compress_attention_infer.

Not a torch_npu op (the NSA rewrite's, passes/nsa_compress_attention_to_fused.py); its
schema is written once, in the ``define`` call below; the drop-in function's docstring shows
it.

By definition it is npu_nsa_compress_attention_infer called with the same arguments and
``actual_cmp_seq_kvlen=lengths.tolist()``. Why a wrapper: the op takes the per-batch
compressed lengths as ``int[]`` host values, a model holds them in a tensor that changes
every step (the reasons of kernels/paged_attention.py, which does the same for the paged
attention ops). So:

- fake: the wrapped op's own validation (_validate) with one placeholder length per entry,
  the smallest length the op accepts for these attributes
  (``n >= 1`` and ``select_block_count * select_block_size <= (n - 1) * compress_stride +
  compress_block_size``), plus the tensor's own rules (1-D, int32/int64). So the fake
  refuses exactly the attributes and shapes for which no length is valid; the values'
  rules (each entry in the op's range, used block_table entries in range) are checked by
  the wrapped op at run time, when the values exist;
- reference / NPU: one host read of the lengths, then the wrapped op (which on an Ascend
  host dispatches to torch_npu);
- GE (converters/nsa_compress_attention_lengths.py): the wrapped op's converter with the
  tensor fed into the GE op's actualCmpKvSeqLenOptional input (cast to int64).
"""

from __future__ import annotations

import math

import torch

from . import nsa_compress_attention_infer  # noqa: F401 (the wrapped op, registered first)
from ._dropin import dropin
from ._library import check, define, register_fake, register_reference

__all__ = ["npu_nsa_compress_attention_infer_lengths", "smallest_valid_length"]

OP = "npu_nsa_compress_attention_infer_lengths"
LENGTH_DTYPES = (torch.int32, torch.int64)

QUALNAME = define(
    OP,
    "(Tensor query, Tensor key, Tensor value, float scale_value, int head_num, int key_value_head_num, "
    "int select_block_size, int select_block_count, int page_block_size, int compress_block_size, "
    "int compress_stride, *, Tensor block_table, Tensor actual_cmp_seq_kvlen, str layout='TND') "
    "-> (Tensor, Tensor)",
)


def smallest_valid_length(select_block_size: int, select_block_count: int, compress_block_size: int,
                          compress_stride: int) -> int:
    """The smallest compressed length n the op accepts: n >= 1 and
    select_block_count * select_block_size <= (n - 1) * compress_stride + compress_block_size."""
    need = select_block_count * select_block_size - compress_block_size
    return max(1, math.ceil(need / compress_stride) + 1) if compress_stride > 0 else 1


def _lengths_rules(lengths: torch.Tensor) -> None:
    check(lengths.dtype in LENGTH_DTYPES, OP, "actual_cmp_seq_kvlen.dtype", f"must be one of {list(LENGTH_DTYPES)}",
          lengths.dtype)
    check(lengths.dim() == 1, OP, "actual_cmp_seq_kvlen.dim()", "must be 1 (one length per batch)", lengths.dim())


@register_fake(QUALNAME)
def _fake(query, key, value, scale_value, head_num, key_value_head_num, select_block_size, select_block_count,
          page_block_size, compress_block_size, compress_stride, *, block_table, actual_cmp_seq_kvlen, layout):
    _lengths_rules(actual_cmp_seq_kvlen)
    n = actual_cmp_seq_kvlen.shape[0]
    check(isinstance(n, int), OP, "actual_cmp_seq_kvlen.shape[0]", "must be static (the batch size)", n)
    placeholder = [smallest_valid_length(select_block_size, select_block_count, compress_block_size,
                                         compress_stride)] * n
    return torch.ops.npu_attn.npu_nsa_compress_attention_infer(
        query, key, value, scale_value, head_num, key_value_head_num, select_block_size, select_block_count,
        page_block_size, compress_block_size, compress_stride, layout=layout, block_table=block_table,
        actual_cmp_seq_kvlen=placeholder)


def _reference(query, key, value, scale_value, head_num, key_value_head_num, select_block_size, select_block_count,
               page_block_size, compress_block_size, compress_stride, *, block_table, actual_cmp_seq_kvlen,
               layout):
    _lengths_rules(actual_cmp_seq_kvlen)
    return torch.ops.npu_attn.npu_nsa_compress_attention_infer(
        query, key, value, scale_value, head_num, key_value_head_num, select_block_size, select_block_count,
        page_block_size, compress_block_size, compress_stride, layout=layout, block_table=block_table,
        actual_cmp_seq_kvlen=[int(x) for x in actual_cmp_seq_kvlen.tolist()])


register_reference(QUALNAME, _reference)


npu_nsa_compress_attention_infer_lengths = dropin(QUALNAME, __name__, """\
npu_nsa_compress_attention_infer with the compressed KV lengths as a tensor (see module docstring).""")
