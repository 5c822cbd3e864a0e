"""``npu_grouped_matmul``: several matmuls in one op, the MoE experts' matmul.

Schema: torch_npu 2.13.0's (namespace ``npu_attn``; the wheel's
torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml, the Tensor group_list overload),
written once, in the ``define`` call below; the drop-in function's docstring shows it.

Semantics (torch_npu docs of npu_grouped_matmul; CANN's GroupedMatmul IR):
group i computes ``y_i = x_i @ weight_i (+ bias_i)``.

- Without group_list: x and weight are lists of the same length G, one tensor
  per group (x_i 2-D, or up to 6-D with split_item 0: rows are its leading
  dims); split_item 0/1 returns G tensors, 2/3 one tensor, the groups' rows
  concatenated.
- With group_list (group_type 0, "split the M axis"): x is one (M, K) tensor
  whose rows are grouped in order; weight is G (K, N) tensors or one (G, K, N)
  tensor; group_list (G,) int64 gives each group's rows as cumulative ends
  (group_list_type 0) or counts (1). Implemented: split_item 2/3 (one (M, N)
  output); 0/1 would give per-group outputs whose shapes depend on values.
  Rows past the last group's end are not computed on the NPU (left unwritten);
  the reference writes zeros there.

Arguments without reference semantics are refused unless at their defaults:
the quantisation inputs (scale, offset, antiquant_*, per_token_scale,
activation_*), output_dtype, act_type (fused activation), the *_dtype
reinterpretations, and group_type 2 (split K). bias is taken with per-group
2-D weights (bias_i (N_i,)). Dtypes: x float16, bfloat16 or float32 (Atlas
A2/A3), weight the same dtype; bias float16 with float16 x, float32 with
bfloat16 or float32 x; float64 off the NPU (reference tests). The fake
enforces the shapes and dtypes; the reference also checks group_list's values
(non-decreasing ends / non-negative counts, total at most M), which the NPU
does not.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._dropin import dropin
from ._library import check, define, fail, npu_rules_apply, register_fake, register_npu, register_reference

__all__ = ["npu_grouped_matmul"]

OP = "npu_grouped_matmul"
SCHEMA = ("(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, Tensor[]? offset=None, "
          "Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, Tensor[]? per_token_scale=None, "
          "Tensor? group_list=None, Tensor[]? activation_input=None, Tensor[]? activation_quant_scale=None, "
          "Tensor[]? activation_quant_offset=None, int? split_item=0, int? group_type=None, "
          "int? group_list_type=0, int? act_type=0, int[]? tuning_config=None, int? output_dtype=None, "
          "int? x_dtype=None, int? weight_dtype=None, int? scale_dtype=None, "
          "int? per_token_scale_dtype=None) -> Tensor[]")

_NPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BIAS_DTYPE = {torch.float16: torch.float16, torch.bfloat16: torch.float32, torch.float32: torch.float32,
               torch.float64: torch.float64}
MAX_GROUPS = 128  # the documented longest tensor list (and group count)


def _empty(tensors: Sequence[torch.Tensor] | None) -> bool:
    return tensors is None or len(tensors) == 0


def _validate(x, weight, bias, unsupported: dict, group_list, split_item, group_type, group_list_type,
              act_type) -> list[tuple[int, ...]]:
    """The documented rules this implementation covers; returns the output shapes."""
    for name, value in unsupported.items():
        check(value is None or (isinstance(value, (list, tuple)) and len(value) == 0), OP, name,
              "has no reference semantics here (quantised / reinterpreted grouped matmul); must be None", value)
    check(act_type in (None, 0), OP, "act_type", "must be 0 (no fused activation is implemented)", act_type)
    split_item = 0 if split_item is None else split_item
    check(split_item in (0, 1, 2, 3), OP, "split_item", "must be 0, 1, 2 or 3", split_item)
    check(group_list_type in (None, 0, 1), OP, "group_list_type", "must be 0 (cumulative ends) or 1 (counts)",
          group_list_type)
    check(1 <= len(x) <= MAX_GROUPS, OP, "len(x)", f"must be in [1, {MAX_GROUPS}]", len(x))
    check(1 <= len(weight) <= MAX_GROUPS, OP, "len(weight)", f"must be in [1, {MAX_GROUPS}]", len(weight))
    dtype = x[0].dtype
    allowed = _NPU_DTYPES if npu_rules_apply(x[0]) else _NPU_DTYPES + (torch.float64,)
    check(dtype in allowed, OP, "x[0].dtype", f"must be one of {list(allowed)}", dtype)
    for i, t in enumerate(x):
        check(t.dtype == dtype, OP, f"x[{i}].dtype", f"must equal x[0].dtype ({dtype})", t.dtype)
    for i, w in enumerate(weight):
        check(w.dtype == dtype, OP, f"weight[{i}].dtype", f"must equal x's dtype ({dtype})", w.dtype)

    if group_list is None:
        check(group_type in (None, -1), OP, "group_type", "must be None or -1 without group_list", group_type)
        check(len(x) == len(weight), OP, "len(x)", f"must equal len(weight) ({len(weight)}) without group_list",
              len(x))
        groups = [(t, w) for t, w in zip(x, weight)]
        for i, (t, w) in enumerate(groups):
            low, high = (2, 6) if split_item == 0 else (2, 2)
            check(low <= t.dim() <= high, OP, f"x[{i}].dim()", f"must be in [{low}, {high}] with split_item "
                  f"{split_item}", t.dim())
            check(w.dim() == 2, OP, f"weight[{i}].dim()", "must be 2 (one (K, N) matrix per group)", w.dim())
            check(t.shape[-1] == w.shape[0], OP, f"weight[{i}].shape[0]", f"must equal x[{i}].shape[-1] "
                  f"({t.shape[-1]})", w.shape[0])
        shapes = [tuple(t.shape[:-1]) + (w.shape[1],) for t, w in groups]
        widths = [w.shape[1] for w in weight]
    else:
        check(group_type == 0, OP, "group_type", "must be 0 (groups split x's rows) with group_list; "
              "other groupings are not implemented", group_type)
        check(split_item in (2, 3), OP, "split_item", "must be 2 or 3 (one output tensor) with group_list: "
              "per-group outputs have value-dependent shapes", split_item)
        check(len(x) == 1, OP, "len(x)", "must be 1 (one (M, K) tensor) with group_list", len(x))
        check(x[0].dim() == 2, OP, "x[0].dim()", "must be 2 with group_list", x[0].dim())
        check(group_list.dim() == 1, OP, "group_list.dim()", "must be 1", group_list.dim())
        check(group_list.dtype == torch.int64, OP, "group_list.dtype", "must be torch.int64", group_list.dtype)
        if len(weight) == 1 and weight[0].dim() == 3:
            count, k, n = weight[0].shape
            check(_empty(bias), OP, "bias", "is implemented with per-group 2-D weights only", bias)
            widths = [n] * count
        else:
            for i, w in enumerate(weight):
                check(w.dim() == 2, OP, f"weight[{i}].dim()", "must be 2, or weight one 3-D (G, K, N) tensor",
                      w.dim())
            count, k = len(weight), weight[0].shape[0]
            widths = [w.shape[1] for w in weight]
            for i, w in enumerate(weight):
                check(w.shape == weight[0].shape, OP, f"weight[{i}].shape",
                      f"must equal weight[0].shape ({list(weight[0].shape)}): one output tensor", list(w.shape))
        check(count <= MAX_GROUPS, OP, "number of groups", f"must be at most {MAX_GROUPS}", count)
        check(group_list.shape[0] == count, OP, "group_list.shape[0]", f"must equal the number of groups "
              f"({count})", group_list.shape[0])
        check(x[0].shape[1] == k, OP, "weight K", f"must equal x[0].shape[1] ({x[0].shape[1]})", k)
        shapes = [(x[0].shape[0], widths[0])]
    if split_item in (2, 3) and group_list is None:
        check(all(t.dim() == 2 for t in x) and len(set(widths)) == 1, OP, "weight N",
              "must be the same for every group with one output tensor", widths)
        shapes = [(sum(t.shape[0] for t in x), widths[0])]

    if not _empty(bias):
        check(len(bias) == len(weight), OP, "len(bias)", f"must equal len(weight) ({len(weight)})", len(bias))
        want = _BIAS_DTYPE[dtype]
        for i, (b, n) in enumerate(zip(bias, widths)):
            check(b.dtype == want, OP, f"bias[{i}].dtype", f"must be {want} with {dtype} x", b.dtype)
            check(list(b.shape) == [n], OP, f"bias[{i}].shape", f"must be [{n}] (the group's N)", list(b.shape))
    return shapes


def _unsupported(scale, offset, antiquant_scale, antiquant_offset, per_token_scale, activation_input,
                 activation_quant_scale, activation_quant_offset, output_dtype, x_dtype, weight_dtype,
                 scale_dtype, per_token_scale_dtype) -> dict:
    return dict(scale=scale, offset=offset, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                per_token_scale=per_token_scale, activation_input=activation_input,
                activation_quant_scale=activation_quant_scale, activation_quant_offset=activation_quant_offset,
                output_dtype=output_dtype, x_dtype=x_dtype, weight_dtype=weight_dtype, scale_dtype=scale_dtype,
                per_token_scale_dtype=per_token_scale_dtype)


NPU_GROUPED_MATMUL = define(OP, SCHEMA)


@register_fake(NPU_GROUPED_MATMUL)
def _fake(x, weight, *, bias, scale, offset, antiquant_scale, antiquant_offset,
          per_token_scale, group_list, activation_input, activation_quant_scale,
          activation_quant_offset, split_item, group_type, group_list_type, act_type,
          tuning_config, output_dtype, x_dtype, weight_dtype, scale_dtype,
          per_token_scale_dtype):
    shapes = _validate(x, weight, bias, _unsupported(
        scale, offset, antiquant_scale, antiquant_offset, per_token_scale, activation_input, activation_quant_scale,
        activation_quant_offset, output_dtype, x_dtype, weight_dtype, scale_dtype, per_token_scale_dtype),
        group_list, split_item, group_type, group_list_type, act_type)
    return [x[0].new_empty(shape) for shape in shapes]


def _matmul(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """One group; half precision accumulates in float32, as the NPU's cube unit does."""
    if a.dtype in (torch.float16, torch.bfloat16):
        out = a.float() @ w.float()
        return (out + b.float() if b is not None else out).to(a.dtype)
    out = a @ w
    return out + b if b is not None else out


def _group_ends(group_list: torch.Tensor, group_list_type: int, rows: int) -> list[int]:
    values = [int(v) for v in group_list.tolist()]
    if group_list_type == 1:
        if any(v < 0 for v in values):
            fail(OP, "group_list", "must hold non-negative counts (group_list_type 1)", values)
        ends, total = [], 0
        for v in values:
            total += v
            ends.append(total)
    else:
        if any(b < a for a, b in zip([0] + values, values)):
            fail(OP, "group_list", "must hold non-decreasing, non-negative row ends (group_list_type 0)", values)
        ends = values
    if ends and ends[-1] > rows:
        fail(OP, "group_list", f"must cover at most x's {rows} rows", values)
    return ends


def _ref(x, weight, *, bias, scale, offset, antiquant_scale, antiquant_offset,
         per_token_scale, group_list, activation_input, activation_quant_scale,
         activation_quant_offset, split_item, group_type, group_list_type, act_type,
         tuning_config, output_dtype, x_dtype, weight_dtype, scale_dtype,
         per_token_scale_dtype):
    _validate(x, weight, bias, _unsupported(
        scale, offset, antiquant_scale, antiquant_offset, per_token_scale, activation_input, activation_quant_scale,
        activation_quant_offset, output_dtype, x_dtype, weight_dtype, scale_dtype, per_token_scale_dtype),
        group_list, split_item, group_type, group_list_type, act_type)
    mats = list(weight[0].unbind(0)) if len(weight) == 1 and weight[0].dim() == 3 else list(weight)
    biases = list(bias) if not _empty(bias) else [None] * len(mats)  # one per group
    if group_list is None:
        outs = [_matmul(t, w, b) for t, w, b in zip(x, mats, biases)]
        return [torch.cat(outs, 0)] if split_item in (2, 3) else outs
    rows = x[0].shape[0]
    out = x[0].new_zeros(rows, mats[0].shape[1])
    start = 0
    for end, w, b in zip(_group_ends(group_list, group_list_type or 0, rows), mats, biases):
        if end > start:
            out[start:end] = _matmul(x[0][start:end], w, b)
        start = end
    return [out]


register_reference(NPU_GROUPED_MATMUL, _ref)
register_npu(NPU_GROUPED_MATMUL)


npu_grouped_matmul = dropin(NPU_GROUPED_MATMUL, __name__, """\
torch_npu.npu_grouped_matmul (the Tensor group_list overload): ``y_i = x_i @ weight_i
(+ bias_i)`` per group. With group_list (group_type 0, split_item 2/3) x is one (M, K)
tensor whose rows are split in order into the groups (group_list: cumulative ends, or
counts with group_list_type 1) and the result is one (M, N) tensor. Non-quantised
float16/bfloat16/float32 only; the rules are in the module docstring.""")
