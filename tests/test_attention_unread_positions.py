"""Positions an op must not read never reach its outputs.

The NPU kernels do not read K/V positions past a batch's actual length, before
its start with KV left padding, the unused slots of the paged blocks a batch
uses, the blocks its block_table does not use, -1 padding of sparse indices,
or (training TND) tokens past the last cumulative length. Those may hold
stale or uninitialised memory (torch.empty caches, freed paged blocks), NaN
and inf included. Each test puts NaN, +inf or -inf in every such position and
asserts every output equals, exactly, the output with zeros there (and holds
no NaN). Every case runs through each chunking path of the reference kernels.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pytest
import torch

from npu_attn_graph.kernels.fused_infer_attention_score import npu_fused_infer_attention_score as fia
from npu_attn_graph.kernels.fusion_attention import npu_fusion_attention
from npu_attn_graph.kernels.incre_flash_attention import npu_incre_flash_attention as ifa
from npu_attn_graph.kernels.nsa_compress_attention_infer import npu_nsa_compress_attention_infer as nsa
from npu_attn_graph.kernels.prompt_flash_attention import npu_prompt_flash_attention as pfa
from npu_attn_graph.kernels.sparse_flash_attention import npu_sparse_flash_attention as sfa

FILLS = (float("nan"), float("inf"), float("-inf"))
MASK2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
I32 = torch.int32


pytestmark = pytest.mark.usefixtures("kernel_path")  # every kernel path (conftest)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(7)


def assert_unread_ignored(run: Callable[[float], Sequence[torch.Tensor]]) -> None:
    """run(fill) puts `fill` in every unread position and returns the op's outputs."""
    clean = run(0.0)
    for fill in FILLS:
        dirty = run(fill)
        assert len(dirty) == len(clean)
        for i, (c, d) in enumerate(zip(clean, dirty)):
            if d.is_floating_point():
                assert not d.isnan().any(), f"output {i}: NaN with {fill} in unread positions"
            torch.testing.assert_close(d, c, rtol=0, atol=0, msg=lambda m: f"output {i}, fill {fill}: {m}")


# ----------------------------------------------------------------------------
# Builders: canonical (B, N, S, D) tensors, poisoned, then laid out
# ----------------------------------------------------------------------------


def unread(lens: Sequence[int], seq: int, pad: int | None = None) -> torch.Tensor:
    """(B, S) bool: positions outside [0, len) (or [S - pad - len, S - pad) with left padding)."""
    j = torch.arange(seq).view(1, -1)
    n = torch.tensor(lens).view(-1, 1)
    if pad is None:
        return j >= n
    return (j < seq - pad - n) | (j >= seq - pad)


def poisoned(x: torch.Tensor, where: torch.Tensor, fill: float) -> torch.Tensor:
    """x (B, N, S, D) with every position where[b, s] set to fill."""
    return x.masked_fill(where[:, None, :, None], fill)


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    base = layout.split("_")[0]
    if base == "BSH":
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
    if base == "BSND":
        return x.transpose(1, 2).contiguous()
    return x


class Pages:
    """A shuffled block table for `lens`; block 0 and a few spare blocks are never
    used, so table entries past a batch's need (-1, garbage ids or 0, as vLLM pads)
    and every unused slot hold the poison."""

    def __init__(self, lens: Sequence[int], block_size: int, table_fill: str, spare: int = 2) -> None:
        self.lens, self.block_size = list(lens), block_size
        need = [math.ceil(n / block_size) for n in lens]
        self.num_blocks = 1 + sum(need) + spare
        width = max(need) + 2
        if table_fill == "garbage":
            table = torch.randint(-7, 10**6, (len(lens), width), dtype=I32)
        else:
            table = torch.full((len(lens), width), int(table_fill), dtype=I32)
        ids = 1 + torch.randperm(self.num_blocks - 1).to(I32)
        used = 0
        for b, k in enumerate(need):
            table[b, :k] = ids[used:used + k]
            used += k
        self.table = table

    def scatter(self, x: torch.Tensor, fill: float | int) -> torch.Tensor:
        """x (B, N, S, D) -> (num_blocks, N, block_size, D) holding each batch's valid
        tokens where its table puts them, and `fill` everywhere else."""
        _, n, _, d = x.shape
        cache = torch.full((self.num_blocks, n, self.block_size, d), fill, dtype=x.dtype)
        for b, length in enumerate(self.lens):
            for t in range(length):
                cache[int(self.table[b, t // self.block_size]), :, t % self.block_size] = x[b, :, t]
        return cache


def cache_rank(cache: torch.Tensor, rank: int) -> torch.Tensor:
    """(blocknum, Nkv, blocksize, D) -> (blocknum, blocksize, Nkv * D) for rank 3."""
    if rank == 4:
        return cache
    nb, n, bs, d = cache.shape
    return cache.permute(0, 2, 1, 3).reshape(nb, bs, n * d).contiguous()


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


# ----------------------------------------------------------------------------
# npu_prompt_flash_attention
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("sparse_mode", [0, 1, 3])
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_BSND"])
def test_pfa_ignores_positions_past_actual_lengths(layout, sparse_mode):
    b, n, nkv, sq, skv, d = 2, 4, 2, 6, 10, 16
    q, k, v = randn(b, n, sq, d), randn(b, nkv, skv, d), randn(b, nkv, skv, d)
    q_lens, kv_lens = [6, 3], [5, 10]
    masks = {0: {}, 1: dict(atten_mask=torch.rand(b, 1, sq, skv) < 0.2),
             3: dict(atten_mask=MASK2048)}[sparse_mode]

    def run(fill):
        kv_bad, q_bad = unread(kv_lens, skv), unread(q_lens, sq)
        return (pfa(laid_out(poisoned(q, q_bad, fill), layout), laid_out(poisoned(k, kv_bad, fill), layout),
                    laid_out(poisoned(v, kv_bad, fill), layout), num_heads=n, num_key_value_heads=nkv,
                    input_layout=layout, scale_value=0.25, actual_seq_lengths=q_lens,
                    actual_seq_lengths_kv=kv_lens, sparse_mode=sparse_mode, **masks),)

    assert_unread_ignored(run)


# ----------------------------------------------------------------------------
# npu_incre_flash_attention
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [None, 2])
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
def test_ifa_ignores_keys_outside_valid_range(layout, pad):
    b, n, nkv, skv, d = 3, 4, 2, 10, 16
    q, k, v = randn(b, n, 1, d), randn(b, nkv, skv, d), randn(b, nkv, skv, d)
    lens = [4, 7, 0]
    padding = None if pad is None else torch.tensor([pad])

    def run(fill):
        bad = unread(lens, skv, pad)
        return (ifa(laid_out(q, layout), laid_out(poisoned(k, bad, fill), layout),
                    laid_out(poisoned(v, bad, fill), layout), num_heads=n, num_key_value_heads=nkv,
                    input_layout=layout, scale_value=0.25, actual_seq_lengths=lens, kv_padding_size=padding),)

    assert_unread_ignored(run)


@pytest.mark.parametrize("table_fill", ["-1", "0", "garbage"])
@pytest.mark.parametrize("rank", [3, 4])
def test_ifa_paged_ignores_unused_slots_and_blocks(rank, table_fill):
    b, n, nkv, d, bs = 3, 4, 2, 16, 16
    layout = "BNSD" if rank == 4 else "BSH"
    lens = [17, 40, 5]
    pages = Pages(lens, bs, table_fill)
    q, k, v = randn(b, n, 1, d), randn(b, nkv, 40, d), randn(b, nkv, 40, d)

    def run(fill):
        return (ifa(laid_out(q, layout), cache_rank(pages.scatter(k, fill), rank),
                    cache_rank(pages.scatter(v, fill), rank), num_heads=n, num_key_value_heads=nkv,
                    input_layout=layout, scale_value=0.25, actual_seq_lengths=lens, block_table=pages.table,
                    block_size=bs),)

    assert_unread_ignored(run)


# ----------------------------------------------------------------------------
# npu_fused_infer_attention_score
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [None, "kv", "query+kv"])
@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_fia_ignores_positions_outside_valid_ranges(layout, sq, padding):
    b, n, nkv, skv, d = 2, 4, 2, 10, 16
    q, k, v = randn(b, n, sq, d), randn(b, nkv, skv, d), randn(b, nkv, skv, d)
    q_lens, kv_lens = [sq, max(1, sq - 2)], [6, 9]
    kv_pad = 1 if padding else None
    q_pad = 1 if padding == "query+kv" and sq > 1 else None  # query padding only applies to S > 1
    pads = {}
    if kv_pad is not None:
        pads["kv_padding_size"] = torch.tensor([kv_pad])
    if padding == "query+kv":
        pads["query_padding_size"] = torch.tensor([1])
        q_lens = [sq - 1 if sq > 1 else 1, max(1, sq - 2)]

    def run(fill):
        kv_bad, q_bad = unread(kv_lens, skv, kv_pad), unread(q_lens, sq, q_pad)
        return fia(laid_out(poisoned(q, q_bad, fill), layout), laid_out(poisoned(k, kv_bad, fill), layout),
                   laid_out(poisoned(v, kv_bad, fill), layout), num_heads=n, num_key_value_heads=nkv,
                   input_layout=layout, scale=0.25, actual_seq_lengths=q_lens, actual_seq_lengths_kv=kv_lens,
                   softmax_lse_flag=True, **pads)

    assert_unread_ignored(run)


@pytest.mark.parametrize("table_fill", ["-1", "0", "garbage"])
@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("rank", [3, 4])
def test_fia_paged_ignores_unused_slots_and_blocks(rank, sq, table_fill):
    b, n, nkv, d, bs = 2, 4, 2, 16, 16
    layout = "BNSD" if rank == 4 else "BSH"
    lens = [23, 9]
    pages = Pages(lens, bs, table_fill)
    q, k, v = randn(b, n, sq, d), randn(b, nkv, 32, d), randn(b, nkv, 32, d)
    masks = {} if sq == 1 else dict(atten_mask=MASK2048, sparse_mode=3)

    def run(fill):
        return fia(laid_out(q, layout), cache_rank(pages.scatter(k, fill), rank),
                   cache_rank(pages.scatter(v, fill), rank), num_heads=n, num_key_value_heads=nkv,
                   input_layout=layout, scale=0.25, actual_seq_lengths_kv=lens, block_table=pages.table,
                   block_size=bs, softmax_lse_flag=True, **masks)

    assert_unread_ignored(run)


@pytest.mark.parametrize("rank", [3, 4])
def test_fia_paged_tnd_ignores_unused_slots_and_blocks(rank):
    n, nkv, d, bs = 4, 2, 16, 16
    lens = [20, 3, 33]
    pages = Pages(lens, bs, "-1")
    q, k, v = randn(9, n, d), randn(3, nkv, 33, d), randn(3, nkv, 33, d)

    def run(fill):
        return fia(q, cache_rank(pages.scatter(k, fill), rank), cache_rank(pages.scatter(v, fill), rank),
                   num_heads=n, num_key_value_heads=nkv, input_layout="TND", scale=0.25,
                   actual_seq_lengths=[2, 3, 9], actual_seq_lengths_kv=lens, block_table=pages.table,
                   block_size=bs, softmax_lse_flag=True, atten_mask=MASK2048, sparse_mode=3)

    assert_unread_ignored(run)


@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_fia_shared_prefix_ignores_positions_past_its_length(layout, sq):
    b, n, nkv, skv, sp, d = 2, 4, 2, 8, 6, 16
    q, k, v = randn(b, n, sq, d), randn(b, nkv, skv, d), randn(b, nkv, skv, d)
    pk, pv = randn(1, nkv, sp, d), randn(1, nkv, sp, d)
    plen, kv_lens = 3, [8, 5]

    def run(fill):
        kv_bad, prefix_bad = unread(kv_lens, skv), unread([plen], sp)
        return fia(laid_out(q, layout), laid_out(poisoned(k, kv_bad, fill), layout),
                   laid_out(poisoned(v, kv_bad, fill), layout), num_heads=n, num_key_value_heads=nkv,
                   input_layout=layout, scale=0.25, key_shared_prefix=laid_out(poisoned(pk, prefix_bad, fill), layout),
                   value_shared_prefix=laid_out(poisoned(pv, prefix_bad, fill), layout),
                   actual_shared_prefix_len=[plen], actual_seq_lengths_kv=kv_lens, softmax_lse_flag=True)

    assert_unread_ignored(run)


@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_fia_rope_ignores_key_rope_past_actual_lengths(layout, sq):
    b, n, nkv, skv, d, dr = 2, 4, 2, 9, 32, 16
    q, k, v = randn(b, n, sq, d), randn(b, nkv, skv, d), randn(b, nkv, skv, d)
    qr, kr = randn(b, n, sq, dr), randn(b, nkv, skv, dr)
    kv_lens = [4, 9]

    def run(fill):
        bad = unread(kv_lens, skv)
        return fia(laid_out(q, layout), laid_out(poisoned(k, bad, fill), layout),
                   laid_out(poisoned(v, bad, fill), layout), query_rope=laid_out(qr, layout),
                   key_rope=laid_out(poisoned(kr, bad, fill), layout), num_heads=n, num_key_value_heads=nkv,
                   input_layout=layout, scale=0.15, actual_seq_lengths_kv=kv_lens, softmax_lse_flag=True)

    assert_unread_ignored(run)


@pytest.mark.parametrize("rank", [3, 4])
def test_fia_rope_paged_ignores_unused_slots(rank):
    b, n, nkv, d, dr, bs = 2, 4, 1, 32, 16, 16
    layout = "BNSD" if rank == 4 else "BSH"
    lens = [20, 11]
    pages = Pages(lens, bs, "0")
    q, qr = randn(b, n, 1, d), randn(b, n, 1, dr)
    k, v, kr = randn(b, nkv, 32, d), randn(b, nkv, 32, d), randn(b, nkv, 32, dr)

    def run(fill):
        return fia(laid_out(q, layout), cache_rank(pages.scatter(k, fill), rank),
                   cache_rank(pages.scatter(v, fill), rank), query_rope=laid_out(qr, layout),
                   key_rope=cache_rank(pages.scatter(kr, fill), rank), num_heads=n, num_key_value_heads=nkv,
                   input_layout=layout, scale=0.15, block_table=pages.table, block_size=bs,
                   actual_seq_lengths_kv=lens, softmax_lse_flag=True)

    assert_unread_ignored(run)


def int8_kv(*shape: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8)


def scales(*shape: int) -> torch.Tensor:
    return torch.rand(*shape) * 0.02 + 0.005


@pytest.mark.parametrize("mode", [1, 3])
def test_fia_antiquant_ignores_per_token_scales_past_actual_lengths(mode):
    """int8 K/V cannot hold NaN, but their per-token scales and offsets can."""
    b, n, nkv, skv, d = 2, 4, 2, 10, 32
    q = randn(b, n, 1, d).half()
    k, v = int8_kv(b, nkv, skv, d), int8_kv(b, nkv, skv, d)
    lens = [10, 4]
    shape = (b, 1, skv, 1) if mode == 1 else (b, nkv, skv, 1)  # poisoned along S, then reshaped
    ks, vs, ko, vo = scales(*shape), scales(*shape), randn(*shape), randn(*shape)

    def run(fill):
        bad = unread(lens, skv)

        def per_token(t):
            t = poisoned(t, bad, fill)
            return t.reshape(b, skv) if mode == 1 else t.reshape(b, nkv, skv)

        if mode == 1:  # antiquant_scale (2, B, S): key at 0, value at 1
            quant = dict(antiquant_mode=1, antiquant_scale=torch.stack([per_token(ks), per_token(vs)]),
                         antiquant_offset=torch.stack([per_token(ko), per_token(vo)]))
        else:
            quant = dict(key_antiquant_mode=3, value_antiquant_mode=3, key_antiquant_scale=per_token(ks),
                         value_antiquant_scale=per_token(vs), key_antiquant_offset=per_token(ko),
                         value_antiquant_offset=per_token(vo))
        return fia(q, k, v, num_heads=n, num_key_value_heads=nkv, input_layout="BNSD", scale=0.2,
                   actual_seq_lengths_kv=lens, softmax_lse_flag=True, **quant)

    assert_unread_ignored(run)


@pytest.mark.parametrize("mode", [4, 5])
@pytest.mark.parametrize("rank", [3, 4])
def test_fia_antiquant_paged_ignores_scales_of_unused_slots(rank, mode):
    b, n, nkv, d, bs = 2, 4, 2, 32, 32
    layout = "BNSD" if rank == 4 else "BSH"
    lens = [40, 13]
    pages = Pages(lens, bs, "-1")
    q = randn(b, n, 1, d).half()
    k = cache_rank(pages.scatter(int8_kv(b, nkv, 64, d), 77), rank)
    v = cache_rank(pages.scatter(int8_kv(b, nkv, 64, d), -77), rank)
    heads = 1 if mode == 4 else nkv
    params = [scales(b, heads, 64, 1), scales(b, heads, 64, 1), randn(b, heads, 64, 1), randn(b, heads, 64, 1)]

    def run(fill):
        # (blocknum, blocksize) for mode 4, (blocknum, N, blocksize) for mode 5
        ks, vs, ko, vo = (pages.scatter(t, fill).squeeze(-1).squeeze(1) if mode == 4
                          else pages.scatter(t, fill).squeeze(-1) for t in params)
        return fia(laid_out(q, layout), k, v, num_heads=n, num_key_value_heads=nkv, input_layout=layout, scale=0.2,
                   key_antiquant_scale=ks, value_antiquant_scale=vs, key_antiquant_offset=ko,
                   value_antiquant_offset=vo, key_antiquant_mode=mode, value_antiquant_mode=mode,
                   block_table=pages.table, block_size=bs, actual_seq_lengths_kv=lens, softmax_lse_flag=True)

    assert_unread_ignored(run)


# ----------------------------------------------------------------------------
# npu_sparse_flash_attention
# ----------------------------------------------------------------------------

D, DR = 512, 64


def sparse_indices(shape: Sequence[int], max_block: int) -> torch.Tensor:
    """Random block indices (some past the lengths) with random -1 tails."""
    idx = torch.randint(0, max_block, tuple(shape), dtype=I32)
    tails = torch.randint(1, shape[-1] + 1, tuple(shape[:-1]))
    idx[torch.arange(shape[-1]) >= tails[..., None]] = -1
    return idx


@pytest.mark.parametrize("with_value", [False, True])
@pytest.mark.parametrize("sparse_mode", [0, 3])
@pytest.mark.parametrize("kv_lens", [(5, 7), (0, 7)], ids=["ragged", "empty-first"])
def test_sfa_ignores_keys_past_actual_lengths_and_padding(kv_lens, sparse_mode, with_value):
    """With kv_lens[0] == 0, -1 padding and masked selections of batch 1 would read
    batch 0's token 0, which is poisoned as well."""
    b, sq, skv, heads = 2, 3, 8, 4
    q, qr = randn(b, sq, heads, D), randn(b, sq, heads, DR)
    k, kr, v = randn(b, 1, skv, D), randn(b, 1, skv, DR), randn(b, 1, skv, D)
    idx = sparse_indices((b, sq, 1, 6), skv + 2)

    def run(fill):
        bad = unread(kv_lens, skv)
        return sfa(q, laid_out(poisoned(k, bad, fill), "BSND"),
                   laid_out(poisoned(v, bad, fill), "BSND") if with_value else None, idx, 0.04,
                   query_rope=qr, key_rope=laid_out(poisoned(kr, bad, fill), "BSND"), attention_mode=2,
                   actual_seq_lengths_query=torch.tensor([3, 2], dtype=I32),
                   actual_seq_lengths_kv=torch.tensor(kv_lens, dtype=I32), sparse_mode=sparse_mode,
                   return_softmax_lse=True)

    assert_unread_ignored(run)


@pytest.mark.parametrize("sparse_block_size", [1, 4])
@pytest.mark.parametrize("table_fill", ["-1", "0"])
def test_sfa_paged_ignores_unused_slots_and_blocks(table_fill, sparse_block_size):
    lens, bs, heads = [37, 16], 16, 2
    pages = Pages(lens, bs, table_fill)
    q, qr = randn(5, heads, D), randn(5, heads, DR)  # TND: batch 0 has 2 tokens, batch 1 has 3
    k, kr, v = randn(2, 1, 48, D), randn(2, 1, 48, DR), randn(2, 1, 48, D)
    idx = sparse_indices((5, 1, 5), 48 // sparse_block_size + 2)

    def bsnd_pages(t, fill):  # (num_blocks, 1, bs, X) -> PA_BSND (num_blocks, bs, 1, X)
        return pages.scatter(t, fill).transpose(1, 2).contiguous()

    def run(fill):
        out, _, _ = sfa(q, bsnd_pages(k, fill), bsnd_pages(v, fill), idx, 0.04, query_rope=qr,
                        key_rope=bsnd_pages(kr, fill), attention_mode=2, layout_query="TND", layout_kv="PA_BSND",
                        block_table=pages.table, sparse_block_size=sparse_block_size,
                        actual_seq_lengths_query=torch.tensor([2, 5], dtype=I32),
                        actual_seq_lengths_kv=torch.tensor(lens, dtype=I32))
        return (out,)

    assert_unread_ignored(run)


# ----------------------------------------------------------------------------
# npu_nsa_compress_attention_infer
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("table_fill", ["-1", "0", "garbage"])
def test_nsa_ignores_unused_slots_and_blocks(table_fill):
    heads, kv_heads, dk, dv, page = 8, 2, 32, 16, 16
    lens = [20, 33, 12]
    pages = Pages(lens, page, table_fill)
    q = randn(3, heads, dk) * 1.5
    k, v = randn(3, 1, 48, kv_heads * dk), randn(3, 1, 48, kv_heads * dv)
    count = min(((n - 1) * 16 + 32) // 64 for n in lens)

    def run(fill):
        return nsa(q, pages.scatter(k, fill).squeeze(1), pages.scatter(v, fill).squeeze(1), 0.3, heads, kv_heads, 64,
                   count, page, 32, 16, block_table=pages.table, actual_cmp_seq_kvlen=lens)

    assert_unread_ignored(run)


# ----------------------------------------------------------------------------
# npu_fusion_attention (+ npu_fusion_attention_grad through autograd)
# ----------------------------------------------------------------------------

FUSION_MODES = {
    "no-mask": {},
    "mode3": dict(atten_mask=MASK2048, sparse_mode=3),
    "mode7": dict(atten_mask=MASK2048, sparse_mode=7, pre_tockens=100, next_tockens=0),
    "mode8": dict(atten_mask=MASK2048, sparse_mode=8, pre_tockens=100),
    "sink": dict(sink=torch.randn(4)),
}


@pytest.mark.parametrize("name", list(FUSION_MODES))
def test_fusion_attention_and_grad_ignore_tokens_past_cumulative_lengths(name):
    """TND with trailing zero lengths: tokens past the last non-zero cumulative entry
    of query, key, value and dy are not read; forward outputs and all gradients agree."""
    t, n, nkv, d = 11, 4, 2, 16
    q, k, v, dy = randn(t, n, d), randn(t, nkv, d), randn(t, nkv, d), randn(t, n, d)
    q_cum, kv_cum = [3, 7, 0], [2, 6, 0]

    def run(fill):
        qq, kk, vv, gy = (x.clone() for x in (q, k, v, dy))
        qq[q_cum[1]:], gy[q_cum[1]:] = fill, fill
        kk[kv_cum[1]:], vv[kv_cum[1]:] = fill, fill
        for x in (qq, kk, vv):
            x.requires_grad_()
        out = npu_fusion_attention(qq, kk, vv, n, "TND", scale=0.25, actual_seq_qlen=q_cum,
                                   actual_seq_kvlen=kv_cum, **FUSION_MODES[name])
        out[0].backward(gy)
        return (out[0].detach(), out[1], out[2], qq.grad, kk.grad, vv.grad)

    assert_unread_ignored(run)
