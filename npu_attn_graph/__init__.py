"""npu_attn_graph: fused Ascend NPU attention ops and the graph rewrites that target them."""

from . import kernels
from .backend import NpuAttnBackend, explain, npu_attn_backend
from .export import export
from .ge_graph import GeConversion, to_ge_graph
from .kernels import NpuAttnArgumentError
from .onnx_export import export_onnx, onnx_translation_table  # onnx/onnxscript imported on first use
from .report import Report, Site

__all__ = ["kernels", "GeConversion", "NpuAttnArgumentError", "NpuAttnBackend", "Report", "Site", "explain",
           "export", "export_onnx", "npu_attn_backend", "onnx_translation_table", "to_ge_graph"]
__version__ = "0.1.0"
