"""shared_subexpressions: what the rules built the same way for several sites, built once.

A rule builds each site's extra inputs from the site's own values: the NPU mask
(the model's bool mask, unsqueezed, inverted, expanded), casts, lengths. A model
hands the same mask to every layer, so the rewritten graph holds one identical
chain per layer. Run op by op, each layer then computes its own copy, and the
fused op's run-time plan, memoised per mask tensor (kernels/_library.py's
once_per_version), is worked out again for every layer; Inductor computes each
copy in its own kernel.

This pass merges them: a node the passes inserted (Rewrite.call and insert_call
mark it, INSERTED), or a view (the model's own ``mask[None, None]`` in every
layer), whose target and arguments are those of an earlier such node is
replaced by it. The model's other nodes stay as written: the report's count of
attention-shaped sites is the model's. Merged only when the result cannot
differ:

- the target is a pure ATen op (no argument it writes, not seeded-random, not
  an uninitialised allocation); the fused ops stay, one per site;
- no argument aliases a tensor that some node of the graph writes in place
  (a cache input, the step state advance_step updates): read before and after
  the write, the same call gives different values;
- scalars match in type as well as value (x * 2 and x * 2.0 differ in dtype).
"""

from __future__ import annotations

from typing import Hashable

import torch

from ..report import Report
from ._context import PassContext
from ._fx import INSERTED, is_view, returns_mutated_input, views_of

_UNINITIALISED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def shared_subexpressions(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> int:
    """Merge duplicate inserted nodes; returns how many were removed."""
    written = _aliases_of_written(gm.graph)
    first: dict[Hashable, torch.fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if not (node.meta.get(INSERTED) or is_view(node)) or not _pure(node):
            continue
        if any(arg in written for arg in node.all_input_nodes):
            continue
        key = _key((node.target, node.args, node.kwargs))
        if key is None:
            continue
        kept = first.setdefault(key, node)
        if kept is node:
            continue
        node.replace_all_uses_with(kept)
        gm.graph.erase_node(node)
        merged += 1
    if merged:
        gm.recompile()
    return merged


def _pure(node: torch.fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags and \
        target.overloadpacket.__name__ not in _UNINITIALISED


def _aliases_of_written(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Every node whose value shares memory with an argument some node writes in place."""
    roots = set()
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None or not schema.is_mutable:
            continue
        for i, argument in enumerate(schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = node.kwargs.get(argument.name) if argument.kwarg_only or i >= len(node.args) else node.args[i]
            for written in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(written, torch.fx.Node):
                    roots.add(_base(written))
    aliases: set[torch.fx.Node] = set()
    for root in roots:
        aliases |= views_of(root)
    return aliases


def _base(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor a view (or an in-place writer's result) aliases, through every level."""
    while (is_view(node) or returns_mutated_input(node)) and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _key(value: object) -> Hashable | None:
    """A hashable form of a node's target and arguments, scalars tagged with their type;
    None for an argument it cannot compare."""
    if isinstance(value, torch.fx.Node):
        return value
    if isinstance(value, (list, tuple)):
        parts = [_key(v) for v in value]
        return None if any(p is None for p in parts) else (type(value).__name__, *parts)
    if isinstance(value, dict):
        items = [(k, _key(v)) for k, v in sorted(value.items())]
        return None if any(v is None for _, v in items) else ("dict", *items)
    if isinstance(value, float):
        return ("float", value.hex())  # -0.0 and 0.0 differ (x * -0.0)
    if value is None or isinstance(value, (bool, int, str, torch.dtype, torch.device, torch.layout,
                                           torch.memory_format, torch._ops.OpOverload)):
        return (type(value).__name__, value)
    return None
