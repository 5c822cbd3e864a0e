"""Rule: NSA compressed attention over a paged compressed KV with top-k selection -> npu_nsa_compress_attention_infer.

The form a model author writes from the NSA paper (Native Sparse Attention), for one
decode query per sequence: the compressed keys/values (one per compression block of
size l, stride d) live in paged caches read through a block table; the query attends
to a sequence's n_c = cmp_lens[b] compressed tokens; the attention probabilities,
mapped onto selection blocks of size l' by the paper's Eq. 9 and summed over each
GQA group, pick the selection blocks the selected-attention branch reads::

    k = k_cache[block_table].view(B, L, N_kv, D)       # L = max_blocks * page
    v = v_cache[block_table].view(B, L, N_kv, Dv)
    keep = arange(L)[None, :] < cmp_lens[:, None]
    v = v.masked_fill(~keep[:, :, None, None], 0)      # optional: unused slots may hold NaN
    scores = einsum("bkgd,blkd->bkgl", q.view(B, N_kv, G, D), k) * scale
    p = scores.masked_fill(~keep[:, None, None, :], -inf).softmax(-1)
    out = einsum("bkgl,blkd->bkgd", p, v).reshape(B, N, Dv)
    imp = Eq. 9 of p, summed over g                    # (B, N_kv, S): any linear spelling
    n_s = ceil(((cmp_lens - 1) * d + l) / l')
    imp = imp.masked_fill(s in {0, n_s - 2, n_s - 1}, inf).masked_fill(s >= n_s, -inf)
    idx = sort(imp, -1, descending=True, stable=True).indices[..., :K]

becomes ``npu_nsa_compress_attention_infer_lengths(q (B, N, D), k_cache (nb, page, N_kv*D),
v_cache, scale, N, N_kv, l', K, page, l, d, block_table=int32 table,
actual_cmp_seq_kvlen=cmp_lens)`` (kernels/nsa_compress_attention_lengths.py: the op
with the lengths as a tensor, for the reasons paged_attention_read gives), both of
whose outputs replace the program's: the attention output and the top-k indices.

How the match is proved. The pieces are found by structure (anchor: the softmax; its
readers are a probabilities @ V product whose V is a block-table gather, and ops an
importance score is made of -- linear ops, a reduction over the group, fills -- that
reach a sort or topk; a plain attention whose weights feed some other top-k is not
claimed), then each piece is proved by what it computes, on every input, not by its
spelling (random and uninitialised tensors are never constants):

- Scores and output are read through a whitelist of multilinear ops only (views,
  permutes, expands, clones, float casts, bmm, scalar-constant scales, the gather
  ``cache[table]`` / ``index_select`` / ``gather`` of paged_attention_read), so each is
  a polynomial in (query, caches) for a given table. Such a map equals the op's --
  ``scale * q[b, h] . K[b, l, h // G]`` with ``K[b, l] = cache[table[b, l // page],
  l % page]``, and ``sum_l p[b, h, l] V[b, l, h // G]`` -- on every input iff it does on
  random float64 inputs (two probes; a different polynomial agrees only on a set of
  measure zero). The probes use a random table of distinct blocks, so a different
  block or offset arrangement, head grouping or layout fails them. The probes also fix
  the scale and the dims (N, N_kv, D, Dv, page).
- The importance is read through a whitelist of linear ops of the probabilities
  (views, float casts, sums, products and indexing with constants): it is compared,
  the same way, with Eq. 9 (kernels/nsa_compress_attention_infer.py: ``p_slc[s] =
  sum_{m<r, n<q} p[r (s + 1) - m - n]``, r = l'/d, q = l/d, summed over each group)
  for every (r, q) the op's block sizes allow. The op's results depend on l, d, l'
  only through (r, q), so the smallest (l, d, l') giving them is passed.
- The masks (of masked_fill, or of torch.where with a constant branch) are
  integer/boolean functions of one lengths tensor L and constants,
  through pointwise ops and views that keep each batch row in its own row (tracked:
  a mask row b reads L[b] only). So the mask is a function of L[b] alone, and it is
  evaluated for every length the op accepts (n in [n_min, min(L_max, 8192)]):
  the score mask must be exactly "l >= n" (so L is the op's actual_cmp_seq_kvlen),
  a zero fill of the gathered V may only touch slots at positions >= n (decoded by
  evaluating the V operand on a cache that holds each slot's position), and the
  fills of the importance must give +inf at blocks {0, n_s - 2, n_s - 1}, -inf at
  blocks >= n_s and leave the others, n_s = ceil((n - 1 + q) / r).
- The top-k: ``sort(stable=True, descending=True)`` then ``[..., :K]``: ties go to the
  smaller block, as the op. torch.topk leaves the order of tied scores (the +inf
  fixed blocks at least) unspecified, so a topk is left alone with that reason.

The fake of the wrapper is the op's validation with the smallest accepted length, so the
rewrite happens only when the op accepts the site's shapes, dtypes and attributes for some
lengths, and the replacements must have the site's dtypes, shapes and strides (int64
indices sliced from the (B, N_kv, S) sort come back as the same slice of the op's indices
padded to S). Static shapes only; the proof evaluates the masks once per accepted length
and batch row (about 3 s for 2048 compressed slots and B = 2).

Lengths the op does not accept (n < n_min, n > the block table's capacity, ...) raise
the op's error at run time (checked by the wrapped op on the host values); eager would
compute something there (NaN for n = 0). The selected blocks of near-tied scores may
differ in float16/bfloat16 (the op accumulates in float32).

Left alone, with the reason: a topk or an unstable sort, a mask that is not the
lengths (an offset, a causal term), a different aggregation (a max over the group, a
different Eq. 9 offset), other fixed blocks or fill values, scores or probabilities read
elsewhere, and whatever the op's own validation refuses (its message).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from itertools import product

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..kernels import nsa_compress_attention_infer as nsa
from ..kernels._library import npu_rules
from ..kernels.nsa_compress_attention_lengths import smallest_valid_length
from ..report import Report, Site
from ._context import PassContext
from ._fx import (CASTS, SOFTMAXES, Rewrite, call_arg, is_call, is_full_slice, require_same_value,
                  same_shape, same_strides, scalar_constant, static_int, val)
from ._rules import Rule, RuleStats, apply_rules
from .paged_attention_read import _gather_of

aten = torch.ops.aten
prims = torch.ops.prims

PATTERN = "nsa:compressed-attention-topk"
NSA_OP = torch.ops.npu_attn.npu_nsa_compress_attention_infer_lengths.default
FUSED_NAME = "npu_nsa_compress_attention_infer_lengths"

VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
         aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.permute.default, aten.transpose.int,
         aten.expand.default, aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default)
# Ops of the importance that are linear in the probabilities when their other operands are constants.
LINEAR = (aten.sum.dim_IntList, aten.sum.default, aten.index.Tensor, aten.index_select.default, aten.gather.default,
          aten.mul.Tensor, aten.div.Tensor, aten.bmm.default, aten.mm.default, aten.add.Tensor, aten.sub.Tensor)
POINTWISE = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
             aten.floor_divide.default, aten.div.Tensor_mode, aten.remainder.Scalar, aten.remainder.Tensor,
             aten.neg.default, aten.abs.default, aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar,
             aten.lt.Tensor, aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar,
             aten.ge.Tensor, aten.ge.Scalar, aten.logical_and.default, aten.logical_or.default,
             aten.logical_not.default, aten.logical_xor.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
             aten.bitwise_not.default, aten.bitwise_xor.Tensor, aten.where.self, aten.clamp.default,
             aten.clamp_min.default, aten.clamp_max.default, aten.minimum.default, aten.maximum.default) + CASTS
FILLS = (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self)
# What the match follows from the probabilities to the sort (the check then reads it strictly).
IMPORTANCE_OPS = VIEWS + CASTS + LINEAR + FILLS + (aten.amax.default, aten.max.dim,
                                           aten.mean.dim, aten.slice.Tensor, operator.getitem)
PROBES = 2


class Refused(Exception):
    """An NSA-shaped site the rule cannot prove; the message is the reason."""


# ----------------------------------------------------------------------------
# Evaluating parts of the graph on real tensors
# ----------------------------------------------------------------------------


UNSET = (aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.new_empty.default)


@dataclass(frozen=True)
class Fill:
    """x with a constant written where a mask says: masked_fill(x, mask, value), or
    where(mask, value, x) / where(mask, x, value) (negated: written where the mask is False)."""

    node: torch.fx.Node
    x: torch.fx.Node
    mask: torch.fx.Node
    negated: bool
    value: float



def _fill_of(node: object) -> Fill | None:
    if is_call(node, (aten.masked_fill.Scalar, aten.masked_fill.Tensor)):
        value = scalar_constant(node.args[2])
        return Fill(node, node.args[0], node.args[1], False, value) if value is not None else None
    if is_call(node, aten.where.self):
        cond, a, b = node.args[:3]
        for x, c, negated in ((b, a, False), (a, b, True)):
            if isinstance(x, torch.fx.Node) and scalar_constant(c) is not None and \
                    same_shape(val(x).shape, val(node).shape):
                return Fill(node, x, cond, negated, scalar_constant(c))
    return None


def _is_constant(node: object, memo: dict) -> bool:
    """node is computed from constants only (no graph input, nothing random or uninitialised): its
    value is the same on every call, so evaluating it once proves what it is."""
    if not isinstance(node, torch.fx.Node):
        return True
    if node not in memo:
        memo[node] = node.op == "call_function" and node.target not in UNSET and \
            torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()) and \
            all(_is_constant(n, memo) for n in node.all_input_nodes)
    return memo[node]


def _evaluate(root: torch.fx.Node | list, env: dict, identity: tuple = ()) -> torch.Tensor | list:
    """root's value (or the values of a list of roots, sharing their common nodes) with the given
    nodes' values substituted, floats in float64 on the CPU; the Fills in `identity` pass their
    input through (fills the probe leaves out)."""
    skip = {f.node: f.x for f in identity}
    memo = dict(env)

    def run(node):
        if not isinstance(node, torch.fx.Node):
            return node
        if node in memo:
            return memo[node]
        if node.op != "call_function":
            raise Refused(f"{node.name} is a graph input the rule cannot evaluate")
        if node in skip:
            memo[node] = run(skip[node])
            return memo[node]
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), run)
        kwargs = dict(kwargs)
        if "device" in kwargs:
            kwargs["device"] = "cpu"
        target = node.target
        if target in CASTS:
            x = args[0]
            dtype = kwargs.get("dtype") if target is aten._to_copy.default else args[1]
            if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and dtype is not None and \
                    dtype.is_floating_point:
                memo[node] = x  # float casts are kept in float64 (the probes compare exact maps)
                return x
        out = target(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != torch.float64:
            out = out.double()
        memo[node] = out
        return out

    with unset_fake_temporarily():
        return [run(r) for r in root] if isinstance(root, list) else run(root)


# ----------------------------------------------------------------------------
# Structure: the pieces of the site
# ----------------------------------------------------------------------------


@dataclass
class NsaSite:
    softmax: torch.fx.Node
    output: torch.fx.Node  # the attention output the op's first output replaces
    indices: torch.fx.Node  # the top-k indices the op's second output replaces
    reason: str | None = None  # a structural refusal
    internal: set = field(default_factory=set)
    # set by check
    query: torch.fx.Node | None = None
    key: object = None  # paged_attention_read.Gather
    value: object = None
    lengths: torch.fx.Node | None = None
    score_mask: Fill | None = None
    value_fills: list = field(default_factory=list)  # Fills of the gathered V
    fills: list = field(default_factory=list)  # Fills of the importance, in program order
    importance: torch.fx.Node | None = None
    sort: torch.fx.Node | None = None
    count: int = 0
    dims: dict = field(default_factory=dict)
    blocks: tuple = ()  # (compress_block_size, compress_stride, select_block_size)


def _forward_views(node: torch.fx.Node) -> torch.fx.Node:
    """The last node of the single-reader view/cast chain from node."""
    while len(node.users) == 1 and (is_call(next(iter(node.users)), VIEWS + CASTS)):
        node = next(iter(node.users))
    return node


def _users_through(node: torch.fx.Node, ops: tuple) -> list[torch.fx.Node]:
    """Readers of node, looking through single-reader chains of `ops`."""
    found = []
    for user in node.users:
        while is_call(user, ops) and len(user.users) == 1:
            user = next(iter(user.users))
        found.append(user)
    return found


def _reads_paged_values(bmm: torch.fx.Node) -> bool:
    """The product's other operand is, through views, casts and fills, a block-table gather."""
    todo, seen = list(bmm.args[:2]), set()
    while todo and len(seen) < 32:
        node = todo.pop()
        if not isinstance(node, torch.fx.Node) or node in seen:
            continue
        seen.add(node)
        if _gather_of(node) is not None:
            return True
        fill = _fill_of(node)
        if fill is not None:
            todo.append(fill.x)
        elif is_call(node, VIEWS + CASTS) or is_full_slice(node):
            todo.append(node.args[0])
    return False


def _selection(sort_in: torch.fx.Node) -> tuple[torch.fx.Node | None, str | None]:
    """(the sort node, or None and why) for the node the top-k runs on."""
    for user in sort_in.users:
        if is_call(user, aten.topk.default):
            return None, ("the selection uses torch.topk, whose order of tied scores (the +inf fixed blocks at "
                          "least) is unspecified; the op returns ties by ascending block index, as "
                          "sort(stable=True, descending=True)[..., :K] does")
        if is_call(user, (aten.sort.stable, aten.sort.default)):
            return user, None
    return None, "no sort of the importance"


def match_nsa(softmax: torch.fx.Node) -> NsaSite | None:
    try:
        return _match(softmax)
    except (AttributeError, IndexError, TypeError, ValueError, ZeroDivisionError):  # an unusual spelling: not ours
        return None


def _match(softmax: torch.fx.Node) -> NsaSite | None:
    if not is_call(softmax, SOFTMAXES) or softmax.args[1] not in (-1, val(softmax).dim() - 1):
        return None
    readers = _users_through(softmax, VIEWS + CASTS)
    pv = [u for u in readers if is_call(u, aten.bmm.default)]
    others = [u for u in readers if not is_call(u, aten.bmm.default)]
    if len(pv) != 1 or not others:
        return None
    # Forward from the probabilities, through what an importance score is made of (linear ops, a
    # reduction over the group, fills), to a sort/topk: only such a site is NSA's (a plain attention
    # whose weights reach some other top-k is left to the attention rules).
    sort_in, frontier, seen = None, [u for u in others if is_call(u, IMPORTANCE_OPS)], set()
    while frontier and sort_in is None:
        node = frontier.pop(0)
        if node in seen or len(seen) > 64:
            continue
        seen.add(node)
        for user in node.users:
            if is_call(user, (aten.sort.stable, aten.sort.default, aten.topk.default)):
                sort_in = node
                break
            if is_call(user, IMPORTANCE_OPS):
                frontier.append(user)
    if sort_in is None or not _reads_paged_values(pv[0]):
        return None
    output = _forward_views(pv[0])
    site = NsaSite(softmax=softmax, output=output, indices=output)
    sort, why = _selection(sort_in)
    if why is not None:
        site.reason = why
        return site
    if sort.target is aten.sort.stable:  # sort.stable(self, *, stable, dim=-1, descending=False)
        stable, dim, descending = (sort.kwargs.get(k, d) for k, d in (("stable", None), ("dim", -1),
                                                                      ("descending", False)))
    else:  # sort.default(self, dim=-1, descending=False): not stable
        stable, dim, descending = False, call_arg(sort, 1, "dim", -1), call_arg(sort, 2, "descending", False)
    if not stable or not descending or dim % val(sort_in).dim() != val(sort_in).dim() - 1:
        site.reason = (f"the selection sorts with stable={bool(stable)}, descending={bool(descending)} over dim "
                       f"{dim}: the op ranks the blocks by descending score over the last dim, ties by "
                       f"ascending block index (a stable descending sort)")
        return site
    site.sort = sort
    getters = list(sort.users)
    if any(not is_call(g, operator.getitem) or g.args[1] != 1 for g in getters) or len(getters) != 1:
        site.reason = "the sorted scores (not only the sorted indices) are read"
        return site
    (slice_node,) = getters[0].users if len(getters[0].users) == 1 else (None,)
    rank = val(sort_in).dim()
    if is_call(slice_node, aten.slice.Tensor):
        if slice_node.args[1] % rank != rank - 1 or \
                (slice_node.args[2] if len(slice_node.args) > 2 else 0) not in (0, None) or \
                (slice_node.args[4] if len(slice_node.args) > 4 else 1) != 1:
            site.reason = "the sorted indices are not taken as [..., :K]"
            return site
        start = slice_node
    else:  # every block ranked ([..., :K] with K = the block count leaves no slice)
        start = getters[0]
    end = start
    while len(end.users) == 1 and is_call(next(iter(end.users)), CASTS) and \
            not val(next(iter(end.users))).dtype.is_floating_point:
        end = next(iter(end.users))
    site.indices = end
    site.count = static_int(val(start).shape[-1]) or 0
    site.importance = sort_in
    site.internal = {sort, getters[0], start, end}
    node = start
    while node is not end:
        node = next(iter(node.users))
        site.internal.add(node)
    return site


# ----------------------------------------------------------------------------
# Proofs
# ----------------------------------------------------------------------------


def _walk(root: torch.fx.Node, stops: set, allowed, what: str, const_memo: dict,
          verdicts: dict | None = None) -> tuple[set, list]:
    """The nodes from root back to `stops` (inner nodes, and the non-constant leaves that are
    neither stops nor allowed). allowed(node) -> None (traverse its tensor inputs), a list of the
    inputs to traverse, or a string: the reason the node is not allowed."""
    inner, leaves, todo = set(), [], [root]
    while todo:
        node = todo.pop()
        if node in inner or node in stops or node in leaves or _is_constant(node, const_memo):
            continue
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            leaves.append(node)
            continue
        verdict = allowed(node)
        if isinstance(verdict, str):
            leaves.append(node)
            if verdicts is not None:
                verdicts[node] = verdict
            continue
        inner.add(node)
        todo.extend(node.all_input_nodes if verdict is None else verdict)
        if len(inner) > 256:
            raise Refused(f"the {what} is too large a graph to read")
    return inner, leaves


def _float_cast(node: torch.fx.Node) -> bool:
    return is_call(node, CASTS) and val(node).dtype.is_floating_point and val(node.args[0]).dtype.is_floating_point


def _score_allowed(site: NsaSite, memo: dict):
    def allowed(node):
        if is_call(node, VIEWS) or is_full_slice(node) or _float_cast(node) or is_call(node, aten.bmm.default):
            return [node.args[0]] if not is_call(node, aten.bmm.default) else list(node.args[:2])
        if is_call(node, (aten.mul.Tensor, aten.div.Tensor)) and scalar_constant(node.args[1]) is not None:
            return [node.args[0]]
        fill = _fill_of(node)
        if fill is not None:
            if site.score_mask is not None:
                raise Refused("the scores are masked twice")
            site.score_mask = fill
            return [fill.x]
        return "other"
    return allowed


def _pv_allowed(site: NsaSite):
    def allowed(node):
        if is_call(node, VIEWS) or is_full_slice(node) or _float_cast(node):
            return [node.args[0]]
        if is_call(node, aten.bmm.default):
            return list(node.args[:2])
        fill = _fill_of(node)
        if fill is not None and fill.value == 0.0:
            site.value_fills.append(fill)
            return [fill.x]
        return "other"
    return allowed


def _linear_allowed(memo: dict):
    def allowed(node):
        if is_call(node, VIEWS) or is_full_slice(node) or _float_cast(node):
            return [node.args[0]]
        if is_call(node, LINEAR):
            tensors = [a for a in node.all_input_nodes if not _is_constant(a, memo)]
            if node.target in (aten.add.Tensor, aten.sub.Tensor):
                return tensors  # a sum of linear maps (plus a constant: the probes catch it)
            if len(tensors) != 1:
                inputs = [x for t in tensors[1:] for x in _placeholders(t)]
                if inputs:
                    return (f"multiplies the probabilities by the graph input {inputs[0].name} (a buffer or an "
                            f"argument): its values are not known when compiling, so the map cannot be proved "
                            f"to be Eq. 9")
                return "a product of two non-constant operands"
            if node.target in (aten.index.Tensor, aten.index_select.default, aten.gather.default,
                               aten.div.Tensor) and tensors[0] is not node.args[0]:
                return "not linear in its first operand"
            return tensors
        return "other"
    return allowed


def _placeholders(node: torch.fx.Node, limit: int = 64) -> list[torch.fx.Node]:
    """The graph inputs node is computed from (a bounded walk)."""
    found, todo, seen = [], [node], set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.append(n)
        todo.extend(n.all_input_nodes)
    return found


def _dims(site: NsaSite) -> dict:
    """B, N, N_kv, G, D, Dv, L, page, max_blocks from the shapes the site's pieces have."""
    table = val(site.key.table)
    b, m = (static_int(x) for x in table.shape)
    p_shape = [static_int(x) for x in val(site.softmax).shape]
    k_src, v_src = val(site.key.cache), val(site.value.cache)
    if None in (b, m) or None in p_shape or any(static_int(x) is None for x in (*k_src.shape, *v_src.shape)):
        raise Refused("symbolic sizes (the rule reads static shapes only)")
    length = p_shape[-1]
    heads = math.prod(p_shape) // (b * length) if b * length else 0
    page = static_int(k_src.shape[1]) if k_src.dim() >= 2 else None
    q_numel = val(site.query).numel()
    if heads == 0 or q_numel % (b * heads) or page is None or m * page != length:
        raise Refused(f"the probabilities {p_shape} are not (B = {b}, heads, L = max_blocks {m} x page {page})")
    d = q_numel // (b * heads)
    k_inner = math.prod(k_src.shape[1:]) // page
    v_inner = math.prod(v_src.shape[1:]) // page
    if d == 0 or k_inner % d:
        raise Refused(f"the key cache's rows ({k_inner}) are not a multiple of the query head dim {d}")
    kv = k_inner // d
    if kv == 0 or heads % kv or v_inner % kv or static_int(v_src.shape[1]) != page:
        raise Refused(f"heads {heads}, KV heads {kv}, value rows {v_inner}: not a GQA layout")
    return dict(B=b, M=m, L=length, N=heads, D=d, Nkv=kv, G=heads // kv, Dv=v_inner // kv, page=page)


def _probe_caches(dims: dict, cache: torch.fx.Node, inner: int, g: torch.Generator):
    """A (B * M, page, ...) probe cache (its first dim is free: only the gather reads it) and a random
    table of distinct blocks, with the cache viewed as the op reads it."""
    shape = [dims["B"] * dims["M"], *[int(s) for s in val(cache).shape[1:]]]
    data = torch.randn(shape, generator=g, dtype=torch.float64)
    return data, data.reshape(shape[0], dims["page"], inner)


def _prove_scores(site: NsaSite, raw: torch.fx.Node) -> float:
    """The scale when the scores are scale * q . K of the gathered keys (GQA h -> h // G), else Refused."""
    d = site.dims
    g = torch.Generator().manual_seed(0)
    scale = None
    for _ in range(PROBES):
        q = torch.randn(list(val(site.query).shape), generator=g, dtype=torch.float64)
        kc, k3 = _probe_caches(d, site.key.cache, d["Nkv"] * d["D"], g)
        table = torch.randperm(d["B"] * d["M"], generator=g).view(d["B"], d["M"]).to(val(site.key.table).dtype)
        got = _evaluate(raw, {site.query: q, site.key.cache: kc, site.key.table: table},
                        (site.score_mask,))
        keys = k3[table.long()].reshape(d["B"], d["L"], d["Nkv"], d["D"])
        qh = q.reshape(d["B"], d["Nkv"], d["G"], d["D"])
        want = torch.einsum("bkgd,blkd->bkgl", qh, keys).reshape(d["B"], d["N"], d["L"])
        got = got.reshape(d["B"], d["N"], d["L"])
        if scale is None:
            i = int(want.abs().argmax())
            scale = float(got.reshape(-1)[i] / want.reshape(-1)[i])
        if not torch.allclose(got, scale * want, rtol=1e-9, atol=1e-12):
            raise Refused("the scores are not scale * q . K of the gathered compressed keys (query head h "
                          "reading KV head h // G, key l at block_table[b, l // page], row l % page)")
    if not (scale > 0 and math.isfinite(scale)):
        raise Refused(f"the scores' scale {scale} is not positive")
    return scale


def _prove_output(site: NsaSite) -> None:
    d = site.dims
    g = torch.Generator().manual_seed(1)
    for _ in range(PROBES):
        p = torch.randn(list(val(site.softmax).shape), generator=g, dtype=torch.float64)
        vc, v3 = _probe_caches(d, site.value.cache, d["Nkv"] * d["Dv"], g)
        table = torch.randperm(d["B"] * d["M"], generator=g).view(d["B"], d["M"]).to(val(site.value.table).dtype)
        got = _evaluate(site.output, {site.softmax: p, site.value.cache: vc, site.value.table: table},
                        tuple(site.value_fills))
        values = v3[table.long()].reshape(d["B"], d["L"], d["Nkv"], d["Dv"])
        want = torch.einsum("bkgl,blkd->bkgd", p.reshape(d["B"], d["Nkv"], d["G"], d["L"]), values)
        if got.numel() != want.numel() or not torch.allclose(got.reshape(-1), want.reshape(-1), rtol=1e-9,
                                                              atol=1e-12):
            raise Refused("the output is not p @ V of the gathered compressed values, as (B, N, Dv) row-major "
                          "(query head h reading KV head h // G)")


def _block_configs() -> dict:
    """(r, q) -> the smallest (compress_block_size, compress_stride, select_block_size) the op allows."""
    configs = {}
    for stride, cmp, sel in product(nsa.BLOCK_SIZES, repeat=3):
        if stride <= cmp <= sel and sel % stride == 0 and cmp % stride == 0:
            configs.setdefault((sel // stride, cmp // stride), (cmp, stride, sel))
    return configs


def _eq9(p: torch.Tensor, d: dict, r: int, q: int, blocks: int) -> torch.Tensor:
    """Eq. 9 with j = s + 1, summed over each group: (B, N_kv, blocks) from p (B, N, L)."""
    weights = torch.tensor(nsa._overlap_weights(r * 16, q * 16, 16), dtype=torch.float64)
    s = torch.arange(blocks).unsqueeze(1)
    k = torch.arange(len(weights)).unsqueeze(0)
    index = r * (s + nsa.SELECTION_INDEX_OFFSET) - k
    w = weights * ((index >= 0) & (index < d["L"]))
    grouped = p.reshape(d["B"], d["Nkv"], d["G"], d["L"]).sum(2)
    return (grouped[..., index.clamp(0, d["L"] - 1)] * w).sum(-1)


def _prove_importance(site: NsaSite) -> tuple[int, int]:
    """(r, q) when the importance is Eq. 9 of the probabilities summed over each group, else Refused."""
    d = site.dims
    shape = [static_int(x) for x in val(site.importance).shape]
    if len(shape) != 3 or shape[:2] != [d["B"], d["Nkv"]]:
        raise Refused(f"the importance scores are {shape}, not (B, N_kv, blocks) = ({d['B']}, {d['Nkv']}, ...)")
    g = torch.Generator().manual_seed(2)
    probes = [torch.rand(list(val(site.softmax).shape), generator=g, dtype=torch.float64) for _ in range(PROBES)]
    got = [_evaluate(site.importance, {site.softmax: p}) for p in probes]
    for (r, q) in _block_configs():
        if all(torch.allclose(x, _eq9(p.reshape(d["B"], d["N"], d["L"]), d, r, q, shape[2]), rtol=1e-9, atol=1e-12)
               for x, p in zip(got, probes)):
            return r, q
    raise Refused("the importance is not the NSA Eq. 9 map of the probabilities (p_slc[s] = sum over m < l'/d, "
                  "n < l/d of p[(l'/d) (s + 1) - m - n]) summed over each GQA group, for any block sizes the op "
                  "allows (16, 32, 64)")


def _batch_axis(node: object, lengths: list, memo: dict, const_memo: dict) -> int | None:
    """The axis (from the right) along which node's value reads L[b], None for a constant; Refused
    unless node is a pointwise/view function of one integer tensor L, batch row to batch row."""
    if _is_constant(node, const_memo):
        return None
    if node in memo:
        return memo[node]
    v = val(node)
    if node.op != "call_function" or not (is_call(node, POINTWISE + VIEWS) or is_full_slice(node)):
        # The lengths tensor: one non-constant integer leaf.
        if not isinstance(v, torch.Tensor) or v.dtype.is_floating_point or v.dtype == torch.bool or v.dim() != 1:
            raise Refused(f"the mask is computed from {node.name} ({getattr(node.target, '__name__', node.op)}), "
                          f"which is not a 1-D integer lengths tensor and not a pointwise op the rule reads")
        if lengths and lengths[0] is not node:
            raise Refused(f"the masks read two tensors ({lengths[0].name}, {node.name}), not one lengths tensor")
        lengths[:] = [node]
        memo[node] = -1
        return -1
    if is_call(node, POINTWISE):
        axes = {a for a in (_batch_axis(x, lengths, memo, const_memo) for x in node.all_input_nodes)
                if a is not None}
        if len(axes) != 1:
            raise Refused(f"{node.name} combines the lengths along different axes")
        memo[node] = axes.pop()
        return memo[node]
    inner = _batch_axis(node.args[0], lengths, memo, const_memo)
    old, new = list(val(node.args[0]).shape), list(v.shape)
    if inner is None:
        memo[node] = None
        return None
    if is_call(node, (aten.expand.default, aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default)) \
            or is_full_slice(node):
        memo[node] = inner
        return inner
    if is_call(node, (aten.permute.default, aten.transpose.int)):
        raise Refused(f"the mask is permuted ({node.name})")
    # A reshape that only adds or removes size-1 dims: the batch dim keeps its place among the others.
    big_old = [i - len(old) for i, s in enumerate(old) if s != 1]
    big_new = [i - len(new) for i, s in enumerate(new) if s != 1]
    if [old[i] for i in big_old] != [new[i] for i in big_new]:
        raise Refused(f"the mask is reshaped {old} -> {new}")
    if inner not in big_old:
        memo[node] = -1 if not big_new else big_new[0]  # the batch dim has size 1: any place reads L[0]
        return memo[node]
    memo[node] = big_new[big_old.index(inner)]
    return memo[node]


def _prove_masks(site: NsaSite, const_memo: dict) -> None:
    d = site.dims
    lengths: list = []
    score_shape = [static_int(x) for x in val(site.score_mask.node).shape]
    masks = [(site.score_mask.mask, score_shape)]
    masks += [(f.mask, [static_int(x) for x in val(f.node).shape]) for f in site.value_fills]
    imp_shape = [static_int(x) for x in val(site.importance).shape]
    masks += [(f.mask, imp_shape) for f in site.fills]
    for mask, shape in masks:
        memo: dict = {}
        axis = _batch_axis(mask, lengths, memo, const_memo)
        if axis is not None and d["B"] > 1 and axis != -len(shape):
            raise Refused(f"the mask {mask.name} reads the lengths along axis {len(shape) + axis} of "
                          f"{shape}, not the batch axis")
    if not lengths or lengths[0].meta["val"].shape[0] != d["B"]:
        raise Refused("the score mask does not read a (B,) lengths tensor")
    site.lengths = lengths[0]
    (cmp, stride, sel) = site.blocks
    r, q = sel // stride, cmp // stride
    n_min = smallest_valid_length(sel, site.count, cmp, stride)
    n_max = min(d["L"], nsa.MAX_CMP_KV_LEN)
    while n_max >= n_min and nsa.uncompressed_length(n_max, cmp, stride) > nsa.MAX_SELECT_BLOCKS * sel:
        n_max -= 1
    values = list(range(n_min, n_max + 1))
    if not values:
        raise Refused(f"no compressed length is valid for the op: select_block_count {site.count} needs "
                      f"(n - 1) * {stride} + {cmp} >= {site.count} * {sel}, n >= {n_min}, and the block table "
                      f"holds {d['L']} (at most {n_max} accepted)")
    blocks = imp_shape[2]
    n_s_max = math.ceil((n_max - 1 + q) / r)
    if blocks < n_s_max:
        raise Refused(f"the importance has {blocks} selection blocks, the op ranks up to {n_s_max} "
                      f"(length {n_max})")
    # Zero fills of V may touch positions >= n only. Decoded from a cache holding each slot's position:
    # block b * M + j holds positions j * page + o of batch b, coded b * L + position. Per element of
    # the fill's mask (broadcast over the dims where it has size 1): does its group hold another batch's
    # slot, and its smallest position.
    value_checks = []
    for fill in site.value_fills:
        x = fill.x
        blocks_total = d["B"] * d["M"]
        shape = [blocks_total, *[int(n) for n in val(site.value.cache).shape[1:]]]
        code = torch.arange(d["B"]).view(-1, 1, 1) * d["L"] + torch.arange(d["M"]).view(1, -1, 1) * d["page"]
        code = code + torch.arange(d["page"]).view(1, 1, -1)
        cache = code.reshape(blocks_total, d["page"], 1).expand(blocks_total, d["page"], math.prod(shape[2:]))
        table = torch.arange(blocks_total).view(d["B"], d["M"]).to(val(site.value.table).dtype)
        where = _evaluate(x, {site.value.cache: cache.reshape(shape).double(), site.value.table: table},
                          tuple(f for f in site.value_fills if f is not fill))
        owner, at = (where // d["L"]).long(), (where % d["L"]).long()
        x_shape = [static_int(n) for n in val(x).shape]
        m_shape = [1] * (len(x_shape) - val(fill.mask).dim()) + [static_int(n) for n in val(fill.mask).shape]
        spread = [i for i, (a, b) in enumerate(zip(m_shape, x_shape)) if a == 1 and b != 1]
        wrong = owner != torch.arange(d["B"]).view(-1, *[1] * (len(x_shape) - 1))
        nearest = at
        if spread:
            wrong, nearest = wrong.amax(dim=spread, keepdim=True), at.amin(dim=spread, keepdim=True)
        value_checks.append((fill, [1 if i in spread else n for i, n in enumerate(x_shape)], wrong, nearest))
    # Every mask, for every length the op accepts (each batch row takes each value in turn; the rows are
    # independent, proved above), evaluated together per batch of values.
    fills = [site.score_mask] + [f for f, _, _, _ in value_checks] + site.fills
    roots = [f.mask for f in fills]
    pos = torch.arange(d["L"])
    s = torch.arange(blocks)
    fill_values = [torch.tensor(f.value, dtype=torch.float64) for f in site.fills]
    batch, dtype = d["B"], val(site.lengths).dtype
    for start in range(0, len(values), batch):
        chunk = values[start:start + batch]
        lens = torch.tensor(chunk + [chunk[-1]] * (batch - len(chunk)), dtype=dtype)
        got = [~m if f.negated else m for m, f in zip(_evaluate(roots, {site.lengths: lens}), fills)]
        score = torch.broadcast_to(got[0], score_shape)
        checked = [torch.broadcast_to(m, shape) for m, (_, shape, _, _) in zip(got[1:], value_checks)]
        filled = [torch.broadcast_to(m, imp_shape) for m in got[1 + len(value_checks):]]
        for i, n in enumerate(chunk):
            # The score mask: exactly l >= n.
            if not torch.equal(score[i], (pos >= n).expand(score[i].shape)):
                masked = sorted({int(x) for x in torch.nonzero(score[i].reshape(-1, d["L"]))[:, 1].tolist()})
                raise Refused(f"the score mask is not 'l >= cmp_lens[b]' ({site.lengths.name}): for length {n} it "
                              f"masks positions {masked[:3]}{'...' if len(masked) > 3 else ''} "
                              f"(want {n} .. {d['L'] - 1})")
            for m, (_, _, wrong, nearest) in zip(checked, value_checks):
                if bool((m[i] & (wrong[i] | (nearest[i] < n))).any()):
                    raise Refused(f"the gathered values are zeroed where the attention reads them (length {n})")
            # The fills of the importance: +inf at {0, n_s - 2, n_s - 1}, -inf from n_s on, the rest kept.
            result = torch.full(imp_shape[1:], math.nan, dtype=torch.float64)
            for m, fill in zip(filled, fill_values):
                result = torch.where(m[i], fill, result)
            n_s = math.ceil((n - 1 + q) / r)
            want = torch.full([blocks], math.nan, dtype=torch.float64)
            want[s >= n_s] = -math.inf
            want[[x for x in (0, n_s - 2, n_s - 1) if 0 <= x < n_s]] = math.inf
            want = want.expand(result.shape)
            if not (torch.equal(result.isnan(), want.isnan()) and
                    torch.equal(result[~result.isnan()], want[~want.isnan()])):
                raise Refused(f"for length {n} (n_s = {n_s} selection blocks) the importance is filled "
                              f"{_describe_fills(result[0].tolist())}; the op ranks +inf at blocks "
                              f"{sorted({0, max(n_s - 2, 0), n_s - 1})} and -inf from block {n_s} on")


def _describe_fills(row: list) -> str:
    parts = [f"{x} at {i}" for i, x in enumerate(row) if not math.isnan(x)]
    return ", ".join(parts[:6]) + (" ..." if len(parts) > 6 else "") if parts else "nowhere"


def check_nsa(site: NsaSite, ctx: PassContext) -> str | None:
    if site.reason is not None:
        return site.reason
    try:
        with unset_fake_temporarily():  # the proofs compute on real (probe) tensors
            _check(site, ctx)
    except Refused as refused:
        return str(refused)
    except Exception as error:  # noqa: BLE001 - a piece the probes cannot evaluate: not proved, left alone
        return f"the site could not be evaluated for the proof: {type(error).__name__}: {str(error)[:200]}"
    return None


def _check(site: NsaSite, ctx: PassContext) -> None:
    memo: dict = {}
    shape = list(val(site.softmax).shape)
    if any(static_int(n) is None for n in shape):
        raise Refused(f"symbolic sizes {shape} (the rule proves static shapes only: compile with dynamic=False "
                      f"or mark the batch static)")
    # The fills of the importance, from the sort back.
    node = site.importance
    while _fill_of(node) is not None:
        fill = _fill_of(node)
        site.fills.insert(0, fill)
        site.internal.add(node)
        node = fill.x
    site.importance = node
    # Scores: back from the softmax to the query and the gathered keys.
    raw = site.softmax.args[0]
    inner, leaves = _walk(raw, set(), _score_allowed(site, memo), "scores", memo)
    gathers = [g for g in (_gather_of(x) for x in leaves) if g is not None]
    others = [x for x in leaves if _gather_of(x) is None]
    if len(gathers) != 1 or len(others) != 1:
        names = ", ".join(getattr(x, "name", str(x)) for x in leaves)
        raise Refused(f"the scores read {names}: not one query and one block-table gather of a key cache")
    if site.score_mask is None:
        raise Refused("the scores are not masked: every gathered slot, unused blocks included, is attended")
    # The fill must be on the scores themselves: between it and the softmax only casts, scalar scales and
    # reshapes of the same shape (a fill on a bmm operand would spread -inf over whole rows).
    node = raw
    while node is not site.score_mask.node and (
            _float_cast(node) or (is_call(node, (aten.mul.Tensor, aten.div.Tensor)) and
                                  scalar_constant(node.args[1]) is not None) or
            (is_call(node, (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default,
                            aten.alias.default)) and same_shape(val(node).shape, val(node.args[0]).shape))):
        node = node.args[0]
    if node is not site.score_mask.node or not same_shape(val(node).shape, val(site.softmax).shape):
        raise Refused(f"the -inf fill ({site.score_mask.node.name}) is not on the scores the softmax reads "
                      f"{list(val(site.softmax).shape)}")
    if site.score_mask.value != -math.inf:
        raise Refused(f"the masked scores are filled with {site.score_mask.value}, not -inf")
    site.key, site.query = gathers[0], others[0]
    site.internal |= inner
    # Output: back from the output to the probabilities and the gathered values.
    inner, leaves = _walk(site.output, {site.softmax}, _pv_allowed(site), "output", memo)
    gathers = [g for g in (_gather_of(x) for x in leaves) if g is not None]
    if len(gathers) != 1 or len(leaves) != 1:
        raise Refused("the output is not the probabilities times one block-table gather of a value cache")
    site.value = gathers[0]
    site.internal |= inner
    if site.value.table is not site.key.table:
        raise Refused("K and V are gathered through different block tables")
    for g in (site.key, site.value):
        if val(g.cache).dim() < 3:
            raise Refused(f"the gathered cache {g.cache.name} is {list(val(g.cache).shape)}, not paged "
                          f"(num_blocks, page, ...)")
    site.internal |= {site.key.node, site.value.node}
    # Importance: back to the probabilities through linear ops.
    verdicts: dict = {}
    inner, leaves = _walk(site.importance, {site.softmax}, _linear_allowed(memo), "importance", memo, verdicts)
    if leaves:
        x = leaves[0]
        if verdicts.get(x, "other") != "other":
            raise Refused(f"the importance {verdicts[x]} ({x.name})")
        if x.op == "placeholder":
            raise Refused(f"the importance reads the graph input {x.name} (a buffer or an argument): its values are "
                          f"not known when compiling, so the map cannot be proved to be Eq. 9")
        raise Refused(f"the importance reads {x.name} ({getattr(x.target, '__name__', x.op)}), which is not a linear "
                      f"map of the probabilities: the op sums Eq. 9 over each GQA group")
    site.internal |= inner | {site.importance, site.softmax}
    if ctx.target == "ge" and ctx.fp32_attention == "unfused" and val(site.query).dtype == torch.float32:
        raise Refused("float32 attention left as plain math (option fp32_attention='unfused')")
    site.dims = _dims(site)
    scale = _prove_scores(site, raw)
    site.dims["scale"] = scale
    _prove_output(site)
    r, q = _prove_importance(site)
    site.blocks = _block_configs()[(r, q)]
    if site.count < 1:
        raise Refused("the selection takes no block")
    _prove_masks(site, memo)
    # Nothing inside is read elsewhere.
    ends = {site.output, site.indices}
    for node in site.internal:
        if node in ends or node in (site.key.node, site.value.node):
            continue
        for user in node.users:
            if user not in site.internal and user not in ends:
                raise Refused(f"{node.name} (scores, probabilities or importance) is also read by {user.name}")


def rewrite_nsa(rw: Rewrite, site: NsaSite, ctx: PassContext, record: Site) -> list[torch.fx.Node]:
    d = site.dims
    cmp, stride, sel = site.blocks
    low = ctx.attention_cast_dtype if ctx.target == "ge" and val(site.query).dtype == torch.float32 else None

    def operand(node: torch.fx.Node, shape: list[int]) -> torch.fx.Node:
        if list(val(node).shape) != shape:
            node = rw.call(aten.reshape.default, (node, shape))
        return node if low is None else rw.call(prims.convert_element_type.default, (node, low))

    query = operand(site.query, [d["B"], d["N"], d["D"]])
    key = operand(site.key.cache, [rw.size(site.key.cache, 0), d["page"], d["Nkv"] * d["D"]])
    value = operand(site.value.cache, [rw.size(site.value.cache, 0), d["page"], d["Nkv"] * d["Dv"]])
    table = site.key.table
    if val(table).dtype != torch.int32:
        table = rw.call(prims.convert_element_type.default, (table, torch.int32))
    lengths = site.lengths
    if val(lengths).dtype not in (torch.int32, torch.int64):
        lengths = rw.call(prims.convert_element_type.default, (lengths, torch.int64))
    with npu_rules(ctx.target == "ge"):
        call = rw.call(NSA_OP, (query, key, value, float(d["scale"]), d["N"], d["Nkv"], sel, site.count, d["page"],
                                cmp, stride), dict(block_table=table, actual_cmp_seq_kvlen=lengths),
                       meta_from=site.softmax)
    out = rw.call(operator.getitem, (call, 0))
    if low is not None:
        out = rw.call(prims.convert_element_type.default, (out, val(site.output).dtype))
        record.precision = f"float32 via {str(low).replace('torch.', '')}"
    if list(val(out).shape) != list(val(site.output).shape):
        out = rw.call(aten.view.default, (out, list(val(site.output).shape)))
    indices = rw.call(operator.getitem, (call, 1))
    if val(site.indices).dtype != torch.int32:
        indices = rw.call(prims.convert_element_type.default, (indices, val(site.indices).dtype))
    wanted = val(site.indices)
    blocks = static_int(val(site.importance).shape[-1])
    sorted_strides = [math.prod(val(site.importance).shape[i + 1:]) for i in range(val(site.importance).dim())]
    if not same_strides(val(indices), wanted) and blocks is not None and list(wanted.stride()) == sorted_strides:
        # The program's indices are [..., :K] of the (B, N_kv, S) sort result: the same slice of the
        # op's indices padded to S blocks, so readers see the strides they were traced with.
        padded = rw.call(aten.constant_pad_nd.default, (indices, [0, blocks - site.count], 0))
        indices = rw.call(aten.slice.Tensor, (padded, -1, 0, site.count))
    require_same_value(site.output, out, FUSED_NAME)
    require_same_value(site.indices, indices, f"{FUSED_NAME}'s top-k indices")
    rw.replace(site.output, out)
    rw.replace(site.indices, indices)
    record.fused_op = FUSED_NAME
    record.layout = "TND"
    record.gqa_ratio = d["G"]
    record.notes.extend([
        f"npu_nsa_compress_attention_infer with cmp_lens ({site.lengths.name}) as a tensor; compress_block_size "
        f"{cmp}, compress_stride {stride}, select_block_size {sel} (the program fixes their ratios), "
        f"select_block_count {site.count}",
        "lengths the op does not accept raise its error at run time",
    ])
    if val(site.query).dtype in (torch.float16, torch.bfloat16) or low is not None:
        record.notes.append("the op accumulates in float32 where eager rounds to the half-precision dtype: blocks "
                            "whose scores tie within that rounding may be selected differently")
    return [site.output, site.indices]


def _first_end(site: NsaSite) -> torch.fx.Node:
    """The earlier of the two replaced nodes: the op's inputs (query, caches, table, lengths) all
    come before the softmax, so the op fits before either end, and before the earlier one every
    reader of both ends sees it."""
    node = site.softmax
    while node.op != "root":
        if node is site.output or node is site.indices:
            return node
        node = node.next
    return site.output


NSA_RULE = Rule(
    name=PATTERN, kind="attention", anchors=SOFTMAXES, match=match_nsa, check=check_nsa, rewrite=rewrite_nsa,
    anchor_of=_first_end, claims=lambda site: [site.softmax])


def nsa_compress_attention_to_fused(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """Rewrite every NSA compressed attention with top-k block selection into npu_nsa_compress_attention_infer."""
    return apply_rules(gm, (NSA_RULE,), report, ctx)
