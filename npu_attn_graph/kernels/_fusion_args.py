"""npu_fusion_attention's argument model and validation, shared by the forward and the grad op.

The rules are those of the module docstring of fusion_attention.py; the same checks serve the
fake (shapes only) and the reference kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ._attention_core import holds_compressed_pattern
from ._library import COMPRESSED_MASK_SIZE, INT_MAX, check, fail, npu_rules_apply

FORWARD_OP = "npu_fusion_attention"
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
SOFTMAX_LANES = 8
MAX_HEAD_DIM = 768
MAX_HEADS = 256
MAX_SEQ = 1_000_000
MAX_VARLEN_BATCH = 2048
MAX_PREFIX_BATCH = 32
PREFIX_COMPRESSED_ROWS = 3072
NPU_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Off the NPU the reference also takes float64, for exact checks.
REFERENCE_FLOAT_DTYPES = NPU_FLOAT_DTYPES + (torch.float64,)
MASK_DTYPES = (torch.bool, torch.uint8)


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


def forward_call(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None, scale=1.0,
                 keep_prob=1.0, pre_tockens=INT_MAX, next_tockens=INT_MAX, inner_precise=0, prefix=None,
                 actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                 softmax_layout="", sink=None, dropout_mask=None, seed=0, offset=0) -> FusionCall:
    """npu_fusion_attention's arguments (the schema's order and defaults) as a FusionCall."""
    # padding_mask is reserved by torch_npu; gen_mask_parallel/sync only schedule the NPU's mask generation.
    return FusionCall(
        op=FORWARD_OP, query=query, key=key, value=value, head_num=head_num, input_layout=input_layout, pse=pse,
        atten_mask=atten_mask, scale=scale, keep_prob=keep_prob, pre_tockens=pre_tockens,
        next_tockens=next_tockens, inner_precise=inner_precise, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
        actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode, softmax_layout=softmax_layout, sink=sink,
        dropout_mask=dropout_mask, seed=seed, offset=offset,
    )


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
        last = last_participating(g)
        check(nxt <= 0, op, "next_tockens", "must be <= 0 for sparse_mode 7", nxt)
        last_kv = g.kv_lens[last] if last is not None else 0
        check(pre >= last_kv, op, "pre_tockens", f"must be >= the last batch's Skv={last_kv} for sparse_mode 7",
              pre)
    if mode == 8:
        first = first_participating(g)
        first_kv = g.kv_lens[first] if first is not None else 0
        check(pre >= first_kv, op, "pre_tockens",
              f"must be >= the first batch's Skv={first_kv} for sparse_mode 8", pre)


def first_participating(g: Geometry) -> int | None:
    return next((b for b, n in enumerate(g.q_lens) if n > 0), None)


def last_participating(g: Geometry) -> int | None:
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


def check_compressed_mask(call: FusionCall) -> None:
    """Modes 2/3/4/7/8 read triu(ones(2048, 2048), 1) as a pattern; mode 6 reads it
    stacked over a (1024, 2048) block whose left half is 0 and right half 1."""
    rows = PREFIX_COMPRESSED_ROWS if call.sparse_mode == 6 else COMPRESSED_MASK_SIZE
    if not holds_compressed_pattern(call.atten_mask, rows):
        fail(call.op, "atten_mask", f"must hold the compressed pattern for sparse_mode {call.sparse_mode}",
             "a different pattern")
