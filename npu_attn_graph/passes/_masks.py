"""What the scores of an attention site meet between the QK product and the
softmax, decided by the values, and how the fused ops express it.

Each ScoreTerm is one thing the program does to the scaled scores: adds a
tensor (``scores + t``, ``add(scores, t, alpha=a)``), or fills masked
positions with a constant (``masked_fill``, ``where(keep, scores, c)``).
plan_mask turns the terms into the fused op's arguments:

- a filled or added constant of -inf masks exactly: it becomes the NPU mask
  (bool, True = masked out). A row with every key masked gives NaN in eager
  softmax and 0 in SDPA and the fused ops;
- torch.finfo(dtype).min masks the same way where a row keeps a key. A row
  with no key left gets equal scores, so eager returns the mean of V there
  while the fused ops return 0: the rewrite adds that mean back for such rows
  (the "fully-masked-row fix-up", noted in the report). An *added* min
  equalises the scores by absorbing them: always in float32 and bfloat16
  (their min is ~1e38 and its spacing ~1e31), in float16 for scaled scores
  within +-16 (spacing 32); beyond that eager's float16 rounding of s + min
  decides, and the fix-up gives the mean of V, what the program computes in
  higher precision (a float32 pse_shift would give softmax(s) instead). The
  fix-up holds for a min mask alone; with other terms, added ones all go in
  as one pse_shift (their sum is what the program adds), and a fill among
  them leaves the site alone (min + min overflows to -inf, a fill resets a
  key: what an empty row gets is eager's combination of the terms);
- other fill values are not masks (refused, with the value);
- any other added tensor is a bias: pse_shift, which the ops add to the
  scaled scores exactly as the program does. A *boolean* tensor added to
  scores is promoted to 0.0/1.0 and is therefore a bias of +1, not a mask.

Shapes follow torch broadcasting: a term is right-aligned with the scores
(a 3-D mask (X, S_q, S_kv) lines up X with the heads of 4-D scores), then
expanded to what the op reads: masks to (B or 1, 1, S_q, S_kv) (a mask that
differs per head cannot be an NPU mask), biases to (B or 1, N, S_q, S_kv).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels._library import INT_MAX
from ._fx import CASTS, Rewrite, RewriteRefused, is_call, scalar_constant, val
from ._mask_bands import BandMode, band_mode, keep_band

aten = torch.ops.aten

# Shape-only ops that may sit between a mask and its use (transformers slices
# the cache-length mask to the keys in use): replayed on the boolean.
MASK_RESHAPES = (aten.slice.Tensor, aten.expand.default, aten.view.default, aten.unsqueeze.default,
                 aten._unsafe_view.default, aten.reshape.default, aten.alias.default)


@dataclass(frozen=True)
class ScoreTerm:
    """One thing applied to the scaled scores before the softmax."""

    node: torch.fx.Node
    dtype: torch.dtype  # dtype of the scores where the term applies
    fill: float | None = None  # None: node is added (times alpha); else masked positions become fill
    fill_where: bool = True  # fill: positions where node is True are filled (masked_fill); False: where it is False
    alpha: float = 1.0

    def describe(self) -> str:
        if self.fill is None:
            return f"+ {self.node.name}" + (f" * {self.alpha:g}" if self.alpha != 1 else "")
        return f"fill {self.fill:g} where {'' if self.fill_where else 'not '}{self.node.name}"


@dataclass
class MaskPlan:
    """The fused op's view of a site's terms."""

    atten_mask: torch.fx.Node | None = None  # bool (B or 1, 1, S_q, S_kv), True = masked out
    pse_shift: torch.fx.Node | None = None  # (B or 1, N, S_q, S_kv), the query's dtype
    fully_masked_fixup: bool = False  # add the mean of V back to rows with no key
    empty_rows_nan: bool = False  # rows with no key give NaN (eager softmax over all -inf)
    band: BandMode | None = None  # the mask is this band: a sparse mode instead of atten_mask
    notes: list[str] = field(default_factory=list)


def _absorbs(fill: float, dtype: torch.dtype) -> bool:
    """An added `fill` (the dtype's min or below) makes every score of a row with no
    key left the same: exactly, in float32/bfloat16 (spacing ~1e31 at their min), and
    in float16 for scaled scores within +-16 (spacing 32 at -65504); beyond that eager's
    float16 sum rounds to a few neighbouring values, and the mean of V the fix-up gives
    is what the program computes in any higher precision."""
    return dtype.is_floating_point and fill <= torch.finfo(dtype).min


def _is_min(fill: float, dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and fill == torch.finfo(dtype).min


@dataclass(frozen=True)
class _Mask:
    masked: torch.fx.Node  # bool node (possibly to be negated)
    negate: bool  # the node holds "keep" (True = kept)
    reshapes: tuple[torch.fx.Node, ...]  # shape-only ops to replay on it
    needs_fixup: bool


def _classify(term: ScoreTerm) -> _Mask | str | None:
    """A mask, a reason the term cannot be taken, or None for a bias."""
    if term.fill is not None:
        if term.fill == -math.inf:
            return _Mask(term.node, not term.fill_where, (), False)
        if _is_min(term.fill, term.dtype):  # replaced, not added: rows with no key become exactly uniform
            return _Mask(term.node, not term.fill_where, (), True)
        return (f"masked scores are set to {term.fill:g}, which is not a mask value "
                f"(use -inf or torch.finfo({str(term.dtype).replace('torch.', '')}).min)")
    if val(term.node).dtype == torch.bool or term.alpha != 1:
        return None  # a boolean added is +0.0/+1.0: a bias
    found = two_valued(term.node)
    if found is None:
        return None
    cond, if_true, if_false, reshapes = found
    for keep_value, masked_value, negate in ((if_true, if_false, True), (if_false, if_true, False)):
        if keep_value != 0.0:
            continue
        if masked_value == -math.inf:
            return _Mask(cond, negate, reshapes, False)
        if masked_value > -math.inf and _absorbs(masked_value, term.dtype):
            return _Mask(cond, negate, reshapes, True)
    return None


def two_valued(term: torch.fx.Node, limit: int = 16) -> tuple | None:
    """(cond, value where cond is True, value where False, shape-only ops to replay on
    cond) when `term` is an element-wise function of one boolean tensor and constants:
    where(keep, 0, min), zeros.masked_fill(m, -inf), (1 - keep.float()) * -1e4,
    keep.to(dtype) ... The two values are computed by running the program's own ops
    on a True and a False, so casts and roundings are exactly the program's."""
    path, reshapes, node = [], [], term
    while True:
        v = val(node)
        if not isinstance(v, torch.Tensor) or len(path) + len(reshapes) > limit:
            return None
        if v.dtype == torch.bool and node is not term:
            break
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            return None
        if is_call(node, MASK_RESHAPES):
            reshapes.append(node)
            node = node.args[0]
            continue
        pointwise = is_call(node, CASTS) or torch.Tag.pointwise in getattr(node.target, "tags", ())
        inputs = [a for a in node.all_input_nodes if scalar_constant(a) is None]
        if not pointwise or len(inputs) != 1:
            return None
        path.append(node)
        node = inputs[0]
    cond = node
    key = _program_key(path, cond)
    cache = _VALUES.setdefault(term.graph, {}) if key is not None else None
    if cache is not None and key in cache:
        values = cache[key]
    else:
        values = _evaluate(path, cond)
        if cache is not None:
            cache[key] = values
    if values is None:
        return None
    return cond, values[0], values[1], tuple(reversed(reshapes))


# two_valued's values per graph, by the program that computes them: a model's layers
# share one mask, and each site (and the split of its terms) asks for it again, each
# time running the ops under the compile's fake mode. The key holds every input of
# that evaluation, so a hit returns exactly what running it again would.
_VALUES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNCACHED_TAGS = (torch.Tag.nondeterministic_seeded, torch.Tag.inplace_view)


def _program_key(path: list[torch.fx.Node], cond: torch.fx.Node) -> tuple | None:
    """What _evaluate reads, as a hashable value; None where it cannot be one (then
    the values are computed afresh)."""
    def leaf(arg: object) -> object:
        if isinstance(arg, torch.fx.Node):
            constant = scalar_constant(arg) if arg is not cond else None
            # -0.0 and 0.0, 1 and 1.0 and True compare equal but compute differently: repr and type tell them apart
            return ("x",) if constant is None else ("c", repr(constant), val(arg).dtype)
        if isinstance(arg, (list, tuple)):
            return (type(arg).__name__, tuple(leaf(a) for a in arg))
        if isinstance(arg, dict):
            return ("dict", tuple((k, leaf(a)) for k, a in arg.items()))
        if isinstance(arg, (torch.SymInt, torch.SymFloat, torch.SymBool, torch.Tensor)):
            raise TypeError("not a plain value")
        return (type(arg).__name__, repr(arg) if isinstance(arg, float) else arg)

    try:
        if any(tag in getattr(op.target, "tags", ()) for op in path for tag in _UNCACHED_TAGS):
            return None  # not a function of the key alone
        # The ops run under whatever fake mode is active (constant propagation), or none.
        mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
        key = (id(mode) if mode is not None else None,
               *((op.target, leaf(op.args), leaf(dict(op.kwargs))) for op in path))
        hash(key)
    except Exception:  # noqa: BLE001 - unhashable or unreadable: evaluate as before, uncached
        return None
    return key


def _evaluate(path: list[torch.fx.Node], cond: torch.fx.Node) -> tuple[float, float] | None:
    """The path's ops (output first) run on a True and on a False in place of cond."""
    values = []
    for flag in (True, False):
        x = torch.tensor(flag)
        for op in reversed(path):
            def concrete(arg, x=x):
                if arg is cond or (isinstance(arg, torch.fx.Node) and scalar_constant(arg) is None):
                    return x
                return torch.tensor(scalar_constant(arg), dtype=val(arg).dtype)

            args, kwargs = torch.fx.node.map_arg((op.args, op.kwargs), concrete)
            kwargs = {k: (torch.device("cpu") if k == "device" else w) for k, w in kwargs.items()}
            try:
                x = op.target(*args, **kwargs)
            except Exception:  # noqa: BLE001 - not evaluable on a scalar: not a two-valued term
                return None
        if not isinstance(x, torch.Tensor) or x.numel() != 1:
            return None
        values.append(float(x.reshape(())))
    return values[0], values[1]


def _aligned(rw: Rewrite, node: torch.fx.Node, score_rank: int) -> torch.fx.Node:
    """node right-aligned with scores of rank score_rank, as a 4-D (B', N', S_q', S_kv') tensor."""
    rank = val(node).dim()
    if rank > score_rank:
        raise RewriteRefused(f"term {node.name} of rank {rank} broadcasts the scores to a higher rank")
    for _ in range(score_rank - rank):
        node = rw.call(aten.unsqueeze.default, (node, 0))
    if score_rank == 3:  # (B*N, S_q, S_kv) scores: heads are 1
        node = rw.call(aten.unsqueeze.default, (node, 1))
    return node


def _expanded(rw: Rewrite, node: torch.fx.Node, target: list, what: str) -> torch.fx.Node:
    """node (4-D) expanded to target, where target[0] may also stay 1."""
    shape = val(node).shape
    sizes = []
    for i, (have, want) in enumerate(zip(shape, target)):
        if i == 0 and _is_one(have):
            sizes.append(1)
            continue
        if not (_is_one(have) or _known_equal(have, want)):
            raise RewriteRefused(f"{what} of shape {tuple(shape)} does not broadcast to {tuple(_plain(target))}")
        sizes.append(want)
    if all(_known_equal(h, s) if not isinstance(s, torch.fx.Node) else _known_equal(h, val(s))
           for h, s in zip(shape, sizes)):
        return node
    return rw.call(aten.expand.default, (node, sizes))


def _is_one(size: object) -> bool:
    return statically_known_true(size == 1)


def _known_equal(a: object, b: object) -> bool:
    if isinstance(b, torch.fx.Node):
        b = val(b)
    return statically_known_true(a == b)


def _plain(sizes: list) -> list:
    return [val(s) if isinstance(s, torch.fx.Node) else s for s in sizes]


def plan_mask(rw: Rewrite, terms: tuple[ScoreTerm, ...], score_rank: int, query: torch.fx.Node,
              key: torch.fx.Node, with_sink: bool = False, softmax_nan_rows: bool = False) -> MaskPlan:
    """Build the NPU mask / pse_shift nodes for `terms` (raises RewriteRefused).

    softmax_nan_rows: the site's softmax is aten's, which gives NaN on a row whose
    scores are all -inf (SDPA and _safe_softmax give 0, as the op does); rows
    the -inf masks leave without a key then get NaN back.

    with_sink: a finite sink logit joins every row's softmax, so a masked key adds
    exactly 0 however the terms combine, and a row with no key gives 0 in eager
    as in the op: min masks are plain masks, no fix-up."""
    plan = MaskPlan()
    if not terms:
        return plan
    q_dtype = val(query).dtype
    batch, heads, q_len, kv_len = (rw.size(query, 0), rw.size(query, 1), rw.size(query, 2), rw.size(key, 2))
    split = _split_added_masks(terms)
    masks, biases = [], []
    for term in split:
        kind = _classify(term)
        if isinstance(kind, str):
            raise RewriteRefused(kind)
        if kind is None:
            biases.append(term)
        else:
            masks.append(kind if not with_sink else _Mask(kind.masked, kind.negate, kind.reshapes, False))
    shape = [batch, 1, q_len, kv_len]
    band = _band(rw, masks, score_rank, shape, val(query).shape[2], val(key).shape[2])
    if band is None and any(m.needs_fixup for m in masks) and len(split) > 1:
        # With a finite min among several terms, what a row with no key left gets in eager
        # depends on how the terms combine (min + min overflows to -inf, a fill resets a key):
        # the mean-of-V fix-up would be wrong. Added terms, summed, are exactly what the
        # program adds; a fill among them cannot be replayed as a sum. (A band keeps a key
        # in every row: no row needs the fix-up.)
        if any(t.fill is not None for t in terms):
            raise RewriteRefused("a torch.finfo(dtype).min mask combined with other mask or bias terms by a fill: "
                                 "rows with no key left would need eager's combination of the terms")
        if any(t.dtype == torch.float16 for t in terms):
            # The summed terms would be added in float32 by the op, where float16's min
            # (-65504) no longer absorbs the scores of a row with no key left.
            raise RewriteRefused("a float16 torch.finfo(dtype).min mask combined with other added terms: rows "
                                 "with no key left depend on float16 absorbing the scores")
        masks, biases = [], list(terms)
    if band is not None:
        plan.band = band
        plan.notes.append(band.describe())
        masks = []
    for m in masks:
        node = _mask_node(rw, m, score_rank, shape)
        plan.atten_mask = node if plan.atten_mask is None else rw.call(aten.logical_or.default,
                                                                       (plan.atten_mask, node))
        plan.fully_masked_fixup |= m.needs_fixup
    for term in biases:
        node = term.node
        dtype = val(node).dtype
        if dtype != torch.bool and dtype != q_dtype:
            raise RewriteRefused(f"additive term {node.name} is {str(dtype).replace('torch.', '')} while the query "
                                 f"is {str(q_dtype).replace('torch.', '')} (pse_shift takes the query's dtype)")
        if dtype == torch.bool:
            node = rw.call(aten._to_copy.default, (node,), {"dtype": q_dtype})
        if term.alpha != 1:
            node = rw.call(aten.mul.Tensor, (node, term.alpha))
        node = _aligned(rw, node, score_rank)
        plan.pse_shift = node if plan.pse_shift is None else rw.call(aten.add.Tensor, (plan.pse_shift, node))
    if plan.atten_mask is not None and any(_from_positions(m.masked) for m in masks):
        plan.notes.append("full mask computed from positions: a causal/band structure that sparse modes (or, "
                          "for decode, actual_seq_lengths) express without materialising it")
    if plan.pse_shift is not None:
        plan.pse_shift = _expanded(rw, plan.pse_shift, [batch, heads, q_len, kv_len], "additive term")
        plan.notes.append("additive term as pse_shift")
    if plan.fully_masked_fixup:
        plan.notes.append("fully-masked-row fix-up (finfo.min mask: rows with no key get the mean of V, as in eager)")
    elif softmax_nan_rows and not with_sink and plan.atten_mask is not None:
        plan.empty_rows_nan = True
        plan.notes.append("fully-masked-row fix-up (-inf mask: rows with no key get NaN, as eager's softmax gives)")
    return plan


def _split_added_masks(terms: tuple[ScoreTerm, ...]) -> list[ScoreTerm]:
    """An added term that is itself bias + mask (T5 adds its causal mask to the
    position bias, then the sum to the scores), or where(keep, bias, mask value),
    as two terms. Where the mask
    keeps a key it adds 0, so the bias alone is exactly what the program adds
    there; where it masks, the sum masks too (the ops and the fix-up decide
    rows with no key, as for any mask among other terms)."""
    out = []
    for term in terms:
        node = term.node
        if _classify(term) is not None:  # a mask (or refused) as a whole
            out.append(term)
            continue
        while is_call(node, (aten.clone.default, aten.alias.default)):  # SDPA's contiguous mask
            node = node.args[0]
        if term.fill is None and term.alpha == 1 and is_call(node, aten.add.Tensor) and \
                node.kwargs.get("alpha", 1) == 1 and len(node.args) == 2 and \
                all(isinstance(a, torch.fx.Node) and val(a).dtype == val(node).dtype for a in node.args):
            parts = [ScoreTerm(a, term.dtype) for a in node.args]
            kinds = [_classify(t) for t in parts]
            if sum(isinstance(k, _Mask) for k in kinds) == 1 and not any(isinstance(k, str) for k in kinds):
                out.extend(parts)
                continue
        if term.fill is None and term.alpha == 1 and is_call(node, aten.where.self) and \
                val(node.args[0]).dtype == torch.bool:
            # where(keep, bias, c) added: bias where kept, c (a mask value) elsewhere
            # (transformers' SDPA T5 hands the mask to SDPA this way).
            cond, a, b = node.args
            for bias, c, fill_where in ((a, b, False), (b, a, True)):
                if isinstance(bias, torch.fx.Node) and val(bias).dtype == val(node).dtype and \
                        scalar_constant(c) is not None:
                    parts = [ScoreTerm(bias, term.dtype),
                             ScoreTerm(cond, term.dtype, fill=scalar_constant(c), fill_where=fill_where)]
                    if _classify(parts[0]) is None and isinstance(_classify(parts[1]), _Mask):
                        out.extend(parts)
                        break
            else:
                out.append(term)
            continue
        out.append(term)
    return out


def _mask_node(rw: Rewrite, m: _Mask, score_rank: int, shape: list) -> torch.fx.Node:
    """The NPU mask (bool, True = masked out) of one mask term, expanded to (B or 1, 1, S_q, S_kv)."""
    node = m.masked
    for op in m.reshapes:  # the same slicing/broadcasting, on the boolean
        node = rw.call(op.target, (node, *op.args[1:]), dict(op.kwargs))
    if val(node).dtype != torch.bool:
        node = rw.call(aten.ne.Scalar, (node, 0))
    if m.negate:
        node = rw.call(aten.logical_not.default, (node,))
    node = _aligned(rw, node, score_rank)
    if not _is_one(val(node).shape[1]):
        raise RewriteRefused(f"per-head mask of shape {tuple(val(node).shape)} (as broadcast against the 4-D "
                             "scores; the NPU mask is shared by all heads)")
    return _expanded(rw, node, shape, "mask")


def _band(rw: Rewrite, masks: list[_Mask], score_rank: int, shape: list, q_len: object,
          kv_len: object) -> BandMode | None:
    """The sparse mode of the site's one mask, when it is built from positions and
    provably a band in which every query row keeps a key (_mask_bands)."""
    if len(masks) != 1 or not _from_positions(masks[0].masked):
        return None
    checkpoint = rw.checkpoint()
    try:
        band = keep_band(_mask_node(rw, masks[0], score_rank, shape), q_len, kv_len)
    except RewriteRefused:
        band = None  # not a shared mask: plan_mask gives the reason
    finally:
        rw.rollback(checkpoint)  # the mask was built only to be read
    return band and band_mode(band, q_len, kv_len, INT_MAX)


COMPARISONS = (aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.le.Scalar, aten.lt.Scalar,
               aten.ge.Scalar, aten.gt.Scalar, aten.tril.default, aten.triu.default)


def _from_positions(mask: torch.fx.Node, limit: int = 64) -> bool:
    """The mask is computed in the graph from positions only (aranges, integer
    inputs such as cache_position, comparisons): a causal/band pattern, not data."""
    seen, todo, compared = set(), [mask], False
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > limit:
            return False
        v = val(node)
        if node.op == "placeholder":
            if not (isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dtype != torch.bool):
                if not isinstance(v, (int, torch.SymInt)):
                    return False  # a float or boolean input: data, not positions
            continue
        if node.op == "get_attr":
            return False
        compared |= is_call(node, COMPARISONS)
        todo.extend(node.all_input_nodes)
    return compared


def _empty_rows(rw: Rewrite, atten_mask: torch.fx.Node) -> torch.fx.Node:
    """(B or 1, 1, S_q, 1): True on rows whose every key is masked."""
    # all(-1) as not(any(not)): TorchAir converts any.dim (ReduceAny), not all.dim.
    kept = rw.call(aten.logical_not.default, (atten_mask,))
    return rw.call(aten.logical_not.default, (rw.call(aten.any.dim, (kept, -1, True)),))


def empty_rows_nan(rw: Rewrite, out: torch.fx.Node, atten_mask: torch.fx.Node) -> torch.fx.Node:
    """out with rows whose every key is masked set to NaN: eager's softmax over
    all -inf scores (the op gives 0 there)."""
    nan = rw.call(aten.full.default, ([], math.nan), {"dtype": val(out).dtype, "device": val(out).device})
    return rw.call(aten.where.self, (_empty_rows(rw, atten_mask), nan, out))


def fully_masked_fixup(rw: Rewrite, out: torch.fx.Node, atten_mask: torch.fx.Node, value: torch.fx.Node,
                       heads: int) -> torch.fx.Node:
    """out (B, N, S_q, D_v) with rows whose every key is masked replaced by the
    mean of V over the keys: what softmax over equal scores gives."""
    empty = _empty_rows(rw, atten_mask)
    v = val(value)
    mean = rw.call(aten.mean.dim, (value, [2], True), {"dtype": torch.float32 if v.dtype != torch.float64
                                                       else torch.float64})  # (B, N_kv, 1, D_v)
    kv_heads = v.shape[1]
    if kv_heads != heads:  # GQA: query head h reads kv head h // group
        group = heads // kv_heads
        mean = rw.call(aten.unsqueeze.default, (mean, 2))
        mean = rw.call(aten.expand.default, (mean, [-1, -1, group, -1, -1]))
        mean = rw.call(aten.reshape.default, (mean, [rw.size(value, 0), heads, 1, rw.size(value, 3)]))
    mean = rw.call(aten._to_copy.default, (mean,), {"dtype": val(out).dtype})
    return rw.call(aten.where.self, (empty, mean, out))
