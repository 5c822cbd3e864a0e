"""Chunked masked attention: the numerical core of every reference kernel.

The op modules translate their arguments (layouts, paged caches, quantisation,
sparse modes) into one canonical problem and call :func:`attention`. The query
is processed in row chunks so that the fp32 score block never exceeds a fixed
budget: extra memory is O(chunk x S_kv) per head, whatever the sequence length.
The pieces every attention kernel shares live here too, and the training kernel
(_fusion_kernel) is built from them: :class:`Structure` (valid ranges, bands,
prefix keys -> masks and key windows), :class:`RowChunks` (the chunk walk and
each chunk's mask), :func:`fold_rows` (GQA), :func:`fused_chunk` (one chunk through
torch SDPA, also the dense prompt fast path's whole call), the chunked softmax step
(:func:`exp_scores`, also the sparse kernel's, and :func:`fused_softmax`, the
same math in torch's one-pass kernel), :func:`chunk_rows` and :func:`compute_dtype`.

Conventions (those of the NPU ops, not of torch SDPA):
- ``mask`` True means "masked out".
- A query row whose every key is masked (or that lies outside its batch's
  valid rows) produces zeros, not NaN; its log-sum-exp is +inf. (The NPU does
  the same with row-invalid correction; without it, hardware output for such
  rows is unspecified.)
- Keys outside a batch's ``kv_ranges`` entry (past its actual length, KV left
  padding, unused slots of a paged cache) are never read by the NPU, so they
  may hold anything, NaN and inf included (torch.empty caches, freed blocks).
  Masking alone does not keep them out (0 * NaN in P @ V; NaN + -inf in SDPA's
  additive mask), so where a chunk's keys reach past the range of a batch with
  rows to compute, P @ V (and SDPA) run one batch at a time over only that
  batch's valid keys: nothing is copied, and chunks every such range covers
  (and the dense no-lengths path) run exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F

from . import _library
from ._library import COMPRESSED_MASK_SIZE, fail, once_per_version

# Query chunks with at least this many rows use torch's fused SDPA kernel.
FUSED_MIN_ROWS = 16
# Band bounds at or past this are "unbounded" (and keep int64 arithmetic safe).
UNBOUNDED = 2**40


@dataclass(frozen=True)
class Band:
    """Keep key j for query i iff -pre_tokens <= (j - kv_start) - (i - q_start) - shift <= next_tokens.

    ``right_down`` anchors the diagonal at the bottom-right corner of each batch's
    valid block (shift = kv_len - q_len), as rightDownCausal and band modes do;
    otherwise it is anchored at the top-left (shift = 0).
    """

    pre_tokens: int
    next_tokens: int
    right_down: bool


class KeyValueSource(Protocol):
    """Keys/values in (B, Nkv, S, D) form, handed out in position chunks.

    A dense source hands out views; a paged source gathers blocks chunk by chunk
    so that no full dense copy of the cache is ever made."""

    kv_heads: int
    length: int
    value_dim: int

    def key_chunks(self, lo: int, hi: int, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]: ...

    def value_chunks(self, lo: int, hi: int, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]: ...


class DenseKeyValues:
    """A KeyValueSource over dense (B, Nkv, S, D) tensors."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value
        self.kv_heads, self.length, self.value_dim = key.shape[1], key.shape[2], value.shape[-1]

    def key_chunks(self, lo: int, hi: int, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
        yield lo, hi, as_dtype(_key_range(self.key, lo, hi), dtype)

    def value_chunks(self, lo: int, hi: int, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
        yield lo, hi, as_dtype(_key_range(self.value, lo, hi), dtype)


@dataclass
class AttentionProblem:
    """One attention call in canonical BNSD form.

    query (B, N, Sq, D); key (B, Nkv, Skv, D); value (B, Nkv, Skv, Dv), all floating,
    or instead of key/value a KeyValueSource (paged caches).
    mask: bool, broadcastable to (B, N, Sq, Skv), True = masked out.
    bias: floating, broadcastable to (B, N, Sq, Skv), added after scaling.
    q_ranges[b] = (start, end): the valid query rows of batch b; others output zero.
    kv_ranges[b] = (start, end): the valid keys of batch b.
    prob_quant_scale: full-int8 quantisation of the softmax probabilities before
    the second matmul (P_int8 = saturate(round(P * prob_quant_scale))).
    sink: (N,) per-query-head sink logits (learnable_sink, gpt-oss's "sinks"):
    each row's softmax runs over its kept scores plus one extra column holding
    sink[h], which has no value and is dropped: out = sum_j e^(s_j - m) v_j /
    (sum_j e^(s_j - m) + e^(sink_h - m)). A row with no kept key outputs 0. The
    log-sum-exp stays that of the kept scores alone (the NPU kernel computes
    softmax_lse before it adds the sink term), +inf for such a row.
    """

    query: torch.Tensor
    key: torch.Tensor | None
    value: torch.Tensor | None
    scale: float
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    q_ranges: Sequence[tuple[int, int]] | None = None
    kv_ranges: Sequence[tuple[int, int]] | None = None
    band: Band | None = None
    prob_quant_scale: float | None = None
    source: KeyValueSource | None = None
    sink: torch.Tensor | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reduced-precision inputs are computed in fp32, as the NPU accumulates."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype. (x.to(its own dtype) returns x too, but through the dispatcher: a few
    microseconds that the decode fast paths pay per call.)"""
    return x if x.dtype == dtype else x.to(dtype)


def chunk_rows(batch: int, heads: int, kv_len: int, budget_bytes: int | None = None) -> int:
    """Query rows per chunk so that one fp32 (B, N, rows, kv_len) score block fits the budget
    (default: _library.SCORE_BLOCK_BYTES, read at call time so tests can shrink it)."""
    per_row = max(1, batch * heads * kv_len * 4)
    return max(1, (budget_bytes or _library.SCORE_BLOCK_BYTES) // per_row)


def exp_scores(
    scores: torch.Tensor, sink: torch.Tensor | None = None, *, sink_in_max: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked softmax's shared step: scores (.., keys), -inf where masked, become
    exp(scores - m) IN PLACE. Returns (m, kept, total, safe), each (.., 1):

    m     the row max (with the sink's logit when sink_in_max), 0 where it is infinite
          (a row with nothing to attend to), so that such a row exponentiates to zeros;
    kept  sum_j exp(s_j - m) over the kept scores;
    total kept + exp(sink - m) with a sink (broadcastable to m), else kept;
    safe  total, with 1 where it is 0: the divisor for P = exp(s - m) / safe.
    """
    m = scores.amax(dim=-1, keepdim=True)
    if sink is not None and sink_in_max:
        m = torch.maximum(m, sink)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    scores.sub_(m).exp_()
    kept = scores.sum(dim=-1, keepdim=True)
    total = kept if sink is None else kept + torch.exp(sink - m)
    safe = torch.where(total == 0, torch.ones_like(total), total)  # (with a sink: a -inf sink)
    return m, kept, total, safe


def fused_softmax(scores: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp_scores without a sink, normalised, in torch's fused softmax (one in-cache pass
    per row, where exp_scores + divide make three): out = exp(scores - m) / total.
    scores (.., keys), -inf where masked, are left as they are. Returns (m, total), each
    (.., 1): the row max, -inf for a row with nothing to attend to (whose out is NaN: the
    caller zeroes such rows), and sum_j exp(s_j - m), read back from the probability at
    the arg max (exp(0) / total)."""
    torch.ops.aten._softmax.out(scores, -1, False, out=out)
    return scores.amax(dim=-1, keepdim=True), 1.0 / out.amax(dim=-1, keepdim=True)


def fold_rows(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, N, rows, X) -> (B, Nkv, G * rows, X), G = N // Nkv: GQA folds the query heads
    that share a KV head into the row axis, so K/V are never repeated (a view of a
    contiguous x, else a copy)."""
    batch, heads, rows, width = x.shape
    return x.reshape(batch, kv_heads, heads // kv_heads * rows, width)


class RowChunks:
    """The chunk walk of every dense kernel: the valid query rows in chunks of
    chunk_rows() rows (one fp32 score block each), the keys each chunk may attend to
    and its mask: the caller's mask (bool, broadcastable to (B, N, Sq, Skv), True =
    masked out) or-ed with the structural one. structure None: every row attends to
    all kv_len keys."""

    def __init__(self, batch: int, heads: int, q_len: int, kv_len: int, structure: Structure | None,
                 mask: torch.Tensor | None, budget_bytes: int | None = None) -> None:
        self.batch, self.heads, self.kv_len, self.budget_bytes = batch, heads, kv_len, budget_bytes
        self.structure, self.mask = structure, mask
        ranges = structure.q_ranges if structure is not None else [(0, q_len)]
        self.first_row = min((s for s, e in ranges if e > s), default=q_len)
        self.last_row = max((e for s, e in ranges if e > s), default=0)

    @property
    def masked(self) -> bool:
        return self.mask is not None or self.structure is not None

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        """(r0, r1, lo, hi) for each chunk: its rows and the keys they may attend to
        (hi <= lo: none). The chunk size is read at each walk (tests shrink the budget)."""
        step = chunk_rows(self.batch, self.heads, self.kv_len, self.budget_bytes)
        for r0 in range(self.first_row, self.last_row, step):
            r1 = min(self.last_row, r0 + step)
            yield r0, r1, *(self.structure.window(r0, r1) if self.structure is not None else (0, self.kv_len))

    def mask_of(self, r0: int, r1: int, lo: int, hi: int) -> torch.Tensor | None:
        """bool, broadcastable to (B, N, rows, keys), True = masked out; None if nothing is."""
        masked = None if self.mask is None else self.mask[..., r0:r1, lo:hi]
        if self.structure is not None:
            structural = self.structure.mask(r0, r1, lo, hi)
            masked = structural if masked is None else masked | structural
        return masked


def attention(
    problem: AttentionProblem,
    *,
    want_lse: bool = False,
    score_block_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (out (B, N, Sq, Dv) in the compute dtype, lse (B, N, Sq, 1) fp32 or None)."""
    q = problem.query
    source = problem.source or DenseKeyValues(problem.key, problem.value)
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = source.kv_heads, source.length
    group = heads // kv_heads
    dtype = compute_dtype(q.dtype)
    device = q.device

    q_ranges = list(problem.q_ranges) if problem.q_ranges is not None else [(0, q_len)] * batch
    kv_ranges = list(problem.kv_ranges) if problem.kv_ranges is not None else [(0, kv_len)] * batch
    band = problem.band
    shifts = [
        (ke - ks) - (qe - qs) if band is not None and band.right_down else 0
        for (qs, qe), (ks, ke) in zip(q_ranges, kv_ranges)
    ]
    bands = [None if band is None else (band.pre_tokens, band.next_tokens, shift) for shift in shifts]
    structure = Structure(q_ranges, kv_ranges, bands, device)
    # Structural masking (ragged lengths, ranges, bands) is only built when some
    # row needs it; the common dense case skips it entirely.
    needs_structure = band is not None or any(
        r != (0, q_len) for r in q_ranges
    ) or any(r != (0, kv_len) for r in kv_ranges)

    chunks = RowChunks(batch, heads, q_len, kv_len, structure if needs_structure else None, problem.mask,
                       score_block_bytes)
    # Chunks of many rows over dense keys go through torch's fused SDPA kernel
    # (same math, faster GEMMs); decode-sized chunks, paged keys, softmax_lse
    # and quantised probabilities take the explicit path below.
    use_fused = (isinstance(source, DenseKeyValues) and not want_lse and problem.prob_quant_scale is None
                 and problem.sink is None)
    # The sink column's logit per query head, broadcast over batch and rows.
    sink = None if problem.sink is None else problem.sink.to(dtype).view(1, heads, 1, 1)
    if use_fused and q_len >= FUSED_MIN_ROWS and problem.mask is None and problem.bias is None:
        # No per-row data to bound: SDPA's own kernel is already O(S) in memory,
        # so hand it the whole problem when its causal flag (or none) matches.
        whole = not needs_structure
        causal = needs_structure and _is_top_left_causal(band, q_ranges, kv_ranges, shifts, q_len, kv_len)
        if whole or causal:
            out = F.scaled_dot_product_attention(q.to(dtype), source.key.to(dtype), source.value.to(dtype),
                                                 is_causal=causal, scale=problem.scale, enable_gqa=group > 1)
            return out, None

    # (allocated after the whole-problem path, which returns SDPA's own output: zeroing an
    # unused output was 4% of a 1024-token prefill)
    out = torch.zeros(batch, heads, q_len, source.value_dim, dtype=dtype, device=device)
    lse = (
        torch.full((batch, heads, q_len, 1), float("inf"), dtype=torch.float32, device=device)
        if want_lse
        else None
    )
    for r0, r1, lo, hi in chunks:
        if hi <= lo:
            continue
        rows = r1 - r0
        bias = None if problem.bias is None else problem.bias[..., r0:r1, lo:hi].to(dtype)
        masked = chunks.mask_of(r0, r1, lo, hi)
        # Keys outside a computed batch's valid range may be garbage (NaN/inf): such
        # chunks read each batch's own keys only.
        windows = structure.read_windows(r0, r1, lo, hi) if needs_structure else None
        if use_fused and rows >= FUSED_MIN_ROWS:
            qf = q[:, :, r0:r1].to(dtype)
            if windows is None:
                out[:, :, r0:r1] = fused_chunk(qf, source, lo, hi, dtype, problem.scale, bias, masked, group)
            else:
                _fused_per_batch(out[:, :, r0:r1], qf, source, lo, windows, dtype, problem.scale, bias, masked, group)
            continue
        qc = fold_rows(q[:, :, r0:r1].to(dtype) * problem.scale, kv_heads)
        scores = None
        for a, b, kc in source.key_chunks(lo, hi, dtype):
            part = torch.matmul(qc, kc.transpose(-1, -2))
            if (a, b) == (lo, hi):
                scores = part
                continue
            if scores is None:
                scores = torch.empty(batch, kv_heads, group * rows, hi - lo, dtype=dtype, device=device)
            scores[..., a - lo : b - lo] = part
        scores = scores.view(batch, heads, rows, hi - lo)
        if bias is not None:
            scores += bias
        if masked is not None:
            scores.masked_fill_(masked, float("-inf"))
        # The sink joins the denominator only (row_max is the kept scores' max, 0 for
        # an empty row, as on the NPU); row_sum is the kept scores' sum.
        row_max, row_sum, _, safe_sum = exp_scores(scores, sink)
        empty = row_sum == 0
        if problem.prob_quant_scale is not None:
            scores.div_(safe_sum).mul_(problem.prob_quant_scale).round_().clamp_(-128, 127)
        probs = fold_rows(scores, kv_heads)
        oc = None
        for a, b, vc in source.value_chunks(lo, hi, dtype):
            # P is 0 outside a batch's range, but 0 * NaN is not 0.
            sub = None if windows is None else structure.read_windows(r0, r1, a, b)
            part = (torch.matmul(probs[..., a - lo : b - lo], vc) if sub is None
                    else _product_within(probs[..., a - lo : b - lo], vc, a, sub))
            oc = part if oc is None else oc.add_(part)
        oc = oc.view(batch, heads, rows, -1)
        if problem.prob_quant_scale is None:
            oc.div_(safe_sum)
        if masked is not None:
            # Rows with nothing to attend to output 0, even when their batch's
            # keys hold garbage (read_windows() ignores batches without valid rows).
            oc.masked_fill_(empty, 0)
        out[:, :, r0:r1] = oc
        if lse is not None:
            chunk_lse = torch.where(empty, float("inf"), row_max + torch.log(row_sum))
            lse[:, :, r0:r1] = chunk_lse.to(torch.float32)
    return out, lse


def _is_top_left_causal(band: Band | None, q_ranges, kv_ranges, shifts, q_len: int, kv_len: int) -> bool:
    """True when the structure is exactly SDPA's is_causal mask: full ranges and
    a diagonal through the top-left corner with nothing cut below it."""
    return (
        band is not None
        and band.next_tokens == 0
        and band.pre_tokens >= q_len
        and all(r == (0, q_len) for r in q_ranges)
        and all(r == (0, kv_len) for r in kv_ranges)
        and all(s == 0 for s in shifts)
    )


def fused_chunk(
    q: torch.Tensor,
    source: DenseKeyValues,
    lo: int,
    hi: int,
    dtype: torch.dtype,
    scale: float,
    bias: torch.Tensor | None,
    masked: torch.Tensor | None,
    group: int,
) -> torch.Tensor:
    """One query chunk through F.scaled_dot_product_attention.

    SDPA's bool mask means "keep" (the NPU's means "masked out"), and SDPA
    leaves rows with no key undefined, so those rows are zeroed explicitly."""
    keep = None if masked is None else ~masked
    attn_mask = keep
    if bias is not None:
        attn_mask = bias if masked is None else bias.masked_fill(masked, float("-inf"))
    k = as_dtype(_key_range(source.key, lo, hi), dtype)
    v = as_dtype(_key_range(source.value, lo, hi), dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=group > 1)
    if keep is not None:
        out = torch.where(keep.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _key_range(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Keys lo:hi of a (B, N, S, D) tensor: x itself when that is all of them (a slice costs
    microseconds a call, as much as a small decode step's SDPA)."""
    return x if lo == 0 and hi >= x.shape[2] else x[:, :, lo:hi]


def _fused_per_batch(
    out: torch.Tensor,
    q: torch.Tensor,
    source: DenseKeyValues,
    lo: int,
    windows: Sequence[tuple[int, int]],
    dtype: torch.dtype,
    scale: float,
    bias: torch.Tensor | None,
    masked: torch.Tensor | None,
    group: int,
) -> None:
    """fused_chunk one batch at a time over its window of keys only, into out
    (B, N, rows, Dv), which holds zeros: SDPA adds its mask to the scores, so a
    masked NaN key would still give NaN."""
    for i, (s, e) in enumerate(windows):
        if e > s:  # else nothing to read: the batch's rows stay 0
            one = DenseKeyValues(source.key[i : i + 1], source.value[i : i + 1])
            out[i : i + 1] = fused_chunk(q[i : i + 1], one, s, e, dtype, scale, _batch_keys(bias, i, s - lo, e - lo),
                                          _batch_keys(masked, i, s - lo, e - lo), group)


def _batch_keys(t: torch.Tensor | None, i: int, a: int, b: int) -> torch.Tensor | None:
    """Batch i (or the broadcast batch) and key columns [a, b) of a (B|1, N|1, rows, keys) tensor."""
    if t is None:
        return None
    return (t[i : i + 1] if t.shape[0] > 1 else t)[..., a:b]


def _product_within(
    probs: torch.Tensor, values: torch.Tensor, a: int, windows: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """probs (B, Nkv, R, n) @ values (B, Nkv, n, Dv) over keys [a, a + n), batch i
    summing over its window only: values outside it are replaced by 0 before the
    product (where() selects, so a NaN there never reaches the sum; probs are 0
    there already), in one batched matmul instead of one per batch."""
    n = values.shape[-2]
    device = values.device
    j = torch.arange(a, a + n, device=device).view(1, 1, n, 1)
    starts = torch.tensor([s for s, _ in windows], device=device).view(-1, 1, 1, 1)
    ends = torch.tensor([e for _, e in windows], device=device).view(-1, 1, 1, 1)
    inside = (j >= starts) & (j < ends)
    return torch.matmul(probs, torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=device)))


class Structure:
    """Which keys each query row may attend to: per-batch valid ranges, a diagonal band per
    batch and prefix keys. Shared by the inference, training and packed kernels.

    Key j is kept for row i of batch b iff q_ranges[b] holds i, kv_ranges[b] holds j and,
    when bands[b] = (pre, next, shift) is given,
    -pre <= (j - kv_start) - (i - q_start) - shift <= next, or j < kv_start + prefix[b].
    (prefix: the prefix keys every valid row of a banded batch also keeps.)
    """

    def __init__(
        self,
        q_ranges: Sequence[tuple[int, int]],
        kv_ranges: Sequence[tuple[int, int]],
        bands: Sequence[tuple[int, int, int] | None],
        device: torch.device,
        prefix: Sequence[int] | None = None,
    ) -> None:
        self.q_ranges, self.kv_ranges = list(q_ranges), list(kv_ranges)
        # Bounds at or past UNBOUNDED cut nothing (no sequence is that long): clamping
        # them keeps the int64 index arithmetic below from overflowing.
        self.bands = [None if band is None else (_bounded(band[0]), _bounded(band[1]), band[2]) for band in bands]
        self.has_band = any(band is not None for band in self.bands)
        self.prefix = list(prefix) if prefix is not None else None
        self.device = device
        self._columns: dict[str, torch.Tensor] | None = None

    def _column(self, name: str) -> torch.Tensor:
        """Per-batch values as (B, 1, 1, 1) int64 tensors, built on first use."""
        if self._columns is None:
            open_band = (UNBOUNDED, UNBOUNDED, 0)
            bands = [band or open_band for band in self.bands]
            values = {
                "q_start": [s for s, _ in self.q_ranges], "q_end": [e for _, e in self.q_ranges],
                "kv_start": [s for s, _ in self.kv_ranges], "kv_end": [e for _, e in self.kv_ranges],
                "pre": [b[0] for b in bands], "next": [b[1] for b in bands], "shift": [b[2] for b in bands],
            }
            if self.prefix is not None:
                values["prefix"] = self.prefix
            self._columns = {key: torch.tensor(v, dtype=torch.int64, device=self.device).view(-1, 1, 1, 1)
                             for key, v in values.items()}
        return self._columns[name]

    def mask(self, r0: int, r1: int, lo: int, hi: int) -> torch.Tensor:
        """(B, 1, rows, keys) bool, True = masked out."""
        # Each row keeps one key interval [first, last] (plus the prefix keys): compare
        # the key index against per-row bounds rather than building (rows, keys) index grids.
        col = self._column
        i = torch.arange(r0, r1, device=self.device).view(1, 1, -1, 1)
        j = torch.arange(lo, hi, device=self.device).view(1, 1, 1, -1)
        first, last = col("kv_start"), col("kv_end") - 1
        if self.has_band:
            diagonal = i - col("q_start") + col("kv_start") + col("shift")
            first = torch.maximum(diagonal - col("pre"), first)
            last = torch.minimum(diagonal + col("next"), last)
        invalid_row = (i < col("q_start")) | (i >= col("q_end"))
        last = torch.where(invalid_row, -1, last)  # rows outside the batch's range keep nothing
        masked = (j > last) | (j < first)
        if self.has_band and self.prefix is not None:
            masked &= (j >= col("kv_start") + col("prefix")) | invalid_row
        return masked

    def window(self, r0: int, r1: int) -> tuple[int, int]:
        """The union over batches of the keys any valid row in [r0, r1) may attend to."""
        lo, hi = None, None
        for b, ((qs, qe), (ks, ke)) in enumerate(zip(self.q_ranges, self.kv_ranges)):
            first, last = max(r0, qs), min(r1, qe) - 1
            if last < first or ke <= ks:
                continue
            b_lo, b_hi = ks, ke
            band = self.bands[b]
            if band is not None:
                pre, nxt, shift = band
                b_lo = max(b_lo, ks + (first - qs) + shift - pre)
                b_hi = min(b_hi, ks + (last - qs) + shift + nxt + 1)
                if self.prefix is not None and self.prefix[b] > 0:
                    b_lo, b_hi = ks, max(b_hi, min(ks + self.prefix[b], ke))
            if b_hi <= b_lo:
                continue
            lo = b_lo if lo is None else min(lo, b_lo)
            hi = b_hi if hi is None else max(hi, b_hi)
        return (0, 0) if lo is None else (lo, hi)

    def read_windows(self, r0: int, r1: int, lo: int, hi: int) -> list[tuple[int, int]] | None:
        """Per batch, the keys of [lo, hi) that rows [r0, r1) may read: its valid
        range clipped to [lo, hi), or an empty window when it has no valid row
        there (its rows output 0). None when every batch with a valid row may
        read all of [lo, hi): nothing needs excluding (the common case)."""
        windows, partial = [], False
        for (qs, qe), (ks, ke) in zip(self.q_ranges, self.kv_ranges):
            if not (qs < r1 and r0 < qe):
                windows.append((lo, lo))
                continue
            s, e = max(ks, lo), min(ke, hi)
            partial = partial or (s, e) != (lo, hi)
            windows.append((s, max(s, e)))
        return windows if partial else None


def _bounded(x: int) -> int:
    return max(-UNBOUNDED, min(UNBOUNDED, x))


def holds_compressed_pattern(mask: torch.Tensor, rows: int = COMPRESSED_MASK_SIZE) -> bool:
    """Whether a compressed mask (bool or integer, nonzero = masked, any leading dims of 1)
    holds the pattern the sparse modes read instead of its data: triu(ones(2048, 2048), 1);
    with rows=3072 (the training op's sparse_mode 6) stacked over a (1024, 2048) block whose
    left half is 0 and right half 1. Checked once per tensor version (_library.once_per_version):
    a model hands the same constant mask to every layer and every call."""
    predicate = _PATTERNS.get(rows)
    if predicate is None:
        predicate = _PATTERNS[rows] = _pattern_predicate(rows)
    return once_per_version(mask, predicate, None, lambda: predicate(mask))


def _pattern_predicate(rows: int) -> Callable[[torch.Tensor], bool]:
    size = COMPRESSED_MASK_SIZE
    expected: dict[torch.device, torch.Tensor] = {}  # the pattern, built once per device (4-6 MiB)

    def pattern(device: torch.device) -> torch.Tensor:
        if device not in expected:
            i = torch.arange(rows, device=device).view(-1, 1)
            cols = torch.arange(size, device=device).view(1, -1)
            expected[device] = torch.where(i < size, cols > i, cols >= size // 2)
        return expected[device]

    def holds(mask: torch.Tensor) -> bool:
        # One comparison with the cached pattern: a graph that builds its mask per call (an
        # Inductor graph builds one per layer) pays a memcmp per layer, not a rebuild.
        mask = mask.reshape(rows, size)
        return torch.equal(mask if mask.dtype == torch.bool else mask != 0, pattern(mask.device))

    return holds


# One predicate per row count, the memo's tag for the tensors it checked.
_PATTERNS: dict[int, Callable[[torch.Tensor], bool]] = {}


def paged_block_ids(
    op: str,
    block_table: torch.Tensor,
    kv_lens: Sequence[int],
    block_size: int,
    num_blocks: int,
    lens_name: str,
) -> torch.Tensor:
    """(B, nb) int64 block ids of a paged cache, nb = max_b ceil(kv_lens[b] / block_size) (at least 1).

    The first ceil(kv_lens[b] / block_size) entries of row b are the blocks the
    NPU reads: each must be a cache block in [0, num_blocks), else
    NpuAttnArgumentError naming the first bad entry. (A value rule: only the
    reference kernel can check it, the fake kernels never see the table's
    contents.) Entries past a batch's need may hold anything (vLLM pads with -1
    or 0): they become block 0, and the positions they cover lie outside the
    batch's valid range, which the kernels neither attend to nor let leak."""
    needed = [math.ceil(int(n) / block_size) for n in kv_lens]
    width = max(1, max(needed, default=1))
    table = block_table[:, :width].long()
    in_use = torch.arange(width, device=table.device).view(1, -1) < torch.tensor(
        needed, device=table.device).view(-1, 1)
    bad = in_use & ((table < 0) | (table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        fail(op, "block_table",
             f"entries a batch uses (the first ceil({lens_name}[b] / block_size) of row b) must be block ids in "
             f"[0, num_blocks) = [0, {num_blocks})", f"block_table[{b}][{j}] = {int(table[b, j])}")
    return torch.where(in_use, table, torch.zeros((), dtype=table.dtype, device=table.device))
