"""Small FX helpers shared by the passes."""

from __future__ import annotations

import torch


def fake_mode_of(node: torch.fx.Node):
    """The FakeTensorMode the graph's metadata (a tensor-valued node's) lives in."""
    return node.meta["val"].fake_mode


def insert_call(gm: torch.fx.GraphModule, target, args: tuple, kwargs: dict | None = None, *,
                before: torch.fx.Node | None = None, after: torch.fx.Node | None = None,
                fake_from: torch.fx.Node | None = None) -> torch.fx.Node:
    """Insert target(*args, **kwargs) before or after a node, with its fake value
    as meta["val"] (target run on the arguments' fake values) and the source
    location of that neighbour.

    fake_from names a tensor node whose fake mode to use when no argument is one."""
    kwargs = kwargs or {}
    anchor = before if before is not None else after
    with (gm.graph.inserting_before(before) if before is not None else gm.graph.inserting_after(after)):
        node = gm.graph.call_function(target, args, kwargs)
    node.meta["val"] = fake_result(target, args, kwargs, fake_mode_of(fake_from) if fake_from is not None else None)
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in anchor.meta:
            node.meta[key] = anchor.meta[key]
    return node


def fake_result(target, args: tuple, kwargs: dict, fake_mode=None) -> object:
    """target run on the fake values of its node arguments, in fake_mode (default:
    the mode of the first fake tensor among them)."""
    vals = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    if fake_mode is None:
        fake_mode = next(t.fake_mode for t in torch.utils._pytree.tree_leaves(vals) if hasattr(t, "fake_mode"))
    with fake_mode:
        return target(*vals[0], **vals[1])
