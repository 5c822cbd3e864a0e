"""Rule: torch SDPA -> the NPU fused attention ops.

After AOT autograd, F.scaled_dot_product_attention appears as one of several
ATen ops (the CPU flash kernel, CUDA flash/efficient kernels, the math
fallback, or the composite op itself). Pattern: one of those nodes, whose
attention output is the only output used. attn_mask is a score term (a bool
"keep" mask, or a float mask added to the scores; see _masks); is_causal
becomes a causal sparse mode. The checks and the replacement are shared with
every attention rule (_attention).
"""

from __future__ import annotations

import math
import operator
from typing import cast

import torch
from torch.fx.operator_schemas import normalize_function

from ..report import Report, Site
from ._attention import AttentionSite, Operand, float32_left_unfused, rewrite_attention, structure_reason
from ._context import PassContext
from ._fx import Rewrite, val
from ._masks import ScoreTerm
from ._rules import Rule, RuleStats, apply_rules

aten = torch.ops.aten

# SDPA's ATen forms, and the index of the attention output in their result.
SDPA_TARGETS: dict[object, int | None] = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: 0,
    aten._scaled_dot_product_flash_attention.default: 0,
    aten._scaled_dot_product_efficient_attention.default: 0,
    aten._scaled_dot_product_attention_math.default: 0,
    aten.scaled_dot_product_attention.default: None,  # returns the tensor itself
}


def match_sdpa(node: torch.fx.Node) -> AttentionSite | None:
    target = cast(torch._ops.OpOverload, node.target)  # an anchor: one of SDPA_TARGETS
    normalized = normalize_function(target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:
        return None
    kw = normalized.kwargs
    index = SDPA_TARGETS[target]
    output, unused_reason = node, None
    if index is not None:
        attention = [u for u in node.users if u.target is operator.getitem and u.args[1] == index]
        others = [u for u in node.users if u not in attention]
        if others:
            unused_reason = "the logsumexp/auxiliary outputs are used (a training graph needs npu_fusion_attention)"
        if len(attention) != 1:
            return None  # no attention output in use: nothing to replace
        output = attention[0]
    mask = kw.get("attn_mask", kw.get("attn_bias"))
    terms: tuple[ScoreTerm, ...] = ()
    if mask is not None:
        if val(mask).dtype == torch.bool:
            # SDPA keeps True positions; a row with nothing kept gives 0, as the fused ops do.
            terms = (ScoreTerm(mask, val(output).dtype, fill=-math.inf, fill_where=False),)
        else:
            terms = (ScoreTerm(mask, val(output).dtype),)
    query, key = kw["query"], kw["key"]
    return AttentionSite(
        pattern=f"sdpa:{target.__name__.split('.')[0]}", anchor=node,
        query=Operand(query), key=Operand(key), value=Operand(kw["value"]), output=output,
        scale=kw.get("scale"), terms=terms, score_rank=max(val(query).dim(), val(key).dim()),
        is_causal=bool(kw.get("is_causal", False)), dropout_p=float(kw.get("dropout_p", 0.0)),
        form_reason=unused_reason)


def check_site(site: AttentionSite, ctx: PassContext) -> str | None:
    return structure_reason(site) or float32_left_unfused(site, ctx)


def rewrite_site(rw: Rewrite, site: AttentionSite, ctx: PassContext, record: Site) -> list[torch.fx.Node]:
    fused = rewrite_attention(rw, site, ctx)
    record_fused(record, fused)
    return [site.output, site.anchor, *site.internal]


def record_fused(record: Site, fused) -> None:
    record.fused_op, record.layout, record.sparse_mode = fused.op.name, fused.layout, fused.sparse_mode
    record.gqa_ratio = fused.gqa_ratio
    record.notes.extend(fused.notes)
    fused.node.meta["npu_attn_site"] = record  # later passes refine the record


SDPA_RULE = Rule(
    name="sdpa", kind="attention", anchors=tuple(SDPA_TARGETS), match=match_sdpa, check=check_site,
    rewrite=rewrite_site, anchor_of=lambda site: site.output, claims=lambda site: [site.anchor],
    pattern_of=lambda site: site.pattern)


def sdpa_to_fused(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """Rewrite every SDPA site of `gm` that a fused op takes."""
    return apply_rules(gm, (SDPA_RULE,), report, ctx)
