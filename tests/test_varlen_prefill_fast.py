"""The reference kernels' fast path for plain varlen (TND) prefill (kernels/_varlen_prefill.py):
the segments scattered into one right-padded batch, one SDPA call, the rows gathered back.

Checked against the independent fp64 oracle (tests/oracle.py) and against the general
path of the same kernel (the chunked core, forced by making the call ineligible), with
the path taken asserted through ``_varlen_prefill.PATHS``: causal (sparse_mode 3 with
the compressed mask) and full (sparse_mode 0, no mask) segments, GQA, fp32/fp16/bf16,
segments of length 0 and 1, a NaN in one token never reaching another segment; calls the fast path does not take (softmax_lse,
different query and key lengths, over the memory budget) go the general way; a wrong
compressed mask is still the general path's named error.
"""

from __future__ import annotations

import functools

import pytest
import torch

from npu_attn_graph.kernels import _library, _varlen_prefill
from npu_attn_graph.kernels._library import COMPRESSED_MASK_SIZE, NpuAttnArgumentError
from npu_attn_graph.kernels.fused_infer_attention_score import npu_fused_infer_attention_score as fia
from npu_attn_graph.kernels.prompt_flash_attention import npu_prompt_flash_attention as pfa

import fast_paths
from fast_paths import assert_matches
from oracle import fia_oracle, pfa_oracle

general = functools.partial(fast_paths.general, _varlen_prefill)
taken = functools.partial(fast_paths.taken, _varlen_prefill)

FP32, FP16, BF16 = fast_paths.FP32, fast_paths.FP16, fast_paths.BF16
CAUSAL = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool).triu(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(7)


def tnd(lens, heads, d, dtype=FP32):
    """(T, heads, d) with T = sum(lens); cumulative lengths (the last one must be T)."""
    cumulative = torch.tensor(lens).cumsum(0).tolist()
    return torch.randn(sum(lens), heads, d).to(dtype), cumulative


MODES = {"causal": dict(sparse_mode=3, atten_mask=CAUSAL), "full": dict(sparse_mode=0)}


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_pfa_fast_path_equals_oracle_and_general_path(mode, gqa, dtype):
    n, d = 8, 16
    lens = [5, 1, 0, 23, 16]
    q, cumulative = tnd(lens, n, d, dtype)
    k, _ = tnd(lens, n // gqa, d, dtype)
    v, _ = tnd(lens, n // gqa, d, dtype)
    kw = dict(num_heads=n, num_key_value_heads=n // gqa, input_layout="TND", scale_value=0.3,
              actual_seq_lengths=cumulative, actual_seq_lengths_kv=cumulative, **MODES[mode])
    if mode == "full":
        kw["next_tokens"] = 2**31 - 1
    fast_paths.fast_equals_oracle_and_general(_varlen_prefill, pfa, pfa_oracle, q, k, v, **kw)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_fia_fast_path_equals_oracle(mode):
    n, nkv, d = 4, 2, 32
    lens = [7, 32, 2]
    q, cumulative = tnd(lens, n, d)
    k, _ = tnd(lens, nkv, d)
    v, _ = tnd(lens, nkv, d)
    kw = dict(num_heads=n, num_key_value_heads=nkv, input_layout="TND", scale=0.2,
              actual_seq_lengths=cumulative, actual_seq_lengths_kv=cumulative, **MODES[mode])
    (out, lse), path = taken(fia, q, k, v, **kw)
    assert path == "fast"
    expected, _ = fia_oracle(q, k, v, **kw)
    assert_matches(out, expected)
    assert lse.shape == (1,) and not lse.any()


def test_nan_in_a_token_stays_in_its_own_segment():
    # Within its segment a NaN value reaches every row, as in torch's SDPA with is_causal
    # (and the general path's whole-problem SDPA call): 0 * NaN is NaN even for the rows
    # that mask it. It must never reach another segment through the padded batch.
    n, d = 2, 16
    lens = [4, 6, 3]
    q, cumulative = tnd(lens, n, d)
    k, _ = tnd(lens, n, d)
    v, _ = tnd(lens, n, d)
    v[5] = float("nan")  # segment 1's second token
    kw = dict(num_heads=n, input_layout="TND", scale_value=0.5, actual_seq_lengths=cumulative,
              actual_seq_lengths_kv=cumulative, sparse_mode=3, atten_mask=CAUSAL)
    out, path = taken(pfa, q, k, v, **kw)
    assert path == "fast"
    assert not out[:4].isnan().any() and not out[10:].isnan().any()
    assert out[5:10].isnan().all()


def test_calls_it_does_not_take_go_the_general_way(monkeypatch):
    n, d = 4, 16
    lens = [3, 5]
    q, cumulative = tnd(lens, n, d)
    k, _ = tnd(lens, n, d)
    v, _ = tnd(lens, n, d)
    kw = dict(num_heads=n, input_layout="TND", scale=0.5, actual_seq_lengths=cumulative,
              actual_seq_lengths_kv=cumulative, sparse_mode=3, atten_mask=CAUSAL)
    _, path = taken(fia, q, k, v, softmax_lse_flag=True, **kw)
    assert path == "general"
    _, path = taken(fia, q, k, v, **{**kw, "actual_seq_lengths_kv": [4, 8]})  # other key lengths
    assert path == "general"
    monkeypatch.setattr(_library, "SCORE_BLOCK_BYTES", 64)  # over the memory budget
    out, path = taken(fia, q, k, v, **kw)
    assert path == "general"
    expected, _ = fia_oracle(q, k, v, **kw)
    assert_matches(out[0], expected)


def test_a_wrong_compressed_mask_is_the_general_paths_error():
    n, d = 2, 16
    q, cumulative = tnd([4], n, d)
    wrong = CAUSAL.clone()
    wrong[5, 9] = False
    with pytest.raises(NpuAttnArgumentError, match="atten_mask"):
        pfa(q, q, q, num_heads=n, input_layout="TND", actual_seq_lengths=cumulative,
            actual_seq_lengths_kv=cumulative, sparse_mode=3, atten_mask=wrong)


def test_once_per_version_recomputes_after_a_write_and_for_a_new_key():
    t = torch.zeros(3)
    calls = []

    def compute():
        calls.append(1)
        return float(t.sum())

    assert _library.once_per_version(t, "test", 1, compute) == 0.0
    assert _library.once_per_version(t, "test", 1, compute) == 0.0
    assert len(calls) == 1
    t.add_(1)  # a new version
    assert _library.once_per_version(t, "test", 1, compute) == 3.0
    assert _library.once_per_version(t, "test", 2, compute) == 3.0  # a new key
    assert len(calls) == 3
    with torch.inference_mode():
        frozen = torch.ones(2)
    assert _library.once_per_version(frozen, "test", 1, lambda: 5) == 5  # no version counter: not cached


def test_once_per_contents_reuses_for_an_equal_copy_and_never_for_a_changed_one():
    calls = []

    def counted(t):
        def compute():
            calls.append(1)
            return float(t.sum())
        return compute

    a = torch.tensor([1.0, 2.0])
    assert _library.once_per_contents(a, "test-contents", 1, counted(a)) == 3.0
    copy = a.clone()  # a fresh tensor, equal contents (Inductor's per-op copy of a mask)
    assert _library.once_per_contents(copy, "test-contents", 1, counted(copy)) == 3.0
    assert len(calls) == 1
    other = torch.tensor([1.0, 5.0])
    assert _library.once_per_contents(other, "test-contents", 1, counted(other)) == 6.0
    assert _library.once_per_contents(copy, "test-contents", 2, counted(copy)) == 3.0  # a new key
    assert len(calls) == 3
    held = torch.tensor([0.0, 1.0])
    assert _library.once_per_contents(held, "test-contents", 1, counted(held)) == 1.0
    equal_before = held.clone()
    held.add_(1)  # the held tensor is written: its value no longer says anything about equal_before
    assert _library.once_per_contents(equal_before, "test-contents", 1, counted(equal_before)) == 1.0
    assert len(calls) == 5
    shaped = torch.tensor([[0.0, 1.0]])  # equal elements, another shape
    assert _library.once_per_contents(shaped, "test-contents", 1, counted(shaped)) == 1.0
    assert len(calls) == 6
    big = torch.zeros(8)
    assert _library.once_per_contents(big, "test-contents", 1, counted(big), max_bytes=16) == 0.0
    assert _library.once_per_contents(big.clone(), "test-contents", 1, counted(big), max_bytes=16) == 0.0
    assert len(calls) == 8  # over max_bytes: not held, so the copy is computed again


def test_a_compressed_mask_made_under_inference_mode_is_checked_and_read():
    # Inference tensors have no version counter: the pattern check's memo must not need one
    # (it raised "Inference tensors do not track version counter" before).
    n, d = 2, 16
    lens = [4, 6]
    with torch.inference_mode():
        q, cumulative = tnd(lens, n, d)
        mask = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool).triu(1)
        kw = dict(num_heads=n, input_layout="TND", scale_value=0.5, actual_seq_lengths=cumulative,
                  actual_seq_lengths_kv=cumulative, sparse_mode=3)
        out, path = taken(pfa, q, q, q, atten_mask=mask, **kw)
        assert path == "fast"
        assert_matches(out, pfa_oracle(q, q, q, atten_mask=mask, **kw))
        wrong = mask.clone()
        wrong[5, 9] = False
        with pytest.raises(NpuAttnArgumentError, match="atten_mask"):
            pfa(q, q, q, atten_mask=wrong, **kw)
