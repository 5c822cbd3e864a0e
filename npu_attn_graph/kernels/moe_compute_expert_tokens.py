"""``npu_moe_compute_expert_tokens``: each expert's last row in expert-sorted rows.

Schema: torch_npu 2.13.0's (namespace ``npu_attn``; the wheel's
torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml), written once, in the ``define``
call below; the drop-in function's docstring shows it.

Semantics (torch_npu doc; CANN aclnnMoeComputeExpertTokens, "binary search for
the last row each expert processes"): for the ascending expert ids of the
routed rows, ``out[e]`` is the number of rows whose expert is at most e, i.e.
the end (exclusive) of expert e's rows: the cumulative token counts per expert
that npu_grouped_matmul takes as group_list (group_list_type 0).

Rules (the doc): sorted_expert_for_source_row 1-D int32 with fewer than
2147483647 elements, values in [0, num_expert - 1], ascending; the output is
(num_expert,) of the input's dtype. The fake enforces shape and dtype and
num_expert >= 1; the reference also checks the values (range, order), which
the NPU does not.
"""

from __future__ import annotations

import torch

from ._dropin import dropin
from ._library import check, define, fail, register_fake, register_npu, register_reference

__all__ = ["npu_moe_compute_expert_tokens"]

OP = "npu_moe_compute_expert_tokens"
MAX_ROWS = 2147483647


def _validate(sorted_expert_for_source_row: torch.Tensor, num_expert: int) -> None:
    rows = sorted_expert_for_source_row
    check(rows.dim() == 1, OP, "sorted_expert_for_source_row.dim()", "must be 1", rows.dim())
    check(rows.dtype == torch.int32, OP, "sorted_expert_for_source_row.dtype", "must be torch.int32", rows.dtype)
    check(rows.shape[0] < MAX_ROWS, OP, "sorted_expert_for_source_row.shape[0]", f"must be below {MAX_ROWS}",
          rows.shape[0])
    check(num_expert >= 1, OP, "num_expert", "must be at least 1", num_expert)


NPU_MOE_COMPUTE_EXPERT_TOKENS = define(OP, "(Tensor sorted_expert_for_source_row, int num_expert) -> Tensor")


@register_fake(NPU_MOE_COMPUTE_EXPERT_TOKENS)
def _fake(sorted_expert_for_source_row, num_expert):
    _validate(sorted_expert_for_source_row, num_expert)
    return sorted_expert_for_source_row.new_empty(num_expert)


def _ref(sorted_expert_for_source_row, num_expert):
    _validate(sorted_expert_for_source_row, num_expert)
    rows = sorted_expert_for_source_row
    if rows.numel():
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high >= num_expert:
            fail(OP, "sorted_expert_for_source_row", f"values must lie in [0, num_expert - 1] = [0, {num_expert - 1}]",
                 [low, high])
        if bool((rows[1:] < rows[:-1]).any()):
            fail(OP, "sorted_expert_for_source_row", "must be sorted in ascending order", rows.tolist())
    experts = torch.arange(num_expert, device=rows.device, dtype=rows.dtype)
    return torch.searchsorted(rows, experts, right=True).to(rows.dtype)


register_reference(NPU_MOE_COMPUTE_EXPERT_TOKENS, _ref)
register_npu(NPU_MOE_COMPUTE_EXPERT_TOKENS)


npu_moe_compute_expert_tokens = dropin(NPU_MOE_COMPUTE_EXPERT_TOKENS, __name__, """\
For ascending int32 expert ids (values in [0, num_expert)), ``out[e]`` = the number of
ids at most e: the end of expert e's rows, i.e. npu_grouped_matmul's cumulative
group_list. Output (num_expert,) int32.""")
