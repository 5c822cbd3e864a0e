"""Packed (varlen) inference prefill -> the fused op in TND with actual lengths, decided at run time.

A serving engine packs a prefill batch's sequences into one token axis and
attends with a per-sequence causal mask built from each token's sequence id and
position (examples/mini_vllm/model.py)::

    keep = (seq_ids[:, None] == seq_ids[None, :]) & (positions[None, :] <= positions[:, None])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None])   # or hand-written

The attention rules fuse it into npu_prompt_flash_attention (or, for a symbolic
length, npu_fused_infer_attention_score) with that (T, T) mask materialised
(sparse_mode 1). The NPU's form is TND with ``actual_seq_lengths`` =
``actual_seq_lengths_kv`` = the cumulative sequence lengths and sparse_mode 3
(causal within each sequence). Those lengths are host ``int[]`` values that,
with their number, change every batch: a compiled graph can hold them neither
as constants nor as SymInts. This pass does for inference what
training_packed_to_tnd does for training: it retargets the fused call to a
wrapper op (kernels/prompt_attention_packed.py) that is *by definition* the
masked call and reads the mask at run time: where it is exactly block-diagonal
causal (plus "full" segments: the engine's padding tokens, sequence id -1 at
position 0, attend to one another) it computes through TND with the lengths read
from the mask, otherwise the masked call itself. So the result never rests on
this pass's proof; only the cost does.

What the pass proves, from the graph (the mask's construction, not its values):
the op's atten_mask (True = masked out) is, through views that keep its last
two dims (unsqueeze / expand / view of leading dims, casts to bool, clones) and
boolean algebra (``&``, ``|``, ``~``, De Morgan), exactly

    not (S[i] == S[j]  and  P[j] <= P[i])        i = query row (dim -2), j = key (dim -1)

for two 1-D tensors of length T: S of an integer dtype (the sequence ids)
compared for equality, and P (the positions) compared as key <= query
(``le(P[j], P[i])``, ``ge(P[i], P[j])``, or the negations ``gt``/``lt`` under
``~``/``|``). Each side is an unsqueeze (or view) of the same 1-D node, one
along the rows, one along the columns. A mask that does not read this way
(arange-built causal masks, which _mask_bands turns into sparse modes; a
padding mask; anything else) is not this pass's site: its row is unchanged.

Then it checks the call is the plain masked call the wrapper is defined as:
sparse_mode 1, a bool mask, no pse_shift, no actual lengths, no quantisation,
paging, padding sizes, prefix, rope or softmax_lse; layout BSH/BSND/BNSD/
BNSD_BSND; S_q == S_kv. Otherwise the site stays as the attention rules fused
it, with the reason in the row's notes. The wrapper's fake (the wrapped op's own
validation) runs on the site's fake values and the replacement must have the
original's shape, dtype and strides.

It runs last, after attention_layout and attention_precision, so the wrapper
takes the op's arguments as those passes left them (layout chosen, casts
inserted); the mask is still materialised, as the decision's input.

The report row (kind "attention") becomes pattern "packed:varlen-prefill",
fused op the wrapper, layout "TND", sparse_mode 3, with the attention rule's
pattern and the decision in the notes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..report import Report
from ._context import PassContext
from ._fx import (CASTS, SITE, Rewrite, RewriteRefused, erase_dead, erased, is_call, is_full_slice, require_same_value,
                  val)
from ._rules import RuleStats
from .registry import FUSED_INFER, PROMPT

aten = torch.ops.aten
npu_attn = torch.ops.npu_attn

PATTERN = "packed:varlen-prefill"
LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND")
_WRAPPERS = {
    PROMPT.overload: (npu_attn.npu_prompt_flash_attention_packed.default, "npu_prompt_flash_attention_packed"),
    FUSED_INFER.overload: (npu_attn.npu_fused_infer_attention_score_packed.default,
                           "npu_fused_infer_attention_score_packed"),
}
# Arguments the wrapper takes over (besides q, k, v); every other one must be at its default.
_TAKEN = {"atten_mask", "num_heads", "scale_value", "scale", "input_layout", "num_key_value_heads", "sparse_mode",
          "pre_tokens", "next_tokens"}
_DEFAULTS_OK = {"inner_precise": (0, 1), "softmax_lse_flag": (False,), "padding_mask": (None,)}

_SAME = (aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default, aten.contiguous.default)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ----------------------------------------------------------------------------
# The proof: the mask's construction
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Indexed:
    """A tensor whose value at (..., i, j) is src[i] (axis -2) or src[j] (axis -1)."""

    src: torch.fx.Node
    axis: int  # -2: along the query rows, -1: along the keys


# A boolean as a conjunction ("and") or disjunction ("or") of literals
# ((kind, src), positive): ("same", S) is S[i] == S[j], ("causal", P) is P[j] <= P[i].
Literal = tuple
Bool = tuple  # (op, frozenset[Literal])


def _rank(node) -> int | None:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _through(node):
    """Skip identity nodes (clones, no-op slices)."""
    while isinstance(node, torch.fx.Node) and (is_call(node, _SAME) or is_full_slice(node)):
        node = node.args[0]
    return node


def _unsqueezed_axis(rank: int, pos: int, dim: int) -> int:
    """The from-the-end position of an axis at `pos` (negative) after unsqueeze(dim) of a rank-`rank` tensor."""
    d = dim if dim >= 0 else dim + rank + 1
    a = rank + pos
    if d <= a:
        a += 1
    return a - (rank + 1)


def _view_keeps_last_two(node) -> bool:
    """A view/reshape/expand whose last two dims equal its input's last two (padded with leading 1s)."""
    src, out = val(node.args[0]), val(node)
    if src.dim() < 2 or out.dim() < 2:
        return False
    same = all(statically_known_true(a == b) for a, b in zip(src.shape[-2:], out.shape[-2:]))
    if is_call(node, aten.expand.default):
        return same
    return same and all(statically_known_true(s == 1) for s in list(src.shape[:-2]) + list(out.shape[:-2]))


def _indexed(node, depth: int = 0) -> Indexed | None:
    """node as src[i] or src[j] of a 1-D tensor src."""
    node = _through(node)
    if not isinstance(node, torch.fx.Node) or depth > 20:
        return None
    rank = _rank(node)
    widening = is_call(node, CASTS) and val(node).dtype in _INT_DTYPES and \
        val(node.args[0]).dtype in _INT_DTYPES and val(node).dtype.itemsize >= val(node.args[0]).dtype.itemsize
    if widening:
        return _indexed(node.args[0], depth + 1)
    if rank == 1:
        return Indexed(node, -1)  # broadcast as the last dim: along the keys
    if is_call(node, aten.unsqueeze.default):
        inner = _indexed(node.args[0], depth + 1)
        if inner is None:
            return None
        inner_rank = _rank(node.args[0])
        return Indexed(inner.src, _unsqueezed_axis(inner_rank, inner.axis, node.args[1]))
    if is_call(node, (aten.view.default, aten._unsafe_view.default, aten.reshape.default)) and \
            _rank(node.args[0]) == 1:
        shape = list(val(node).shape)
        big = [i for i, s in enumerate(shape) if not statically_known_true(s == 1)]
        if len(big) == 1:
            return Indexed(node.args[0], big[0] - len(shape))
        return None
    if is_call(node, aten.expand.default) and _view_keeps_last_two(node):
        return _indexed(node.args[0], depth + 1)
    return None


_COMPARISONS = (aten.eq.Tensor, aten.ne.Tensor, aten.le.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.lt.Tensor)


def _pair(node) -> tuple[Indexed, Indexed] | None:
    a, b = _indexed(node.args[0]), _indexed(node.args[1])
    if a is None or b is None or a.src is not b.src or {a.axis, b.axis} != {-2, -1}:
        return None
    return a, b


def _literal(node) -> Bool | None:
    """A comparison of one 1-D tensor along the rows with itself along the keys."""
    if not is_call(node, _COMPARISONS) or len(node.args) != 2:
        return None
    pair = _pair(node)
    if pair is None:
        return None
    a, _ = pair
    src = a.src
    dtype = val(src).dtype
    if is_call(node, (aten.eq.Tensor, aten.ne.Tensor)):
        if dtype not in _INT_DTYPES:
            return None
        return ("and", frozenset({(("same", src), is_call(node, aten.eq.Tensor))}))
    if dtype == torch.bool:
        return None
    # (comparison, first operand along the keys) -> the literal: key <= query (P[j] <= P[i]) or its negation
    # (P[j] > P[i]); a strict or reversed comparison is not this mask.
    first_is_key = a.axis == -1
    for target, key_first, positive in ((aten.le.Tensor, True, True), (aten.ge.Tensor, False, True),
                                        (aten.gt.Tensor, True, False), (aten.lt.Tensor, False, False)):
        if is_call(node, target):
            return ("and", frozenset({(("causal", src), positive)})) if first_is_key == key_first else None
    return None


def _negate(b: Bool) -> Bool:
    op, lits = b
    flipped = frozenset((name, not sign) for name, sign in lits)
    return ("and" if len(flipped) == 1 else ("or" if op == "and" else "and")), flipped


def _join(op: str, a: Bool, b: Bool) -> Bool | None:
    for x in (a, b):
        if len(x[1]) > 1 and x[0] != op:
            return None
    lits = a[1] | b[1]
    return ("and" if len(lits) == 1 else op), lits


_AND = (aten.bitwise_and.Tensor, aten.logical_and.default, aten.mul.Tensor)
_OR = (aten.bitwise_or.Tensor, aten.logical_or.default)
_NOT = (aten.logical_not.default, aten.bitwise_not.default)


def read_bool(node, depth: int = 0) -> Bool | None:
    """The boolean node as literals over the (query, key) axes, or None."""
    node = _through(node)
    if not isinstance(node, torch.fx.Node) or depth > 40:
        return None
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.dim() < 2:
        return None
    if is_call(node, _NOT):
        inner = read_bool(node.args[0], depth + 1)
        return None if inner is None else _negate(inner)
    if is_call(node, _AND + _OR):
        if v.dtype != torch.bool:
            return None
        a, b = read_bool(node.args[0], depth + 1), read_bool(node.args[1], depth + 1)
        if a is None or b is None:
            return None
        return _join("and" if is_call(node, _AND) else "or", a, b)
    if is_call(node, aten.unsqueeze.default):
        rank = _rank(node.args[0])
        d = node.args[1] if node.args[1] >= 0 else node.args[1] + rank + 1
        return read_bool(node.args[0], depth + 1) if d <= rank - 2 else None
    if is_call(node, (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default)):
        return read_bool(node.args[0], depth + 1) if _view_keeps_last_two(node) else None
    if is_call(node, CASTS) and v.dtype == torch.bool and val(node.args[0]).dtype == torch.bool:
        return read_bool(node.args[0], depth + 1)
    if v.dtype == torch.bool:
        return _literal(node)
    return None


@dataclass(frozen=True)
class PackedMask:
    seq_ids: torch.fx.Node
    positions: torch.fx.Node


def packed_mask(mask, length: object) -> PackedMask | None:
    """The proof: `mask` (True = masked out) is not (S[i] == S[j] and P[j] <= P[i]) for
    1-D S (integer) and P of `length` entries. None when it is not."""
    b = read_bool(mask)
    if b is None:
        return None
    op, lits = b
    if op != "or" or len(lits) != 2 or any(sign for _, sign in lits):
        return None
    kinds = {name[0]: name[1] for name, _ in lits}
    if set(kinds) != {"same", "causal"}:
        return None
    for src in kinds.values():
        if not statically_known_true(val(src).shape[0] == length):
            return None
    return PackedMask(kinds["same"], kinds["causal"])


# ----------------------------------------------------------------------------
# The site
# ----------------------------------------------------------------------------


class Refused(Exception):
    """A proved packed mask on a call the wrapper cannot take; the message is the reason."""


def _seq_lengths(node: torch.fx.Node, layout: str) -> tuple[object, object]:
    q, k = val(node.args[0]), val(node.args[1])
    axis = 2 if layout in ("BNSD", "BNSD_BSND") else 1
    return q.shape[axis], k.shape[axis]


def _check(node: torch.fx.Node) -> None:
    kwargs = dict(node.kwargs)
    for name, value in kwargs.items():
        if name in _TAKEN:
            continue
        if value is None or value in _DEFAULTS_OK.get(name, ()):
            continue
        raise Refused(f"{name} is set (the TND wrapper takes the plain masked call only)")
    if len(node.args) > 3:
        raise Refused("positional arguments past query/key/value")
    if kwargs.get("sparse_mode", 0) != 1:
        raise Refused(f"sparse_mode {kwargs.get('sparse_mode', 0)} (not the mask-only call)")
    layout = kwargs.get("input_layout", "BSH")
    if layout not in LAYOUTS:
        raise Refused(f"input_layout {layout}")
    mask = kwargs.get("atten_mask")
    if val(mask).dtype not in (torch.bool, torch.uint8):
        raise Refused(f"the mask is {val(mask).dtype}")
    q_seq, kv_seq = _seq_lengths(node, layout)
    if not statically_known_true(q_seq == kv_seq):
        raise Refused(f"S_q {q_seq} != S_kv {kv_seq}")
    if node.target is FUSED_INFER.overload and any(
            not (is_call(u, operator.getitem) and u.args[1] in (0, 1)) for u in node.users):
        raise Refused("the op's result is read other than by index")


def _rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    wrapper, _ = _WRAPPERS[node.target]
    op = PROMPT if node.target is PROMPT.overload else FUSED_INFER
    kw = node.kwargs
    kwargs = {"num_heads": kw.get("num_heads", 1), op.scale_kwarg: kw.get(op.scale_kwarg, 1.0),
              "input_layout": kw.get("input_layout", "BSH"), "num_key_value_heads": kw.get("num_key_value_heads", 0)}
    rw = Rewrite(gm, node)
    try:
        new = rw.call(wrapper, (node.args[0], node.args[1], node.args[2], kw["atten_mask"]), kwargs)
        if op.output_index is None:
            require_same_value(node, new, "the wrapper")
            rw.replace(node, new)
        else:
            for u in list(node.users):
                part = rw.call(operator.getitem, (new, u.args[1]))
                require_same_value(u, part, "the wrapper")
                rw.replace(u, part)
    except RewriteRefused:
        rw.rollback()
        raise
    rw.commit()
    new.meta[SITE] = node.meta.get(SITE)
    erase_dead(gm.graph, [*node.users, node] if op.output_index is not None else [node])


def _note(origin: str, proof: PackedMask, wrapped: str, wrapper: str) -> str:
    return (f"read by {origin}; the mask is proved not ({proof.seq_ids.name}[i] == {proof.seq_ids.name}[j] and "
            f"{proof.positions.name}[j] <= {proof.positions.name}[i]) (packed sequences): {wrapper} is {wrapped} "
            f"with that mask by definition, and at run time computes TND with actual_seq_lengths/"
            f"actual_seq_lengths_kv read from the mask and sparse_mode 3 where it is block-diagonal causal (padding "
            f"tokens that attend to one another: a second TND call without mask), else the masked call; the (T, T) "
            f"mask stays materialised as the decision's input")


def packed_prefill_to_tnd(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """Retarget every fused prefill call whose mask is proved packed to its TND wrapper."""
    stats = RuleStats()
    for node in list(gm.graph.nodes):
        if erased(node) or node.op != "call_function" or node.target not in _WRAPPERS:
            continue
        mask = node.kwargs.get("atten_mask")
        layout = node.kwargs.get("input_layout", "BSH")
        if mask is None or layout not in LAYOUTS:
            continue
        proof = packed_mask(mask, _seq_lengths(node, layout)[0])
        if proof is None:
            continue
        stats.matched += 1
        site = node.meta.get(SITE)
        origin = site.pattern if site is not None else "?"
        wrapped, (_, wrapper_name) = node.target._opname, _WRAPPERS[node.target]
        try:
            _check(node)
            _rewrite(gm, node)
        except (Refused, RewriteRefused) as refused:
            if site is not None:
                site.notes.append(f"packed prefill mask proved ({proof.seq_ids.name}, {proof.positions.name}) but "
                                  f"left as the masked call: {refused}")
            continue
        stats.rewritten += 1
        if site is None:
            continue
        site.pattern = PATTERN
        site.fused_op = wrapper_name
        site.layout = "TND"
        site.sparse_mode = 3
        site.notes = [n for n in site.notes if not n.startswith("full mask computed from positions")]
        site.notes.insert(0, _note(origin, proof, wrapped, wrapper_name))
    if stats.rewritten:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return stats


__all__ = ["PATTERN", "PackedMask", "packed_mask", "packed_prefill_to_tnd", "read_bool"]
