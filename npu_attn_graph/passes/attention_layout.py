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

import torch

from ..report import Report
from ._context import PassContext
from ._fx import insert_call

aten = torch.ops.aten
npu_attn = torch.ops.npu_attn

# Fused op -> the BSND-in/BSND-out and BNSD-in/BSND-out layouts it accepts.
OPS = {
    npu_attn.npu_prompt_flash_attention.default: ("BSND", "BNSD_BSND"),
    npu_attn.npu_fused_infer_attention_score.default: ("BSND", "BNSD_BSND"),
    npu_attn.npu_incre_flash_attention.default: ("BSND", None),
}
SEQ_HEAD_SWAPS = ((1, 2), (2, 1), (-3, -2), (-2, -3))


def _swaps_seq_and_heads(node: object) -> bool:
    """transpose(x, 1, 2) or permute(x, [0, 2, 1, 3]) of a 4-D tensor."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.transpose.int:
        return tuple(node.args[1:3]) in SEQ_HEAD_SWAPS and node.args[0].meta["val"].dim() == 4
    return node.target is aten.permute.default and list(node.args[1]) == [0, 2, 1, 3]


def _output(node: torch.fx.Node) -> torch.fx.Node:
    """The attention tensor of a fused node (FIA returns (out, lse))."""
    if node.target is npu_attn.npu_fused_infer_attention_score.default:
        (getitem,) = [u for u in node.users if u.args[1] == 0]
        return getitem
    return node


def _fake(node: torch.fx.Node):
    return node.meta["val"]


def _retarget(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, layout: str) -> torch.fx.Node:
    """Give the fused node new inputs/layout; return a BNSD view of its (now BSND) output."""
    out = _output(node)
    users = list(out.users)
    writes_bsnd = node.kwargs.get("input_layout") == "BNSD_BSND"
    node.args = args
    node.kwargs = {**node.kwargs, "input_layout": layout}
    if writes_bsnd:  # the output memory is unchanged; a permute already views it as BNSD
        return next(u for u in users if _swaps_seq_and_heads(u))
    with _fake(node.args[0]).fake_mode:
        node.meta["val"] = node.target(*torch.fx.node.map_arg(node.args, _fake),
                                       **torch.fx.node.map_arg(node.kwargs, _fake))
        if out is not node:
            out.meta["val"] = node.meta["val"][0]
    view = insert_call(gm, aten.permute.default, (out, [0, 2, 1, 3]), after=out)
    for user in users:
        user.replace_input_with(out, view)
    return view


def _single_token_view(gm: torch.fx.GraphModule, out: torch.fx.Node, copy: torch.fx.Node) -> None:
    """S == 1: the contiguous copy of the BSND transpose has the op's memory order."""
    view = insert_call(gm, aten.view.default, (out, list(_fake(copy).shape)), after=out)
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


def attention_layout(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> None:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in OPS or node.kwargs.get("block_table") is not None:
            continue
        bsnd_in, bnsd_in_bsnd_out = OPS[node.target]
        layout = node.kwargs.get("input_layout")
        query, key, value = node.args[:3]
        view = None
        if layout in ("BNSD", "BNSD_BSND") and all(_swaps_seq_and_heads(t) for t in (query, key, value)):
            view = _retarget(gm, node, (query.args[0], key.args[0], value.args[0], *node.args[3:]), bsnd_in)
        elif layout == "BNSD_BSND":
            view = next((u for u in _output(node).users if _swaps_seq_and_heads(u)), None)
        elif layout == "BNSD":
            pairs = _contiguous_copy_of_transpose(_output(node))
            if pairs and bnsd_in_bsnd_out is not None:
                view = _retarget(gm, node, node.args, bnsd_in_bsnd_out)
            elif pairs and _fake(query).shape[2] == 1:
                for _, copy in pairs:
                    _single_token_view(gm, _output(node), copy)
                changed = True
        if view is None:
            continue
        for _, copy in _contiguous_copy_of_transpose(view):
            copy.replace_all_uses_with(_output(node))  # the op's fresh BSND output is that copy
        site = node.meta.get("npu_attn_site")
        if site is not None:
            site.layout = node.kwargs["input_layout"]
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
