"""npu_fusion_attention: the training flash-attention forward (FlashAttentionScore).

Schema (torch_npu 2.13.0, namespace npu_attn)::

    npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout,
        Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1.,
        float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647,
        int inner_precise=0, int[]? prefix=None, int[]? actual_seq_qlen=None,
        int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True,
        bool sync=False, str softmax_layout="", Tensor? sink=None, Tensor? dropout_mask=None,
        int seed=0, int offset=0) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)

Computation, per batch b and query head n (GQA: head n reads key/value head n // (Nq/Nkv))::

    S   = scale * (Q K^T + pse)                  # pse is added BEFORE scaling (pse_type 1)
    S   = masked(S)                              # masked positions -> -inf
    m   = max(rowmax(S), sink[n])                # sink: one extra logit per head, no value
    l   = sum_j exp(S_j - m) + exp(sink[n] - m)
    P   = exp(S - m) / l
    out = (P * dropmask / keep_prob) V           # dropmask kept with probability keep_prob

Outputs (7): attention_out (query's layout and dtype, value's head dim); softmax_max and
softmax_sum (float32, m and l above repeated over a last axis of 8: (B, N, Sq, 8), or
(T, N, 8) for TND -- see softmax_layout); softmax_out (reserved: an empty tensor of the
query dtype); seed, offset (those used for the dropout mask) and numels (the dropout mask
length: B*N*Sq*Skv, or N * sum_b(Sq_b * Skv_b) for TND).

Layouts: BSH, SBH (H = N*D), BSND, BNSD, and TND (varlen: actual_seq_qlen / actual_seq_kvlen
are CUMULATIVE lengths, e.g. real lengths 2,2,2 -> [2, 4, 6]; trailing zeros, e.g.
[2, 5, 9, 0, 0], mark batches that are not computed, whose rows output 0).

Masking (atten_mask True/1 = masked out). When atten_mask is None, sparse_mode,
pre_tockens, next_tockens and prefix have no effect: everything is computed (documented).
With a mask, key j is kept for query row i (local to its batch, Sq/Skv its lengths) iff:

- 0 defaultMask: not mask[i, j] and -pre_tockens <= j - i <= next_tockens;
- 1 allMask: not mask[i, j];
- 2 leftUpCausal: j <= i;                                     (mask = triu(ones(2048, 2048), 1))
- 3 rightDownCausal: j <= i + (Skv - Sq);                      (same compressed mask)
- 4 band, anchored bottom-right: -pre <= j - i - (Skv - Sq) <= next;  (same compressed mask)
- 5 prefix, full mask: not mask[i, j] and (j <= i + Skv - Sq or j < prefix[b]);
- 6 prefix, compressed 3072x2048 mask: j <= i + Skv - Sq or j < prefix[b];
- 7 varlen (TND) outer cut of mode 3: mode 3 for every batch but the LAST participating
  one, which is a band anchored bottom-right (pre_tockens >= its Skv, next_tockens <= 0);
- 8 varlen (TND) outer cut of mode 2: mode 2 for every batch but the FIRST participating
  one, which is a band anchored bottom-right (pre_tockens >= its Skv).

Compressed masks (modes 2, 3, 4, 6, 7, 8) are a pattern the reference checks, not data.
atten_mask is bool or uint8: modes 0/1 take (Sq, Skv), (1, 1, Sq, Skv), (B, 1, Sq, Skv)
or (B, N, Sq, Skv) (TND: (maxSq, maxSkv) only, read in each batch's local coordinates,
with no fully masked row); mode 5 takes (B, N|1, Sq, Skv); the compressed masks are
(2048, 2048), or (3072, 2048) for mode 6 (leading dims of 1 allowed). prefix (modes 5/6
with a mask): one entry per batch, B <= 32, in [0, Skv] if Sq > Skv else [Skv - Sq, Skv].
A row with nothing to attend to (and no sink) outputs 0, with softmax_max -inf and
softmax_sum 0 (the NPU's invalid-row handling, inner_precise 2).

pse: (B, N, Sq, Skv), (1, N, Sq, Skv) or (B, N, 1, Skv), the query's dtype. For TND the
reference takes the same shapes over the padded per-batch grid (maxSq, maxSkv) (a choice;
the NPU documents only the alibi-compressed form there, which is not supported here, nor
is the dense alibi-compressed (.., 1024, Skv) form).

sink: (N,) float tensor, one logit per query head (as learnable sinks in the NPU's
inference ops: an extra softmax column with no value vector; it is not scaled).

Dropout (keep_prob < 1): the mask is a deterministic function of (seed, offset) and the
problem's shape, independent of chunking and device: query rows are cut into tiles of
DROPOUT_TILE_ROWS rows over the padded (B, N, Sq, Skv) grid, and each tile's keep mask
is ``torch.rand((B, N, tile, Skv), generator=g) < keep_prob`` with a CPU generator seeded
from (seed, offset, tile index), then moved to the device. The backward op
regenerates exactly the same mask from the same seed/offset. (The NPU draws Philox
numbers instead, so masks differ from hardware; vary seed/offset between steps.) An
external dropout_mask is not supported with keep_prob < 1 (the grad op cannot receive
it); with keep_prob == 1 it is ignored, as on the NPU.

padding_mask is reserved by torch_npu and ignored; gen_mask_parallel/sync only schedule
the NPU's mask generation; inner_precise (0, 1, 2) does not change the reference.

Autograd: backward calls npu_fusion_attention_grad (see fusion_attention_grad.py), which
recomputes the probabilities from softmax_max/softmax_sum; gradients flow to query, key,
value, pse and sink (not to softmax_max/softmax_sum, as on the NPU).

The reference works in (B, N, S, D) form (TND is packed per batch, zero padded) and
processes the query in row chunks, so extra memory is O(chunk x Skv) per head in the
forward and the backward. On the CPU, a backward without dropout, sink, pse and with
Dv == D runs torch's fused flash-attention backward kernel (whole problem when nothing
is masked, else per query chunk with the chunk's additive mask); everything else takes
the explicit chunked path. Both compute the same gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import _library
from ._inference import int_list
from ._layouts import pack_tnd, unpack_tnd
from ._library import (COMPRESSED_MASK_SIZE, INT_MAX, LIB, check, define, fail, holds_once, npu_rules_apply,
                       register_npu, register_reference)

__all__ = ["npu_fusion_attention"]

OP = "npu_fusion_attention"
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
SOFTMAX_LANES = 8
MAX_HEAD_DIM = 768
MAX_HEADS = 256
MAX_SEQ = 1_000_000
MAX_VARLEN_BATCH = 2048
MAX_PREFIX_BATCH = 32
PREFIX_COMPRESSED_ROWS = 3072
DROPOUT_TILE_ROWS = 16
# Band bounds at or past this are "unbounded" (and keep int64 arithmetic safe).
UNBOUNDED = 2**40
NPU_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Off the NPU the reference also takes float64, for exact checks.
REFERENCE_FLOAT_DTYPES = NPU_FLOAT_DTYPES + (torch.float64,)
MASK_DTYPES = (torch.bool, torch.uint8)

QUALNAME = define(
    OP,
    '(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, Tensor? pse=None, '
    'Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., float keep_prob=1., '
    'int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int[]? prefix=None, '
    'int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, '
    'bool gen_mask_parallel=True, bool sync=False, str softmax_layout="", Tensor? sink=None, '
    'Tensor? dropout_mask=None, int seed=0, int offset=0) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)',
)


# ----------------------------------------------------------------------------
# Argument model shared by the forward and the grad op
# ----------------------------------------------------------------------------


@dataclass
class FusionCall:
    """The arguments common to npu_fusion_attention and npu_fusion_attention_grad."""

    op: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    head_num: int
    input_layout: str
    pse: torch.Tensor | None = None
    atten_mask: torch.Tensor | None = None
    scale: float = 1.0
    keep_prob: float = 1.0
    pre_tockens: int = INT_MAX
    next_tockens: int = INT_MAX
    inner_precise: int = 0
    prefix: Sequence[int] | None = None
    actual_seq_qlen: Sequence[int] | None = None
    actual_seq_kvlen: Sequence[int] | None = None
    sparse_mode: int = 0
    softmax_layout: str = ""
    sink: torch.Tensor | None = None
    dropout_mask: torch.Tensor | None = None
    seed: int = 0
    offset: int = 0


@dataclass
class Geometry:
    """Shapes of a validated call (SymInts under tracing for dense layouts)."""

    layout: str
    batch: object
    heads: int
    kv_heads: object
    head_dim: object
    value_dim: object
    q_seq: object  # dense Sq, or the longest query segment for TND
    kv_seq: object
    q_lens: list[int] | None = None  # TND per-batch lengths (trailing batches may be 0)
    kv_lens: list[int] | None = None
    q_segs: list[tuple[int, int]] = field(default_factory=list)
    kv_segs: list[tuple[int, int]] = field(default_factory=list)
    out_shape: list = field(default_factory=list)
    softmax_shape: list = field(default_factory=list)
    numels: object = 0

    @property
    def tnd(self) -> bool:
        return self.layout == "TND"


def validate(call: FusionCall) -> Geometry:
    """Check every documented constraint; the same function serves fake and reference."""
    op = call.op
    layout = call.input_layout.upper() if isinstance(call.input_layout, str) else call.input_layout
    check(layout in LAYOUTS, op, "input_layout", f"must be one of {list(LAYOUTS)} (case-insensitive)",
          repr(call.input_layout))
    check(call.head_num > 0, op, "head_num", "must be positive", call.head_num)
    check(call.head_num <= MAX_HEADS, op, "head_num", f"must be <= {MAX_HEADS}", call.head_num)
    _check_dtypes(call)
    check(0 < call.keep_prob <= 1, op, "keep_prob", "must be in (0, 1]", call.keep_prob)
    check(call.inner_precise in (0, 1, 2), op, "inner_precise", "must be 0, 1 or 2", call.inner_precise)

    g = _shapes(call, layout)
    _check_sparse_mode(call, g)
    _check_lengths(call, g)
    _check_softmax_layout(call, g)
    _check_mask(call, g)
    _check_band(call, g)
    _check_prefix(call, g)
    _check_pse(call, g)
    _check_sink(call, g)
    check(call.dropout_mask is None or call.keep_prob == 1, op, "dropout_mask",
          "is not supported with keep_prob < 1 (the grad op cannot receive it); pass seed and offset",
          "a tensor")
    return g


def _check_dtypes(call: FusionCall) -> None:
    op, q = call.op, call.query
    floats = NPU_FLOAT_DTYPES if npu_rules_apply(q) else REFERENCE_FLOAT_DTYPES
    check(q.dtype in floats, op, "query.dtype", f"must be one of {list(floats)}", q.dtype)
    check(call.key.dtype == q.dtype, op, "key.dtype", f"must equal query.dtype ({q.dtype})", call.key.dtype)
    check(call.value.dtype == q.dtype, op, "value.dtype", f"must equal query.dtype ({q.dtype})", call.value.dtype)


def _rank(layout: str) -> int:
    return 4 if layout in ("BSND", "BNSD") else 3


def _shapes(call: FusionCall, layout: str) -> Geometry:
    op, q, k, v, heads = call.op, call.query, call.key, call.value, call.head_num
    rank = _rank(layout)
    for name, t in (("query", q), ("key", k), ("value", v)):
        check(t.dim() == rank, op, f"{name}.dim()", f"must be {rank} for input_layout {layout}", t.dim())

    if layout in ("BSH", "SBH"):
        s_axis, b_axis = (1, 0) if layout == "BSH" else (0, 1)
        batch, q_seq, hidden = q.shape[b_axis], q.shape[s_axis], q.shape[2]
        check(hidden % heads == 0, op, "query hidden size H (dim 2)", f"must be divisible by head_num={heads}",
              hidden)
        head_dim = hidden // heads
        check(head_dim > 0, op, "query hidden size H (dim 2)", "must be positive", hidden)
        check(k.shape[2] % head_dim == 0, op, "key hidden size H (dim 2)",
              f"must be a multiple of the query head dim {head_dim}", k.shape[2])
        kv_heads = k.shape[2] // head_dim
        check(kv_heads > 0, op, "key hidden size H (dim 2)", "must be positive", k.shape[2])
        check(v.shape[2] % kv_heads == 0, op, "value hidden size H (dim 2)",
              f"must be divisible by the key head count {kv_heads}", v.shape[2])
        value_dim = v.shape[2] // kv_heads
        kv_batch, kv_seq = k.shape[b_axis], k.shape[s_axis]
        v_batch, v_seq = v.shape[b_axis], v.shape[s_axis]
    else:
        if layout == "BSND":
            batch, q_seq, q_heads, head_dim = q.shape
            kv_batch, kv_seq, kv_heads, k_dim = k.shape
            v_batch, v_seq, v_heads, value_dim = v.shape
        elif layout == "BNSD":
            batch, q_heads, q_seq, head_dim = q.shape
            kv_batch, kv_heads, kv_seq, k_dim = k.shape
            v_batch, v_heads, v_seq, value_dim = v.shape
        else:  # TND
            batch = q_seq = kv_seq = None
            _, q_heads, head_dim = q.shape
            kv_batch, kv_heads, k_dim = k.shape  # kv_batch: token count
            v_batch, v_heads, value_dim = v.shape
            v_seq = None
        check(q_heads == heads, op, "head_num", f"must equal the query head count {q_heads}", heads)
        check(kv_heads > 0, op, "key head count N", "must be positive", kv_heads)
        check(k_dim == head_dim, op, "key head dim D", f"must equal the query head dim {head_dim}", k_dim)
        check(v_heads == kv_heads, op, "value head count N", f"must equal the key head count {kv_heads}", v_heads)

    check(heads % kv_heads == 0, op, "head_num", f"must be a multiple of the key/value head count {kv_heads}",
          heads)
    check(1 <= head_dim <= MAX_HEAD_DIM, op, "query head dim D", f"must be in [1, {MAX_HEAD_DIM}]", head_dim)
    check(value_dim <= head_dim, op, "value head dim D", f"must be <= the query/key head dim {head_dim}",
          value_dim)
    if layout == "TND":
        check(v_batch == kv_batch, op, "value token count T (dim 0)", f"must equal key's {kv_batch}", v_batch)
    else:
        check(kv_batch == batch, op, "key batch B", f"must equal the query batch {batch}", kv_batch)
        check((v_batch, v_seq) == (kv_batch, kv_seq), op, "value batch/sequence",
              f"must equal key's {(kv_batch, kv_seq)}", (v_batch, v_seq))
        check(q_seq <= MAX_SEQ, op, "query sequence length S", f"must be <= {MAX_SEQ}", q_seq)
        check(kv_seq <= MAX_SEQ, op, "key sequence length S", f"must be <= {MAX_SEQ}", kv_seq)

    g = Geometry(layout, batch, heads, kv_heads, head_dim, value_dim, q_seq, kv_seq)
    if layout != "TND":
        g.out_shape = _out_shape(q.shape, layout, heads, value_dim)
        g.softmax_shape = [batch, heads, q_seq, SOFTMAX_LANES]
        g.numels = batch * heads * q_seq * kv_seq
    return g


def _out_shape(q_shape: Sequence, layout: str, heads: int, value_dim: object) -> list:
    if layout in ("BSH", "SBH"):
        return [q_shape[0], q_shape[1], heads * value_dim]
    return [*q_shape[:-1], value_dim]


def _check_sparse_mode(call: FusionCall, g: Geometry) -> None:
    allowed = (0, 1, 2, 3, 4, 6, 7, 8) if g.tnd else (0, 1, 2, 3, 4, 5, 6)
    check(call.sparse_mode in allowed, call.op, "sparse_mode",
          f"must be one of {list(allowed)} for input_layout {g.layout}", call.sparse_mode)


def varlen_segments(op: str, name: str, cumulative: Sequence[int], total: object) -> list[tuple[int, int]]:
    """Cumulative lengths -> per-batch (start, end). Trailing zeros mark batches that are
    not computed; without them the last entry must be the token count."""
    check(len(cumulative) > 0, op, name, "must not be empty for input_layout TND", list(cumulative))
    check(len(cumulative) <= MAX_VARLEN_BATCH, op, name, f"must have at most {MAX_VARLEN_BATCH} entries",
          len(cumulative))
    segs, prev, cut = [], 0, False
    for x in cumulative:
        if cut or x < prev:
            check(x == 0, op, name, "must be cumulative (non-decreasing, >= 0); only trailing zeros may follow "
                  "a decrease", list(cumulative))
            cut = True
            segs.append((prev, prev))
            continue
        segs.append((prev, x))
        prev = x
    if cut:
        check(prev <= total, op, name, f"last non-zero entry must be <= the token count T={total}", prev)
    else:
        check(prev == total, op, name, f"last entry must equal the token count T={total}", prev)
    return segs


def _check_lengths(call: FusionCall, g: Geometry) -> None:
    op = call.op
    if not g.tnd:
        for name, value in (("actual_seq_qlen", call.actual_seq_qlen), ("actual_seq_kvlen", call.actual_seq_kvlen)):
            check(value is None, op, name, f"is only used with input_layout TND, not {g.layout}", list(value or []))
        return
    check(call.actual_seq_qlen is not None, op, "actual_seq_qlen",
          "is required (cumulative lengths) for input_layout TND", None)
    check(call.actual_seq_kvlen is not None, op, "actual_seq_kvlen",
          "is required (cumulative lengths) for input_layout TND", None)
    check(len(call.actual_seq_kvlen) == len(call.actual_seq_qlen), op, "actual_seq_kvlen",
          f"must have as many entries as actual_seq_qlen ({len(call.actual_seq_qlen)})", len(call.actual_seq_kvlen))
    q_total, kv_total = call.query.shape[0], call.key.shape[0]
    check(q_total <= MAX_SEQ, op, "query token count T", f"must be <= {MAX_SEQ}", q_total)
    g.q_segs = varlen_segments(op, "actual_seq_qlen", call.actual_seq_qlen, q_total)
    g.kv_segs = varlen_segments(op, "actual_seq_kvlen", call.actual_seq_kvlen, kv_total)
    g.q_lens = [e - s for s, e in g.q_segs]
    g.kv_lens = [e - s for s, e in g.kv_segs]
    g.batch = len(g.q_lens)
    g.q_seq, g.kv_seq = max(g.q_lens), max(g.kv_lens)
    g.out_shape = [q_total, g.heads, g.value_dim]
    g.softmax_shape = [q_total, g.heads, SOFTMAX_LANES]
    g.numels = g.heads * sum(a * b for a, b in zip(g.q_lens, g.kv_lens))


def _check_softmax_layout(call: FusionCall, g: Geometry) -> None:
    allowed = ("", "TND") if g.tnd else ("",)
    check(call.softmax_layout in allowed, call.op, "softmax_layout",
          f"must be one of {list(allowed)} for input_layout {g.layout}", repr(call.softmax_layout))


def _lead_ones(shape: Sequence) -> bool:
    return all(x == 1 for x in shape[:-2])


def _check_mask(call: FusionCall, g: Geometry) -> None:
    op, mask, mode = call.op, call.atten_mask, call.sparse_mode
    if mask is None:
        return
    check(mask.dtype in MASK_DTYPES, op, "atten_mask.dtype", f"must be one of {list(MASK_DTYPES)}", mask.dtype)
    shape = tuple(mask.shape)
    if mode in (2, 3, 4, 7, 8, 6):
        rows = PREFIX_COMPRESSED_ROWS if mode == 6 else COMPRESSED_MASK_SIZE
        check(2 <= mask.dim() <= 4 and _lead_ones(shape) and shape[-2:] == (rows, COMPRESSED_MASK_SIZE), op,
              "atten_mask", f"must be the compressed ({rows}, {COMPRESSED_MASK_SIZE}) mask for sparse_mode {mode}",
              shape)
        return
    sq, skv = g.q_seq, g.kv_seq
    if g.tnd:
        check(shape == (sq, skv), op, "atten_mask",
              f"must be (maxSq, maxSkv) = {(sq, skv)} for input_layout TND", shape)
        return
    if mode == 5:
        check(mask.dim() == 4 and shape[0] == g.batch and shape[1] in (1, g.heads) and shape[2:] == (sq, skv),
              op, "atten_mask", f"must be (B, N, Sq, Skv) or (B, 1, Sq, Skv) = ({g.batch}, 1|{g.heads}, {sq}, "
              f"{skv}) for sparse_mode 5", shape)
        return
    ok = (mask.dim() == 2 and shape == (sq, skv)) or (
        mask.dim() == 4 and shape[2:] == (sq, skv)
        and (shape[:2] == (1, 1) or shape[:2] == (g.batch, 1) or shape[:2] == (g.batch, g.heads)))
    check(ok, op, "atten_mask", f"must be (Sq, Skv), (1, 1, Sq, Skv), (B, 1, Sq, Skv) or (B, N, Sq, Skv) with "
          f"B={g.batch}, N={g.heads}, Sq={sq}, Skv={skv}", shape)


def _check_band(call: FusionCall, g: Geometry) -> None:
    op, mode, pre, nxt = call.op, call.sparse_mode, call.pre_tockens, call.next_tockens
    if call.atten_mask is None or mode not in (0, 4, 7, 8):
        return
    check(pre + nxt >= 0, op, "pre_tockens/next_tockens", "must leave a non-empty band (pre_tockens + "
          "next_tockens >= 0)", (pre, nxt))
    if mode in (0, 4) and not g.tnd:
        if nxt < 0:
            check(-nxt < g.kv_seq, op, "next_tockens", f"must satisfy |next_tockens| < Skv={g.kv_seq} when "
                  "negative", nxt)
        if pre < 0:
            check(-pre < g.q_seq, op, "pre_tockens", f"must satisfy |pre_tockens| < Sq={g.q_seq} when negative",
                  pre)
    if mode == 7:
        last = _last_participating(g)
        check(nxt <= 0, op, "next_tockens", "must be <= 0 for sparse_mode 7", nxt)
        last_kv = g.kv_lens[last] if last is not None else 0
        check(pre >= last_kv, op, "pre_tockens", f"must be >= the last batch's Skv={last_kv} for sparse_mode 7",
              pre)
    if mode == 8:
        first = _first_participating(g)
        first_kv = g.kv_lens[first] if first is not None else 0
        check(pre >= first_kv, op, "pre_tockens",
              f"must be >= the first batch's Skv={first_kv} for sparse_mode 8", pre)


def _first_participating(g: Geometry) -> int | None:
    return next((b for b, n in enumerate(g.q_lens) if n > 0), None)


def _last_participating(g: Geometry) -> int | None:
    return next((b for b in reversed(range(len(g.q_lens))) if g.q_lens[b] > 0), None)


def _check_prefix(call: FusionCall, g: Geometry) -> None:
    op = call.op
    if call.atten_mask is None or call.sparse_mode not in (5, 6):
        return
    check(call.prefix is not None, op, "prefix", f"is required for sparse_mode {call.sparse_mode}", None)
    check(len(call.prefix) == g.batch, op, "prefix", f"must have one entry per batch ({g.batch})", len(call.prefix))
    check(g.batch <= MAX_PREFIX_BATCH, op, "batch size B", f"must be <= {MAX_PREFIX_BATCH} with prefix", g.batch)
    for b, p in enumerate(call.prefix):
        sq = g.q_lens[b] if g.tnd else g.q_seq
        skv = g.kv_lens[b] if g.tnd else g.kv_seq
        low = 0 if sq > skv else skv - sq
        check(low <= p <= skv, op, "prefix", f"entry {b} must be in [{low}, {skv}] (Sq={sq}, Skv={skv})", p)


def _check_pse(call: FusionCall, g: Geometry) -> None:
    op, pse = call.op, call.pse
    if pse is None:
        return
    check(pse.dtype == call.query.dtype, op, "pse.dtype", f"must equal query.dtype ({call.query.dtype})", pse.dtype)
    check(call.sparse_mode not in (7, 8), op, "pse", f"is not supported with sparse_mode {call.sparse_mode}",
          "a tensor")
    if g.tnd:
        check(all(n > 0 for n in g.q_lens), op, "pse", "is not supported when a batch has query length 0",
              g.q_lens)
    shape, b, n, sq, skv = tuple(pse.shape), g.batch, g.heads, g.q_seq, g.kv_seq
    ok = pse.dim() == 4 and shape[1] == n and shape[3] == skv and (
        (shape[0] == b and shape[2] in (sq, 1)) or (shape[0] == 1 and shape[2] == sq))
    where = "the padded (maxSq, maxSkv) grid" if g.tnd else "(Sq, Skv)"
    check(ok, op, "pse", f"must be (B, N, Sq, Skv), (1, N, Sq, Skv) or (B, N, 1, Skv) over {where} with B={b}, "
          f"N={n}, Sq={sq}, Skv={skv} (alibi-compressed pse is not supported by the reference)", shape)


def _check_sink(call: FusionCall, g: Geometry) -> None:
    sink = call.sink
    if sink is None:
        return
    check(sink.dtype.is_floating_point, call.op, "sink.dtype", "must be floating point", sink.dtype)
    check(tuple(sink.shape) == (g.heads,), call.op, "sink", f"must have shape (N,) = ({g.heads},)",
          tuple(sink.shape))


def _holds_pattern(rows: int):
    """Predicate: the (rows, 2048) mask is triu(ones(2048, 2048), 1), stacked
    for 3072 rows over a (1024, 2048) block whose left half is 0 and right half 1."""
    size = COMPRESSED_MASK_SIZE

    def holds(mask: torch.Tensor) -> bool:
        mask = mask.reshape(rows, size)
        cols = torch.arange(size, device=mask.device).view(1, -1)
        # Compared a block of rows at a time: no full-size expected pattern is built.
        for r0 in range(0, rows, 256):
            i = torch.arange(r0, min(rows, r0 + 256), device=mask.device).view(-1, 1)
            expected = torch.where(i < size, cols > i, cols >= size // 2)
            if not torch.equal(mask[r0:r0 + 256] != 0, expected):
                return False
        return True

    return holds


_HOLDS_PATTERN = {size: _holds_pattern(size) for size in (COMPRESSED_MASK_SIZE, PREFIX_COMPRESSED_ROWS)}


def check_compressed_mask(call: FusionCall) -> None:
    """Modes 2/3/4/7/8 read triu(ones(2048, 2048), 1) as a pattern; mode 6 reads it
    stacked over a (1024, 2048) block whose left half is 0 and right half 1."""
    rows = PREFIX_COMPRESSED_ROWS if call.sparse_mode == 6 else COMPRESSED_MASK_SIZE
    if not holds_once(call.atten_mask, _HOLDS_PATTERN[rows]):
        fail(call.op, "atten_mask", f"must hold the compressed pattern for sparse_mode {call.sparse_mode}",
             "a different pattern")


# ----------------------------------------------------------------------------
# Canonical (B, N, S, D) problem and its chunked kernels
# ----------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 inputs are computed in fp32, as the NPU accumulates."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, heads, h // heads).transpose(1, 2)
    if layout == "SBH":
        s, b, h = x.shape
        return x.reshape(s, b, heads, h // heads).permute(1, 2, 0, 3)
    if layout == "BSND":
        return x.transpose(1, 2)
    return x


def from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, S, D) -> a contiguous tensor in `layout` (not TND)."""
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.transpose(1, 2).reshape(b, s, n * d)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    return x.contiguous()


def _splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


class DropoutMask:
    """The keep mask over the padded (B, N, Sq, Skv) grid, generated tile by tile."""

    def __init__(self, keep_prob: float, seed: int, offset: int, batch: int, heads: int, kv_len: int,
                 device: torch.device) -> None:
        self.keep_prob = keep_prob
        self.base = _splitmix64(_splitmix64(seed & ((1 << 64) - 1)) ^ (offset & ((1 << 64) - 1)))
        self.tile_shape = (batch, heads, DROPOUT_TILE_ROWS, kv_len)
        self.device = device

    def _tile(self, index: int) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(_splitmix64(self.base ^ index))
        return torch.rand(self.tile_shape, generator=generator) < self.keep_prob

    def chunk(self, r0: int, r1: int, lo: int, hi: int) -> torch.Tensor:
        """keep[b, n, r0:r1, lo:hi] (bool, on the problem's device)."""
        t0, t1 = r0 // DROPOUT_TILE_ROWS, (r1 - 1) // DROPOUT_TILE_ROWS + 1
        tiles = torch.cat([self._tile(t)[..., lo:hi] for t in range(t0, t1)], dim=2)
        start = r0 - t0 * DROPOUT_TILE_ROWS
        return tiles[:, :, start:start + r1 - r0].to(self.device)


class Structure:
    """Per-batch valid rows/keys and the band/prefix rule of the sparse mode.

    Key j is kept for row i of batch b iff i < q_len[b], j < kv_len[b] and
    (-pre[b] <= j - i - shift[b] <= next[b] or j < prefix[b])."""

    def __init__(self, q_lens, kv_lens, bands, prefix, device) -> None:
        self.q_lens, self.kv_lens, self.bands, self.prefix = q_lens, kv_lens, bands, prefix
        self.has_band = any(band is not None for band in bands)
        open_band = (UNBOUNDED, UNBOUNDED, 0)
        rows = [band or open_band for band in bands]

        def column(values):
            return torch.tensor(list(values), dtype=torch.int64, device=device).view(-1, 1, 1, 1)

        self.q_len, self.kv_len = column(q_lens), column(kv_lens)
        self.pre, self.next, self.shift = (column(x[i] for x in rows) for i in range(3))
        self.prefix_len = column(prefix) if prefix is not None else None
        self.device = device

    def mask(self, r0: int, r1: int, lo: int, hi: int) -> torch.Tensor:
        """(B, 1, rows, keys) bool, True = masked out."""
        # Each row keeps one key interval [first, last] (plus the prefix keys): compare
        # the key index against per-row bounds rather than building (rows, keys) index grids.
        i = torch.arange(r0, r1, device=self.device).view(1, 1, -1, 1)
        j = torch.arange(lo, hi, device=self.device).view(1, 1, 1, -1)
        last = self.kv_len - 1
        if self.has_band:
            first = torch.clamp_min(i + self.shift - self.pre, 0)
            last = torch.minimum(i + self.shift + self.next, last)
        else:
            first = torch.zeros_like(i)
        last = torch.where(i < self.q_len, last, -1)  # rows past the batch's length keep nothing
        masked = (j > last) | (j < first)
        if self.has_band and self.prefix_len is not None:
            masked &= (j >= self.prefix_len) | (i >= self.q_len)
        return masked

    def window(self, r0: int, r1: int) -> tuple[int, int]:
        """The keys any valid row of [r0, r1) may attend to, over all batches."""
        lo, hi = None, None
        for b, (q_len, kv_len) in enumerate(zip(self.q_lens, self.kv_lens)):
            first, last = r0, min(r1, q_len) - 1
            if last < first or kv_len == 0:
                continue
            b_lo, b_hi = 0, kv_len
            band = self.bands[b]
            if band is not None:
                pre, nxt, shift = band
                b_lo = max(0, first + shift - pre)
                b_hi = min(kv_len, last + shift + nxt + 1)
                if self.prefix is not None and self.prefix[b] > 0:
                    b_lo, b_hi = 0, max(b_hi, min(self.prefix[b], kv_len))
            if b_hi <= b_lo:
                continue
            lo = b_lo if lo is None else min(lo, b_lo)
            hi = b_hi if hi is None else max(hi, b_hi)
        return (0, 0) if lo is None else (lo, hi)


def _bounded(x: int) -> int:
    return max(-UNBOUNDED, min(UNBOUNDED, x))


def _bands(call: FusionCall, g: Geometry, q_lens: list[int], kv_lens: list[int]) -> list:
    """Per-batch (pre, next, shift) of the sparse mode, or None (no band)."""
    mode, batch = call.sparse_mode, len(q_lens)
    if call.atten_mask is None or mode == 1:
        return [None] * batch
    pre, nxt = _bounded(call.pre_tockens), _bounded(call.next_tockens)
    causal_left = (UNBOUNDED, 0, 0)
    bands = []
    for b in range(batch):
        right_down = kv_lens[b] - q_lens[b]
        causal_right = (UNBOUNDED, 0, right_down)
        band_right = (pre, nxt, right_down)
        if mode == 0:
            # A band wider than the whole problem cuts nothing.
            reach = max(q_lens) + max(kv_lens)
            bands.append(None if pre >= reach and nxt >= reach else (pre, nxt, 0))
        elif mode == 2:
            bands.append(causal_left)
        elif mode in (3, 5, 6):
            bands.append(causal_right)
        elif mode == 4:
            bands.append(band_right)
        elif mode == 7:
            bands.append(band_right if b == _last_participating(g) else causal_right)
        else:  # 8
            bands.append(band_right if b == _first_participating(g) else causal_left)
    return bands


@dataclass
class Problem:
    """One call in canonical form: q (B, N, Sq, D), k (B, Nkv, Skv, D), v (B, Nkv, Skv, Dv),
    contiguous and in the compute dtype."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    pse: torch.Tensor | None  # (B|1, N, Sq|1, Skv), added before scaling
    mask: torch.Tensor | None  # bool, broadcastable to (B, N, Sq, Skv), True = masked
    structure: Structure | None
    dropout: DropoutMask | None
    keep_prob: float
    sink: torch.Tensor | None  # (N,)
    q_lens: list[int]
    dtype: torch.dtype
    buffers: dict = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def masked(self) -> bool:
        return self.mask is not None or self.structure is not None

    def chunk_rows(self) -> int:
        b, n, _, _ = self.q.shape
        per_row = max(1, b * n * self.k.shape[2] * 4)
        return max(1, _library.SCORE_BLOCK_BYTES // per_row)

    def chunks(self):
        """(r0, r1, lo, hi) for each query chunk: its rows and the keys they may attend to."""
        last_row = max(self.q_lens, default=0)
        step = self.chunk_rows()
        for r0 in range(0, last_row, step):
            r1 = min(last_row, r0 + step)
            lo, hi = self.structure.window(r0, r1) if self.structure is not None else (0, self.k.shape[2])
            yield r0, r1, lo, hi

    def buffer(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """A reusable work block: score-sized blocks are allocated once per call, not per
        chunk (fresh multi-MiB allocations cost page faults on every chunk)."""
        numel = 1
        for x in shape:
            numel *= x
        flat = self.buffers.get(name)
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, dtype=self.dtype, device=self.q.device)
            self.buffers[name] = flat
        return flat[:numel].view(*shape)

    def sink_column(self) -> torch.Tensor:
        return self.sink.to(self.dtype).view(1, -1, 1, 1)

    def chunk_mask(self, r0: int, r1: int, lo: int, hi: int) -> torch.Tensor | None:
        """bool, broadcastable to (B, N, rows, keys), True = masked out; None if nothing is."""
        masked = None
        if self.mask is not None:
            masked = self.mask[..., r0:r1, lo:hi]
        if self.structure is not None:
            structural = self.structure.mask(r0, r1, lo, hi)
            masked = structural if masked is None else masked | structural
        return masked

    def folded(self, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of a (B, N, S, X) tensor as (B*Nkv, G*rows, X): GQA folds each KV
        head's `groups` query heads into the row axis, so K/V are never repeated."""
        b, _, _, width = x.shape
        return x[:, :, r0:r1].reshape(b * self.k.shape[1], self.groups * (r1 - r0), width)

    def kv3(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        b, kv_heads, _, width = x.shape
        return x[:, :, lo:hi].reshape(b * kv_heads, hi - lo, width)

    def scores(self, r0: int, r1: int, lo: int, hi: int, q_scaled: torch.Tensor) -> torch.Tensor:
        """Masked scaled scores scale * (Q K^T + pse), (B, N, rows, keys), in the "scores" buffer."""
        b, n = self.q.shape[:2]
        rows, keys = r1 - r0, hi - lo
        s3 = self.buffer("scores", (b * self.k.shape[1], self.groups * rows, keys))
        torch.bmm(q_scaled, self.kv3(self.k, lo, hi).transpose(1, 2), out=s3)
        s = s3.view(b, n, rows, keys)
        if self.pse is not None:
            rows_slice = slice(r0, r1) if self.pse.shape[2] != 1 else slice(0, 1)
            s.add_(self.pse[:, :, rows_slice, lo:hi].to(self.dtype), alpha=self.scale)
        masked = self.chunk_mask(r0, r1, lo, hi)
        if masked is not None:
            s.masked_fill_(masked, float("-inf"))
        return s


def build_problem(call: FusionCall, g: Geometry) -> Problem:
    """Validated call -> canonical problem (TND packed per batch, zero padded)."""
    layout, device = g.layout, call.query.device
    dtype = compute_dtype(call.query.dtype)
    if g.tnd:
        q = pack_tnd(call.query, g.q_segs)
        k = pack_tnd(call.key, g.kv_segs)
        v = pack_tnd(call.value, g.kv_segs)
        q_lens, kv_lens = list(g.q_lens), list(g.kv_lens)
    else:
        q = to_bnsd(call.query, layout, g.heads)
        k = to_bnsd(call.key, layout, g.kv_heads)
        v = to_bnsd(call.value, layout, g.kv_heads)
        q_lens, kv_lens = [g.q_seq] * g.batch, [g.kv_seq] * g.batch
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))

    mask = call.atten_mask
    if mask is not None and call.sparse_mode in (2, 3, 4, 6, 7, 8):
        check_compressed_mask(call)
        mask = None  # the pattern is applied structurally
    elif mask is not None:
        mask = mask if mask.dtype == torch.bool else mask != 0
        if g.tnd and bool(mask.all(dim=-1).any()):
            fail(call.op, "atten_mask", "must not mask a whole row for input_layout TND (varlen masks take no "
                 "padding)", "a fully masked row")
        if mask.dim() == 2:
            mask = mask[None, None]

    bands = _bands(call, g, q_lens, kv_lens)
    prefix = None
    if call.atten_mask is not None and call.sparse_mode in (5, 6):
        prefix = [int(p) for p in call.prefix]
    ragged = any(n != q.shape[2] for n in q_lens) or any(n != k.shape[2] for n in kv_lens)
    structure = None
    if ragged or any(band is not None for band in bands):
        structure = Structure(q_lens, kv_lens, bands, prefix, device)

    dropout = None
    if call.keep_prob < 1:
        dropout = DropoutMask(call.keep_prob, call.seed, call.offset, q.shape[0], g.heads, k.shape[2], device)
    return Problem(q=q, k=k, v=v, scale=call.scale, pse=call.pse, mask=mask, structure=structure,
                   dropout=dropout, keep_prob=call.keep_prob, sink=call.sink, q_lens=q_lens, dtype=dtype)


def forward(p: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, N, Sq, Dv), row max (B, N, Sq, 1) fp32, row sum (B, N, Sq, 1) fp32)."""
    b, n, q_len, _ = p.q.shape
    dv = p.v.shape[-1]
    device = p.q.device
    out = torch.zeros(b, n, q_len, dv, dtype=p.dtype, device=device)
    row_max = torch.full((b, n, q_len, 1), float("-inf"), dtype=torch.float32, device=device)
    row_sum = torch.zeros(b, n, q_len, 1, dtype=torch.float32, device=device)
    sink = p.sink_column() if p.sink is not None else None
    for r0, r1, lo, hi in p.chunks():
        rows, keys = r1 - r0, hi - lo
        if hi <= lo:
            if sink is not None:  # only the sink: P_sink = 1, output 0
                row_max[:, :, r0:r1] = sink.float()
                row_sum[:, :, r0:r1] = 1.0
            continue
        s = p.scores(r0, r1, lo, hi, p.folded(p.q, r0, r1) * p.scale)
        m = s.amax(dim=-1, keepdim=True)
        empty = torch.isneginf(m)  # nothing to attend to
        if sink is None:
            # torch's fused softmax is one in-cache pass per row; l follows from the
            # probability at the arg max, exp(0) / l.
            probs = torch.ops.aten._softmax.out(s, -1, False, out=p.buffer("probs", s.shape))
            l = 1.0 / probs.amax(dim=-1, keepdim=True)
        else:
            m = torch.maximum(m, sink)
            empty = torch.zeros_like(empty)
            probs = s.sub_(m).exp_()
            l = probs.sum(dim=-1, keepdim=True) + torch.exp(sink - m)
            probs.div_(l)
        if p.dropout is not None:
            probs.mul_(p.dropout.chunk(r0, r1, lo, hi))
        o = torch.bmm(probs.view(-1, p.groups * rows, keys), p.kv3(p.v, lo, hi)).view(b, n, rows, dv)
        if p.dropout is not None:
            o.mul_(1.0 / p.keep_prob)
        zero = torch.zeros((), dtype=o.dtype, device=device)
        out[:, :, r0:r1] = torch.where(empty, zero, o)
        row_max[:, :, r0:r1] = m.float()
        row_sum[:, :, r0:r1] = torch.where(empty, zero, l).float()
    return out, row_max, row_sum


def _flash_backward_applies(p: Problem, attention_in: torch.Tensor | None) -> bool:
    """torch's fused CPU flash-attention backward computes the same gradients when the
    row term comes from attention_in and there is no dropout, sink, pse or Dv != D."""
    return (p.q.device.type == "cpu" and attention_in is not None and p.dropout is None and p.sink is None
            and p.pse is None and p.v.shape[-1] == p.q.shape[-1])


def _flash_backward(p: Problem, dy: torch.Tensor, lse: torch.Tensor, attention_in: torch.Tensor):
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dy, out, lse = dy.to(p.dtype), attention_in.to(p.dtype), lse[..., 0].contiguous()
    if not p.masked:
        # No per-row data to bound: the fused kernel is already O(S) in memory.
        return flash_backward(dy, p.q, p.k, p.v, out, lse, 0.0, False, scale=p.scale)
    dq, dk, dv = torch.zeros_like(p.q), torch.zeros_like(p.k), torch.zeros_like(p.v)
    for r0, r1, lo, hi in p.chunks():
        if hi <= lo:
            continue
        masked = p.chunk_mask(r0, r1, lo, hi)
        additive = torch.where(masked, torch.full((), float("-inf"), dtype=p.dtype, device=p.q.device),
                               torch.zeros((), dtype=p.dtype, device=p.q.device))
        dq_c, dk_c, dv_c = flash_backward(
            dy[:, :, r0:r1], p.q[:, :, r0:r1], p.k[:, :, lo:hi], p.v[:, :, lo:hi], out[:, :, r0:r1],
            lse[:, :, r0:r1], 0.0, False, attn_mask=additive, scale=p.scale)
        dq[:, :, r0:r1] = dq_c
        dk[:, :, lo:hi] += dk_c
        dv[:, :, lo:hi] += dv_c
    return dq, dk, dv


def backward(p: Problem, dy: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor,
             attention_in: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dpse, dsink) in the compute dtype, from dy (B, N, Sq, Dv) and
    the forward's row max/sum (B, N, Sq, 1); attention_in (the forward output, same form
    as dy) gives the softmax-backward row term D = rowsum(dy * out) when present."""
    b, n, q_len, d = p.q.shape
    dt = p.dtype
    # P = exp(S - lse) with lse = max + log(sum); rows without any key get lse = +inf (P = 0).
    lse = torch.where(row_sum > 0, row_max.to(dt) + torch.log(row_sum.to(dt)),
                      torch.full_like(row_sum, float("inf"), dtype=dt))
    if _flash_backward_applies(p, attention_in):
        dq, dk, dv = _flash_backward(p, dy, lse, attention_in)
        return dq, dk, dv, None, None

    kv_heads, kv_len, dv_dim = p.k.shape[1], p.k.shape[2], p.v.shape[-1]
    device = p.q.device
    dq = torch.zeros(b, n, q_len, d, dtype=dt, device=device)
    dk = torch.zeros(b, kv_heads, kv_len, d, dtype=dt, device=device)
    dv = torch.zeros(b, kv_heads, kv_len, dv_dim, dtype=dt, device=device)
    dpse = torch.zeros(p.pse.shape, dtype=dt, device=device) if p.pse is not None else None
    dsink = torch.zeros(n, dtype=dt, device=device) if p.sink is not None else None
    sink = p.sink_column() if p.sink is not None else None
    dy = dy.to(dt).contiguous()
    attention_in = attention_in.to(dt) if attention_in is not None else None
    for r0, r1, lo, hi in p.chunks():
        if hi <= lo:
            continue  # such rows output 0, so every gradient term is 0
        rows, keys = r1 - r0, hi - lo
        q_scaled = p.folded(p.q, r0, r1) * p.scale
        chunk_lse = lse[:, :, r0:r1]
        probs = p.scores(r0, r1, lo, hi, q_scaled).sub_(chunk_lse).exp_()
        probs3 = probs.view(-1, p.groups * rows, keys)
        dy3 = p.folded(dy, r0, r1)
        keep = p.dropout.chunk(r0, r1, lo, hi) if p.dropout is not None else None
        dropped = probs * keep * (1.0 / p.keep_prob) if keep is not None else probs
        dv[:, :, lo:hi] += torch.bmm(dropped.view(-1, p.groups * rows, keys).transpose(1, 2), dy3).view(
            b, kv_heads, keys, dv_dim)
        del dropped
        dprobs3 = p.buffer("dprobs", probs3.shape)
        torch.bmm(dy3, p.kv3(p.v, lo, hi).transpose(1, 2), out=dprobs3)
        dprobs = dprobs3.view(probs.shape)
        if keep is not None:
            dprobs.mul_(keep).mul_(1.0 / p.keep_prob)
        if attention_in is not None:
            row_term = (dy[:, :, r0:r1] * attention_in[:, :, r0:r1]).sum(dim=-1, keepdim=True)
        else:
            row_term = (probs * dprobs).sum(dim=-1, keepdim=True)
        if sink is not None:
            sink_prob = torch.exp(sink - chunk_lse)
            dsink -= (sink_prob * row_term).sum(dim=(0, 2, 3))
        dscores = dprobs.sub_(row_term).mul_(probs)  # dL/dS, S the scaled scores
        if dpse is not None:
            part = dscores * p.scale
            if dpse.shape[2] == 1:
                part = part.sum(dim=2, keepdim=True)
            if dpse.shape[0] == 1 and b != 1:
                part = part.sum(dim=0, keepdim=True)
            rows_slice = slice(r0, r1) if dpse.shape[2] != 1 else slice(0, 1)
            dpse[:, :, rows_slice, lo:hi] += part
        ds3 = dprobs3
        dq[:, :, r0:r1] = torch.bmm(ds3, p.kv3(p.k, lo, hi)).mul_(p.scale).view(b, n, rows, d)
        # q_scaled already carries the scale: dK = scale * dS^T Q.
        dk[:, :, lo:hi] += torch.bmm(ds3.transpose(1, 2), q_scaled).view(b, kv_heads, keys, d)
    return dq, dk, dv, dpse, dsink


# ----------------------------------------------------------------------------
# Softmax statistics <-> the op's (B, N, Sq, 8) / TND layouts
# ----------------------------------------------------------------------------


def stats_to_layout(stat: torch.Tensor, g: Geometry, softmax_layout: str, empty: float) -> torch.Tensor:
    """(B, N, Sq, 1) -> the op's softmax_max/softmax_sum tensor.

    TND: shape (T, N, 8); with softmax_layout "" the memory holds the NTD order (as the
    NPU writes it into its (T, N, 8) buffer), with "TND" the TND order. Tokens outside
    every segment hold `empty`."""
    if not g.tnd:
        return stat.expand(*stat.shape[:-1], SOFTMAX_LANES).contiguous()
    total = g.out_shape[0]
    per_token = torch.full((total, g.heads), empty, dtype=stat.dtype, device=stat.device)
    for b, (s, e) in enumerate(g.q_segs):
        per_token[s:e] = stat[b, :, : e - s, 0].transpose(0, 1)
    if softmax_layout == "TND":
        return per_token.unsqueeze(-1).expand(total, g.heads, SOFTMAX_LANES).contiguous()
    ntd = per_token.transpose(0, 1).unsqueeze(-1).expand(g.heads, total, SOFTMAX_LANES).contiguous()
    return ntd.view(total, g.heads, SOFTMAX_LANES)


def stats_from_layout(stat: torch.Tensor, g: Geometry, softmax_layout: str) -> torch.Tensor:
    """Inverse of stats_to_layout: the op's tensor -> (B, N, Sq, 1) fp32 (padding 0)."""
    stat = stat.float()
    if not g.tnd:
        return stat[..., :1]
    total = g.out_shape[0]
    if softmax_layout == "TND":
        per_token = stat[..., 0]
    else:
        per_token = stat.contiguous().view(g.heads, total, SOFTMAX_LANES)[..., 0].transpose(0, 1)
    return pack_tnd(per_token.unsqueeze(-1), g.q_segs)


def output_from_bnsd(x: torch.Tensor, g: Geometry, segs, total: int, dtype: torch.dtype) -> torch.Tensor:
    x = unpack_tnd(x, segs, total) if g.tnd else from_bnsd(x, g.layout)
    return x.to(dtype)


def output_to_bnsd(x: torch.Tensor, g: Geometry, heads: int) -> torch.Tensor:
    """A tensor shaped like attention_out -> (B, N, Sq, Dv)."""
    return pack_tnd(x, g.q_segs) if g.tnd else to_bnsd(x, g.layout, heads)


# ----------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------


def _call(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None, scale=1.0,
          keep_prob=1.0, pre_tockens=INT_MAX, next_tockens=INT_MAX, inner_precise=0, prefix=None,
          actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
          softmax_layout="", sink=None, dropout_mask=None, seed=0, offset=0) -> FusionCall:
    # padding_mask is reserved by torch_npu; gen_mask_parallel/sync only schedule the NPU's mask generation.
    return FusionCall(
        op=OP, query=query, key=key, value=value, head_num=head_num, input_layout=input_layout, pse=pse,
        atten_mask=atten_mask, scale=scale, keep_prob=keep_prob, pre_tockens=pre_tockens,
        next_tockens=next_tockens, inner_precise=inner_precise, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
        actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode, softmax_layout=softmax_layout, sink=sink,
        dropout_mask=dropout_mask, seed=seed, offset=offset,
    )


@torch.library.register_fake(QUALNAME, lib=LIB)
def _fake(*args, **kwargs):
    call = _call(*args, **kwargs)
    g = validate(call)
    q = call.query
    out = q.new_empty(g.out_shape)
    softmax_max = q.new_empty(g.softmax_shape, dtype=torch.float32)
    softmax_sum = q.new_empty(g.softmax_shape, dtype=torch.float32)
    return out, softmax_max, softmax_sum, q.new_empty((0,)), call.seed, call.offset, g.numels


def _reference(*args, **kwargs):
    call = _call(*args, **kwargs)
    g = validate(call)
    problem = build_problem(call, g)
    out, row_max, row_sum = forward(problem)
    q = call.query
    attention_out = output_from_bnsd(out, g, g.q_segs, q.shape[0], q.dtype)
    softmax_max = stats_to_layout(row_max, g, call.softmax_layout, float("-inf"))
    softmax_sum = stats_to_layout(row_sum, g, call.softmax_layout, 0.0)
    return attention_out, softmax_max, softmax_sum, q.new_empty((0,)), call.seed, call.offset, int(g.numels)


def _npu(*args, **kwargs):
    import torch_npu

    return torch_npu.npu_fusion_attention(*args, **kwargs)


register_reference(QUALNAME, _reference)
register_npu(QUALNAME, _npu)

# Argument positions in the schema, for the autograd formula.
_ARG_NAMES = ("query", "key", "value", "head_num", "input_layout", "pse", "padding_mask", "atten_mask", "scale",
              "keep_prob", "pre_tockens", "next_tockens", "inner_precise", "prefix", "actual_seq_qlen",
              "actual_seq_kvlen", "sparse_mode", "gen_mask_parallel", "sync", "softmax_layout", "sink",
              "dropout_mask", "seed", "offset")


def _setup_context(ctx, inputs, output) -> None:
    args = dict(zip(_ARG_NAMES, inputs))
    out, softmax_max, softmax_sum = output[0], output[1], output[2]
    ctx.save_for_backward(args["query"], args["key"], args["value"], args["pse"], args["padding_mask"],
                          args["atten_mask"], args["sink"], out, softmax_max, softmax_sum)
    ctx.options = {name: args[name] for name in (
        "head_num", "input_layout", "scale", "keep_prob", "pre_tockens", "next_tockens", "inner_precise",
        "prefix", "actual_seq_qlen", "actual_seq_kvlen", "sparse_mode", "gen_mask_parallel", "sync",
        "softmax_layout", "seed", "offset")}
    ctx.numels = output[6]


def _backward(ctx, grad_out, _grad_max, _grad_sum, _grad_softmax_out, _seed, _offset, _numels):
    query, key, value, pse, padding_mask, atten_mask, sink, out, softmax_max, softmax_sum = ctx.saved_tensors
    o = ctx.options
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dpse, dsink = torch.ops.npu_attn.npu_fusion_attention_grad(
        query, key, value, grad_out, o["head_num"], o["input_layout"], pse=pse, padding_mask=padding_mask,
        atten_mask=atten_mask, softmax_max=softmax_max, softmax_sum=softmax_sum, attention_in=out,
        scale_value=o["scale"], keep_prob=o["keep_prob"], pre_tockens=o["pre_tockens"],
        next_tockens=o["next_tockens"], inner_precise=o["inner_precise"], seed=o["seed"], offset=o["offset"],
        numels=ctx.numels, prefix=o["prefix"], actual_seq_qlen=o["actual_seq_qlen"],
        actual_seq_kvlen=o["actual_seq_kvlen"], sparse_mode=o["sparse_mode"],
        gen_mask_parallel=o["gen_mask_parallel"], sync=o["sync"], softmax_layout=o["softmax_layout"], sink=sink)
    grads = dict.fromkeys(_ARG_NAMES)
    grads.update(query=dq, key=dk, value=dv, pse=dpse if pse is not None else None,
                 sink=dsink if sink is not None else None)
    return tuple(grads[name] for name in _ARG_NAMES)


torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context, lib=LIB)


def npu_fusion_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_num: int,
    input_layout: str,
    pse: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    scale: float = 1.0,
    keep_prob: float = 1.0,
    pre_tockens: int = 2147483647,
    next_tockens: int = 2147483647,
    inner_precise: int = 0,
    prefix: Sequence[int] | None = None,
    actual_seq_qlen: Sequence[int] | None = None,
    actual_seq_kvlen: Sequence[int] | None = None,
    sparse_mode: int = 0,
    gen_mask_parallel: bool = True,
    sync: bool = False,
    softmax_layout: str = "",
    sink: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """torch_npu.npu_fusion_attention, runnable on any device (see module docstring)."""
    return torch.ops.npu_attn.npu_fusion_attention(
        query, key, value, head_num, input_layout, pse=pse, padding_mask=padding_mask, atten_mask=atten_mask,
        scale=scale, keep_prob=keep_prob, pre_tockens=pre_tockens, next_tockens=next_tockens,
        inner_precise=inner_precise, prefix=int_list(prefix), actual_seq_qlen=int_list(actual_seq_qlen),
        actual_seq_kvlen=int_list(actual_seq_kvlen), sparse_mode=sparse_mode,
        gen_mask_parallel=gen_mask_parallel, sync=sync, softmax_layout=softmax_layout, sink=sink,
        dropout_mask=dropout_mask, seed=seed, offset=offset,
    )


# The autograd formula calls the grad op: register it with this module.
from . import fusion_attention_grad  # noqa: E402,F401
