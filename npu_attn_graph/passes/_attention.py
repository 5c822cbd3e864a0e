"""An attention site in SDPA terms, and its rewrite into a fused NPU op.

The attention rules (sdpa_to_fused, eager_attention_to_fused) only match
graph structure and describe what they found as an AttentionSite. This
module holds the rest, shared by every rule:

- structure_reason: the graph-structure checks (dropout, intermediates used
  outside the site, a scale known only at run time, ranks);
- rewrite_attention: builds the fused call through a Rewrite, so that the
  op's own validation (its fake implementation) decides whether the site's
  values are acceptable. Candidate ops come from the registry (incremental
  for one query token, prompt for a static prompt, fused_infer for a
  symbolic length) and each candidate is tried in the layouts it offers. A
  candidate is taken only if its result has exactly the replaced node's
  shape, dtype and strides (later views in the graph rely on them);
  otherwise the reasons of every candidate become the site's reason.
  A bfloat16 sink site for the NPU that no BNSD form takes is tried once more
  in TND (_rewrite_tnd), the one layout in which FIA v2 takes learnable_sink
  on the device.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels._library import COMPRESSED_MASK_SIZE, INT_MAX, npu_rules
from ._context import PassContext
from ._fx import CONSTANT, Rewrite, RewriteRefused, is_call, same_shape, same_strides, static_int, val
from ._masks import ScoreTerm, empty_rows_nan, fully_masked_fixup, plan_mask
from .gqa_repeat_kv import unrepeated
from .registry import AttentionCall, FusedAttentionOp, attention_op_candidates

aten = torch.ops.aten
prims = torch.ops.prims

CAUSAL_MASK = "npu_attn_compressed_causal_mask"  # node meta: the shared compressed causal mask


@dataclass(frozen=True)
class Operand:
    """A q/k/v tensor as the fused op reads it (BNSD), built from a graph node:
    ``transposed`` swaps its last two dims back, ``unflatten`` = (B, N) splits a
    (B*N, S, D) batch dim (each an int or a SymInt node of the graph; None: the
    node's own dim 0)."""

    node: torch.fx.Node
    transposed: bool = False
    unflatten: tuple | None = None

    def shape(self) -> tuple:
        shape = list(val(self.node).shape)
        if self.transposed:
            shape[-1], shape[-2] = shape[-2], shape[-1]
        if self.unflatten is not None:
            shape = [*(val(x) if isinstance(x, torch.fx.Node) else shape[0] if x is None else x
                       for x in self.unflatten), *shape[1:]]
        return tuple(shape)

    def build(self, rw: Rewrite) -> torch.fx.Node:
        node = self.node
        if self.transposed:
            node = rw.call(aten.transpose.int, (node, -2, -1))
        if self.unflatten is not None:
            split = [rw.size(node, 0) if x is None else x for x in self.unflatten]
            node = rw.call(aten.reshape.default, (node, [*split, rw.size(node, 1), rw.size(node, 2)]))
        return node


@dataclass
class AttentionSite:
    """One attention computation, in SDPA terms:
    out = softmax(scale * q @ k^T [terms applied]) @ v, per (batch, head)."""

    pattern: str
    anchor: torch.fx.Node  # the softmax or SDPA node (claimed when the site is left alone)
    query: Operand
    key: Operand
    value: Operand
    output: torch.fx.Node  # every use of it gets the fused result
    flat_output: bool = False  # output is (B*N, S_q, D_v) rather than (B, N, S_q, D_v)
    scale: float | None = None  # None: 1/sqrt(D)
    terms: tuple[ScoreTerm, ...] = ()
    score_rank: int = 4  # rank of the scores the terms broadcast against
    is_causal: bool = False
    dropout_p: float = 0.0
    internal: tuple[torch.fx.Node, ...] = ()  # must have no users outside the site
    # Scales known only at run time (dynamic=True makes Python floats graph inputs):
    # (0-d tensor node, divides) per step, folded into the query by the rewrite.
    runtime_scales: tuple[tuple[torch.fx.Node, bool], ...] = ()
    form_reason: str | None = None  # found while matching: auxiliary outputs in use, scale after a term
    notes: list[str] = field(default_factory=list)
    # A per-head sink logit joining the softmax and dropped after it: a (1, N, 1, 1)
    # node (gpt-oss's sinks). Only FIA v2 takes one (learnable_sink).
    sink: torch.fx.Node | None = None
    # The softmax is aten's (NaN on a row of all -inf scores), not SDPA's or
    # _safe_softmax (0 there, as the fused ops give).
    softmax_nan_rows: bool = False


# ----------------------------------------------------------------------------
# Graph-structure checks (everything about values is the op's to decide)
# ----------------------------------------------------------------------------


def structure_reason(site: AttentionSite) -> str | None:
    if site.dropout_p != 0.0:
        return f"dropout_p={site.dropout_p} (the inference ops have no dropout)"
    if site.form_reason:
        return site.form_reason
    chain = set(site.internal) | {site.output}
    for inner in site.internal:
        outside = [u for u in inner.users if u not in chain]
        if outside:
            return f"intermediate {inner.name} is also used by {outside[0].name} (e.g. returned attention weights)"
    ranks = tuple(len(o.shape()) for o in (site.query, site.key, site.value))
    if ranks != (4, 4, 4):
        return f"q/k/v ranks {ranks} (needs 4-D BNSD)"
    if site.is_causal and site.terms:
        return "both attn_mask and is_causal given"
    return None


def float32_left_unfused(site: AttentionSite, ctx: PassContext) -> str | None:
    if ctx.fp32_attention == "unfused" and val(site.query.node).dtype == torch.float32:
        return "float32 attention left as plain math (fp32_attention='unfused'; the NPU ops take float16/bfloat16)"
    return None


# ----------------------------------------------------------------------------
# The rewrite
# ----------------------------------------------------------------------------


@dataclass
class FusedSite:
    op: FusedAttentionOp
    node: torch.fx.Node  # the fused op node
    layout: str
    sparse_mode: int | None
    gqa_ratio: int
    notes: list[str]
    # Nodes besides the site's own that the fused result replaced (TND: the graph's
    # contiguous BSND copies of the output), erased once unused.
    replaced: list[torch.fx.Node] = field(default_factory=list)


def site_scale(site: AttentionSite, q: torch.fx.Node) -> float:
    if site.scale is not None:
        return float(site.scale)
    d = static_int(val(q).shape[-1])
    if d is None:
        raise RewriteRefused(f"SDPA's default scale 1/sqrt(D) needs a static head dim, got D={val(q).shape[-1]}")
    return 1.0 / math.sqrt(d)


def fold_runtime_scales(rw: Rewrite, site: AttentionSite, q: torch.fx.Node) -> tuple[torch.fx.Node, list[str]]:
    """softmax(s * (q @ k^T)) = softmax((s * q) @ k^T) for any scalar s: a scale the
    graph reads at run time multiplies the query, and the op's own scale stays the
    constant part. (The fused ops take scale as a float attribute.)"""
    notes = []
    for factor, divides in site.runtime_scales:
        q = rw.call(aten.div.Tensor if divides else aten.mul.Tensor, (q, factor))
        if val(q).dtype != val(site.query.node).dtype:
            raise RewriteRefused(f"the runtime scale {factor.name} ({val(factor).dtype}) would change the query's "
                                 f"dtype {val(site.query.node).dtype} to {val(q).dtype}")
        notes.append(f"runtime scale {factor.name} folded into the query ({'q / s' if divides else 'q * s'})")
    return q, notes


def _causal(site: AttentionSite, q: torch.fx.Node, k: torch.fx.Node) -> int:
    """SDPA's is_causal (top-left aligned) as a sparse mode, or RewriteRefused."""
    sq, skv = val(q).shape[2], val(k).shape[2]
    if statically_known_true(sq == skv):
        return 3  # the two alignments coincide
    sq_static = static_int(sq)
    if sq_static is not None and sq_static > 1:
        return 2  # leftUpCausal: SDPA's top-left causal
    # A single query token makes the ops ignore sparse modes, so a causal
    # structure needs S_q > 1 to be known.
    raise RewriteRefused(f"is_causal with query length {sq} != key length {skv} (sparse modes need S_q > 1)")


def causal_mask_node(rw: Rewrite, like: torch.fx.Node, ctx: PassContext) -> torch.fx.Node:
    """The compressed causal mask triu(ones(2048, 2048), 1), built once per graph
    (at its top, from constants only, so every executor can fold it)."""
    device = val(like).device
    for node in rw.graph.find_nodes(op="call_function", target=aten.lt.Tensor):
        if node.meta.get(CAUSAL_MASK) == device:
            return node
    first = next(n for n in rw.graph.nodes if n.op != "placeholder")
    top = Rewrite(rw.gm, first)
    top.fake_mode = rw.fake_mode
    # prims.iota for Inductor (which lowers graphs decomposed to prims), aten.arange for
    # TorchAir (which has no iota converter).
    if ctx.target == "ge":
        positions = top.call(aten.arange.start, (0, COMPRESSED_MASK_SIZE), dict(dtype=torch.int64, device=device))
    else:
        positions = top.call(prims.iota.default, (COMPRESSED_MASK_SIZE,),
                             dict(start=0, step=1, dtype=torch.int64, device=device, requires_grad=False))
    rows = top.call(aten.unsqueeze.default, (positions, 1))
    cols = top.call(aten.unsqueeze.default, (positions, 0))
    mask = top.call(aten.lt.Tensor, (rows, cols))  # key after query: masked out
    mask.meta[CAUSAL_MASK] = device
    for node in top.inserted:
        node.meta[CONSTANT] = True
        node.meta.pop("nn_module_stack", None)
    rw.inserted[:0] = top.inserted  # rolled back with the site if it is refused
    return mask


def rewrite_attention(rw: Rewrite, site: AttentionSite, ctx: PassContext) -> FusedSite:
    """Build the fused op for `site` (raises RewriteRefused with every candidate's reason).
    For the GE target the ops validate as on the NPU (npu_rules), whatever
    device the fake values are on."""
    with npu_rules(ctx.target == "ge"):
        return _rewrite_attention(rw, site, ctx)


def _rewrite_attention(rw: Rewrite, site: AttentionSite, ctx: PassContext) -> FusedSite:
    q, k, v = (site.query.build(rw), site.key.build(rw), site.value.build(rw))
    q, scale_notes = fold_runtime_scales(rw, site, q)
    heads, kv_heads = static_int(val(q).shape[1]), static_int(val(k).shape[1])
    if heads is None or kv_heads is None:
        raise RewriteRefused(f"symbolic head counts N={val(q).shape[1]}, N_kv={val(k).shape[1]}")
    scale = site_scale(site, q)
    sparse_mode, atten_mask, pre_tokens, next_tokens = 0, None, INT_MAX, INT_MAX
    plan = plan_mask(rw, site.terms, site.score_rank, q, k, with_sink=site.sink is not None,
                     softmax_nan_rows=site.softmax_nan_rows)
    if plan.band is not None:  # a mask built from positions that is a band
        sparse_mode, pre_tokens, next_tokens = plan.band.sparse_mode, plan.band.pre_tokens, plan.band.next_tokens
        atten_mask = causal_mask_node(rw, q, ctx)
    elif plan.atten_mask is not None:
        atten_mask, sparse_mode = plan.atten_mask, 1  # allMask: exactly the given mask, no band
    elif site.is_causal:
        sparse_mode = _causal(site, q, k)
        atten_mask = causal_mask_node(rw, q, ctx)
    sink = None
    if site.sink is not None:
        sink = rw.call(aten.reshape.default, (site.sink, [heads]))
    wanted = val(site.output)
    reasons = []
    q_len = static_int(val(q).shape[2])
    for op in attention_op_candidates(q_len if q_len is not None else val(q).shape[2], sparse_mode in (2, 3, 4),
                                      needs_sink=sink is not None):
        for layout in ("BNSD", "BNSD_BSND"):
            if layout not in op.layouts:
                continue
            checkpoint = rw.checkpoint()
            call = AttentionCall(q, k, v, heads, 0 if heads == kv_heads else kv_heads, scale, layout,
                                 atten_mask, plan.pse_shift, sparse_mode, pre_tokens, next_tokens, learnable_sink=sink)
            try:
                fused = rw.call(op.overload, (q, k, v), op.kwargs(call))
                out = fused if op.output_index is None else rw.call(operator.getitem, (fused, op.output_index))
                if op.output_memory(layout) == "BSND":
                    out = rw.call(aten.permute.default, (out, [0, 2, 1, 3]))
                if plan.fully_masked_fixup:
                    out = fully_masked_fixup(rw, out, plan.atten_mask, v, heads)
                elif plan.empty_rows_nan:
                    out = empty_rows_nan(rw, out, plan.atten_mask)
                if site.flat_output:
                    out = rw.call(aten.reshape.default, (out, [-1, rw.size(out, 2), rw.size(out, 3)]))
                _check_same_value(op, layout, val(out), wanted)
            except RewriteRefused as refused:
                rw.rollback(checkpoint)
                if str(refused) not in reasons:
                    reasons.append(str(refused))
                continue
            rw.replace(site.output, out)
            return FusedSite(op, fused, layout, sparse_mode if op.sparse_modes else None, heads // kv_heads,
                             plan.notes + site.notes + scale_notes)
    if sink is not None and ctx.target == "ge" and val(sink).dtype == torch.bfloat16:
        # On the NPU FIA v2 takes learnable_sink only in TND (the BNSD forms above are
        # refused there): the same call with q/k/v as (tokens, heads, D).
        checkpoint = rw.checkpoint()
        call = AttentionCall(q, k, v, heads, 0, scale, "TND", atten_mask, plan.pse_shift, sparse_mode, pre_tokens,
                             next_tokens, learnable_sink=sink)
        try:
            if plan.fully_masked_fixup or plan.empty_rows_nan:
                raise RewriteRefused("a row fix-up needs the full mask, which input_layout TND does not take")
            fused = _rewrite_tnd(rw, site, call, wanted)
        except RewriteRefused as refused:
            rw.rollback(checkpoint)
            if str(refused) not in reasons:
                reasons.append(str(refused))
        else:
            fused.notes[:0] = plan.notes + site.notes + scale_notes
            return fused
    raise RewriteRefused("; ".join(reasons) if reasons else "no fused op takes this query length")


# ----------------------------------------------------------------------------
# TND: FIA v2 with learnable_sink on the NPU
# ----------------------------------------------------------------------------


def _swaps_seq_and_heads(node: object) -> bool:
    """transpose(x, 1, 2) or permute(x, [0, 2, 1, 3]) of a 4-D tensor."""
    if is_call(node, aten.transpose.int):
        return val(node.args[0]).dim() == 4 and sorted(d % 4 for d in node.args[1:3]) == [1, 2]
    return is_call(node, aten.permute.default) and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]


def _tokens(rw: Rewrite, batch: object, seq: object) -> object:
    """batch * seq as an int, or as a node of the graph when seq is symbolic."""
    return batch * seq if isinstance(seq, int) else rw.call(operator.mul, (seq, batch))


def _to_tnd(rw: Rewrite, bnsd: torch.fx.Node, name: str, notes: list[str]) -> torch.fx.Node:
    """A (B, N, S, D) tensor as (B*S, N, D): a view of the (B, S, N, D) tensor the
    graph transposed when there is one (projections are (B, S, N, D)), else a
    transpose copy (noted)."""
    batch, heads, seq, dim = (rw.size(bnsd, i) for i in range(4))
    tokens = _tokens(rw, batch, seq)
    if _swaps_seq_and_heads(bnsd):
        return rw.call(aten.reshape.default, (bnsd.args[0], [tokens, heads, dim]))
    swapped = rw.call(aten.transpose.int, (bnsd, 1, 2))
    if not (statically_known_true(val(bnsd).shape[1] == 1) or statically_known_true(val(bnsd).shape[2] == 1)):
        notes.append(f"{name} transposed into TND (tokens, heads, D): a copy")
    return rw.call(aten.reshape.default, (swapped, [tokens, heads, dim]))


def _unrepeated_pair(k: torch.fx.Node, v: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """The un-repeated K/V behind repeat_kv (the forms gqa_repeat_kv removes), or None."""
    source_k, source_v = unrepeated(k), unrepeated(v)
    if source_k is None or source_v is None or val(source_k).shape[1] != val(source_v).shape[1]:
        return None
    return source_k, source_v


def _bsnd_copies(output: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node]] | None:
    """(swap, clone) pairs when every use of the BNSD output is a swap to BSND whose
    every use is a contiguous copy (transformers' transpose(1, 2).contiguous()), else None."""
    pairs = []
    for swap in output.users:
        if not _swaps_seq_and_heads(swap) or not swap.users:
            return None
        for copy in swap.users:
            if not (is_call(copy, aten.clone.default) and
                    copy.kwargs.get("memory_format") in (None, torch.contiguous_format)):
                return None
            pairs.append((swap, copy))
    return pairs or None


def _rewrite_tnd(rw: Rewrite, site: AttentionSite, call: AttentionCall, wanted: torch.Tensor) -> FusedSite:
    """FIA v2 in TND: q (B*S_q, N, D), k/v (B*S_kv, N_kv, D) with the cumulative
    lengths of equal segments; the output (B*S_q, N, D_v) is read back as BNSD."""
    op = attention_op_candidates(None, False, needs_sink=True)[0]
    notes = ["TND (input_layout for learnable_sink on the NPU): cumulative actual_seq_qlen/actual_seq_kvlen "
             "of equal per-batch lengths"]
    q, k, v = call.query, call.key, call.value
    batch = static_int(val(q).shape[0])
    if batch is None:
        raise RewriteRefused(f"input_layout TND needs a static batch size for its cumulative lengths, "
                             f"got B={val(q).shape[0]}")
    kv_heads = call.num_heads
    pair = _unrepeated_pair(k, v)
    if pair is not None:  # GQA through num_key_value_heads, as gqa_repeat_kv does for BNSD
        k, v = pair
        kv_heads = static_int(val(k).shape[1])
        if kv_heads is None:
            raise RewriteRefused(f"symbolic key/value head count {val(k).shape[1]}")
    q_tnd = _to_tnd(rw, q, "query", notes)
    k_tnd = _to_tnd(rw, k, "key", notes)
    v_tnd = _to_tnd(rw, v, "value", notes)
    q_len, kv_len = rw.size(q, 2), rw.size(k, 2)
    q_lens = [_tokens(rw, i + 1, q_len) for i in range(batch)]
    kv_lens = [_tokens(rw, i + 1, kv_len) for i in range(batch)]
    tnd = AttentionCall(q_tnd, k_tnd, v_tnd, call.num_heads, 0 if kv_heads == call.num_heads else kv_heads,
                        call.scale, "TND", call.atten_mask, call.pse_shift, call.sparse_mode, call.pre_tokens,
                        call.next_tokens, learnable_sink=call.learnable_sink)
    fused = rw.call(op.overload, (q_tnd, k_tnd, v_tnd),
                    {**op.kwargs(tnd), "actual_seq_qlen": q_lens, "actual_seq_kvlen": kv_lens})
    out = rw.call(operator.getitem, (fused, op.output_index))
    value_dim = rw.size(out, 2)
    bsnd = rw.call(aten.reshape.default, (out, [batch, q_len, call.num_heads, value_dim]))
    replaced: list[torch.fx.Node] = []
    view = val(bsnd).permute(0, 2, 1, 3)
    copies = None if site.flat_output or same_strides(view, wanted) else _bsnd_copies(site.output)
    if copies is not None:
        # Every reader of the BNSD output copies it into contiguous BSND: the op's
        # output is that copy already (its strides are checked against each copy's).
        if not same_shape(view.shape, wanted.shape) or view.dtype != wanted.dtype:
            _check_same_value(op, "TND", view, wanted)
        for swap, copy in copies:
            _check_same_value(op, "TND", val(bsnd), val(copy))
            rw.replace(copy, bsnd)
            replaced += [copy, swap]
    else:
        bnsd = rw.call(aten.permute.default, (bsnd, [0, 2, 1, 3]))
        if not same_strides(view, wanted):
            bnsd = rw.call(aten.clone.default, (bnsd,), {"memory_format": torch.contiguous_format})
            notes.append("TND output copied into the BNSD order the graph reads")
        if site.flat_output:
            bnsd = rw.call(aten.reshape.default, (bnsd, [-1, rw.size(bnsd, 2), rw.size(bnsd, 3)]))
        _check_same_value(op, "TND", val(bnsd), wanted)
        rw.replace(site.output, bnsd)
    return FusedSite(op, fused, "TND", call.sparse_mode, call.num_heads // kv_heads, notes, replaced)


def _check_same_value(op: FusedAttentionOp, layout: str, got: torch.Tensor, wanted: torch.Tensor) -> None:
    if got.dtype != wanted.dtype:
        raise RewriteRefused(f"{op.name} would return {str(got.dtype).replace('torch.', '')} where the site "
                             f"returns {str(wanted.dtype).replace('torch.', '')}")
    if not same_shape(got.shape, wanted.shape):
        raise RewriteRefused(f"{op.name} would return shape {tuple(got.shape)} where the site returns "
                             f"{tuple(wanted.shape)}")
    if not same_strides(got, wanted):
        raise RewriteRefused(f"{op.name} ({layout}) would return strides {got.stride()} where the site's "
                             f"later views need {wanted.stride()}")
