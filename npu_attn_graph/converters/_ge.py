"""What the converters use from TorchAir, in one place."""

from __future__ import annotations

from typing import Sequence

from torchair import register_fx_node_ge_converter
from torchair._ge_concrete_graph import ge_apis as ge  # TorchAir's generated GE op builders
from torchair._ge_concrete_graph.utils import dtype_promote
from torchair.ge import DataType, Tensor, TensorSpec, attr, custom_op
from torchair.ge._ge_graph import dont_prune_me

from ..kernels._library import INT64_MAX, INT_MAX

# The GE IR of each op type the converters build with custom_op, in the format of
# TorchAir's get_registered_ir_def: op type -> ([(input, "required"|"optional"|"dynamic")],
# [(output, "required"|"dynamic")], [(attr, type)]). TorchAir defines no such registry of
# its own: on an NPU host CANN's op registry holds these; offline, TorchAir's stand-in
# native module (_torchair_offline_native) answers from this table.
GE_IR: dict[str, tuple[list, list, list]] = {}


def register_ir(op_type: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
                attrs: list[tuple[str, str]]) -> None:
    """Declare the GE IR a converter builds op_type with (see GE_IR)."""
    GE_IR[op_type] = (list(inputs), list(outputs), list(attrs))


def int_list_input(value: Sequence[int] | Tensor | None, dtype: int = DataType.DT_INT64) -> Tensor | None:
    """An ``int[]?`` / ``SymInt[]?`` argument as the GE tensor input the NPU op takes.

    TorchAir hands a list of plain ints over as a list and a list holding
    symbols as a GE tensor already."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value if value.dtype == dtype else ge.Cast(value, dst_type=dtype)
    return ge.Const(list(value), dtype=dtype)


__all__ = ["DataType", "GE_IR", "INT64_MAX", "INT_MAX", "Tensor", "TensorSpec", "attr", "custom_op", "dont_prune_me",
           "dtype_promote", "ge", "int_list_input", "register_fx_node_ge_converter", "register_ir"]
