"""The ``npu_attn`` torch.library namespace shared by every op module.

Each op module defines its schema here with the exact torch_npu 2.13.0 text, so
lowering to real torch_npu is a namespace swap (``npu_attn`` -> ``npu``).
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

NAMESPACE = "npu_attn"

# One DEF library for the whole namespace; op modules add to it on import.
LIB = torch.library.Library(NAMESPACE, "DEF")

# Chunk budget of the reference kernels: each query chunk's fp32 score block
# (and each gathered block of a paged cache) stays under this many bytes, so
# extra memory is O(chunk x S_kv). Read at call time; tests shrink it to force
# many chunks.
SCORE_BLOCK_BYTES = 16 * 1024 * 1024


class NpuAttnArgumentError(ValueError):
    """A documented constraint of an op does not hold for the given arguments.

    The message always names the op, the argument, the rule and the value.
    """


def fail(op: str, argument: str, rule: str, value: object) -> None:
    raise NpuAttnArgumentError(f"{op}: {argument} {rule}, got {value}")


def check(condition: bool, op: str, argument: str, rule: str, value: object) -> None:
    """Raise NpuAttnArgumentError(op: argument rule, got value) unless condition."""
    if not condition:
        fail(op, argument, rule, value)


def define(name: str, schema: str) -> str:
    """Define ``npu_attn::<name>`` from the schema text after the op name."""
    LIB.define(name + schema)
    return f"{NAMESPACE}::{name}"


def torch_npu_available() -> bool:
    """True when torch_npu can be imported (an Ascend host with CANN)."""
    return importlib.util.find_spec("torch_npu") is not None


def register_reference(qualname: str, fn: Callable) -> None:
    """Register the device-generic reference kernel for every backend.

    CompositeExplicitAutograd covers CPU, CUDA and Meta-less backends alike; a
    backend-specific kernel (PrivateUse1 on an NPU host) takes precedence.
    """
    LIB.impl(qualname.split("::")[1], fn, "CompositeExplicitAutograd")


def register_npu(qualname: str, fn: Callable) -> None:
    """Register the PrivateUse1 (Ascend) kernel when torch_npu is importable."""
    if torch_npu_available():
        LIB.impl(qualname.split("::")[1], fn, "PrivateUse1")
