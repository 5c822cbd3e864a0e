"""npu_attn_graph in torch's own logging.

- ``TORCH_LOGS="npu_attn"`` (INFO) or ``"+npu_attn"`` (DEBUG), or
  ``torch._logging.set_logs(npu_attn=logging.INFO)``: every attention and
  KV-cache site the passes matched and what became of it (fused op, or the
  reason it was left alone), and TorchAir's unconverted nodes; DEBUG adds the
  per-pass timings. (The top-level module ``npu_attn`` exists so that torch
  accepts the name when it reads TORCH_LOGS at import.)
- the artifact ``npu_attn_graphs`` (``torch._logging.set_logs(npu_attn_graphs=True)``):
  each ATen graph's code before and after the passes. torch validates
  TORCH_LOGS before any package can register an artifact, so this one is
  switched on from Python.
"""

from __future__ import annotations

import logging

import torch._logging
from torch._logging import _internal

LOG_SETTING = "npu_attn"
GRAPHS_ARTIFACT = "npu_attn_graphs"

if not _internal.log_registry.is_log(LOG_SETTING):  # TORCH_LOGS may have registered it already
    _internal.register_log(LOG_SETTING, "npu_attn")
if not _internal.log_registry.is_artifact(GRAPHS_ARTIFACT):
    _internal.register_artifact(GRAPHS_ARTIFACT, "ATen graph code before and after the npu_attn passes",
                                off_by_default=True)

log = logging.getLogger("npu_attn")
graphs_log = torch._logging.getArtifactLogger("npu_attn", GRAPHS_ARTIFACT)
