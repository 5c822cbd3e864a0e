"""GE converter for npu_attn::npu_moe_compute_expert_tokens -> GE ``MoeComputeExpertTokens``.

Wired as TorchAir 2.13's own converter for torch.ops.npu.npu_moe_compute_expert_tokens
(torchair/_ge_concrete_graph/ge_converter/custom/npu_moe_compute_expert_tokens.py in
the torch_npu 2.13.0 wheel): input sorted_experts <- sorted_expert_for_source_row,
attr num_experts <- num_expert; output total_rows_before_expert (int32).
"""

from __future__ import annotations

import torch

from ._ge import Tensor, TensorSpec, ge, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_moe_compute_expert_tokens.default)
def convert_moe_compute_expert_tokens(sorted_expert_for_source_row: Tensor, num_expert: int,
                                      meta_outputs: TensorSpec | None = None) -> Tensor:
    """npu_attn::npu_moe_compute_expert_tokens(Tensor sorted_expert_for_source_row, int num_expert) -> Tensor

    GE op type: MoeComputeExpertTokens(sorted_experts, num_experts=num_expert).
    """
    return ge.MoeComputeExpertTokens(sorted_expert_for_source_row, num_experts=num_expert)
