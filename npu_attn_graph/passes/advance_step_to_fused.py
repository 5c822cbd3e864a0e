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

The speculative form (spec_token, accepted_num) is not matched: the op takes
each request's last token as the entry before the first -1 of its sampled row,
a search over the data, while a program spells it from accepted_num (e.g.
sampled.gather(1, accepted_num[:, None])); the two agree only when the
rejected entries are exactly a -1 suffix, which the graph cannot show.
"""

from __future__ import annotations

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

ROW = sympy.Symbol("i", integer=True, nonnegative=True)
COL = sympy.Symbol("j", integer=True, nonnegative=True)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


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


def _combine(a: _Rows, b: _Rows, op) -> list[tuple[int, int, sympy.Expr]]:
    cuts = sorted({0, a.rows} | {x for p in a.pieces + b.pieces for x in p[:2]})
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        ea = next(e for x, y, e in a.pieces if x <= lo < y)
        eb = next(e for x, y, e in b.pieces if x <= lo < y)
        out.append((lo, hi, op(ea, eb)))
    return out


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

    def rows(self, node: object) -> _Rows:
        if not isinstance(node, torch.fx.Node):
            raise _Unknown(f"{node!r}")
        if node not in self.memo:
            self.memo[node] = self._eval(node)
        return self.memo[node]

    def _eval(self, n: torch.fx.Node) -> _Rows:
        if isinstance(val(n), torch.Tensor) and val(n).dtype not in _INT_DTYPES:
            raise _Unknown(f"{n.name}: dtype {val(n).dtype}")
        rows, cols = _shape(n)
        a = n.args
        if n.op == "placeholder":
            fn = self.functions.setdefault(n, sympy.Function(f"in{len(self.functions)}"))
            return _Rows(rows, cols, ((0, rows, fn(ROW) if cols is None else fn(ROW, COL)),))
        if is_call(n, (aten.clone.default, aten.alias.default, aten._to_copy.default, aten.lift_fresh_copy.default,
                       prims.convert_element_type.default)):
            src = self.rows(a[0])
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
            if src.rows != rows or (src.cols not in (None, 1) and src.cols != cols) or (cols not in (None, 1)
                                                                                    and cols != src.cols):
                raise _Unknown(f"{n.name}: view {val(a[0]).shape} -> {val(n).shape}")
            return _Rows(rows, cols, tuple((x, y, e.subs(COL, 0)) for x, y, e in src.pieces))
        if is_call(n, (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.add.Scalar, aten.sub.Scalar,
                       aten.mul.Scalar)):
            alpha = n.kwargs.get("alpha", 1)
            left = self.rows(a[0])
            right = self.rows(a[1]) if isinstance(a[1], torch.fx.Node) and a[1].op != "get_attr" else \
                _Rows(left.rows, left.cols, ((0, left.rows, self.scalar(a[1])),))
            if (left.rows, left.cols) != (rows, cols) or (right.rows, right.cols) != (rows, cols):
                raise _Unknown(f"{n.name}: broadcast {val(a[0]).shape} with {getattr(val(a[1]), 'shape', '')}")
            if not isinstance(alpha, int):
                raise _Unknown(f"{n.name}: alpha {alpha}")
            ops = {"add": lambda x, y: x + alpha * y, "sub": lambda x, y: x - alpha * y, "mul": lambda x, y: x * y}
            return _Rows(rows, cols, tuple(_combine(left, right, ops[n.target.__name__.split(".")[0]])))
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
            pieces = _combine(_Rows(rows, cols, tuple(t.restrict(0, rows, 0))), idx,
                              lambda te, ie: te.subs(COL, ie.subs(COL, 0)))
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
            if t.cols is None or len(indices) != 2 or any(i is None for i in indices):
                raise _Unknown(f"{n.name}: index")
            first, second = self.rows(indices[0]), self.rows(indices[1])
            if (first.rows, first.cols, second.rows, second.cols) != (rows, None, rows, None) or \
                    len(t.pieces) != 1:
                raise _Unknown(f"{n.name}: index shapes")
            table_expr = t.pieces[0][2]
            return _Rows(rows, None, tuple(_combine(first, second, lambda r, c: table_expr.subs(
                {ROW: r, COL: c}, simultaneous=True))))
        if is_call(n, aten.copy.default):
            if isinstance(val(a[1]), torch.Tensor) and val(a[1]).dim() == 0:  # a constant broadcast into the rows
                return self.const(n, self.scalar(a[1]))
            src = self.rows(a[1])  # copy(dst, src): src's values, in dst's place
            if (src.rows, src.cols) != (rows, cols):
                raise _Unknown(f"{n.name}: copy broadcasts")
            return _Rows(rows, cols, src.pieces)
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
            if dim != 0 or step != 1 or not isinstance(start, int):
                raise _Unknown(f"{n.name}: slice_scatter {a[2:]}")
            lo = max(0, min(rows, start + rows if start < 0 else start))
            hi = rows if end is None else max(0, min(rows, end + rows if end < 0 else end))
            if src.rows != hi - lo:
                raise _Unknown(f"{n.name}: slice_scatter of {src.rows} rows into [{lo}, {hi})")
            pieces = base.restrict(0, lo, 0) + src.restrict(0, src.rows, lo) + base.restrict(hi, rows, hi)
            return _Rows(rows, cols, tuple(sorted(pieces, key=lambda p: p[0])))
        raise _Unknown(f"{n.name}: {n.target}")


def _piece_at(value: _Rows, lo: int, hi: int, want) -> bool:
    """Every piece over [lo, hi) equals want(ROW)."""
    covered = 0
    for a, b, e in value.pieces:
        a2, b2 = max(a, lo), min(b, hi)
        if a2 >= b2:
            continue
        if sympy.simplify(e - want) != 0:
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
        nq = next((b for a, b, e in seq_new.pieces if a == 0 and sympy.simplify(e - (s + 1)) == 0), None)
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
    step = find_step(gm)
    if step is None:
        return 0
    layer, source = node_location(step.copies[-1].args[1])
    site = Site(kind="advance_step", graph=ctx.graph_name, layer=layer, source=source, pattern=PATTERN)
    report.sites.append(site)
    point, site.reason = _placement(gm, step)
    if point is None:
        return 0
    new_values = [c.args[1] for c in step.copies]
    rw = Rewrite(gm, point)
    try:
        with npu_rules(ctx.target == "ge"):
            rw.call(ADVANCE_STEP, (step.tokens, step.sampled, step.positions, step.seq_lens, step.slots,
                                   step.block_tables, step.num_seqs, step.num_queries, step.block_size),
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
    return 1
