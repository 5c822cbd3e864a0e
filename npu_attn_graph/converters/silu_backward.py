"""GE converter for aten::silu_backward -> GE ``SwishGrad`` (with ``Swish``).

TorchAir 2.13 registers a converter for aten.silu_backward.default that raises
NotImplementedError (torchair/_ge_concrete_graph/ge_converter/aten/silu_backward.py in
the torch_npu 2.13.0 wheel), so a training step of any SiLU model (Llama, Qwen2,
Mistral MLPs: the backward of ``act_fn(gate_proj(x))``) did not become one GE graph.
This module registers ours in its place (importing npu_attn_graph.converters, after
TorchAir's own converters are loaded, replaces it).

GE op: CANN's SiluGrad (dy, x) is the exact op, but TorchAir 2.13's generated builders
(ge_apis) have none and the wheel carries no IR for it (only the op type name, in
torch_npu's ACL path), so its input/output names cannot be checked offline. SwishGrad
is in the generated IR::

    REG_OP(Swish)  .INPUT(x) .OUTPUT(y) .ATTR(scale, Float, 1.0)          y = x * sigmoid(scale * x)
    REG_OP(SwishGrad) .INPUT(grad) .INPUT(x) .INPUT(y) .OUTPUT(grad_x) .ATTR(scale, Float, 1.0)

(float16, float32, bfloat16). With scale 1, Swish is SiLU (TorchAir's own aten.silu
converter is ``ge.Swish(self)``) and SwishGrad is its derivative:
grad_x = grad * (sigmoid(x) + x * sigmoid(x) * (1 - sigmoid(x))). SwishGrad takes the
forward output y as well, which the backward graph does not hold (AOT saves only x
for silu_backward), so y is recomputed by a Swish on x: one element-wise op.
"""

from __future__ import annotations

import torch

from ._ge import Tensor, TensorSpec, ge, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.aten.silu_backward.default)
def convert_silu_backward(grad_output: Tensor, self: Tensor, meta_outputs: TensorSpec | None = None) -> Tensor:
    """aten::silu_backward(Tensor grad_output, Tensor self) -> Tensor

    GE: SwishGrad(grad=grad_output, x=self, y=Swish(self, scale=1.0), scale=1.0).
    """
    return ge.SwishGrad(grad_output, self, ge.Swish(self, scale=1.0), scale=1.0)
