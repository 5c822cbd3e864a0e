"""Tensor parallelism with torch.distributed's DTensor, the plan transformers declares.

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world_size,))
    npu_attn_graph.tensor_parallel.parallelize(model, mesh)
    model.forward = torch.compile(model.forward, backend="npu_attn")

Each rank then holds its slice of the attention heads and of the MLP; the backend
fuses each rank's attention with the local head counts (the model infers them from
its projections' local widths), and the slices meet in ``_c10d_functional``
collectives that stay in the graph (TorchAir converts them to HcomAllReduce /
HcomAllGather). Nothing here is specific to the NPU: it is torch's own
``parallelize_module`` with the styles transformers names in ``base_model_tp_plan``
and ``_tp_plan``.
"""

from __future__ import annotations

import fnmatch

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

# transformers' style names -> torch's styles (transformers implements the same split itself).
STYLES = {
    "colwise": lambda: ColwiseParallel(),
    "rowwise": lambda: RowwiseParallel(),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
}


def transformers_tp_plan(model: torch.nn.Module, lm_head: bool = True) -> dict[str, ParallelStyle]:
    """The module-name -> style plan of a transformers causal LM: its config's
    ``base_model_tp_plan`` (under the base model's prefix) and, with lm_head, the
    model's ``_tp_plan`` entry for lm_head (Llama: column-parallel, output gathered)."""
    config = getattr(model, "config", None)
    base = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not base:
        raise ValueError(f"tensor_parallel: {type(model).__name__} has no config.base_model_tp_plan; "
                         "give parallelize() a plan")
    prefix = getattr(model, "base_model_prefix", "")
    plan = {f"{prefix}.{k}" if prefix and hasattr(model, prefix) else k: v for k, v in base.items()}
    own = getattr(model, "_tp_plan", None) or {}
    if lm_head and "lm_head" in own:  # (transformers 5 also lists the base model's entries there, some not ours)
        plan["lm_head"] = own["lm_head"]
    names = [name for name, _ in model.named_modules()]
    styles: dict[str, ParallelStyle] = {}
    for pattern, style in plan.items():
        if style not in STYLES:
            raise ValueError(f"tensor_parallel: plan entry {pattern!r} has style {style!r}; "
                             f"supported styles are {sorted(STYLES)}")
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ValueError(f"tensor_parallel: plan entry {pattern!r} matches no module of {type(model).__name__}")
        styles.update({name: STYLES[style]() for name in matched})
    return styles


def parallelize(model: torch.nn.Module, mesh: DeviceMesh,
                plan: dict[str, ParallelStyle] | None = None) -> torch.nn.Module:
    """Split `model` over the 1-D `mesh` in place with torch's ``parallelize_module``
    (default plan: :func:`transformers_tp_plan`). The attention and KV-head counts must
    divide by the mesh size: each rank must hold whole heads."""
    if mesh.ndim != 1:
        raise ValueError(f"tensor_parallel: mesh must be 1-D, got a {mesh.ndim}-D mesh of shape {tuple(mesh.shape)}")
    world = mesh.size()
    config = getattr(model, "config", None)
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, field, None)
        if heads is not None and heads % world:
            raise ValueError(f"tensor_parallel: config.{field} = {heads} must be divisible by the mesh size "
                             f"{world} (each rank holds whole heads)")
    return parallelize_module(model, mesh, plan if plan is not None else transformers_tp_plan(model))


__all__ = ["STYLES", "parallelize", "transformers_tp_plan"]
