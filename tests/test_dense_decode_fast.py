"""The reference kernels' fast path for plain dense decode (kernels/_dense_decode.py): with every
sequence at the same length L, SDPA on the first L slots of K/V (views, no mask).

Checked against the independent fp64 oracle (tests/oracle.py) and against the general
path of the same kernel (the chunked core, forced by making the call ineligible), with
the path taken asserted through ``_dense_decode.PATHS``: layouts BNSD/BSND/BSH, GQA,
fp32/fp16/bf16, batch 1 and batch 3, lengths given or not; NaN/inf past L change
nothing, bit for bit; calls it does not take (lengths that differ, a length of 0, a
mask, softmax_lse) go the general way.
"""

from __future__ import annotations

import functools

import pytest
import torch

from npu_attn_graph.kernels import _dense_decode
from npu_attn_graph.kernels.fused_infer_attention_score import npu_fused_infer_attention_score as fia
from npu_attn_graph.kernels.incre_flash_attention import npu_incre_flash_attention as ifa

import fast_paths
from fast_paths import assert_matches
from oracle import fia_oracle, ifa_oracle

general = functools.partial(fast_paths.general, _dense_decode)
taken = functools.partial(fast_paths.taken, _dense_decode)

FP32, FP16, BF16 = fast_paths.FP32, fast_paths.FP16, fast_paths.BF16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(5)


def qkv(layout, b, n, nkv, s, d, dtype=FP32):
    """query (S=1) and K/V of capacity s in `layout`."""
    q, k, v = torch.randn(b, n, 1, d), torch.randn(b, nkv, s, d), torch.randn(b, nkv, s, d)
    if layout == "BSND":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    elif layout == "BSH":
        q, k, v = (x.transpose(1, 2).reshape(b, x.shape[2], -1) for x in (q, k, v))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH"])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_ifa_fast_path_equals_oracle_and_general_path(batch, gqa, layout, dtype):
    n, d, capacity, length = 8, 16, 40, 29
    q, k, v = qkv(layout, batch, n, n // gqa, capacity, d, dtype)
    kw = dict(num_heads=n, num_key_value_heads=n // gqa, input_layout=layout, scale_value=0.3,
              actual_seq_lengths=[length] * batch)
    fast_paths.fast_equals_oracle_and_general(_dense_decode, ifa, ifa_oracle, q, k, v, **kw)


def test_fia_fast_path_with_and_without_lengths():
    q, k, v = qkv("BNSD", 2, 4, 2, 24, 32)
    kw = dict(num_heads=4, num_key_value_heads=2, input_layout="BNSD", scale=0.25)
    for lengths in ([17], [17, 17], None):  # one entry broadcasts; none: the whole capacity
        extra = {} if lengths is None else {"actual_seq_lengths_kv": lengths}
        (out, lse), path = taken(fia, q, k, v, **kw, **extra)
        assert path == "fast"
        expected, _ = fia_oracle(q, k, v, **kw, **extra)
        assert_matches(out, expected)
        assert lse.shape == (1,) and not lse.any()


def test_nan_and_inf_past_the_length_change_nothing():
    q, k, v = qkv("BNSD", 2, 4, 2, 32, 16)
    kw = dict(num_heads=4, num_key_value_heads=2, input_layout="BNSD", scale_value=0.25,
              actual_seq_lengths=[19, 19])
    clean, path = taken(ifa, q, k, v, **kw)
    assert path == "fast"
    k[:, :, 19:] = float("nan")
    v[:, :, 19:] = float("inf")
    poisoned, _ = taken(ifa, q, k, v, **kw)
    assert torch.equal(clean, poisoned)


def test_calls_it_does_not_take_go_the_general_way():
    q, k, v = qkv("BNSD", 2, 4, 2, 32, 16)
    kw = dict(num_heads=4, num_key_value_heads=2, input_layout="BNSD", scale_value=0.25)
    for extra in ({"actual_seq_lengths": [5, 19]},  # lengths that differ
                  {"actual_seq_lengths": [0, 0]},  # nothing to read: zeros, from the general path
                  {"actual_seq_lengths": [19, 19], "atten_mask": torch.zeros(2, 32, dtype=torch.bool)}):
        out, path = taken(ifa, q, k, v, **kw, **extra)
        assert path == "general"
        assert_matches(out, ifa_oracle(q, k, v, **kw, **extra))
    (out, lse), path = taken(fia, q, k, v, num_heads=4, num_key_value_heads=2, input_layout="BNSD",
                             actual_seq_lengths_kv=[19, 19], softmax_lse_flag=True)
    assert path == "general" and lse.shape == (2, 4, 1, 1)
