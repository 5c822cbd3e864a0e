"""GE converter for npu_attn::npu_moe_gating_top_k_softmax_v2 -> GE ``MoeGatingTopKSoftmaxV2``.

GE op (the REG_OP TorchAir 2.13 quotes in torchair/_ge_concrete_graph/
auto_generated_ge_raw_ops.py): input x, optional input finished (bool), attrs k
(required Int), renorm (Int), output_softmax (Bool); outputs y, expert_idx
(int32), softmax_result (float32).

Built with ``torchair.ge.custom_op`` because neither TorchAir builder works:
its own converter for torch.ops.npu.npu_moe_gating_top_k_softmax_v2
(ge_converter/custom/npu_moe_gating_top_k_softmax_v2.py in the torch_npu 2.13.0
wheel) calls the V1 builder ``ge.MoeGatingTopKSoftmax`` with the V2 keywords
renorm/output_softmax, which it does not take, and the generated V2 builder
declares finished keyword-only while its input decorator counts it among the
positional arguments ("The length of args can not be less than inputs_dynamic").
None for renorm/output_softmax is the schema's default (0, False).
"""

from __future__ import annotations

import torch

from ._ge import Tensor, TensorSpec, attr, custom_op, register_fx_node_ge_converter, register_ir

OP_TYPE = "MoeGatingTopKSoftmaxV2"
INPUTS = [("x", "required"), ("finished", "optional")]
OUTPUTS = ["y", "expert_idx", "softmax_result"]
register_ir(OP_TYPE, INPUTS, [(name, "required") for name in OUTPUTS],
            [("k", "Int"), ("renorm", "Int"), ("output_softmax", "Bool")])


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_moe_gating_top_k_softmax_v2.default)
def convert_moe_gating_top_k_softmax_v2(x: Tensor, *, k: int = 1, finished: Tensor | None = None,
                                        renorm: int | None = 0, output_softmax: bool | None = False,
                                        meta_outputs: list[TensorSpec] | None = None) -> tuple[Tensor, ...]:
    """npu_attn::npu_moe_gating_top_k_softmax_v2(Tensor x, *, int k=1, Tensor? finished=None,
    int? renorm=0, bool? output_softmax=False) -> (Tensor, Tensor, Tensor)

    GE op type: MoeGatingTopKSoftmaxV2(x, finished, k=k, renorm=renorm, output_softmax=output_softmax).
    """
    return tuple(custom_op(OP_TYPE, inputs=dict(x=x, finished=finished), outputs=OUTPUTS,
                           attrs={"k": attr.Int(k), "renorm": attr.Int(0 if renorm is None else renorm),
                                  "output_softmax": attr.Bool(bool(output_softmax))}))
