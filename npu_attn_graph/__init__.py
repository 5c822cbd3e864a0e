"""npu_attn_graph: fused Ascend NPU attention ops and the graph rewrites that target them."""

from . import kernels
from .kernels import NpuAttnArgumentError

__all__ = ["kernels", "NpuAttnArgumentError"]
__version__ = "0.1.0"
