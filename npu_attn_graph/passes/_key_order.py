"""Which nodes carry a window's key order, and may they read it permuted?

A ring-buffer window (sliding_window_ring) holds its keys in another order than
eager's. Attention is indifferent to the order of its keys as long as every
tensor indexed by key moves with them: the scores' key axis, the mask added to
them, the softmax over them, and the values they are contracted with. This
module follows the key axis forward from the windows through the ops that keep
it intact (views, transposes, element-wise math, softmax) to where it is
contracted away (the probabilities times the values) or reduced (a row max or
sum). A tensor that meets the key axis in an element-wise op or a contraction
without being derived from a window (the mask, a position bias) is "foreign":
it must be permuted along that axis. Any other use of a key-ordered tensor (a
graph output, a copy into an input, a slice or gather along the key axis, a
concatenation, an op not listed here) makes the whole region unprovable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._fx import call_arg, graph_order, val
from .registry import ATTENTION_OPS

aten = torch.ops.aten
prims = torch.ops.prims

# Element-wise ops (broadcasting, aligned from the right): the key axis stays where it is.
POINTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.rsub.Scalar, aten.add.Scalar,
    aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.where.self, aten.masked_fill.Scalar,
    aten.masked_fill.Tensor, aten.tanh.default, aten.exp.default, aten.neg.default, aten.abs.default,
    aten.sigmoid.default, aten.pow.Tensor_Scalar, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.maximum.default, aten.minimum.default, aten.clone.default, aten.alias.default,
    aten._to_copy.default, prims.convert_element_type.default, aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar,
    aten.gt.Scalar, aten.le.Scalar, aten.ge.Scalar, aten.eq.Tensor, aten.ne.Tensor, aten.logical_not.default,
    aten.bitwise_not.default,
}
# Same shape out, computed along a dim: independent for each key whatever the dim.
ALONG_A_DIM = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default, aten._log_softmax.default}
# Reductions (input, dims, keepdim): order-free once the key axis is among the dims.
REDUCTIONS = {aten.amax.default, aten.amin.default, aten.sum.dim_IntList, aten.mean.dim, aten.logsumexp.default}
VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# Batched matmuls by dim labels: batch, rows, contracted, columns.
MATMUL_LABELS = {aten.bmm.default: ("bnm", "bmp", "bnp"), aten.mm.default: ("nm", "mp", "np")}


@dataclass
class KeyOrderPlan:
    """The region the windows reach: where each node carries a key axis and in which
    window order (a hashable key: windows with equal keys share one order), and
    the foreign operands to permute: (user, operand, dim of the operand, order)."""
    axis: dict[torch.fx.Node, tuple[int, object]] = field(default_factory=dict)
    foreign: list[tuple[torch.fx.Node, torch.fx.Node, int, object]] = field(default_factory=list)
    # fused attention ops reading a key-ordered tensor as their key or value (through
    # views): (op node, argument index, order); their masks are the caller's to permute
    attention: list[tuple[torch.fx.Node, int, object]] = field(default_factory=list)


class KeyOrderUnproven(Exception):
    """A use of a key-ordered tensor that may depend on the order; the message says which."""


def _same(a: object, b: object) -> bool:
    return statically_known_true(a == b)


def _view_dim(before: tuple, after: tuple, dim: int) -> int | None:
    """Where dim of `before` is in `after` for a view, if it survives unmerged and unsplit:
    the same size after the same number of leading elements."""
    leading = math.prod(before[:dim])
    for i in range(len(after)):
        if _same(math.prod(after[:i]), leading) and _same(after[i], before[dim]):
            return i
    return None


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


class _Sweep:
    def __init__(self, starts: dict[torch.fx.Node, tuple[int, object]], skip: set[torch.fx.Node]) -> None:
        self.plan = KeyOrderPlan(axis=dict(starts))
        self.skip = skip
        self.order: object = None  # the window order of the user being followed

    def _where(self, node: torch.fx.Node) -> str:
        return f"{node.name} ({getattr(node.target, '__name__', node.target)})"

    def _aligned(self, user: torch.fx.Node, out_dim: int, out_ndim: int) -> None:
        """Every tensor input of an element-wise user, aligned from the right to out_dim."""
        for arg in user.all_input_nodes:
            x = val(arg)
            if not isinstance(x, torch.Tensor):
                continue
            dim = x.dim() - (out_ndim - out_dim)
            self._operand(user, arg, dim)

    def _operand(self, user: torch.fx.Node, arg: torch.fx.Node, dim: int) -> None:
        """arg meets the key axis at its `dim` (negative: it broadcasts there)."""
        carried = self.plan.axis.get(arg)
        if carried is not None:
            if carried != (dim, self.order):
                raise KeyOrderUnproven(f"{self._where(user)} meets the key axis of {arg.name} (dim {carried[0]}) "
                                       f"at dim {dim}, or in another window's order")
            return
        if dim >= 0 and not _same(val(arg).shape[dim], 1):
            for other, operand, at, _ in self.plan.foreign:
                if other is user and operand is arg:
                    if at != dim:
                        raise KeyOrderUnproven(f"{self._where(user)} meets {arg.name} at two different dims")
                    return
            self.plan.foreign.append((user, arg, dim, self.order))

    def _out_dim(self, user: torch.fx.Node, arg: torch.fx.Node, dim: int) -> int | None:
        """The key axis of user's output given that input `arg` carries it at `dim`;
        None when the user reduces or contracts it away."""
        target, out = user.target, val(user)
        src = val(arg)
        if target in POINTWISE:
            if not isinstance(out, torch.Tensor) or out.dim() == 0:
                raise KeyOrderUnproven(f"{self._where(user)} has no tensor output")
            at = out.dim() - (src.dim() - dim)
            self._aligned(user, at, out.dim())
            return at
        if target in ALONG_A_DIM:
            return dim
        if target in REDUCTIONS:
            dims = call_arg(user, 1, "dim", None)
            dims = list(range(src.dim())) if not dims else [_norm(d, src.dim()) for d in
                                                            (dims if isinstance(dims, (list, tuple)) else [dims])]
            if dim in dims:
                return None
            return dim if call_arg(user, 2, "keepdim", False) else dim - sum(d < dim for d in dims)
        if target in VIEWS:
            at = _view_dim(tuple(src.shape), tuple(out.shape), dim)
            if at is None:
                raise KeyOrderUnproven(f"{self._where(user)} merges or splits the key axis "
                                       f"({list(src.shape)} -> {list(out.shape)}, key dim {dim})")
            return at
        if target is aten.expand.default:
            at = dim + out.dim() - src.dim()
            if not _same(out.shape[at], src.shape[dim]):
                raise KeyOrderUnproven(f"{self._where(user)} expands the key axis")
            return at
        if target is aten.unsqueeze.default:
            return dim + (_norm(user.args[1], out.dim()) <= dim)
        if target in (aten.squeeze.dim, aten.squeeze.dims):
            dims = user.args[1] if isinstance(user.args[1], (list, tuple)) else [user.args[1]]
            dims = [_norm(d, src.dim()) for d in dims if _same(src.shape[_norm(d, src.dim())], 1)]
            return dim - sum(d < dim for d in dims)
        if target is aten.transpose.int:
            a, b = (_norm(d, src.dim()) for d in user.args[1:3])
            return b if dim == a else a if dim == b else dim
        if target is aten.permute.default:
            return [_norm(d, src.dim()) for d in user.args[1]].index(dim)
        if target in (aten.slice.Tensor, aten.index_select.default, aten.select.int):
            along = _norm(call_arg(user, 1, "dim", 0), src.dim())
            if along == dim:
                raise KeyOrderUnproven(f"{self._where(user)} picks positions along the key axis")
            if arg is not user.args[0]:
                raise KeyOrderUnproven(f"{self._where(user)} uses a key-ordered tensor as an index")
            return dim - (target is aten.select.int and along < dim)
        if target in MATMUL_LABELS:
            if user.args[0] is user.args[1]:
                raise KeyOrderUnproven(f"{self._where(user)} multiplies a key-ordered tensor by itself")
            labels = MATMUL_LABELS[target]
            label = labels[user.args.index(arg)][dim]
            for operand, names in zip(user.args[:2], labels[:2]):
                if label in names and operand is not arg:
                    self._operand(user, operand, names.index(label))
            return labels[2].index(label) if label in labels[2] else None
        if target in ATTENTION_OPS:
            self._attention(user, arg, dim)
            return None
        raise KeyOrderUnproven(f"{self._where(user)} is not an op known to keep the key axis intact")

    def _attention(self, user: torch.fx.Node, arg: torch.fx.Node, dim: int) -> None:
        """A fused attention op reading the key axis as its key or value sequence axis
        (order-free once its key-indexed arguments move too: recorded for the caller)."""
        op = ATTENTION_OPS[user.target]
        at = [i for i, a in enumerate(user.args) if a is arg]
        if at not in ([op.key_arg], [op.value_arg]) or any(v is arg for v in user.kwargs.values()):
            raise KeyOrderUnproven(f"{self._where(user)} reads the key-ordered {arg.name} other than as its key "
                                   f"or value")
        layout = user.kwargs.get("input_layout", "BSH")
        sequence = 2 if layout.startswith("BNSD") else 1 if layout in ("BSND", "BSH") else None
        if sequence != dim:
            raise KeyOrderUnproven(f"{self._where(user)} reads {arg.name} in layout {layout}, whose sequence axis "
                                   f"is not the key axis (dim {dim})")
        self.plan.attention.append((user, at[0], self.order))

    def run(self, graph: torch.fx.Graph) -> KeyOrderPlan:
        order = graph_order(graph)
        start = min(order[n] for n in self.plan.axis)
        for user in graph.nodes:
            if order[user] <= start or user in self.skip:
                continue
            carried = [(arg, self.plan.axis[arg]) for arg in user.all_input_nodes if arg in self.plan.axis]
            if not carried:
                continue
            if user.op != "call_function":
                raise KeyOrderUnproven(f"the key-ordered {carried[0][0].name} reaches {user.op} {user.name}")
            orders = {order for _, (_, order) in carried}
            if len(orders) != 1:
                raise KeyOrderUnproven(f"{self._where(user)} combines windows held in different orders")
            self.order = orders.pop()
            dims = {self._out_dim(user, arg, dim) for arg, (dim, _) in carried}
            if len(dims) != 1:
                raise KeyOrderUnproven(f"{self._where(user)} puts its inputs' key axes in different places")
            dim = dims.pop()
            if dim is not None:
                self.plan.axis[user] = (dim, self.order)
        return self.plan


def key_order_region(graph: torch.fx.Graph, starts: dict[torch.fx.Node, tuple[int, object]],
                     skip: set[torch.fx.Node]) -> KeyOrderPlan:
    """Follow the key axes of `starts` (node -> its key dim and its window order)
    through the graph, leaving out the users in `skip` (handled elsewhere).
    Raises KeyOrderUnproven when some use may depend on the order."""
    return _Sweep(starts, skip).run(graph)
