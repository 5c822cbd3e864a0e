"""GE converter for ``torch.sym_max`` -> GE ``Maximum``.

transformers' StaticSlidingWindowLayer.get_mask_sizes computes
``max(cumulative_length_int - W + 1, 0)`` (the first key position the mask covers).
When the layer's token count is a symbolic graph input (a ring-buffer decode step,
see passes/sliding_window_ring.py) that is a ``torch.sym_max`` node, and TorchAir 2.13
registers no converter for it, so the step did not become a GE graph. A SymInt
reaches a converter as a 0-d int GE tensor (TorchAir's own ``operator.add`` converter
handles them the same way)::

    REG_OP(Maximum) .INPUT(x1) .INPUT(x2) .OUTPUT(y)        y = max(x1, x2), broadcast
"""

from __future__ import annotations

import torch
from ._ge import Tensor, TensorSpec, dtype_promote, ge, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.sym_max)
def convert_sym_max(a: int | Tensor, b: int | Tensor, meta_outputs: TensorSpec | None = None) -> int | Tensor:
    """torch.sym_max(SymInt a, SymInt b) -> SymInt

    GE: Maximum(a, b) in the output's dtype; two plain ints stay an int.
    """
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        return max(a, b)
    assert meta_outputs is not None  # TorchAir passes the node's output spec
    a, b = dtype_promote(a, b, target_dtype=meta_outputs.dtype)
    return ge.Maximum(a, b)
