"""ONNX export of programs that hold npu_attn ops: standard ONNX only, no custom domain.

``onnx_translation_table()`` maps every npu_attn op the rewrites insert to an
onnxscript function for ``torch.onnx.export(..., dynamo=True,
custom_translation_table=...)``; ``export_onnx`` runs that export and checks
the result with ``onnx.checker.check_model(full_check=True)``.

What each op becomes (opset 24):

- The inference attention ops (prompt, incremental, fused-infer, fused-infer
  v2, their paged and packed wrappers) -> the standard ``Attention`` op in
  BNSD (4-D) form: GQA through the K/V head count, ``scale``, the NPU mask
  converted (on the NPU True/1 means *masked out*, ONNX's bool mask means
  *attend*), sparse modes 2/3/4 and pre/next-token bands as a bool mask (or
  ``is_causal`` where S_q == S_kv makes both alignments one), per-batch
  lengths as key/query validity in the same mask. Layouts BSH, BSND,
  BNSD, BNSD_BSND by Transpose/Reshape; TND per segment (one Attention per
  batch segment, or one for all when the cumulative lengths are equal steps).
  Fully masked rows are zero in both (the ONNX spec since onnx 1.23, and the
  NPU op).
- Paged K/V (block_table): the blocks are gathered into dense K/V (Gather) and
  the positions past each batch's length zeroed, then ``Attention``.
- ``learnable_sink`` (FIA v2): ``Attention`` has no sink input, so the call is
  decomposed: MatMul, the sink logit as one more softmax column, Softmax,
  MatMul. This is the one attention path without an ``Attention`` node.
- KV-cache writers: ``scatter_update`` with one start offset per cache batch
  row -> ``TensorScatter``; other index forms -> ``ScatterND``;
  ``npu_scatter_nd_update`` -> ``ScatterND``; ``npu_scatter_pa_kv_cache``
  (Norm / PA_NZ) -> ``ScatterND`` into the slot view (negative slots skipped
  through a spare row, as the NPU skips them).
- Softcapped attention (Gemma2), which no NPU op carries and the rules leave
  unfused: folded after export into ``Attention(softcap=...)`` where the exported
  graph has exactly that form (``_softcap_attention``).
- Everything else (int8 quantisation, shared prefixes, left-padding sizes,
  softmax LSE outputs, the compressed-cache modes, training and MoE ops) fails
  with :class:`OnnxTranslationError` naming the op, the argument and why.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import torch

from .kernels._library import INT_MAX

__all__ = ["OnnxTranslationError", "export_onnx", "onnx_translation_table"]

npu_attn = torch.ops.npu_attn
OPSET = 24  # Attention (23) with the onnx 1.23 errata, TensorScatter (24)


class OnnxTranslationError(ValueError):
    """An npu_attn op (or one of its arguments) has no standard-ONNX translation."""

    def __init__(self, op: str, argument: str, why: str) -> None:
        super().__init__(f"npu_attn.{op}: {argument}: {why}")
        self.op, self.argument, self.why = op, argument, why


def _op():
    from onnxscript.onnx_opset import opset24

    return opset24


# ----------------------------------------------------------------------------
# Small graph helpers (run while torch.onnx traces the translation function)
# ----------------------------------------------------------------------------


def _bind(overload: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by name, schema defaults filled in (torch.onnx passes
    only what the FX node holds)."""
    bound: dict[str, Any] = {}
    schema_args = overload._schema.arguments
    for a, value in zip(schema_args, args):
        bound[a.name] = value
    for a in schema_args:
        if a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.name not in bound:
            bound[a.name] = a.default_value if a.has_default_value() else None
    return bound


def _static(d: Any) -> int | None:
    return d if isinstance(d, int) else None


def _i64(values: Sequence[int]):
    return _op().Constant(value_ints=[int(v) for v in values])


def _dim(x, axis: int):
    """x.shape[axis] as a 1-D int64 value (a constant when static)."""
    shape = x.shape
    if shape is not None:
        axis %= len(shape)
        if isinstance(shape[axis], int):
            return _i64([shape[axis]])
    elif axis < 0:
        raise ValueError("a negative axis needs a value of known rank")
    return _op().Shape(x, start=axis, end=axis + 1)


def _arange(n):
    """0, 1, ..., n - 1 (int64) for a 1-D one-element int64 n."""
    op = _op()
    return op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))


def _shape_dim(x, axis: int) -> Any:
    """x.shape[axis]: an int, a symbolic dim, or None when the value's shape is unknown."""
    shape = x.shape
    return None if shape is None or len(shape) <= axis else shape[axis]


def _same_dim(a: Any, b: Any) -> bool:
    """Two dims provably equal at export time (equal ints, or one symbol)."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and str(a) == str(b) and str(a) != "None"


def _lengths(values, name: str, op_name: str):
    """Per-batch lengths (an int list, a list of scalar values, or a 1-D tensor) -> 1-D int64."""
    op = _op()
    if values is None:
        return None
    if isinstance(values, (list, tuple)):
        if all(isinstance(v, int) for v in values):
            return _i64(values)
        parts = [_i64([v]) if isinstance(v, int) else op.Reshape(op.Cast(v, to=7), _i64([1])) for v in values]
        return op.Concat(*parts, axis=0)
    return op.Cast(values, to=7)  # INT64


def _per_batch(lengths, batch):
    """The ops read one entry for every batch (a single entry is broadcast) or the first B:
    (B or 1,) -> a (B or 1, 1, 1, 1) int64 value."""
    op = _op()
    n = lengths.shape[0] if lengths.shape is not None else None
    if not (isinstance(n, int) and n == 1):
        lengths = op.Slice(lengths, _i64([0]), batch, _i64([0]))
    return op.Reshape(lengths, _i64([-1, 1, 1, 1]))


# ----------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------

_LAYOUTS = {"BSH": ("BSH", "BSH"), "BSND": ("BSND", "BSND"), "BNSD": ("BNSD", "BNSD"),
            "BNSD_BSND": ("BNSD", "BSND"), "TND": ("TND", "TND")}


def _to_bnsd(x, layout: str, heads: int):
    op = _op()
    if layout == "BNSD":
        return x
    if layout == "BSH":
        x = op.Reshape(x, _i64([0, 0, heads, -1]))
    return op.Transpose(x, perm=[0, 2, 1, 3])


def _from_bnsd(x, layout: str):
    op = _op()
    if layout == "BNSD":
        return x
    x = op.Transpose(x, perm=[0, 2, 1, 3])
    if layout == "BSH":
        x = op.Reshape(x, _i64([0, 0, -1]))
    return x


# ----------------------------------------------------------------------------
# The attention core: BNSD query/key/value, the NPU call's mask semantics
# ----------------------------------------------------------------------------


class _Spec:
    """One inference attention call in the ops' common terms (kernels/_inference.InferenceCall)."""

    def __init__(self, op: str, query, key, value, *, num_heads: int, num_key_value_heads: int, scale: float,
                 layout: str, atten_mask=None, pse_shift=None, q_lens=None, kv_lens=None, sparse_mode: int = 0,
                 pre_tokens: int = INT_MAX, next_tokens: int = INT_MAX, incremental: bool = False,
                 block_table=None, block_size: int = 0, learnable_sink=None, query_rope=None, key_rope=None):
        self.op, self.query, self.key, self.value = op, query, key, value
        self.num_heads, self.kv_heads = num_heads, num_key_value_heads or num_heads
        self.scale, self.atten_mask, self.pse_shift = float(scale), atten_mask, pse_shift
        if layout not in _LAYOUTS:
            raise OnnxTranslationError(op, "input_layout", f"{layout!r} has no ONNX translation; "
                                       f"supported: {sorted(_LAYOUTS)}")
        self.layout_in, self.layout_out = _LAYOUTS[layout]
        self.q_lens, self.kv_lens = q_lens, kv_lens
        self.sparse_mode, self.pre_tokens, self.next_tokens = sparse_mode, pre_tokens, next_tokens
        self.incremental, self.block_table, self.block_size = incremental, block_table, block_size
        self.learnable_sink, self.query_rope, self.key_rope = learnable_sink, query_rope, key_rope


def _refuse_set(op: str, bound: dict, names: Sequence[str], why: str) -> None:
    for name in names:
        if bound.get(name) is not None:
            raise OnnxTranslationError(op, name, why)


def _band(spec: _Spec, q_seq: Any) -> tuple[int, int, bool] | None:
    """(pre, next, right_down) as the ops apply it (kernels/_inference_kernel._band); None: no band.
    The single-query path ignores sparse modes and pre/next tokens."""
    if spec.incremental or q_seq == 1:
        return None
    mode = spec.sparse_mode
    if mode == 0:
        return None if spec.atten_mask is None else (spec.pre_tokens, spec.next_tokens, False)
    if mode == 1:
        return None
    if mode == 2:
        return (INT_MAX, 0, False)
    if mode == 3:
        return (INT_MAX, 0, True)
    return (spec.pre_tokens, spec.next_tokens, True)


_COMPRESSED = 2048


def _mask_is_compressed(spec: _Spec, q_seq: Any) -> bool:
    """Modes 2-4 read atten_mask as the 2048x2048 causal pattern (the op checks
    its contents); with one query it is that pattern only if it has that shape."""
    if spec.sparse_mode not in (2, 3, 4) or spec.atten_mask is None:
        return False
    if q_seq != 1:
        return True
    shape = tuple(spec.atten_mask.shape)
    return shape[-2:] == (_COMPRESSED, _COMPRESSED) and all(d == 1 for d in shape[:-2])


def _keep_mask(spec: _Spec, q, k, q_seq: Any, kv_seq: Any):
    """(keep, is_causal): keep is a bool (B or 1, 1, S_q, S_kv) value (True = attend)
    or None; is_causal asks Attention for its causal mask instead."""
    op = _op()
    keep_parts = []
    batch = _dim(q, 0)
    sq, skv = _dim(q, 2), _dim(k, 2)

    mask = spec.atten_mask
    if mask is not None and not _mask_is_compressed(spec, q_seq):
        shape = mask.shape
        rank = len(shape)
        keep = op.Not(op.Cast(mask, to=9))  # BOOL; NPU: True/nonzero = masked out
        if rank == 2 and q_seq == 1 and shape[0] != 1:
            keep = op.Unsqueeze(keep, _i64([1, 2]))  # (B, S_kv)
        elif rank == 2:
            keep = op.Unsqueeze(keep, _i64([0, 1]))
        elif rank == 3:
            keep = op.Unsqueeze(keep, _i64([1]))
        elif rank != 4:
            raise OnnxTranslationError(spec.op, "atten_mask", f"rank {rank}: must be 2, 3 or 4")
        # The ops read the top-left (S_q, S_kv) corner of a larger mask.
        if not (_same_dim(shape[-2], q_seq) and _same_dim(shape[-1], kv_seq)):
            keep = op.Slice(keep, _i64([0, 0]), op.Concat(sq, skv, axis=0), _i64([2, 3]))
        keep_parts.append(keep)

    i = op.Unsqueeze(_arange(sq), _i64([1]))  # query positions (S_q, 1)
    j = op.Unsqueeze(_arange(skv), _i64([0]))  # key positions (1, S_kv)
    q_len = _per_batch(_lengths(spec.q_lens, "q_lens", spec.op), batch) if spec.q_lens is not None else None
    kv_len = _per_batch(_lengths(spec.kv_lens, "kv_lens", spec.op), batch) if spec.kv_lens is not None else None
    if q_len is not None:
        keep_parts.append(op.Less(i, q_len))  # rows past the length output zeros
    if kv_len is not None:
        keep_parts.append(op.Less(j, kv_len))

    is_causal = False
    band = _band(spec, q_seq)
    if band is not None:
        pre, nxt, right_down = band
        pre_inf, next_inf = pre >= INT_MAX, nxt >= INT_MAX
        plain_causal = pre_inf and nxt == 0 and q_len is None and kv_len is None
        if plain_causal and _same_dim(q_seq, kv_seq):
            is_causal = True  # S_q == S_kv: both alignments agree (and S_q == 1 keeps every key)
        elif plain_causal and not right_down and isinstance(q_seq, int):
            is_causal = True  # top-left causal, ONNX's alignment without nonpad_kv_seqlen
        elif not (pre_inf and next_inf):
            rel = op.Sub(j, i)  # (S_q, S_kv): key - query position
            if right_down:  # the diagonal anchored at each batch's bottom-right corner
                shift = op.Sub(kv_len if kv_len is not None else skv, q_len if q_len is not None else sq)
                rel = op.Sub(rel, shift)
            in_band = None
            if not pre_inf:
                in_band = op.GreaterOrEqual(rel, _i64([-pre]))
            if not next_inf:
                below = op.LessOrEqual(rel, _i64([nxt]))
                in_band = below if in_band is None else op.And(in_band, below)
            if not isinstance(q_seq, int):
                # A symbolic S_q may be 1 at run time, where the ops ignore sparse modes and bands.
                in_band = op.Or(in_band, op.Equal(sq, _i64([1])))
            keep_parts.append(in_band)
    keep = None
    for part in keep_parts:
        keep = part if keep is None else op.And(keep, part)
    return keep, is_causal


def _gather_paged(spec: _Spec, cache, kv_len, batch):
    """Paged cache (blocknum, blocksize, H) or (blocknum, Nkv, blocksize, D) read through
    block_table (B, max_blocks) -> dense (B, Nkv, max_blocks * blocksize, D), positions
    past each batch's length zeroed (unused blocks may hold anything, NaN included)."""
    op = _op()
    table = op.Cast(spec.block_table, to=7)
    picked = op.Gather(cache, table, axis=0)  # (B, n, bs, H) or (B, n, Nkv, bs, D)
    if len(cache.shape) == 3:
        dense = _to_bnsd(op.Reshape(picked, _i64([0, -1, cache.shape[2]])), "BSH", spec.kv_heads)
    elif len(cache.shape) == 4:
        picked = op.Transpose(picked, perm=[0, 2, 1, 3, 4])
        dense = op.Reshape(picked, _i64([0, 0, -1, cache.shape[3]]))
    else:
        raise OnnxTranslationError(spec.op, "key", f"paged cache rank {len(cache.shape)}: must be 3 or 4")
    j = op.Reshape(_arange(op.Shape(dense, start=2, end=3)), _i64([1, 1, -1, 1]))
    valid = op.Less(j, kv_len)  # (B, 1, S, 1)
    return op.Where(valid, dense, op.CastLike(op.Constant(value_float=0.0), dense))


def _attention_bnsd(spec: _Spec, q, k, v, q_seq: Any, kv_seq: Any):
    """BNSD q (B, N, S_q, D), k/v (B, Nkv, S_kv, D) -> (B, N, S_q, Dv) with the call's semantics;
    q_seq / kv_seq: the static (int) or symbolic sequence dims, None when unknown."""
    op = _op()
    keep, is_causal = _keep_mask(spec, q, k, q_seq, kv_seq)
    bias = None
    if spec.pse_shift is not None:
        bias = op.Slice(spec.pse_shift, _i64([0, 0]), op.Concat(_dim(q, 2), _dim(k, 2), axis=0), _i64([2, 3]))
        bias = op.CastLike(bias, q)
    if spec.learnable_sink is not None:
        return _decomposed_with_sink(spec, q, k, v, keep, is_causal, bias)
    if bias is None:
        y, _, _, _ = op.Attention(q, k, v, keep, scale=spec.scale, is_causal=1 if is_causal else 0)
        return y
    # A float mask is added to the scores: the masked positions become -inf there,
    # and rows with no key are zeroed as the NPU does.
    float_mask = bias if keep is None else op.Where(keep, bias, op.CastLike(op.Constant(value_float=-math.inf), q))
    y, _, _, _ = op.Attention(q, k, v, float_mask, scale=spec.scale, is_causal=1 if is_causal else 0)
    if keep is not None:
        any_key = op.ReduceMax(op.Cast(keep, to=1), _i64([-1]), keepdims=1)
        y = op.Where(op.Cast(any_key, to=9), y, op.CastLike(op.Constant(value_float=0.0), y))
    return y


def _decomposed_with_sink(spec: _Spec, q, k, v, keep, is_causal: bool, bias):
    """Attention with per-head sink logits in the softmax denominator, in plain ops
    (ONNX Attention has no sink input)."""
    op = _op()
    n, nkv = spec.num_heads, spec.kv_heads
    if n != nkv:  # GQA: each K/V head serves n // nkv consecutive query heads
        def repeat(x):
            x = op.Unsqueeze(x, _i64([2]))
            x = op.Expand(x, _i64([1, 1, n // nkv, 1, 1]))
            return op.Reshape(x, op.Concat(_i64([0, n, -1]), op.Shape(x, start=4), axis=0))
        k, v = repeat(k), repeat(v)
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=spec.scale), q))
    if bias is not None:
        scores = op.Add(scores, bias)
    if is_causal:
        i = op.Unsqueeze(_arange(_dim(q, 2)), _i64([1]))
        j = op.Unsqueeze(_arange(_dim(k, 2)), _i64([0]))
        causal = op.LessOrEqual(j, i)
        keep = causal if keep is None else op.And(keep, causal)
    if keep is not None:
        scores = op.Where(keep, scores, op.CastLike(op.Constant(value_float=-math.inf), scores))
    sink = op.CastLike(op.Reshape(spec.learnable_sink, _i64([1, -1, 1, 1])), scores)
    column = op.Expand(sink, op.Concat(op.Shape(scores, start=0, end=3), _i64([1]), axis=0))
    probs = op.Softmax(op.Concat(scores, column, axis=-1), axis=-1)
    probs = op.Slice(probs, _i64([0]), _i64([-1]), _i64([-1]))
    return op.MatMul(probs, op.CastLike(v, probs))


def _attention(spec: _Spec):
    """The whole call: layouts in and out, paged gathers, TND segments."""
    op = _op()
    q, k, v = spec.query, spec.key, spec.value
    if spec.layout_in == "TND":
        return _attention_tnd(spec)
    if spec.query_rope is not None:
        q = op.Concat(q, spec.query_rope, axis=-1)
    qb = _to_bnsd(q, spec.layout_in, spec.num_heads)
    seq_axis = 2 if spec.layout_in == "BNSD" else 1
    q_seq = _shape_dim(spec.query, seq_axis)
    kv_seq = None if spec.block_table is not None else _shape_dim(spec.key, seq_axis)
    if spec.block_table is not None:
        batch = _dim(qb, 0)
        kv_len = _per_batch(_lengths(spec.kv_lens, "kv_lens", spec.op), batch)
        kb = _gather_paged(spec, k, kv_len, batch)
        vb = _gather_paged(spec, v, kv_len, batch)
        if spec.key_rope is not None:
            kb = op.Concat(kb, _gather_paged(spec, spec.key_rope, kv_len, batch), axis=-1)
    else:
        if spec.key_rope is not None:
            k = op.Concat(k, spec.key_rope, axis=-1)
        kb = _to_bnsd(k, spec.layout_in, spec.kv_heads)
        vb = _to_bnsd(v, spec.layout_in, spec.kv_heads)
    out = _attention_bnsd(spec, qb, kb, vb, q_seq, kv_seq)
    return _from_bnsd(out, spec.layout_out)


def _attention_tnd(spec: _Spec):
    """TND (T, N, D) with cumulative per-batch lengths: equal steps -> one BSND call;
    otherwise one call per segment, concatenated along T."""
    op = _op()
    q_cum, kv_cum = spec.q_lens, spec.kv_lens
    for name, cum in (("actual_seq_qlen/actual_seq_lengths", q_cum), ("actual_seq_kvlen/actual_seq_lengths_kv", kv_cum)):
        if not isinstance(cum, (list, tuple)) or not cum:
            raise OnnxTranslationError(spec.op, name, "TND needs the cumulative lengths as a list")
    if spec.block_table is not None:
        raise OnnxTranslationError(spec.op, "block_table", "paged K/V with input_layout TND has no ONNX translation")
    if spec.atten_mask is not None and spec.sparse_mode not in (2, 3, 4):
        raise OnnxTranslationError(spec.op, "atten_mask", "TND reads only the compressed mask of sparse modes 2-4")
    if spec.pse_shift is not None:
        raise OnnxTranslationError(spec.op, "pse_shift", "not supported with TND (by the op either)")
    batch = len(q_cum)

    def call(q, k, v, q_rope=None, k_rope=None):
        s = _Spec(spec.op, q, k, v, num_heads=spec.num_heads, num_key_value_heads=spec.kv_heads, scale=spec.scale,
                  layout="BSND", atten_mask=spec.atten_mask, sparse_mode=spec.sparse_mode,
                  pre_tokens=spec.pre_tokens, next_tokens=spec.next_tokens, learnable_sink=spec.learnable_sink,
                  query_rope=q_rope, key_rope=k_rope)
        return _attention(s)

    ints = all(isinstance(x, int) for x in list(q_cum) + list(kv_cum))
    if ints and len(kv_cum) == batch and _equal_steps(q_cum) and _equal_steps(kv_cum):
        sq, skv = q_cum[0], kv_cum[0]

        def split(x, s, heads):  # (B * S, N, D) -> (B, S, N, D)
            return None if x is None else op.Reshape(x, _i64([batch, s, heads, -1]))

        n, nkv = spec.num_heads, spec.kv_heads
        out = call(split(spec.query, sq, n), split(spec.key, skv, nkv), split(spec.value, skv, nkv),
                   split(spec.query_rope, sq, n), split(spec.key_rope, skv, nkv))
        return op.Reshape(out, op.Concat(_i64([-1]), op.Shape(out, start=2), axis=0))
    q_ends = _lengths(q_cum, "q", spec.op)
    kv_ends = _lengths(kv_cum, "kv", spec.op)
    outs = []
    for b in range(batch):
        def seg(x, ends):
            if x is None:
                return None
            start = _i64([0]) if b == 0 else op.Slice(ends, _i64([b - 1]), _i64([b]))
            end = op.Slice(ends, _i64([b]), _i64([b + 1]))
            return op.Unsqueeze(op.Slice(x, start, end, _i64([0])), _i64([0]))
        o = call(seg(spec.query, q_ends), seg(spec.key, kv_ends), seg(spec.value, kv_ends),
                 seg(spec.query_rope, q_ends), seg(spec.key_rope, kv_ends))
        outs.append(op.Squeeze(o, _i64([0])))
    return outs[0] if batch == 1 else op.Concat(*outs, axis=0)


def _equal_steps(cum: Sequence[int]) -> bool:
    return cum[0] > 0 and all(b - a == cum[0] for a, b in zip([0, *cum[:-1]], cum))


def _lse_placeholder(op_name: str, flag: bool):
    if flag:
        raise OnnxTranslationError(op_name, "softmax_lse_flag/return_softmax_lse",
                                   "True: ONNX Attention has no log-sum-exp output")
    return _op().Constant(value_floats=[0.0])  # the ops' (1,) float32 placeholder


# ----------------------------------------------------------------------------
# The translation functions, one per op
# ----------------------------------------------------------------------------

_QUANT_WHY = "int8 quantisation (dequant/quant scales) has no ONNX Attention equivalent; not translated"
_ANTIQUANT_WHY = "int8 KV antiquantisation is not translated; export the model with floating KV caches"


def _prompt_flash_attention(*args, **kwargs):
    name = "npu_prompt_flash_attention"
    a = _bind(npu_attn.npu_prompt_flash_attention.default, args, kwargs)
    _refuse_set(name, a, ("deq_scale1", "quant_scale1", "deq_scale2", "quant_scale2", "quant_offset2"), _QUANT_WHY)
    _refuse_set(name, a, ("padding_mask",), "is reserved by torch_npu and has no translation")
    return _attention(_Spec(
        name, a["query"], a["key"], a["value"], num_heads=a["num_heads"],
        num_key_value_heads=a["num_key_value_heads"], scale=a["scale_value"], layout=a["input_layout"],
        atten_mask=a["atten_mask"], pse_shift=a["pse_shift"], q_lens=a["actual_seq_lengths"],
        kv_lens=a["actual_seq_lengths_kv"], sparse_mode=a["sparse_mode"], pre_tokens=a["pre_tokens"],
        next_tokens=a["next_tokens"]))


def _incre_flash_attention(*args, **kwargs):
    name = "npu_incre_flash_attention"
    a = _bind(npu_attn.npu_incre_flash_attention.default, args, kwargs)
    _refuse_set(name, a, ("dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2"),
                _QUANT_WHY)
    _refuse_set(name, a, ("antiquant_scale", "antiquant_offset"), _ANTIQUANT_WHY)
    _refuse_set(name, a, ("kv_padding_size",), "left-padded KV is not translated")
    _refuse_set(name, a, ("padding_mask",), "is reserved by torch_npu and has no translation")
    _refuse_set(name, a, ("block_table",),
                "paged K/V with host lengths is not translated; the paged-read rewrite's "
                "npu_incre_flash_attention_paged is")
    return _attention(_Spec(
        name, a["query"], a["key"], a["value"], num_heads=a["num_heads"],
        num_key_value_heads=a["num_key_value_heads"], scale=a["scale_value"], layout=a["input_layout"],
        atten_mask=a["atten_mask"], pse_shift=a["pse_shift"], kv_lens=a["actual_seq_lengths"],
        incremental=True))


_FIA_REFUSED = (
    (("dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2"), _QUANT_WHY),
    (("antiquant_scale", "antiquant_offset", "key_antiquant_scale", "key_antiquant_offset",
      "value_antiquant_scale", "value_antiquant_offset", "key_rope_antiquant_scale"), _ANTIQUANT_WHY),
    (("query_padding_size", "kv_padding_size"), "left padding sizes are not translated"),
    (("key_shared_prefix", "value_shared_prefix", "actual_shared_prefix_len"), "shared prefixes are not translated"),
    (("block_table",), "paged K/V with host lengths is not translated; the paged-read rewrite's "
                       "npu_fused_infer_attention_score_paged is"),
)


def _fused_infer_attention_score(*args, **kwargs):
    name = "npu_fused_infer_attention_score"
    a = _bind(npu_attn.npu_fused_infer_attention_score.default, args, kwargs)
    for names, why in _FIA_REFUSED:
        _refuse_set(name, a, names, why)
    out = _attention(_Spec(
        name, a["query"], a["key"], a["value"], num_heads=a["num_heads"],
        num_key_value_heads=a["num_key_value_heads"], scale=a["scale"], layout=a["input_layout"],
        atten_mask=a["atten_mask"], pse_shift=a["pse_shift"], q_lens=a["actual_seq_lengths"],
        kv_lens=a["actual_seq_lengths_kv"], sparse_mode=a["sparse_mode"], pre_tokens=a["pre_tokens"],
        next_tokens=a["next_tokens"], query_rope=a["query_rope"], key_rope=a["key_rope"]))
    return out, _lse_placeholder(name, a["softmax_lse_flag"])


def _fused_infer_attention_score_v2(*args, **kwargs):
    name = "npu_fused_infer_attention_score_v2"
    a = _bind(npu_attn.npu_fused_infer_attention_score_v2.default, args, kwargs)
    _refuse_set(name, a, ("dequant_scale_query", "quant_scale_out", "quant_offset_out", "quant_scale_p"), _QUANT_WHY)
    _refuse_set(name, a, ("dequant_scale_key", "dequant_offset_key", "dequant_scale_value", "dequant_offset_value",
                          "dequant_scale_key_rope"), _ANTIQUANT_WHY)
    _refuse_set(name, a, ("block_table",), "paged K/V with host lengths is not translated")
    _refuse_set(name, a, ("query_dtype", "key_dtype", "value_dtype", "query_rope_dtype", "key_rope_dtype",
                          "key_shared_prefix_dtype", "value_shared_prefix_dtype", "dequant_scale_query_dtype",
                          "dequant_scale_key_dtype", "dequant_scale_value_dtype", "dequant_scale_key_rope_dtype",
                          "out_dtype"), "dtype reinterpretation (fp8/hifloat8/fp4) has no ONNX translation")
    out = _attention(_Spec(
        name, a["query"], a["key"], a["value"], num_heads=a["num_query_heads"],
        num_key_value_heads=a["num_key_value_heads"], scale=a["softmax_scale"], layout=a["input_layout"],
        atten_mask=a["atten_mask"], pse_shift=a["pse_shift"], q_lens=a["actual_seq_qlen"],
        kv_lens=a["actual_seq_kvlen"], sparse_mode=a["sparse_mode"], pre_tokens=a["pre_tokens"],
        next_tokens=a["next_tokens"], learnable_sink=a["learnable_sink"], query_rope=a["query_rope"],
        key_rope=a["key_rope"]))
    return out, _lse_placeholder(name, a["return_softmax_lse"])


def _incre_flash_attention_paged(*args, **kwargs):
    name = "npu_incre_flash_attention_paged"
    a = _bind(npu_attn.npu_incre_flash_attention_paged.default, args, kwargs)
    return _attention(_Spec(
        name, a["query"], a["key"], a["value"], num_heads=a["num_heads"],
        num_key_value_heads=a["num_key_value_heads"], scale=a["scale_value"], layout=a["input_layout"],
        atten_mask=a["atten_mask"], pse_shift=a["pse_shift"], kv_lens=a["actual_seq_lengths"], incremental=True,
        block_table=a["block_table"], block_size=a["block_size"]))


def _fused_infer_attention_score_paged(*args, **kwargs):
    name = "npu_fused_infer_attention_score_paged"
    a = _bind(npu_attn.npu_fused_infer_attention_score_paged.default, args, kwargs)
    out = _attention(_Spec(
        name, a["query"], a["key"], a["value"], num_heads=a["num_heads"],
        num_key_value_heads=a["num_key_value_heads"], scale=a["scale"], layout=a["input_layout"],
        atten_mask=a["atten_mask"], pse_shift=a["pse_shift"], kv_lens=a["actual_seq_lengths_kv"],
        sparse_mode=a["sparse_mode"], pre_tokens=a["pre_tokens"], next_tokens=a["next_tokens"],
        block_table=a["block_table"], block_size=a["block_size"]))
    return out, _lse_placeholder(name, a["softmax_lse_flag"])


def _prompt_flash_attention_packed(*args, **kwargs):
    # By definition the masked call (sparse_mode 1): kernels/prompt_attention_packed.py.
    name = "npu_prompt_flash_attention_packed"
    a = _bind(npu_attn.npu_prompt_flash_attention_packed.default, args, kwargs)
    return _attention(_Spec(
        name, a["query"], a["key"], a["value"], num_heads=a["num_heads"],
        num_key_value_heads=a["num_key_value_heads"], scale=a["scale_value"], layout=a["input_layout"],
        atten_mask=a["atten_mask"], sparse_mode=1))


def _fused_infer_attention_score_packed(*args, **kwargs):
    name = "npu_fused_infer_attention_score_packed"
    a = _bind(npu_attn.npu_fused_infer_attention_score_packed.default, args, kwargs)
    out = _attention(_Spec(
        name, a["query"], a["key"], a["value"], num_heads=a["num_heads"],
        num_key_value_heads=a["num_key_value_heads"], scale=a["scale"], layout=a["input_layout"],
        atten_mask=a["atten_mask"], sparse_mode=1))
    return out, _lse_placeholder(name, False)


# ---------------------------------------------------------------------------- KV-cache writers


def _scatter_update(*args, **kwargs):
    """Rows of `updates` written at per-row start offsets along `axis`
    (kernels/scatter_update.py): TensorScatter when there is one 1-D offset per
    cache batch row; ScatterND over the written positions otherwise."""
    op = _op()
    a = _bind(npu_attn.scatter_update.default, args, kwargs)
    cache, indices, updates, axis = a["self"], a["indices"], a["updates"], a["axis"]
    rank = len(cache.shape)
    axis %= rank
    idx = op.Cast(indices, to=7)
    if len(indices.shape) == 1 and _same_dim(indices.shape[0], cache.shape[0]):
        return op.TensorScatter(cache, updates, idx, axis=axis)
    # General form: move `axis` next to the batch dim, scatter (row, position) pairs.
    perm = [0, axis] + [d for d in range(1, rank) if d != axis]
    inverse = [perm.index(d) for d in range(rank)]
    target = op.Transpose(cache, perm=perm)
    moved = op.Transpose(updates, perm=perm)  # (n, width, ...)
    n, width = _dim(updates, 0), _dim(updates, axis)
    if len(indices.shape) == 1:
        rows = _arange(n)
        starts = idx
    else:
        rows = op.Gather(idx, op.Constant(value_int=0), axis=1)
        starts = op.Gather(idx, op.Constant(value_int=1), axis=1)
    offsets = _arange(width)
    positions = op.Add(op.Unsqueeze(starts, _i64([1])), op.Unsqueeze(offsets, _i64([0])))  # (n, width)
    rows = op.Expand(op.Unsqueeze(rows, _i64([1])), op.Shape(positions))
    pairs = op.Concat(op.Unsqueeze(rows, _i64([2])), op.Unsqueeze(positions, _i64([2])), axis=2)
    written = op.ScatterND(target, pairs, moved)
    return op.Transpose(written, perm=inverse)


def _scatter_update_(*args, **kwargs):
    # torch.export functionalizes the in-place form into scatter_update; a program
    # that still holds it is translated as its functional result.
    return _scatter_update(*args, **kwargs)


def _scatter_nd_update(*args, **kwargs):
    # tf.scatter_nd_update: out[indices[p]] = updates[p], ONNX ScatterND's definition.
    op = _op()
    a = _bind(npu_attn.npu_scatter_nd_update.default, args, kwargs)
    return op.ScatterND(a["self"], op.Cast(a["indices"], to=7), a["updates"])


def _scatter_pa_kv_cache_functional(*args, **kwargs):
    """Norm: cache.view(-1, N, D)[slot] = key; PA_NZ: cache[b, :, o, :] = key.reshape(N*D//c0, c0)
    (kernels/scatter_pa_kv_cache.py). Negative slots are skipped: they go to a spare row."""
    op = _op()
    name = "npu_scatter_pa_kv_cache"
    a = _bind(npu_attn.npu_scatter_pa_kv_cache_functional.default, args, kwargs)
    _refuse_set(name, a, ("compress_lens", "compress_seq_offsets", "seq_lens"),
                "the compressed (Alibi/Rope) cache modes are not translated")
    mode = a["cache_mode"]
    slots = op.Cast(a["slot_mapping"], to=7)
    outs = []
    for x, cache in ((a["key"], a["key_cache"]), (a["value"], a["value_cache"])):
        shape = cache.shape
        if mode in (None, "Norm"):
            rows = op.Reshape(cache, op.Concat(_i64([-1]), op.Shape(cache, start=2), axis=0))  # (slots, N, D)
            new = x
            restore = None
        elif mode == "PA_NZ":
            # (nb, N*D//c0, bs, c0) -> (nb, bs, N*D//c0, c0) -> rows (slots, N*D//c0, c0)
            moved = op.Transpose(cache, perm=[0, 2, 1, 3])
            rows = op.Reshape(moved, op.Concat(_i64([-1]), op.Shape(cache, start=1, end=2),
                                               op.Shape(cache, start=3), axis=0))
            new = op.Reshape(x, op.Concat(_i64([-1]), op.Shape(cache, start=1, end=2), op.Shape(cache, start=3),
                                          axis=0))
            restore = moved
        else:
            raise OnnxTranslationError(name, "cache_mode", f"{mode!r}: only 'Norm' and 'PA_NZ' are translated")
        total = op.Shape(rows, start=0, end=1)
        spare = op.Expand(op.CastLike(op.Constant(value_float=0.0), rows),
                          op.Concat(_i64([1]), op.Shape(rows, start=1), axis=0))
        padded = op.Concat(rows, spare, axis=0)
        target = op.Where(op.Less(slots, _i64([0])), op.Expand(total, op.Shape(slots)), slots)
        written = op.ScatterND(padded, op.Unsqueeze(target, _i64([1])), new)
        written = op.Slice(written, _i64([0]), total, _i64([0]))
        if restore is None:
            outs.append(op.Reshape(written, op.Shape(cache)))
        else:
            outs.append(op.Transpose(op.Reshape(written, op.Shape(restore)), perm=[0, 2, 1, 3]))
        del shape
    return outs[0], outs[1]


# ---------------------------------------------------------------------------- ops with no translation

_UNTRANSLATED = {
    "npu_fusion_attention": "a training op (dropout, softmax statistics for the backward); export inference graphs",
    "npu_fusion_attention_grad": "a training backward op",
    "npu_fusion_attention_packed": "a training op (the packed training rewrite); export inference graphs",
    "npu_fusion_attention_packed_grad": "a training backward op",
    "npu_sparse_flash_attention": "DSA top-k selected-token attention is not translated",
    "npu_nsa_compress_attention_infer": "NSA compressed attention is not translated",
    "npu_nsa_compress_attention_infer_lengths": "NSA compressed attention is not translated",
    "npu_advance_step_flashattn": "vLLM's in-place step update (several mutated inputs) is not translated",
    "npu_grouped_matmul": "the MoE grouped matmul is not translated",
    "npu_moe_gating_top_k_softmax_v2": "the MoE router op is not translated",
    "npu_moe_compute_expert_tokens": "the MoE expert-count op is not translated",
    "npu_scatter_pa_kv_cache": "the in-place form; torch.export functionalizes it into "
                               "npu_scatter_pa_kv_cache_functional, which is translated",
    "scatter_update_into": "the Inductor executor's internal form of scatter_update_ (never in an exported "
                           "program); scatter_update_ and scatter_update are translated",
}


def _refusal(op_name: str, why: str) -> Callable:
    def refuse(*args, **kwargs):
        raise OnnxTranslationError(op_name, "(the op)", f"no ONNX translation: {why}")

    refuse.__name__ = f"refuse_{op_name}"
    return refuse


_TRANSLATIONS: dict[str, Callable] = {
    "npu_prompt_flash_attention": _prompt_flash_attention,
    "npu_incre_flash_attention": _incre_flash_attention,
    "npu_fused_infer_attention_score": _fused_infer_attention_score,
    "npu_fused_infer_attention_score_v2": _fused_infer_attention_score_v2,
    "npu_incre_flash_attention_paged": _incre_flash_attention_paged,
    "npu_fused_infer_attention_score_paged": _fused_infer_attention_score_paged,
    "npu_prompt_flash_attention_packed": _prompt_flash_attention_packed,
    "npu_fused_infer_attention_score_packed": _fused_infer_attention_score_packed,
    "scatter_update": _scatter_update,
    "scatter_update_": _scatter_update_,
    "npu_scatter_nd_update": _scatter_nd_update,
    "npu_scatter_nd_update_": _scatter_nd_update,
    "npu_scatter_pa_kv_cache_functional": _scatter_pa_kv_cache_functional,
}


def onnx_translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """torch.onnx's ``custom_translation_table`` for every npu_attn op: standard ONNX
    (opset 24) translations, and for ops without one a function that fails naming
    the op and why. Use with ``torch.onnx.export(..., dynamo=True, opset_version=24)``."""
    from . import kernels  # noqa: F401  (registers the ops)

    table: dict[torch._ops.OpOverload, Callable] = {}
    for name, fn in _TRANSLATIONS.items():
        table[getattr(npu_attn, name).default] = fn
    for name, why in _UNTRANSLATED.items():
        packet = getattr(npu_attn, name, None)
        if packet is not None:
            table[packet.default] = _refusal(name, why)
    return table


# ----------------------------------------------------------------------------
# export_onnx
# ----------------------------------------------------------------------------


def _find_cause(error: BaseException | None) -> OnnxTranslationError | None:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OnnxTranslationError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


# In-place writer -> (its functional twin, the positions of the caches it writes).
# torch.onnx decomposes an in-place custom op into auto_functionalized_v2, which it
# cannot translate; the functional twin is what ONNX expresses (a new cache value).
_IN_PLACE = {
    "scatter_update_": ("scatter_update", (0,)),
    "npu_scatter_nd_update_": ("npu_scatter_nd_update", (0,)),
    "npu_scatter_pa_kv_cache": ("npu_scatter_pa_kv_cache_functional", (2, 3)),
}


def _functional_writers(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` (changed in place) with its in-place npu_attn writers are their functional twins:
    each reader of a cache after the write reads the new value, and each mutation
    output names it."""
    import operator

    targets = {getattr(npu_attn, name).default: (getattr(npu_attn, f).default, pos)
               for name, (f, pos) in _IN_PLACE.items()}
    _unwrap_auto_functionalized(program, targets)
    if not any(n.target in targets for n in program.graph.nodes):
        return program
    graph = program.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    renamed: dict[str, str] = {}
    for writer in [n for n in graph.nodes if n.target in targets]:
        functional, positions = targets[writer.target]
        caches = [writer.args[i] for i in positions]
        with graph.inserting_after(writer):
            new = graph.call_function(functional, writer.args, dict(writer.kwargs))
        if len(positions) == 1:
            new.meta = dict(writer.meta)
            results = [new]
        else:
            new.meta["val"] = tuple(c.meta["val"].clone() for c in caches)
            results = []
            for i, cache in enumerate(caches):
                with graph.inserting_after(results[-1] if results else new):
                    item = graph.call_function(operator.getitem, (new, i))
                item.meta["val"] = new.meta["val"][i]
                results.append(item)
        for cache, result in zip(caches, results):
            for user in list(cache.users):
                if user is not writer and user is not new and order.get(user, -1) > order[writer]:
                    user.replace_input_with(cache, result)
                    if user.op == "output":
                        renamed[cache.name] = result.name
        if len(positions) == 1:
            writer.replace_all_uses_with(new)
            renamed[writer.name] = new.name
        graph.erase_node(writer)
    for spec in program.graph_signature.output_specs:
        arg = spec.arg
        if getattr(arg, "name", None) in renamed:
            spec.arg = type(arg)(name=renamed[arg.name])
    program.graph_module.recompile()
    return program


def _caches_as_outputs(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Input mutations (the caches a decode step writes) as the ONNX graph's first
    outputs: torch.onnx would otherwise drop them, and an ONNX graph has no in-place
    inputs. The ONNX outputs are then the new caches, in input order, then the model's."""
    from torch.export.graph_signature import OutputKind

    import torch.utils._pytree as pytree

    specs = program.graph_signature.output_specs
    buffers = [s.target for s in specs if s.kind == OutputKind.BUFFER_MUTATION]
    if buffers:
        raise ValueError(f"buffers {buffers} are written in place: an ONNX graph has no state, so they would be "
                         f"constants there; pass the caches as inputs (the new values become outputs)")
    if not any(s.kind == OutputKind.USER_INPUT_MUTATION for s in specs):
        return program
    for spec in specs:
        if spec.kind == OutputKind.USER_INPUT_MUTATION:
            spec.kind, spec.target = OutputKind.USER_OUTPUT, None
    users = sum(s.kind == OutputKind.USER_OUTPUT for s in specs)
    program.module_call_graph[0].signature.out_spec = pytree.tree_flatten(tuple(range(users)))[1]
    return program


def _unwrap_auto_functionalized(program: torch.export.ExportedProgram, targets: dict) -> None:
    """A program decomposed after export holds each in-place writer as
    ``auto_functionalized_v2(op, ..., _<arg>_base_index=i, _all_bases=[...])`` whose
    item 1 + i is the new value of base i (torch.onnx cannot translate it): call the
    functional twin on the bases instead, its result(s) standing for those items."""
    import operator

    graph = program.graph
    hop = torch.ops.higher_order.auto_functionalized_v2
    for node in [n for n in graph.nodes if n.target is hop and n.args and n.args[0] in targets]:
        op = node.args[0]
        functional, positions = targets[op]
        kw = dict(node.kwargs)
        bases = kw.pop("_all_bases")
        schema = op._schema.arguments
        new_bases: list[int] = []
        for p in positions:
            name = schema[p].name
            if any(k.startswith(f"_{name}_") and k != f"_{name}_base_index" for k in kw):
                raise OnnxTranslationError(op._schema.name.split("::")[-1], name,
                                           "the in-place writer writes a view of its base; not translated")
            index = kw.pop(f"_{name}_base_index")
            kw[name] = bases[index]
            new_bases.append(index)
        kw = {k: v for k, v in kw.items() if not k.startswith("_")}
        args = tuple(kw.pop(a.name) for a in schema if not a.kwarg_only and a.name in kw)
        with graph.inserting_before(node):
            new = graph.call_function(functional, args, kw)
        vals = [bases[i].meta["val"] for i in new_bases]
        if len(positions) == 1:
            new.meta["val"] = vals[0].clone()
            results = [new]
        else:
            new.meta["val"] = tuple(v.clone() for v in vals)
            results = []
            for i in range(len(positions)):
                with graph.inserting_before(node):
                    item = graph.call_function(operator.getitem, (new, i))
                item.meta["val"] = new.meta["val"][i]
                results.append(item)
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise OnnxTranslationError(op._schema.name.split("::")[-1], "(auto_functionalized_v2)",
                                           f"an unexpected reader {user} of the functionalized call")
            index = user.args[1]
            if index >= 1 and index - 1 in new_bases:
                user.replace_all_uses_with(results[new_bases.index(index - 1)])
            elif index == 0 and len(results) == 1 and user.users:
                user.replace_all_uses_with(results[0])  # the op's return, an alias of the written base
            graph.erase_node(user)
        graph.erase_node(node)
    program.graph_module.recompile()


def _scalar(value) -> float | None:
    """A constant one-element value's number, else None."""
    tensor = None if value is None else value.const_value
    if tensor is None:
        return None
    array = tensor.numpy()
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _only_use(value, op_type: str):
    """The single node reading ``value`` if it is an ``op_type`` node, else None."""
    uses = list(value.uses())
    if len(uses) != 1 or uses[0][0].op_type != op_type or uses[0][0].domain not in ("", "ai.onnx"):
        return None
    return uses[0][0]


def _made_by(value, op_type: str):
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _softcap_site(softmax) -> dict | None:
    """``MatMul(q, Transpose(k)) [* s] / c -> Tanh -> * c [+ mask] -> Softmax(-1) -> MatMul(., v)``,
    every intermediate read once, q/k/v 4-D float: the parts, else None."""
    axis = softmax.attributes.get("axis")
    if axis is None or axis.as_int() not in (-1, 3):
        return None
    x, mask = softmax.inputs[0], None
    add = _made_by(x, "Add")
    if add is not None:
        for i in (0, 1):
            if _made_by(add.inputs[i], "Mul") is not None and _made_by(_made_by(add.inputs[i], "Mul").inputs[0], "Tanh"):
                x, mask = add.inputs[i], add.inputs[1 - i]
                break
        else:
            return None
    capped = _made_by(x, "Mul")
    if capped is None or _made_by(capped.inputs[0], "Tanh") is None:
        return None
    cap = _scalar(capped.inputs[1])
    div = _made_by(_made_by(capped.inputs[0], "Tanh").inputs[0], "Div")
    if div is None or cap is None or cap <= 0 or _scalar(div.inputs[1]) != cap:
        return None
    scores, scale = div.inputs[0], 1.0
    mul = _made_by(scores, "Mul")
    if mul is not None:
        factor = [_scalar(i) for i in mul.inputs]
        if factor[1] is not None:
            scores, scale = mul.inputs[0], factor[1]
        elif factor[0] is not None:
            scores, scale = mul.inputs[1], factor[0]
        else:
            return None
    matmul = _made_by(scores, "MatMul")
    transpose = None if matmul is None else _made_by(matmul.inputs[1], "Transpose")
    if transpose is None:
        return None
    perm = transpose.attributes.get("perm")
    if perm is None or list(perm.as_ints()) != [0, 1, 3, 2]:
        return None
    out = _only_use(softmax.outputs[0], "MatMul")
    if out is None or out.inputs[0] is not softmax.outputs[0]:
        return None
    q, k, v = matmul.inputs[0], transpose.inputs[0], out.inputs[1]
    chain = [matmul, mul, div, _made_by(capped.inputs[0], "Tanh"), capped, add, softmax]
    for node in chain:
        if node is not None and node is not softmax and len(list(node.outputs[0].uses())) != 1:
            return None
    floats = {q.dtype, k.dtype, v.dtype}
    if len(floats) != 1 or any(x.shape is None or len(x.shape) != 4 for x in (q, k, v)):
        return None
    if mask is not None and mask.dtype != q.dtype:  # Attention adds a float mask of the query's type
        return None
    return dict(q=q, k=k, v=v, mask=mask, scale=scale, cap=cap, out=out)


def _softcap_attention(model) -> int:
    """Attention with a logit softcap (Gemma2's attn_logit_softcapping) as one ONNX
    ``Attention(softcap=c)``: no NPU op applies a softcap, so the rules leave those
    sites unfused and they reach ONNX decomposed. The Attention op applies scale,
    then the softcap, then the mask, as the model does. Returns the count."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph, count = model.graph, 0
    for softmax in [n for n in graph if n.op_type == "Softmax"]:
        site = _softcap_site(softmax)
        if site is None:
            continue
        inputs = [site["q"], site["k"], site["v"]] + ([site["mask"]] if site["mask"] is not None else [])
        attention = ir.node("Attention", inputs, {"scale": site["scale"], "softcap": site["cap"], "is_causal": 0},
                            num_outputs=1, version=OPSET)
        old = site["out"].outputs[0]
        attention.outputs[0].shape, attention.outputs[0].type = old.shape, old.type
        graph.insert_before(site["out"], attention)
        for i, output in enumerate(graph.outputs):
            if output is old:  # the graph's output keeps its name
                name, old.name = old.name, f"{old.name}_decomposed"
                attention.outputs[0].name = name
                graph.outputs[i] = attention.outputs[0]
        ir.convenience.replace_all_uses_with(old, attention.outputs[0])
        count += 1
    if count:
        RemoveUnusedNodesPass()(model)
    return count


def export_onnx(model: torch.nn.Module | torch.export.ExportedProgram, args: tuple = (), kwargs: dict | None = None,
                *, f: str | os.PathLike | None = None, opset_version: int = OPSET,
                dynamic_shapes: Any = None) -> "torch.onnx.ONNXProgram":
    """Export ``model`` to ONNX with the npu_attn ops as standard ONNX.

    ``model`` is a module (first rewritten by ``npu_attn_graph.export``, the
    backend's rules on its exported program) or an ExportedProgram from
    ``npu_attn_graph.export``. The result passes ``onnx.checker.check_model(
    full_check=True)``; with ``f`` it is also saved there. Raises
    :class:`OnnxTranslationError` for an op or argument without a translation.
    """
    import onnx

    if opset_version < OPSET:
        raise ValueError(f"opset_version: must be >= {OPSET} (Attention with the onnx 1.23 semantics and "
                         f"TensorScatter), got {opset_version}")
    if not isinstance(model, torch.export.ExportedProgram):
        from .export import export

        program = export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    else:
        import copy

        program = copy.deepcopy(model)  # the caller's program is left as it was
    program = _caches_as_outputs(_functional_writers(program))
    try:
        # torch's annotation, dict[Callable, ...], is invariant in its key: our OpOverload-keyed table is refused
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset_version,
                                         custom_translation_table=onnx_translation_table(),  # type: ignore[arg-type]
                                         verbose=False)
    except Exception as e:  # torch.onnx wraps the translation's error; surface ours
        cause = _find_cause(e)
        if cause is not None:
            raise OnnxTranslationError(cause.op, cause.argument, cause.why) from e
        raise
    assert onnx_program is not None  # None only from the TorchScript exporter (dynamo=False)
    _softcap_attention(onnx_program.model)
    onnx.checker.check_model(onnx_program.model_proto, full_check=True)
    if f is not None:
        onnx_program.save(os.fspath(f))
    return onnx_program
