"""Rule: attention with a sink logit per head -> FIA v2 with learnable_sink.

gpt-oss (transformers' eager attention, its only one) gives every head one
learned logit that joins the softmax and is dropped after it::

    column   = sinks.reshape(1, -1, 1, 1).expand(B, -1, S_q, -1)   # (B, N, S_q, 1)
    combined = cat([scores, column], -1)                            # scores as in EAGER_RULE
    combined = combined - combined.max(-1, keepdim=True).values     # optional
    probs    = softmax(combined, -1)[..., :-1]
    out      = probs @ v

so out = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sink_h)): exactly
npu_fused_infer_attention_score_v2's learnable_sink, the only NPU inference
op that takes one. Subtracting the row max changes no softmax value. The
scores side (scale, masks, biases) and the probs side are read as the
eager rule reads them.

A row whose keys are all masked gives 0 in both: eager's softmax puts all
its weight on the (finite) sink, which is dropped; the op has no key and
adds only the sink to the denominator. So unlike plain attention with a
finfo.min mask, no mean-of-V fix-up is needed. This holds for a finite sink;
a sink of -inf is no sink and would give eager the mean of V on such rows.

On the NPU (the GE target) the op takes learnable_sink only in TND, as
bfloat16, with a value head dim of 64 or 128: a bfloat16 site the BNSD forms
cannot take is written in TND (_attention._rewrite_tnd: q/k/v as (tokens,
heads, D), cumulative lengths, K/V un-repeated; the pattern gets "+repeat_kv"
then, as gqa_repeat_kv marks the BNSD ones). The sink keeps the dtype the
program concatenates it in; a float32 site is never cast.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..report import Report, Site
from ._attention import AttentionSite, rewrite_attention
from ._context import PassContext
from ._fx import Rewrite, is_call, same_shape, val
from ._rules import Rule, RuleStats, apply_rules
from .eager_attention_to_fused import (SOFTMAXES, check_site, keeps_element_order, site_from_chains, walk_probs,
                                       walk_scores)
from .sdpa_to_fused import record_fused

aten = torch.ops.aten


def _minus_row_max(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """(x, the nodes of the subtraction) when node is x - max(x, -1, keepdim=True), else (node, [])."""
    if not is_call(node, aten.sub.Tensor) or len(node.args) > 2 or node.kwargs:
        return node, []
    x, row_max = node.args
    if is_call(row_max, aten.amax.default):
        dims = row_max.args[1] if len(row_max.args) > 1 else []
        keep = row_max.args[2] if len(row_max.args) > 2 else row_max.kwargs.get("keepdim", False)
        if row_max.args[0] is x and list(dims) in ([-1], [val(x).dim() - 1]) and keep:
            return x, [node, row_max]
    if row_max is not None and getattr(row_max.target, "__name__", "") == "getitem" and row_max.args[1] == 0:
        reduction = row_max.args[0]
        if is_call(reduction, aten.max.dim) and reduction.args[0] is x and \
                reduction.args[1] in (-1, val(x).dim() - 1) and len(reduction.args) > 2 and reduction.args[2]:
            return x, [node, row_max, reduction]
    return node, []


def _per_head_sink(column: torch.fx.Node, heads: object) -> torch.fx.Node | None:
    """The (1, N, 1, 1) node behind a (B, N, S_q, 1) column that is constant over
    batch and query rows, or None."""
    node = column
    while isinstance(node, torch.fx.Node):
        shape = val(node).shape if isinstance(val(node), torch.Tensor) else None
        if shape is not None and len(shape) == 4 and statically_known_true(shape[1] == heads) and all(
                statically_known_true(shape[i] == 1) for i in (0, 2, 3)):
            return node
        if is_call(node, aten.expand.default) or keeps_element_order(node):
            node = node.args[0]
            continue
        return None
    return None


def _drops_last_column(node: torch.fx.Node, columns: object) -> bool:
    """node is probs[..., :-1] (or [..., :columns - 1]) along the last dim."""
    if not is_call(node, aten.slice.Tensor):
        return False
    rank = val(node.args[0]).dim()
    dim = node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    if dim not in (-1, rank - 1) or start not in (None, 0) or step != 1:
        return False
    return end == -1 or (end is not None and statically_known_true(end == columns - 1))


def match_sink_attention(softmax: torch.fx.Node) -> AttentionSite | None:
    if val(softmax).dim() != 4 or softmax.args[1] not in (-1, 3):
        return None
    combined, max_nodes = _minus_row_max(softmax.args[0])
    if not is_call(combined, aten.cat.default) or (combined.args[1] if len(combined.args) > 1 else 0) not in (-1, 3):
        return None
    parts = combined.args[0]
    if len(parts) != 2 or not statically_known_true(val(parts[1]).shape[-1] == 1):
        return None
    scores_node, column = parts
    sink = _per_head_sink(column, val(scores_node).shape[1])
    if sink is None:
        return None
    kept = [u for u in softmax.users]
    if len(kept) != 1 or not _drops_last_column(kept[0], val(softmax).shape[-1]):
        return None
    scores = walk_scores(scores_node)
    tail = walk_probs(kept[0])
    if scores is None or tail is None or scores.split is None:
        return None
    bmm2, prob_chain = tail
    if not same_shape(val(kept[0]).shape, val(scores_node).shape):
        return None
    return site_from_chains("eager:attention-with-sinks", softmax, scores, bmm2, prob_chain,
                            around_softmax=(combined, *max_nodes, softmax, kept[0]), sink=sink)


def rewrite_sink_site(rw: Rewrite, site: AttentionSite, ctx: PassContext, record: Site) -> list[torch.fx.Node]:
    fused = rewrite_attention(rw, site, ctx)
    record_fused(record, fused)
    if fused.layout == "TND" and fused.gqa_ratio > 1:  # K/V read un-repeated, as gqa_repeat_kv does for BNSD
        record.pattern += "+repeat_kv"
    return [site.output, *site.internal, *fused.replaced]


SINK_RULE = Rule(
    name="eager:attention-with-sinks", kind="attention", anchors=SOFTMAXES, match=match_sink_attention,
    check=check_site, rewrite=rewrite_sink_site, anchor_of=lambda site: site.output, claims=lambda site: [site.anchor])


def attention_sinks_to_fused(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """Rewrite every attention with per-head sink logits that FIA v2 takes."""
    return apply_rules(gm, (SINK_RULE,), report, ctx)
