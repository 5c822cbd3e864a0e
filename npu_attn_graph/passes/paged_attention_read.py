"""Rule: a paged *read* (K/V gathered through a block table, a lengths mask) -> fused attention with block_table.

vLLM-style code reads a sequence's keys and values from paged caches by
gathering its blocks, then masks the positions past its length:

    k = k_cache[block_table].view(B, S_kv, Hkv, D).transpose(1, 2)     # or index_select / gather,
    v = v_cache[block_table].view(B, S_kv, Hkv, D).transpose(1, 2)     # flatten / reshape, BSND or BNSD
    keep = torch.arange(S_kv) < seq_lens[:, None]                      # True = attend
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])   # or hand-written

The dense gather copies every block of every sequence and the mask is
materialised; the NPU's ops read the caches through block_table themselves.

Where it runs, and why there: after the attention rules (sdpa_to_fused,
eager_attention_to_fused), gqa_repeat_kv and paged_cache_update. The
attention rules read every spelling of the attention itself (SDPA's ATen
forms, matmul/bmm/einsum, scales, casts, masks decided by their values: a
masked_fill, a where, an additive mask built from a bool become the NPU mask),
gqa_repeat_kv removes repeat_kv (the op gets un-repeated K/V and
num_key_value_heads), and the KV write rule has already turned the cache
writes into the fused writer. This rule then only has to prove two things
about the fused op they left, and retargets it:

1. K and V are a paged gather: walking from the op's key/value back through
   views (view, reshape, flatten's _unsafe_view, transpose, permute,
   contiguous copies, unsqueeze/squeeze) reaches ``index(cache, [table])``,
   ``index_select(cache, 0, table.flatten())`` or ``gather(cache, 0,
   table.view(-1, 1, 1, 1).expand(...))`` with a 2-D integer table (B,
   max_blocks), the same table for K and V. The walk tracks which dim of the
   gathered tensor each dim of K/V is made of (reshapes regroup them in
   row-major order), and accepts exactly: batch = the table's rows, sequence
   = (table column, offset in block), heads and head dim = the cache's. The
   cache layout follows from that: (num_blocks, block_size, Hkv, D) is handed
   to the op as its free view (num_blocks, block_size, Hkv*D), (num_blocks,
   Hkv, block_size, D) as it is (BNSD queries only, the op's rule), and
   (num_blocks, block_size, H) as it is (H split into Hkv x D).
2. The mask is the lengths: its construction is read symbolically (every
   integer tensor an affine function a*j + b*i + c*L[b] + d of the key index
   j, the query index i and one integer tensor L indexed by batch, d an int or
   a symbolic size such as a dynamic S_q; every boolean a (negated)
   conjunction of `< 0` inequalities over those), which proves, for all values
   of L, that it keeps key j of batch b exactly when j < L[b] - d, uniformly
   over heads and query rows. Or, for a query chunk (chunked prefill,
   prefix-cache continuation), exactly when j <= i + X[b] with X = L + k: the
   causal mask aligned to each sequence's end, which is the op's own
   rightDownCausal (sparse_mode 3: j <= i + kv_len[b] - S_q) with kv_len =
   X + S_q (so the usual "j <= L - S_q + i" has kv_len = L, and
   "j <= context_len + i" kv_len = context_len + S_q); a lengths bound
   j < L - d next to it must be implied by the band (else the band would end
   past the sequence: refused). Anything else (a top-left causal term j <= i,
   a window, a per-head mask, a bias, a mask from two tensors such as
   per-sequence chunk lengths, no mask) leaves the site as the attention rules
   fused it, with the reason in the site's notes.

Rewrite: the op's wrapper that takes the lengths as a tensor
(kernels/paged_attention.py: npu_incre_flash_attention_paged for S_q == 1,
npu_fused_infer_attention_score_paged for S_q > 1 or a symbolic S_q) with the
caches themselves, block_table (cast to int32), block_size, the lengths
``clamp(L - d, 0, S_kv)`` (exactly eager's "j < L[b] - d" for every j in
[0, S_kv), so any value of L, negative or past the gathered length, gives
eager's result) and no mask. A causal chunk gets the FIA wrapper with
sparse_mode 3, the shared compressed 2048x2048 mask and ``clamp(X + S_q,
min=0)`` (a negative value keeps no key in either; a value past the gathered
capacity is not clamped, since that would move the diagonal: the op's own
run-time check rejects it, naming actual_seq_lengths_kv). Every query row is
the chunk's (actual_seq_lengths unset). Rows before a short sequence's first
key (i < S_q - kv_len) keep no key: the op gives them 0, SDPA too; a -inf
hand-written softmax gives NaN through the fix-up below; a finfo.min mask
gives the mean of every gathered value, so it is refused (no sequence length
in the graph can be proved >= S_q). The op's own validation runs on the
site's fake values, and the replacement must have the original's shape,
dtype and strides. A fully-masked-row fix-up the attention rules added
(``any`` over the kept keys: rows of a -inf mask with no key give NaN, as
eager) is rewritten to read the lengths (``L' > 0``, or for a chunk
``i + kv_len >= S_q``); a fix-up that reads the gathered values (a finfo.min
mask: a row with no key gets the mean of every gathered value, unused blocks
included, in eager) or any other reader of the gathered K/V leaves the site
alone with the reason.

Why a wrapper op for the lengths (and not unbacked SymInts): the torch_npu
ops take ``actual_seq_lengths`` as SymInt[] host values; the graph has a
tensor that changes every step. One ``aten._local_scalar_dense`` per batch
would give unbacked SymInts, but the ops' validation (``max(lengths) <=
capacity``, ``ceil(length / block_size) <= max_blocks``) would then be
data-dependent guards fake tensors cannot decide, the batch size would be
unrolled into the graph, and every entry would be its own host sync. The
wrapper takes the tensor: its fake is the wrapped op's own validation (facts
in one place), the eager executor reads the lengths once on the host and
calls the wrapped op, and its GE converter feeds the tensor straight into the
GE op's actual_seq_lengths input (no host read in the GE graph).

The report row (kind "attention") becomes pattern "paged:gather-attention"
with the attention rule's pattern in the notes, fused or left alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..report import Report
from ._attention import causal_mask_node
from ._context import PassContext
from ._fx import (SITE, Rewrite, RewriteRefused, erased, is_call, require_same_value, scalar_constant,
                  static_int, val)
from ._rules import Rule, RuleStats, check_and_rewrite
from .registry import ATTENTION_OPS, FUSED_INFER, INCRE, PAGED_WRAPPERS, PROMPT, FusedAttentionOp

aten = torch.ops.aten

PATTERN = "paged:gather-attention"
READ_OPS = (INCRE, PROMPT, FUSED_INFER)


class NotPaged(Exception):
    """The key/value is not a gather at all: not a paged site (no report change)."""


class Refused(Exception):
    """A paged site this rule cannot prove; the message is the reason."""


# ----------------------------------------------------------------------------
# 1. K/V: a paged gather through views
# ----------------------------------------------------------------------------

Atom = tuple  # (name, size): one factor of a dim of the gathered tensor


@dataclass
class Gather:
    node: torch.fx.Node  # index / index_select / gather
    cache: torch.fx.Node
    table: torch.fx.Node  # (B, max_blocks) integer
    chain: list[torch.fx.Node] = field(default_factory=list)  # gather .. key/value


_IDENTITY = (aten.clone.default, aten.alias.default, aten.contiguous.default, aten.lift_fresh_copy.default)
_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_TABLE_FLATTENS = _RESHAPES + (aten.flatten.using_ints,)


def _gather_of(node: torch.fx.Node) -> Gather | None:
    """The gather node's cache and 2-D table, if `node` is one of the three spellings."""
    if is_call(node, aten.index.Tensor):
        cache, indices = node.args[0], node.args[1]
        if len(indices) == 1 and isinstance(indices[0], torch.fx.Node) and val(indices[0]).dim() == 2:
            return Gather(node, cache, indices[0])
        return None
    if is_call(node, aten.index_select.default) and node.args[1] == 0:
        flat = node.args[2]
        if is_call(flat, _TABLE_FLATTENS) and val(flat.args[0]).dim() == 2:
            return Gather(node, node.args[0], flat.args[0])
        return None
    if is_call(node, aten.gather.default) and node.args[1] == 0 and not node.kwargs.get("sparse_grad"):
        cache, index = node.args[0], node.args[2]
        cache_shape = val(cache).shape
        if not is_call(index, aten.expand.default):
            return None
        flat = index.args[0]
        if not (is_call(flat, _TABLE_FLATTENS) and val(flat.args[0]).dim() == 2):
            return None
        flat_shape = val(flat).shape
        # index[i, ...] = table.flatten()[i]: a column expanded over the cache's other dims.
        if len(flat_shape) != len(cache_shape) or any(not statically_known_true(s == 1) for s in flat_shape[1:]):
            return None
        if any(not statically_known_true(a == b) for a, b in zip(val(index).shape[1:], cache_shape[1:])):
            return None
        return Gather(node, cache, flat.args[0])
    return None


def _prod(atoms: list) -> object:
    p = 1
    for _, size in atoms:
        p = p * size
    return p


def _drop_ones(atoms: list) -> list:
    return [a for a in atoms if not statically_known_true(a[1] == 1)]


def _regroup(dims: list[list], shape: list) -> list[list]:
    """Row-major reshape of dims (each a list of atoms) into `shape`, splitting an
    atom where a new dim ends inside it (static sizes only)."""
    queue = [a for d in dims for a in _drop_ones(d)]
    out = []
    for size in shape:
        taken: list = []
        while not statically_known_true(_prod(taken) == size):
            if not queue:
                raise Refused(f"reshape to {list(shape)} does not regroup the gathered dims")
            atom = queue.pop(0)
            have = _prod(taken) * atom[1]
            if statically_known_true(have == size) or not _overshoots(have, size):
                taken.append(atom)
                continue
            # The new dim ends inside this atom: split it (name, n) -> (name.0, k), (name.1, n // k).
            need, n = static_int(size), static_int(atom[1])
            got = static_int(_prod(taken))
            if need is None or n is None or got is None or need % got or n % (need // got):
                raise Refused(f"reshape to {list(shape)} splits a gathered dim of symbolic or indivisible size")
            k = need // got
            taken.append((atom[0] + (0,), k))
            queue.insert(0, (atom[0] + (1,), n // k))
        out.append(_drop_ones(taken))
    if queue:
        raise Refused(f"reshape to {list(shape)} does not regroup the gathered dims")
    return out


def _overshoots(have: object, size: object) -> bool:
    h, s = static_int(have), static_int(size)
    return h is not None and s is not None and h > s


def _walk(kv: torch.fx.Node) -> tuple[Gather, list[list]]:
    """The gather `kv` is a view of, and the atoms of each dim of `kv`."""
    chain = []
    node = kv
    while True:
        gather = _gather_of(node) if isinstance(node, torch.fx.Node) else None
        if gather is not None:
            break
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            raise NotPaged()
        chain.append(node)
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            raise NotPaged()
        node = node.args[0]
        if len(chain) > 16:
            raise NotPaged()
    chain.reverse()
    cache_val, table_val = val(gather.cache), val(gather.table)
    b, m = table_val.shape
    cache_dims = [[(("c", d), s)] for d, s in enumerate(cache_val.shape) if d > 0]
    if is_call(gather.node, aten.index.Tensor):
        dims = [[(("b",), b)], [(("j",), m)]] + cache_dims
    else:
        dims = [[(("b",), b), (("j",), m)]] + cache_dims
    dims = [_drop_ones(d) for d in dims]
    for node in chain:
        t = node.target
        if t in _IDENTITY or (t is aten.slice.Tensor and _full_slice(node)):
            continue
        if t is aten._to_copy.default and set(node.kwargs) <= {"memory_format"}:
            continue
        if t is aten.transpose.int:
            d0, d1 = (d % len(dims) for d in node.args[1:3])
            dims[d0], dims[d1] = dims[d1], dims[d0]
        elif t is aten.permute.default:
            dims = [dims[d % len(dims)] for d in node.args[1]]
        elif t in _RESHAPES or t is aten.flatten.using_ints or t is aten.unsqueeze.default or \
                t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            dims = _regroup(dims, list(val(node).shape))
        else:
            raise Refused(f"the gathered K/V goes through {t} (not a view the rule reads)")
    gather.chain = chain
    return gather, dims


def _full_slice(node: torch.fx.Node) -> bool:
    from ._fx import is_full_slice
    return is_full_slice(node)


@dataclass
class PagedKV:
    gather: Gather
    cache_form: str  # "BSND" (nb, bs, Hkv, D), "BNSD" (nb, Hkv, bs, D), "BSH" (nb, bs, H)
    block_size: int


def _paged(kv: torch.fx.Node, layout: str, kv_heads: int) -> PagedKV:
    gather, dims = _walk(kv)
    cache = val(gather.cache)
    if layout not in ("BNSD", "BSND"):
        raise Refused(f"input_layout {layout}: the rule reads BNSD/BSND K/V")
    if cache.dim() not in (3, 4):
        raise Refused(f"the gathered cache has {cache.dim()} dims (the op takes 3 or 4)")
    role = dict(zip(layout, dims))
    batch, heads, seq, dim = role["B"], role["N"], role["S"], role["D"]
    if batch != _drop_ones([(("b",), val(gather.table).shape[0])]):
        raise Refused("the K/V batch is not the block table's rows")
    c = {d: (("c", d), cache.shape[d]) for d in range(1, cache.dim())}
    j = _drop_ones([(("j",), val(gather.table).shape[1])])
    if cache.dim() == 4:
        forms = {"BSND": (c[1], c[2]), "BNSD": (c[2], c[1])}  # (offset in block, heads)
        for form, (offset, head) in forms.items():
            if seq == j + _drop_ones([offset]) and heads == _drop_ones([head]) and dim == _drop_ones([c[3]]):
                return PagedKV(gather, form, _block_size(offset))
    else:
        n = static_int(cache.shape[2])
        if n is not None and kv_heads > 0 and n % kv_heads == 0:
            head, d_atom = (("c", 2, 0), kv_heads), (("c", 2, 1), n // kv_heads)
            if kv_heads == 1:
                head, d_atom = None, c[2]
            if seq == j + _drop_ones([c[1]]) and heads == _drop_ones([head] if head else []) and \
                    dim == _drop_ones([d_atom]):
                return PagedKV(gather, "BSH", _block_size(c[1]))
    raise Refused("the K/V dims are not (batch = table rows, sequence = (table column, offset in block), "
                  "heads, head dim) of the gathered cache")


def _block_size(atom: Atom) -> int:
    size = static_int(atom[1])
    if size is None:
        raise Refused(f"block size {atom[1]} is symbolic")
    return size


# ----------------------------------------------------------------------------
# 2. The mask: "key j kept iff j < L[b] - d", read from its construction
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """sum(coef * index along axis) + l * L[...] + const; axes counted from the right."""

    rank: int
    coefs: tuple = ()  # ((axis_from_right, coef), ...)
    length: torch.fx.Node | None = None
    length_axis: int | None = None  # None: L broadcast along a size-1 axis (a batch of 1)
    l: int = 0
    const: int = 0

    def scaled(self, k: int) -> "Affine":
        return Affine(self.rank, tuple((a, c * k) for a, c in self.coefs), self.length, self.length_axis,
                      self.l * k, self.const * k)


@dataclass(frozen=True)
class Pred:
    """negated XOR (every affine < 0)."""

    rank: int
    ineqs: tuple
    negated: bool = False


def _combine(a: Affine, b: Affine, sign: int) -> Affine:
    if a.length is not None and b.length is not None and (a.length is not b.length or
                                                           a.length_axis != b.length_axis):
        raise Refused("the mask reads two length tensors (or one along two axes)")
    coefs = dict(a.coefs)
    for axis, c in b.coefs:
        coefs[axis] = coefs.get(axis, 0) + sign * c
    length = a.length if a.length is not None else b.length
    axis = a.length_axis if a.length is not None else b.length_axis
    return Affine(max(a.rank, b.rank), tuple((k, v) for k, v in sorted(coefs.items()) if v), length, axis,
                  a.l + sign * b.l, a.const + sign * b.const)


def _move_axes(x, old_shape, new_shape):
    """Re-index axes after a reshape that only adds or removes size-1 dims."""
    old = [i for i, s in enumerate(old_shape) if not statically_known_true(s == 1)]
    new = [i for i, s in enumerate(new_shape) if not statically_known_true(s == 1)]
    if len(old) != len(new) or any(not statically_known_true(old_shape[i] == new_shape[k])
                                   for i, k in zip(old, new)):
        raise Refused(f"the mask is reshaped {list(old_shape)} -> {list(new_shape)}")
    mapping = {i - len(old_shape): k - len(new_shape) for i, k in zip(old, new)}

    def axis(a):
        if a is None:
            return None
        if a not in mapping:  # a size-1 axis: broadcast, any position
            return None
        return mapping[a]

    rank = len(new_shape)
    if isinstance(x, Affine):
        coefs = tuple((axis(a), c) for a, c in x.coefs if axis(a) is not None)
        return Affine(rank, coefs, x.length, axis(x.length_axis), x.l, x.const)
    return Pred(rank, tuple(_move_axes(q, old_shape, new_shape) for q in x.ineqs), x.negated)


def _int_scalar(x: object) -> object | None:
    """An int, or a SymInt (a symbolic size, e.g. a dynamic query length), else None."""
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, (int, torch.SymInt)):
        return x
    if isinstance(x, torch.fx.Node) and isinstance(val(x), torch.SymInt):
        return val(x)
    c = scalar_constant(x) if isinstance(x, torch.fx.Node) else None
    if c is not None and isinstance(x, torch.fx.Node) and not val(x).dtype.is_floating_point and c == int(c):
        return int(c)
    return None


_CMP = {aten.lt.Tensor: "lt", aten.lt.Scalar: "lt", aten.le.Tensor: "le", aten.le.Scalar: "le",
        aten.gt.Tensor: "gt", aten.gt.Scalar: "gt", aten.ge.Tensor: "ge", aten.ge.Scalar: "ge"}
_NOT = (aten.logical_not.default, aten.bitwise_not.default)
_AND = (aten.logical_and.default, aten.bitwise_and.Tensor, aten.mul.Tensor)
_OR = (aten.logical_or.default, aten.bitwise_or.Tensor)
# prims.iota: how arange reaches a graph decomposed with Inductor's table.
_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step, torch.ops.prims.iota.default)


def _read(x: object):
    """x as an Affine (integer) or a Pred (boolean)."""
    k = _int_scalar(x)
    if k is not None:
        return Affine(0, const=k)
    if not isinstance(x, torch.fx.Node):
        raise Refused(f"the mask uses {x!r}")
    v = val(x)
    t = x.target if x.op == "call_function" else None
    if t in _ARANGES:
        if t is torch.ops.prims.iota.default:
            start, step = x.kwargs.get("start", 0), x.kwargs.get("step", 1)
        else:
            start = x.args[0] if t is not aten.arange.default else 0
            step = x.args[2] if t is aten.arange.start_step else 1
        if not isinstance(start, int) or step != 1:
            raise Refused("the mask's arange has a symbolic start or a step other than 1")
        return Affine(1, ((-1, 1),), const=start)
    if t in _CMP:
        a, b = _read(x.args[0]), _read(x.args[1])
        if not (isinstance(a, Affine) and isinstance(b, Affine)):
            raise Refused("the mask compares booleans")
        op = _CMP[t]
        if op == "lt":
            e = _combine(a, b, -1)
        elif op == "le":
            e = _combine(_combine(a, b, -1), Affine(0, const=1), -1)
        elif op == "gt":
            e = _combine(b, a, -1)
        else:
            e = _combine(_combine(b, a, -1), Affine(0, const=1), -1)
        return Pred(v.dim(), (e,))
    if t in _NOT:
        p = _read(x.args[0])
        if not isinstance(p, Pred):
            raise Refused("the mask negates an integer")
        return Pred(p.rank, p.ineqs, not p.negated)
    if t in (aten.eq.Scalar, aten.ne.Scalar) and v.dtype == torch.bool and val(x.args[0]).dtype == torch.bool:
        p = _read(x.args[0])
        flip = (t is aten.eq.Scalar) == (not bool(x.args[1]))
        return Pred(p.rank, p.ineqs, p.negated != flip)
    if t in _AND + _OR and v.dtype == torch.bool:
        a, b = _read(x.args[0]), _read(x.args[1])
        if not (isinstance(a, Pred) and isinstance(b, Pred)):
            raise Refused("the mask combines integers as booleans")
        if t in _AND and not a.negated and not b.negated:
            return Pred(v.dim(), a.ineqs + b.ineqs)
        if t in _OR and a.negated and b.negated:
            return Pred(v.dim(), a.ineqs + b.ineqs, True)
        raise Refused("the mask is not one conjunction of comparisons")
    if t in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar) and not v.dtype.is_floating_point \
            and v.dtype != torch.bool:
        alpha = x.kwargs.get("alpha", 1)
        if not isinstance(alpha, int):
            raise Refused("the mask's arithmetic has a non-integer alpha")
        a, b = _read(x.args[0]), _read(x.args[1])
        return _combine(a, b.scaled(alpha), 1 if t in (aten.add.Tensor, aten.add.Scalar) else -1)
    if t is aten.neg.default:
        return _read(x.args[0]).scaled(-1)
    if t in _IDENTITY or (t is aten.slice.Tensor and _full_slice(x)) or t is aten.expand.default:
        inner = _read(x.args[0])
        return _rerank(inner, v.dim())
    if t is aten._to_copy.default or t is torch.ops.prims.convert_element_type.default:
        src = val(x.args[0]).dtype
        if src.is_floating_point or v.dtype.is_floating_point or (src == torch.bool) != (v.dtype == torch.bool):
            raise Refused(f"the mask is cast {src} -> {v.dtype}")
        return _rerank(_read(x.args[0]), v.dim())
    if t in (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default) + _RESHAPES:
        return _move_axes(_read(x.args[0]), list(val(x.args[0]).shape), list(v.shape))
    # A leaf: one integer tensor with one non-1 dim, read as L[b] along that dim.
    if v is not None and isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dtype != torch.bool \
            and v.dtype.is_signed:
        big = [i for i, s in enumerate(v.shape) if not statically_known_true(s == 1)]
        if len(big) <= 1:
            return Affine(v.dim(), (), x, big[0] - v.dim() if big else None, 1, 0)
    raise Refused(f"the mask is computed with {t if t is not None else x.op} {x.name}, "
                  f"which the rule does not read")


def _rerank(x, rank: int):
    if isinstance(x, Affine):
        return Affine(rank, x.coefs, x.length, x.length_axis, x.l, x.const)
    return Pred(rank, x.ineqs, x.negated)


@dataclass
class Lengths:
    node: torch.fx.Node  # L
    offset: int  # the op's KV length is L[b] + offset
    causal: bool = False  # also "key j kept iff j <= i + (L[b] + offset) - S_q" (sparse_mode 3)


def replace_attention_output(rw: Rewrite, node: torch.fx.Node, op: FusedAttentionOp, new: torch.fx.Node,
                             wrapper: FusedAttentionOp, what: str) -> torch.fx.Node:
    """The readers of fused op `node`'s attention output read `new`'s (a `wrapper` call)
    instead, each with the same value; refused when `node`'s softmax_lse is read."""
    out = new if wrapper.output_index is None else rw.call(operator.getitem, (new, wrapper.output_index))
    if op.output_index is None:
        require_same_value(node, out, what)
        rw.replace(node, out)
        return out
    readers = list(node.users)
    if any(u.target is not operator.getitem or u.args[1] != op.output_index for u in readers):
        raise RewriteRefused("the op's softmax_lse output is read")
    for u in readers:
        require_same_value(u, out, what)
        rw.replace(u, out)
    return out


def _lengths_mask(mask: torch.fx.Node, q_seq: object) -> Lengths:
    """Prove `mask` (True = masked out, the op's form) is "key j masked iff j >= L[b] + offset"
    or, for a causal chunk, "key j masked iff j > i + (L[b] + offset) - S_q" (and any lengths
    bound it has is implied by that one)."""
    p = _read(mask)
    shape = list(val(mask).shape)
    r = len(shape)
    if not isinstance(p, Pred):
        raise Refused("the mask is not boolean")
    if not p.negated and len(p.ineqs) == 1:  # masked iff e < 0: kept iff -e - 1 < 0 (integers)
        p = Pred(p.rank, (_combine(p.ineqs[0].scaled(-1), Affine(0, const=1), -1),), True)
    if not p.negated:
        raise Refused(f"the mask is not 'key j kept iff j < seq_len[b]' (it keeps keys where "
                      f"not {len(p.ineqs)} comparisons hold)")
    bounds, causal = [], []
    for e in p.ineqs:
        coefs = dict(e.coefs)
        if r >= 2 and statically_known_true(shape[-2] == 1):
            coefs.pop(-2, None)  # one query row: its index is 0 (in a (B, S_kv) mask axis -2 is the batch)
        if coefs.get(-1) != 1 or any(a not in (-1, -2) for a in coefs):
            raise Refused(f"the mask is not 'key j kept iff j < seq_len[b]': it keeps keys where "
                          f"{_describe(e)} < 0" + _axis_note(coefs, r))
        if -2 not in coefs:
            if e.length is None or e.l != -1:
                raise Refused(f"the mask is not 'key j kept iff j < seq_len[b]': it keeps keys where "
                              f"{_describe(e)} < 0")
            bounds.append(e)
            continue
        if coefs[-2] != -1 or r < 2 or not statically_known_true(shape[-2] == q_seq):
            raise Refused(f"the mask also depends on the index along axis {r - 2} in a way that is not "
                          f"causal (key j <= query i + offset): {_describe(e)} < 0")
        if e.length is None or e.l != -1:
            raise Refused(f"the causal term is aligned top-left (key j <= query i + {-e.const - 1}, no "
                          f"sequence length in it), not to each sequence's end (j <= i + L[b] - S_q, the "
                          f"op's rightDownCausal): {_describe(e)} < 0")
        causal.append(e)
    if len(causal) > 1:
        raise Refused(f"the mask has {len(causal)} causal bounds")
    if not causal and len(bounds) != 1:
        raise Refused(f"the mask is not 'key j kept iff j < seq_len[b]' (it keeps keys where "
                      f"{len(p.ineqs)} comparisons hold)")
    terms = causal + bounds
    if any(e.length is not terms[0].length or e.length_axis != terms[0].length_axis for e in terms):
        raise Refused("the mask's bounds read two length tensors (or one along two axes)")
    e = terms[0]
    # Which mask axis is the batch (the op's mask forms).
    if r == 2 and q_seq == 1 and not statically_known_true(shape[0] == 1):
        batch_axis = 0
    elif r in (3, 4):
        batch_axis = 0
    else:
        batch_axis = None
    axis = None if e.length_axis is None else r + e.length_axis
    length_val = val(e.length)
    if axis != batch_axis:
        if not (axis is None and statically_known_true(length_val.numel() == 1)):
            raise Refused(f"the lengths tensor {e.length.name} runs along mask axis {axis}, not the batch axis")
    if not causal:
        offset = static_int(-e.const)
        if offset is None:
            raise Refused(f"the lengths bound's offset {-e.const} is symbolic")
        return Lengths(e.length, offset)
    # Causal: j - i - L + c < 0, i.e. j <= i + (L - c - 1): the op's rightDownCausal (sparse_mode 3)
    # keeps j <= i + kv_len - S_q, so kv_len = L + (S_q - 1 - c). Its lengths bound j < kv_len is
    # implied (i <= S_q - 1); a lengths bound j < L - d in the mask must be implied too.
    offset = static_int(q_seq - 1 - e.const)
    if offset is None:
        raise Refused(f"the causal term's offset against the query length {q_seq} is not a constant: "
                      f"{_describe(e)} < 0")
    for bound in bounds:
        kept = static_int(-bound.const)
        if kept is None or kept < offset:
            raise Refused(f"the causal term is offset by {offset} from L[b] - S_q (its last query row keeps "
                          f"keys j < {e.length.name}[b] + {offset}) while the lengths bound keeps j < "
                          f"{e.length.name}[b] + {-bound.const}: the band ends past the sequence")
    return Lengths(e.length, offset, causal=True)


def _axis_note(coefs: dict, rank: int) -> str:
    others = [a for a in coefs if a not in (-1, -2)]
    return f" (it also depends on the index along axis {rank + min(others)})" if others else ""


def _describe(e: Affine) -> str:
    terms = [f"{c}*idx[{a}]" for a, c in e.coefs]
    if e.length is not None:
        terms.append(f"{e.l}*{e.length.name}")
    terms.append(str(e.const))
    return " + ".join(terms)


# ----------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------


def _fixups(mask: torch.fx.Node, fused: torch.fx.Node) -> list[torch.fx.Node]:
    """The ``any(not mask, -1, keepdim)`` nodes of a fully-masked-row fix-up; Refused
    for any other reader of the mask."""
    found = []
    for user in mask.users:
        if user is fused or user.target in ATTENTION_OPS:  # this site, or another site sharing the mask
            continue
        if is_call(user, _NOT) and user.users and all(
                is_call(u, aten.any.dim) and u.args[1] in (-1, val(mask).dim() - 1) and
                (u.args[2] if len(u.args) > 2 else u.kwargs.get("keepdim", False)) for u in user.users):
            found.extend(user.users)
            continue
        raise Refused(f"the mask is also read by {user.target} ({user.name})")
    return found


def _other_readers(g: Gather, fused: torch.fx.Node) -> str | None:
    inside = {g.node, *g.chain}
    for node in inside:
        for user in node.users:
            if user not in inside and user is not fused:
                return f"{user.target} ({user.name})"
    return None


@dataclass
class PagedRead:
    """A fused attention op whose K/V may be a paged gather (structure only)."""

    node: torch.fx.Node
    op: object  # FusedAttentionOp
    key: PagedKV | None = None
    value: PagedKV | None = None
    refused: str | None = None  # the gather is not one the rule reads
    lengths: Lengths | None = None  # set by check
    fixups: list = field(default_factory=list)


def match_read(node: torch.fx.Node) -> PagedRead | None:
    op = ATTENTION_OPS.get(node.target)
    if op not in READ_OPS or node.kwargs.get("block_table") is not None:
        return None
    layout = node.kwargs.get("input_layout")
    kv_heads = node.kwargs.get("num_key_value_heads") or node.kwargs.get(op.heads_kwarg)
    m = PagedRead(node, op)
    try:
        m.key = _paged(node.args[op.key_arg], layout, kv_heads)
        m.value = _paged(node.args[op.value_arg], layout, kv_heads)
    except NotPaged:
        # Not paged unless one of K/V is a gather (then the other's form is the reason).
        if m.key is None and not _is_gathered(node.args[op.value_arg]):
            return None
        m.refused = "only one of K/V is gathered from a paged cache"
    except Refused as refused:
        m.refused = str(refused)
    return m


def _is_gathered(kv: torch.fx.Node) -> bool:
    try:
        _walk(kv)
    except NotPaged:
        return False
    except Refused:
        return True
    return True


def check_read(m: PagedRead, ctx: PassContext) -> str | None:
    try:
        _check(m)
    except Refused as refused:
        return str(refused)
    return None


def _check(m: PagedRead) -> None:
    node, op, k, v = m.node, m.op, m.key, m.value
    if m.refused is not None:
        raise Refused(m.refused)
    if k.gather.table is not v.gather.table:
        raise Refused("K and V are gathered through different block tables")
    if (k.cache_form, k.block_size) != (v.cache_form, v.block_size):
        raise Refused(f"K and V caches differ in layout ({k.cache_form}/{v.cache_form}) or block size")
    if node.kwargs.get("pse_shift") is not None:
        raise Refused("an additive term goes in as pse_shift (not provably a lengths mask)")
    if op.sparse_modes and node.kwargs.get("sparse_mode", 0) not in (0, 1):
        raise Refused(f"sparse_mode {node.kwargs.get('sparse_mode')} (a band) besides the lengths")
    mask = node.kwargs.get("atten_mask")
    if mask is None:
        raise Refused("no mask: every gathered position, unused blocks included, is attended")
    layout = node.kwargs.get("input_layout")
    m.lengths = _lengths_mask(mask, val(node.args[0]).shape[layout.index("S")])
    m.fixups = _fixups(mask, node)
    for g in (k.gather, v.gather):
        other = _other_readers(g, node)
        if other is not None:
            raise Refused(f"the gathered K/V is also read by {other} (e.g. a finfo.min mask's fix-up: a "
                          f"row with no key (a sequence of length 0, or a chunk's query row before its "
                          f"sequence's first key) gets the mean of every gathered value, unused blocks "
                          f"included, in eager, and 0 from the op)")


def _int32_table(rw: Rewrite, table: torch.fx.Node) -> torch.fx.Node:
    """The block table cast to int32 (the ops' dtype): every layer reads the same table, so a
    site reuses the cast an earlier site inserted before it (one cast per graph, not per layer;
    each is a copy the graph would otherwise run once per layer)."""
    cast = torch.ops.prims.convert_element_type.default
    for user in table.users:
        if (user.target is cast and user.args == (table, torch.int32) and not user.kwargs and user < rw.anchor
                and not _written_between(user, rw.anchor, table)):
            return user
    return rw.call(cast, (table, torch.int32))


def _written_between(first: torch.fx.Node, last: torch.fx.Node, tensor: torch.fx.Node) -> bool:
    """Whether a node after `first` and before `last` may write `tensor` or a view of it (an op
    whose schema marks that argument written; any call that is not an ATen-style op and
    reads it counts as a write)."""
    aliases = {tensor}
    node = first.next
    while node is not last and node.op != "output":
        if node.op == "call_function":
            inputs = {n for n in node.all_input_nodes if n in aliases}
            if inputs:
                schema = getattr(node.target, "_schema", None)
                if schema is None:
                    return True
                for i, arg in enumerate(schema.arguments):
                    value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                    values = value if isinstance(value, (list, tuple)) else (value,)
                    if not any(isinstance(v, torch.fx.Node) and v in inputs for v in values):
                        continue
                    if arg.alias_info is not None and arg.alias_info.is_write:
                        return True
                    if arg.alias_info is not None:  # a view of it
                        aliases.add(node)
        node = node.next
    return False


def rewrite_read(rw: Rewrite, m: PagedRead, ctx: PassContext, site) -> list[torch.fx.Node]:
    node, op, k, v = m.node, m.op, m.key, m.value
    wrapper, lengths_kwarg = PAGED_WRAPPERS[op.name]
    mask = node.kwargs["atten_mask"]
    table = k.gather.table
    if val(table).dtype != torch.int32:
        table = _int32_table(rw, table)
    caches = []
    for p in (k, v):
        cache = p.gather.cache
        if p.cache_form == "BSND":
            nb, bs, n, d = rw.sizes(cache)
            cache = rw.call(aten.view.default, (cache, [nb, bs, n * d]))
        caches.append(cache)
    lens = m.lengths.node
    if val(lens).dim() != 1:
        lens = rw.call(aten.view.default, (lens, [-1]))
    if val(lens).dtype not in (torch.int32, torch.int64):
        lens = rw.call(torch.ops.prims.convert_element_type.default, (lens, torch.int64))
    if m.lengths.offset:
        lens = rw.call(aten.add.Tensor, (lens, m.lengths.offset))
    if m.lengths.causal:
        # Not clamped above: a length past the gathered capacity would move the causal
        # diagonal, so the op's own run-time check rejects it (eager keeps j < S_kv).
        lens = rw.call(aten.clamp.default, (lens, 0))
    else:
        lens = rw.call(aten.clamp.default, (lens, 0, rw.size(mask, -1)))
    kwargs = {"block_table": table, lengths_kwarg: lens, "num_heads": node.kwargs[op.heads_kwarg],
              wrapper.scale_kwarg: node.kwargs[op.scale_kwarg], "input_layout": node.kwargs["input_layout"],
              "num_key_value_heads": node.kwargs.get("num_key_value_heads", 0), "block_size": k.block_size}
    if m.lengths.causal:
        if wrapper is not PAGED_WRAPPERS[FUSED_INFER.name][0]:
            raise RewriteRefused(f"a causal chunk needs {PAGED_WRAPPERS[FUSED_INFER.name][0].name}'s sparse_mode 3, "
                                 f"not {wrapper.name}")
        kwargs.update(sparse_mode=3, atten_mask=causal_mask_node(rw, node.args[0], ctx))
    new = rw.call(wrapper.overload, (node.args[0], caches[0], caches[1]), kwargs)
    replace_attention_output(rw, node, op, new, wrapper, "the paged op")
    if m.fixups:
        if m.lengths.causal:
            # Query row i of batch b keeps a key iff i + kv_len[b] - S_q >= 0 (then key 0).
            q_seq = rw.size(mask, -2)
            rows = rw.call(aten.arange.default, (q_seq,), {"dtype": val(lens).dtype, "device": val(lens).device})
            reach = rw.call(aten.add.Tensor, (rw.call(aten.unsqueeze.default, (lens, 1)),
                                              rw.call(aten.unsqueeze.default, (rows, 0))))
            has_key = rw.call(aten.ge.Scalar, (reach, q_seq))  # (B, S_q)
        else:
            has_key = rw.call(aten.gt.Scalar, (lens, 0))  # (B,)
        for any_node in m.fixups:
            # any(not mask, -1, keepdim): the mask's sizes (ints, or sym_size nodes) with the last 1.
            shape = rw.sizes(mask)[:-1] + [1]
            if m.lengths.causal:
                view_shape = [shape[0]] + [1] * (len(shape) - 3) + [shape[-2], 1]
            else:
                view_shape = [shape[0]] + [1] * (len(shape) - 1)
            view = rw.call(aten.view.default, (has_key, view_shape))
            rw.replace(any_node, rw.call(aten.expand.default, (view, shape)))
    new.meta[SITE] = site
    return [node, *node.users, *m.fixups]


PAGED_READ_RULE = Rule(
    name=PATTERN, kind="attention", anchors=tuple(op.overload for op in READ_OPS), match=match_read,
    check=check_read, rewrite=rewrite_read, anchor_of=lambda m: m.node, claims=lambda m: [])


def paged_attention_read(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """PAGED_READ_RULE over the fused attention ops the attention rules made. Not
    through apply_rules: each site is in the report already (the attention rule's
    row), so its row is updated rather than a new one added."""
    stats = RuleStats()
    for node in list(gm.graph.nodes):
        if erased(node) or node.op != "call_function" or node.target not in PAGED_READ_RULE.anchors:
            continue
        m = PAGED_READ_RULE.match(node)
        if m is None:
            continue
        stats.matched += 1
        site = node.meta.get(SITE)
        origin = site.pattern if site is not None else "?"
        reason = check_and_rewrite(gm, PAGED_READ_RULE, m, ctx, site)
        if reason is None:
            stats.rewritten += 1
        if site is None:
            continue
        site.pattern = PATTERN
        if reason is not None:
            site.notes.append(f"paged read left as the dense gather and full mask that {origin} reads: {reason}")
            continue
        site.fused_op = PAGED_WRAPPERS[m.op.name][0].name
        # No mask and no band (the lengths do the masking), or the causal chunk's sparse_mode 3.
        site.sparse_mode = 3 if m.lengths.causal else None
        site.notes = [n for n in site.notes if not n.startswith("full mask computed from positions")]
        lengths = m.lengths.node.name + (f" + {m.lengths.offset}" if m.lengths.offset else "")
        site.notes.insert(0, f"read by {origin}; K/V are the paged caches through block_table (no gather), "
                             f"the mask is actual_seq_lengths from {lengths}" +
                             (" with sparse_mode 3 (rightDownCausal: key j <= i + kv_len - S_q) and the "
                              "compressed mask" if m.lengths.causal else ""))
        if m.fixups:
            site.notes.append("the fully-masked-row fix-up reads the lengths " +
                              ("(rows i < S_q - kv_len)" if m.lengths.causal else "(length 0)"))
    if stats.rewritten:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return stats
