"""Pass: vLLM's torch-only advance_step -> npu_advance_step_flashattn.

A serving engine's decode step ends with the bookkeeping for the next step,
written in PyTorch as four in-place updates of int64 state tensors, e.g.::

    input_tokens[:nq] = sampled_token_ids[:nq, 0]
    input_positions[:nq] = seq_lens[:nq]
    seq_lens[:nq] += 1
    slot_mapping[:nq] = block_tables[:nq].gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    input_tokens[nq:] = 0; input_positions[nq:] = 0; slot_mapping[nq:] = -1     # padding rows

After AOT each update is a functional value (slice_scatter, copy, fill, ...)
copied back into its graph input. The op's semantics (kernels/
advance_step_flashattn.py, non-speculative form) are, row by row, with p the
old seq_lens[i]::

    i < nq:  tokens = sampled[i, 0], positions = p, seq_lens = p + 1,
             slot = block_tables[i, p // bs] * bs + p % bs
    i >= nq: tokens = 0, positions = 0, slot = -1, seq_lens unchanged

Matching is by meaning, not by spelling: every value copied back into an
int64 graph input is evaluated symbolically, one piece per row range, as a
sympy expression of the row index over the graph inputs (slices, selects,
squeeze/unsqueeze/views, copy/fill/slice_scatter, +, -, *, floor division,
remainder, gather along the block table's columns, integer casts). A set of
four inputs whose new values equal the formulas above for some nq, bs (and
the sampled-tokens and block-table inputs they read) is the step; any op
outside that vocabulary, or any difference, leaves the graph as it is. The
op's own fake then validates the arguments (int64, shapes, num_seqs > nq).

The rewrite puts the in-place op before the first reader of a new value (a
decode step that reads the new tokens, positions, lengths and slots in the
same graph) or the first copy-back, points those readers at the inputs,
updated in place, and drops the four copy-backs. Refused (with the reason)
when something still reads a state tensor's old value after that point.

The speculative form (spec_token, accepted_num; find_spec_step) is matched the
same way on four state inputs of num_seqs * T values, T = 1 + spec_num, a
column index j joining the row index: with p = old input_positions[i, j] + accepted_num[i] + 1, the new
positions, seq_lens and slots must be p, p + 1 and the block-table slot of p, and
input_tokens[i, 1:] = spec_token[i]. input_tokens[i, 0] must be the op's last
token: the entry of sampled_token_ids[i] before its first -1 (the last entry when
it has none, -1 when it starts with -1), a search over the data. The vocabulary
adds comparisons, where, clamp, column reductions (sum, amin/amax, min/max.dim,
argmin/argmax, cumsum/cumprod, any/all), cat and column scatters, each a sympy
Piecewise/Min/Max of the row's entries; the last token is then checked by
enumerating every row pattern of -1 entries (2 ** T rows, the other entries free
token ids >= 0, the op's domain) and resolving the program's expression on each.
Provably equal spellings (the leading run of non -1 entries, e.g.
``(sampled != -1).cumprod(1).sum(1)``, or a search for the first -1) are rewritten.
A spelling equal to the op only under a precondition on the data is reported with
that precondition and left as written: ``sampled.gather(1, accepted_num[:, None])``
(equal only if accepted_num[i] + 1 is the index of the first -1) and vLLM's
``(sampled != -1).sum(1) - 1`` (equal only if each row's -1 entries are a suffix).
Each state tensor may be 2-D (num_seqs, T) or the op's flat (num_seqs * T,) layout,
read row-major as (num_seqs, T) (views between the two are in the vocabulary, and so
is a 1-D table read at a per-token index such as ``arange(num_seqs * T) // T``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy
import torch

from ..kernels._library import npu_rules
from ..report import Report, Site, node_location
from ._context import PassContext
from ._fx import (Rewrite, RewriteRefused, erase_dead, graph_order, is_call, scalar_constant, static_int, val,
                  views_of)

aten = torch.ops.aten
prims = torch.ops.prims
ADVANCE_STEP = torch.ops.npu_attn.npu_advance_step_flashattn.default
PATTERN = "advance_step:slot-mapping-update"
SPEC_PATTERN = "advance_step:speculative"

ROW = sympy.Symbol("i", integer=True, nonnegative=True)
COL = sympy.Symbol("j", integer=True, nonnegative=True)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# Booleans (comparison results) are 0/1 values: Piecewise((1, relation), (0, True)).
_VALUE_DTYPES = _INT_DTYPES + (torch.bool,)
MAX_TOKENS_PER_REQUEST = 8  # the last-token check enumerates 2 ** (1 + spec_num) rows of -1 patterns


class _Unknown(Exception):
    """The value is outside the vocabulary the step is recognised in."""


@dataclass(frozen=True)
class _Rows:
    """A tensor's value by rows: (lo, hi, expr) pieces covering [0, rows); expr is a sympy
    expression of ROW (and COL for the second dim of a 2-D tensor)."""

    rows: int
    cols: int | None  # None: 1-D
    pieces: tuple[tuple[int, int, sympy.Expr], ...]

    def restrict(self, lo: int, hi: int, shift: int) -> list[tuple[int, int, sympy.Expr]]:
        """The pieces over [lo, hi), re-indexed so row lo becomes row shift."""
        out = []
        for a, b, e in self.pieces:
            a2, b2 = max(a, lo), min(b, hi)
            if a2 < b2:
                out.append((a2 - lo + shift, b2 - lo + shift, e.subs(ROW, ROW + lo - shift)))
        return out


def _shape(node: torch.fx.Node) -> tuple[int, int | None]:
    shape = [static_int(s) for s in val(node).shape]
    if any(s is None for s in shape) or len(shape) not in (1, 2):
        raise _Unknown(f"{node.name}: shape {list(val(node).shape)}")
    return shape[0], (shape[1] if len(shape) == 2 else None)


def _zip(values: list[_Rows], op) -> list[tuple[int, int, sympy.Expr]]:
    """op applied row-range by row-range to values of the same rows."""
    cuts = sorted({0, values[0].rows} | {x for v in values for p in v.pieces for x in p[:2]})
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        out.append((lo, hi, op(*(next(e for x, y, e in v.pieces if x <= lo < y) for v in values))))
    return out


def _combine(a: _Rows, b: _Rows, op) -> list[tuple[int, int, sympy.Expr]]:
    return _zip([a, b], op)


def _flag(relation) -> sympy.Expr:
    """A boolean tensor's value: 1 where the relation holds, else 0."""
    return sympy.Piecewise((1, relation), (0, True))


def _holds(e: sympy.Expr):
    """The condition "e is nonzero" (a boolean tensor used as a where/mask condition)."""
    if isinstance(e, sympy.Piecewise) and len(e.args) == 2 and e.args[0].expr == 1 and e.args[1].expr == 0 \
            and e.args[1].cond == sympy.true:
        return e.args[0].cond
    return sympy.Ne(e, 0)


def _first_index(terms: list[sympy.Expr], target: sympy.Expr) -> sympy.Expr:
    """The first k with terms[k] == target (torch's argmin/argmax/min.dim tie rule)."""
    return sympy.Piecewise(*[(k, sympy.Eq(t, target)) for k, t in enumerate(terms[:-1])], (len(terms) - 1, True))


def _by_column(values: list[sympy.Expr]) -> sympy.Expr:
    """A row's value whose column j is values[j]."""
    return sympy.Piecewise(*[(v, sympy.Eq(COL, k)) for k, v in enumerate(values[:-1])], (values[-1], True))


_COMPARISONS = {
    aten.eq.Scalar: sympy.Eq, aten.eq.Tensor: sympy.Eq, aten.ne.Scalar: sympy.Ne, aten.ne.Tensor: sympy.Ne,
    aten.lt.Scalar: sympy.Lt, aten.lt.Tensor: sympy.Lt, aten.le.Scalar: sympy.Le, aten.le.Tensor: sympy.Le,
    aten.gt.Scalar: sympy.Gt, aten.gt.Tensor: sympy.Gt, aten.ge.Scalar: sympy.Ge, aten.ge.Tensor: sympy.Ge,
}
_LOGICAL = {
    aten.logical_and.default: lambda x, y: x * y, aten.bitwise_and.Tensor: lambda x, y: x * y,
    aten.logical_or.default: lambda x, y: x + y - x * y, aten.bitwise_or.Tensor: lambda x, y: x + y - x * y,
    aten.maximum.default: sympy.Max, aten.minimum.default: sympy.Min,
}
# Reductions over the columns of a 2-D value: the reducer of a row's column values.
_REDUCTIONS = {
    aten.sum.dim_IntList: sympy.Add, aten.amin.default: sympy.Min, aten.amax.default: sympy.Max,
    aten.any.dim: sympy.Max, aten.all.dim: sympy.Min,
    aten.argmin.default: lambda *t: _first_index(list(t), sympy.Min(*t)),
    aten.argmax.default: lambda *t: _first_index(list(t), sympy.Max(*t)),
}


class _Evaluator:
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.memo: dict[torch.fx.Node, _Rows] = {}
        self.functions: dict[torch.fx.Node, sympy.Function] = {}

    def input_of(self, fn: sympy.Function) -> torch.fx.Node:
        return next(n for n, f in self.functions.items() if f == fn)

    def scalar(self, x: object) -> sympy.Expr:
        if isinstance(x, bool) or not isinstance(x, (int, torch.fx.Node)):
            raise _Unknown(f"scalar {x!r}")
        if isinstance(x, int):
            return sympy.Integer(x)
        if x.op == "get_attr" or is_call(x, aten.lift_fresh_copy.default):
            attr = x if x.op == "get_attr" else x.args[0]
            t = getattr(self.gm, attr.target, None) if attr.op == "get_attr" else None
            if isinstance(t, torch.Tensor) and t.numel() == 1 and t.dtype in _INT_DTYPES:
                from torch._subclasses.fake_tensor import unset_fake_temporarily

                with unset_fake_temporarily():  # a real constant, read while the backend's fake mode is on
                    return sympy.Integer(int(t.item()))
        constant = scalar_constant(x)
        if constant is not None and float(constant).is_integer():
            return sympy.Integer(int(constant))
        raise _Unknown(f"scalar {x.name}")

    def const(self, node: torch.fx.Node, value: sympy.Expr) -> _Rows:
        rows, cols = _shape(node)
        return _Rows(rows, cols, ((0, rows, value),))

    def operand(self, x: object, rows: int, cols: int | None) -> _Rows:
        """x broadcast to (rows, cols) as torch broadcasts it: a number or 0-d tensor, the same
        shape, a (rows, 1) column, or a (cols,) / (1, cols) row."""
        if not isinstance(x, torch.fx.Node) or x.op == "get_attr" or \
                (isinstance(val(x), torch.Tensor) and val(x).dim() == 0):
            return _Rows(rows, cols, ((0, rows, self.scalar(x)),))
        src = self.rows(x)
        if (src.rows, src.cols) == (rows, cols):
            return src
        if cols is not None and src.rows == rows and src.cols == 1:
            return _Rows(rows, cols, tuple((a, b, e.subs(COL, 0)) for a, b, e in src.pieces))
        if cols is not None and len(src.pieces) == 1 and src.cols is None and src.rows == cols:
            return _Rows(rows, cols, ((0, rows, src.pieces[0][2].subs(ROW, COL)),))
        if cols is not None and len(src.pieces) == 1 and src.rows == 1 and src.cols == cols:
            return _Rows(rows, cols, ((0, rows, src.pieces[0][2].subs(ROW, 0)),))
        raise _Unknown(f"{x.name}: broadcast {list(val(x).shape)} to ({rows}, {cols})")

    def columns(self, x: object, dims: object) -> list[tuple[int, int, list[sympy.Expr]]]:
        """A 2-D value's pieces, each as its list of column values, for a reduction over dims (the columns)."""
        src = self.rows(x)
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]  # None (all dims) is refused below
        if src.cols is None or dims not in ([1], [-1]):
            raise _Unknown(f"{getattr(x, 'name', x)}: reduction over dims {dims}")
        return [(a, b, [e.subs(COL, k) for k in range(src.cols)]) for a, b, e in src.pieces]

    def rows(self, node: object) -> _Rows:
        if not isinstance(node, torch.fx.Node):
            raise _Unknown(f"{node!r}")
        if node not in self.memo:
            self.memo[node] = self._eval(node)
        return self.memo[node]

    def _eval(self, n: torch.fx.Node) -> _Rows:
        if isinstance(val(n), torch.Tensor) and val(n).dtype not in _VALUE_DTYPES:
            raise _Unknown(f"{n.name}: dtype {val(n).dtype}")
        rows, cols = _shape(n)
        a = n.args
        if n.op == "placeholder":
            fn = self.functions.setdefault(n, sympy.Function(f"in{len(self.functions)}"))
            return _Rows(rows, cols, ((0, rows, fn(ROW) if cols is None else fn(ROW, COL)),))
        if is_call(n, (aten.clone.default, aten.alias.default, aten._to_copy.default, aten.lift_fresh_copy.default,
                       prims.convert_element_type.default)):
            src = self.rows(a[0])
            if val(n).dtype == torch.bool and val(a[0]).dtype != torch.bool:  # a cast to bool: nonzero -> 1
                return _Rows(rows, cols, tuple((x, y, _flag(sympy.Ne(e, 0))) for x, y, e in src.pieces))
            return _Rows(rows, cols, src.pieces)
        if is_call(n, aten.slice.Tensor):
            src = self.rows(a[0])
            dim = a[1] if len(a) > 1 else 0
            start = a[2] if len(a) > 2 else 0
            end = a[3] if len(a) > 3 else None
            step = a[4] if len(a) > 4 else 1
            if step != 1 or not isinstance(start, int) or not (end is None or isinstance(end, int)):
                raise _Unknown(f"{n.name}: slice {a[1:]}")
            size = src.rows if dim == 0 else src.cols
            lo = max(0, min(size, start + size if start < 0 else start))
            hi = size if end is None else max(0, min(size, end + size if end < 0 else end))
            if dim == 0:
                return _Rows(rows, cols, tuple(src.restrict(lo, hi, 0)))
            if dim in (1, -1) and src.cols is not None:
                return _Rows(rows, cols, tuple((x, y, e.subs(COL, COL + lo)) for x, y, e in src.pieces))
            raise _Unknown(f"{n.name}: slice dim {dim}")
        if is_call(n, aten.select.int):
            src = self.rows(a[0])
            if a[1] in (1, -1) and src.cols is not None and isinstance(a[2], int) and a[2] >= 0:
                return _Rows(rows, None, tuple((x, y, e.subs(COL, a[2])) for x, y, e in src.pieces))
            raise _Unknown(f"{n.name}: select {a[1:]}")
        if is_call(n, (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.view.default,
                       aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dims)):
            src = self.rows(a[0])
            if (src.rows, src.cols) == (rows, cols):
                return src
            if src.rows == rows and src.cols in (None, 1) and cols in (None, 1):  # (n,) <-> (n, 1)
                return _Rows(rows, cols, tuple((x, y, e.subs(COL, 0)) for x, y, e in src.pieces))
            if src.cols is None and cols and src.rows == rows * cols and \
                    all(x % cols == 0 and y % cols == 0 for x, y, _ in src.pieces):  # (r * c,) -> (r, c), row-major
                return _Rows(rows, cols, tuple((x // cols, y // cols, e.subs(ROW, ROW * cols + COL))
                                               for x, y, e in src.pieces))
            if src.cols and cols is None and rows == src.rows * src.cols:  # (r, c) -> (r * c,)
                c = src.cols
                return _Rows(rows, cols, tuple((x * c, y * c, e.subs({ROW: sympy.floor(ROW / c), COL: sympy.Mod(ROW, c)},
                                                                      simultaneous=True)) for x, y, e in src.pieces))
            raise _Unknown(f"{n.name}: view {val(a[0]).shape} -> {val(n).shape}")
        if is_call(n, (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.add.Scalar, aten.sub.Scalar,
                       aten.mul.Scalar)):
            alpha = n.kwargs.get("alpha", 1)
            if not isinstance(alpha, int) or val(n).dtype == torch.bool:  # bool + bool is a logical or
                raise _Unknown(f"{n.name}: alpha {alpha}, dtype {val(n).dtype}")
            left, right = self.operand(a[0], rows, cols), self.operand(a[1], rows, cols)
            ops = {"add": lambda x, y: x + alpha * y, "sub": lambda x, y: x - alpha * y, "mul": lambda x, y: x * y}
            return _Rows(rows, cols, tuple(_combine(left, right, ops[n.target.__name__.split(".")[0]])))
        if n.target in _COMPARISONS:
            relation = _COMPARISONS[n.target]
            left, right = self.operand(a[0], rows, cols), self.operand(a[1], rows, cols)
            return _Rows(rows, cols, tuple(_combine(left, right, lambda x, y: _flag(relation(x, y)))))
        if n.target in _LOGICAL:
            if n.target not in (aten.maximum.default, aten.minimum.default) and not all(
                    isinstance(x, torch.fx.Node) and val(x).dtype == torch.bool for x in a[:2]):
                raise _Unknown(f"{n.name}: {n.target} of non-boolean values")  # 0/1 arithmetic holds for bools only
            left, right = self.operand(a[0], rows, cols), self.operand(a[1], rows, cols)
            return _Rows(rows, cols, tuple(_combine(left, right, _LOGICAL[n.target])))
        if is_call(n, (aten.logical_not.default, aten.bitwise_not.default)) and val(n).dtype == torch.bool:
            return _Rows(rows, cols, tuple((x, y, 1 - e) for x, y, e in self.rows(a[0]).pieces))
        if is_call(n, (aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)):
            values = [self.operand(x, rows, cols) for x in a[:3]]
            return _Rows(rows, cols, tuple(_zip(values, lambda c, x, y: sympy.Piecewise((x, _holds(c)), (y, True)))))
        if is_call(n, (aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)):
            low = a[1] if len(a) > 1 and not is_call(n, aten.clamp_max.default) else n.kwargs.get("min")
            high = a[1] if is_call(n, aten.clamp_max.default) else (a[2] if len(a) > 2 else n.kwargs.get("max"))
            low = None if low is None else self.scalar(low)
            high = None if high is None else self.scalar(high)

            def clamp(e):
                e = e if low is None else sympy.Max(e, low)
                return e if high is None else sympy.Min(e, high)
            return _Rows(rows, cols, tuple((x, y, clamp(e)) for x, y, e in self.rows(a[0]).pieces))
        if n.target in _REDUCTIONS:
            reducer = _REDUCTIONS[n.target]
            dims = a[1] if len(a) > 1 else n.kwargs.get("dim")
            return _Rows(rows, cols, tuple((x, y, reducer(*terms)) for x, y, terms in self.columns(a[0], dims)))
        if n.target is operator.getitem and is_call(a[0], (aten.min.dim, aten.max.dim)):
            reduce = sympy.Min if is_call(a[0], aten.min.dim) else sympy.Max
            pieces = []
            for x, y, terms in self.columns(a[0].args[0], a[0].args[1]):
                extreme = reduce(*terms)
                pieces.append((x, y, extreme if a[1] == 0 else _first_index(terms, extreme)))
            return _Rows(rows, cols, tuple(pieces))
        if is_call(n, (aten.cumsum.default, aten.cumprod.default)):
            accumulate = sympy.Add if is_call(n, aten.cumsum.default) else sympy.Mul
            return _Rows(rows, cols, tuple(
                (x, y, _by_column([accumulate(*terms[:k + 1]) for k in range(len(terms))]))
                for x, y, terms in self.columns(a[0], a[1])))
        if is_call(n, aten.expand.default):
            return self.operand(a[0], rows, cols)
        if is_call(n, (aten.floor_divide.default, aten.div.Tensor_mode, aten.remainder.Scalar,
                       aten.remainder.Tensor)):
            if is_call(n, aten.div.Tensor_mode) and n.kwargs.get("rounding_mode") != "floor":
                raise _Unknown(f"{n.name}: rounding_mode {n.kwargs.get('rounding_mode')}")
            src, divisor = self.rows(a[0]), self.scalar(a[1])
            if divisor <= 0:
                raise _Unknown(f"{n.name}: divisor {divisor}")
            if is_call(n, (aten.remainder.Scalar, aten.remainder.Tensor)):
                return _Rows(rows, cols, tuple((x, y, sympy.Mod(e, divisor)) for x, y, e in src.pieces))
            return _Rows(rows, cols, tuple((x, y, sympy.floor(e / divisor)) for x, y, e in src.pieces))
        if is_call(n, aten.gather.default):
            table, dim, index = a[:3]
            t, idx = self.rows(table), self.rows(index)
            if dim not in (1, -1) or t.cols is None or idx.rows != rows or t.rows < rows:
                raise _Unknown(f"{n.name}: gather")
            # out[i, j] = table[i, index[i, j]]: a one-column index is read at its column 0.
            pieces = _combine(_Rows(rows, cols, tuple(t.restrict(0, rows, 0))), idx,
                              lambda te, ie: te.subs(COL, ie.subs(COL, 0) if idx.cols == 1 else ie))
            return _Rows(rows, cols, tuple(pieces))
        if is_call(n, (aten.arange.default, aten.arange.start)):
            start = a[0] if is_call(n, aten.arange.start) else 0
            step = a[2] if is_call(n, aten.arange.start) and len(a) > 2 else 1
            if not isinstance(start, int) or step != 1 or cols is not None:
                raise _Unknown(f"{n.name}: arange {a}")
            return self.const(n, ROW + start)
        if is_call(n, aten.index.Tensor):
            table, indices = a[:2]
            t = self.rows(table)
            if t.cols is None and len(indices) == 1 and len(t.pieces) == 1 and indices[0] is not None and \
                    val(indices[0]).dtype != torch.bool:  # a 1-D table read at an index of any shape
                index = self.operand(indices[0], rows, cols)
                return _Rows(rows, cols, tuple((x, y, t.pieces[0][2].subs(ROW, e)) for x, y, e in index.pieces))
            if t.cols is None or len(indices) != 2 or len(t.pieces) != 1 or any(
                    i is None or val(i).dtype == torch.bool for i in indices):  # a mask selects, it does not index
                raise _Unknown(f"{n.name}: index")
            first, second = (self.operand(i, rows, cols) for i in indices)  # broadcast to the result
            table_expr = t.pieces[0][2]
            return _Rows(rows, cols, tuple(_combine(first, second, lambda r, c: table_expr.subs(
                {ROW: r, COL: c}, simultaneous=True))))
        if is_call(n, aten.copy.default):
            return self.operand(a[1], rows, cols)  # copy(dst, src): src's values, broadcast into dst's place
        if is_call(n, (aten.fill.Tensor, aten.fill.Scalar)):
            return self.const(n, self.scalar(a[1]))
        if is_call(n, (aten.full.default, aten.full_like.default, aten.new_full.default)):
            return self.const(n, self.scalar(a[-1] if not is_call(n, aten.full.default) else a[1]))
        if is_call(n, (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default, aten.zero.default)):
            return self.const(n, sympy.Integer(0))
        if is_call(n, aten.slice_scatter.default):
            base, src = self.rows(a[0]), self.rows(a[1])
            dim = a[2] if len(a) > 2 else 0
            start = a[3] if len(a) > 3 else 0
            end = a[4] if len(a) > 4 else None
            step = a[5] if len(a) > 5 else 1
            size = rows if dim == 0 else cols
            if dim not in (0, 1) or size is None or step != 1 or not isinstance(start, int):
                raise _Unknown(f"{n.name}: slice_scatter {a[2:]}")
            lo = max(0, min(size, start + size if start < 0 else start))
            hi = size if end is None else max(0, min(size, end + size if end < 0 else end))
            if dim == 1:  # columns [lo, hi) from src
                if (src.rows, src.cols) != (rows, hi - lo):
                    raise _Unknown(f"{n.name}: slice_scatter of {src.cols} columns into [{lo}, {hi})")
                return _Rows(rows, cols, tuple(_combine(base, src, lambda b, e: sympy.Piecewise(
                    (e.subs(COL, COL - lo), (COL >= lo) & (COL < hi)), (b, True)))))
            if src.rows != hi - lo:
                raise _Unknown(f"{n.name}: slice_scatter of {src.rows} rows into [{lo}, {hi})")
            pieces = base.restrict(0, lo, 0) + src.restrict(0, src.rows, lo) + base.restrict(hi, rows, hi)
            return _Rows(rows, cols, tuple(sorted(pieces, key=lambda p: p[0])))
        if is_call(n, aten.select_scatter.default):
            base, src = self.rows(a[0]), self.rows(a[1])
            if a[2] not in (1, -1) or cols is None or not isinstance(a[3], int) or src.cols is not None:
                raise _Unknown(f"{n.name}: select_scatter {a[2:]}")
            column = a[3] + cols if a[3] < 0 else a[3]
            return _Rows(rows, cols, tuple(_combine(base, src, lambda b, e: sympy.Piecewise(
                (e, sympy.Eq(COL, column)), (b, True)))))
        if is_call(n, aten.cat.default):
            parts = [self.rows(x) for x in a[0]]
            dim = a[1] if len(a) > 1 else 0
            if dim == 0:
                pieces, offset = [], 0
                for p in parts:
                    pieces += p.restrict(0, p.rows, offset)
                    offset += p.rows
                return _Rows(rows, cols, tuple(pieces))
            if dim not in (1, -1) or cols is None or any(p.cols is None or p.rows != rows for p in parts):
                raise _Unknown(f"{n.name}: cat dim {dim}")
            starts = [sum(p.cols for p in parts[:k]) for k in range(len(parts))]

            def joined(*exprs):
                return sympy.Piecewise(*[(e.subs(COL, COL - lo), COL < lo + p.cols)
                                         for e, lo, p in zip(exprs[:-1], starts, parts)],
                                       (exprs[-1].subs(COL, COL - starts[-1]), True))
            return _Rows(rows, cols, tuple(_zip(parts, joined)))
        raise _Unknown(f"{n.name}: {n.target}")


def _is_zero(d: sympy.Expr) -> bool:
    """d is provably 0. A difference still holding a data-dependent choice (Piecewise, Min, Max:
    comparisons of values the graph reads) counts as nonzero: such values are compared by
    enumerating the data's cases (_last_token_reason), never by simplify, which is slow on them
    and decides nothing more."""
    if d == 0:
        return True
    d = sympy.expand(d)
    if d == 0 or d.has(sympy.Piecewise, sympy.Min, sympy.Max):
        return d == 0
    return sympy.simplify(d) == 0


def _piece_at(value: _Rows, lo: int, hi: int, want) -> bool:
    """Every piece over [lo, hi) equals want(ROW)."""
    covered = 0
    for a, b, e in value.pieces:
        a2, b2 = max(a, lo), min(b, hi)
        if a2 >= b2:
            continue
        if not _is_zero(e - want):
            return False
        covered += b2 - a2
    return covered == hi - lo


@dataclass
class StepSite:
    tokens: torch.fx.Node
    sampled: torch.fx.Node
    positions: torch.fx.Node
    seq_lens: torch.fx.Node
    slots: torch.fx.Node
    block_tables: torch.fx.Node
    num_seqs: int
    num_queries: int
    block_size: int
    copies: list[torch.fx.Node]
    spec_token: torch.fx.Node | None = None  # the speculative form's extra inputs
    accepted_num: torch.fx.Node | None = None
    refused: str | None = None  # a speculative step whose last token is not provably the op's: why


def _copies(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, torch.fx.Node]:
    """int64 graph input -> the copy_ that writes its new value back (the last one, if several)."""
    out = {}
    for n in gm.graph.nodes:
        if is_call(n, aten.copy_.default) and n.args[0].op == "placeholder" and isinstance(val(n.args[0]),
                                                                                          torch.Tensor) \
                and val(n.args[0]).dtype == torch.int64 and val(n.args[0]).dim() in (1, 2):
            out[n.args[0]] = n
    return out


def find_step(gm: torch.fx.GraphModule) -> StepSite | None:
    copies = _copies(gm)
    if len(copies) < 3:
        return None
    ev = _Evaluator(gm)
    new: dict[torch.fx.Node, _Rows] = {}
    for target, copy in copies.items():
        try:
            new[target] = ev.rows(copy.args[1])
        except _Unknown:
            continue
        ev.rows(target)  # the input's own symbol
    fn = {node: ev.functions[node] for node in new}
    for seq, seq_new in new.items():
        s = fn[seq](ROW) if seq_new.cols is None else fn[seq](ROW, 0)
        # seq_lens: s + 1 on [0, nq), unchanged after
        nq = next((b for a, b, e in seq_new.pieces if a == 0 and _is_zero(e - (s + 1))), None)
        if nq is None or not _piece_at(seq_new, nq, seq_new.rows, s) or not _piece_at(seq_new, 0, nq, s + 1):
            continue
        ns = seq_new.rows
        positions = [p for p, v in new.items() if p is not seq and v.rows == ns and _piece_at(v, 0, nq, s)
                     and _piece_at(v, nq, ns, 0)]
        for slot, v in new.items():
            if slot is seq or slot in positions or v.rows != ns or not _piece_at(v, nq, ns, -1):
                continue
            mods = [m for a, b, e in v.pieces if a < nq for m in e.atoms(sympy.Mod)]
            tables = [f for a, b, e in v.pieces if a < nq for f in e.atoms(sympy.core.function.AppliedUndef)
                      if len(f.args) == 2]
            if not mods or not tables:
                continue
            bs = mods[0].args[1]
            table = tables[0].func
            if not _piece_at(v, 0, nq, table(ROW, sympy.floor(s / bs)) * bs + sympy.Mod(s, bs)):
                continue
            for tok, tv in new.items():
                if tok in (seq, slot) or tok in positions or tv.rows != ns or not _piece_at(tv, nq, ns, 0):
                    continue
                heads = [f for a, b, e in tv.pieces if a < nq for f in e.atoms(sympy.core.function.AppliedUndef)]
                if len(heads) != 1 or heads[0].args != (ROW, 0) or not _piece_at(tv, 0, nq, heads[0]):
                    continue
                pos = next((p for p in positions if p is not tok), None)
                if pos is None:
                    continue
                return StepSite(tokens=tok, sampled=ev.input_of(heads[0].func), positions=pos, seq_lens=seq,
                                slots=slot, block_tables=ev.input_of(table), num_seqs=ns, num_queries=int(nq),
                                block_size=int(bs), copies=[copies[x] for x in (tok, pos, seq, slot)])
    return None


def _equal(value: _Rows, want: sympy.Expr) -> bool:
    """Every row and column of value equals want (a formula of ROW and COL)."""
    for _, _, e in value.pieces:
        for j in range(value.cols or 1):
            if not _is_zero(e.subs(COL, j) - want.subs(COL, j)):
                return False
    return True


def _same(got: sympy.Expr, want: sympy.Expr) -> bool:
    return _is_zero(got - want)


def _with_row(e: sympy.Expr, sampled: sympy.Function, row: list) -> sympy.Expr:
    """e with sampled(ROW, k) = row[k]; repeated, since an index computed from the row becomes
    a number only once the row's values are in."""
    for _ in range(2 * len(row) + 2):
        done = e.subs({sampled(ROW, k): v for k, v in enumerate(row)})
        if done == e:
            break
        e = done
    return e


def _last_token_reason(values: list[sympy.Expr], sampled: sympy.Function, accepted: sympy.Expr,
                       per_request: int) -> str | None:
    """None when every value is, for every row of sampled_token_ids, the op's last token: the entry
    before the row's first -1 (its last entry when it has none, -1 when it starts with -1). Rows are
    enumerated by which entries are -1; the other entries are free token ids >= 0 (the op's own
    domain: it rejects entries below -1). Else the reason, with the precondition it would need."""
    if per_request > MAX_TOKENS_PER_REQUEST:
        return (f"1 + spec_num = {per_request} tokens per request: the last-token check enumerates "
                f"2 ** {per_request} rows, more than the {2 ** MAX_TOKENS_PER_REQUEST} it allows")
    ids = [sympy.Symbol(f"t{k}", integer=True, nonnegative=True) for k in range(per_request)]
    failures = []
    for mask in range(2 ** per_request):
        row = [-1 if mask >> k & 1 else ids[k] for k in range(per_request)]
        first = next((k for k in range(per_request) if row[k] == -1), per_request)
        want = row[first - 1] if first else sympy.Integer(-1)
        got = next((g for g in (_with_row(e, sampled, row) for e in values) if not _same(g, want)), None)
        if got is not None:
            failures.append((row, first, got, want))
    if not failures:
        return None
    row, first, got, want = failures[0]
    shown = f"[{', '.join(map(str, row))}]"
    named = str(got).replace(str(accepted), "accepted_num[i]").replace(f"{sampled}(", "sampled_token_ids(")
    example = f"for the sampled row {shown} the program takes {named} where the op takes {want}"
    if any(accepted in g.atoms(sympy.core.function.AppliedUndef) for _, _, g, _ in failures) and \
            all(_same(_with_row(g.subs(accepted, f - 1), sampled, r), w) for r, f, g, w in failures if f > 0):
        return ("input_tokens[:, 0] reads sampled_token_ids at an index taken from accepted_num: equal to the "
                "op's last token (the entry before the first -1) only if accepted_num[i] + 1 is the index of the "
                f"first -1 of sampled_token_ids[i] ({per_request} when it has none), which the graph cannot show; "
                + example)

    def suffix(r: list) -> bool:
        return all(r[k] == -1 for k in range(r.index(-1), len(r))) if -1 in r else True
    if all(not suffix(r) for r, _, _, _ in failures):
        return ("input_tokens[:, 0] equals the op's last token (the entry before the first -1 of "
                "sampled_token_ids[i]) only if each row's -1 entries are a suffix (rejected drafts trailing), "
                "which the graph cannot show; " + example)
    return "input_tokens[:, 0] is not the op's last token (the entry before the first -1); " + example


def find_spec_step(gm: torch.fx.GraphModule) -> StepSite | None:
    """The speculative step: four (num_seqs, T) int64 inputs, T = 1 + spec_num, whose new values are,
    for a (num_seqs,) input accepted_num, a (num_seqs, spec_num) input spec_token and a
    (num_seqs, T) input sampled_token_ids, with p = old input_positions[i, j] + accepted_num[i] + 1:
    positions = p, seq_lens = p + 1, slots = block_tables[i, p // bs] * bs + p % bs,
    tokens[i, 1:] = spec_token[i] and tokens[i, 0] = the op's last token (checked by
    _last_token_reason; a step whose last token is not provably it comes back with .refused)."""
    copies = _copies(gm)
    if len(copies) < 4:
        return None
    ev = _Evaluator(gm)
    evaluated: dict[torch.fx.Node, _Rows] = {}
    for target, copy in copies.items():
        try:
            evaluated[target] = ev.rows(copy.args[1])
            ev.rows(target)
        except _Unknown:
            continue
    node_of = {f: node for node, f in ev.functions.items()}
    # (num_seqs, T) from the 2-D int64 inputs (sampled_token_ids is one); each state tensor is
    # read as (num_seqs, T): 2-D as it is, flat (num_seqs * T,) row-major, as the op reads it.
    layouts = sorted({tuple(val(x).shape) for x in gm.graph.nodes if x.op == "placeholder" and
                      isinstance(val(x), torch.Tensor) and val(x).dtype == torch.int64 and val(x).dim() == 2
                      and all(isinstance(d, int) for d in val(x).shape) and val(x).shape[1] >= 2})
    for ns, per_request in layouts:
        new: dict[torch.fx.Node, _Rows] = {}
        olds: dict[torch.fx.Node, sympy.Expr] = {}
        for target, value in evaluated.items():
            fn = ev.functions[target]
            if (value.rows, value.cols) == (ns, per_request):
                new[target], olds[target] = value, fn(ROW, COL)
            elif (value.rows, value.cols) == (ns * per_request, None) and \
                    all(x % per_request == 0 and y % per_request == 0 for x, y, _ in value.pieces):
                new[target] = _Rows(ns, per_request, tuple(
                    (x // per_request, y // per_request, e.subs(ROW, ROW * per_request + COL))
                    for x, y, e in value.pieces))
                olds[target] = fn(ROW * per_request + COL)
        step = _spec_step_in(new, olds, ev, node_of, copies, ns, per_request)
        if step is not None:
            return step
    return None


def _spec_step_in(new: dict[torch.fx.Node, _Rows], olds: dict[torch.fx.Node, sympy.Expr], ev: _Evaluator,
                  node_of: dict, copies: dict[torch.fx.Node, torch.fx.Node], ns: int,
                  per_request: int) -> StepSite | None:
    """find_spec_step for one (num_seqs, T): new maps each state input to its new value read as
    (num_seqs, T), olds to its old value's expression there."""

    def inputs(expr: sympy.Expr, args: int, shape: tuple) -> list:
        return [f for f in expr.atoms(sympy.core.function.AppliedUndef)
                if len(f.args) == args and tuple(val(node_of[f.func]).shape) == shape]

    for pos, pv in new.items():
        old = olds[pos]
        accepted = inputs(sympy.expand(pv.pieces[0][2].subs(COL, 0) - old.subs(COL, 0) - 1), 1, (ns,))
        if len(accepted) != 1 or not _equal(pv, old + accepted[0] + 1):
            continue
        p = old + accepted[0] + 1
        same = [x for x in new if x is not pos]
        seq = next((x for x in same if _equal(new[x], p + 1)), None)
        if seq is None:
            continue
        for slot in same:
            e = new[slot].pieces[0][2].subs(COL, 0)
            sizes = {m.args[1] for m in e.atoms(sympy.Mod) if m.args[1].is_Integer and m.args[1] > 0}
            tables = {f.func for f in e.atoms(sympy.core.function.AppliedUndef) if len(f.args) == 2
                      and val(node_of[f.func]).shape[0] == ns and f.func is not ev.functions[pos]}
            found = next(((bs, table) for bs in sizes for table in tables if slot is not seq and _equal(
                new[slot], table(ROW, sympy.floor(p / bs)) * bs + sympy.Mod(p, bs))), None)
            if found is None:
                continue
            bs, table = found
            for tok in same:
                if tok in (seq, slot):
                    continue
                tv = new[tok]
                spec = inputs(tv.pieces[0][2].subs(COL, 1), 2, (ns, per_request - 1))
                if len(spec) != 1 or spec[0].args != (ROW, 0) or not all(
                        _same(e.subs(COL, j), spec[0].func(ROW, j - 1))
                        for _, _, e in tv.pieces for j in range(1, per_request)):
                    continue
                last = [e.subs(COL, 0) for _, _, e in tv.pieces]
                sampled = {f.func for e in last for f in inputs(e, 2, (ns, per_request))}
                if len(sampled) != 1:
                    continue
                (fn,) = sampled
                return StepSite(tokens=tok, sampled=node_of[fn], positions=pos, seq_lens=seq, slots=slot,
                                block_tables=node_of[table], num_seqs=ns, num_queries=ns, block_size=int(bs),
                                copies=[copies[x] for x in (tok, pos, seq, slot)], spec_token=node_of[spec[0].func],
                                accepted_num=node_of[accepted[0].func],
                                refused=_last_token_reason(last, fn, accepted[0], per_request))
    return None


def _dead_after(new_values: list[torch.fx.Node], copies: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """The nodes only the new values (and their copy-backs) use: dead once those are replaced."""
    dead = set(new_values) | set(copies)
    todo = list(new_values)
    while todo:
        for m in todo.pop().all_input_nodes:
            if m not in dead and m.op == "call_function" and not m.is_impure() and m.users and \
                    all(u in dead for u in m.users):
                dead.add(m)
                todo.append(m)
    return dead


def _placement(gm: torch.fx.GraphModule, step: StepSite) -> tuple[torch.fx.Node | None, str | None]:
    """Where the in-place op goes (before the first reader of a new value, or the first copy-back),
    or why it cannot go anywhere: a reader of a state tensor's old value after that point would
    read the updated one."""
    order = graph_order(gm.graph)
    new_values = [c.args[1] for c in step.copies]
    readers = [u for v in new_values for u in v.users if u not in step.copies and u.op != "output"]
    point = min(readers + step.copies, key=order.__getitem__)
    dead = _dead_after(new_values, step.copies)
    for state in (step.tokens, step.positions, step.seq_lens, step.slots):
        aliases = views_of(state)
        for alias in aliases:
            late = [u.name for u in alias.users if u not in dead and u not in aliases and u.op != "output"
                    and order[u] > order[point]]
            if late:
                return None, (f"{state.name}'s old value is read by {late} after its new value is first read "
                              f"(by {point.name}), where the in-place op would go")
    return point, None


def advance_step_to_fused(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> int:
    """Rewrite a graph's advance_step bookkeeping into npu_advance_step_flashattn (at most one per graph)."""
    step = find_step(gm) or find_spec_step(gm)
    if step is None:
        return 0
    speculative = step.spec_token is not None
    layer, source = node_location(step.copies[-1].args[1])
    site = Site(kind="advance_step", graph=ctx.graph_name, layer=layer, source=source,
                pattern=SPEC_PATTERN if speculative else PATTERN)
    report.sites.append(site)
    if step.refused:
        site.reason = step.refused
        return 0
    point, site.reason = _placement(gm, step)
    if point is None:
        return 0
    new_values = [c.args[1] for c in step.copies]
    rw = Rewrite(gm, point)
    kwargs = {"spec_token": step.spec_token, "accepted_num": step.accepted_num} if speculative else None
    try:
        with npu_rules(ctx.target == "ge"):
            rw.call(ADVANCE_STEP, (step.tokens, step.sampled, step.positions, step.seq_lens, step.slots,
                                   step.block_tables, step.num_seqs, step.num_queries, step.block_size), kwargs,
                    meta_from=step.copies[-1].args[1])
    except RewriteRefused as refused:
        rw.rollback()
        site.reason = str(refused)
        return 0
    rw.commit()
    for copy, target in zip(step.copies, (step.tokens, step.positions, step.seq_lens, step.slots)):
        # Readers of the new value (after the op) read the input, updated in place.
        copy.args[1].replace_all_uses_with(target, delete_user_cb=lambda user, copy=copy: user is not copy)
    for copy in step.copies:
        gm.graph.erase_node(copy)
    erase_dead(gm.graph, new_values)
    gm.graph.lint()
    gm.recompile()
    site.fused_op = "npu_advance_step_flashattn"
    site.layout = f"num_seqs={step.num_seqs}, num_queries={step.num_queries}, block_size={step.block_size}"
    if speculative:
        site.layout += f", spec_num={val(step.spec_token).shape[1]}"
    return 1
