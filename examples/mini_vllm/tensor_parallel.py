"""vLLM-style tensor parallelism for the mini-vLLM model: column- and row-parallel
linears written by hand, the partial sums added with a functional all_reduce.

    model = shard(PagedCausalLM.from_hf(hf), rank, world_size, group)
    engine = LLMEngine(model, ...)   # on every rank; its caches hold the rank's KV heads

Per rank: q/k/v and gate/up keep a contiguous slice of their output rows (whole heads
of q and of k/v, so rank r holds query heads r*H/W.. and KV heads r*Hkv/W..: the GQA
groups stay together); o_proj and down_proj keep the matching slice of their input
columns and sum the partial results over the group (``_c10d_functional.all_reduce``
in the compiled graph, HcomAllReduce in the GE graph). Embedding, norms and lm_head are
replicated, so the logits, and therefore the sampled tokens, are the same on every rank.
The model's config is replaced by the local one (heads / W, KV heads / W), so the
engine allocates each rank's paged caches with the local KV heads.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from .model import PagedCausalLM


class ColumnParallelLinear(nn.Module):
    """Rows [rank * n, (rank + 1) * n) of a Linear's output; no communication."""

    def __init__(self, linear: nn.Linear, rank: int, world_size: int):
        super().__init__()
        n = linear.out_features // world_size
        self.weight = nn.Parameter(linear.weight.detach()[rank * n:(rank + 1) * n].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach()[rank * n:(rank + 1) * n].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Columns [rank * n, (rank + 1) * n) of a Linear's input; the partial products summed
    over `group` (every rank gets the full output)."""

    def __init__(self, linear: nn.Linear, rank: int, world_size: int, group: dist.ProcessGroup):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("RowParallelLinear: a bias would be added once per rank; mini_vllm's o_proj and "
                             "down_proj have none")
        n = linear.in_features // world_size
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * n:(rank + 1) * n].clone())
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(F.linear(x, self.weight), "sum", self.group)


def shard(model: PagedCausalLM, rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> PagedCausalLM:
    """Turn `model` (every rank holding the same full weights) into rank `rank`'s shard, in place."""
    cfg = model.config
    for name, value in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                        ("intermediate_size", cfg.intermediate_size)):
        if value % world_size:
            raise ValueError(f"mini_vllm tensor parallel: {name} = {value} must be divisible by world_size = "
                             f"{world_size} (vLLM would replicate KV heads; this engine does not)")
    if not 0 <= rank < world_size:
        raise ValueError(f"mini_vllm tensor parallel: rank = {rank} must be in [0, {world_size})")
    group = group if group is not None else dist.group.WORLD
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name), rank, world_size))
        attn.o_proj = RowParallelLinear(attn.o_proj, rank, world_size, group)
        attn.heads, attn.kv_heads = cfg.num_heads // world_size, cfg.num_kv_heads // world_size
        mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, rank, world_size)
        mlp.up_proj = ColumnParallelLinear(mlp.up_proj, rank, world_size)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, rank, world_size, group)
    model.config = dataclasses.replace(cfg, num_heads=cfg.num_heads // world_size,
                                       num_kv_heads=cfg.num_kv_heads // world_size,
                                       intermediate_size=cfg.intermediate_size // world_size)
    return model


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "shard"]
