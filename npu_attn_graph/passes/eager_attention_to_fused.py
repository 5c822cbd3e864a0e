"""Rewrite hand-written (eager) attention into the NPU fused attention ops.

The chain, as it appears after AOT (transformers' eager_attention_forward,
GPT-2's and BERT's eager attention all reach this form)::

    scores  = bmm(flatten(q), flatten(k^T)).view(B, N, S, S_kv)
    scores  = scores * scale | scores / c | scores          (scale on q also works)
    scores  = scores + mask | where(keep, scores, min) | masked_fill(scores, masked, min) | scores
    probs   = softmax(scores [upcast to fp32], -1) [cast back] [dropout in eval: clone]
    out     = bmm(flatten(probs), flatten(v)).view(B, N, S, Dv)

flatten() is the expand / clone / view / _unsafe_view that torch.matmul uses
to batch 4-D operands. The pattern is anchored at the softmax: the core
matching steps are small functions below, each returning None when the graph
does not have that shape. A matched chain becomes an AttentionSite and goes
through the same conditions and replacement as SDPA sites
(_fused_attention), including the check that no intermediate (e.g. returned
attention weights) is used outside the chain.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg, is_match

from ..report import Report
from ._context import PassContext
from ._fused_attention import AttentionSite, _scalar_value, apply_to_sites

aten = torch.ops.aten

SOFTMAXES = (aten._softmax.default, aten.softmax.int, aten._safe_softmax.default)
FLATTENING = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default)
SCALE_PATTERNS = (
    (CallFunction(aten.mul.Tensor, KeywordArg("scores"), KeywordArg("factor")), False),
    (CallFunction(aten.div.Tensor, KeywordArg("scores"), KeywordArg("factor")), True),
)


def _val(node: object):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_noop_expand(node: torch.fx.Node) -> bool:
    return node.target is aten.expand.default and tuple(_val(node.args[0]).shape) == tuple(_val(node).shape)


def unflatten(operand: torch.fx.Node) -> torch.fx.Node | None:
    """The 4-D (B, N, X, Y) tensor a 3-D bmm operand (B*N, X, Y) was batched from."""
    node = operand
    while True:
        val = _val(node)
        if val is None:
            return None
        if val.dim() == 4 and not (node.target is aten.clone.default or _is_noop_expand(node)):
            return node
        if node.target in FLATTENING or _is_noop_expand(node):
            node = node.args[0]
            continue
        return None


def untransposed(kt: torch.fx.Node) -> torch.fx.Node | None:
    """k from k^T: transpose of the last two dims of a 4-D tensor."""
    if kt.target is aten.transpose.int and {d % 4 for d in kt.args[1:3]} == {2, 3}:
        return kt.args[0]
    if kt.target is aten.permute.default and list(kt.args[1]) in ([0, 1, 3, 2], [0, 1, -1, -2]):
        return kt.args[0]
    return None


def _skip_cast(node: torch.fx.Node) -> torch.fx.Node:
    """Look through a dtype cast (the fp32 softmax upcast)."""
    if node.target in (aten._to_copy.default, aten.to.dtype) and _val(node.args[0]) is not None:
        return node.args[0]
    return node


def _split_mask(x: torch.fx.Node):
    """(scores, mask node or None, mask is in NPU convention, nodes consumed)."""
    if x.target is aten.add.Tensor:
        a, b = x.args[:2]
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
            scores, mask = (a, b) if _from_bmm(_strip_scale(a)) else (b, a)
            return scores, mask, False, (x,)
    if x.target is aten.where.self:  # GPT-2 style: where(keep, scores, lowest)
        keep, scores, filler = x.args
        lowest = torch.finfo(_val(x).dtype).min
        if _scalar_value(filler) in (lowest, float("-inf")) and _val(keep).dtype == torch.bool:
            return scores, keep, False, (x,)
    if x.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        scores, masked, filler = x.args
        lowest = torch.finfo(_val(x).dtype).min
        if _scalar_value(filler) in (lowest, float("-inf")):
            return scores, masked, True, (x,)
    return x, None, False, ()


def _strip_scale(x: object) -> object:
    return _split_scale(x)[0] if isinstance(x, torch.fx.Node) else x


def _split_scale(x: torch.fx.Node):
    """(raw scores, scale, nodes consumed, runtime scale node or None)."""
    for pattern, divides in SCALE_PATTERNS:
        match = pattern.match(x)
        if is_match(match) and isinstance(match.kwargs["scores"], torch.fx.Node):
            scores, factor_node = match.kwargs["scores"], match.kwargs["factor"]
            factor = _scalar_value(factor_node)
            if factor is not None and factor != 0:
                return scores, (1.0 / factor if divides else factor), (x,), None
            if _is_runtime_scalar(factor_node) and _from_bmm(scores):
                return scores, 1.0, (x,), factor_node  # a site, left alone with the reason
    return x, 1.0, (), None


def _is_runtime_scalar(node: object) -> bool:
    """A 0-d tensor computed at run time, such as a float that dynamic=True made a graph input."""
    val = _val(node)
    return isinstance(val, torch.Tensor) and val.dim() == 0


QK_SCORES = CallFunction((aten.view.default, aten._unsafe_view.default),
                         CallFunction(aten.bmm.default, KeywordArg("q_flat"), KeywordArg("kt_flat")), Ignored())


def _from_bmm(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and is_match(QK_SCORES.match(node))


def _continues_chain(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    if user.target is aten.bmm.default:
        return user.args[0] is node
    return user.target in (aten._to_copy.default, aten.clone.default, aten.view.default,
                           aten._unsafe_view.default) or _is_noop_expand(user)


def _probs_times_value(probs: torch.fx.Node):
    """Follow the softmax output to out = bmm(flatten(probs), flatten(v)).view(...)."""
    chain = []
    node = probs
    while True:
        # Other users (say, returned attention weights) do not hide the chain;
        # the site's conditions report them.
        steps = [u for u in node.users if _continues_chain(node, u)]
        if len(steps) != 1:
            return None
        user = steps[0]
        if user.target is aten.bmm.default:
            break
        chain.append(user)
        node = user
    bmm = user
    out = _only_user(bmm)
    if out is None or out.target not in (aten.view.default, aten._unsafe_view.default) or _val(out).dim() != 4:
        return None
    value = unflatten(bmm.args[1])
    return (out, value, (*chain, bmm)) if value is not None else None


def match_eager_attention(softmax: torch.fx.Node) -> AttentionSite | None:
    if softmax.op != "call_function" or softmax.target not in SOFTMAXES:
        return None
    if softmax.args[1] not in (-1, 3):
        return None
    masked = _skip_cast(softmax.args[0])
    scaled, mask, mask_is_npu, mask_nodes = _split_mask(masked)
    raw, scale, scale_nodes, runtime_scale = _split_scale(scaled)
    match = QK_SCORES.match(raw)
    if not is_match(match):
        return None
    query = unflatten(match.kwargs["q_flat"])
    kt = unflatten(match.kwargs["kt_flat"])
    key = untransposed(kt) if kt is not None else None
    tail = _probs_times_value(softmax)
    if query is None or key is None or tail is None:
        return None
    out, value, tail_nodes = tail
    internal = [softmax, *mask_nodes, *scale_nodes, raw, raw.args[0], *tail_nodes]
    if masked is not softmax.args[0]:
        internal.append(softmax.args[0])
    return AttentionSite(node=out, query=query, key=key, value=value, mask=mask, dropout_p=0.0,
                         is_causal=False, scale=scale, output_index=None, internal=tuple(internal),
                         mask_is_npu=mask_is_npu, runtime_scale=runtime_scale)


def eager_attention_to_fused(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> None:
    """Rewrite every hand-written attention chain of `gm` that the fused ops can take."""
    sites = []
    for node in list(gm.graph.nodes):
        site = match_eager_attention(node)
        if site is not None:
            sites.append((site, "eager:matmul-softmax-matmul"))
    apply_to_sites(gm, sites, report, ctx)
