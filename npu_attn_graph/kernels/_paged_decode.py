"""Fast path of the reference kernels for the common paged decode call.

A serving engine's decode step calls npu_incre_flash_attention (or
npu_fused_infer_attention_score) once per layer with one query token per
sequence, paged caches and nothing else: no mask, pse, quantisation, rope,
shared prefix, sink or softmax_lse. The general path (_inference_kernel.run)
handles that call through the chunked attention core, which gathers a few
blocks at a time and, because unused slots may hold NaN, multiplies the
probabilities by the values one batch window at a time: dozens of small ops
per call. Here the same result is computed in a handful of ops:

1. every sequence's blocks up to the longest sequence's need are gathered
   once (one index_select per cache);
2. the key and value slots past each sequence's length (the rest of its last
   block, the blocks it does not use) are set to 0 in the gathered copy -- the
   cache itself is never written -- and masked out of the scores, so whatever
   they held (NaN, inf) cannot reach the output (0 * NaN is NaN, NaN - inf is
   NaN), exactly as the NPU never reads them;
3. per KV head, one (G, S) score matrix for its G = N // Nkv query heads: one
   baddbmm adds the key mask (0 / -inf) to the scaled scores, then softmax and one
   bmm with V (K/V are not repeated per query head). Measured side by side in one
   process on the mini-vLLM decode call (33 sequences, 8/2 heads, up to 96 slots):
   the whole op 0.87-0.91x the time it took with torch SDPA and a bool key mask
   (CPU SDPA's per-call overhead outweighs its kernel at one query token), which in
   turn had been 1.7-3x faster than the masked_fill / softmax / per-head copies
   before it;
4. a sequence of length 0 outputs zeros, as on the NPU.

What every layer of a step shares (the block ids, the key mask, the rows to
zero) is computed once per block table contents and lengths
(_library.once_per_contents: under Inductor each layer's op may get its own
copy of the table, cast to int32).

Taken only when the call is exactly that form and the gathered K/V fit the
reference kernels' memory budget (_library.SCORE_BLOCK_BYTES); every other
call goes the general way. The validation is the same: run() validates the
call before trying this path, and a block_table holding anything but block
ids goes through the general path's own check (paged_block_ids: a used entry
out of range is an error naming it, an unused one -- vLLM's -1 padding --
becomes block 0, whose slots are then zeroed like any unread slot).
``PATHS`` counts the paged calls each way ("fast" / "general"), for tests.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch

from . import _library
from ._attention_core import as_dtype, compute_dtype, paged_block_ids
from ._inference import Geometry, InferenceCall, broadcast, plain_float_inputs
from ._layouts import from_bnsd, to_bnsd

PATHS: Counter = Counter()


def eligible(call: InferenceCall, g: Geometry) -> bool:
    """The call is a plain paged decode: S == 1 queries, paged float caches, no other input."""
    return (
        call.block_table is not None and g.q_seq == 1 and call.layout.inputs != "TND"
        and call.atten_mask is None and plain_float_inputs(call)
    )


class _Plan(NamedTuple):
    """What a step's calls share: every layer reads the same block table and lengths."""

    ids: torch.Tensor  # (B * width,) block ids, the table's entries past a need included
    bias: torch.Tensor  # (B * Nkv, 1, S): 0 within each sequence's length, -inf past it
    unread_rows: torch.Tensor  # ids of the unread rows of the gathered K/V, in _gather's row order
    empty: torch.Tensor | None  # batches of length 0


def run(call: InferenceCall, g: Geometry) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(attention_out, softmax_lse placeholder) of an eligible, validated call; None where the
    general path must take it (over the memory budget, or a used table entry out of range)."""
    batch, bs = g.batch, call.block_size
    if batch == 0:
        return None
    kv_lens = broadcast(call.kv_lens, batch)
    width = max(1, -(-max(kv_lens) // bs))
    seq = width * bs
    dtype = compute_dtype(call.query.dtype)
    if batch * seq * g.kv_heads * max(g.head_dim, g.value_dim) * dtype.itemsize > _library.SCORE_BLOCK_BYTES:
        return None
    if call.block_table.shape[1] < width:
        return None
    shared_by = (tuple(kv_lens), bs, call.key.shape[0], call.key.dim(), g.kv_heads, dtype)
    plan = _library.once_per_contents(call.block_table, "paged_decode", shared_by,
                                      lambda: _plan(call, g, kv_lens, width, dtype))
    # K too: a NaN key scores NaN, and the mask is added (-inf), which leaves NaN.
    key = _gather(call.key, plan.ids, plan.unread_rows, batch, g.kv_heads, bs, dtype)
    value = _gather(call.value, plan.ids, plan.unread_rows, batch, g.kv_heads, bs, dtype)
    query = as_dtype(to_bnsd(call.query, call.layout.inputs, g.heads), dtype)
    out = _grouped_attention(query, key, value, plan.bias, call.scale)
    if plan.empty is not None:  # nothing to attend to: 0 (the softmax of a row of -inf is NaN)
        out.index_fill_(0, plan.empty, 0)
    out = from_bnsd(as_dtype(out, g.out_dtype), call.layout.output)
    PATHS["fast"] += 1
    return out, torch.zeros(1, dtype=torch.float32, device=call.query.device)


def _grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """(B, N, 1, Dv) attention of one query token per sequence: each KV head's query heads
    (N // Nkv of them, heads n * G .. n * G + G - 1 read KV head n) form the rows of one
    (G, S) score matrix, the key mask added by the same baddbmm."""
    batch, heads, _, head_dim = query.shape
    kv_heads, seq = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    q = query.reshape(batch * kv_heads, groups, head_dim)
    k = key.reshape(batch * kv_heads, seq, head_dim)
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    out = torch.bmm(torch.softmax(scores, -1), value.reshape(batch * kv_heads, seq, value.shape[-1]))
    return out.view(batch, heads, 1, value.shape[-1])


def _plan(call: InferenceCall, g: Geometry, kv_lens: list[int], width: int, dtype: torch.dtype) -> _Plan:
    batch, bs, device = g.batch, call.block_size, call.query.device
    seq = width * bs
    table = call.block_table[:, :width]
    # Entries past a sequence's need are gathered too (then zeroed), so they must be block
    # ids as well. One reduction says whether they all are (an engine pads with a real
    # block); else the general path's check validates the entries in use and sets the
    # others to block 0.
    low, high = (int(x) for x in torch.aminmax(table))
    if low < 0 or high >= call.key.shape[0]:
        table = paged_block_ids(call.op, call.block_table, kv_lens, bs, call.key.shape[0], call.kv_lens_name)
    lengths = torch.tensor(kv_lens, dtype=torch.int64, device=device)
    unread = torch.arange(seq, device=device).view(1, -1) >= lengths.view(-1, 1)  # (B, S)
    if call.value.dim() == 3:  # _gather zeroes token rows (B * S)
        rows = unread.reshape(-1)
    else:  # head-major rows (B * Nkv * S)
        rows = unread.view(batch, 1, seq).expand(batch, g.kv_heads, seq).reshape(-1)
    empty = [b for b, n in enumerate(kv_lens) if n == 0]
    # (B * Nkv, 1, S): 0 where read, -inf where not; baddbmm broadcasts it over the query heads.
    bias = torch.zeros(batch, seq, dtype=dtype, device=device).masked_fill_(unread, float("-inf"))
    bias = bias.view(batch, 1, 1, seq).expand(batch, g.kv_heads, 1, seq).reshape(batch * g.kv_heads, 1, seq)
    # The table a copy, not a view: a view would keep the table alive in the memo
    # (once_per_version's entries go with their tensor; under Inductor every step's table would stay).
    return _Plan(table.reshape(-1).clone(), bias, rows.nonzero().view(-1),
                 torch.tensor(empty, device=device) if empty else None)


def _gather(cache: torch.Tensor, ids: torch.Tensor, unread_rows: torch.Tensor, batch: int, kv_heads: int,
            block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Blocks `ids` of a (blocknum, blocksize, H) or (blocknum, Nkv, blocksize, D) cache as
    (B, Nkv, S, D) in `dtype`, with the `unread_rows` set to 0 in the copy."""
    seq = ids.shape[0] // batch * block_size
    picked = as_dtype(cache.index_select(0, ids), dtype)
    if cache.dim() == 3:  # (B * width, blocksize, H): token rows of H = Nkv * D; a strided view
        picked.view(batch * seq, -1).index_fill_(0, unread_rows, 0)
        return picked.view(batch, seq, kv_heads, -1).transpose(1, 2)
    width = seq // block_size  # (B * width, Nkv, blocksize, D) -> (B, Nkv, S, D), one copy
    picked = picked.view(batch, width, kv_heads, block_size, -1).transpose(1, 2).reshape(batch, kv_heads, seq, -1)
    picked.view(batch * kv_heads * seq, -1).index_fill_(0, unread_rows, 0)
    return picked

