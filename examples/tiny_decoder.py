"""A TARGET for the npu-attn-graph CLI: a hand-written GQA decoder layer with a static KV cache.

    npu-attn-graph explain examples/tiny_decoder.py:make
    npu-attn-graph check examples/tiny_decoder.py:make
    npu-attn-graph dump examples/tiny_decoder.py:make --out tiny_decoder_dump

make() returns (model, example_args, example_kwargs): one decode step of a
float16 layer that writes its new key/value into the cache in place and
attends over it with plain matmul + softmax.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int = 256, heads: int = 8, kv_heads: int = 2, max_len: int = 64):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.kv = nn.Linear(hidden, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        shape = (1, kv_heads, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        self.k_cache.index_copy_(2, position, k)  # the static KV-cache write
        self.v_cache.index_copy_(2, position, v)
        group = self.heads // self.kv_heads
        keys = self.k_cache.repeat_interleave(group, dim=1)
        values = self.v_cache.repeat_interleave(group, dim=1)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ values
        return self.out(attention.transpose(1, 2).reshape(b, s, -1))


def make():
    torch.manual_seed(0)
    layer = DecoderLayer().half().eval()
    position = torch.tensor([5])
    mask = (torch.arange(64) <= 5).view(1, 1, 1, 64)  # keys written so far
    return layer, (torch.randn(1, 1, 256, dtype=torch.float16), position, mask), {}
