"""FX graph passes of the npu_attn backend: one module per rewrite.

Each pass takes a post-AOT (functionalized ATen) GraphModule, rewrites it in
place and records every site it looked at in the Report.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..report import Report
from ._context import PassContext
from .attention_layout import attention_layout
from .attention_precision import attention_precision
from .eager_attention_to_fused import eager_attention_to_fused
from .gqa_repeat_kv import gqa_repeat_kv
from .paged_cache_update import paged_cache_update
from .sdpa_to_fused import sdpa_to_fused
from .static_cache_update import static_cache_update

GraphPass = Callable[[torch.fx.GraphModule, Report, PassContext], None]

# In the order they run.
PASSES: dict[str, GraphPass] = {
    "sdpa_to_fused": sdpa_to_fused,
    "eager_attention_to_fused": eager_attention_to_fused,
    "gqa_repeat_kv": gqa_repeat_kv,
    "static_cache_update": static_cache_update,
    "paged_cache_update": paged_cache_update,
    "attention_layout": attention_layout,
    "attention_precision": attention_precision,
}


def run_passes(gm: torch.fx.GraphModule, names: list[str], report: Report, ctx: PassContext) -> None:
    for name in names:
        start = time.perf_counter()
        PASSES[name](gm, report, ctx)
        report.pass_seconds[name] = report.pass_seconds.get(name, 0.0) + time.perf_counter() - start


__all__ = ["PASSES", "GraphPass", "PassContext", "run_passes"]
