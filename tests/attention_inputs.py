"""Input builders shared by the reference-kernel tests (dense layouts, ragged
TND lengths, shuffled paged caches)."""

from __future__ import annotations

import math

import torch


def dense(layout: str, b: int, n: int, s: int, d: int, dtype=torch.float32) -> torch.Tensor:
    base = layout.split("_")[0]
    shape = {"BSH": (b, s, n * d), "BSND": (b, s, n, d), "BNSD": (b, n, s, d)}[base]
    return torch.randn(shape).to(dtype)


def cumulative(lengths) -> list[int]:
    out, total = [], 0
    for x in lengths:
        total += x
        out.append(total)
    return out


def paged_cache(kv: torch.Tensor, lens, block_size: int, rank: int, table_fill: str, spare_blocks: int = 3,
                table=None):
    """Scatter a dense (B, Nkv, S, D) key or value into a paged cache.

    Blocks are assigned in a shuffled order (torch.randperm); the cache's unused
    slots hold garbage; block_table entries past a batch's need are -1 or garbage.
    Pass the returned table to lay the value out like the key."""
    b, nkv, _, d = kv.shape
    need = [math.ceil(n / block_size) for n in lens]
    total = sum(need) + spare_blocks
    if table is None:
        width = max(need) + 2
        if table_fill == "-1":
            table = torch.full((b, width), -1, dtype=torch.int32)
        else:
            table = torch.randint(-7, 10**6, (b, width), dtype=torch.int32)
        perm = torch.randperm(total).to(torch.int32)
        i = 0
        for bi in range(b):
            for j in range(need[bi]):
                table[bi, j] = perm[i]
                i += 1
    if kv.dtype == torch.int8:
        garbage = torch.randint(-128, 128, (total, nkv, block_size, d), dtype=torch.int8)
    else:
        garbage = torch.randn(total, nkv, block_size, d).to(kv.dtype)
    cache = garbage
    for bi in range(b):
        for t in range(lens[bi]):
            cache[int(table[bi, t // block_size]), :, t % block_size, :] = kv[bi, :, t, :]
    if rank == 3:
        cache = cache.permute(0, 2, 1, 3).reshape(total, block_size, nkv * d).contiguous()
    return cache, table

