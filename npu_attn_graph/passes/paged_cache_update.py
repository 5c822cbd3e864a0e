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


def slot_write(node: torch.fx.Node) -> SlotWrite | None:
    if is_call(node, aten.index_put.default):
        flat, indices, tokens = node.args[:3]
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        if accumulate or any(i is None for i in indices) or len(indices) not in (1, 2):
            return None
        if len(indices) == 2:  # cache[blocks, offsets] = tokens
            cache = cache_root(flat)
            if not isinstance(cache, torch.fx.Node) or cache.op != "placeholder" or val(cache).dim() != 4 or \
                    tuple(val(flat).shape) != tuple(val(cache).shape):
                return None
            slots = _block_offset_slots(*indices, static_int(val(cache).shape[1]))
            if slots is None or val(slots).dim() != 1:
                return None
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
    if not isinstance(cache, torch.fx.Node) or cache.op != "placeholder" or val(cache).dim() != 4:
        return None
    rows_of_heads = val(flat).dim() == 2
    if rows_of_heads and not same_size(val(flat).shape[1], val(cache).shape[2] * val(cache).shape[3]):
        return None
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
                and (w := slot_write(u)) is not None and w.cache is not first.cache and w.slots is first.slots]
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
    if (pair.key.copy_back is None) != (pair.value.copy_back is None):
        return "one cache is written in place and the other out of place"
    order = graph_order(pair.key.write.graph)
    early = [u.name for u in pair.key.back.users if u is not pair.key.copy_back and order[u] < order[pair.value.write]]
    if early:
        return f"a cache is read between the writes by {early[0]} (the fused write goes where the second write is)"
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
    key, value = pair.key, pair.value
    in_place = key.copy_back is not None and not ctx.functional_kv_writes
    if in_place:
        reason = _in_place_reason(pair)
        if reason is not None:
            raise RewriteRefused(f"{reason} (the in-place fused writer would change what it reads)")
    slots = key.slots
    if key.wraps or value.wraps:  # what eager's index_put writes for a negative slot
        slots = rw.call(aten.remainder.Scalar, (slots, _slot_count(rw, key)))
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
    site.fused_op = SCATTER_PA_KV_CACHE.in_place.__name__.split(".")[0] if in_place \
        else SCATTER_PA_KV_CACHE.functional.__name__.split(".")[0]
    site.layout = SCATTER_PA_KV_CACHE.layout
    return dead


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
