"""GE converters for npu_attn::npu_scatter_nd_update(_) -> GE ``ScatterNdUpdate`` (a ref op on ``var``)."""

from __future__ import annotations

import torch

from ._ge import Tensor, TensorSpec, dont_prune_me, ge, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_scatter_nd_update.default)
def convert_scatter_nd_update(self: Tensor, indices: Tensor, updates: Tensor,
                              meta_outputs: TensorSpec | None = None) -> Tensor:
    """npu_attn::npu_scatter_nd_update(Tensor self, Tensor indices, Tensor updates) -> Tensor

    GE op type: ScatterNdUpdate(var=TensorMove(self)); with the graph's copy_ back
    into ``self`` TorchAir makes it one in-place write (see scatter_update).
    """
    return ge.ScatterNdUpdate(ge.TensorMove(self), indices, updates)


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_scatter_nd_update_.default)
def convert_scatter_nd_update_(self: Tensor, indices: Tensor, updates: Tensor,
                               meta_outputs: TensorSpec | None = None) -> Tensor:
    """npu_attn::npu_scatter_nd_update_(Tensor(a!) self, Tensor indices, Tensor updates) -> Tensor(a!)

    GE op type: ScatterNdUpdate(var=self), kept even when nothing reads its output.
    """
    op = ge.ScatterNdUpdate(self, indices, updates)
    dont_prune_me(op)
    return op
