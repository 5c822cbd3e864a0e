"""Rules: static KV-cache writes -> the fused writer scatter_update(_).

transformers' StaticCache writes new keys/values with
``cache.index_copy_(2, positions, states)`` where positions = arange(S) + a
position counter; other code writes ``cache[:, :, positions] = states``
(index_put) or ``cache[:, :, p:p + S] = states`` (a slice assignment). After
AOT functionalization each is an out-of-place op (index_copy, index_put,
slice_scatter) whose result later code reads, plus, when the program mutated
a graph input or buffer, a ``copy_`` of the final value back into it.

Pattern: one of those writes into a graph input or buffer (the cache) along a
dim other than the batch dim 0, with states matching the cache elsewhere.

Check: the written positions are provably S contiguous ascending positions
from one start: ``arange(S) + offset`` (offset a scalar; ``torch.add``'s
alpha honoured), ``arange(a, b)``, a slice start (negative starts
normalised), or a single position. index_put wraps negative positions, so its
start is normalised at run time (positions that straddle the end, some
negative and some not, make the fused writer raise instead of writing both
ends); index_copy rejects them, as the writer does.

Rewrite, by what the program did:
- it wrote in place (the write's result reaches the copy_ back into the
  cache) and no alias of the old cache is read after the write:
  ``scatter_update_`` at the write, its readers read the cache, the copy_ is
  dropped. For GE graphs the functional ``scatter_update`` replaces the write
  and the copy_ stays: TorchAir turns the pair into one in-place GE Scatter;
- it wrote in place but the old cache is still read afterwards: the
  functional writer, the copy_ kept (noted in the report);
- it wrote out of place (``cache.index_copy(...)``): the functional writer,
  so the caller's tensor is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.operator_schemas import normalize_function

from ..report import Report, Site
from ._context import PassContext
from ._fx import CLAIMED, Rewrite, cache_root, is_call, is_view, static_int, val, views_of
from ._rules import Rule, RuleStats, apply_rules
from .registry import SCATTER_UPDATE

aten = torch.ops.aten
prims = torch.ops.prims

ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step, prims.iota.default)
WRITES = (aten.index_copy.default, aten.index_put.default, aten.slice_scatter.default)
# A cache the graph allocates itself (transformers' StaticCache initialises lazily,
# inside the first compiled call): nobody outside the graph sees it before the write.
ALLOCATIONS = (aten.zeros.default, aten.empty.memory_format, aten.full.default, aten.new_zeros.default,
               aten.new_empty.default, aten.new_full.default, aten.zeros_like.default, aten.empty_like.default,
               aten.full_like.default, aten.empty_strided.default)


@dataclass(frozen=True)
class Start:
    """The first written position: base + alpha * offset (offset a scalar tensor
    node, an int or a SymInt node, or None)."""

    base: int | torch.fx.Node = 0
    offset: object = None
    alpha: int = 1
    wraps: bool = False  # negative positions count from the end (index_put)


@dataclass
class SequenceWrite:
    node: torch.fx.Node
    cache: torch.fx.Node
    dim: int
    states: torch.fx.Node
    start: Start | None
    start_reason: str | None
    pattern: str
    copy_back: torch.fx.Node | None = None  # copy_(cache, final value), if the program wrote in place
    fresh: bool = False  # the cache is allocated in the graph: writing it in place is invisible outside
    broadcast_states: bool = False  # states broadcast to the written block (index_put's values)


# ----------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------


def _range_start(node: object) -> int | torch.fx.Node | None:
    """The start of a unit-step arange / iota node, else None."""
    if not is_call(node, ARANGES):
        return None
    if node.target is aten.arange.default:
        return 0
    if node.target is prims.iota.default:
        return node.kwargs.get("start", 0) if node.kwargs.get("step", 1) == 1 else None
    step = node.args[2] if len(node.args) > 2 else node.kwargs.get("step", 1)
    return node.args[0] if step == 1 else None


def _scalar_offset(node: object) -> bool:
    """A scalar offset: a Python/Sym int, or a tensor of one element."""
    if isinstance(node, int):
        return True
    v = val(node)
    if isinstance(v, torch.SymInt):
        return True
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and (
        v.dim() == 0 or (v.dim() == 1 and statically_known_true(v.shape[0] == 1)))


def contiguous_start(positions: torch.fx.Node, wraps: bool) -> tuple[Start | None, str | None]:
    """(Start, None) when positions are start + [0, 1, ..., S-1], else (None, reason)."""
    v = val(positions)
    if v.dim() != 1:
        return None, f"positions of rank {v.dim()} (needs 1-D)"
    if statically_known_true(v.shape[0] == 1):
        return Start(offset=positions, wraps=wraps), None  # one position
    base = _range_start(positions)
    if base is not None:
        return Start(base=base, wraps=wraps), None
    if is_call(positions, (aten.add.Tensor, aten.add.Scalar)):
        a, b = positions.args[:2]
        alpha = positions.kwargs.get("alpha", positions.args[2] if len(positions.args) > 2 else 1)
        for ranged, offset, offset_alpha in ((a, b, alpha), (b, a, None)):
            start = _range_start(ranged)
            if start is None:
                continue
            if offset_alpha is None and alpha != 1:
                return None, f"positions {positions.name}: alpha={alpha} scales the arange itself"
            if not _scalar_offset(offset):
                return None, (f"positions {positions.name} = arange + {getattr(offset, 'name', offset)} of shape "
                              f"{tuple(val(offset).shape) if val(offset) is not None else ()} (needs a scalar offset)")
            if not isinstance(offset_alpha if offset_alpha is not None else 1, int):
                return None, f"positions {positions.name}: non-integer alpha {alpha}"
            return Start(base=start, offset=offset, alpha=offset_alpha if offset_alpha is not None else 1,
                         wraps=wraps), None
    return None, f"positions {positions.name} ({getattr(positions.target, '__name__', positions.op)}) are not " \
                 "provably contiguous (arange + a scalar offset)"


def _slice_start(start: object, end: object, size: object, width: object) -> tuple[Start | None, str | None]:
    """Python slice semantics for a step-1 slice_scatter start."""
    if start is None:
        start = 0
    if isinstance(start, torch.fx.Node):
        start_val = val(start)
    else:
        start_val = start
    if statically_known_true(start_val >= 0):
        return Start(base=start), None
    if statically_known_true(start_val < 0) and isinstance(start, int):
        normalized = start + size
        if isinstance(normalized, int) or static_int(normalized) is not None:
            return Start(base=max(0, int(normalized))), None
        return None, f"slice start {start} of a symbolic cache length {size}"
    return None, f"slice start {start_val} may be negative"


# ----------------------------------------------------------------------------
# Pattern
# ----------------------------------------------------------------------------


def _copy_back(cache: torch.fx.Node, write: torch.fx.Node) -> torch.fx.Node | None:
    """copy_(cache, X) where X is the write's result, or a later same-shape update of it."""
    for user in cache.users:
        if not (is_call(user, aten.copy_.default) and user.args[0] is cache):
            continue
        node = user.args[1]
        while isinstance(node, torch.fx.Node):
            if node is write:
                return user
            if is_call(node, aten.copy.default):  # functional self.copy_(new): its value is the source
                node = node.args[1]
                continue
            if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node) or \
                    val(node) is None or tuple(val(node).shape) != tuple(val(write).shape):
                break
            node = node.args[0]
    return None


def parse_write(node: torch.fx.Node) -> SequenceWrite | None:
    """The write `node` makes into its first argument (whatever that is), or None
    when it is not a write of states at positions along one non-batch dim."""
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    kw = normalized.kwargs
    cache = cache_root(kw.get("input", kw.get("self")))
    if not isinstance(cache, torch.fx.Node) or not isinstance(val(cache), torch.Tensor):
        return None
    rank = val(cache).dim()
    broadcast_states = False
    if node.target is aten.index_copy.default:
        dim, states = kw["dim"] % rank, kw["source"]
        start, reason = contiguous_start(kw["index"], wraps=False)
        pattern = "index_copy"
    elif node.target is aten.index_put.default:
        indices, states = list(kw["indices"]), kw["values"]
        if kw.get("accumulate", False):
            return None
        given = [i for i, x in enumerate(indices) if x is not None]
        if len(given) != 1 or given[0] == 0 or val(indices[given[0]]).dtype in (torch.bool, torch.uint8):
            return None  # not cache[:, ..., positions] = states
        dim = given[0]
        start, reason = contiguous_start(indices[dim], wraps=True)
        pattern = "index_put"
        broadcast_states = True  # index_put's values only broadcast to the indexed shape
    else:
        if kw.get("step", 1) != 1:
            return None
        dim, states = kw.get("dim", 0) % rank, kw["src"]
        start, reason = _slice_start(kw.get("start"), kw.get("end"), val(cache).shape[dim], val(states).shape[dim])
        pattern = "slice_scatter"
    if dim == 0:
        return None  # along the batch dim: not a sequence write
    return SequenceWrite(node, cache, dim, states, start, reason, pattern, broadcast_states=broadcast_states)


def match_write(node: torch.fx.Node) -> SequenceWrite | None:
    """A write into a graph input or buffer, or into a cache the graph allocates."""
    write = parse_write(node)
    if write is None:
        return None
    cache = write.cache
    write.fresh = is_call(cache, ALLOCATIONS)
    if cache.op != "placeholder" and not (write.fresh and val(cache).dtype.is_floating_point and val(cache).dim() >= 3):
        return None
    if write.fresh:
        write.pattern += " (cache allocated in the graph)"
    else:
        write.copy_back = _copy_back(cache, node)
        if write.copy_back is None:
            write.pattern += " (out of place)"
    return write


# ----------------------------------------------------------------------------
# Check
# ----------------------------------------------------------------------------


def check_write(write: SequenceWrite, ctx: PassContext) -> str | None:
    cache_shape, states_shape = val(write.cache).shape, val(write.states).shape
    if len(states_shape) != len(cache_shape) and not write.broadcast_states:
        return f"states of shape {tuple(states_shape)} do not match the cache {tuple(cache_shape)}"
    return write.start_reason


def _old_cache_read_after(write: SequenceWrite) -> str | None:
    """Why the cache cannot be written in place at `write`: something reads its
    old value (directly or through a view) later, or reads the written value after
    the next change of the cache."""
    # Nodes compare by their place in the graph (fx keeps a sort key per node): no
    # index of the whole graph per write, which made the pass quadratic in layers.
    at = write.node
    aliases = views_of(write.cache) - {write.copy_back}
    for alias in aliases:
        if alias is not write.cache and alias > at:
            return f"{alias.name} views the cache after the write"
        for user in alias.users:
            if user is write.node or user is write.copy_back or user in aliases:
                continue
            if user > at:
                return f"{user.name} reads the cache's old value after the write"
    if write.copy_back is not None and write.copy_back.args[1] is not write.node:
        nxt = [u for u in write.node.users if u.op == "call_function" and u.args and u.args[0] is write.node
               and val(u) is not None and tuple(val(u).shape) == tuple(val(write.node).shape)]
        limit = min(nxt, default=write.copy_back)
        for alias in views_of(write.node):
            for user in alias.users:
                if user not in nxt and not is_view(user) and user > limit:
                    return f"{user.name} reads the written cache after it changes again"
    return None


# ----------------------------------------------------------------------------
# Rewrite
# ----------------------------------------------------------------------------


def _starts(rw: Rewrite, write: SequenceWrite) -> torch.fx.Node:
    """scatter_update's per-batch start offsets: int64 (B,), all the same."""
    start = write.start
    cache = write.cache
    device = val(cache).device
    parts = []
    if start.offset is not None:
        offset = start.offset
        if isinstance(offset, torch.fx.Node) and isinstance(val(offset), torch.Tensor):
            offset = rw.call(aten.reshape.default, (offset, [1]))
            if val(offset).dtype != torch.int64:
                offset = rw.call(aten._to_copy.default, (offset,), {"dtype": torch.int64})
        else:
            offset = rw.call(aten.full.default, ([1], offset), {"dtype": torch.int64, "device": device})
        if start.alpha != 1:
            offset = rw.call(aten.mul.Tensor, (offset, start.alpha))
        parts.append(offset)
    if not (isinstance(start.base, int) and start.base == 0):
        base = rw.call(aten.full.default, ([1], start.base), {"dtype": torch.int64, "device": device})
        parts.append(base)
    if not parts:
        first = rw.call(aten.zeros.default, ([1],), {"dtype": torch.int64, "device": device})
    elif len(parts) == 1:
        first = parts[0]
    else:
        first = rw.call(aten.add.Tensor, tuple(parts))
    if start.wraps:  # index_put: a negative position counts from the end
        first = rw.call(aten.remainder.Scalar, (first, rw.size(cache, write.dim)))
    return rw.call(aten.expand.default, (first, [rw.size(cache, 0)]))


def fused_write(rw: Rewrite, write: SequenceWrite, cache: torch.fx.Node, in_place: bool) -> torch.fx.Node:
    """scatter_update(_) of the write's states into `cache` at the write's start."""
    starts = _starts(rw, write)
    states = write.states
    if write.broadcast_states:  # the block index_put writes: the cache's shape, positions along dim
        block = rw.sizes(cache)
        block[write.dim] = rw.size(write.node.args[1][write.dim], 0)
        states = rw.call(aten.expand.default, (states, block))
    writer = SCATTER_UPDATE.in_place if in_place else SCATTER_UPDATE.functional
    return rw.call(writer, (cache, starts, states, write.dim - val(cache).dim()))


def rewrite_write(rw: Rewrite, write: SequenceWrite, ctx: PassContext, site: Site) -> list[torch.fx.Node]:
    in_place_reason = None
    if write.copy_back is None and not write.fresh:
        in_place = False  # out of place: the caller's tensor must not change
    elif ctx.functional_scatter_update:
        in_place = False  # GE: TorchAir makes the functional writer + copy_ one in-place write; Inductor: a mutation
    else:
        in_place_reason = _old_cache_read_after(write)
        in_place = in_place_reason is None
    written = fused_write(rw, write, write.cache, in_place)
    rw.replace(write.node, written)
    dead = [write.node]
    if in_place and write.copy_back is not None:
        if write.copy_back.args[1] is write.node:
            dead.append(write.copy_back)  # the cache is already written in place
            write.copy_back.meta["npu_attn_drop"] = True
    if write.copy_back is not None:
        write.copy_back.meta[CLAIMED] = site
    if in_place_reason is not None:
        site.notes.append(f"functional writer, the copy back into the cache kept: {in_place_reason}")
    site.fused_op = written.target.__name__.split(".")[0]
    site.layout = "BNSD" if val(write.cache).dim() == 4 and write.dim == 2 else f"axis {write.dim}"
    return dead


def _erase_dropped_copies(gm: torch.fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.meta.pop("npu_attn_drop", False):
            gm.graph.erase_node(node)


STATIC_WRITE_RULE = Rule(
    name="static-cache-write", kind="kv_update", anchors=WRITES, match=match_write, check=check_write,
    rewrite=rewrite_write, anchor_of=lambda w: w.node,
    claims=lambda w: [w.node, *([w.copy_back] if w.copy_back is not None else [])],
    pattern_of=lambda w: w.pattern)


def static_cache_update(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    stats = apply_rules(gm, (STATIC_WRITE_RULE,), report, ctx)
    _erase_dropped_copies(gm)
    gm.recompile()
    return stats
