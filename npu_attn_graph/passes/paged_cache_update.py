"""Rule: paged KV-cache writes through a slot mapping -> npu_scatter_pa_kv_cache.

vLLM-style code stores the new tokens' keys and values into paged caches of
shape (num_blocks, block_size, num_kv_heads, head_dim) with

    key_cache.view(-1, N, D)[slot_mapping] = key          # index_put_
    value_cache.view(-1, N, D).index_copy_(0, slot_mapping, value)
    key_cache.view(-1, N * D).index_copy_(0, slot_mapping, key.view(-1, N * D))   # rows of N * D
    key_cache[slot_mapping // block_size, slot_mapping % block_size] = key        # block, offset

After AOT functionalization each write is view -> index_put/index_copy ->
view back, plus a copy_ of the result into the cache input when the program
wrote in place.

Pattern: a key write and a value write into two graph inputs (or buffers)
with the same slot-mapping node. Check: the caches are 4-D, the tokens are
(T, N, D) matching them. Rewrite at the later write:

- both written in place, and neither cache is read between the writes (its
  new value) or after them (its old value): the in-place writer; readers read
  the caches, both copies disappear. For GE graphs the functional writer,
  with the copies kept (TorchAir turns the pair into in-place writes);
- both written out of place: the functional writer.

A combined cache input (2, num_blocks, block_size, Hkv, D) (vLLM's FlashAttention
layout: ``key_cache, value_cache = kv_cache.unbind(0)`` or ``kv_cache[0]``,
``kv_cache[1]``) functionalizes to: write into half 0, select_scatter it back,
take half 1 of that, write, select_scatter back, copy_ into the input. Its two
halves pair like two caches when nothing else reads the chain between the
writes. In place (eager executor) the writer gets the two halves of the input
(select views, no copy) and writes through them; the final select_scatter's
readers read the input and its copy_ goes, so no whole-cache copy remains. Several
pairs into one input chain their select_scatters and only the last is copied
in: each writes in place in order (a reader of an intermediate value must come
before the next write, which functionalization guarantees and the rule checks). For
GE (functional writes) the outputs go back through the select_scatters the
graph already had (no copy added), which TorchAir lowers to a copy and a
scatter of the whole cache per step (the site's notes say so); unfused, the
writes (index_put) have no GE converter at all.

index_put wraps negative slots (-1 writes the last slot) while the fused op
skips them, so index_put's slots are normalised to what eager writes; index_copy
rejects negative slots, as eager does. The block/offset form is the flat form:
with block_size = the cache's dim 1, (s // block_size, s % block_size) is slot s
for every s in [-blocks * block_size, blocks * block_size), a negative one
included (floor division gives block -1, the last, and offset s mod block_size),
so it is read as index_put of slot s.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ..report import Report, Site
from ._context import PassContext
from ._fx import CLAIMED, Rewrite, RewriteRefused, cache_root, graph_order, is_call, same_size, static_int, val, views_of
from ._rules import Rule, RuleStats, apply_rules
from .registry import SCATTER_PA_KV_CACHE

aten = torch.ops.aten
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


@dataclass
class SlotWrite:
    """cache.view(-1, N, D)[slots] = tokens (or one of its other spellings), in functional form."""

    write: torch.fx.Node  # index_put / index_copy on the flat view (or on the cache, by block and offset)
    back: torch.fx.Node | None  # the written value in the cache's shape (a view back, or the write itself)
    cache: torch.fx.Node
    slots: torch.fx.Node
    tokens: torch.fx.Node
    pattern: str
    wraps: bool  # index_put: negative slots count from the end
    copy_back: torch.fx.Node | None = None
    rows_of_heads: bool = False  # the flat view is (slots, N * D): tokens are (T, N * D)
    # A half of a combined cache input (2, num_blocks, block_size, N, D): `cache` is then the
    # half (unbind's getitem or select), `combined` the input, `half` 0 or 1, `source` what the
    # half is taken from (the input, or the other half's select_scatter) and `scatter` the
    # select_scatter putting the written half back.
    combined: torch.fx.Node | None = None
    half: int | None = None
    source: torch.fx.Node | None = None
    scatter: torch.fx.Node | None = None


@dataclass
class SlotWritePair:
    key: SlotWrite
    value: SlotWrite | None  # None: no partner write with the same slots

    @property
    def writes(self) -> list[SlotWrite]:
        return [w for w in (self.key, self.value) if w is not None]


def _block_offset_slots(blocks: object, offsets: object, block_size: int) -> torch.fx.Node | None:
    """s when blocks is s // block_size and offsets is s % block_size (floor division), else None."""
    if is_call(blocks, aten.floor_divide.default) or (
            is_call(blocks, aten.div.Tensor_mode) and blocks.kwargs.get("rounding_mode") == "floor"):
        slots, divisor = blocks.args[:2]
    else:
        return None
    if not is_call(offsets, (aten.remainder.Scalar, aten.remainder.Tensor)) or offsets.args[0] is not slots:
        return None
    if static_int(divisor) != block_size or static_int(offsets.args[1]) != block_size:
        return None
    return slots


def _written_back(node: torch.fx.Node, cache: torch.fx.Node) -> tuple[torch.fx.Node | None, torch.fx.Node | None]:
    """(the write's value in the cache's shape, the copy_ of it into the cache), each None if absent."""
    if tuple(val(node).shape) == tuple(val(cache).shape):
        back = node
    else:
        backs = [u for u in node.users if is_call(u, VIEWS) and tuple(val(u).shape) == tuple(val(cache).shape)]
        back = backs[0] if len(backs) == 1 and len(node.users) == 1 else None
    copy_back = None
    if back is not None:
        copy_back = next((u for u in cache.users if is_call(u, aten.copy_.default) and u.args[0] is cache
                          and u.args[1] is back), None)
    return back, copy_back


def _half_of(node: object) -> tuple[torch.fx.Node, int] | None:
    """(C, h) when node is C.unbind(0)[h] or C.select(0, h) (C[h]) for a (2, ...) tensor C."""
    if is_call(node, operator.getitem) and is_call(node.args[0], aten.unbind.int):
        source, dim = node.args[0].args[0], (node.args[0].args[1] if len(node.args[0].args) > 1 else 0)
        half = node.args[1]
    elif is_call(node, aten.select.int):
        source, dim, half = node.args[:3]
    else:
        return None
    if dim != 0 or not isinstance(source, torch.fx.Node) or val(source).dim() != 5 or \
            static_int(val(source).shape[0]) != 2 or half not in (0, 1, -1, -2):
        return None
    return source, half % 2


def _combined_input(source: torch.fx.Node) -> torch.fx.Node | None:
    """The graph input `source` is, or the input with the other half written back into it
    (select_scatter(C, x, 0, h) of a chain ending at the input)."""
    node = source
    while is_call(node, aten.select_scatter.default) and node.args[2] == 0:
        node = node.args[0]
    return node if isinstance(node, torch.fx.Node) and node.op == "placeholder" else None


def _combined_write(write: SlotWrite) -> SlotWrite | None:
    """`write` (whose cache is not an input) as a write into one half of a combined cache."""
    found = _half_of(write.cache)
    if found is None:
        return None
    source, half = found
    combined = _combined_input(source)
    if combined is None:
        return None
    back, _ = _written_back(write.write, write.cache)
    scatters = [] if back is None else list(back.users)
    if len(scatters) != 1 or not is_call(scatters[0], aten.select_scatter.default) or \
            scatters[0].args[0] is not source or scatters[0].args[2] != 0 or scatters[0].args[3] % 2 != half:
        return None
    scatter = scatters[0]
    copy_back = next((u for u in combined.users if is_call(u, aten.copy_.default) and u.args[1] is scatter), None)
    write.back, write.copy_back = back, copy_back
    write.combined, write.half, write.source, write.scatter = combined, half, source, scatter
    write.pattern += f" into half {half} of a combined cache"
    return write


def slot_write(node: torch.fx.Node) -> SlotWrite | None:
    if is_call(node, aten.index_put.default):
        flat, indices, tokens = node.args[:3]
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        if accumulate or any(i is None for i in indices) or len(indices) not in (1, 2):
            return None
        if len(indices) == 2:  # cache[blocks, offsets] = tokens
            cache = cache_root(flat)
            combined = isinstance(cache, torch.fx.Node) and _half_of(cache) is not None
            if not isinstance(cache, torch.fx.Node) or (cache.op != "placeholder" and not combined) or \
                    val(cache).dim() != 4 or tuple(val(flat).shape) != tuple(val(cache).shape):
                return None
            slots = _block_offset_slots(*indices, static_int(val(cache).shape[1]))
            if slots is None or val(slots).dim() != 1:
                return None
            if combined:
                return _combined_write(SlotWrite(node, None, cache, slots, tokens, "index_put(block, offset)", True))
            back, copy_back = _written_back(node, cache)
            return SlotWrite(node, back, cache, slots, tokens, "index_put(block, offset)", True, copy_back)
        slots, pattern, wraps = indices[0], "index_put(slot_mapping)", True
    elif is_call(node, aten.index_copy.default):
        flat, dim, slots, tokens = node.args[:4]
        if dim != 0:
            return None
        pattern, wraps = "index_copy(slot_mapping)", False
    else:
        return None
    if not is_call(flat, VIEWS) or val(flat).dim() not in (2, 3) or val(slots).dim() != 1 or \
            val(slots).dtype in (torch.bool, torch.uint8):
        return None
    cache = cache_root(flat.args[0])
    combined = isinstance(cache, torch.fx.Node) and _half_of(cache) is not None
    if not isinstance(cache, torch.fx.Node) or (cache.op != "placeholder" and not combined) or \
            val(cache).dim() != 4:
        return None
    rows_of_heads = val(flat).dim() == 2
    if rows_of_heads and not same_size(val(flat).shape[1], val(cache).shape[2] * val(cache).shape[3]):
        return None
    if combined:
        return _combined_write(SlotWrite(node, None, cache, slots, tokens, pattern, wraps, None, rows_of_heads))
    back, copy_back = _written_back(node, cache)
    return SlotWrite(node, back, cache, slots, tokens, pattern, wraps, copy_back, rows_of_heads)


def match_pair(node: torch.fx.Node) -> SlotWritePair | None:
    first = slot_write(node)
    if first is None:
        return None
    order = graph_order(node.graph)
    # The partner reads the same slots, directly or through its block and offset.
    near = list(first.slots.users) + [u for v in first.slots.users for u in v.users]
    partners = [w for u in dict.fromkeys(near) if u is not node and order[u] > order[node] and CLAIMED not in u.meta
                and (w := slot_write(u)) is not None and w.cache is not first.cache and w.slots is first.slots
                and w.combined is first.combined and (w.combined is None or w.half != first.half)]
    # Layers share one slot mapping: the partner is the nearest later write (the same layer's value
    # write); the layers after it pair up in turn, each when its key write is reached.
    partner = min(partners, key=lambda w: order[w.write]) if partners else None
    return SlotWritePair(first, partner)


def check_pair(pair: SlotWritePair, ctx: PassContext) -> str | None:
    if pair.value is None:
        return "no second cache write with the same slot mapping (needs one key and one value write)"
    for w in pair.writes:
        nb, bs, n, d = val(w.cache).shape
        t = val(w.tokens).shape
        if w.rows_of_heads:
            if len(t) != 2 or not same_size(t[1], n * d):
                return f"tokens of shape {tuple(t)} do not match the (slots, {n} * {d}) rows of the cache"
        elif len(t) != 3 or not (same_size(t[1], n) and same_size(t[2], d)):
            return f"tokens of shape {tuple(t)} do not match the (blocks, block_size, {n}, {d}) cache"
        if w.back is None:
            return f"the written cache {w.write.name} is not only viewed back to the cache shape"
    if pair.key.combined is not None:
        return _combined_reason(pair)
    if (pair.key.copy_back is None) != (pair.value.copy_back is None):
        return "one cache is written in place and the other out of place"
    order = graph_order(pair.key.write.graph)
    early = [u.name for u in pair.key.back.users if u is not pair.key.copy_back and order[u] < order[pair.value.write]]
    if early:
        return f"a cache is read between the writes by {early[0]} (the fused write goes where the second write is)"
    return None


def _combined_reason(pair: SlotWritePair) -> str | None:
    """Halves of one combined input: the second half is taken from the first half's write-back
    (which nothing else reads), and only the second's write-back is copied into the input."""
    first, second = pair.key, pair.value
    if second.source is not first.scatter:
        return (f"the second half ({second.write.name}) is not taken from the first half's write-back "
                f"{first.scatter.name}")
    # first.scatter -> unbind -> getitem (or select) -> the second half -> its flat view (or the
    # block/offset write itself), and the second select_scatter: nothing else.
    half_users = {second.write.args[0], second.write}
    if is_call(second.cache, operator.getitem):
        unbind = second.cache.args[0]
        allowed = {first.scatter: {unbind, second.scatter}, unbind: {second.cache}, second.cache: half_users}
    else:
        allowed = {first.scatter: {second.cache, second.scatter}, second.cache: half_users}
    for node, users in allowed.items():
        # unbind's getitems of the other half that nothing reads do not count
        other = [u.name for u in node.users if u not in users and not (is_call(node, aten.unbind.int) and not u.users)]
        if other:
            return f"the combined cache is read between the writes by {other[0]}"
    if first.copy_back is not None:
        return f"the first half's write-back is copied into the input by {first.copy_back.name}"
    return None


def _in_place_reason(pair: SlotWritePair) -> str | None:
    order = graph_order(pair.key.write.graph)
    last = max(order[w.write] for w in pair.writes)
    for w in pair.writes:
        for user in w.back.users:
            if user is not w.copy_back and order[user] <= last:
                return f"a cache is read between the writes by {user.name}"
        for alias in views_of(w.cache):
            for user in alias.users:
                if user in (w.copy_back,) or user is w.write.args[0] or user in views_of(w.cache):
                    continue
                if order[user] > last:
                    return f"a cache's old value is read after the writes by {user.name}"
    return None


def rewrite_pair(rw: Rewrite, pair: SlotWritePair, ctx: PassContext, site: Site) -> list[torch.fx.Node]:
    if pair.key.combined is not None:
        return _rewrite_combined(rw, pair, ctx, site)
    key, value = pair.key, pair.value
    in_place = key.copy_back is not None and not ctx.functional_kv_writes
    if in_place:
        reason = _in_place_reason(pair)
        if reason is not None:
            raise RewriteRefused(f"{reason} (the in-place fused writer would change what it reads)")
    slots = _slots(rw, pair)
    args = (_heads(rw, key), _heads(rw, value), key.cache, value.cache, slots)
    dead = []
    if in_place:
        rw.call(SCATTER_PA_KV_CACHE.in_place, args, SCATTER_PA_KV_CACHE.extra_kwargs)
        for w in pair.writes:
            rw.replace(w.back, w.cache)  # readers after the write read the cache, updated in place
            w.copy_back.meta["npu_attn_drop"] = True
    else:
        both = rw.call(SCATTER_PA_KV_CACHE.functional, args, SCATTER_PA_KV_CACHE.extra_kwargs)
        for index, w in enumerate(pair.writes):
            rw.replace(w.back, rw.call(operator.getitem, (both, index)))
    for w in pair.writes:
        dead += [w.back, w.write]
        if w.copy_back is not None:
            w.copy_back.meta[CLAIMED] = site
        w.write.meta[CLAIMED] = site
    _name_site(site, in_place)
    return dead


def _slots(rw: Rewrite, pair: SlotWritePair) -> torch.fx.Node:
    slots = pair.key.slots
    if pair.key.wraps or pair.value.wraps:  # what eager's index_put writes for a negative slot
        slots = rw.call(aten.remainder.Scalar, (slots, _slot_count(rw, pair.key)))
    return slots


def _name_site(site: Site, in_place: bool) -> None:
    site.fused_op = SCATTER_PA_KV_CACHE.in_place.__name__.split(".")[0] if in_place \
        else SCATTER_PA_KV_CACHE.functional.__name__.split(".")[0]
    site.layout = SCATTER_PA_KV_CACHE.layout


def _next_link(node: torch.fx.Node, combined: torch.fx.Node) -> torch.fx.Node | None:
    """The later write's select_scatter(node, x, 0, h), when node is an intermediate value of the
    combined input's write chain."""
    links = [u for u in node.users if is_call(u, aten.select_scatter.default) and u.args[0] is node and
             u.args[2] == 0]
    return links[0] if len(links) == 1 else None


def _copied_into(node: torch.fx.Node, combined: torch.fx.Node) -> bool:
    """node, or the chain of later writes' select_scatters from it, is copied into the input."""
    while node is not None:
        if any(is_call(u, aten.copy_.default) and u.args[0] is combined and u.args[1] is node for u in node.users):
            return True
        node = _next_link(node, combined)
    return False


def _rewrite_combined(rw: Rewrite, pair: SlotWritePair, ctx: PassContext, site: Site) -> list[torch.fx.Node]:
    """Both halves of a combined input: the writer gets the input's two halves (select views, no
    copy). In place, it writes through them into the input, readers of the written-back input read
    the input and its copy_ goes; otherwise its outputs are put back with the two select_scatters
    the graph already had (copied into the input, for GE, as before: no copy added)."""
    first, second = pair.key, pair.value
    combined = first.combined
    link = _next_link(second.scatter, combined)  # None: copied into the input (or never)
    in_place = not ctx.functional_kv_writes and _copied_into(second.scatter, combined)
    if in_place:
        order = graph_order(first.write.graph)
        last = order[second.write]
        for alias in views_of(combined):
            for user in alias.users:
                if user is not second.copy_back and user not in views_of(combined) and order[user] > last:
                    raise RewriteRefused(f"the combined cache's old value is read after the writes by {user.name} "
                                         f"(the in-place fused writer would change what it reads)")
        if first.source is not combined:
            raise RewriteRefused(f"the combined cache's halves are taken from {first.source.name}, an earlier "
                                 f"write not yet in the input (the in-place fused writer writes the input)")
        if link is not None:
            # A later write follows: once the input holds this value, a reader of it must come before
            # that write (which changes the input, in place too if it is fused).
            for alias in views_of(second.scatter):
                for user in alias.users:
                    if user is not link and user not in views_of(second.scatter) and order[user] > order[link]:
                        raise RewriteRefused(f"the combined cache written here is read by {user.name} after a "
                                             f"later write into it ({link.name})")
    # The current value: the input, or an earlier write's put-back (second's half of first.source is
    # second's half of first.scatter, which only replaced first's half).
    current = first.source
    halves = [rw.call(aten.select.int, (current, 0, w.half)) for w in pair.writes]
    args = (_heads(rw, first), _heads(rw, second), halves[0], halves[1], _slots(rw, pair))
    if in_place:
        rw.call(SCATTER_PA_KV_CACHE.in_place, args, SCATTER_PA_KV_CACHE.extra_kwargs)
        rw.replace(second.scatter, combined)  # readers after the writes read the input, updated in place
        if second.copy_back is not None:
            second.copy_back.meta["npu_attn_drop"] = True
    else:
        both = rw.call(SCATTER_PA_KV_CACHE.functional, args, SCATTER_PA_KV_CACHE.extra_kwargs)
        new = current
        for index, w in enumerate(pair.writes):
            new = rw.call(aten.select_scatter.default, (new, rw.call(operator.getitem, (both, index)), 0, w.half))
        rw.replace(second.scatter, new)
        if second.copy_back is not None:
            # Measured with to_ge_graph (decode step, fp16): TorchAir lowers the put-back to 2 TensorMove
            # + 2 ScatterElements over the whole cache per step (separate caches: ScatterPaKvCache in
            # place on the input, nothing else). The unfused graph had the same select_scatters plus
            # index_put, which GE cannot convert at all.
            site.notes.append("combined cache written in place, functional writer (GE): the halves go back "
                              "through the graph's select_scatters, a whole-cache copy and scatter per step in "
                              "GE; separate key/value caches avoid it")
    if second.copy_back is not None:
        second.copy_back.meta[CLAIMED] = site
    for w in pair.writes:
        w.write.meta[CLAIMED] = site
    _name_site(site, in_place)
    return [second.scatter, first.scatter, *(n for w in pair.writes for n in (w.back, w.write))]


def _heads(rw: Rewrite, write: SlotWrite) -> torch.fx.Node:
    """The written tokens as (T, N, D), the fused op's form."""
    if not write.rows_of_heads:
        return write.tokens
    shape = val(write.cache).shape
    return rw.call(aten.view.default, (write.tokens, [rw.size(write.tokens, 0), static_int(shape[2]),
                                                      static_int(shape[3])]))


def _slot_count(rw: Rewrite, write: SlotWrite) -> object:
    """blocks * block_size of the cache (a static int, or a node for symbolic sizes)."""
    shape = val(write.cache).shape
    total = shape[0] * shape[1]
    static = static_int(total)
    if static is not None:
        return static
    return rw.call(operator.mul, (rw.size(write.cache, 0), rw.size(write.cache, 1)))


PAGED_WRITE_RULE = Rule(
    name="paged-cache-write", kind="kv_update", anchors=(aten.index_put.default, aten.index_copy.default),
    match=match_pair, check=check_pair, rewrite=rewrite_pair, anchor_of=lambda p: p.writes[-1].write,
    claims=lambda p: [n for w in p.writes for n in (w.write, w.copy_back) if n is not None],
    rows_of=lambda p: [(w.write, w.pattern) for w in p.writes])


def paged_cache_update(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    stats = apply_rules(gm, (PAGED_WRITE_RULE,), report, ctx)
    for node in list(gm.graph.nodes):
        if node.meta.pop("npu_attn_drop", False):
            gm.graph.erase_node(node)
    gm.recompile()
    return stats
