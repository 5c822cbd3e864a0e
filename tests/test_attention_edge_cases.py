"""Edge cases of the S == 1 (incremental) path of the fused op, and paged scales."""

from __future__ import annotations

import pytest
import torch

import npu_attn_graph.ops as npu
from npu_attn_graph import NpuAttnArgumentError

from oracle import fia_oracle


def _decode_inputs(b=2, n=4, skv=9, d=16):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(b, n, 1, d, generator=g), torch.randn(b, n, skv, d, generator=g),
            torch.randn(b, n, skv, d, generator=g))


@pytest.mark.parametrize("sparse_mode", [2, 3, 4])
def test_incremental_path_takes_an_ordinary_mask_whatever_the_sparse_mode(sparse_mode):
    """sparse_mode is ignored at S == 1: a (B, KV_S) mask is applied as given."""
    q, k, v = _decode_inputs()
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, 6:] = True
    kw = dict(num_heads=4, input_layout="BNSD", scale=0.25, atten_mask=mask)
    out, _ = npu.npu_fused_infer_attention_score(q, k, v, sparse_mode=sparse_mode, **kw)
    expected, _ = fia_oracle(q, k, v, **kw)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-6)


def test_incremental_path_ignores_the_compressed_mask():
    q, k, v = _decode_inputs()
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    out, _ = npu.npu_fused_infer_attention_score(q, k, v, num_heads=4, input_layout="BNSD", scale=0.25,
                                                 atten_mask=mask, sparse_mode=3)
    expected, _ = fia_oracle(q, k, v, num_heads=4, input_layout="BNSD", scale=0.25)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-6)


def test_query_padding_size_is_ignored_for_single_token_queries():
    q, k, v = _decode_inputs()
    kw = dict(num_heads=4, input_layout="BNSD", scale=0.25, actual_seq_lengths=[1, 1])
    padded, _ = npu.npu_fused_infer_attention_score(q, k, v, query_padding_size=torch.tensor([3]), **kw)
    plain, _ = npu.npu_fused_infer_attention_score(q, k, v, **kw)
    torch.testing.assert_close(padded, plain, rtol=0, atol=0)


def test_paged_per_token_scales_must_cover_the_gathered_blocks():
    b, nkv, d, bs = 2, 2, 32, 32
    q = torch.randn(b, 4, 1, d)
    cache = torch.randint(-5, 5, (6, nkv, bs, d), dtype=torch.int8)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    short = torch.ones(b, 50)  # lengths need ceil(70 / 32) = 3 blocks = 96 positions
    with pytest.raises(NpuAttnArgumentError, match="key_antiquant_scale.*96"):
        npu.npu_fused_infer_attention_score(
            q, cache, cache, num_heads=4, num_key_value_heads=nkv, input_layout="BNSD", block_table=table,
            block_size=bs, actual_seq_lengths_kv=[70, 33], key_antiquant_scale=short, value_antiquant_scale=short,
            key_antiquant_mode=1, value_antiquant_mode=1)
