"""Rule: attention over indexer-selected tokens (DeepSeek-V3.2 DSA, MLA-absorb) -> npu_sparse_flash_attention.

The form a model author writes from the DSA paper (a lightning indexer scores
the keys, top-k picks K of them per query, attention runs over those only), in
MLA-absorb terms (query split into a 512-wide latent part and a 64-wide rope
part; one latent KV cache serving as key and value)::

    idx      = topk(indexer_scores, K, dim=-1).indices          # (B, S, K), over T keys
    kv_sel   = gather(kv[:, None].expand(B, S, T, D), 2,        # (B, S, K, D): kv[b, idx[b, s, k]]
                      idx[..., None].expand(B, S, K, D))        #  (or kv[arange(B)[:, None, None], idx])
    pe_sel   = the same gather of k_pe                          # (B, S, K, 64)
    scores   = einsum("bshc,bskc->bshk", q, kv_sel)
             + einsum("bshr,bskr->bshk", q_pe, pe_sel)          # any matmul/einsum spelling
    scores   = scores * scale                                   # optional
    scores   = scores.masked_fill((idx > pos + c)[:, :, None], -inf)   # optional causal rule
    out      = einsum("bshk,bskc->bshc", softmax(scores, -1), v_sel)   # v_sel: kv_sel, or a gather of V

becomes ``npu_sparse_flash_attention(q, kv[:, :, None], v, sparse_indices, scale,
query_rope=q_pe, key_rope=k_pe[:, :, None], sparse_block_size=1, layout BSND,
attention_mode=2)`` with sparse_mode 3 (a causal rule) or 0 (none).

How the match is proved (static shapes only; a symbolic size is not matched):

- Operands are read by label tracking: every dim of the query root (b, s, h,
  d), of the gathered roots (b, s, k, d) and of the index tensor carries a
  label, and every view op between a root and a bmm (view/reshape, permute,
  transpose, unsqueeze/squeeze, expand, clone) is applied to the labels, so a
  bmm is taken only when it provably contracts the head dim of the query with
  that of the gathered keys per (b, s), and the scores reach the softmax as
  (b, s, h, k) with k last -- whatever einsum/matmul spelling produced them.
  Casts inside an operand chain are not taken (the op would read the uncast
  tensor).
- The gathered tensors must be ``X[b, idx[b, s, k], :]`` for the same index
  node: aten.gather on dim 2 of ``X[:, None]`` expanded over S with the index
  ``idx[..., None]`` expanded over D, or aten.index with
  ``[arange(B) viewed (B, 1, 1), idx]``; X is (B, T, D) with T the size of the
  dim the top-k ran over, so every index is in [0, T).
- The index must be a top-k over the last dim (distinct indices; any order,
  largest or not: the indexer's own masking does not matter).
- The causal rule: a -inf fill whose mask is ``idx > P`` (or >=, <, <= with the
  operands swapped), broadcast over the heads, where P depends on constants
  only (aranges): it is evaluated and must equal ``s + c`` for every (s, k);
  the op's sparse_mode 3 masks index > s + (T - S), so c must be T - S.
  Anything else (a different offset, positions from a graph input) leaves the
  site alone with the rule named. Without a mask, sparse_mode 0 attends every
  selected token, as the program does.

Where the op and the program differ, the rewrite makes them equal:

- The op reads only the first min(K, s + c + 1) entries of a row (its causal
  walk), and treats -1 as the end of the list. Top-k returns indices in score
  order, so with a causal rule a valid index could sit past that budget; the
  rewrite sorts the indices ascending (aten.sort, which GE converts): the
  valid ones (distinct, < s + c + 1) are then exactly the first entries. The
  selection is a set, so attention over it does not depend on the order.
- A row whose every selected index is masked is NaN in eager (softmax of
  -inf), 0 from the op: the rewrite fills such rows (smallest index > s + c)
  with NaN again (noted). _safe_softmax (0 there) needs no fix-up.

Left alone, with the reason: attention weights or scores read outside the
site, a fill value other than -inf (finfo.min gives the mean of V on an empty
row), a scale that is not a constant, a score term other than the two
products, indices not from a top-k, and everything the op's own validation
refuses (D = 512, rope dim 64, N1 a power of two <= 128, dtypes; on the GE
target float16/bfloat16 only): its message is the reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..kernels._library import npu_rules
from ..report import Report, Site
from ._context import PassContext
from ._fx import (CASTS, SOFTMAXES, Rewrite, RewriteRefused, is_call, same_shape, same_strides, scalar_constant,
                  static_int, val)
from ._rules import Rule, RuleStats, apply_rules
from .eager_attention_to_fused import RESHAPES as VIEWS

aten = torch.ops.aten
prims = torch.ops.prims
npu_attn = torch.ops.npu_attn

PATTERN = "sparse:topk-gather-attention"
SPARSE_FA = npu_attn.npu_sparse_flash_attention.default
COMPARES = {aten.gt.Tensor: (0, 0), aten.ge.Tensor: (0, -1), aten.lt.Tensor: (1, 0), aten.le.Tensor: (1, -1)}

Axes = list  # one tuple of labels per dim, labels merged in row-major order; () a size-1 dim


# ----------------------------------------------------------------------------
# Label tracking through view ops
# ----------------------------------------------------------------------------


class _Labels:
    """Sizes of the labels in use (a label of size 1 is dropped: it carries no index)."""

    def __init__(self) -> None:
        self.size: dict[str, int] = {}
        self._fresh = 0

    def root(self, node: torch.fx.Node, names: list[str]) -> Axes | None:
        shape = [static_int(n) for n in val(node).shape]
        if None in shape or len(shape) != len(names):
            return None
        axes = []
        for name, n in zip(names, shape):
            if n == 1:
                axes.append(())
                continue
            if self.size.setdefault(name, n) != n:
                return None
            axes.append((name,))
        return axes

    def fresh(self, n: int) -> str:
        self._fresh += 1
        name = f"~{self._fresh}"
        self.size[name] = n
        return name

    def apply(self, node: torch.fx.Node, axes: Axes) -> Axes | None:
        """The labels of node's value, given those of its first argument."""
        t, rank = node.target, len(axes)
        if t in (aten.clone.default, aten.alias.default):
            return list(axes)
        if t is aten.unsqueeze.default:
            d = node.args[1] % (rank + 1)
            return [*axes[:d], (), *axes[d:]]
        if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            dims = range(rank) if t is aten.squeeze.default else (
                [node.args[1]] if t is aten.squeeze.dim else list(node.args[1]))
            drop = {d % rank for d in dims if axes[d % rank] == ()}
            return [a for i, a in enumerate(axes) if i not in drop]
        if t is aten.permute.default:
            return [axes[d % rank] for d in node.args[1]]
        if t is aten.transpose.int:
            a, b = (d % rank for d in node.args[1:3])
            out = list(axes)
            out[a], out[b] = out[b], out[a]
            return out
        if t is aten.expand.default:
            sizes = [static_int(s) for s in node.args[1]]
            if None in sizes or len(sizes) < rank:
                return None
            out = [() if s == 1 else (self.fresh(s),) for s in sizes[:len(sizes) - rank]]
            for axis, s in zip(axes, sizes[len(sizes) - rank:]):
                if s == -1 or s == self.numel(axis):
                    out.append(axis)
                elif axis == ():
                    out.append((self.fresh(s),))
                else:
                    return None
            return out
        if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
            shape = [static_int(s) for s in val(node).shape]
            if None in shape:
                return None
            flat = [label for axis in axes for label in axis]
            out, i = [], 0
            for n in shape:
                group, prod = [], 1
                while prod < n and i < len(flat):
                    group.append(flat[i])
                    prod *= self.size[flat[i]]
                    i += 1
                if prod != n:
                    return None
                out.append(tuple(group))
            return out if i == len(flat) else None
        return None

    def numel(self, axis: tuple) -> int:
        return math.prod(self.size[label] for label in axis)


def _view_chain(node: object) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """(root, views from the root to node): node's first-argument ancestry through view ops."""
    chain = []
    while is_call(node, VIEWS):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _rank_root(node: object, rank: int) -> tuple[torch.fx.Node | None, list[torch.fx.Node]]:
    """The deepest node of node's view ancestry with the given rank (the tensor the program viewed into
    the operand, e.g. q = linear(x).view(B, S, H, D)), and the views from it to node."""
    root, chain = _view_chain(node)
    nodes = [root, *chain]
    for i, candidate in enumerate(nodes):
        if isinstance(val(candidate), torch.Tensor) and val(candidate).dim() == rank:
            return candidate, nodes[i + 1:]
    return None, []


def _through(labels: _Labels, axes: Axes | None, chain: list[torch.fx.Node]) -> Axes | None:
    for node in chain:
        if axes is None:
            return None
        axes = labels.apply(node, axes)
    return axes


def _flat(axes: Axes) -> list[str]:
    return [label for axis in axes for label in axis]


# ----------------------------------------------------------------------------
# The gathers: X[b, idx[b, s, k], :]
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Gather:
    node: torch.fx.Node
    source: torch.fx.Node  # X (B, T, D)
    index: torch.fx.Node  # idx (B, S, K)


def _gather(node: object) -> _Gather | None:
    """node is X[b, idx[b, s, k], d] for a (B, T, D) tensor X and a (B, S, K) index tensor, proved by labels."""
    labels = _Labels()
    if is_call(node, aten.gather.default) and node.args[1] in (2, -2) and len(node.args) == 3:
        src_root, src_chain = _rank_root(node.args[0], 3)
        idx_root, idx_chain = _rank_root(node.args[2], 3)
        if src_root is None or idx_root is None:
            return None
        src = _through(labels, labels.root(src_root, ["b", "t", "d"]), src_chain)
        idx = _through(labels, labels.root(idx_root, ["b", "s", "k"]), idx_chain)
        if src is None or idx is None or len(src) != 4 or len(idx) != 4:
            return None
        # src (b, ~S, t, d), index (b, s, k, ~D): out[b, s, k, d] = X[b, idx[b, s, k], d]
        if src[0] != idx[0] or src[2] not in (("t",), ()) or src[3] != ("d",) and src[3] != ():
            return None
        if labels.numel(src[1]) != labels.numel(idx[1]) or src[1] not in ((), ) and not src[1][0].startswith("~"):
            return None
        if idx[1] not in (("s",), ()) or idx[2] not in (("k",), ()) or \
                labels.numel(idx[3]) != labels.numel(src[3]) or idx[3] not in ((),) and not idx[3][0].startswith("~"):
            return None
        return _Gather(node, src_root, idx_root)
    if is_call(node, aten.index.Tensor) and len(node.args[1]) == 2:
        source, (rows, idx_root) = node.args[0], node.args[1]
        if not isinstance(rows, torch.fx.Node) or val(source).dim() != 3 or val(idx_root).dim() != 3:
            return None
        # rows must be arange(B) viewed (B, 1, 1): evaluated (constants only).
        value = _constant_value(rows)
        batch = static_int(val(source).shape[0])
        if value is None or batch is None or value.dim() != 3 or list(value.shape[1:]) != [1, 1]:
            return None
        with unset_fake_temporarily():
            if not torch.equal(value.reshape(-1).long(), torch.arange(batch)):
                return None
        if not same_shape(val(idx_root).shape[:1], val(source).shape[:1]):
            return None
        return _Gather(node, source, idx_root)
    return None


def _constant_value(node: torch.fx.Node) -> torch.Tensor | None:
    """node's value when it is computed from constants only (no graph input), evaluated with the graph's ops."""
    env: dict[torch.fx.Node, object] = {}

    def run(n: torch.fx.Node):
        if n in env:
            return env[n]
        if n.op != "call_function" or len(env) > 64:
            raise LookupError(n.name)
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), run)
        env[n] = n.target(*args, **kwargs)
        return env[n]

    try:
        with unset_fake_temporarily():
            out = run(node)
    except Exception:  # noqa: BLE001 - anything but constants: not provable
        return None
    return out if isinstance(out, torch.Tensor) else None


def _topk_indices(node: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """(topk node, the size of the dim it ran over) when node is topk(x, k, -1)[1]."""
    if not is_call(node, operator.getitem) or node.args[1] != 1 or not is_call(node.args[0], aten.topk.default):
        return None
    topk = node.args[0]
    x = val(topk.args[0])
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    if dim % x.dim() != x.dim() - 1:
        return None
    return topk, static_int(x.shape[-1])


# ----------------------------------------------------------------------------
# The site
# ----------------------------------------------------------------------------


@dataclass
class SparseSite:
    softmax: torch.fx.Node
    output: torch.fx.Node  # (B, S, H, Dv), replaced by the op's output
    query: torch.fx.Node
    query_rope: torch.fx.Node | None
    key: _Gather
    key_rope: _Gather | None
    value: _Gather
    index: torch.fx.Node
    scale: float = 1.0
    mask: torch.fx.Node | None = None  # the -inf filled node
    causal_offset: int | None = None  # c in "index > s + c is masked"
    internal: list[torch.fx.Node] = field(default_factory=list)
    reason: str | None = None


def _term(labels: _Labels, node: torch.fx.Node, q_name: str) -> tuple[torch.fx.Node, _Gather, Axes] | None:
    """node = a view of bmm(view(q), view(gather)^T): (q root, the gather, the score labels)."""
    bmm_out, out_chain = _view_chain(node)
    if not is_call(bmm_out, aten.bmm.default):
        return None
    a_root, a_chain = _rank_root(bmm_out.args[0], 4)
    b_root, b_chain = _view_chain(bmm_out.args[1])
    gather = _gather(b_root)
    if gather is None or a_root is None:
        return None
    a = _through(labels, labels.root(a_root, ["b", "s", "h", q_name]), a_chain)
    b = _through(labels, labels.root(b_root, ["b", "s", "k", q_name]), b_chain)
    if a is None or b is None or len(a) != 3 or len(b) != 3 or a[0] != b[0] or a[2] != b[1]:
        return None
    if _flat([a[0]]) != [x for x in ("b", "s") if x in labels.size] or a[2] != (q_name,):
        return None
    scores = _through(labels, [a[0], a[1], b[2]], out_chain)
    return (a_root, gather, scores) if scores is not None else None


def _want(labels: _Labels, names: list[str]) -> list[str]:
    return [n for n in names if n in labels.size]


def match_sparse_attention(softmax: torch.fx.Node) -> SparseSite | None:
    if not is_call(softmax, SOFTMAXES) or softmax.args[1] not in (-1, val(softmax).dim() - 1):
        return None
    internal = [softmax]
    # --- scores: [casts] [-inf fill] [casts] [scale] (term [+ term])
    node, scale, mask, fill = softmax.args[0], 1.0, None, None
    while True:
        internal.append(node)
        if is_call(node, CASTS):
            node = node.args[0]
        elif is_call(node, aten.masked_fill.Scalar) and mask is None:
            mask, fill = node, node.args[2]
            node = node.args[0]
        elif is_call(node, (aten.mul.Tensor, aten.div.Tensor)) and scalar_constant(node.args[1]) is not None:
            c = scalar_constant(node.args[1])
            scale *= c if node.target is aten.mul.Tensor else 1.0 / c
            node = node.args[0]
        else:
            break
    internal.pop()
    labels = _Labels()
    if is_call(node, aten.add.Tensor) and all(isinstance(x, torch.fx.Node) for x in node.args[:2]) and \
            node.kwargs.get("alpha", 1) == 1:
        internal.append(node)
        terms = [_term(labels, x, name) for x, name in zip(node.args[:2], ("dq", "dr"))]
        if None in terms:
            terms = [_term(labels, x, name) for x, name in zip(node.args[:2], ("dr", "dq"))]
    else:
        terms = [_term(labels, node, "dq")]
    if None in terms:
        return None
    want = _want(labels, ["b", "s", "h", "k"])
    if any(_flat(t[2]) != want or t[2][-1] != ("k",) for t in terms):
        return None
    if len(terms) == 2 and terms[0][1].index is not terms[1][1].index:
        return None
    # --- output: bmm(view(probs), view(gather of V))
    probs = softmax
    users = list(probs.users)
    while len(users) == 1 and is_call(users[0], CASTS):
        probs = users[0]
        internal.append(probs)
        users = list(probs.users)
    bmm = None
    for user in users:
        node = user
        while is_call(node, VIEWS) and len(node.users) == 1:
            node = next(iter(node.users))
        if is_call(node, aten.bmm.default):
            bmm = node
    if bmm is None:
        return None
    p_root, p_chain = _view_chain(bmm.args[0])
    v_root, v_chain = _view_chain(bmm.args[1])
    value = _gather(v_root)
    if p_root is not probs or value is None or value.index is not terms[0][1].index:
        return None
    p = _through(labels, terms[0][2], p_chain)  # the probabilities keep the scores' labels
    v = _through(labels, labels.root(v_root, ["b", "s", "k", "dv"]), v_chain)
    if p is None or v is None or len(p) != 3 or len(v) != 3 or p[0] != v[0] or p[2] != v[1] or p[2] != ("k",):
        return None
    out_axes, output = [p[0], p[1], v[2]], bmm
    node = bmm
    target = _want(labels, ["b", "s", "h", "dv"])
    while True:
        if _flat(out_axes) == target and len(out_axes) == 4 and all(len(a) <= 1 for a in out_axes):
            output = node
            break
        if len(node.users) != 1 or not is_call(next(iter(node.users)), VIEWS):
            return None
        node = next(iter(node.users))
        out_axes = labels.apply(node, out_axes)
        if out_axes is None:
            return None
    queries = {name: t[0] for t, name in zip(terms, ("dq", "dr"))}
    keys = {name: t[1] for t, name in zip(terms, ("dq", "dr"))}
    if len(terms) == 2 and _flat(terms[1][2]) != _flat(terms[0][2]):
        return None
    site = SparseSite(softmax=softmax, output=output, query=queries["dq"], query_rope=queries.get("dr"),
                      key=keys["dq"], key_rope=keys.get("dr"), value=value, index=terms[0][1].index, scale=scale,
                      mask=mask, internal=internal)
    if mask is not None:
        fill_value = scalar_constant(fill)
        if fill_value != -math.inf:
            site.reason = (f"the masked scores are filled with {fill_value}, not -inf: a row whose every selected "
                           "token is masked would be the mean of V in eager, the op's masking drops the tokens")
        else:
            site.causal_offset, why = _causal_rule(labels, mask.args[1], site.index, want)
            site.reason = site.reason or why
    return site


def _causal_rule(labels: _Labels, mask: torch.fx.Node, index: torch.fx.Node, score: list[str]
                 ) -> tuple[int | None, str | None]:
    """c when mask is (index > s + c) broadcast over the heads, else (None, why)."""
    cmp, chain = _view_chain(mask)
    if not is_call(cmp, tuple(COMPARES)):
        return None, f"the -inf mask is {getattr(cmp, 'name', cmp)}, not a comparison of the indices with positions"
    side, shift = COMPARES[cmp.target]
    idx, pos = cmp.args[side], cmp.args[1 - side]
    if idx is not index:
        return None, "the -inf mask does not compare the selected indices themselves with the query positions"
    axes = _through(labels, labels.root(index, ["b", "s", "k"]), chain)
    if axes is None or len(axes) > 4:
        return None, "the -inf mask is not the index comparison broadcast over the heads"
    padded = [()] * (4 - len(axes)) + axes
    if [a for a in padded if a] != [(x,) for x in score if x != "h"] or padded[2] != () or \
            any(len(a) > 1 for a in padded):
        return None, "the -inf mask is not the index comparison broadcast over the heads"
    if not isinstance(pos, torch.fx.Node):
        return None, f"the indices are compared with the constant {pos}, not with the query positions"
    value = _constant_value(pos)
    if value is None:
        return None, (f"the positions the indices are compared with ({pos.name}) are data (they depend on a graph "
                      "input), so the causal rule cannot be proved equal to the op's sparse_mode 3")
    shape = [static_int(n) for n in val(index).shape]
    with unset_fake_temporarily():
        try:
            grid = torch.broadcast_to(value, shape).long()
        except RuntimeError:
            return None, "the positions do not broadcast to the indices"
        c = int(grid[0, 0, 0])
        expected = torch.arange(shape[1]).view(1, -1, 1) + c
        if not torch.equal(grid, expected.expand(shape)):
            return None, "the positions the indices are compared with are not s + c for one constant c"
    return c + shift, None


def check_sparse_attention(site: SparseSite, ctx: PassContext) -> str | None:
    if site.reason is not None:
        return site.reason
    topk = _topk_indices(site.index)
    if topk is None:
        return (f"the selected indices ({site.index.name}) are not top-k indices over the keys' last dim: distinct "
                "in-range indices (which the op's -1-terminated, causally walked lists need) cannot be proved")
    kv_len = static_int(val(site.key.source).shape[1])
    if topk[1] != kv_len:
        return f"the top-k runs over {topk[1]} positions, the keys have {kv_len}"
    for g in (site.key_rope, site.value):
        if g is not None and not same_shape(val(g.source).shape[:2], val(site.key.source).shape[:2]):
            return f"{g.source.name} is not a (B, T, ...) tensor of the keys' {tuple(val(site.key.source).shape[:2])}"
    if ctx.target == "ge" and ctx.fp32_attention == "unfused" and val(site.query).dtype == torch.float32:
        return "float32 attention left as plain math (option fp32_attention='unfused')"
    if site.query_rope is None:
        return "no rope score term: npu_sparse_flash_attention computes MLA-absorb only (query_rope and key_rope)"
    q_len = static_int(val(site.query).shape[1])
    if site.causal_offset is not None and site.causal_offset != kv_len - q_len:
        return (f"a different causal rule: the program masks index > s + {site.causal_offset}, the op's sparse_mode "
                f"3 (rightDownCausal) masks index > s + {kv_len - q_len} (kv_len {kv_len} - q_len {q_len})")
    for node in site.internal:
        if node is not site.softmax and any(u not in site.internal and u is not site.output and
                                            not _on_output_path(u, site) for u in node.users):
            return f"{node.name} (scores or attention weights) is also read outside the attention"
    if any(u not in site.internal and not _on_output_path(u, site) for u in site.softmax.users):
        return "the attention weights are also read outside the attention"
    return None


def _on_output_path(node: torch.fx.Node, site: SparseSite) -> bool:
    """node is one of the views/bmm between the probabilities and the output."""
    while node is not site.output:
        if len(node.users) != 1 or not (is_call(node, VIEWS) or is_call(node, aten.bmm.default)):
            return False
        node = next(iter(node.users))
    return True


def rewrite_sparse_attention(rw: Rewrite, site: SparseSite, ctx: PassContext, record: Site) -> list[torch.fx.Node]:
    causal = site.causal_offset is not None
    index = site.index
    if causal:
        index = rw.call(operator.getitem, (rw.call(aten.sort.default, (index, -1)), 0))
    indices = rw.call(aten.unsqueeze.default, (rw.call(prims.convert_element_type.default, (index, torch.int32)), 2))
    # A float32 site bound for the NPU (which takes float16/bfloat16 only) is computed in the dtype the
    # fp32_attention option names, with casts around the op (the attention_precision convention).
    low = ctx.attention_cast_dtype if ctx.target == "ge" and val(site.query).dtype == torch.float32 else None

    def operand(node: torch.fx.Node, unsqueeze: bool) -> torch.fx.Node:
        if unsqueeze:
            node = rw.call(aten.unsqueeze.default, (node, 2))
        return node if low is None else rw.call(prims.convert_element_type.default, (node, low))

    key = operand(site.key.source, True)
    key_rope = operand(site.key_rope.source, True)
    value = key if site.value.source is site.key.source else operand(site.value.source, True)
    with npu_rules(ctx.target == "ge"):
        call = rw.call(SPARSE_FA, (operand(site.query, False), key, value, indices, float(site.scale)),
                       dict(query_rope=operand(site.query_rope, False), key_rope=key_rope, sparse_block_size=1,
                            layout_query="BSND", layout_kv="BSND", sparse_mode=3 if causal else 0,
                            attention_mode=2),
                       meta_from=site.softmax)
    out = rw.call(operator.getitem, (call, 0))
    if low is not None:
        out = rw.call(prims.convert_element_type.default, (out, torch.float32))
        record.precision = f"float32 via {str(low).replace('torch.', '')}"
    notes = []
    if causal and site.softmax.target is not aten._safe_softmax.default:
        # Eager's softmax of an all -inf row is NaN; the op gives 0: fill those rows with NaN again.
        first = rw.call(aten.select.int, (index, -1, 0))
        q_len = static_int(val(site.query).shape[1])
        pos = rw.call(aten.arange.start, (site.causal_offset, site.causal_offset + q_len),
                      dict(dtype=val(first).dtype, device=val(first).device))
        empty = rw.call(aten.gt.Tensor, (first, pos))
        empty = rw.call(aten.unsqueeze.default, (rw.call(aten.unsqueeze.default, (empty, -1)), -1))
        out = rw.call(aten.masked_fill.Scalar, (out, empty, math.nan))
        notes.append("rows whose every selected index is masked are NaN, as eager's softmax gives (the op gives 0)")
    if causal:
        notes.insert(0, "indices sorted ascending: the op reads a row's first s + 1 + (T - S) entries")
    got, wanted = val(out), val(site.output)
    if got.dtype != wanted.dtype or not same_shape(got.shape, wanted.shape) or not same_strides(got, wanted):
        raise RewriteRefused(f"npu_sparse_flash_attention's output is {got.dtype} {list(got.shape)} "
                             f"{tuple(got.stride())}, the site's {wanted.dtype} {list(wanted.shape)} "
                             f"{tuple(wanted.stride())}")
    rw.replace(site.output, out)
    record.fused_op = "npu_sparse_flash_attention"
    record.layout = "BSND"
    record.sparse_mode = 3 if causal else 0
    record.gqa_ratio = static_int(val(site.query).shape[2])
    record.notes.extend(notes)
    return [site.output]


SPARSE_RULE = Rule(
    name=PATTERN, kind="attention", anchors=SOFTMAXES, match=match_sparse_attention, check=check_sparse_attention,
    rewrite=rewrite_sparse_attention, anchor_of=lambda site: site.output, claims=lambda site: [site.softmax])


def sparse_attention_to_fused(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """Rewrite every top-k selected-token (DSA) attention into npu_sparse_flash_attention."""
    return apply_rules(gm, (SPARSE_RULE,), report, ctx)
