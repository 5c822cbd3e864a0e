"""Attention with per-head sink logits (gpt-oss) becomes FIA v2 with learnable_sink.

Every test runs the program eagerly and compiled (the fused op's reference
kernel off the NPU) on the same inputs. float32 tolerance 1e-5 relative (the
op computes in float32, only the summation order differs); float16 2e-3
(eager's softmax and matmuls round to float16 at each step, the op once).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from npu_attn_graph import Report, explain, to_ge_graph

V2 = "npu_fused_infer_attention_score_v2"


def sink_attention(q, k, v, sinks, mask=None, scale=0.25, subtract_max=True):
    """transformers' gpt-oss eager_attention_forward, GQA through repeat_interleave."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        scores = scores + mask
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    combined = torch.cat([scores, column], dim=-1)
    if subtract_max:
        combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(probs, v)


def _inputs(b=2, n=4, n_kv=2, s_q=6, s_kv=6, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, s_q, d, generator=g).to(dtype)
    k = torch.randn(b, n_kv, s_kv, d, generator=g).to(dtype)
    v = torch.randn(b, n_kv, s_kv, d, generator=g).to(dtype)
    sinks = torch.randn(n, generator=g).to(dtype)
    return q, k, v, sinks


def _min_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' additive mask: 0 where kept, finfo.min where masked."""
    zeros = torch.zeros(keep.shape, dtype=dtype)
    return torch.where(keep, zeros, torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def _compiled(fn, *args):
    report = Report()
    out = torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})(*args)
    return out, report


def _tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)


MASKS = {
    "none": lambda b, s_q, s_kv: None,
    "causal": lambda b, s_q, s_kv: torch.ones(s_q, s_kv, dtype=torch.bool).tril(s_kv - s_q).expand(b, 1, s_q, s_kv),
    # Batch 1's first two query rows see no key: eager gives them 0 through the sink.
    "rows_without_key": lambda b, s_q, s_kv: torch.cat(
        [torch.ones(1, 1, s_q, s_kv, dtype=torch.bool),
         torch.cat([torch.zeros(1, 1, 2, s_kv, dtype=torch.bool),
                    torch.ones(1, 1, s_q - 2, s_kv, dtype=torch.bool)], 2)]).expand(b, 1, s_q, s_kv),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("s_q", [6, 1])
def test_sink_attention_is_fia_v2_and_equals_eager(dtype, mask_kind, s_q):
    q, k, v, sinks = _inputs(s_q=s_q, dtype=dtype)
    keep = MASKS[mask_kind](2, s_q, 6) if s_q > 2 or mask_kind != "rows_without_key" else None
    mask = None if keep is None else _min_mask(keep, dtype)
    with torch.no_grad():
        expected = sink_attention(q, k, v, sinks, mask)
        actual, report = _compiled(sink_attention, q, k, v, sinks, mask)
    torch.testing.assert_close(actual, expected, **_tolerance(dtype))
    (site,) = report.sites
    assert site.rewritten and site.fused_op == V2 and site.pattern.startswith("eager:attention-with-sinks"), \
        report.table()
    assert not any("fix-up" in note for note in site.notes)  # the sink gives empty rows 0, as the op does
    if mask_kind == "rows_without_key" and keep is not None:
        assert torch.equal(expected[1, :, :2], torch.zeros_like(expected[1, :, :2]))


def test_without_the_max_subtraction_and_with_a_bool_mask_filled():
    q, k, v, sinks = _inputs()
    keep = MASKS["causal"](2, 6, 6)

    def fn(q, k, v, sinks, keep):
        scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4.0).masked_fill(~keep, float("-inf"))
        column = sinks.view(1, 4, 1, 1).expand(2, 4, 6, 1)
        probs = torch.cat([scores, column], -1).softmax(-1)[:, :, :, :6]
        return probs @ v.repeat_interleave(2, 1)

    with torch.no_grad():
        actual, report = _compiled(fn, q, k, v, sinks, keep)
    torch.testing.assert_close(actual, fn(q, k, v, sinks, keep), rtol=1e-5, atol=1e-5)
    (site,) = report.sites
    assert site.rewritten and site.fused_op == V2, report.table()


def test_a_column_that_varies_over_rows_is_not_a_sink():
    """A logit column that differs per query row (or a dropped first column) is
    not FIA v2's per-head sink: the site stays, listed with what stopped the rules."""
    q, k, v, sinks = _inputs()
    per_row = torch.randn(2, 4, 6, 1)

    def varying(q, k, v, column):
        scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
        return torch.cat([scores, column], -1).softmax(-1)[..., :-1] @ v.repeat_interleave(2, 1)

    def drops_first(q, k, v, sinks):
        scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
        column = sinks.view(1, 4, 1, 1).expand(2, 4, 6, 1)
        return torch.cat([column, scores], -1).softmax(-1)[..., 1:] @ v.repeat_interleave(2, 1)

    for fn, args in ((varying, (q, k, v, per_row)), (drops_first, (q, k, v, sinks))):
        with torch.no_grad():
            actual, report = _compiled(fn, *args)
        torch.testing.assert_close(actual, fn(*args), rtol=1e-6, atol=1e-6)
        (site,) = report.sites
        assert not site.rewritten and "cat" in site.reason, report.table()


def _gptoss(layers=2, window=4, head_dim=16):
    """A tiny gpt-oss (eager attention) whose sinks are random per head; float32."""
    cfg = T.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, num_local_experts=4,
                         num_experts_per_tok=2, sliding_window=window, max_position_embeddings=256,
                         initializer_range=0.2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = T.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # sinks start at zero: give every head its own
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model, cfg


def _ids(b=2, s=10):
    return torch.randint(1, 128, (b, s), generator=torch.Generator().manual_seed(1))


def test_gptoss_prefill_fuses_every_attention_and_equals_eager():
    model, _ = _gptoss()
    ids = _ids()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        report = Report()
        actual = torch.compile(model, backend="npu_attn", options={"report": report})(ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    attention = [s for s in report.sites if s.kind == "attention"]
    assert len(attention) == 2 and all(s.rewritten and s.fused_op == V2 for s in attention), report.table()


def test_gptoss_static_cache_generate_equals_eager():
    """Prefill and decode past the sliding window (4 slots, 16 new tokens)."""
    model, cfg = _gptoss()
    ids = _ids(b=1, s=6)

    def generate():
        return model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0,
                              past_key_values=T.StaticCache(config=cfg, max_cache_len=32))

    with torch.no_grad():
        expected = generate()
        report = Report()
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True,
                                      options={"report": report})
        actual = generate()
    assert torch.equal(actual, expected)
    attention = [s for s in report.sites if s.kind == "attention"]
    assert attention and all(s.rewritten and s.fused_op == V2 for s in attention), report.table()


def test_for_the_npu_the_ops_device_rules_decide(tmp_path):
    """Building a GE graph (for the NPU) from CPU fake values, FIA v2 validates as on
    the NPU, where learnable_sink needs bfloat16, the TND layout and a value head dim
    of 64 or 128: the sites stay, with the op's own message, and the graph converts."""
    model, _ = _gptoss()
    with torch.no_grad():
        result = to_ge_graph(model, _ids(), use_cache=False, out_dir=tmp_path)
    attention = [s for s in result.report.sites if s.kind == "attention"]
    assert len(attention) == 2, result.report.table()
    assert all(not s.rewritten and s.reason.startswith("npu_fused_infer_attention_score_v2: learnable_sink")
               and "on the NPU" in s.reason for s in attention), result.report.table()
    assert result.op_type_counts.get("SoftmaxV2", 0) >= 2 and "FusedInferAttentionScore" not in result.op_type_counts


def test_explain_lists_the_sink_sites_as_fused():
    model, _ = _gptoss(layers=1)
    with torch.no_grad():
        report = explain(model, _ids(), use_cache=False)
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert site.rewritten and site.fused_op == V2
