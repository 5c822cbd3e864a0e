"""Rule: a sorted-experts MoE block -> the NPU's MoE ops.

transformers' default experts implementation (integrations/moe.py,
grouped_mm_experts_forward; gpt-oss, Mixtral-style models with
``experts_implementation="grouped_mm"``) routes the token-expert pairs like
this after AOT, for E experts and top-k ids from a router::

    ids_sorted, perm = sort(top_k_index.view(-1))
    x_sorted  = hidden[perm // k]
    counts    = histc(ids_sorted.float(), bins=E, min=0, max=E-1)   # .int() off CPU
    offsets   = cumsum(counts, 0, dtype=int32)                     # each expert's row end
    y         = transformers.grouped_mm_fallback(x_sorted, W, offsets)   # one or more
                (aten._grouped_mm(x_sorted, W, offsets) for bfloat16)
    ...
    inv_perm  = index_put(empty_like(perm), [perm], arange(S))     # the inverse permutation
    out       = weighted[inv_perm].view(T, k, H).sum(1)

TorchAir converts none of histc, the transformers custom op or index_put, so
the model is not one GE graph. The rewrite (all of it, or nothing):

- histc + cumsum -> npu_moe_compute_expert_tokens(ids_sorted.int(), E): for
  ascending ids in [0, E) the row end of every expert, which is exactly the
  cumulative histogram;
- each grouped_mm_fallback / _grouped_mm(x, W, offsets) -> npu_grouped_matmul([x], [W],
  group_list=ends.long(), split_item=3, group_type=0, group_list_type=0)[0]:
  rows [ends[e-1], ends[e]) times W[e];
- index_put(empty_like(perm), [perm], arange(S)) -> npu_scatter_nd_update(
  empty_like(perm), perm.unsqueeze(-1), arange(S)): perm is a permutation
  (sort's indices), so every position is written exactly once, as index_put
  does (any 1-D target and values of perm's length; Inductor's decompositions
  spell them empty and prims.iota).

Check: the ids must be known to lie in [0, E): they are top-k indices over a
last dimension of E (a router's logits). Expert parallelism pushes sentinel ids
>= E through the same code; histc drops them, so the counts end before the last
row and grouped_mm_fallback writes zeros there, which the NPU's grouped matmul
leaves unwritten; such a block is left alone, with that reason. The ops' own
fakes validate the site (dtypes, shapes) before anything is committed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels._library import npu_rules
from ..report import Report, Site
from ._context import PassContext
from ._fx import CASTS, Rewrite, RewriteRefused, arg_node, call_arg, is_call, static_int, val
from ._rules import Rule, RuleStats, apply_rules

aten = torch.ops.aten
prims = torch.ops.prims
npu_attn = torch.ops.npu_attn

PATTERN = "moe:sorted-experts-grouped-matmul"
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def is_grouped_mm(node: object) -> bool:
    """node is a grouped matmul of the sorted-experts block: transformers::grouped_mm_fallback
    (registered only once transformers is imported; float32/float16), or aten._grouped_mm without
    bias or out_dtype (what transformers calls for bfloat16 through F.grouped_mm). Both compute
    rows [offs[e-1], offs[e]) times weight[e]."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is aten._grouped_mm.default:
        return call_arg(node, 3, "bias", None) is None and call_arg(node, 4, "out_dtype", None) is None
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.name == "transformers::grouped_mm_fallback"


@dataclass(frozen=True)
class MoeSite:
    histc: torch.fx.Node
    cumsum: torch.fx.Node
    sorted_ids: torch.fx.Node  # sort(...)[0]
    flat_ids: torch.fx.Node  # sort's input
    perm: torch.fx.Node | None  # sort(...)[1]
    bins: object
    low: object
    high: object
    grouped_mms: tuple[torch.fx.Node, ...]
    inverse: torch.fx.Node | None  # index_put(t, [perm], values): inv_perm[perm] = arange(S)


def _sort_output(node: Any, index: int) -> torch.fx.Node | None:
    """The ascending sort whose output `index` node is, or None."""
    if not is_call(node, operator.getitem) or node.args[1] != index:
        return None
    sort = node.args[0]
    if is_call(sort, aten.sort.default):
        descending = call_arg(sort, 2, "descending", False)
    elif is_call(sort, aten.sort.stable):
        descending = sort.kwargs.get("descending", False)
    else:
        return None
    return sort if not descending and val(sort.args[0]).dim() == 1 else None


def _is_permutation_write(node: torch.fx.Node, perm: torch.fx.Node) -> bool:
    """node is index_put(t, [perm], values), not accumulating, with t 1-D of perm's length:
    perm is a permutation (sort's indices), so every position of t is written exactly once,
    whatever t and values are (transformers: empty_like(perm) and arange(S); empty and
    prims.iota after Inductor's decompositions)."""
    if not is_call(node, (aten.index_put.default, aten._unsafe_index_put.default)) or len(node.args) < 3:
        return False
    target, indices, values = node.args[:3]
    if call_arg(node, 3, "accumulate", False) or list(cast(list, indices)) != [perm]:
        return False
    n = val(perm).shape[0]
    return val(target).dim() == 1 and statically_known_true(val(target).shape[0] == n) and \
        val(values).dim() == 1 and statically_known_true(val(values).shape[0] == n)


def match_moe(histc: torch.fx.Node) -> MoeSite | None:
    ids: Any = histc.args[0]  # walked through casts to the sort below
    while is_call(ids, CASTS):
        ids = ids.args[0]
    sort = _sort_output(ids, 0)
    if sort is None:
        return None
    users = list(histc.users)
    if len(users) != 1 or not is_call(users[0], aten.cumsum.default) or call_arg(users[0], 1, "dim", None) not in (0, -1):
        return None
    cumsum = users[0]
    mms = tuple(cumsum.users)
    if not mms or not all(is_grouped_mm(mm) and call_arg(mm, 2, "offs", None) is cumsum
                          and call_arg(mm, 0, "input", None) is not cumsum and call_arg(mm, 1, "weight", None) is not cumsum
                          for mm in mms):
        return None
    perm = next((u for u in sort.users if is_call(u, operator.getitem) and u.args[1] == 1), None)
    inverse = None
    if perm is not None:
        inverse = next((u for u in perm.users if _is_permutation_write(u, perm)), None)
    return MoeSite(histc=histc, cumsum=cumsum, sorted_ids=ids, flat_ids=arg_node(sort, 0), perm=perm,
                   bins=call_arg(histc, 1, "bins", 100), low=call_arg(histc, 2, "min", 0), high=call_arg(histc, 3, "max", 0),
                   grouped_mms=mms, inverse=inverse)


def _top_k_over(flat_ids: torch.fx.Node) -> int | None:
    """The size of the last dimension the ids are top-k indices over (ids flattened by views), or None."""
    node: Any = flat_ids  # walked through views to a topk's indices
    while is_call(node, _VIEWS):
        node = node.args[0]
    if not is_call(node, operator.getitem) or node.args[1] != 1 or not is_call(node.args[0], aten.topk.default):
        return None
    topk = node.args[0]
    scores = val(topk.args[0])
    if call_arg(topk, 2, "dim", -1) not in (-1, scores.dim() - 1):
        return None
    return static_int(scores.shape[-1])


def check_moe(site: MoeSite, ctx: PassContext) -> str | None:
    experts = static_int(site.bins)
    if experts is None or experts < 2 or site.low != 0 or site.high != experts - 1:
        return (f"histc(bins={site.bins}, min={site.low}, max={site.high}) does not count E experts over "
                f"[0, E - 1] (E >= 2)")
    if _top_k_over(site.flat_ids) != experts:
        return (f"the expert ids are not top-k indices over {experts} experts, so they may lie outside "
                f"[0, {experts - 1}] (expert-parallel sentinels): histc drops those rows and grouped_mm_fallback "
                "writes zeros there, which npu_grouped_matmul leaves unwritten")
    rows = val(site.sorted_ids).shape[0]
    for mm in site.grouped_mms:
        weight = val(call_arg(mm, 1, "weight", None))
        if weight.dim() != 3 or static_int(weight.shape[0]) != experts:
            return f"the grouped matmul's weight {list(weight.shape)} is not (E={experts}, K, N)"
        if not statically_known_true(val(call_arg(mm, 0, "input", None)).shape[0] == rows):
            return "the grouped matmul's input rows are not the routed rows"
    if site.perm is not None and site.inverse is None and any(
            is_call(u, (aten.index_put.default, aten._unsafe_index_put.default)) for u in site.perm.users):
        return "the sort's permutation indexes an index_put that does not write every position exactly once"
    return None


def _call_at(rw: Rewrite, node: torch.fx.Node, target, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
    # The block's nodes are spread over the graph (the second matmul reads the first one's
    # activation): each replacement goes right before the node it replaces.
    rw.anchor = node
    return rw.call(target, args, kwargs, meta_from=node)


def rewrite_moe(rw: Rewrite, site: MoeSite, ctx: PassContext, record: Site) -> list[torch.fx.Node]:
    experts = static_int(site.bins)
    with npu_rules(ctx.target == "ge"):
        # Casts as prims.convert_element_type: Inductor lowers it (not an _to_copy inserted after
        # its decompositions ran), and TorchAir converts it (GE Cast).
        ids = _call_at(rw, site.cumsum, prims.convert_element_type.default, (site.sorted_ids, torch.int32))
        ends = _call_at(rw, site.cumsum, npu_attn.npu_moe_compute_expert_tokens.default, (ids, experts))
        group_list = _call_at(rw, site.cumsum, prims.convert_element_type.default, (ends, torch.int64))
        for mm in site.grouped_mms:
            x, weight = call_arg(mm, 0, "input", None), call_arg(mm, 1, "weight", None)
            outs = _call_at(rw, mm, npu_attn.npu_grouped_matmul.default, ([x], [weight]),
                            dict(group_list=group_list, split_item=3, group_type=0, group_list_type=0))
            out = _call_at(rw, mm, operator.getitem, (outs, 0))
            if val(out).dtype != val(mm).dtype or tuple(val(out).shape) != tuple(val(mm).shape):
                raise RewriteRefused(f"npu_grouped_matmul gives {val(out).dtype} {list(val(out).shape)}, the site "
                                     f"{val(mm).dtype} {list(val(mm).shape)}")
            rw.replace(mm, out)
        dead = [site.cumsum, site.histc, *site.grouped_mms]
        record.notes.append(f"expert row ends: npu_moe_compute_expert_tokens (E={experts}) for histc + cumsum")
        if site.inverse is not None:
            target, _, values = site.inverse.args[:3]
            index = _call_at(rw, site.inverse, aten.unsqueeze.default, (site.perm, -1))
            inverse = _call_at(rw, site.inverse, npu_attn.npu_scatter_nd_update.default, (target, index, values))
            rw.replace(site.inverse, inverse)
            dead.append(site.inverse)
            record.notes.append("inverse permutation: npu_scatter_nd_update for index_put")
    record.fused_op = "npu_grouped_matmul"
    record.layout = f"{len(site.grouped_mms)}x grouped, E={experts}"
    return dead


MOE_RULE = Rule(
    name=PATTERN, kind="moe", anchors=(aten.histc.default,), match=match_moe, check=check_moe, rewrite=rewrite_moe,
    anchor_of=lambda site: site.cumsum,
    claims=lambda site: [site.histc, site.cumsum, *site.grouped_mms, *([site.inverse] if site.inverse else [])])


def moe_experts_to_fused(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """Rewrite every sorted-experts MoE block into npu_moe_compute_expert_tokens + npu_grouped_matmul."""
    return apply_rules(gm, (MOE_RULE,), report, ctx)
