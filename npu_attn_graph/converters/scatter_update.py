"""GE converters for npu_attn::scatter_update and scatter_update_ -> GE ``Scatter`` (reduce "update").

GE's Scatter is a ref op: output ``var`` is its input ``var`` updated in place.
It writes ``updates`` at a per-batch start offset along ``axis``, which is
scatter_update's semantics; GE's ScatterUpdate (whole slices at indices of the
first axis) is not. torch_npu's own scatter_update reaches GE the same way
(TorchAir's converter for torch.ops.npu.scatter_update builds Scatter, in
torchair/_ge_concrete_graph/ge_converter/custom/scatter_update.py).
"""

from __future__ import annotations

import torch

from ._ge import Tensor, TensorSpec, dont_prune_me, ge, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.npu_attn.scatter_update.default)
def convert_scatter_update(self: Tensor, indices: Tensor, updates: Tensor, axis: int,
                           meta_outputs: TensorSpec | None = None) -> Tensor:
    """npu_attn::scatter_update(Tensor self, Tensor indices, Tensor updates, int axis) -> Tensor

    GE op type: Scatter(var=TensorMove(self), reduce="update", axis). The
    TensorMove keeps the op functional. When the graph copies the result back into
    ``self`` (a KV-cache graph input; the KV passes write GE graphs this way),
    TorchAir removes the TensorMove and the copy, leaving one in-place Scatter on
    the cache input.
    """
    return ge.Scatter(ge.TensorMove(self), indices, updates, reduce="update", axis=axis)


@register_fx_node_ge_converter(torch.ops.npu_attn.scatter_update_.default)
def convert_scatter_update_(self: Tensor, indices: Tensor, updates: Tensor, axis: int,
                            meta_outputs: TensorSpec | None = None) -> Tensor:
    """npu_attn::scatter_update_(Tensor(a!) self, Tensor indices, Tensor updates, int axis) -> Tensor(a!)

    GE op type: Scatter(var=self, reduce="update", axis), kept even when nothing
    reads its output. Graphs reach TorchAir functionalized, so this appears only if
    a later pass re-inplaces the functional form.
    """
    op = ge.Scatter(self, indices, updates, reduce="update", axis=axis)
    dont_prune_me(op)
    return op
