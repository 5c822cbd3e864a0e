"""Training graphs: SDPA becomes npu_fusion_attention before AOT autograd.

The inference ops cannot take part in a backward pass, and after AOT the
forward and backward graphs hold SDPA's forward and backward kernels apart,
tied by the saved logsumexp. So when gradients are needed this pass runs on
dynamo's graph, before AOT: each F.scaled_dot_product_attention call becomes
npu_fusion_attention (BNSD). Its autograd formula (torch.library.register_autograd)
then makes AOT put npu_fusion_attention in the forward graph and
npu_fusion_attention_grad in the backward graph.

Conditions: dropout_p == 0 (the fused op's dropout RNG differs from torch's,
so the results could not be equal); not inside torch.autocast (SDPA would run
in autocast's dtype, the custom op would not); 4-D BNSD q/k/v; the mask is None or
boolean (negated to the NPU convention, sparse_mode 1); is_causal becomes
sparse_mode 3 when query and key lengths are equal and 2 otherwise, with the
compressed 2048x2048 mask.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels._library import COMPRESSED_MASK_SIZE
from ..report import Report, Site, node_location
from ._context import PassContext
from ._fx import dynamo_val
from .training_eager_attention_to_fusion import AUTOCAST, mark_autocast_regions, mark_left_in_training
from .training_packed_to_tnd import mark_site

SDPA_SIGNATURE = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None)


def fusion_attention_output(query, key, value, atten_mask, scale: float, sparse_mode: int):
    """The attention output of npu_fusion_attention in BNSD (what SDPA returns)."""
    if sparse_mode in (2, 3):
        atten_mask = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool,
                                device=query.device).triu(1)
    elif atten_mask is not None:
        atten_mask = atten_mask.logical_not()  # SDPA keeps True; the NPU masks True out
    return torch.ops.npu_attn.npu_fusion_attention(query, key, value, query.shape[1], "BNSD",
                                                   atten_mask=atten_mask, scale=scale,
                                                   sparse_mode=sparse_mode)[0]


def _reason_and_mode(args: dict) -> tuple[str | None, int]:
    q, k, mask = dynamo_val(args["query"]), dynamo_val(args["key"]), args["attn_mask"]
    if args["dropout_p"] != 0:
        return f"dropout_p={args['dropout_p']} (npu_fusion_attention's dropout RNG differs from torch's)", 0
    if q is None or k is None or q.dim() != 4 or k.dim() != 4:
        return "q/k/v are not 4-D BNSD tensors", 0
    if q.shape[1] % k.shape[1]:
        return f"num_heads {q.shape[1]} not divisible by key heads {k.shape[1]}", 0
    if mask is not None:
        if args["is_causal"]:
            return "both attn_mask and is_causal given", 0
        if dynamo_val(mask) is None or dynamo_val(mask).dtype != torch.bool:
            return "a float attn_mask (only boolean masks are converted in training graphs)", 0
        return None, 1
    if args["is_causal"]:
        return None, 3 if statically_known_true(q.shape[2] == k.shape[2]) else 2
    return None, 0


def training_sdpa_to_fusion(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> int:
    """Returns how many SDPA calls became npu_fusion_attention."""
    graph_name = ctx.graph_name
    changed = 0
    mark_autocast_regions(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        bound = SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        args = bound.arguments
        layer, source = node_location(node)
        site = Site(kind="attention", graph=graph_name, layer=layer, source=source, pattern="sdpa(training)")
        report.sites.append(site)
        site.reason, sparse_mode = _reason_and_mode(args)
        q_value = dynamo_val(args["query"])
        if site.reason is None and (node.meta.get(AUTOCAST) or (
                q_value is not None and torch.is_autocast_enabled(q_value.device.type))):
            site.reason = ("inside torch.autocast: SDPA runs in autocast's dtype, which npu_fusion_attention (not an "
                           "autocast op) would not follow")
        if site.reason is not None:
            # Listed here with its reason: what AOT makes of the call (SDPA's ATen
            # kernels, or its math decomposition) is not listed again after AOT.
            mark_left_in_training(node, site)
            continue
        q = dynamo_val(args["query"])
        scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(
                fusion_attention_output,
                (args["query"], args["key"], args["value"], args["attn_mask"], scale, sparse_mode))
        fused.meta.update(node.meta)
        mark_site(fused, site)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        site.fused_op, site.layout = "npu_fusion_attention", "BNSD"
        site.sparse_mode = sparse_mode
        site.gqa_ratio = q.shape[1] // dynamo_val(args["key"]).shape[1]
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
