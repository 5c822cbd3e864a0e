"""Drop-in Python API mirroring torch_npu's fused attention and KV-cache ops.

Code written against torch_npu runs on CPU (or CUDA) by changing one import::

    import npu_attn_graph.ops as torch_npu

    out = torch_npu.npu_incre_flash_attention(q, k, v, num_heads=8, input_layout="BNSD")

Every function has torch_npu's name and signature and calls the matching
``torch.ops.npu_attn`` op, whose kernel is the device-generic reference off
the NPU and torch_npu itself on an Ascend host. The functions are generated from
the registered schemas (kernels/_dropin.py), so each signature is written once,
in its kernel module's ``define`` call. ``custom`` holds the seeds'
``custom.*`` forms (e.g. ``custom.npu_sparse_flash_attention`` of seed 004),
thin wrappers over the same ops.
"""

from .kernels.advance_step_flashattn import npu_advance_step_flashattn
from .kernels.fusion_attention import npu_fusion_attention
from .kernels.fusion_attention_grad import npu_fusion_attention_grad
from .kernels.fused_infer_attention_score import npu_fused_infer_attention_score
from .kernels.fused_infer_attention_score_v2 import npu_fused_infer_attention_score_v2
from .kernels.grouped_matmul import npu_grouped_matmul
from .kernels.incre_flash_attention import npu_incre_flash_attention
from .kernels.moe_compute_expert_tokens import npu_moe_compute_expert_tokens
from .kernels.moe_gating_top_k_softmax_v2 import npu_moe_gating_top_k_softmax_v2
from .kernels.nsa_compress_attention_infer import npu_nsa_compress_attention_infer
from .kernels.prompt_flash_attention import npu_prompt_flash_attention
from .kernels.scatter_nd_update import npu_scatter_nd_update, npu_scatter_nd_update_
from .kernels.scatter_pa_kv_cache import npu_scatter_pa_kv_cache, npu_scatter_pa_kv_cache_functional
from .kernels.scatter_update import scatter_update, scatter_update_
from .kernels.sparse_flash_attention import npu_sparse_flash_attention
# The seeds' custom.* forms (ops.custom.npu_sparse_flash_attention). Not in __all__,
# which lists torch_npu 2.13 ops only (tests/test_schemas.py checks each against it).
from . import custom  # noqa: E402,F401

__all__ = [
    "npu_advance_step_flashattn",
    "npu_fused_infer_attention_score",
    "npu_fused_infer_attention_score_v2",
    "npu_fusion_attention",
    "npu_fusion_attention_grad",
    "npu_grouped_matmul",
    "npu_incre_flash_attention",
    "npu_moe_compute_expert_tokens",
    "npu_moe_gating_top_k_softmax_v2",
    "npu_nsa_compress_attention_infer",
    "npu_prompt_flash_attention",
    "npu_scatter_nd_update",
    "npu_scatter_nd_update_",
    "npu_scatter_pa_kv_cache",
    "npu_scatter_pa_kv_cache_functional",
    "npu_sparse_flash_attention",
    "scatter_update",
    "scatter_update_",
]
