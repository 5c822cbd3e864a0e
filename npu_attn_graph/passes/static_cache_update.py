"""Rewrite static KV-cache updates into the fused writer scatter_update(_).

transformers' StaticCache writes new keys/values with
``cache.index_copy_(2, positions, states)`` where positions = arange(S) + a
position counter; other code writes ``cache[:, :, positions] = states``
(index_put_) or ``cache[:, :, p:p + S] = states`` (a slice assignment), and
Inductor's decompositions turn index_copy into index_put. After AOT
functionalization each is an out-of-place op (index_copy, index_put,
slice_scatter) whose result later code reads, plus (for a cache that is a graph
input) a ``copy_`` of the whole result back into the cache at the end of the
graph. Both together are one in-place write of S contiguous positions:

    scatter_update_(cache, start.expand(B), states, -2)

after which every reader of the index_copy reads the cache itself and the
full-cache copy_ disappears.

Rule = pattern + conditions + replacement:
- pattern: a write of `states` into sequence positions of a 4-D BNSD cache
  (SEQUENCE_WRITES);
- conditions: positions are provably contiguous and ascending (an arange
  plus an offset, or a single position); nothing reads the cache after the
  write except the final copy_ back into it; states has the cache's batch,
  heads and head dim;
- replacement: scatter_update_ at the same place; the copy_ is dropped.
  For GE graphs (PassContext.target == "ge") the functional
  scatter_update replaces the write and the copy_ stays: TorchAir turns the
  pair into one in-place GE Scatter on the cache input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.operator_schemas import normalize_function

from ..report import Report, Site, node_location
from ._context import PassContext
from ._fx import insert_call

aten = torch.ops.aten
prims = torch.ops.prims
npu_attn = torch.ops.npu_attn

ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step, prims.iota.default)


def _contiguous_start(positions: torch.fx.Node) -> torch.fx.Node | int | None:
    """The first position when `positions` is start + [0, 1, ..., S-1]."""
    val = positions.meta["val"]
    if val.dim() != 1:
        return None
    if statically_known_true(val.shape[0] == 1):
        return positions  # one position: trivially contiguous
    node, offset = positions, None
    if node.target is aten.add.Tensor and len(node.args) == 2:
        a, b = node.args
        node, offset = (a, b) if _is_unit_range(a) else (b, a) if _is_unit_range(b) else (None, None)
    if node is None or not _is_unit_range(node):
        return None
    base = _range_start(node)
    if offset is None:
        return base
    if base != 0:
        return None
    return offset


def _is_unit_range(node: object) -> bool:
    if not isinstance(node, torch.fx.Node) or node.target not in ARANGES:
        return False
    if node.target is aten.arange.start_step:
        return (node.args[2] if len(node.args) > 2 else node.kwargs.get("step", 1)) == 1
    if node.target is prims.iota.default:
        return node.kwargs.get("step", 1) == 1
    return True


def _range_start(node: torch.fx.Node) -> int:
    if node.target is aten.arange.default:
        return 0
    if node.target is prims.iota.default:
        return node.kwargs.get("start", 0)
    return node.args[0]


def _later_readers(cache: torch.fx.Node, write: torch.fx.Node) -> list[torch.fx.Node]:
    """Users of `cache` after `write`, other than a copy_ of the write's result into it."""
    order = {n: i for i, n in enumerate(cache.graph.nodes)}
    readers = []
    for user in cache.users:
        if user is write or order[user] < order[write]:
            continue
        if user.target is aten.copy_.default and user.args[0] is cache and user.args[1] is write:
            continue
        readers.append(user)
    return readers


@dataclass
class SequenceWrite:
    cache: torch.fx.Node
    dim: object
    states: torch.fx.Node
    start: torch.fx.Node | int | None  # first written position, None if not provably contiguous
    pattern: str


def _index_copy(node: torch.fx.Node) -> SequenceWrite:
    cache, dim, positions, states = node.args[:4]
    return SequenceWrite(cache, dim, states, _contiguous_start(positions), "index_copy")


def _index_put(node: torch.fx.Node) -> SequenceWrite | None:
    cache, indices, states = node.args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    if accumulate or len(indices) != 3 or indices[0] is not None or indices[1] is not None:
        return None  # not cache[:, :, positions] = states
    return SequenceWrite(cache, 2, states, _contiguous_start(indices[2]), "index_put")


def _slice_scatter(node: torch.fx.Node) -> SequenceWrite | None:
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    kw = normalized.kwargs
    if kw.get("step", 1) != 1 or kw.get("start") is None:
        return None
    return SequenceWrite(kw["input"], kw.get("dim", 0), kw["src"], kw["start"], "slice_scatter")


SEQUENCE_WRITES = {
    aten.index_copy.default: _index_copy,
    aten.index_put.default: _index_put,
    aten.slice_scatter.default: _slice_scatter,
}


def _check(node: torch.fx.Node, write: SequenceWrite) -> str | None:
    cache, states = write.cache, write.states
    shape = cache.meta["val"].shape
    if len(shape) != 4:
        return f"cache rank {len(shape)} (needs a 4-D BNSD cache)"
    if write.dim not in (2, -2):
        return f"{write.pattern} along dim {write.dim} (needs the sequence dim 2)"
    new = states.meta["val"].shape
    if len(new) != 4 or not all(statically_known_true(new[i] == shape[i]) for i in (0, 1, 3)):
        return f"states shape {tuple(new)} does not match cache {tuple(shape)} outside dim 2"
    if write.start is None:
        return "positions are not provably contiguous (arange + offset)"
    readers = _later_readers(cache, node)
    if readers:
        return f"the cache is read after the write by {readers[0].name}"
    return None


def _start_indices(gm: torch.fx.GraphModule, node: torch.fx.Node, cache: torch.fx.Node,
                   start: torch.fx.Node | int) -> torch.fx.Node:
    """scatter_update_'s per-batch start offsets: the first position, int64, (B,)."""
    batch, device = cache.meta["val"].shape[0], cache.meta["val"].device
    start_val = start.meta["val"] if isinstance(start, torch.fx.Node) else start
    if isinstance(start_val, torch.Tensor):  # a position tensor of one element
        flat = insert_call(gm, aten.view.default, (start, [1]), before=node)
        if start_val.dtype != torch.int64:
            flat = insert_call(gm, aten._to_copy.default, (flat,), {"dtype": torch.int64}, before=node)
    else:  # an int or SymInt position
        flat = insert_call(gm, aten.full.default, ([1], start), {"dtype": torch.int64, "device": device},
                           before=node, fake_from=cache)
    return insert_call(gm, aten.expand.default, (flat, [batch]), before=node)


def static_cache_update(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> None:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SEQUENCE_WRITES:
            continue
        write = SEQUENCE_WRITES[node.target](node)
        if write is None or write.cache.meta["val"].dim() != 4:
            continue  # not a (B, N, S, D) cache write; paged slot writes have their own pass
        layer, source = node_location(node)
        site = Site(kind="kv_update", graph=ctx.graph_name, layer=layer, source=source, pattern=write.pattern)
        report.sites.append(site)
        site.reason = _check(node, write)
        if site.reason is not None:
            continue
        cache, states, start = write.cache, write.states, write.start
        starts = _start_indices(gm, node, cache, start)
        # Functional writer for GE: the copy_ back into the cache stays.
        writer = npu_attn.scatter_update.default if ctx.functional_kv_writes else npu_attn.scatter_update_.default
        written = insert_call(gm, writer, (cache, starts, states, -2), before=node)
        if not ctx.functional_kv_writes:
            for user in list(node.users):
                if user.target is aten.copy_.default and user.args[0] is cache:
                    gm.graph.erase_node(user)  # the cache is already written in place
        node.replace_all_uses_with(written)
        gm.graph.erase_node(node)
        site.fused_op = written.target.__name__.split(".")[0]
        site.layout = "BNSD"
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
