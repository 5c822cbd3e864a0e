"""Rewrite torch SDPA into the NPU fused attention ops.

After AOT autograd, F.scaled_dot_product_attention appears as one of several
ATen ops (the CPU flash kernel, CUDA flash/efficient kernels, the math
fallback, or the composite op itself). Each becomes an AttentionSite; see
_fused_attention for the conditions and the replacement.
"""

from __future__ import annotations

import torch
from torch.fx.operator_schemas import normalize_function

from ..report import Report
from ._context import PassContext
from ._fused_attention import AttentionSite, apply_to_sites

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
    if node.op != "call_function" or node.target not in SDPA_TARGETS:
        return None
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    kw = normalized.kwargs if normalized is not None else {}
    mask = kw.get("attn_mask", kw.get("attn_bias"))
    return AttentionSite(
        node=node, query=kw["query"], key=kw["key"], value=kw["value"], mask=mask,
        dropout_p=float(kw.get("dropout_p", 0.0)), is_causal=bool(kw.get("is_causal", False)),
        scale=kw.get("scale"), output_index=SDPA_TARGETS[node.target],
    )


def sdpa_to_fused(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> None:
    """Rewrite every SDPA site of `gm` that the fused ops can take."""
    sites = [(site, f"sdpa:{site.node.target.__name__.split('.')[0]}")
             for site in map(match_sdpa, list(gm.graph.nodes)) if site is not None]
    apply_to_sites(gm, sites, report, ctx)
