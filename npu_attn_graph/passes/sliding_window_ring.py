"""Ring-buffer sliding-window caches: `sliding_window_cache="ring"`, and "auto" (the
default) in every graph that can hold one.

transformers' StaticSlidingWindowLayer keeps the last W tokens in eager order:
once full, every decode step rolls the whole window left by one slot and
writes the new token into the last slot (two copies of the cache per step,
the "shift" form keeps them). In ring form
the token at position p lives in slot p mod W instead, and a full decode step
writes that one slot in place:

- decode step, window full (seen = tokens cached before the step, seen >= W):
  scatter_update of the new K/V at slot seen mod W. The attention that reads
  the cache sees the window rotated; attention does not depend on the order
  of the keys as long as the mask moves with them, so each fused attention op
  reading the ring caches gets its mask's key axis permuted the same way
  (ring slot j holds eager slot (j - seen - 1) mod W). Only ops whose other
  arguments carry no key order are accepted (no pse_shift, no KV lengths, one
  query token);
- several tokens into a full window: they read it un-rotated (below) and write
  their last W values rotated, value k into slot (seen + n + k) mod W, n the
  number of new tokens. A prefill (the window's old content not read) writes
  eager's order; ring_layout rotates the window once before the first ring step;
- other ops reading a decode-written window (an attention left unfused) read
  it as it is when _key_order proves their result does not depend on the key
  order, with what meets the key axis from outside (the mask) permuted; else
  un-rotated through a gather;
- any other read of a full window (several tokens appended to it read the
  window in eager order) reads it un-rotated: index_select by
  (k + seen) mod W, a copy, but not on the decode path;
- while the window is not full, slot = position already: nothing changes.

`seen` is the layer's own `cumulative_length_int`, the Python int the layer
branches on; dynamo makes it a symbolic graph input once it changes between
calls. The rule finds it through dynamo's input sources (the same layer's
`.keys` / `.values` and `.cumulative_length_int`) and decides "full" from the
guards (seen >= W statically known).

The cache tensors are then not in eager's order. Every graph of the compiled
model agrees (every sliding write of a ring graph is rewritten in ring form or
SlidingWindowRingError is raised: "ring" lets it fail the compile, "auto" keeps
that graph in eager's order), and the backend's run-time guard (ring_layout)
rotates a window between the two orders where a graph needs the other one, and
raises where eager code wrote a ring. Use `window_in_eager_order` to read a ring
cache in eager order.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._context import PassContext
from ._fx import CLAIMED, insert_call, is_call, val
from ._key_order import KeyOrderUnproven, key_order_region
from .registry import ATTENTION_OPS, SCATTER_UPDATE

aten = torch.ops.aten

RING_NOTE = ("ring buffer: the token at position p is written into slot p mod W, "
             "no shift of the window; the cache tensors hold the window rotated (window_in_eager_order reads them "
             "in eager order)")
RING_ATTENTION = "npu_attn_ring_attention"  # meta: fused attention op -> {arg index: seen node}
RING_UNFUSED = "npu_attn_ring_unfused"  # meta: a decode-written window other ops read -> (seen, W, dim, site)


class SlidingWindowRingError(ValueError):
    """sliding_window_cache='ring' cannot keep every write of a window in ring form."""


def window_in_eager_order(window: torch.Tensor, seen_tokens: int, dim: int = -2) -> torch.Tensor:
    """A ring-mode sliding-window cache tensor (W slots along `dim`) in the order
    transformers' eager layer keeps it, given the tokens the layer has seen
    (`layer.cumulative_length_int`)."""
    if not isinstance(window, torch.Tensor):
        raise TypeError(f"window_in_eager_order: window must be a tensor, got {type(window).__name__}")
    if not isinstance(seen_tokens, int) or seen_tokens < 0:
        raise ValueError(f"window_in_eager_order: seen_tokens must be an int >= 0, got {seen_tokens!r}")
    slots = window.shape[dim]
    if seen_tokens < slots:
        return window
    order = (torch.arange(slots, device=window.device) + seen_tokens) % slots
    return window.index_select(dim, order)


# ----------------------------------------------------------------------------
# The layer's token count
# ----------------------------------------------------------------------------


def _placeholder_sources(gm: torch.fx.GraphModule, ctx: PassContext) -> dict[torch.fx.Node, str]:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(ctx.input_sources):
        return {}
    return {p: s for p, s in zip(placeholders, ctx.input_sources) if s}


def token_count_source(source: str | None) -> str | None:
    """dynamo's source of a layer window (`X.keys` / `X.values`) -> the source of the
    same layer's token count (`X.cumulative_length_int`); None for any other source."""
    for suffix in (".keys", ".values"):
        if source and source.endswith(suffix):
            return source[: -len(suffix)] + ".cumulative_length_int"
    return None


def seen_tokens(gm: torch.fx.GraphModule, ctx: PassContext, cache: torch.fx.Node) -> torch.fx.Node | None:
    """The graph input holding `cache`'s layer's cumulative_length_int (a SymInt),
    found through dynamo's sources (token_count_source)."""
    sources = _placeholder_sources(gm, ctx)
    wanted = token_count_source(sources.get(cache))
    if wanted is None:
        return None
    return next((p for p, s in sources.items() if s == wanted and isinstance(val(p), torch.SymInt)), None)


def window_inputs(gm: torch.fx.GraphModule, ctx: PassContext) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(window, its layer's token count) for each layer window input of the graph
    whose token count is a graph input: the windows a ring can hold."""
    found = []
    for cache, source in _placeholder_sources(gm, ctx).items():
        if token_count_source(source) is not None and isinstance(val(cache), torch.Tensor):
            seen = seen_tokens(gm, ctx, cache)
            if seen is not None:
                found.append((cache, seen))
    return found


def _slots(cache: torch.fx.Node, dim: int) -> int:
    slots = val(cache).shape[dim]
    if not isinstance(slots, int):
        raise SlidingWindowRingError(f"sliding_window_cache='ring': the window of {cache.name} has a symbolic "
                                     f"size {slots} along dim {dim}; a ring needs a static window")
    return slots


def _where(node: torch.fx.Node) -> str:
    """The node's name and its program line, for errors."""
    source = node.meta.get("stack_trace", "").strip().splitlines()
    return f"{node.name}" + (f" ({source[-2].strip()})" if len(source) >= 2 else "")


def require_seen(gm: torch.fx.GraphModule, ctx: PassContext, cache: torch.fx.Node, what: str) -> torch.fx.Node:
    seen = seen_tokens(gm, ctx, cache)
    if seen is None:
        raise SlidingWindowRingError(
            f"sliding_window_cache='ring': {what} into the window {_where(cache)} needs the layer's token count "
            f"(transformers' StaticSlidingWindowLayer.cumulative_length_int) as a symbolic graph input, and this "
            f"graph has none (dynamo sources: {len(ctx.input_sources)} for "
            f"{len(list(gm.graph.find_nodes(op='placeholder')))} inputs). Compile without dynamic=False, or use "
            f"sliding_window_cache='shift'")
    return seen


def _guarded(condition: object) -> bool:
    """condition is statically true, or is (after the shape env's substitutions)
    one of the guards dynamo recorded for this graph: it holds whenever the graph runs."""
    if statically_known_true(condition):
        return True
    if not isinstance(condition, torch.SymBool):
        return False
    env = condition.node.shape_env
    wanted = env.simplify(condition.node.expr)
    return any(env.simplify(guard.expr) == wanted for guard in env.guards)


def _window_lengths(count: torch.SymInt) -> list:
    """Symbols for the same layer's `max_cache_len` (symbolic when the graph was traced
    with dynamic=True): transformers' layer allocates its window with that many slots,
    so `seen >= max_cache_len` is its "full" test."""
    env = count.node.shape_env
    sources = getattr(env, "var_to_sources", {})
    names = [s.name for s in sources.get(count.node.expr, [])]
    layers = {n[: -len(".cumulative_length_int")] for n in names if n.endswith(".cumulative_length_int")}
    return [symbol for symbol, found in sources.items()
            if any(f.name in {layer + ".max_cache_len" for layer in layers} for f in found)]


def window_is_full(seen: torch.fx.Node, slots: int) -> bool | None:
    """True / False when the guards decide seen >= slots, else None."""
    count = val(seen)
    env = count.node.shape_env
    if _guarded(count >= slots):
        return True
    if _guarded(count < slots):
        return False
    for length in _window_lengths(count):
        full, filling = count.node.expr >= length, count.node.expr < length
        guards = {env.simplify(g.expr) for g in env.guards}
        if env.simplify(full) in guards:
            return True
        if env.simplify(filling) in guards:
            return False
    return None


# ----------------------------------------------------------------------------
# Index vectors (small int64 tensors; GE converts arange / add / remainder)
# ----------------------------------------------------------------------------


def _int_tensor(rw, x: int | torch.fx.Node, device: torch.device) -> torch.fx.Node:
    """A 0-d int64 tensor of an int, a SymInt node, or an int tensor node as it is."""
    if isinstance(x, torch.fx.Node) and isinstance(val(x), torch.Tensor):
        return x
    return rw.call(aten.scalar_tensor.default, (x,), {"dtype": torch.int64, "device": device})


def _rotation(rw, slots: int, shift: torch.fx.Node, device: torch.device) -> torch.fx.Node:
    """(arange(slots) + shift) mod slots, shift a 0-d int64 tensor."""
    index = rw.call(aten.arange.start_step, (0, slots, 1), {"dtype": torch.int64, "device": device})
    return rw.call(aten.remainder.Tensor, (rw.call(aten.add.Tensor, (index, shift)), _int_tensor(rw, slots, device)))


# ----------------------------------------------------------------------------
# Rewrites
# ----------------------------------------------------------------------------


def _ring_operand(reader: torch.fx.Node, copies: list[torch.fx.Node]) -> bool:
    """reader is a fused attention op reading the window only as its key or value."""
    op = ATTENTION_OPS.get(reader.target) if reader.op == "call_function" else None
    if op is None:
        return False
    at = {i for i, a in enumerate(reader.args) if any(a is c for c in copies)}
    in_kwargs = any(any(v is c for c in copies) for v in reader.kwargs.values())
    return bool(at) and at <= {op.key_arg, op.value_arg} and not in_kwargs


def ring_decode(rw, step, ctx: PassContext, site) -> list[torch.fx.Node]:
    """A full decode step: the new K/V into slot seen mod W, in place; the fused
    attention ops reading the window are recorded for their mask permutation."""
    gm = rw.gm
    slots = _slots(step.cache, step.dim)
    seen = require_seen(gm, ctx, step.cache, "a decode step")
    if window_is_full(seen, slots) is not True:
        raise SlidingWindowRingError(f"sliding_window_cache='ring': the window {_where(step.cache)} is shifted in "
                                     f"a graph whose guards do not say it is full ({val(seen)} >= {slots})")
    write = step.write
    index = write.node.args[1][write.dim] if is_call(write.node, aten.index_put.default) else None
    if index is None or val(index).numel() != 1:
        raise SlidingWindowRingError(f"sliding_window_cache='ring': the shifted window {_where(step.cache)} is "
                                     f"written with {write.pattern}, not one index_put of one token")
    # Who reads the written window: the functional copy back, then the attention ops.
    copies = [u for u in write.node.users if is_call(u, aten.copy.default) and u.args[1] is write.node]
    others = [u for u in write.node.users if u not in copies and u is not step.copy_back]
    if others:
        raise SlidingWindowRingError(f"sliding_window_cache='ring': the shifted window {_where(step.cache)} is "
                                     f"read by {[u.name for u in others]}, which would see the ring's order")
    readers: list[torch.fx.Node] = []
    for copy in copies:
        readers += [u for u in copy.users if u is not step.copy_back]
    fused = [r for r in readers if _ring_operand(r, copies)]
    plain = [r for r in readers if r not in fused]
    device = val(step.cache).device
    batch = rw.size(step.cache, 0)
    slot = rw.call(aten.remainder.Tensor, (
        rw.call(aten.full.default, ([batch], seen), {"dtype": torch.int64, "device": device}),
        rw.call(aten.scalar_tensor.default, (slots,), {"dtype": torch.int64, "device": device})))
    block = rw.sizes(step.cache)
    block[step.dim] = 1
    states = rw.call(aten.expand.default, (write.states, block))
    axis = step.dim - val(step.cache).dim()
    in_place = not ctx.functional_scatter_update
    writer = SCATTER_UPDATE.in_place if in_place else SCATTER_UPDATE.functional
    written = rw.call(writer, (step.cache, slot, states, axis))
    if plain:  # after the rules: read in ring order where provable, else un-rotated (order_unfused_reads)
        written.meta[RING_UNFUSED] = (seen, slots, step.dim, site)
    for copy in copies:
        rw.replace(copy, written)
    rw.replace(write.node, written)
    dead = [write.node, step.roll, *copies]
    if in_place:  # the cache is written: its copy back onto itself goes
        step.copy_back.meta["npu_attn_drop"] = True
    step.copy_back.meta[CLAIMED] = site  # GE: the copy back stays, part of this write
    for reader in fused:
        reader.meta.setdefault(RING_ATTENTION, {}).update(
            {i: (seen, slots) for i, a in enumerate(reader.args) if any(a is c for c in copies)})
    site.fused_op = writer.__name__.split(".")[0]
    site.layout = "BNSD" if val(step.cache).dim() == 4 and step.dim == 2 else f"axis {step.dim}"
    site.notes.append(RING_NOTE)
    mark_ring(gm, ctx, step.cache)
    return dead


def _reads_window(node: object, cache: torch.fx.Node) -> bool:
    """node is the window, or a slice / un-rotated view of it."""
    while isinstance(node, torch.fx.Node):
        if node is cache:
            return True
        if not is_call(node, (aten.slice.Tensor, aten.index_select.default)):
            return False
        node = node.args[0]
    return False


def fill_appends(fill) -> bool:
    """The fill's value is cat(window[...], new states): tokens appended to what the
    window holds (several tokens into a full window). Otherwise the window's old
    content is not read: transformers' prefill path, taken only when seen == 0."""
    full = fill.value.args[0]
    return is_call(full, aten.cat.default) and len(full.args[0]) == 2 and \
        (full.args[1] if len(full.args) > 1 else 0) % val(full).dim() == fill.dim and \
        _reads_window(full.args[0][0], fill.cache)


def ring_fill_value(rw, fill, ctx: PassContext) -> torch.fx.Node:
    """The last W positions of new states appended to a window (fill_appends), rotated
    into their ring slots: value k (position seen + n - W + k) goes to slot
    (seen + n + k) mod W, so slot j takes value (j - seen - n) mod W."""
    slots = _slots(fill.cache, fill.dim)
    new = fill.value.args[0].args[0][1]
    device = val(fill.cache).device
    seen = require_seen(rw.gm, ctx, fill.cache, "a write of several tokens")
    offset = rw.call(aten.add.Tensor, (_int_tensor(rw, rw.size(new, fill.dim), device), _int_tensor(rw, seen, device)))
    order = _rotation(rw, slots, rw.call(aten.neg.default, (offset,)), device)
    mark_ring(rw.gm, ctx, fill.cache)
    return rw.call(aten.index_select.default, (fill.value, fill.dim, order))


def mark_ring(gm: torch.fx.GraphModule, ctx: PassContext, cache: torch.fx.Node) -> None:
    """Record that this graph reads and writes `cache` in ring order (for the
    backend's run-time layout guard, ring_layout)."""
    source = _placeholder_sources(gm, ctx).get(cache)
    if source is not None:
        ctx.window_orders.ring.add(source)


def _insert_order(gm: torch.fx.GraphModule, before: torch.fx.Node, slots: int, seen: torch.fx.Node, sign: int,
                  extra: int, device: torch.device) -> torch.fx.Node:
    """(arange(slots) + sign * seen + extra) mod slots, inserted before `before` (outside a
    Rewrite: the passes that call it have already committed to the ring)."""
    def add(target, args, kwargs=None):
        return insert_call(gm, target, args, kwargs, before=before)

    index = add(aten.arange.start_step, (0, slots, 1), {"dtype": torch.int64, "device": device})
    count = add(aten.scalar_tensor.default, (seen,), {"dtype": torch.int64, "device": device})
    shifted = add(aten.add.Tensor if sign > 0 else aten.sub.Tensor, (index, count))
    if extra:
        shifted = add(aten.add.Tensor, (shifted, extra))
    modulus = add(aten.scalar_tensor.default, (slots,), {"dtype": torch.int64, "device": device})
    return add(aten.remainder.Tensor, (shifted, modulus))


def _read_in_eager_order(gm: torch.fx.GraphModule, window: torch.fx.Node, readers: list[torch.fx.Node],
                         seen: torch.fx.Node, slots: int, dim: int, extra: int) -> None:
    """`readers` read `window` un-rotated: eager slot k is ring slot (k + seen + extra) mod W
    (extra 1 once this step's token is written), gathered before the first of them."""
    first = min(readers)  # fx nodes compare by their place in the graph
    order = _insert_order(gm, first, slots, seen, sign=1, extra=extra, device=val(window).device)
    eager = insert_call(gm, aten.index_select.default, (window, dim, order), before=first)
    for reader in readers:
        reader.replace_input_with(window, eager)


def unrotate_reads(gm: torch.fx.GraphModule, ctx: PassContext, is_window_step) -> None:
    """Before the rules: in a graph where a ring window is full, every read of it
    other than a decode step's shift (and the writes into it) reads it un-rotated."""
    for cache, source in _placeholder_sources(gm, ctx).items():
        if token_count_source(source) is None or val(cache).dim() != 4:
            continue
        seen = seen_tokens(gm, ctx, cache)
        if seen is None:
            continue
        slots = _slots(cache, 2)
        full = window_is_full(seen, slots)
        if full is False:
            continue  # slot = position while the window fills: both orders agree
        reads = [u for u in cache.users if not is_window_step(u) and
                 not (is_call(u, (aten.copy_.default, aten.copy.default)) and u.args[0] is cache)]
        if not reads:
            continue
        if full is None:
            raise SlidingWindowRingError(f"sliding_window_cache='ring': {_where(cache)} is read in a graph whose "
                                         f"guards do not decide whether the window is full ({val(seen)} >= {slots})")
        _read_in_eager_order(gm, cache, reads, seen, slots, dim=2, extra=0)
        mark_ring(gm, ctx, cache)


def permute_ring_masks(gm: torch.fx.GraphModule) -> None:
    """After the rules: each fused attention op reading ring windows gets its
    mask's key axis in ring order. Its key and value must both be ring windows
    of the same token count."""
    for op_node in list(gm.graph.nodes):
        ring = op_node.meta.pop(RING_ATTENTION, None)
        if ring is None:
            continue
        op = ATTENTION_OPS[op_node.target]
        counts = {ring.get(op.key_arg, (None,))[0], ring.get(op.value_arg, (None,))[0]}
        at = _where(op_node)
        if len(counts) != 1 or None in counts:
            raise SlidingWindowRingError(f"sliding_window_cache='ring': attention {at} reads a ring window as only "
                                         f"one of its key and value; the other would be in another order")
        seen, slots = ring[op.key_arg]
        kw = op_node.kwargs
        for name in ("actual_seq_lengths", "actual_seq_lengths_kv", "block_table",
                     "antiquant_scale", "key_antiquant_scale", "kv_padding_size"):
            if kw.get(name) is not None:
                raise SlidingWindowRingError(f"sliding_window_cache='ring': attention {at} takes {name}, which "
                                             f"follows the key order of the window")
        query = val(op_node.args[0])
        layout = kw.get("input_layout", "BSH")
        seq_dim = 2 if layout.startswith("BNSD") else 1
        if not statically_known_true(query.shape[seq_dim] == 1):
            raise SlidingWindowRingError(f"sliding_window_cache='ring': attention {at} has {query.shape[seq_dim]} "
                                         f"query tokens over a ring window; only decode steps (one) read it")
        for name in ("atten_mask", "pse_shift"):  # the arguments indexed by key: moved with the keys
            mask = kw.get(name)
            if mask is None or val(mask).shape[-1] == 1:
                continue
            if val(mask).shape[-1] != slots:
                raise SlidingWindowRingError(f"sliding_window_cache='ring': attention {at} has a {name} over "
                                             f"{val(mask).shape[-1]} keys for a window of {slots}")
            # ring slot j holds eager slot (j - seen - 1) mod W
            order = _insert_order(gm, op_node, slots, seen, sign=-1, extra=-1, device=val(mask).device)
            permuted = insert_call(gm, aten.index_select.default, (mask, val(mask).dim() - 1, order), before=op_node)
            op_node.update_kwarg(name, permuted)


def order_unfused_reads(gm: torch.fx.GraphModule) -> None:
    """After the rules: ops other than a fused attention op that read a decode-written
    window (an attention left unfused, e.g. Gemma2's softcap). Where every such read
    provably does not depend on the key order (_key_order: views, element-wise math,
    softmax, the contraction with the values), they read the ring as it is and the
    tensors they meet along the key axis (the mask) are permuted into ring order;
    otherwise each window is read un-rotated, a gather of the window per step."""
    windows = [n for n in gm.graph.nodes if RING_UNFUSED in n.meta]
    if not windows:
        return
    info = {n: n.meta.pop(RING_UNFUSED) for n in windows}
    # the copies back into the caches; fused attention ops are followed (their masks move in permute_ring_masks)
    skip = {u for n in windows for u in n.users if is_call(u, (aten.copy_.default, aten.copy.default)) and
            u.args[1] is n}
    # the ops other than a fused attention op reading each window (ring_decode recorded those)
    readers = {n: [u for u in n.users if u not in skip and RING_ATTENTION not in u.meta] for n in windows}
    # windows with the same token count and size are in the same order
    starts = {n: (dim, (seen, slots)) for n, (seen, slots, dim, _) in info.items()}
    try:
        plan = key_order_region(gm.graph, starts, skip)
    except KeyOrderUnproven as why:
        for window, (seen, slots, dim, site) in info.items():
            mine = readers[window]
            _read_in_eager_order(gm, window, mine, seen, slots, dim, extra=1)
            site.notes.append(f"read by {len(mine)} node(s) other than a fused attention op ({mine[0].name}, "
                              f"...) in a way that may depend on the key order ({why}): they read the window in "
                              f"eager order through a gather, a copy of the window per step")
        return
    for op_node, index, ring in plan.attention:
        op_node.meta.setdefault(RING_ATTENTION, {})[index] = ring
    for user, operand, dim, (seen, slots) in plan.foreign:
        # ring slot j holds eager slot (j - seen - 1) mod W
        order = _insert_order(gm, user, slots, seen, sign=-1, extra=-1, device=val(operand).device)
        user.replace_input_with(operand, insert_call(gm, aten.index_select.default, (operand, dim, order),
                                                     before=user))
    permuted = sorted({operand.name for _, operand, _, _ in plan.foreign})
    for window, (_, _, _, site) in info.items():
        names = ", ".join(u.name for u in readers[window])
        site.notes.append(f"read by op(s) other than a fused attention op ({names}), in ring order: "
                          f"the key order does not change their result once the tensors they meet along the key "
                          f"axis ({', '.join(permuted) or 'none'}) are permuted the same way (a gather of those, "
                          f"not of the window)")
