"""Training graphs: packed variable-length batches -> npu_fusion_attention in TND.

A packed batch (transformers' DataCollatorWithFlattening: input_ids (1, T),
position_ids restarting at 0 at each sequence start, no attention_mask) is
attended with a block-diagonal causal mask: transformers computes, in the graph,
``seq = cumsum(diff(position_ids) != 1)`` and keeps key j for query i iff
``seq[i] == seq[j]`` and ``position[j] <= position[i]``. The NPU's form of that is
npu_fusion_attention with input_layout TND, ``actual_seq_qlen`` /
``actual_seq_kvlen`` = the cumulative sequence lengths, and sparse_mode 3 (causal
within each sequence), with no (T, T) mask in the op. (The program still
builds its mask: here it is what the run-time decision reads.)

The lengths are ``int[]`` (host values) in the op's schema, while the graph has
position_ids as a tensor whose values change every step, as does the number of
sequences (the list's length). A compiled graph cannot hold them as constants
(a value guard would recompile, or fail, on every batch) nor as SymInts (the
list length is data). So they are read where they are known, at run time:

- the rewrite (this pass) turns ``npu_fusion_attention(q, k, v, N, "BNSD",
  atten_mask=M, scale=s, sparse_mode=1)`` whose mask M is computed from an
  integer graph input through a cumsum (the packed-sequence ids) into
  ``npu_attn.npu_fusion_attention_packed(q, k, v, M, N, s)``, both in the
  training SDPA rewrite's form (before AOT, dynamo's graph) and in the eager
  rewrite's (the pre-dispatch ATen graph);
- npu_fusion_attention_packed is by definition npu_fusion_attention BNSD with
  that mask (sparse_mode 1): its result equals that call's for every mask. At
  run time it reads M: where M is exactly block-diagonal causal in every batch
  (each row i keeps exactly the keys start[i]..i, and start[i] is i, a new
  sequence, or start[i - 1]; see packed_segments), it computes through TND with
  the cumulative lengths read from M (two small host reads: the decision and
  the sequence starts) and sparse_mode 3; for any other mask it makes the BNSD call itself. So a
  misdetected site still computes exactly its mask, and the decision never
  rests on a guess about position_ids;
- its autograd formula calls npu_fusion_attention_packed_grad, which decides
  the same way from the same mask and calls npu_fusion_attention_grad in TND
  with the same lengths (or BNSD).

The wrapper ops are defined in kernels/fusion_attention_packed.py (schemas, checks,
the run-time decision packed_segments); they run their reference kernels off the
NPU and torch_npu's on it (through npu_fusion_attention / _grad). They are not
GE-convertible: GE's FlashAttentionScore takes the lengths as a host tensor
input, which this project's converters do not wire yet.
"""

from __future__ import annotations

import operator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels.fusion_attention_packed import npu_fusion_attention_packed
from ..report import Report, Site
from ._context import PassContext
from ._fx import dynamo_val, is_call

aten = torch.ops.aten
npu_attn = torch.ops.npu_attn

# node.meta["custom"][SITE_ID]: id() of the fused call's report Site ("custom" meta survives
# the pre-dispatch trace; an int keeps the graph's metadata plain data).
SITE_ID = "npu_attn_training_site"
TND_NOTE = ("packed sequences: TND with actual_seq_qlen/actual_seq_kvlen read at run time from the block-diagonal "
            "causal mask (sparse_mode 3; the op itself computes BNSD with the mask if it is not block-diagonal)")


# ----------------------------------------------------------------------------
# The rewrite
# ----------------------------------------------------------------------------


def _name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def from_packed_positions(mask: object, limit: int = 200) -> bool:
    """The mask is computed from an integer graph input's values (not its size) through
    a cumsum: transformers' packed-sequence ids (cumsum(diff(position_ids) != 1)). Only
    a hint to choose the packed op, which decides from the mask's values at run time."""
    seen: set[torch.fx.Node] = set()
    todo, cumsum, integer_input = [mask], False, False
    while todo and len(seen) < limit:
        node = todo.pop()
        if not isinstance(node, torch.fx.Node) or node in seen:
            continue
        seen.add(node)
        v = dynamo_val(node)
        if not isinstance(v, torch.Tensor):
            continue  # sizes (sym_size of input_ids) carry no positions
        if node.op == "placeholder":
            integer_input |= not v.dtype.is_floating_point and v.dtype != torch.bool
            continue
        cumsum |= "cumsum" in _name(node)
        todo.extend(node.all_input_nodes)
    return cumsum and integer_input


def _site(node: torch.fx.Node, report: Report) -> Site | None:
    site_id = (node.meta.get("custom") or {}).get(SITE_ID)
    return next((s for s in report.sites if id(s) == site_id), None)


def mark_site(node: torch.fx.Node, site: Site) -> None:
    """Record on a fused training call which report row it is."""
    node.meta["custom"] = {**(node.meta.get("custom") or {}), SITE_ID: id(site)}


def _candidates(gm: torch.fx.GraphModule):
    """(node, q, k, v, heads, mask, scale, mask_is_keep) of every fused training call
    in BNSD with sparse_mode 1 and nothing else (no pse, dropout, sink, band)."""
    from .training_sdpa_to_fusion import fusion_attention_output

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is fusion_attention_output:  # dynamo's graph: the training SDPA rewrite
            q, k, v, mask, scale, sparse_mode = node.args
            if sparse_mode == 1 and mask is not None:
                yield node, q, k, v, None, mask, scale, True
        elif node.target is npu_attn.npu_fusion_attention.default:  # the pre-dispatch graph: the eager rewrite
            args = dict(zip(("query", "key", "value", "head_num", "input_layout"), node.args)) | dict(node.kwargs)
            plain = all(args.get(name) is None for name in ("pse", "padding_mask", "prefix", "actual_seq_qlen",
                                                            "actual_seq_kvlen", "sink", "dropout_mask"))
            if plain and args.get("input_layout") == "BNSD" and args.get("sparse_mode") == 1 and \
                    args.get("keep_prob", 1.0) == 1.0 and args.get("atten_mask") is not None and \
                    args.get("pre_tockens", 2147483647) == 2147483647 and \
                    args.get("next_tockens", 2147483647) == 2147483647 and \
                    all(is_call(u, operator.getitem) and u.args[1] < 3 for u in node.users):
                yield (node, args["query"], args["key"], args["value"], args["head_num"], args["atten_mask"],
                       args.get("scale", 1.0), False)


def packed_output(query, key, value, keep, scale: float):
    """The training SDPA rewrite's call (BNSD, boolean keep-mask) through the packed op."""
    return npu_fusion_attention_packed(query, key, value, keep.logical_not(), query.shape[1], scale)[0]


def training_packed_to_tnd(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> int:
    """Retarget every fused training call whose mask comes from packed-sequence ids to
    npu_fusion_attention_packed; returns how many."""
    changed = 0
    for node, q, k, v, heads, mask, scale, mask_is_keep in list(_candidates(gm)):
        q_val, k_val = dynamo_val(q), dynamo_val(k)
        if q_val is None or k_val is None or q_val.dim() != 4 or \
                not statically_known_true(q_val.shape[2] == k_val.shape[2]) or not from_packed_positions(mask):
            continue
        with gm.graph.inserting_before(node):
            if mask_is_keep:
                new = gm.graph.call_function(packed_output, (q, k, v, mask, scale))
            else:
                new = gm.graph.call_function(npu_attn.npu_fusion_attention_packed.default,
                                             (q, k, v, mask, heads, scale))
        new.meta.update(node.meta)
        if not mask_is_keep:
            new.meta["val"] = tuple(node.meta["val"][:3]) if isinstance(node.meta.get("val"), (tuple, list)) \
                else node.meta.get("val")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        site = _site(new, report)
        if site is not None:
            site.layout = "TND"
            site.sparse_mode = 3
            site.notes = [*site.notes, TND_NOTE]
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
