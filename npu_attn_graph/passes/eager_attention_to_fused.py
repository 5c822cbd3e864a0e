"""Rule: hand-written attention (matmul, softmax, matmul) -> the NPU fused ops.

After AOT every spelling of ``softmax(q @ k^T * scale + mask) @ v`` (torch.matmul
on 4-D tensors, torch.bmm on reshaped ones, einsum, SDPA's math decomposition,
transformers' eager_attention_forward, GPT-2's and BERT's eager attention)
reaches one batched form, anchored at the softmax over the last dim::

    scores = bmm(A, B)                      # (I, S_q, S_kv)
    scores = reshape(scores, (X, Y, S_q, S_kv))     optional split of I = X * Y
    scores = [scale] [casts] [terms]        # mul/div by a constant, add / fill (see _masks)
    probs  = softmax(scores, -1) [casts] [eval dropout]
    out    = bmm(reshape(probs, (I, S_q, S_kv)), V)   # (I, S_q, D_v)

Because the fused op works per (batch, head) pair exactly like bmm works per
index of I, the site is read in those terms: the query is A split into
(X, Y, S_q, D), the key is B^T split likewise, the value V likewise, and the
terms broadcast against the (X, Y, S_q, S_kv) scores as torch broadcast them.
Only reshapes that keep the row-major element order (views, size-1 dims moved)
count as splits and merges; a view that relabels data (say a BSND operand
flattened as if BNSD) is taken literally, so the result is what bmm computed.
Where an operand is a plain 4-D tensor behind matmul's expand/view (or a
transpose of one, for the key) that tensor is used directly; otherwise the
bmm operand itself is reshaped. A constant factor on q or k (SDPA's math
decomposition scales both by sqrt(scale)) folds into the scale.

The replacement is the bmm's output (reshaped back to (I, S_q, D_v)), or the
4-D view of it when the program splits it the same way, so every later use of
the output sees the same values. Structure alone is matched here; the op's
validation and the shape/dtype/stride check (_attention) decide the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..report import Report, Site
from ._attention import AttentionSite, Operand, float32_left_unfused, rewrite_attention, structure_reason
from ._context import PassContext
from ._fx import CASTS, SOFTMAXES, Rewrite, is_call, same_shape, scalar_constant, val
from ._masks import ScoreTerm
from ._rules import Rule, RuleStats, apply_rules
from .sdpa_to_fused import record_fused

aten = torch.ops.aten

RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.permute.default, aten.transpose.int,
            aten.expand.default, aten.clone.default, aten.alias.default)


def _one(size: object) -> bool:
    return statically_known_true(size == 1)


# ----------------------------------------------------------------------------
# Reshape chains that keep the row-major element order
# ----------------------------------------------------------------------------


def keeps_element_order(node: torch.fx.Node) -> bool:
    """node only relabels its input's elements in row-major order: a view or
    reshape, size-1 dims added, removed or moved, a same-shape expand, a clone."""
    if not is_call(node, RESHAPES):
        return False
    source = val(node.args[0])
    if node.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
                       aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.clone.default,
                       aten.alias.default):
        return True
    if node.target is aten.expand.default:
        return same_shape(source.shape, val(node).shape)
    if node.target is aten.transpose.int:
        a, b = (d % source.dim() for d in node.args[1:3])
        return a == b or _one(source.shape[a]) or _one(source.shape[b])
    dims = [d % source.dim() for d in node.args[1]]  # permute: non-size-1 dims keep their order
    kept = [d for d in dims if not _one(source.shape[d])]
    return kept == sorted(kept)


def order_keeping_root(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """Walk back from node through order-keeping reshapes: (the first node that
    is not one, the reshapes walked through, outermost first)."""
    chain = []
    while isinstance(node, torch.fx.Node) and keeps_element_order(node):
        chain.append(node)
        node = node.args[0]
    return node, chain


# ----------------------------------------------------------------------------
# Operands
# ----------------------------------------------------------------------------

KEY_TRANSPOSES = ((2, 3), (3, 2), (-1, -2), (-2, -1), (2, -1), (-1, 2), (-2, 3), (3, -2))


def _untransposed(node: torch.fx.Node) -> torch.fx.Node | None:
    """K from K^T when node is K.transpose(-2, -1) of a 4-D K."""
    if is_call(node, aten.transpose.int) and tuple(node.args[1:3]) in KEY_TRANSPOSES:
        return node.args[0]
    if is_call(node, aten.permute.default) and [d % 4 for d in node.args[1]] == [0, 1, 3, 2]:
        return node.args[0]
    return None


def scale_factor(node: torch.fx.Node) -> tuple[torch.fx.Node, float] | None:
    """(x, c) when node is x * c or x / c with a constant scalar c != 0."""
    if not is_call(node, (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)):
        return None
    a, b = node.args[:2]
    if node.target in (aten.div.Tensor, aten.div.Scalar) and "rounding_mode" in node.kwargs:
        return None
    for x, c in ((a, b), (b, a)) if node.target in (aten.mul.Tensor, aten.mul.Scalar) else ((a, b),):
        factor = scalar_constant(c)
        if isinstance(x, torch.fx.Node) and val(x) is not None and factor not in (None, 0.0):
            if isinstance(c, torch.fx.Node) and val(c).dim() > 0:
                continue  # a constant tensor of higher rank could broadcast the shape
            if val(x).dtype != val(node).dtype:
                return None  # the factor promotes the dtype: keep the product as it is
            return x, (1.0 / factor if node.target in (aten.div.Tensor, aten.div.Scalar) else factor)
    return None


def resolve_operand(flat: torch.fx.Node, split: tuple, transposed: bool) -> tuple[Operand, float]:
    """The 4-D operand behind a 3-D bmm operand, and any constant factor on it.

    flat is (I, S, D) (or (I, D, S) for the key, transposed=True). Walking back
    through order-keeping reshapes and constant factors, the furthest node of
    shape (X, Y, S, D) (resp. (X, Y, D, S)) is the operand; without one the
    bmm operand itself is split."""
    want = [*(val(x) if isinstance(x, torch.fx.Node) else (val(flat).shape[0] if x is None else x) for x in split),
            *val(flat).shape[1:]]
    factor, found, found_factor = 1.0, None, 1.0
    node = flat
    while isinstance(node, torch.fx.Node):
        if val(node) is not None and val(node).dim() == 4 and same_shape(val(node).shape, want):
            found, found_factor = node, factor
        if keeps_element_order(node):
            node = node.args[0]
            continue
        scaled = scale_factor(node)
        if scaled is None:
            break
        node, factor = scaled[0], factor * scaled[1]
    if found is None:
        return Operand(flat, transposed=transposed, unflatten=split), 1.0
    if transposed:
        key = _untransposed(found)
        if key is not None:
            return Operand(key), found_factor
        return Operand(found, transposed=True), found_factor
    return Operand(found), found_factor


# ----------------------------------------------------------------------------
# The scores chain (backward from the softmax) and the probs chain (forward)
# ----------------------------------------------------------------------------


@dataclass
class _Scores:
    bmm: torch.fx.Node
    split: tuple | None  # (X, Y) sizes of the 4-D scores, as ints or SymInt nodes; None: 3-D scores
    scale: float = 1.0
    terms: list[ScoreTerm] = field(default_factory=list)
    nodes: list[torch.fx.Node] = field(default_factory=list)
    runtime_scales: list[tuple[torch.fx.Node, bool]] = field(default_factory=list)
    form_reason: str | None = None


def _split_sizes(view: torch.fx.Node, chain: list[torch.fx.Node], bmm: torch.fx.Node) -> tuple | None:
    """(X, Y) of 4-D scores (X, Y, S_q, S_kv) made from bmm's (X*Y, S_q, S_kv) output."""
    shape, flat = val(view).shape, val(bmm).shape
    if len(shape) != 4 or not same_shape(shape[2:], flat[1:]) or not statically_known_true(
            shape[0] * shape[1] == flat[0]):
        return None
    sizes = []
    for i in (0, 1):
        if isinstance(shape[i], int) or not hasattr(shape[i], "node"):
            sizes.append(int(shape[i]))
            continue
        # A symbolic size: take it from the view's own size argument.
        last = chain[0]
        if last.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default) and \
                isinstance(last.args[1][i], torch.fx.Node):
            sizes.append(last.args[1][i])
        else:
            return None
    return tuple(sizes)


def _runtime_scalar(node: object) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and v.dim() == 0


def walk_scores(x: torch.fx.Node) -> _Scores | None:
    """From the softmax input back to the QK bmm, reading each step. One reshape
    may split the bmm's (I, S_q, S_kv) scores into 4-D; terms apply after it."""
    steps: list[tuple[str, object, torch.fx.Node]] = []  # outermost first
    nodes, split_view, split_chain = [], None, []
    node = x
    while not (is_call(node, aten.bmm.default) and val(node).dim() == 3):
        if keeps_element_order(node) and not same_shape(val(node).shape, val(node.args[0]).shape):
            if split_view is not None:
                return None  # a second reshape of the scores
            node, split_chain = order_keeping_root(node)
            split_view = split_chain[0]
            nodes.extend(split_chain)
            continue
        step = _score_step(node)
        if step is None:
            return None
        kind, inner, payload = step
        if kind == "term" and split_view is not None:
            return None  # a term on the scores before they are split
        steps.append((kind, payload, node))
        nodes.append(node)
        node = inner
    split = None
    if split_view is not None:
        split = _split_sizes(split_view, split_chain, node)
        if split is None:
            return None
    scores = _Scores(node, split, nodes=[*nodes, node])
    seen_term = False
    for kind, payload, step_node in reversed(steps):  # from the bmm outwards
        if kind in ("scale", "runtime_scale"):
            if seen_term:
                scores.form_reason = f"the scores are scaled ({step_node.name}) after a mask or bias term"
            if kind == "scale":
                scores.scale *= payload
            else:
                scores.runtime_scales.append(payload)
        elif kind == "term":
            seen_term = True
            scores.terms.append(payload)
    return scores


def _score_step(node: torch.fx.Node):
    """(kind, the scores operand, payload) for one step between bmm and softmax, or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    dtype = val(node).dtype if isinstance(val(node), torch.Tensor) else None
    if dtype is None or not dtype.is_floating_point:
        return None
    if is_call(node, CASTS) and val(node.args[0]).dtype.is_floating_point:
        return "same", node.args[0], None
    if keeps_element_order(node) and same_shape(val(node).shape, val(node.args[0]).shape):
        return "same", node.args[0], None
    scaled = scale_factor(node)
    if scaled is not None:
        return "scale", scaled[0], scaled[1]
    if is_call(node, (aten.mul.Tensor, aten.div.Tensor)):
        a, b = node.args[:2]
        for x, c in ((a, b), (b, a)) if node.target is aten.mul.Tensor else ((a, b),):
            if isinstance(x, torch.fx.Node) and _runtime_scalar(c) and not _runtime_scalar(x):
                return "runtime_scale", x, (c, node.target is aten.div.Tensor)
        return None
    if is_call(node, (aten.add.Tensor, aten.sub.Tensor)):
        a, b = node.args[:2]
        alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            return None  # a constant shift
        if node.target is aten.sub.Tensor:
            return ("term", a, ScoreTerm(b, dtype, alpha=-float(alpha))) if _leads_to_bmm(a) else None
        if _leads_to_bmm(a):
            return "term", a, ScoreTerm(b, dtype, alpha=float(alpha))
        if _leads_to_bmm(b) and alpha == 1:
            return "term", b, ScoreTerm(a, dtype)
        return None
    if is_call(node, aten.where.self):
        cond, a, b = node.args
        if val(cond).dtype != torch.bool:
            return None
        if isinstance(a, torch.fx.Node) and _leads_to_bmm(a) and scalar_constant(b) is not None:
            return "term", a, ScoreTerm(cond, dtype, fill=scalar_constant(b), fill_where=False)
        if isinstance(b, torch.fx.Node) and _leads_to_bmm(b) and scalar_constant(a) is not None:
            return "term", b, ScoreTerm(cond, dtype, fill=scalar_constant(a), fill_where=True)
        return None
    if is_call(node, (aten.masked_fill.Scalar, aten.masked_fill.Tensor)):
        x, masked, fill = node.args[:3]
        if scalar_constant(fill) is None or val(masked).dtype != torch.bool:
            return None
        return "term", x, ScoreTerm(masked, dtype, fill=scalar_constant(fill), fill_where=True)
    return None


def _leads_to_bmm(node: object, depth: int = 12) -> bool:
    """node's value comes from a bmm through single-scores steps (which operand of
    an add is the scores)."""
    while depth > 0 and isinstance(node, torch.fx.Node):
        if is_call(node, aten.bmm.default):
            return True
        if keeps_element_order(node):
            node = node.args[0]
            depth -= 1
            continue
        step = _score_step(node)
        if step is None:
            return False
        node = step[1]
        depth -= 1
    return False


PROB_STEPS = CASTS + RESHAPES


def walk_probs(softmax: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """From the softmax forward to out = bmm(probs, V): (that bmm, the nodes between)."""
    chain = []
    node = softmax
    while True:
        steps = [u for u in node.users
                 if (is_call(u, aten.bmm.default) and u.args[0] is node)
                 or (is_call(u, PROB_STEPS) and keeps_element_order(u))
                 or (is_call(u, CASTS) and val(u).dtype.is_floating_point)]
        if len(steps) != 1:
            return None
        user = steps[0]
        if is_call(user, aten.bmm.default):
            return user, chain
        chain.append(user)
        node = user


def _output(bmm: torch.fx.Node, split: tuple | None) -> tuple[torch.fx.Node, bool, list[torch.fx.Node]]:
    """The node to replace: the 4-D split of the bmm output when the program makes
    one (then the nodes between are internal), else the bmm output itself."""
    if split is not None and len(bmm.users) == 1:
        node, chain = bmm, []
        while len(node.users) == 1:
            user = next(iter(node.users))
            if not keeps_element_order(user):
                break
            chain.append(user)
            node = user
            if val(node).dim() == 4:
                x, y = (val(s) if isinstance(s, torch.fx.Node) else s for s in split)
                if same_shape(val(node).shape, [x, y, *val(bmm).shape[1:]]):
                    return node, False, [bmm, *chain[:-1]]
                break
    return bmm, True, []


def safe_softmax_fixup(softmax: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(the result, the fix-up nodes) when softmax is _safe_softmax's core-ATen
    decomposition (torch.export's run_decompositions()): ``where(all(x == -inf, -1,
    keepdim=True), zeros_like(p), p)`` for p = _softmax(x, -1), ``all`` spelled
    logical_not(any(logical_not(...))). Rows with every score -inf give 0, as the
    fused ops do, instead of aten softmax's NaN."""
    x = softmax.args[0]
    users = list(softmax.users)
    where = next((u for u in users if is_call(u, aten.where.self) and u.args[2] is softmax), None)
    zeros = next((u for u in users if is_call(u, (aten.full_like.default, aten.zeros_like.default))), None)
    if where is None or zeros is None or len(users) != 2 or where.args[1] is not zeros or \
            list(zeros.users) != [where] or scalar_constant(zeros) != 0.0:
        return None
    rows = where.args[0]
    if is_call(rows, aten.logical_not.default) and is_call(rows.args[0], aten.any.dim) and \
            is_call(rows.args[0].args[0], aten.logical_not.default):
        reduced, inner = rows.args[0], rows.args[0].args[0].args[0]
        nodes = [rows, reduced, rows.args[0].args[0]]
    elif is_call(rows, aten.all.dim):
        reduced, inner, nodes = rows, rows.args[0], [rows]
    else:
        return None
    rank = val(softmax).dim()
    dim, keepdim = (list(reduced.args[1:]) + [False])[:2]
    if dim not in (-1, rank - 1) or not keepdim or not is_call(inner, aten.eq.Scalar) or inner.args[0] is not x or \
            inner.args[1] != -math.inf:
        return None
    fixup = [where, zeros, *nodes, inner]
    if any(u not in fixup for n in fixup[1:] for u in n.users):
        return None  # a piece of the fix-up is read elsewhere
    return where, fixup


def match_eager_attention(softmax: torch.fx.Node) -> AttentionSite | None:
    rank = val(softmax).dim()
    if softmax.args[1] not in (-1, rank - 1) or rank not in (3, 4):
        return None
    scores = walk_scores(softmax.args[0])
    fixup = safe_softmax_fixup(softmax)
    tail = walk_probs(fixup[0] if fixup else softmax)
    if scores is None or tail is None:
        return None
    return site_from_chains("eager:matmul-softmax-matmul", softmax, scores, *tail,
                            around_softmax=(softmax, *(fixup[1] if fixup else ())),
                            nan_rows=None if fixup is None else False)


def site_from_chains(pattern: str, softmax: torch.fx.Node, scores: _Scores, bmm2: torch.fx.Node,
                     prob_chain: list[torch.fx.Node], around_softmax: tuple[torch.fx.Node, ...],
                     sink: torch.fx.Node | None = None, nan_rows: bool | None = None) -> AttentionSite | None:
    """The site read from its scores chain (back to the QK bmm) and its probs chain
    (forward to the PV bmm); around_softmax are the nodes between the two chains.
    nan_rows: whether a row with every score masked gives NaN (None: as the softmax op does)."""
    split = scores.split if scores.split is not None else (None, 1)
    q, q_factor = resolve_operand(scores.bmm.args[0], split, transposed=False)
    k, k_factor = resolve_operand(scores.bmm.args[1], split, transposed=True)
    v, v_factor = resolve_operand(bmm2.args[1], split, transposed=False)
    if v_factor != 1.0:
        v = Operand(bmm2.args[1], unflatten=split)
    output, flat, output_chain = _output(bmm2, scores.split)
    # The probs must be merged back exactly as the scores were split.
    if scores.split is not None and not same_shape(val(bmm2.args[0]).shape, val(scores.bmm).shape):
        return None
    return AttentionSite(
        pattern=pattern, anchor=softmax, query=q, key=k, value=v, output=output,
        flat_output=flat, scale=scores.scale * q_factor * k_factor, terms=tuple(scores.terms),
        score_rank=4 if scores.split is not None else 3,
        internal=tuple([*scores.nodes, *around_softmax, *prob_chain, *output_chain]),
        runtime_scales=tuple(scores.runtime_scales), form_reason=scores.form_reason, sink=sink,
        softmax_nan_rows=softmax.target is not aten._safe_softmax.default if nan_rows is None else nan_rows)


def check_site(site: AttentionSite, ctx: PassContext) -> str | None:
    return structure_reason(site) or float32_left_unfused(site, ctx)


def rewrite_site(rw: Rewrite, site: AttentionSite, ctx: PassContext, record: Site) -> list[torch.fx.Node]:
    fused = rewrite_attention(rw, site, ctx)
    record_fused(record, fused)
    return [site.output, *site.internal]


EAGER_RULE = Rule(
    name="eager:matmul-softmax-matmul", kind="attention", anchors=SOFTMAXES, match=match_eager_attention,
    check=check_site, rewrite=rewrite_site, anchor_of=lambda site: site.output, claims=lambda site: [site.anchor])


def eager_attention_to_fused(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """Rewrite every hand-written attention of `gm` that a fused op takes."""
    return apply_rules(gm, (EAGER_RULE,), report, ctx)
