"""Rule: a full sliding-window cache step (roll by one, write the last slot) ->
a shift GE can convert plus the fused writer.

transformers' StaticSlidingWindowLayer, once its W slots are full, writes a
decode token with::

    new = cache.roll(-1, dims=-2)
    new[:, :, index] = states          # index = tensor([-1]): the last slot
    cache.copy_(new)

After AOT: roll -> index_put -> (functional copy) -> copy_ back into the cache.

Pattern: roll(cache, -1) along one non-batch dim of a graph input or buffer,
whose only reader is a write of states at one or more positions of that
dim, and whose written value is copied back into the cache.

Rewrite: the roll becomes cat(cache[1:], cache[:1]) along that dim (exactly
what roll(-1) is, in ops TorchAir converts: aten.roll has no GE converter),
and the write becomes scatter_update_ into that fresh tensor (torch) or the
functional scatter_update (GE); the copy back stays.

This is sliding_window_cache="shift" (and "auto" in a graph that cannot hold
a ring): the cache keeps eager's order, so every full step still moves the
window by one slot, a copy of the cache. The ring (sliding_window_ring,
"ring", and "auto" where it can) writes slot position mod W instead, with no
move. The report's note says which, and for "auto" why a graph kept eager's
order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..report import Report, Site
from ._context import PassContext
from ._fx import CLAIMED, Rewrite, cache_root, is_call, val
from ._rules import Rule, RuleStats, apply_rules
from .registry import SCATTER_UPDATE
from .sliding_window_ring import (RING_NOTE, SlidingWindowRingError, fill_appends, order_unfused_reads, permute_ring_masks,
                                  ring_decode, ring_fill_value, unrotate_reads, window_inputs)
from .static_cache_update import ALLOCATIONS, SequenceWrite, _copy_back, fused_write, parse_write

aten = torch.ops.aten

SHIFT_NOTE = ("sliding window: each full step shifts the window by one slot (the shift and the copy back are two "
              "copies of the cache, as in eager; the cache keeps eager's order, which later calls and the caller read)")


@dataclass
class WindowStep:
    roll: torch.fx.Node
    cache: torch.fx.Node
    dim: int
    write: SequenceWrite
    copy_back: torch.fx.Node | None
    reason: str | None = None


def _single(x: object) -> object:
    if isinstance(x, (list, tuple)):
        return x[0] if len(x) == 1 else None
    return x


def match_roll(node: torch.fx.Node) -> WindowStep | None:
    cache = cache_root(node.args[0])
    shifts = _single(node.args[1])
    dims = _single(node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", ()))
    if shifts != -1 or dims is None or not isinstance(cache, torch.fx.Node) or cache.op != "placeholder":
        return None
    rank = val(cache).dim()
    dim = dims % rank
    if dim == 0 or not val(cache).dtype.is_floating_point or len(node.users) != 1:
        return None
    write = parse_write(next(iter(node.users)))
    if write is None or write.cache is not node or write.dim != dim:
        return None
    step = WindowStep(node, cache, dim, write, _copy_back(cache, write.node))
    if step.copy_back is None:
        step.reason = "the shifted window is not copied back into the cache (not a sliding-window cache step)"
    return step


def check_step(step: WindowStep, ctx: PassContext) -> str | None:
    reason = step.reason or step.write.start_reason
    if reason is not None and ctx.sliding_window_cache != "shift":
        # Left in eager's order, this window would disagree with the ring every other graph keeps.
        raise SlidingWindowRingError(f"sliding_window_cache='ring': the window step at {step.roll.name} cannot be "
                                     f"written as a ring: {reason}")
    return reason


def rewrite_step(rw: Rewrite, step: WindowStep, ctx: PassContext, site: Site) -> list[torch.fx.Node]:
    if ctx.sliding_window_cache != "shift":
        return ring_decode(rw, step, ctx, site)
    length = rw.size(step.cache, step.dim)
    tail = rw.call(aten.slice.Tensor, (step.cache, step.dim, 1, length))
    head = rw.call(aten.slice.Tensor, (step.cache, step.dim, 0, 1))
    shifted = rw.call(aten.cat.default, ([tail, head], step.dim))
    # The shifted tensor is new: the write can go into it in place (functional for GE).
    written = fused_write(rw, step.write, shifted, in_place=not ctx.functional_scatter_update)
    rw.replace(step.write.node, written)
    dead = [step.write.node, step.roll]
    for user in step.write.node.users:
        # self.copy_(new) functionalizes into copy(self, new): a second full copy of a value
        # that is already a fresh tensor of the cache's shape and dtype.
        if is_call(user, aten.copy.default) and user.args[1] is step.write.node and \
                tuple(val(user).shape) == tuple(val(written).shape) and val(user).dtype == val(written).dtype:
            rw.replace(user, written)
            dead.append(user)
    step.copy_back.meta[CLAIMED] = site
    site.fused_op = written.target.__name__.split(".")[0]
    site.layout = "BNSD" if val(step.cache).dim() == 4 and step.dim == 2 else f"axis {step.dim}"
    site.notes.append(SHIFT_NOTE)
    return dead


SLIDING_WINDOW_RULE = Rule(
    name="sliding-window-cache-write", kind="kv_update", anchors=(aten.roll.default,), match=match_roll,
    check=check_step, rewrite=rewrite_step, anchor_of=lambda step: step.write.node,
    claims=lambda step: [step.roll, step.write.node, *([step.copy_back] if step.copy_back is not None else [])],
    pattern_of=lambda step: f"roll(-1) + {step.write.pattern} (sliding window)")


@dataclass
class WindowFill:
    """cache.copy_(states[:, :, -W:]): the window takes the last W positions of
    new states (a prefill longer than the window, or several tokens once full)."""

    copy: torch.fx.Node  # copy_(cache, value), or copy(fresh cache, value)
    cache: torch.fx.Node
    value: torch.fx.Node  # the slice, cache-shaped
    dim: int
    # The cache is allocated in this graph (transformers' layers allocate lazily, in
    # the first call, the prefill): the functional copy into it is the write.
    fresh: bool = False


def match_fill(node: torch.fx.Node) -> WindowFill | None:
    cache, value = node.args[:2]
    fresh = is_call(node, aten.copy.default)
    if fresh and not is_call(cache, ALLOCATIONS):
        return None
    if not (isinstance(cache, torch.fx.Node) and (fresh or cache.op == "placeholder") and
            isinstance(value, torch.fx.Node)):
        return None
    v = val(cache)
    if not (isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.dim() >= 3):
        return None
    source = value.args[1] if not fresh and is_call(value, aten.copy.default) else value  # functional copy_
    if not is_call(source, aten.slice.Tensor) or tuple(val(source).shape) != tuple(v.shape):
        return None
    dim = source.args[1] % v.dim()
    if dim == 0:
        return None
    return WindowFill(node, cache, source, dim, fresh)


def rewrite_fill(rw: Rewrite, fill: WindowFill, ctx: PassContext, site: Site) -> list[torch.fx.Node]:
    # A prefill (the window's old content not read) writes eager's order in every mode: the
    # run-time layout guard rotates the window once, before the first ring step reads it.
    rotated = ctx.sliding_window_cache != "shift" and not fill.fresh and fill_appends(fill)
    value = ring_fill_value(rw, fill, ctx) if rotated else fill.value
    if rotated:
        site.notes.append(RING_NOTE)
    if val(value).dtype != val(fill.cache).dtype:
        value = rw.call(aten._to_copy.default, (value,), {"dtype": val(fill.cache).dtype})
    device = val(fill.cache).device
    zero = rw.call(aten.zeros.default, ([1],), {"dtype": torch.int64, "device": device})
    starts = rw.call(aten.expand.default, (zero, [rw.size(fill.cache, 0)]))
    axis = fill.dim - val(fill.cache).dim()
    if fill.fresh:  # the copy's result is the cache: the functional writer takes its place
        ctx.window_orders.new_windows = True
        written = rw.call(SCATTER_UPDATE.functional, (fill.cache, starts, value, axis))
        rw.replace(fill.copy, written)
        site.fused_op = "scatter_update"
        site.layout = "BNSD" if val(fill.cache).dim() == 4 and fill.dim == 2 else f"axis {fill.dim}"
        return [fill.copy]
    if ctx.functional_scatter_update:  # the functional writer, copied back (GE / Inductor write in place)
        written = rw.call(SCATTER_UPDATE.functional, (fill.cache, starts, value, axis))
        site.fused_op = "scatter_update"
        if rotated:  # the rotated value reads the slice: retarget the copy back itself
            source = fill.copy.args[1]
            fill.copy.update_arg(1, written)
            return [source, fill.value]
        rw.replace(fill.value, written)
        return [fill.value]
    rw.call(SCATTER_UPDATE.in_place, (fill.cache, starts, value, axis))
    fill.copy.meta["npu_attn_drop"] = True
    site.fused_op = "scatter_update_"
    site.layout = "BNSD" if val(fill.cache).dim() == 4 and fill.dim == 2 else f"axis {fill.dim}"
    return []


WINDOW_FILL_RULE = Rule(
    name="sliding-window-fill", kind="kv_update", anchors=(aten.copy_.default, aten.copy.default), match=match_fill,
    check=lambda fill, ctx: None, rewrite=rewrite_fill, anchor_of=lambda fill: fill.copy,
    claims=lambda fill: [fill.copy], pattern_of=lambda fill: "copy of the last W positions (sliding window fill)")


def sliding_window_cache_update(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    if ctx.sliding_window_cache != "auto":
        return _apply(gm, report, ctx)
    # auto: ring order where this graph can hold it; otherwise eager's order, with the reason
    if ctx.ring_untracked is not None:
        return _in_eager_order(gm, report, ctx, ctx.ring_untracked)
    if not window_inputs(gm, ctx):
        return _in_eager_order(gm, report, ctx, NO_TOKEN_COUNT)
    before, first_site = _graph_copy(gm.graph), len(report.sites)
    try:
        return _apply(gm, report, ctx)
    except SlidingWindowRingError as why:
        gm.graph = before
        del report.sites[first_site:]
        ctx.window_orders.ring.clear()
        return _in_eager_order(gm, report, ctx, str(why))


NO_TOKEN_COUNT = ("the layer's token count (cumulative_length_int) is not an input of this graph (dynamo "
                  "specialised it on a first compile), so the graph cannot know the ring's slot; a recompile with "
                  "the count as an input writes the ring")


def _in_eager_order(gm: torch.fx.GraphModule, report: Report, ctx: PassContext, why: str) -> RuleStats:
    first_site = len(report.sites)
    stats = _apply(gm, report, replace(ctx, sliding_window_cache="shift"))
    for site in report.sites[first_site:]:
        if site.pattern.startswith("roll(-1)"):  # a decode step (a prefill writes eager's order in every mode)
            site.notes.append(f"kept in eager's order (sliding_window_cache='auto'): {why}")
    return stats


def _apply(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    ring = ctx.sliding_window_cache != "shift"
    if ring:
        unrotate_reads(gm, ctx, is_window_step=lambda node: match_roll(node) is not None
                       if is_call(node, aten.roll.default) else False)
    stats = apply_rules(gm, (SLIDING_WINDOW_RULE, WINDOW_FILL_RULE), report, ctx)
    if ring:
        order_unfused_reads(gm)
        permute_ring_masks(gm)
    for node in list(gm.graph.nodes):
        if node.meta.pop("npu_attn_drop", False):
            gm.graph.erase_node(node)
    gm.recompile()
    return stats


def _graph_copy(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of the graph whose nodes have their own meta dicts (the ring attempt
    marks the nodes it visits)."""
    copy = torch.fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    values: dict[torch.fx.Node, torch.fx.Node] = {}
    out = copy.graph_copy(graph, values)
    copy.output(out).meta = dict(graph.output_node().meta)
    return copy
