"""Rule: a fused decode attention over a dense (static) KV cache whose mask bounds the keys -> the op reads
only the valid K/V (``actual_seq_lengths`` as a tensor).

A transformers StaticCache decode step attends over the whole cache (S_kv slots)
with a mask built from the cache position: key j is kept iff j <= cache_position
(``kv_idx <= q_idx``), joined by ``&`` with a padding term when the program gives
a 2-D attention_mask. The attention rules turn it into npu_incre_flash_attention
(or FIA) with that mask, and the op then reads all S_kv slots of K and V, of
which only cache_position + 1 are valid. The ops take the valid length per batch
(``actual_seq_lengths``) and read nothing past it.

What the rule proves (values, not spelling; the paged read rule's symbolic
reader, passes/paged_attention_read.py, reads the mask's construction: every
integer tensor an affine function of the indices and of one integer tensor L,
every boolean a conjunction of ``< 0`` inequalities over those):

- the whole mask is "key j kept iff j < L + c" (L one value, or one per batch
  row along the mask's batch axis), uniformly over heads and the one query
  row: the op gets the lengths ``clamp(L + c, 0, S_kv)`` and no mask (exactly
  eager's kept set for every key j in [0, S_kv), whatever the value of L);
- or the mask (kept form) is a conjunction (``&``/``logical_and`` of booleans,
  through ``expand``) of terms, one of which is proved to be "j < L + c": the
  op gets the same lengths and keeps the whole mask, which says more (left
  padding, a custom term). Every key the lengths drop is masked out by the
  mask anyway, so every row keeps the same keys (and a row that keeps none
  gives 0 either way: the op's own convention for an empty row, the same with
  or without lengths).

Anything else leaves the op reading all S_kv slots, with the reason in the
site's notes: a mask that is a graph input (generate() builds the 4-D mask
before the compiled forward, so to the graph it is data), an additive mask
(pse_shift only), a term that is not a key bound (a window's lower bound alone,
``j <= 2 * cache_position``), a bound along another axis, more than one query row.
Only one query token (S_q statically 1): the decode step. The mask must be 3-D
or 4-D with one query row, so axis -2 is the query axis (the index there is 0).

Rewrite: the same op's lengths-tensor wrapper (kernels/paged_attention.py, the
paged read rule's: npu_incre_flash_attention_paged / npu_fused_infer_attention_score_paged
without block_table; fake = the wrapped op's own validation, the eager executor
reads the lengths once on the host, the GE converter feeds the tensor into
IncreFlashAttention / FusedInferAttentionScore's actual_seq_lengths input), with
the site's other arguments unchanged. A single L (a 0-d cache position) is
expanded to one length per batch row.

Runs after paged_attention_read (whose paged sites already have their lengths)
and before attention_layout and attention_precision, which refine the wrapper as
any fused op. Ring sliding windows (``sliding_window_cache="ring"``) have their
masks permuted by an index_select before this rule, which it does not read: they
keep their mask (their window is every slot once full).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..report import Report
from ._context import PassContext
from ._fx import SITE, Rewrite, erased, static_int, val
from ._rules import Rule, RuleStats, check_and_rewrite
from .paged_attention_read import (_AND, _NOT, Affine, Pred, Refused, _describe, _lengths_mask, _read,
                                   replace_attention_output)
from .registry import ATTENTION_OPS, FUSED_INFER, INCRE, PAGED_WRAPPERS

aten = torch.ops.aten

PATTERN = "static-cache:kv-lengths"
DECODE_OPS = (INCRE, FUSED_INFER)
# The wrappers' arguments besides query/key/value, block_table and the lengths: a
# site using any other argument of the op (antiquant, padding sizes, ...) is left alone.
_WRAPPER_KWARGS = {
    INCRE.name: {"atten_mask", "pse_shift", "num_heads", "scale_value", "input_layout", "num_key_value_heads",
                 "inner_precise"},
    FUSED_INFER.name: {"pse_shift", "atten_mask", "num_heads", "scale", "pre_tokens", "next_tokens",
                       "input_layout", "num_key_value_heads", "sparse_mode", "inner_precise", "softmax_lse_flag"},
}


@dataclass
class Bound:
    length: torch.fx.Node  # L: one value, or one per batch row
    offset: int  # the KV length is L + offset
    per_batch: bool
    whole: bool  # the mask is exactly this bound (dropped); else kept beside the lengths
    why_kept: str = ""


@dataclass
class StaticRead:
    node: torch.fx.Node
    op: object  # FusedAttentionOp
    bound: Bound | None = None
    notes: list = field(default_factory=list)


def match(node: torch.fx.Node) -> StaticRead | None:
    op = ATTENTION_OPS.get(node.target)
    if op not in DECODE_OPS or node.kwargs.get("block_table") is not None:
        return None
    if node.kwargs.get("atten_mask") is None and node.kwargs.get("pse_shift") is None:
        return None  # every key attended: all S_kv are valid
    return StaticRead(node, op)


def _q_seq(node: torch.fx.Node) -> object:
    layout = node.kwargs.get("input_layout", "BSH")
    q = val(node.args[0])
    return q.shape[2] if layout.startswith("BNSD") else q.shape[1]


def _kv_seq(node: torch.fx.Node, op) -> object:
    layout = node.kwargs.get("input_layout", "BSH")
    k = val(node.args[op.key_arg])
    return k.shape[2] if layout.startswith("BNSD") else k.shape[1]


def _conjuncts(kept: torch.fx.Node) -> list[torch.fx.Node]:
    """The boolean terms whose conjunction is `kept` (through expand and boolean ands)."""
    t = kept.target if kept.op == "call_function" else None
    v = val(kept)
    if t in _AND and v.dtype == torch.bool and all(
            isinstance(a, torch.fx.Node) and val(a).dtype == torch.bool for a in kept.args[:2]):
        return _conjuncts(kept.args[0]) + _conjuncts(kept.args[1])
    if t is aten.expand.default:
        return _conjuncts(kept.args[0])
    return [kept]


def _key_bound(e: Affine, rank: int, leaf_shape: list, mask_shape: list, batch: object) -> Bound | None:
    """e < 0 as "key j < L + offset" (Bound), or None when it is not one."""
    coefs = dict(e.coefs)
    if -2 in coefs and rank >= 2 and statically_known_true(leaf_shape[-2] == 1):
        coefs.pop(-2)  # the one query row (and the term's axis -2 is broadcast to it): index 0
    if coefs != {-1: 1} or e.length is None or e.l != -1:
        return None
    if not statically_known_true(leaf_shape[-1] == mask_shape[-1]):
        return None  # the key index of a broadcast term is always 0
    offset = static_int(-e.const)
    if offset is None:
        return None
    numel = val(e.length).numel()
    if statically_known_true(numel == 1):
        return Bound(e.length, offset, per_batch=False, whole=False)
    # One length per batch row: L runs along the term's axis that lines up with the mask's axis 0.
    if e.length_axis is None or len(mask_shape) + e.length_axis != 0 or rank != len(mask_shape) or \
            not statically_known_true(numel == batch) or not statically_known_true(leaf_shape[0] == batch):
        return None
    return Bound(e.length, offset, per_batch=True, whole=False)


def _bound(node: torch.fx.Node, op) -> Bound:
    mask = node.kwargs.get("atten_mask")
    if mask is None:
        raise Refused("no boolean mask (an additive mask goes in as pse_shift, whose values the rule "
                      "cannot bound)")
    if op.sparse_modes and node.kwargs.get("sparse_mode", 0) not in (0, 1):
        raise Refused(f"sparse_mode {node.kwargs.get('sparse_mode')} besides the mask")
    layout = node.kwargs.get("input_layout", "BSH")
    if layout not in ("BSH", "BSND", "BNSD", "BNSD_BSND"):
        raise Refused(f"input_layout {layout} (the rule reads B-first layouts)")
    q_seq = _q_seq(node)
    if not statically_known_true(q_seq == 1):
        raise Refused(f"{q_seq} query rows (the rule takes the decode step's one)")
    m = val(mask)
    shape = list(m.shape)
    if m.dim() not in (3, 4) or not statically_known_true(shape[-2] == 1):
        raise Refused(f"the mask has shape {tuple(shape)} (the rule reads 3-D/4-D masks with one query row)")
    batch = val(node.args[0]).shape[0]
    # 1. The whole mask is the bound: the lengths replace it.
    try:
        whole = _lengths_mask(mask, 1)
    except Refused as r:
        why = str(r)
    else:
        per_batch = not statically_known_true(val(whole.node).numel() == 1)
        if not whole.causal and (not per_batch or statically_known_true(val(whole.node).numel() == batch)):
            return Bound(whole.node, whole.offset, per_batch, whole=True)
        why = "the mask is a causal band"
    # 2. One term of the kept mask is the bound: the lengths, and the mask too unless it is only that term.
    terms, opaque = [], []
    try:
        p = _read(mask)  # masked iff not (all ineqs < 0): the ineqs are the kept mask's terms
    except Refused:
        p = None
    if isinstance(p, Pred) and p.negated:
        terms = [(e, p.rank, shape) for e in p.ineqs]
    elif mask.op == "call_function" and mask.target in _NOT and val(mask.args[0]).dtype == torch.bool:
        for leaf in _conjuncts(mask.args[0]):
            try:
                q = _read(leaf)
            except Refused as r:
                opaque.append(f"{leaf.name} ({'a graph input' if leaf.op == 'placeholder' else r})")
                continue
            if isinstance(q, Pred) and not q.negated:
                terms += [(e, q.rank, list(val(leaf).shape)) for e in q.ineqs]
            else:
                opaque.append(f"{leaf.name} (not a conjunction of comparisons)")
    else:
        raise Refused(f"the mask is not the KV lengths ({why}) and not the negation of a conjunction")
    for e, rank, leaf_shape in terms:
        b = _key_bound(e, rank, leaf_shape, shape, batch)
        if b is not None:
            b.whole = len(terms) == 1 and not opaque
            b.why_kept = why if not opaque else f"its other terms: {', '.join(opaque)}"
            return b
    described = "; ".join(f"{_describe(e)} < 0" for e, _, _ in terms)
    parts = ([f"terms read: {described}"] if described else []) + \
        ([f"terms not read: {', '.join(opaque)}"] if opaque else [])
    raise Refused(f"no term of the mask is a key bound j < L + c ({'; '.join(parts) or why})")


def check(m: StaticRead, ctx: PassContext) -> str | None:
    node, op = m.node, m.op
    extra = sorted(k for k, v in node.kwargs.items() if v is not None and k not in _WRAPPER_KWARGS[op.name])
    if extra:
        return f"the op also takes {extra}, which the lengths wrapper does not"
    if node.kwargs.get("actual_seq_lengths" if op is INCRE else "actual_seq_lengths_kv") is not None:
        return "the op has KV lengths already"
    try:
        m.bound = _bound(node, op)
    except Refused as refused:
        return str(refused)
    return None


def rewrite(rw: Rewrite, m: StaticRead, ctx: PassContext, site) -> list[torch.fx.Node]:
    node, op, b = m.node, m.op, m.bound
    wrapper, lengths_kwarg = PAGED_WRAPPERS[op.name]
    lens = b.length
    if val(lens).dim() != 1:
        lens = rw.call(aten.view.default, (lens, [-1]))
    if not b.per_batch:  # one cache position for every row
        lens = rw.call(aten.expand.default, (lens, [rw.size(node.args[0], 0)]))
    if val(lens).dtype not in (torch.int32, torch.int64):
        lens = rw.call(torch.ops.prims.convert_element_type.default, (lens, torch.int64))
    if b.offset:
        lens = rw.call(aten.add.Tensor, (lens, b.offset))
    layout = node.kwargs.get("input_layout", "BSH")
    seq_dim = 2 if layout.startswith("BNSD") else 1
    # Exactly eager's "j < L + c" over the keys [0, S_kv), for any value of L.
    lens = rw.call(aten.clamp.default, (lens, 0, rw.size(node.args[op.key_arg], seq_dim)))
    kwargs = {k: v for k, v in node.kwargs.items() if k in _WRAPPER_KWARGS[op.name]}
    kwargs[lengths_kwarg] = lens
    if b.whole:
        kwargs.pop("atten_mask", None)
        if "sparse_mode" in kwargs:
            kwargs["sparse_mode"] = 0
    new = rw.call(wrapper.overload, tuple(node.args[:3]), kwargs)
    replace_attention_output(rw, node, op, new, wrapper, "the lengths wrapper")
    new.meta[SITE] = site
    return [node, *node.users]


STATIC_LENGTHS_RULE = Rule(
    name=PATTERN, kind="attention", anchors=tuple(op.overload for op in DECODE_OPS), match=match,
    check=check, rewrite=rewrite, anchor_of=lambda m: m.node, claims=lambda m: [])


def static_cache_lengths(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """STATIC_LENGTHS_RULE over the decode attention ops the attention rules made. Not
    through apply_rules: each site has its row already (the attention rule's), which
    gets the outcome in its notes."""
    stats = RuleStats()
    for node in list(gm.graph.nodes):
        if erased(node) or node.op != "call_function" or node.target not in STATIC_LENGTHS_RULE.anchors:
            continue
        m = STATIC_LENGTHS_RULE.match(node)
        if m is None:
            continue
        stats.matched += 1
        site = node.meta.get(SITE)
        reason = check_and_rewrite(gm, STATIC_LENGTHS_RULE, m, ctx, site)
        if reason is None:
            stats.rewritten += 1
        if site is None:
            continue
        if reason is not None:
            site.notes.append(f"KV lengths not passed (the op reads all {_kv_seq(node, m.op)} K/V positions): "
                              f"{reason}")
            continue
        b = m.bound
        site.fused_op = PAGED_WRAPPERS[m.op.name][0].name
        lengths = f"{b.length.name}" + (f" + {b.offset}" if b.offset else "")
        if b.whole:
            site.sparse_mode = None
            site.notes = [n for n in site.notes if not n.startswith("full mask computed from positions")]
            site.notes.insert(0, f"{PATTERN}: the mask is exactly key j < {lengths}: the op reads only those "
                                 f"K/V (actual_seq_lengths as a tensor), no mask")
        else:
            site.notes.insert(0, f"{PATTERN}: one term of the mask is key j < {lengths}: the op reads only those "
                                 f"K/V (actual_seq_lengths as a tensor) and keeps the mask, which says more "
                                 f"({b.why_kept})")
    if stats.rewritten:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return stats
