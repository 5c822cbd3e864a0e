"""Paged attention with the KV lengths as a tensor: thin wrappers over the two inference ops.

Not torch_npu ops (the paged-read rewrite's, passes/paged_attention_read.py); schemas each
written once, in its ``define`` call below; the drop-in functions' docstrings show them.

Each is, by definition, the wrapped op (npu_incre_flash_attention /
npu_fused_infer_attention_score) called with the same arguments and
``actual_seq_lengths(_kv)=lengths.tolist()``: paged K/V through block_table and
block_size, caches (blocknum, blocksize, H) or (blocknum, numKvHeads, blocksize, D);
without block_table, dense K/V of which each batch's first lengths[b] positions
are read (a StaticCache: nothing past the lengths is read, by the reference
kernel either).

Why a wrapper: the torch_npu ops take the per-batch KV lengths as ``SymInt[]``,
host values, while a paged model holds them in a tensor (vLLM's seq_lens) that
changes every step. Constants would recompile every step; unbacked SymInts
(one ``aten._local_scalar_dense`` per batch) fix the batch size into the graph,
sync the host once per entry, and every check on them in the ops' validation
(``max(lengths) <= capacity``, ``ceil(length / block_size) <= max_blocks``)
is a data-dependent guard that fake tensors cannot decide. The wrappers take
the tensor instead:

- fake: the wrapped op's own validation (the same InferenceCall, the same
  checks and output shapes), with a placeholder length of 0 per entry, plus
  the tensor's own rules (1-D, int32/int64); the values' rules (each entry in
  [0, capacity], used block_table entries in range) are checked by the wrapped
  op at run time, when the values exist;
- reference / NPU: one host read of the lengths, then the wrapped op (which on
  an Ascend host dispatches to torch_npu);
- GE (converters/paged_attention.py): the wrapped op's converter, with the
  lengths tensor fed straight into the GE op's actual_seq_lengths input (GE
  IncreFlashAttention / FusedInferAttentionScore take it as an int64 tensor
  input), so the GE graph reads the lengths on device, with no host read.

So the facts about the ops stay in one place: the wrapped ops' modules.
"""

from __future__ import annotations

import torch

from . import fused_infer_attention_score as _fia
from . import incre_flash_attention as _ifa
from ._inference_kernel import empty_outputs
from ._dropin import dropin
from ._library import INT_MAX, call_op, define, fail, register_fake, register_reference

__all__ = ["npu_fused_infer_attention_score_paged", "npu_incre_flash_attention_paged"]

INCRE_OP = "npu_incre_flash_attention_paged"
FIA_OP = "npu_fused_infer_attention_score_paged"
LENGTH_DTYPES = (torch.int32, torch.int64)

INCRE_QUALNAME = define(
    INCRE_OP,
    '(Tensor query, Tensor key, Tensor value, *, Tensor? block_table=None, Tensor actual_seq_lengths, '
    'Tensor? atten_mask=None, Tensor? pse_shift=None, int num_heads=1, float scale_value=1.0, '
    'str input_layout="BSH", int num_key_value_heads=0, int block_size=0, int inner_precise=1) -> Tensor',
)
FIA_QUALNAME = define(
    FIA_OP,
    '(Tensor query, Tensor key, Tensor value, *, Tensor? block_table=None, Tensor actual_seq_lengths_kv, '
    'Tensor? pse_shift=None, Tensor? atten_mask=None, int num_heads=1, float scale=1.0, '
    f'int pre_tokens={INT_MAX}, int next_tokens={INT_MAX}, str input_layout="BSH", '
    'int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0, '
    'bool softmax_lse_flag=False) -> (Tensor, Tensor)',
)


def _placeholder(op: str, name: str, lengths: torch.Tensor) -> list[int]:
    """The lengths tensor's own rules, and a list of zeros with one entry per element
    (one entry when the count is symbolic: the ops broadcast a single entry)."""
    if lengths.dtype not in LENGTH_DTYPES:
        fail(op, f"{name}.dtype", f"must be one of {list(LENGTH_DTYPES)}", lengths.dtype)
    if lengths.dim() != 1:
        fail(op, f"{name}.dim()", "must be 1 (one length per batch)", lengths.dim())
    n = lengths.shape[0]
    return [0] * n if isinstance(n, int) else [0]


def _host(lengths: torch.Tensor) -> list[int]:
    return [int(x) for x in lengths.tolist()]


@register_fake(INCRE_QUALNAME)
def _incre_fake(query, key, value, *, block_table=None, actual_seq_lengths, **kwargs):
    lens = _placeholder(INCRE_OP, "actual_seq_lengths", actual_seq_lengths)
    call = _ifa._call(query, key, value, block_table=block_table, actual_seq_lengths=lens, **kwargs)
    return empty_outputs(call)[0]


def _incre_reference(query, key, value, *, block_table=None, actual_seq_lengths, **kwargs):
    _placeholder(INCRE_OP, "actual_seq_lengths", actual_seq_lengths)
    return call_op(_ifa.QUALNAME, query, key, value, block_table=block_table,
                   actual_seq_lengths=_host(actual_seq_lengths), **kwargs)


@register_fake(FIA_QUALNAME)
def _fia_fake(query, key, value, *, block_table=None, actual_seq_lengths_kv, **kwargs):
    lens = _placeholder(FIA_OP, "actual_seq_lengths_kv", actual_seq_lengths_kv)
    call = _fia._call(query, key, value, block_table=block_table, actual_seq_lengths_kv=lens, **kwargs)
    return empty_outputs(call)


def _fia_reference(query, key, value, *, block_table=None, actual_seq_lengths_kv, **kwargs):
    _placeholder(FIA_OP, "actual_seq_lengths_kv", actual_seq_lengths_kv)
    return call_op(_fia.QUALNAME, query, key, value, block_table=block_table,
                   actual_seq_lengths_kv=_host(actual_seq_lengths_kv), **kwargs)


register_reference(INCRE_QUALNAME, _incre_reference)
register_reference(FIA_QUALNAME, _fia_reference)


npu_incre_flash_attention_paged = dropin(INCRE_QUALNAME, __name__, """\
npu_incre_flash_attention with the KV lengths as a tensor (see module docstring).""")


npu_fused_infer_attention_score_paged = dropin(FIA_QUALNAME, __name__, """\
npu_fused_infer_attention_score with the KV lengths as a tensor (see module docstring).""")
