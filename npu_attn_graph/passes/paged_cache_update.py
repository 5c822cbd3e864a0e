"""Rewrite paged KV-cache writes through a slot mapping into npu_scatter_pa_kv_cache.

vLLM-style code stores the new tokens' keys and values into paged caches of
shape (num_blocks, block_size, num_kv_heads, head_dim) with

    key_cache.view(-1, N, D)[slot_mapping] = key          # index_put_
    value_cache.view(-1, N, D).index_copy_(0, slot_mapping, value)

After AOT functionalization each write is view -> index_put/index_copy ->
view back, plus a copy_ of the whole result into the cache input. A key write
and a value write with the same slot mapping are one in-place

    npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, cache_mode="Norm")

after which readers read the caches themselves and both full-cache copies
disappear.

Conditions: both caches are graph inputs in the ND ("Norm") paged layout,
key/value are (T, N, D) matching them, both writes use the same slot
mapping, and nothing reads a cache between its write and the fused write.
For GE graphs (PassContext.target == "ge") the writer is
npu_scatter_pa_kv_cache_functional and the copy_ nodes back stay: TorchAir
turns writer + copy_ into one in-place write of each cache input.
One difference is documented rather than provable: a negative slot (vLLM's
padding id -1) is skipped by the fused op, while an eager index_put would
write it from the end of the cache.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..report import Report, Site, node_location
from ._context import PassContext
from ._fx import insert_call

aten = torch.ops.aten
npu_attn = torch.ops.npu_attn
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


@dataclass
class SlotWrite:
    """cache.view(-1, N, D)[slots] = tokens, in functional form."""

    write: torch.fx.Node  # index_put / index_copy on the flat view
    back: torch.fx.Node  # the written flat view, viewed back to the cache shape
    cache: torch.fx.Node
    slots: torch.fx.Node
    tokens: torch.fx.Node
    pattern: str


def match_slot_write(node: torch.fx.Node) -> SlotWrite | None:
    if node.op != "call_function":
        return None
    if node.target is aten.index_put.default:
        flat, indices, tokens = node.args[:3]
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        if accumulate or len(indices) != 1 or indices[0] is None:
            return None
        slots, pattern = indices[0], "index_put(slot_mapping)"
    elif node.target is aten.index_copy.default:
        flat, dim, slots, tokens = node.args[:4]
        if dim != 0:
            return None
        pattern = "index_copy(slot_mapping)"
    else:
        return None
    if flat.target not in VIEWS or _val(flat).dim() != 3 or _val(slots).dim() != 1:
        return None
    cache = flat.args[0]
    if cache.op != "placeholder" or _val(cache).dim() != 4:
        return None
    backs = [u for u in node.users if u.target in VIEWS and tuple(_val(u).shape) == tuple(_val(cache).shape)]
    if len(backs) != 1 or len(node.users) != 1:
        return None
    return SlotWrite(node, backs[0], cache, slots, tokens, pattern)


def _val(node: torch.fx.Node):
    return node.meta["val"]


def _layout_reason(w: SlotWrite) -> str | None:
    nb, bs, n, d = _val(w.cache).shape
    t = _val(w.tokens).shape
    if len(t) != 3 or not (statically_known_true(t[1] == n) and statically_known_true(t[2] == d)):
        return f"tokens of shape {tuple(t)} do not match the (blocks, block_size, {n}, {d}) cache"
    return None


def _readers_between(w: SlotWrite, until: torch.fx.Node, order: dict) -> list[torch.fx.Node]:
    """Readers of the written cache (other than the final copy_) before `until`."""
    readers = [u for u in w.back.users if not _is_copy_back(u, w) and order[u] <= order[until]]
    readers += [u for u in w.cache.users if u is not w.write.args[0] and not _is_copy_back(u, w)
                and order[w.write] < order[u]]
    return readers


def _is_copy_back(user: torch.fx.Node, w: SlotWrite) -> bool:
    return user.target is aten.copy_.default and user.args[0] is w.cache and user.args[1] is w.back


def paged_cache_update(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> None:
    writes = [w for w in map(match_slot_write, list(gm.graph.nodes)) if w is not None]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_slots: dict[torch.fx.Node, list[SlotWrite]] = {}
    for w in writes:
        by_slots.setdefault(w.slots, []).append(w)
    changed = False
    for slots, group in by_slots.items():
        sites = []
        for w in group:
            layer, source = node_location(w.write)
            sites.append(Site(kind="kv_update", graph=ctx.graph_name, layer=layer, source=source, pattern=w.pattern))
        report.sites.extend(sites)
        reason = None
        if len(group) != 2:
            reason = f"{len(group)} cache write(s) share this slot mapping (needs one key and one value write)"
        else:
            key_w, value_w = sorted(group, key=lambda w: order[w.write])
            reason = _layout_reason(key_w) or _layout_reason(value_w)
            last = value_w.write
            if reason is None:
                readers = _readers_between(key_w, last, order) + _readers_between(value_w, last, order)
                if readers:
                    reason = f"a cache is read between the writes or after them by {readers[0].name}"
        if reason is not None:
            for site in sites:
                site.reason = reason
            continue
        args = (key_w.tokens, value_w.tokens, key_w.cache, value_w.cache, slots)
        if ctx.functional_kv_writes:
            _write_functional(gm, key_w, value_w, args, last)
        else:
            _write_in_place(gm, key_w, value_w, args, last)
        for site in sites:
            site.fused_op = ("npu_scatter_pa_kv_cache_functional" if ctx.functional_kv_writes
                             else "npu_scatter_pa_kv_cache")
            site.layout = "PA(Norm)"
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()


def _write_in_place(gm: torch.fx.GraphModule, key_w: SlotWrite, value_w: SlotWrite, args: tuple,
                    last: torch.fx.Node) -> None:
    with gm.graph.inserting_after(last):
        fused = gm.graph.call_function(npu_attn.npu_scatter_pa_kv_cache.default, args, {"cache_mode": "Norm"})
    fused.meta["val"] = None
    for w in (key_w, value_w):
        for user in list(w.back.users):
            if _is_copy_back(user, w):
                gm.graph.erase_node(user)
        # Readers after the fused write read the cache itself, now updated in place.
        w.back.replace_all_uses_with(w.cache)
    _erase_writes(gm, key_w, value_w)


def _write_functional(gm: torch.fx.GraphModule, key_w: SlotWrite, value_w: SlotWrite, args: tuple,
                      last: torch.fx.Node) -> None:
    """The functional writer returns both new caches; the copy_ nodes back into
    the cache inputs stay, and TorchAir makes writer + copy_ one in-place write."""
    both = insert_call(gm, npu_attn.npu_scatter_pa_kv_cache_functional.default, args, {"cache_mode": "Norm"},
                       after=last)
    anchor = both
    for index, w in enumerate((key_w, value_w)):
        anchor = insert_call(gm, operator.getitem, (both, index), after=anchor)
        w.back.replace_all_uses_with(anchor)
    _erase_writes(gm, key_w, value_w)


def _erase_writes(gm: torch.fx.GraphModule, key_w: SlotWrite, value_w: SlotWrite) -> None:
    for w in (key_w, value_w):
        gm.graph.erase_node(w.back)
        gm.graph.erase_node(w.write)
