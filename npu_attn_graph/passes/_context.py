"""What a pass needs to know besides the graph: which graph it is, and what the
rewritten graph is for (run by torch here, or converted into a GE graph)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TARGETS = ("torch", "ge")
FP32_ATTENTION = ("keep", "float16", "bfloat16", "unfused")
SLIDING_WINDOW_CACHE = ("auto", "ring", "shift")


@dataclass
class WindowOrders:
    """What the sliding-window pass leaves for the backend's run-time layout guard
    (ring_layout): the sources of the window inputs a graph reads and writes in ring
    order, and whether it allocates windows and fills them (in eager's order; they
    leave the graph as outputs)."""

    ring: set[str] = field(default_factory=set)
    new_windows: bool = False


@dataclass(frozen=True)
class PassContext:
    graph_name: str  # "inference" / "forward" / "backward"
    # Who consumes the rewritten graph:
    # - "torch": it runs op by op (or through Inductor). KV caches are written with the
    #   in-place fused writers (scatter_update_, npu_scatter_pa_kv_cache) and the graph's
    #   copy_ back into the cache is dropped.
    # - "ge": TorchAir converts it into a GE graph. KV caches are written with the
    #   functional writers and the copy_ back stays: TorchAir turns the pair into one
    #   in-place GE write of the cache input (an in-place op returning an alias could not
    #   be functionalized again on the way). Only ops TorchAir converts are inserted.
    target: str = "torch"
    # What happens to a float32 attention site (the NPU's inference ops take
    # float16/bfloat16 only): "keep" fuses it in float32 (the reference kernels take it),
    # "float16"/"bfloat16" fuse it with casts around the fused op (attention_precision),
    # "unfused" leaves it as plain math.
    fp32_attention: str = "keep"
    # How a full sliding-window cache takes a decode token: "ring" writes slot
    # position mod W in place (sliding_window_ring); "shift" keeps eager's order (the
    # window moves by one slot, a copy of the cache per step); "auto" is ring where the
    # graph can hold it and shift, with the reason, where it cannot (ring_layout keeps
    # the two agreeing at run time).
    sliding_window_cache: str = "auto"
    # dynamo's source name of each graph input ("L['kwargs']['past_key_values'].layers[0].keys"),
    # in placeholder order, where the backend knows them (None for an input without one).
    input_sources: tuple = ()
    # Filled by the sliding-window pass (see WindowOrders).
    window_orders: WindowOrders = field(default_factory=WindowOrders, compare=False)
    # Why ring order must not be chosen by "auto" for this graph (its layout could not
    # be tracked at run time), or None.
    ring_untracked: str | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"PassContext: target must be one of {list(TARGETS)}, got {self.target!r}")
        if self.sliding_window_cache not in SLIDING_WINDOW_CACHE:
            raise ValueError(f"PassContext: sliding_window_cache must be one of {list(SLIDING_WINDOW_CACHE)}, "
                             f"got {self.sliding_window_cache!r}")
        if self.fp32_attention not in FP32_ATTENTION:
            raise ValueError(f"PassContext: fp32_attention must be one of {list(FP32_ATTENTION)}, "
                             f"got {self.fp32_attention!r}")

    @property
    def functional_kv_writes(self) -> bool:
        return self.target == "ge"

    @property
    def functional_scatter_update(self) -> bool:
        """Whether cache writes use scatter_update (functional) rather than scatter_update_."""
        return self.functional_kv_writes

    @property
    def attention_cast_dtype(self) -> torch.dtype | None:
        """The dtype float32 attention is computed in by the fused op, if cast."""
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.fp32_attention)
