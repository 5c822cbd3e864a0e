"""The dropout keep mask of npu_fusion_attention and its grad: a deterministic function of
(seed, offset) and the problem's shape, independent of chunking and device.

Query rows are cut into tiles of DROPOUT_TILE_ROWS rows over the padded (B, N, Sq, Skv) grid;
each tile's keep mask is ``torch.rand((B, N, tile, Skv), generator=g) < keep_prob`` with a CPU
generator seeded from (seed, offset, tile index), so the backward regenerates exactly the
forward's mask from the same seed and offset.
"""

from __future__ import annotations

import torch

DROPOUT_TILE_ROWS = 16


def _splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


class DropoutMask:
    """The keep mask over the padded (B, N, Sq, Skv) grid, generated tile by tile."""

    def __init__(self, keep_prob: float, seed: int, offset: int, batch: int, heads: int, kv_len: int,
                 device: torch.device) -> None:
        self.keep_prob = keep_prob
        self.base = _splitmix64(_splitmix64(seed & ((1 << 64) - 1)) ^ (offset & ((1 << 64) - 1)))
        self.tile_shape = (batch, heads, DROPOUT_TILE_ROWS, kv_len)
        self.device = device

    def _tile(self, index: int) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(_splitmix64(self.base ^ index))
        return torch.rand(self.tile_shape, generator=generator) < self.keep_prob

    def chunk(self, r0: int, r1: int, lo: int, hi: int) -> torch.Tensor:
        """keep[b, n, r0:r1, lo:hi] (bool, on the problem's device)."""
        t0, t1 = r0 // DROPOUT_TILE_ROWS, (r1 - 1) // DROPOUT_TILE_ROWS + 1
        tiles = torch.cat([self._tile(t)[..., lo:hi] for t in range(t0, t1)], dim=2)
        start = r0 - t0 * DROPOUT_TILE_ROWS
        return tiles[:, :, start:start + r1 - r0].to(self.device)
