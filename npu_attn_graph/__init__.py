"""npu_attn_graph: fused Ascend NPU attention ops and the graph rewrites that target them."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from . import kernels
from .kernels import NpuAttnArgumentError
from .report import Report, Site

# The backend, the exporters and the GE conversion are imported on first use: they
# pull in torch._dynamo, torch._inductor, sympy, TorchAir, onnx and onnxscript,
# which would make ``import npu_attn_graph`` (and ``import npu_attn_graph.ops``)
# several times slower than ``import torch``. torch.compile(backend="npu_attn")
# finds the backend through the torch_dynamo_backends entry point (pyproject), so
# nothing needs importing for that either. tests/test_import_cost.py checks this.
_LAZY = {
    "NpuAttnBackend": "backend", "explain": "backend", "npu_attn_backend": "backend",
    "export": "export",
    "GeConversion": "ge_graph", "to_ge_graph": "ge_graph",
    "export_onnx": "onnx_export", "onnx_translation_table": "onnx_export",
    "SlidingWindowRingError": "passes.sliding_window_ring", "window_in_eager_order": "passes.sliding_window_ring",
    "RingLayoutError": "ring_layout",
}

if TYPE_CHECKING:
    from .backend import NpuAttnBackend, explain, npu_attn_backend
    from .export import export
    from .ge_graph import GeConversion, to_ge_graph
    from .onnx_export import export_onnx, onnx_translation_table
    from .passes.sliding_window_ring import SlidingWindowRingError, window_in_eager_order
    from .ring_layout import RingLayoutError


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # a submodule not imported yet (npu_attn_graph.backend.BackendOptions)
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule npu_attn_graph.export binds it as this package's
        # attribute "export", which is the function of that name: keep the function.
        if name == "export" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["kernels", "GeConversion", "NpuAttnArgumentError", "NpuAttnBackend", "Report", "Site", "explain",
           "export", "export_onnx", "npu_attn_backend", "onnx_translation_table", "RingLayoutError",
           "SlidingWindowRingError", "to_ge_graph", "window_in_eager_order"]
__version__ = "0.1.0"
