"""The report's completeness: every attention-shaped softmax and every write into
a cache-shaped graph input is listed, whether a rule matched it or not.

Runs after every rewrite pass (and also when passes are deselected), on what
is left in the graph:

- attention: a softmax over the last dim whose input comes from a batched
  matmul (bmm) and whose output flows into the first operand of a bmm, through
  at most a few element-wise, view, cast, concatenation or slicing steps. A
  rule that matched and refused such a softmax has listed it already (it is
  claimed); every other one is listed here with the ops that kept every rule
  from matching it (e.g. tanh: a logit softcap; cat: a sink column). Linear
  layers are 2-D matmuls (mm/addmm), so routers and classifiers are not
  attention-shaped.
- SDPA: a scaled_dot_product_attention call (any of its ATen forms) left in
  the graph, which happens only when sdpa_to_fused did not run (that rule
  lists every call it sees, fused or refused).
- KV caches: a graph input or buffer of floating dtype and rank >= 3 that the
  graph writes (the copy_ into it that AOT functionalization leaves) and that
  no rule has claimed.
"""

from __future__ import annotations

import operator
from typing import cast

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..report import Report, Site, node_location
from ._context import PassContext
from ._fx import CLAIMED, SOFTMAXES, is_call, val
from .eager_attention_to_fused import scale_factor
from .sdpa_to_fused import SDPA_TARGETS

aten = torch.ops.aten

MATMULS = (aten.bmm.default, aten.baddbmm.default)
# How far a softmax may be from its matmuls and still be attention: enough for
# scale, casts, masks, softcap, sinks and dropout, not enough to reach another layer.
MAX_STEPS = 12
# Steps the attention rules read; the rest are named as what stopped them.
KNOWN = {"view", "_unsafe_view", "reshape", "expand", "clone", "_to_copy", "convert_element_type", "mul", "div",
         "add", "sub", "where", "masked_fill", "permute", "transpose", "unsqueeze", "squeeze", "alias", "getitem"}
KV_PASSES = ("static_cache_update", "sliding_window_cache_update", "paged_cache_update")
HINTS = {"tanh": "tanh (a logit softcap)", "cat": "cat (e.g. a sink logit column)",
         "slice": "slice (e.g. dropping a sink column)", "native_dropout": "dropout in training mode",
         "bernoulli": "random dropout"}


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _path_back(start: torch.fx.Node) -> list[torch.fx.Node] | None:
    """Nodes from `start` back to a bmm through tensor inputs (breadth first), or None."""
    parents: dict[torch.fx.Node, torch.fx.Node | None] = {start: None}
    frontier = [start]
    for _ in range(MAX_STEPS):
        nxt = []
        for node in frontier:
            if is_call(node, MATMULS):
                path = []
                walk: torch.fx.Node | None = node
                while walk is not None:
                    path.append(walk)
                    walk = parents[walk]
                return path
            if node.op != "call_function" or is_call(node, SOFTMAXES):
                continue
            for arg in node.all_input_nodes:
                if arg not in parents and isinstance(val(arg), torch.Tensor):
                    parents[arg] = node
                    nxt.append(arg)
        frontier = nxt
    return None


def _path_forward(softmax: torch.fx.Node) -> list[torch.fx.Node] | None:
    """Nodes from the softmax to a bmm that reads it as its first operand, or None.
    Over a single key the product with V is a broadcast multiply (einsum makes one): the
    probabilities as they reach it have one column (the softmax's only one, or the one left
    after a sink column is dropped)."""
    parents: dict[torch.fx.Node, torch.fx.Node | None] = {softmax: None}
    frontier = [softmax]
    for _ in range(MAX_STEPS):
        nxt = []
        for node in frontier:
            for user in node.users:
                if user in parents:
                    continue
                if (is_call(user, MATMULS) and user.args[0 if user.target is aten.bmm.default else 1] is node) or \
                        (is_call(user, aten.mul.Tensor) and statically_known_true(val(node).shape[-1] == 1)):
                    path = [node]
                    while (parent := parents[path[-1]]) is not None:
                        path.append(parent)
                    return path[::-1]
                if user.op == "call_function" and isinstance(val(user), torch.Tensor) and \
                        not is_call(user, SOFTMAXES + MATMULS):
                    parents[user] = node
                    nxt.append(user)
        frontier = nxt
    return None


def attention_shaped(softmax: torch.fx.Node) -> tuple[list[torch.fx.Node], list[torch.fx.Node]] | None:
    """(scores path, probs path) when the softmax is attention-shaped."""
    if not is_call(softmax, SOFTMAXES):
        return None
    rank = val(softmax).dim()
    if rank < 3 or softmax.args[1] not in (-1, rank - 1):
        return None
    back = _path_back(cast(torch.fx.Node, softmax.args[0]))  # the scores node
    if back is None:
        return None
    forward = _path_forward(softmax)
    if forward is None:
        return None
    return back, forward


def _unknown_steps(nodes: list[torch.fx.Node]) -> list[str]:
    names = []
    for node in nodes:
        if node.op != "call_function" or is_call(node, MATMULS + SOFTMAXES):
            continue
        name = _op_name(node)
        if name not in KNOWN and HINTS.get(name, name) not in names:
            names.append(HINTS.get(name, name))
    return names


def softcap_reason(back: list[torch.fx.Node]) -> str | None:
    """The reason for a logit softcap, cap * tanh(scores / cap), on the scores path, or None.

    No NPU inference attention op (prompt, incremental, fused infer v1/v2)
    applies a function between the scores and the softmax, so such a site stays
    unfused. Gemma2 spells it with the config field attn_logit_softcapping.
    """
    for node in back:
        if not is_call(node, aten.tanh.default):
            continue
        outer = next(iter(node.users)) if len(node.users) == 1 else None
        inner_scaled = scale_factor(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        outer_scaled = scale_factor(outer) if outer is not None else None
        if inner_scaled and outer_scaled and outer_scaled[0] is node and \
                abs(inner_scaled[1] * outer_scaled[1] - 1.0) < 1e-6:
            cap = outer_scaled[1]
            spelled = f"tanh(scores / {cap:g}) * {cap:g}"
        else:
            spelled = "tanh on the scores"
        return (f"logit softcap {spelled} (transformers' config field attn_logit_softcapping): no NPU inference "
                f"attention op applies a softcap to the scores before the softmax, so the site stays as written")
    return None


def _attention_reason(softmax: torch.fx.Node, ctx_passes: set[str], back, forward) -> str:
    if not ({"sdpa_to_fused", "eager_attention_to_fused", "attention_sinks_to_fused"} & ctx_passes):
        return "the attention passes were not selected"
    softcap = softcap_reason(back)
    if softcap is not None:
        return softcap
    unknown = _unknown_steps(back) + [s for s in _unknown_steps(forward) if s not in _unknown_steps(back)]
    if unknown:
        return f"no rule matches this attention form: the scores pass through {', '.join(unknown)}"
    return ("no rule matches this attention form (the matmul operands or the reshapes between them are not "
            "read as (batch, head) pairs)")


def _cache_shaped(node: torch.fx.Node) -> bool:
    v = val(node)
    return node.op == "placeholder" and isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.dim() >= 3


def _write_description(copy: torch.fx.Node) -> str:
    ops: list[str] = []
    node = copy.args[1]
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and len(ops) < 4:
        ops.append(_op_name(node))
        node = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    return " <- ".join(ops) if ops else copy.args[1].name if isinstance(copy.args[1], torch.fx.Node) else "?"


def report_unfused_sites(gm: torch.fx.GraphModule, report: Report, ctx: PassContext,
                         selected: set[str]) -> int:
    """List what no rule has listed; returns how many sites were added."""
    added = 0
    for node in gm.graph.nodes:
        if CLAIMED in node.meta:
            continue
        if is_call(node, SOFTMAXES):
            paths = attention_shaped(node)
            if paths is None:
                continue
            reason = _attention_reason(node, selected, *paths)
            kind, pattern = "attention", "attention-shaped softmax"
        elif is_call(node, tuple(SDPA_TARGETS)):
            kind, pattern = "attention", f"sdpa:{_op_name(node)}"
            reason = ("the attention passes were not selected" if "sdpa_to_fused" not in selected else
                      "no rule listed this scaled_dot_product_attention call")
        elif is_call(node, aten.copy_.default) and _cache_shaped(node.args[0]):
            kind, pattern = "kv_update", "write into a graph input"
            reason = (f"no rule matches this write into {node.args[0].name} (shape "
                      f"{tuple(val(node.args[0]).shape)}): its new value is {_write_description(node)}")
            unselected = [p for p in KV_PASSES if p not in selected]
            if unselected:
                reason += f" (not run: {', '.join(unselected)})"
        else:
            continue
        layer, source = node_location(node)
        site = Site(kind=kind, graph=ctx.graph_name, layer=layer, source=source, pattern=pattern, reason=reason)
        node.meta[CLAIMED] = site
        report.sites.append(site)
        added += 1
    return added
