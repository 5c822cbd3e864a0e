"""GE converter for npu_attn::npu_grouped_matmul -> GE ``GroupedMatmul``.

Wired as TorchAir 2.13's own converter for torch.ops.npu.npu_grouped_matmul
wires the non-quantised form (torchair/_ge_concrete_graph/ge_converter/custom/
grouped_matmul.py in the torch_npu 2.13.0 wheel; IR in dynamic_output_ops.py):

    GE input / attr        <- argument
    x, weight (dynamic)    <- x, weight
    bias (dynamic)         <- bias, or one empty (0,) tensor: float32 for bfloat16 x, else x's dtype
    scale, offset          <- one empty tensor each (uint64, float32): no quantisation
    antiquant_scale/offset <- one empty float16 tensor each
    group_list             <- group_list (int64)
    per_token_scale        <- unfed
    split_item, group_type (None -> -1), group_list_type, act_type, tuning_config (None -> [0])
                           <- as given; dtype = -1 (output in x's dtype);
    transpose_weight = transpose_x = False

The op refuses every quantised or reinterpreted form (kernels/grouped_matmul.py),
so only this wiring is needed. The GE op has one output per result tensor (one with
split_item 2/3).
"""

from __future__ import annotations

import torch

from ._ge import DataType, Tensor, TensorSpec, ge, register_fx_node_ge_converter


def _empty(dtype: int) -> list[Tensor]:
    """The (0,)-shaped placeholder GE takes for an absent dynamic input."""
    return [ge.Fill([0], ge.Cast(0.0, dst_type=dtype))]


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_grouped_matmul.default)
def convert_grouped_matmul(
    x: list[Tensor], weight: list[Tensor], *, bias: list[Tensor] | None = None, scale=None, offset=None,
    antiquant_scale=None, antiquant_offset=None, per_token_scale=None, group_list: Tensor | None = None,
    activation_input=None, activation_quant_scale=None, activation_quant_offset=None, split_item: int | None = 0,
    group_type: int | None = None, group_list_type: int | None = 0, act_type: int | None = 0,
    tuning_config: list[int] | None = None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
    per_token_scale_dtype=None, meta_outputs: list[TensorSpec] | None = None,
) -> list[Tensor]:
    """npu_attn::npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None,
    Tensor[]? scale=None, Tensor[]? offset=None, Tensor[]? antiquant_scale=None,
    Tensor[]? antiquant_offset=None, Tensor[]? per_token_scale=None, Tensor? group_list=None,
    Tensor[]? activation_input=None, Tensor[]? activation_quant_scale=None,
    Tensor[]? activation_quant_offset=None, int? split_item=0, int? group_type=None,
    int? group_list_type=0, int? act_type=0, int[]? tuning_config=None, int? output_dtype=None,
    int? x_dtype=None, int? weight_dtype=None, int? scale_dtype=None,
    int? per_token_scale_dtype=None) -> Tensor[]

    GE op type: GroupedMatmul (non-quantised; the wiring table is in the module docstring).
    """
    x_type = x[0].dtype
    if not bias:
        bias = _empty(DataType.DT_FLOAT if x_type == DataType.DT_BF16 else x_type)
    return ge.GroupedMatmul(
        list(x), list(weight), list(bias), _empty(DataType.DT_UINT64), _empty(DataType.DT_FLOAT),
        _empty(DataType.DT_FLOAT16), _empty(DataType.DT_FLOAT16), group_list, None,
        split_item=0 if split_item is None else split_item, dtype=-1, transpose_weight=False, transpose_x=False,
        group_type=-1 if group_type is None else group_type,
        group_list_type=0 if group_list_type is None else group_list_type,
        act_type=0 if act_type is None else act_type, tuning_config=list(tuning_config or [0]))
