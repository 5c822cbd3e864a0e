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

The wrapper ops run their reference kernels off the NPU and torch_npu's on it
(through npu_fusion_attention / _grad). They are not GE-convertible: GE's
FlashAttentionScore takes the lengths as a host tensor input, which this
project's converters do not wire yet.
"""

from __future__ import annotations

import operator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels._library import COMPRESSED_MASK_SIZE
from ..report import Report, Site
from ._context import PassContext
from ._fx import is_call, val

aten = torch.ops.aten
npu_attn = torch.ops.npu_attn

# node.meta["custom"][SITE_ID]: id() of the fused call's report Site ("custom" meta survives
# the pre-dispatch trace; an int keeps the graph's metadata plain data).
SITE_ID = "npu_attn_training_site"
TND_NOTE = ("packed sequences: TND with actual_seq_qlen/actual_seq_kvlen read at run time from the block-diagonal "
            "causal mask (sparse_mode 3; the op itself computes BNSD with the mask if it is not block-diagonal)")


# ----------------------------------------------------------------------------
# The run-time decision
# ----------------------------------------------------------------------------


def packed_segments(atten_mask: torch.Tensor, batch: int, seq: int) -> list[int] | None:
    """The cumulative lengths of the sequences over the B * S flattened tokens when
    atten_mask ((B or 1, 1, S, S), True = masked out) is block-diagonal causal in
    every batch, else None.

    Row i keeps exactly keys start[i]..i, and start[i] is i (a new sequence) or
    start[i - 1] (the same one): that is block-diagonal causal, with sequences
    starting at the rows with start[i] == i."""
    if atten_mask.dim() != 4 or atten_mask.shape[1] != 1 or tuple(atten_mask.shape[2:]) != (seq, seq) \
            or atten_mask.shape[0] not in (1, batch) or atten_mask.dtype not in (torch.bool, torch.uint8):
        return None
    keep = atten_mask[:, 0].logical_not()  # (B', S, S)
    rows = torch.arange(seq, device=keep.device)
    count = keep.sum(-1)  # (B', S)
    start = keep.int().argmax(-1)  # first kept key (0 where none: caught by the count)
    later = rows.view(1, 1, seq) > rows.view(1, seq, 1)
    previous = torch.cat([start.new_zeros(start.shape[0], 1), start[:, :-1]], dim=1)
    ok = ~(keep & later).any() & (count == rows - start + 1).all() & (count > 0).all() & \
        ((start == rows) | (start == previous)).all()
    if not bool(ok):  # one host read: the decision
        return None
    starts = (start == rows).expand(batch, seq).reshape(-1)  # over the flattened B * S tokens
    boundaries = torch.nonzero(starts).flatten()[1:].tolist() + [batch * seq]  # the one host read of lengths
    return boundaries


def _causal_mask(device: torch.device) -> torch.Tensor:
    return torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device).triu(1)


def _to_tnd(x: torch.Tensor) -> torch.Tensor:
    """(B, N, S, D) -> (B * S, N, D)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _from_tnd(x: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """(B * S, N, D) -> (B, N, S, D), contiguous."""
    return x.reshape(batch, seq, x.shape[1], x.shape[2]).transpose(1, 2).contiguous()


@torch.library.custom_op("npu_attn::npu_fusion_attention_packed", mutates_args=())
def npu_fusion_attention_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                atten_mask: torch.Tensor, head_num: int, scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_fusion_attention(query, key, value, head_num, "BNSD", atten_mask=atten_mask,
    scale=scale, sparse_mode=1)[:3], through TND with the sequence lengths where the
    mask is block-diagonal causal. Returns (attention_out, softmax_max, softmax_sum)
    in BNSD form ((B, N, S, 8) statistics)."""
    batch, _, seq, _ = query.shape
    lengths = packed_segments(atten_mask, batch, seq) if key.shape[2] == seq else None
    if lengths is None:
        out, row_max, row_sum = torch.ops.npu_attn.npu_fusion_attention(
            query, key, value, head_num, "BNSD", atten_mask=atten_mask, scale=scale, sparse_mode=1)[:3]
        return out, row_max, row_sum
    out, row_max, row_sum = torch.ops.npu_attn.npu_fusion_attention(
        _to_tnd(query), _to_tnd(key), _to_tnd(value), head_num, "TND", atten_mask=_causal_mask(query.device),
        scale=scale, sparse_mode=3, actual_seq_qlen=lengths, actual_seq_kvlen=lengths, softmax_layout="TND")[:3]
    # softmax_layout "TND": the statistics in token order, (T, N, 8), as the BNSD ones are laid out per token.
    return _from_tnd(out, batch, seq), _from_tnd(row_max, batch, seq), _from_tnd(row_sum, batch, seq)


@npu_fusion_attention_packed.register_fake
def _packed_fake(query, key, value, atten_mask, head_num, scale):
    batch, heads, seq, _ = query.shape
    stats = query.new_empty((batch, heads, seq, 8), dtype=torch.float32)
    return query.new_empty((batch, heads, seq, value.shape[-1])), stats, torch.empty_like(stats)


@torch.library.custom_op("npu_attn::npu_fusion_attention_packed_grad", mutates_args=())
def npu_fusion_attention_packed_grad(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     dy: torch.Tensor, atten_mask: torch.Tensor, attention_in: torch.Tensor,
                                     softmax_max: torch.Tensor, softmax_sum: torch.Tensor, head_num: int,
                                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_fusion_attention_grad for npu_fusion_attention_packed: the same decision
    from the same mask, TND with the same lengths or BNSD. Returns (dq, dk, dv)."""
    batch, _, seq, _ = query.shape
    lengths = packed_segments(atten_mask, batch, seq) if key.shape[2] == seq else None
    if lengths is None:
        dq, dk, dv = torch.ops.npu_attn.npu_fusion_attention_grad(
            query, key, value, dy, head_num, "BNSD", atten_mask=atten_mask, softmax_max=softmax_max,
            softmax_sum=softmax_sum, attention_in=attention_in, scale_value=scale, sparse_mode=1)[:3]
        return dq, dk, dv
    dq, dk, dv = torch.ops.npu_attn.npu_fusion_attention_grad(
        _to_tnd(query), _to_tnd(key), _to_tnd(value), _to_tnd(dy), head_num, "TND",
        atten_mask=_causal_mask(query.device), softmax_max=_to_tnd(softmax_max), softmax_sum=_to_tnd(softmax_sum),
        attention_in=_to_tnd(attention_in), scale_value=scale, sparse_mode=3, actual_seq_qlen=lengths,
        actual_seq_kvlen=lengths, softmax_layout="TND")[:3]
    return _from_tnd(dq, batch, seq), _from_tnd(dk, batch, seq), _from_tnd(dv, batch, seq)


@npu_fusion_attention_packed_grad.register_fake
def _packed_grad_fake(query, key, value, dy, atten_mask, attention_in, softmax_max, softmax_sum, head_num, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, atten_mask, head_num, scale = inputs
    ctx.save_for_backward(query, key, value, atten_mask, *output)
    ctx.head_num, ctx.scale = head_num, scale


def _backward(ctx, grad_out, _grad_max, _grad_sum):
    query, key, value, atten_mask, out, row_max, row_sum = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.npu_attn.npu_fusion_attention_packed_grad(
        query, key, value, grad_out.contiguous(), atten_mask, out, row_max, row_sum, ctx.head_num, ctx.scale)
    return dq, dk, dv, None, None, None


npu_fusion_attention_packed.register_autograd(_backward, setup_context=_setup_context)


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
    seen, todo, cumsum, integer_input = set(), [mask], False, False
    while todo and len(seen) < limit:
        node = todo.pop()
        if not isinstance(node, torch.fx.Node) or node in seen:
            continue
        seen.add(node)
        v = _value(node)
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


def _value(node: object):
    return val(node) if val(node) is not None else (node.meta.get("example_value") if isinstance(
        node, torch.fx.Node) else None)


def packed_output(query, key, value, keep, scale: float):
    """The training SDPA rewrite's call (BNSD, boolean keep-mask) through the packed op."""
    return npu_fusion_attention_packed(query, key, value, keep.logical_not(), query.shape[1], scale)[0]


def training_packed_to_tnd(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> int:
    """Retarget every fused training call whose mask comes from packed-sequence ids to
    npu_fusion_attention_packed; returns how many."""
    changed = 0
    for node, q, k, v, heads, mask, scale, mask_is_keep in list(_candidates(gm)):
        q_val, k_val = _value(q), _value(k)
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
