"""What a pass needs to know besides the graph: which graph it is, and what the
rewritten graph is for (run op by op here, or converted into a GE graph)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_WRITES = ("in_place", "functional")
FP32_ATTENTION = ("keep", "float16", "bfloat16", "unfused")


@dataclass(frozen=True)
class PassContext:
    graph_name: str  # "inference" / "forward" / "backward"
    # How the KV-cache passes write caches:
    # - "in_place": the in-place fused writers (scatter_update_, npu_scatter_pa_kv_cache),
    #   and the graph's copy_ back into the cache is dropped. Right for running the graph.
    # - "functional": the functional writers, and the graph's copy_ back stays. Right for
    #   TorchAir, which turns writer + copy_ into one in-place GE write of the cache input
    #   (an in-place op returning an alias cannot be re-functionalized on the way there).
    kv_writes: str = "in_place"
    # What happens to a float32 attention site (GE graphs: the NPU inference ops take
    # float16/bfloat16 only): "keep" fuses it in float32 (the reference kernels take it),
    # "float16"/"bfloat16" fuse it with casts around the fused op (attention_precision),
    # "unfused" leaves it as plain math.
    fp32_attention: str = "keep"

    def __post_init__(self) -> None:
        if self.kv_writes not in KV_WRITES:
            raise ValueError(f"PassContext: kv_writes must be one of {list(KV_WRITES)}, got {self.kv_writes!r}")
        if self.fp32_attention not in FP32_ATTENTION:
            raise ValueError(f"PassContext: fp32_attention must be one of {list(FP32_ATTENTION)}, "
                             f"got {self.fp32_attention!r}")

    @property
    def attention_cast_dtype(self) -> torch.dtype | None:
        """The dtype float32 attention is computed in by the fused op, if cast."""
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.fp32_attention)
