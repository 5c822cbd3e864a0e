"""Choose the fused ops' layouts so the transposes around attention disappear.

Models project q/k/v as (B, S, N, D) and transpose them to (B, N, S, D) for
attention, then transpose the output back and copy it contiguous before the
output projection. The fused ops read and write BSND directly, so:

1. inputs: when q, k and v are all transpose(x, 1, 2) of BSND tensors x, the
   op takes the x's with input_layout BSND (its output is then BSND too, and
   a free permute view gives the BNSD value the graph expects);
2. outputs: when a BNSD-output op's result is only transposed to BSND and
   copied contiguous, the op writes BSND (BNSD_BSND, or for a single query
   token, whose BNSD and BSND memory orders coincide, a view);
3. a contiguous copy of a transpose of that permute view is the op's fresh
   BSND output itself, so the copy is dropped.

Each step only changes how the same values are laid out; the graph computes
exactly what it did before.
"""

from __future__ import annotations

import operator
from typing import Sequence, cast

import torch

from ..report import Report
from ._context import PassContext
from ._fx import SITE, fake_result, insert_call, val
from .registry import ATTENTION_OPS, FusedAttentionOp

aten = torch.ops.aten
SEQ_HEAD_SWAPS = ((1, 2), (2, 1), (-3, -2), (-2, -3))


def _swaps_seq_and_heads(node: object) -> bool:
    """transpose(x, 1, 2) or permute(x, [0, 2, 1, 3]) of a 4-D tensor."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.transpose.int:
        return tuple(node.args[1:3]) in SEQ_HEAD_SWAPS and val(node.args[0]).dim() == 4
    return node.target is aten.permute.default and list(cast(Sequence[int], node.args[1])) == [0, 2, 1, 3]


def _output(node: torch.fx.Node, op: FusedAttentionOp) -> torch.fx.Node | None:
    """The attention tensor of a fused node (FIA returns (out, lse))."""
    if op.output_index is None:
        return node
    outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == op.output_index]
    return outs[0] if len(outs) == 1 else None


def _retarget(gm: torch.fx.GraphModule, node: torch.fx.Node, out: torch.fx.Node, args: tuple,
              layout: str) -> torch.fx.Node | None:
    """Give the fused node new inputs/layout; return a BNSD view of its (now BSND)
    output, or None (and no change) when the op's validation rejects it."""
    users = list(out.users)
    writes_bsnd = node.kwargs.get("input_layout") == "BNSD_BSND"
    kwargs = {**node.kwargs, "input_layout": layout}
    try:
        value = fake_result(node.target, args, kwargs)
    except Exception:  # noqa: BLE001 - the op's own validation says no: keep the layout
        return None
    node.args, node.kwargs = args, kwargs
    if writes_bsnd:  # the output memory is unchanged; a permute already views it as BNSD
        return next(u for u in users if _swaps_seq_and_heads(u))
    node.meta["val"] = value
    if out is not node:
        out.meta["val"] = value[out.args[1]]
    view = insert_call(gm, aten.permute.default, (out, [0, 2, 1, 3]), after=out)
    for user in users:
        user.replace_input_with(out, view)
    return view


def _single_token_view(gm: torch.fx.GraphModule, out: torch.fx.Node, copy: torch.fx.Node) -> None:
    """S == 1: the contiguous copy of the BSND transpose has the op's memory order,
    so a permuted view of the output (no copy) serves instead."""
    view = insert_call(gm, aten.permute.default, (out, [0, 2, 1, 3]), after=out)
    copy.replace_all_uses_with(view)


def _contiguous_copy_of_transpose(view: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(transpose, clone) pairs that turn a BNSD view back into contiguous BSND."""
    pairs = []
    for t in view.users:
        if not _swaps_seq_and_heads(t):
            continue
        for c in t.users:
            if c.target is aten.clone.default and c.kwargs.get("memory_format") in (None, torch.contiguous_format):
                pairs.append((t, c))
    return pairs


def attention_layout(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> int:
    """Returns how many fused ops changed layout."""
    changed = 0
    for node in list(gm.graph.nodes):
        op = ATTENTION_OPS.get(node.target) if node.op == "call_function" else None
        if op is None or node.kwargs.get("block_table") is not None:
            continue
        out = _output(node, op)
        if out is None:
            continue
        layout = node.kwargs.get("input_layout")
        query, key, value = (node.args[i] for i in (0, op.key_arg, op.value_arg))
        # A BSND output is a different memory order: only when every reader swaps it
        # back to BSND (whose result is then contiguous) can no later view break.
        only_swapped = bool(out.users) and all(_swaps_seq_and_heads(u) for u in out.users)
        view = None
        if layout in ("BNSD", "BNSD_BSND") and "BSND" in op.layouts and \
                all(_swaps_seq_and_heads(t) for t in (query, key, value)) and \
                (only_swapped or layout == "BNSD_BSND"):
            args = list(node.args)
            for i in (0, op.key_arg, op.value_arg):
                args[i] = args[i].args[0]
            view = _retarget(gm, node, out, tuple(args), "BSND")
        elif layout == "BNSD_BSND":
            view = next((u for u in out.users if _swaps_seq_and_heads(u)), None)
        elif layout == "BNSD":
            pairs = _contiguous_copy_of_transpose(out)
            if pairs and only_swapped and "BNSD_BSND" in op.layouts:
                view = _retarget(gm, node, out, node.args, "BNSD_BSND")
            elif pairs and val(query).shape[2] == 1:
                for _, copy in pairs:
                    _single_token_view(gm, out, copy)
                changed += 1
        if view is None:
            continue
        for _, copy in _contiguous_copy_of_transpose(view):
            copy.replace_all_uses_with(out)  # the op's fresh BSND output is that copy
        site = node.meta.get(SITE)
        if site is not None:
            site.layout = node.kwargs["input_layout"]
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return changed
