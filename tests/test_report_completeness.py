"""The report lists every attention-shaped softmax and every write into a
cache-shaped graph input, fused or not, and `check` fails while any is left.

Real transformers model code (tiny random configs) for the forms no rule
covers yet (Gemma2's logit softcap, gpt-oss's sinks) and for T5, whose decoder
self-attention adds a position bias and a causal mask."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from npu_attn_graph import Report, explain


def _ids(length=10):
    return torch.randint(1, 128, (2, length), generator=torch.Generator().manual_seed(0))


def _gemma2():
    cfg = T.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0)
    cfg._attn_implementation = "eager"
    return T.Gemma2ForCausalLM(cfg).eval()


def _gptoss():
    cfg = T.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                         num_experts_per_tok=2, sliding_window=4)
    cfg._attn_implementation = "eager"
    return T.GptOssForCausalLM(cfg).eval()


def _t5():
    cfg = T.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                     num_heads=4, decoder_start_token_id=0)
    cfg._attn_implementation = "eager"
    return T.T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("make,hint", [
    (_gemma2, "logit softcap tanh(scores / 50) * 50 (transformers' config field attn_logit_softcapping): no NPU "
              "inference attention op applies a softcap"),
])
def test_attention_no_rule_covers_is_listed_with_what_stopped_the_rules(make, hint):
    model = make()
    with torch.no_grad():
        report = explain(model, _ids(), use_cache=False)
    attention = [s for s in report.sites if s.kind == "attention"]
    assert len(attention) == 2, report.table()  # one per layer
    assert all(not s.rewritten and hint in s.reason for s in attention), report.table()
    assert all(s.layer.endswith("self_attn") for s in attention)


def test_t5_every_attention_is_fused_and_equals_eager():
    model = _t5()
    ids, decoder_ids = _ids(), _ids()[:, :5]
    with torch.no_grad():
        expected = model(ids, decoder_input_ids=decoder_ids, use_cache=False).logits
        report = Report()
        compiled = torch.compile(model, backend="npu_attn", options={"report": report})
        actual = compiled(ids, decoder_input_ids=decoder_ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    attention = [s for s in report.sites if s.kind == "attention"]
    # encoder self x2, decoder self x2, cross x2: the position bias goes in as pse_shift.
    assert len(attention) == 6 and all(s.rewritten for s in attention), report.table()


def test_deselected_passes_still_list_every_site():
    q = k = v = torch.randn(1, 2, 4, 16)
    report = explain(lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(-1) @ v, q, k, v, options={"passes": []})
    (site,) = report.sites
    assert not site.rewritten and site.reason == "the attention passes were not selected"


def test_deselected_passes_still_list_every_sdpa_call():
    """Without sdpa_to_fused (which lists every call it sees), an SDPA call was missing from the report."""
    q = k = v = torch.randn(1, 2, 4, 16)
    for options in ({"passes": []}, {"passes": ["eager_attention_to_fused"]}):
        report = explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v,
                         options=options)
        (site,) = report.sites
        assert site.kind == "attention" and site.pattern.startswith("sdpa:") and not site.rewritten, report.table()
        assert site.reason == "the attention passes were not selected"


def test_a_write_no_rule_covers_into_a_cache_input_is_listed():
    def step(q, k_cache, v_cache):
        k_cache.mul_(0.5)  # a cache-shaped input changed in place, not by a KV-cache write form
        return F.scaled_dot_product_attention(q, k_cache, v_cache)

    report = explain(step, torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    (write,) = [s for s in report.sites if s.kind == "kv_update"]
    assert not write.rewritten and "no rule matches this write" in write.reason and "mul" in write.reason


def test_sdpa_math_decomposition_is_fused_by_the_hand_written_rule():
    """SDPA with a 3-D mask reaches the graph as its math decomposition (q and k each
    scaled by sqrt(scale), then bmm, add, _safe_softmax, bmm)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 4, 7, 16, generator=g), \
        torch.randn(2, 4, 7, 16, generator=g)
    keep = torch.rand(1, 5, 7, generator=g) > 0.3
    keep[..., 0] = True

    def fn(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    with torch.no_grad():
        report = Report()
        actual = torch.compile(fn, backend="npu_attn", options={"report": report})(q, k, v, keep)
    torch.testing.assert_close(actual, fn(q, k, v, keep), rtol=1e-5, atol=1e-6)
    (site,) = report.sites
    assert site.rewritten and site.pattern.startswith("eager:"), report.table()


def test_check_fails_and_names_an_unmatched_attention(tmp_path):
    target = tmp_path / "softcap.py"
    target.write_text(textwrap.dedent("""
        import torch

        class SoftcapAttention(torch.nn.Module):
            def forward(self, q, k, v):
                scores = torch.tanh(q @ k.transpose(-1, -2) / 30.0) * 30.0
                return scores.softmax(-1) @ v

        def make():
            g = torch.Generator().manual_seed(0)
            return SoftcapAttention(), tuple(torch.randn(1, 2, 4, 16, generator=g, dtype=torch.float16)
                                             for _ in range(3))
    """))
    run = subprocess.run([sys.executable, "-m", "npu_attn_graph", "check", f"{target}:make"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "attention site left alone" in run.stdout and "logit softcap tanh(scores / 30) * 30" in run.stdout


def test_a_fused_site_notes_a_mask_computed_from_positions():
    """A causal mask built in the graph from aranges is fused as a full mask; the
    row says a causal/band mode would not need it materialised."""
    def fn(q, k, v, offset):
        rows = torch.arange(q.shape[2]).unsqueeze(-1) + offset
        keep = torch.arange(k.shape[2]) <= rows
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 4, 16, generator=g), torch.randn(1, 2, 6, 16, generator=g), \
        torch.randn(1, 2, 6, 16, generator=g)
    report = explain(fn, q, k, v, torch.tensor(2))
    (site,) = report.sites
    assert site.rewritten and any("computed from positions" in n for n in site.notes), report.table()


def test_a_softcapped_model_stays_one_complete_ge_graph(tmp_path):
    """Gemma2's softcapped attention stays as written (no NPU op takes a softcap),
    and the model around it is still one complete GE graph."""
    from npu_attn_graph import to_ge_graph

    with torch.no_grad():
        result = to_ge_graph(_gemma2(), _ids(), use_cache=False, out_dir=tmp_path)
    assert result.single_graph and result.graph_count == 1, result.summary()
    types = result.op_type_counts
    assert not [t for t in types if t.startswith(("aten.", "prims."))], result.summary()
    assert types.get("SoftmaxV2") == 2 and types.get("Tanh", 0) >= 2, result.summary()
    attention = [s for s in result.report.sites if s.kind == "attention"]
    assert len(attention) == 2 and all("attn_logit_softcapping" in s.reason for s in attention)


def test_a_moe_router_softmax_is_not_attention():
    """gpt-oss has four softmaxes: two attention (fused into FIA v2 with its sinks) and
    two routers (softmax of rank-2 top-k logits, fed to no matmul with values). With the
    router rule off, the routers' softmaxes stay and are not listed as attention; with
    it, they are fused into npu_moe_gating_top_k_softmax_v2 and listed as MoE sites."""
    from npu_attn_graph.passes import PASSES

    without_router = [p for p in PASSES if p != "moe_router_to_gating"]
    for passes, softmaxes_left in ((without_router, 2), (list(PASSES), 0)):
        with torch.no_grad():
            report = explain(_gptoss(), _ids(), options={"passes": passes}, use_cache=False)
        softmaxes = sum(code.count("aten._softmax.default") for code in report.code_after)
        attention = [s for s in report.sites if s.kind == "attention"]
        routers = [s for s in report.sites if s.pattern == "moe:router-top-k-softmax"]
        assert softmaxes == softmaxes_left and len(attention) == 2 and all(s.rewritten for s in attention), \
            report.table()
        assert len(routers) == 2 - softmaxes_left and all(s.rewritten for s in routers), report.table()
