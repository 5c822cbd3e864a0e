"""The reference kernels' fast path for a plain dense prompt (kernels/_dense_prompt.py): one
torch SDPA over the whole problem with the mask inverted, rows with nothing to attend to
set to 0.

Checked against the independent fp64 oracle (tests/oracle.py) and against the general
path of the same kernel (the chunked core, forced by making the call ineligible), with
the path taken asserted through ``_dense_prompt.PATHS``: layouts BNSD/BSND/BSH, GQA,
fp32/fp16/bf16, masks bool/int8/uint8 in 2, 3 and 4 dims (wider than the keys too),
fully masked rows, no mask at all, sparse_mode 0 with a band that drops nothing, and
calls it does not take (a band that drops keys, lengths, pse, softmax_lse, a compressed
mask) going the general way.
"""

from __future__ import annotations

import functools

import pytest
import torch

from npu_attn_graph.kernels import _dense_prompt
from npu_attn_graph.kernels.fused_infer_attention_score import npu_fused_infer_attention_score as fia
from npu_attn_graph.kernels.prompt_flash_attention import npu_prompt_flash_attention as pfa

import fast_paths
from fast_paths import assert_matches
from oracle import fia_oracle, pfa_oracle

taken = functools.partial(fast_paths.taken, _dense_prompt)

FP32, FP16, BF16 = fast_paths.FP32, fast_paths.FP16, fast_paths.BF16
BIG = 2147483647


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(7)


def qkv(layout, b, n, nkv, sq, skv, d, dtype=FP32):
    q, k, v = torch.randn(b, n, sq, d), torch.randn(b, nkv, skv, d), torch.randn(b, nkv, skv, d)
    if layout == "BSND":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    elif layout == "BSH":
        q, k, v = (x.transpose(1, 2).reshape(b, x.shape[2], -1) for x in (q, k, v))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padded_causal(b, sq, skv, pad):
    """(B, 1, Sq, Skv) True = masked: causal (bottom-right) plus `pad` left-padded keys per batch."""
    i = torch.arange(sq).view(-1, 1) + (skv - sq)
    j = torch.arange(skv).view(1, -1)
    mask = (j > i).expand(b, 1, sq, skv).clone()
    for x, p in enumerate(pad):
        mask[x, :, :, :p] = True
    return mask


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH"])
@pytest.mark.parametrize("gqa", [1, 2])
def test_pfa_fast_path_equals_oracle_and_general_path(layout, gqa, dtype):
    b, n, sq, d = 2, 4, 7, 16
    q, k, v = qkv(layout, b, n, n // gqa, sq, sq, d, dtype)
    kw = dict(num_heads=n, num_key_value_heads=n // gqa, input_layout=layout, scale_value=0.3,
              atten_mask=padded_causal(b, sq, sq, [0, 3]), sparse_mode=1)
    fast_paths.fast_equals_oracle_and_general(_dense_prompt, pfa, pfa_oracle, q, k, v, **kw)


@pytest.mark.parametrize("sq,skv", [(5, 5), (20, 33)])
def test_fia_masks_of_every_form(sq, skv):
    """bool / int8 / uint8; (Sq, Skv), (B, Sq, Skv), (B, 1, Sq, Skv); a mask wider than the
    keys (its extra columns are not read); query rows with every key masked are 0."""
    b, n, d = 2, 4, 16
    q, k, v = qkv("BNSD", b, n, 2, sq, skv, d)
    full = padded_causal(b, sq, skv, [1, 2])
    full[1, 0, 0] = True  # a row with nothing to attend to
    wide = torch.cat([full, torch.zeros(b, 1, sq, 3, dtype=torch.bool)], -1)
    for mask in (full, full.to(torch.int8), full.to(torch.uint8), full[0, 0], full[:, 0], wide):
        kw = dict(num_heads=n, num_key_value_heads=2, input_layout="BNSD", scale=0.25, atten_mask=mask,
                  sparse_mode=1)
        out = fast_paths.fast_equals_oracle_and_general(_dense_prompt, lambda *a, **k: fia(*a, **k)[0],
                                                         lambda *a, **k: fia_oracle(*a, **k)[0], q, k, v, **kw)
        if mask.dim() > 2:
            assert not out[1, :, 0].any()


def test_no_mask_and_a_band_that_drops_nothing():
    b, n, sq, d = 2, 4, 6, 16
    q, k, v = qkv("BNSD", b, n, 4, sq, 9, d)
    mask = padded_causal(b, sq, 9, [0, 2])
    for kw in (dict(), dict(atten_mask=mask, sparse_mode=0, pre_tokens=BIG, next_tokens=BIG),
               dict(atten_mask=mask, sparse_mode=0, pre_tokens=sq - 1, next_tokens=8)):
        fast_paths.fast_equals_oracle_and_general(_dense_prompt, pfa, pfa_oracle, q, k, v, num_heads=n,
                                                  input_layout="BNSD", scale_value=0.5, **kw)


def test_calls_it_does_not_take_go_the_general_way():
    b, n, sq, d = 2, 4, 6, 16
    q, k, v = qkv("BNSD", b, n, 4, sq, sq, d)
    mask = padded_causal(b, sq, sq, [0, 2])
    base = dict(num_heads=n, input_layout="BNSD", scale_value=0.5)
    for extra in (dict(atten_mask=mask, sparse_mode=0),  # torch_npu's default next_tokens=0: a causal band
                  dict(atten_mask=mask, sparse_mode=0, pre_tokens=BIG, next_tokens=sq - 2),  # drops a key
                  dict(atten_mask=mask, sparse_mode=1, actual_seq_lengths=[6, 4]),
                  dict(atten_mask=mask, sparse_mode=1, pse_shift=torch.randn(1, n, sq, sq)),
                  dict(atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1), sparse_mode=2)):
        out, path = taken(pfa, q, k, v, **base, **extra)
        assert path == "general", extra
        assert_matches(out, pfa_oracle(q, k, v, **base, **extra))
    (out, lse), path = taken(fia, q, k, v, num_heads=n, input_layout="BNSD", atten_mask=mask, sparse_mode=1,
                             softmax_lse_flag=True)
    assert path == "general" and lse.shape == (b, n, sq, 1)


def test_a_mask_over_the_memory_budget_goes_the_general_way(monkeypatch):
    """SDPA adds the mask as a float tensor of its shape; past the budget the row chunks bound it."""
    from npu_attn_graph.kernels import _library

    b, n, sq, d = 2, 4, 6, 16
    q, k, v = qkv("BNSD", b, n, 4, sq, sq, d)
    kw = dict(num_heads=n, input_layout="BNSD", scale_value=0.5, atten_mask=padded_causal(b, sq, sq, [0, 2]),
              sparse_mode=1)
    assert taken(pfa, q, k, v, **kw)[1] == "fast"
    monkeypatch.setattr(_library, "SCORE_BLOCK_BYTES", b * sq * sq * 4 - 1)
    out, path = taken(pfa, q, k, v, **kw)
    assert path == "general"
    assert_matches(out, pfa_oracle(q, k, v, **kw))


def test_compiled_padded_prefill_takes_it():
    """The demo Llama's padded 2-prompt prefill under both executors: each layer's prompt
    attention takes the fast path, and the logits equal eager's."""
    from npu_attn_graph.demo_models import scenario_call

    model, args, kwargs = scenario_call("llama", "sdpa", "prefill")
    kwargs["attention_mask"][0, :2] = 0  # left padding: the mask stays data
    with torch.no_grad():
        expected = model(*args, **kwargs).logits
        for executor in ("eager", "inductor"):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="npu_attn", fullgraph=True, options={"executor": executor})
            before = _dense_prompt.PATHS["fast"]
            logits = compiled(*args, **kwargs).logits
            assert _dense_prompt.PATHS["fast"] - before == 2, executor  # one per layer
            # fp32; the fused kernel sums in another order than eager's SDPA
            torch.testing.assert_close(logits[0, 2:], expected[0, 2:], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits[1], expected[1], rtol=1e-5, atol=1e-5)
