"""Is a mask a band? Read from its construction, for every size the graph takes.

transformers builds causal and sliding-window masks from position aranges:
``kv_idx <= q_idx`` and ``kv_idx > q_idx - window``, combined with ``&``. When
such a mask is computed in the graph from aranges and constants only (no
tensor input: no cache_position passed in, no padding mask), it keeps key j for
query i exactly when lo <= j - i <= hi, for fixed lo and hi. The fused ops
express that as a sparse mode with pre_tokens/next_tokens and the compressed
2048x2048 mask, so the (S_q, S_kv) mask is never materialised.

The proof is symbolic, so it holds for symbolic sizes too (dynamic=True):
every integer tensor is an affine function of its indices,
``const + sum(coef[axis] * index[axis])``, and every boolean is a conjunction of
half-planes ``affine >= 0``. Anything else (a tensor input, a gather, an
``or``) makes the mask data, and it stays a full mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._fx import CASTS, is_full_slice, static_int, val

aten = torch.ops.aten
prims = torch.ops.prims

_SAME = (aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class Affine:
    """An integer tensor (or, as a half-plane, the condition value >= 0):
    const + sum(coef * index) over axes counted from the end (-1 = last)."""

    coefs: tuple[tuple[int, int], ...]  # (negative axis, coefficient), no zero coefficients
    const: object  # int or SymInt

    def plus(self, other: "Affine", sign: int = 1) -> "Affine":
        coefs = dict(self.coefs)
        for axis, c in other.coefs:
            coefs[axis] = coefs.get(axis, 0) + sign * c
        return Affine(_tidy(coefs), self.const + sign * other.const)

    def moved(self, axis_map) -> "Affine":
        return Affine(_tidy({axis_map(a): c for a, c in self.coefs}), self.const)

    def negated_condition(self) -> "Affine":
        """not (x >= 0) over integers: -x - 1 >= 0."""
        return Affine(tuple((a, -c) for a, c in self.coefs), -self.const - 1)


def _tidy(coefs: dict) -> tuple:
    return tuple(sorted((a, c) for a, c in coefs.items() if c != 0))


@dataclass(frozen=True)
class Conjunction:
    """A boolean tensor: True where every half-plane holds (none: all True), or,
    negated, exactly where they do not all hold (a mask's "masked out" form)."""

    planes: tuple[Affine, ...]
    negated: bool = False

    def plain(self) -> "Conjunction | None":
        """The same set without negation, when it is a conjunction."""
        if not self.negated:
            return self
        if len(self.planes) == 1:
            return Conjunction((self.planes[0].negated_condition(),))
        return None


def _drop_unit_axes(x: Affine | Conjunction, shape) -> Affine | Conjunction:
    """Indices along size-1 axes are always 0: their coefficients do not count
    (and must go, or a later expand would turn them into a real index)."""
    rank = len(shape)
    unit = {a for a in range(-rank, 0) if statically_known_true(shape[a] == 1)}
    if isinstance(x, Affine):
        return Affine(tuple((a, c) for a, c in x.coefs if a not in unit), x.const)
    return Conjunction(tuple(_drop_unit_axes(p, shape) for p in x.planes), x.negated)


def _scalar(arg: object) -> object | None:
    """An int or SymInt argument (a literal or a SymInt node), else None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, int):
        return arg
    if isinstance(arg, torch.fx.Node) and isinstance(val(arg), torch.SymInt):
        return val(arg)
    return None


def _operand(arg: object, seen: dict) -> Affine | Conjunction | None:
    scalar = _scalar(arg)
    if scalar is not None:
        return Affine((), scalar)
    return analyse(arg, seen) if isinstance(arg, torch.fx.Node) else None


def analyse(node: torch.fx.Node, seen: dict | None = None) -> Affine | Conjunction | None:
    """node's value as an Affine (integer tensors) or a Conjunction (booleans), or None."""
    seen = {} if seen is None else seen
    if node not in seen:
        seen[node] = None  # cycles cannot occur; this also bounds repeated work
        result = _analyse(node, seen)
        v = val(node)
        if result is not None and isinstance(v, torch.Tensor):
            result = _drop_unit_axes(result, v.shape)
        seen[node] = result
    return seen[node]


def _analyse(node: torch.fx.Node, seen: dict) -> Affine | Conjunction | None:
    v = val(node)
    if node.op != "call_function" or not isinstance(v, torch.Tensor):
        return None
    target, args = node.target, node.args
    if target in (aten.arange.default, aten.arange.start, aten.arange.start_step, prims.iota.default):
        if v.dtype not in _INT_DTYPES:
            return None
        if target is prims.iota.default:
            start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
        else:
            start = args[0] if target is not aten.arange.default else 0
            step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
        start = _scalar(start)
        return Affine(((-1, 1),), start) if start is not None and step == 1 else None
    if target in _SAME or (target in CASTS and v.dtype in _INT_DTYPES + (torch.bool,)
                           and val(args[0]).dtype == v.dtype):
        return analyse(args[0], seen)
    if target in CASTS and v.dtype in _INT_DTYPES and val(args[0]).dtype in _INT_DTYPES:
        return analyse(args[0], seen)  # positions fit every integer type
    if target in (aten.add.Tensor, aten.sub.Tensor):
        if node.kwargs.get("alpha", args[2] if len(args) > 2 else 1) != 1 or v.dtype not in _INT_DTYPES:
            return None
        a, b = _operand(args[0], seen), _operand(args[1], seen)
        if not (isinstance(a, Affine) and isinstance(b, Affine)):
            return None
        return a.plus(b, 1 if target is aten.add.Tensor else -1)
    if target is aten.unsqueeze.default:
        inner = analyse(args[0], seen)
        rank = val(args[0]).dim()
        dim = args[1] % (rank + 1)
        # axis a (from the end) at position rank + a moves down one if it sits before dim
        return _moved(inner, lambda a: a - 1 if rank + a < dim else a)
    if target is aten.slice.Tensor:
        if is_full_slice(node):
            return analyse(args[0], seen)
        inner = analyse(args[0], seen)
        rank = val(args[0]).dim()
        dim = args[1] % rank
        start = args[2] if len(args) > 2 else 0
        step = args[4] if len(args) > 4 else 1
        if not isinstance(inner, Affine) or step != 1 or static_int(start) is None:
            return None
        coef = dict(inner.coefs).get(dim - rank, 0)
        return Affine(inner.coefs, inner.const + coef * static_int(start))
    if target is aten.expand.default:
        return analyse(args[0], seen)  # axes count from the end; new leading axes have no index
    if target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        axis_map = _unit_dims_only(val(args[0]).shape, v.shape)
        return None if axis_map is None else _moved(analyse(args[0], seen), axis_map.__getitem__)
    if target in (aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.le.Scalar, aten.lt.Scalar,
                  aten.ge.Scalar, aten.gt.Scalar):
        a, b = _operand(args[0], seen), _operand(args[1], seen)
        if not (isinstance(a, Affine) and isinstance(b, Affine)):
            return None
        name = target._overloadpacket.__name__
        plane = {"le": b.plus(a, -1), "ge": a.plus(b, -1),
                 "lt": b.plus(a, -1).plus(Affine((), 1), -1), "gt": a.plus(b, -1).plus(Affine((), 1), -1)}[name]
        return Conjunction((plane,))
    if target in (aten.bitwise_and.Tensor, aten.logical_and.default, aten.mul.Tensor) and v.dtype == torch.bool:
        a, b = analyse(args[0], seen), analyse(args[1], seen) if isinstance(args[1], torch.fx.Node) else None
        a, b = (x.plain() if isinstance(x, Conjunction) else None for x in (a, b))
        return Conjunction(a.planes + b.planes) if a is not None and b is not None else None
    if target is aten.logical_not.default or (target is aten.bitwise_not.default and v.dtype == torch.bool):
        inner = analyse(args[0], seen)
        return Conjunction(inner.planes, not inner.negated) if isinstance(inner, Conjunction) else None
    if target in (aten.new_ones.default, aten.ones.default, aten.full.default, aten.new_full.default,
                  aten.ones_like.default, aten.full_like.default) and v.dtype == torch.bool:
        fill = True if "ones" in target._overloadpacket.__name__ else args[-1]
        return Conjunction(()) if fill is True or fill == 1 else None
    return None


def _moved(inner, axis_map):
    if isinstance(inner, Affine):
        return inner.moved(axis_map)
    if isinstance(inner, Conjunction):
        return Conjunction(tuple(p.moved(axis_map) for p in inner.planes), inner.negated)
    return None


def _unit_dims_only(before, after) -> dict | None:
    """A view that only adds or drops size-1 dims: {old axis: new axis} for the
    other dims (counted from the end), else None."""
    def real(shape):
        return [a for a in range(-len(shape), 0) if not statically_known_true(shape[a] == 1)]

    old, new = real(before), real(after)
    if len(old) != len(new) or not all(statically_known_true(before[a] == after[b]) for a, b in zip(old, new)):
        return None
    return dict(zip(old, new))


@dataclass(frozen=True)
class Band:
    """Key j is kept for query i iff lo <= j - i <= hi (None: unbounded)."""

    lo: int | None
    hi: int | None

    def describe(self) -> str:
        lo = "-inf" if self.lo is None else self.lo
        hi = "inf" if self.hi is None else self.hi
        return f"{lo} <= kv - q <= {hi}"


def keep_band(masked: torch.fx.Node, q_len: object, kv_len: object) -> Band | None:
    """The band of a (.., S_q, S_kv) NPU-convention mask (True = masked out), if
    its construction proves one for every size; None otherwise."""
    masked_out = analyse(masked)
    if not isinstance(masked_out, Conjunction):
        return None
    kept = Conjunction(masked_out.planes, not masked_out.negated).plain()
    if kept is None:
        return None
    lo = hi = None
    for plane in kept.planes:
        coefs = dict(plane.coefs)
        if set(coefs) - {-2, -1}:
            return None  # depends on the batch or head index
        const = static_int(plane.const)
        a, b = coefs.get(-2, 0), coefs.get(-1, 0)  # a * q + b * kv + const >= 0
        # A length-1 axis has index 0 only (its coefficient was dropped): any coefficient reads the same.
        if a == 0 and statically_known_true(q_len == 1):
            a = -b
        if b == 0 and statically_known_true(kv_len == 1):
            b = -a
        if a == -b and b in (1, -1) and const is not None:
            if b == 1:  # kv - q >= -const
                lo = -const if lo is None else max(lo, -const)
            else:  # kv - q <= const
                hi = const if hi is None else min(hi, const)
        elif not _always(a, b, plane.const, q_len, kv_len):
            return None
    return Band(lo, hi)


def _always(a: int, b: int, const: object, q_len: object, kv_len: object) -> bool:
    """a * q + b * kv + const >= 0 holds for every q < q_len, kv < kv_len (one of a, b zero)."""
    if a and b:
        return False
    coef, length = (a, q_len) if a else (b, kv_len)
    lowest = const if coef >= 0 else const + coef * (length - 1)
    return bool(statically_known_true(lowest >= 0))


@dataclass(frozen=True)
class BandMode:
    """A band as the fused ops take it: sparse_mode with pre/next tokens and the
    compressed causal mask."""

    sparse_mode: int  # 2 leftUpCausal, 3 rightDownCausal, 4 band (right-down anchored)
    pre_tokens: int
    next_tokens: int
    band: Band

    def describe(self) -> str:
        return (f"mask built from positions is the band {self.band.describe()}: sparse_mode {self.sparse_mode}"
                + (f" (pre_tokens {self.pre_tokens}, next_tokens {self.next_tokens})" if self.sparse_mode == 4 else "")
                + " with the compressed mask, no (S_q, S_kv) mask")


def band_mode(band: Band, q_len: object, kv_len: object, int_max: int) -> BandMode | None:
    """The sparse mode of `band` for these lengths, when every query row keeps a key
    (no row then needs eager's empty-row result) and the query has more than one
    token (a single token makes the ops ignore sparse modes)."""
    if not statically_known_true(q_len > 1):
        return None
    shift = 0 if statically_known_true(q_len == kv_len) else static_int(kv_len - q_len)
    if shift is None:
        return None
    # Row i keeps [max(0, i + lo), min(S_kv - 1, i + hi)]: non-empty for every i < S_q
    # iff hi >= 0, lo <= S_kv - S_q and lo <= hi.
    if (band.hi is not None and band.hi < 0) or (band.lo is not None and band.lo > shift) or \
            (band.lo is not None and band.hi is not None and band.lo > band.hi):
        return None
    if band.lo is None and band.hi == shift:
        return BandMode(3, int_max, int_max, band)  # kv - q <= S_kv - S_q: rightDownCausal
    if band.lo is None and band.hi == 0:
        return BandMode(2, int_max, int_max, band)  # kv <= q: leftUpCausal
    # mode 4 keeps -pre <= (kv - q) - shift <= next
    pre = int_max if band.lo is None else shift - band.lo
    nxt = int_max if band.hi is None else band.hi - shift
    if min(pre, nxt) < -int_max or max(pre, nxt) > int_max:
        return None
    return BandMode(4, pre, nxt, band)
