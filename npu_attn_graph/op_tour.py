"""The op-level tour (`npu-attn-graph demo --ops`): a tiny GQA decoder attention run through the fused ops.

It prefills a prompt with npu_prompt_flash_attention (rightDownCausal), then
decodes token by token twice: once with a static cache written by
scatter_update_ and read by npu_incre_flash_attention, once with a paged cache
(shuffled blocks) written by npu_scatter_pa_kv_cache and read by
npu_fused_infer_attention_score. Every step is checked against torch SDPA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops

FP32_TOLERANCE = 1e-5


@dataclass
class StepResult:
    phase: str
    op: str
    positions: str
    max_abs_err: float


def run_demo(batch: int = 2, heads: int = 8, kv_heads: int = 2, head_dim: int = 64, prompt: int = 24,
             new_tokens: int = 8, block_size: int = 16, seed: int = 0) -> list[StepResult]:
    g = torch.Generator().manual_seed(seed)
    total = prompt + new_tokens
    scale = 1 / math.sqrt(head_dim)
    # The whole sequence's q/k/v, as a decoder layer would project them (BNSD).
    q = torch.randn(batch, heads, total, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, total, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, total, head_dim, generator=g)
    causal_mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    results = []

    def expected(upto: int, start: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(q[:, :, start:upto], k[:, :, :upto], v[:, :, :upto], scale=scale,
                                              is_causal=start == 0, enable_gqa=True)

    out = ops.npu_prompt_flash_attention(
        q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], num_heads=heads, num_key_value_heads=kv_heads,
        scale_value=scale, input_layout="BNSD", atten_mask=causal_mask, sparse_mode=3)
    results.append(StepResult("prefill", "npu_prompt_flash_attention", f"0..{prompt - 1}",
                              (out - expected(prompt, 0)).abs().max().item()))

    # Static cache (B, Nkv, S_max, D): scatter_update_ writes each new token in place.
    k_cache = torch.zeros(batch, kv_heads, total, head_dim)
    v_cache = torch.zeros_like(k_cache)
    start = torch.zeros(batch, dtype=torch.int64)
    ops.scatter_update_(k_cache, start, k[:, :, :prompt], -2)
    ops.scatter_update_(v_cache, start, v[:, :, :prompt], -2)
    for pos in range(prompt, total):
        where = torch.full((batch,), pos, dtype=torch.int64)
        ops.scatter_update_(k_cache, where, k[:, :, pos : pos + 1], -2)
        ops.scatter_update_(v_cache, where, v[:, :, pos : pos + 1], -2)
        out = ops.npu_incre_flash_attention(
            q[:, :, pos : pos + 1], k_cache, v_cache, num_heads=heads, num_key_value_heads=kv_heads,
            scale_value=scale, input_layout="BNSD", actual_seq_lengths=[pos + 1] * batch)
        results.append(StepResult("decode static", "npu_incre_flash_attention", str(pos),
                                  (out - expected(pos + 1, pos)).abs().max().item()))

    # Paged cache (blocks, block_size, Nkv, D) with each sequence's blocks shuffled.
    blocks_per_seq = math.ceil(total / block_size)
    order = torch.randperm(batch * blocks_per_seq, generator=g)
    block_table = order.view(batch, blocks_per_seq).to(torch.int32)
    key_pages = torch.zeros(batch * blocks_per_seq, block_size, kv_heads, head_dim)
    value_pages = torch.zeros_like(key_pages)

    def write_pages(lo: int, hi: int) -> None:
        pos = torch.arange(lo, hi)
        slots = (block_table[:, pos // block_size].long() * block_size + pos % block_size).reshape(-1)
        tokens_k = k[:, :, lo:hi].permute(0, 2, 1, 3).reshape(-1, kv_heads, head_dim)
        tokens_v = v[:, :, lo:hi].permute(0, 2, 1, 3).reshape(-1, kv_heads, head_dim)
        ops.npu_scatter_pa_kv_cache(tokens_k, tokens_v, key_pages, value_pages, slots, cache_mode="Norm")

    write_pages(0, prompt)
    for pos in range(prompt, total):
        write_pages(pos, pos + 1)
        out, _ = ops.npu_fused_infer_attention_score(
            q[:, :, pos : pos + 1].transpose(1, 2).reshape(batch, 1, heads * head_dim),
            key_pages.view(-1, block_size, kv_heads * head_dim),
            value_pages.view(-1, block_size, kv_heads * head_dim),
            num_heads=heads, num_key_value_heads=kv_heads, scale=scale, input_layout="BSH",
            block_table=block_table, block_size=block_size, actual_seq_lengths_kv=[pos + 1] * batch)
        want = expected(pos + 1, pos).transpose(1, 2).reshape(batch, 1, heads * head_dim)
        results.append(StepResult("decode paged", "npu_fused_infer_attention_score", str(pos),
                                  (out - want).abs().max().item()))
    return results


def format_results(results: list[StepResult]) -> str:
    lines = [f"{'phase':<14} {'fused op':<32} {'positions':<10} {'max |err| vs SDPA':>18}"]
    for r in results:
        lines.append(f"{r.phase:<14} {r.op:<32} {r.positions:<10} {r.max_abs_err:>18.2e}")
    return "\n".join(lines)
