"""Rule: a MoE router's softmax and top-k -> npu_moe_gating_top_k_softmax_v2.

The two router forms of transformers' MoE models, after AOT::

    gpt-oss (renorm 1)                      Qwen2/3-MoE, Mixtral (renorm 0)
    top, ids = topk(logits, k)              probs = _softmax(logits, -1)
    weights  = _softmax(top, -1)            top, ids = topk(probs, k)
                                            (then optionally top / top.sum(-1))

are exactly the op's two modes: renorm 1 softmaxes the top k logits, renorm 0
takes the top k of the softmax. The rewrite replaces the softmax and the top-k
by one op call; the op's ids are int32, so a cast gives the graph topk's int64
back. A renormalisation after the top-k (Mixtral's division by the sum) stays
as written: it is not part of the op.

Checks:
- topk over the last dim, largest, sorted (the op's values are in descending
  order), k a static int; the softmax over the last dim, without a dtype change;
- renorm 1: the top-k logits feed only the softmax; renorm 0: the
  probabilities are float32 (the op ranks float32 probabilities; a graph that
  ranks float16/bfloat16 ones may break a tie the rounding made differently, so
  it stays), and feed only the top-k or also other nodes (the op's
  output_softmax gives them);
- an inference graph: the op has no backward (torch_npu's doc: inference only);
- the op's own fake validates the rest (x 2-D/3-D, dtypes, k <= 1024), and the
  replacement must have the replaced values' dtype, shape and strides.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels._library import npu_rules
from ..report import Report, Site
from ._context import PassContext
from ._fx import Rewrite, arg_node, call_arg, is_call, require_same_value, static_int, val
from ._rules import Rule, RuleStats, apply_rules

aten = torch.ops.aten
prims = torch.ops.prims
npu_attn = torch.ops.npu_attn

SOFTMAX_THEN_TOP_K = "moe:router-softmax-top-k"
TOP_K_THEN_SOFTMAX = "moe:router-top-k-softmax"
GATING = npu_attn.npu_moe_gating_top_k_softmax_v2.default


@dataclass(frozen=True)
class RouterSite:
    topk: torch.fx.Node
    softmax: torch.fx.Node
    logits: torch.fx.Node  # the op's x
    k: int
    renorm: int  # 0: softmax, then top-k; 1: top-k, then softmax
    weights: torch.fx.Node | None  # the node whose value the op's y replaces (None: unused)
    ids: torch.fx.Node | None  # topk(...)[1], if used


def _output(node: torch.fx.Node, index: int) -> torch.fx.Node | None:
    return next((u for u in node.users if is_call(u, operator.getitem) and u.args[1] == index), None)


def _last_dim(node: torch.fx.Node, dim: object) -> bool:
    rank = val(node).dim()
    return dim in (-1, rank - 1)


def _is_last_dim_softmax(node: Any) -> bool:
    # _softmax(x, dim, half_to_float=False): same dtype in and out. (_safe_softmax gives
    # 0 for a row of -inf, the op NaN like _softmax: not taken.)
    return is_call(node, aten._softmax.default) and _last_dim(node.args[0], node.args[1]) and not node.args[2]


def match_router(topk: torch.fx.Node) -> RouterSite | None:
    scores = arg_node(topk, 0)
    if not _last_dim(scores, call_arg(topk, 2, "dim", -1)):
        return None
    k = static_int(call_arg(topk, 1, "k", None))
    if k is None or not call_arg(topk, 3, "largest", True) or not call_arg(topk, 4, "sorted", True):
        return None
    top, ids = _output(topk, 0), _output(topk, 1)
    if _is_last_dim_softmax(scores):
        return RouterSite(topk=topk, softmax=scores, logits=arg_node(scores, 0), k=k, renorm=0, weights=top, ids=ids)
    softmaxes = [u for u in (top.users if top is not None else ()) if _is_last_dim_softmax(u)]
    if len(softmaxes) == 1:
        return RouterSite(topk=topk, softmax=softmaxes[0], logits=scores, k=k, renorm=1, weights=softmaxes[0],
                          ids=ids)
    return None


def check_router(site: RouterSite, ctx: PassContext) -> str | None:
    if ctx.graph_name != "inference":
        return (f"npu_moe_gating_top_k_softmax_v2 is inference-only (torch_npu's doc; no backward), and this is "
                f"the {ctx.graph_name} graph of a training step")
    if site.renorm == 1:
        # renorm 1: weights is the softmax of the top-k values
        others = [u.name for u in arg_node(site.softmax, 0).users if u is not site.softmax]
        if others:
            return f"the top-k logits are also read by {others}, which the op does not return"
    else:
        dtype = val(site.softmax).dtype
        if dtype != torch.float32:
            return (f"the router ranks {dtype} probabilities, the op float32 ones: experts tied after rounding to "
                    f"{dtype} could be chosen differently (softmax in float32, as softmax(..., dtype=torch.float32) "
                    "does, is fused)")
    return None


def rewrite_router(rw: Rewrite, site: RouterSite, ctx: PassContext, record: Site) -> list[torch.fx.Node]:
    probs_read = site.renorm == 0 and any(u is not site.topk for u in site.softmax.users)
    kwargs = dict(k=site.k, renorm=site.renorm)
    if probs_read:
        kwargs["output_softmax"] = True
    with npu_rules(ctx.target == "ge"):
        outs = rw.call(GATING, (site.logits,), kwargs, meta_from=site.topk)
        if site.weights is not None:
            weights = rw.call(operator.getitem, (outs, 0))
            require_same_value(site.weights, weights, "npu_moe_gating_top_k_softmax_v2's y")
            rw.replace(site.weights, weights)
        if site.ids is not None:
            ids32 = rw.call(operator.getitem, (outs, 1))
            # prims.convert_element_type: Inductor lowers it and TorchAir converts it (GE Cast).
            ids = rw.call(prims.convert_element_type.default, (ids32, val(site.ids).dtype))
            require_same_value(site.ids, ids, "npu_moe_gating_top_k_softmax_v2's expert_idx (cast)")
            rw.replace(site.ids, ids)
        if probs_read:
            probs = rw.call(operator.getitem, (outs, 2))
            require_same_value(site.softmax, probs, "npu_moe_gating_top_k_softmax_v2's softmax_result")
            rw.replace(site.softmax, probs)
    record.fused_op = "npu_moe_gating_top_k_softmax_v2"
    record.layout = f"k={site.k}, renorm={site.renorm}" + (", output_softmax" if probs_read else "")
    return [n for n in (site.weights, site.ids, site.softmax, site.topk) if n is not None]


ROUTER_RULE = Rule(
    name=TOP_K_THEN_SOFTMAX, kind="moe", anchors=(aten.topk.default,), match=match_router, check=check_router,
    rewrite=rewrite_router, anchor_of=lambda site: site.softmax if site.renorm == 0 else site.topk,
    claims=lambda site: [site.topk, site.softmax],
    pattern_of=lambda site: TOP_K_THEN_SOFTMAX if site.renorm == 1 else SOFTMAX_THEN_TOP_K)


def moe_router_to_gating(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """Rewrite every MoE router's softmax + top-k into npu_moe_gating_top_k_softmax_v2."""
    return apply_rules(gm, (ROUTER_RULE,), report, ctx)
