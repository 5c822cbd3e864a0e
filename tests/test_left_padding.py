"""Batched generation with left padding (issue 12, item 5), on real transformers
decoders (tiny random configs of tests/models.py, fp32).

A batch of three prompts, the second and third left-padded (the third all but
one token), so some query rows of the prefill see no key at all:
- greedy generate() with a StaticCache, compiled, gives eager's tokens and caches;
- the prefill without a cache, compiled, gives eager's logits at every position,
  the fully padded rows included (rtol 1e-4 / atol 1e-5, the model matrix's);
- every attention site is fused; how the padding mask reaches the op is
  asserted from the report: a mask the graph computes becomes the NPU bool mask
  (sparse_mode 1; eager attention's finfo.min rows get the mean-of-V fix-up),
  a float mask handed in from outside (generate() builds eager attention's 4-D
  mask before the compiled forward) is an arbitrary additive tensor to the
  graph and goes in as pse_shift, which adds exactly what eager adds.
Left padding cannot become actual_seq_lengths: those count keys from position 0.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from npu_attn_graph import Report

from models import assert_caches_close, build_matrix_model

CASES = [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("gemma3", "eager"), ("gpt-oss", "eager")]
RTOL, ATOL = 1e-4, 1e-5


def _batch():
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family, attn", CASES)
def test_left_padded_generate_equals_eager(family, attn):
    model = build_matrix_model(family, attn)
    ids, mask = _batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager_cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        expected = model.generate(ids, past_key_values=eager_cache, **kwargs)
        report = Report()
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True,
                                      options={"report": report})
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        actual = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(actual, expected)
    assert_caches_close(cache, eager_cache, rtol=RTOL, atol=ATOL)
    attention = [s for s in report.sites if s.kind == "attention"]
    assert attention and all(s.rewritten for s in attention), [s.reason for s in attention]
    prefill = [s for s in attention if s.fused_op != "npu_incre_flash_attention"]
    if attn == "sdpa":  # transformers hands SDPA a boolean mask: the NPU mask
        assert all(s.sparse_mode == 1 and "additive term as pse_shift" not in s.notes for s in prefill)
    else:  # eager attention gets generate()'s float mask: pse_shift
        assert all("additive term as pse_shift" in s.notes for s in prefill)


@pytest.mark.parametrize("family, attn", CASES)
def test_left_padded_prefill_equals_eager_on_every_row(family, attn):
    model = build_matrix_model(family, attn)
    ids, mask = _batch()
    report = Report()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        actual = torch.compile(model.forward, backend="npu_attn", fullgraph=True,
                               options={"report": report})(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(actual[2, :6], expected[2, :6], rtol=RTOL, atol=ATOL)  # the padded rows
    attention = [s for s in report.sites if s.kind == "attention"]
    assert attention and all(s.rewritten for s in attention), [s.reason for s in attention]
    # The mask is computed in the graph from the padding mask: the NPU bool mask.
    assert all(s.sparse_mode == 1 and "additive term as pse_shift" not in s.notes for s in attention)
    if attn == "eager" and family != "gpt-oss":  # sinks keep every row's softmax finite: no fix-up
        assert all(any("fully-masked-row fix-up" in n for n in s.notes) for s in attention)
