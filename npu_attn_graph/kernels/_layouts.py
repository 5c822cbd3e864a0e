"""Query/key/value layouts of the NPU attention ops, and conversion to BNSD.

B batch, S sequence, N heads, D head dim, H = N * D, T = total tokens (TND).
Shared by the inference, training and packed attention kernels.
Composite layouts such as "BNSD_BSND" name the input and the output layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from ._library import check, fail


@dataclass(frozen=True)
class Layout:
    """An op's input_layout: how query/key/value are laid out and how the output is."""

    inputs: str
    output: str


@functools.lru_cache(maxsize=None)  # a few layouts, parsed on every call of every layer otherwise
def parse_layout(op: str, input_layout: str, allowed: tuple[str, ...]) -> Layout:
    check(input_layout in allowed, op, "input_layout", f"must be one of {list(allowed)}", repr(input_layout))
    if "_" in input_layout:
        inputs, output = input_layout.split("_")
        return Layout(inputs, output)
    return Layout(input_layout, input_layout)


def layout_rank(layout: str) -> int:
    return {"BSH": 3, "TND": 3, "BSND": 4, "BNSD": 4}[layout]


def heads_and_dim(op: str, name: str, shape: Sequence[int], layout: str, heads: int) -> tuple[int, int]:
    """(N, D) of a query/key/value tensor of `shape` in `layout`, given N for BSH."""
    check(len(shape) == layout_rank(layout), op, f"{name}.dim()",
          f"must be {layout_rank(layout)} for input_layout {layout}", len(shape))
    if layout == "BSH":
        check(shape[2] % heads == 0, op, f"{name} hidden size H (dim 2)",
              f"must be divisible by its head count {heads}", shape[2])
        return heads, shape[2] // heads
    if layout == "BSND":
        return shape[2], shape[3]
    if layout == "BNSD":
        return shape[1], shape[3]
    return shape[1], shape[2]  # TND


def batch_and_seq(shape: Sequence[int], layout: str) -> tuple[int, int]:
    """(B, S) of a dense-layout tensor."""
    if layout == "BNSD":
        return shape[0], shape[2]
    return shape[0], shape[1]


def to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """A BSH/SBH/BSND/BNSD tensor as (B, N, S, D): a view when the strides allow (always for
    contiguous inputs), else a copy."""
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, heads, h // heads).transpose(1, 2)
    if layout == "SBH":
        s, b, h = x.shape
        return x.reshape(s, b, heads, h // heads).permute(1, 2, 0, 3)
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BNSD":
        return x
    fail("npu_attn", "input_layout", "is not a dense layout", layout)
    raise AssertionError  # unreachable


def from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, S, D) -> a contiguous tensor in the (dense) output layout."""
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.transpose(1, 2).reshape(b, s, n * d)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    return x.contiguous()


def output_shape(
    query_shape: Sequence[int], layout: Layout, heads: int, value_dim: int
) -> list[int]:
    """Output shape: the query's, with the value head dim, in the output layout."""
    if layout.inputs == "TND":
        t, n, _ = query_shape
        return [t, n, value_dim]
    if layout.inputs == "BSH":
        b, s, _ = query_shape
        return [b, s, heads * value_dim]
    if layout.inputs == "BSND":
        b, s, n, _ = query_shape
    else:
        b, n, s, _ = query_shape
    if layout.output == "BSND":
        return [b, s, n, value_dim]
    if layout.output == "BSH":
        return [b, s, n * value_dim]
    return [b, n, s, value_dim]


def check_cumulative(op: str, name: str, values: Sequence[int], total: object,
                     where: str = "input_layout TND") -> None:
    """Cumulative lengths [l0, l0+l1, ...] of a packed layout: not empty, non-decreasing
    from 0, the last entry the token count."""
    check(len(values) > 0, op, name, f"must not be empty for {where}", list(values))
    prev = 0
    for x in values:
        check(x >= prev, op, name, f"must be cumulative (non-decreasing, >= 0) for {where}", list(values))
        prev = x
    check(values[-1] == total, op, name, f"last entry must equal the token count T={total}", values[-1])


def segments(cumulative: Sequence[int]) -> list[tuple[int, int]]:
    """Cumulative lengths [l0, l0+l1, ...] -> [(start, end), ...]."""
    bounds = [0, *cumulative]
    return [(bounds[i], bounds[i + 1]) for i in range(len(cumulative))]


def pack_tnd(x: torch.Tensor, segs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(T, N, D) + per-batch segments -> zero-padded (B, N, max_len, D)."""
    max_len = max((e - s for s, e in segs), default=0)
    out = x.new_zeros(len(segs), x.shape[1], max_len, x.shape[2])
    for b, (s, e) in enumerate(segs):
        out[b, :, : e - s] = x[s:e].transpose(0, 1)
    return out


def unpack_tnd(x: torch.Tensor, segs: Sequence[tuple[int, int]], total: int) -> torch.Tensor:
    """Inverse of pack_tnd: (B, N, max_len, D) -> (total, N, D), rows outside segments zero."""
    out = x.new_zeros(total, x.shape[1], x.shape[3])
    for b, (s, e) in enumerate(segs):
        out[s:e] = x[b, :, : e - s].transpose(0, 1)
    return out
