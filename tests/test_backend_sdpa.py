"""The npu_attn backend with the SDPA -> fused-op pass, on real transformers
models (tiny random configs) and on small hand-built functions."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from npu_attn_graph import Report, explain

transformers = pytest.importorskip("transformers")

RTOL, ATOL = 1e-4, 1e-5  # fp32 logits after two layers of fused attention


def _llama(**overrides):
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    cfg = transformers.LlamaConfig(**{**settings, **overrides})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def test_backend_is_registered_through_the_entry_point():
    code = ("import torch; f = torch.compile(lambda x: x * 2, backend='npu_attn'); "
            "assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0)); "
            "import sys; assert 'npu_attn_graph' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("options,message", [
    ({"pases": ["sdpa_to_fused"]}, "unknown option(s) ['pases']"),
    ({"executor": "tvm"}, "option 'executor' must be one of"),
    ({"passes": ["nope"]}, "option 'passes' must be a list of names"),
    ({"passes": "sdpa_to_fused"}, "option 'passes' must be a list of names"),
    ({"report": 3}, "option 'report' must be a Report or a callable"),
])
def test_bad_options_are_rejected_by_name(options, message):
    f = torch.compile(lambda x: x + 1, backend="npu_attn", options=options)
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        f(torch.ones(2))


@pytest.mark.parametrize("executor", ["eager", "inductor"])
@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_prefill_attention_is_fused_and_matches_eager(build, executor):
    model = build()
    ids = torch.randint(0, 128, (2, 12))
    report = Report()
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend="npu_attn", fullgraph=True,
                                 options={"executor": executor, "report": report})
        actual = compiled(ids).logits
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    fused = report.fused("attention")
    assert len(fused) == model.config.num_hidden_layers == len(report.sites)
    assert {s.fused_op for s in fused} == {"npu_prompt_flash_attention"}
    assert {s.sparse_mode for s in fused} == {3}  # causal prefill: rightDownCausal
    assert {s.gqa_ratio for s in fused} == {2}


def test_padding_mask_prefill_is_fused_with_the_npu_mask_convention():
    model = _llama()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        report = explain(model, ids, attention_mask=mask)
        actual = torch.compile(model, backend="npu_attn", fullgraph=True)(ids, attention_mask=mask).logits
    assert len(report.fused("attention")) == 2
    assert {s.sparse_mode for s in report.fused()} == {1}  # allMask: the mask as given
    # Rows of pad tokens attend to nothing; the NPU semantics give them zeros, so
    # only real tokens are compared.
    torch.testing.assert_close(actual[0], expected[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(actual[1, 4:], expected[1, 4:], rtol=RTOL, atol=ATOL)


def test_unsupported_head_dim_is_left_alone_with_the_reason():
    model = _llama(head_dim=24)  # not a multiple of 16
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits
        report = explain(model, ids)
        actual = torch.compile(model, backend="npu_attn", fullgraph=True)(ids).logits
    assert report.fused() == []
    assert len(report.left_alone()) == 2
    assert all("head_dim (D) must be a multiple of 16, got 24" in s.reason for s in report.left_alone())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    assert "0/2 sites fused" in report.table()


# ----------------------------------------------------------------------------
# The pass alone, on small functions
# ----------------------------------------------------------------------------


def _run(fn, *args, dynamic_seq=False):
    """Compile and run fn; with dynamic_seq the sequence dims (2) of the 4-D
    inputs are symbolic, as torch's automatic dynamic shapes make them."""
    report = Report()
    if dynamic_seq:
        for a in args:
            torch._dynamo.mark_dynamic(a, 2)
    compiled = torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})
    return compiled(*args), report


def _qkv(sq, skv, n=4, nkv=4, d=32, b=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, n, sq, d, generator=g), torch.randn(b, nkv, skv, d, generator=g),
            torch.randn(b, nkv, skv, d, generator=g))


def test_single_token_query_becomes_incremental_attention():
    q, k, v = _qkv(1, 9)
    out, report = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    assert [s.fused_op for s in report.sites] == ["npu_incre_flash_attention"]


def test_symbolic_query_length_becomes_fused_infer_attention():
    def fn(x):  # q, k, v share one sequence length, as in a prompt without cache
        return F.scaled_dot_product_attention(x * 0.5, x, x * 2.0, is_causal=True)

    x = torch.randn(2, 4, 6, 32)
    out, report = _run(fn, x, dynamic_seq=True)
    torch.testing.assert_close(out, fn(x), rtol=1e-5, atol=1e-6)
    assert [s.fused_op for s in report.sites] == ["npu_fused_infer_attention_score"]
    assert report.sites[0].sparse_mode == 3


def test_causal_with_longer_keys_uses_top_left_alignment():
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    q, k, v = _qkv(5, 8)
    out, report = _run(fn, q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-5, atol=1e-6)
    assert report.sites[0].sparse_mode == 2  # leftUpCausal, SDPA's convention


def test_boolean_mask_and_gqa_and_custom_scale():
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3,  # noqa: E731
                                                           enable_gqa=True)
    q, k, v = _qkv(5, 7, n=8, nkv=2)
    keep = torch.rand(2, 1, 5, 7) > 0.3
    keep[..., 0] = True  # every row keeps a key (SDPA gives NaN otherwise)
    out, report = _run(fn, q, k, v, keep)
    torch.testing.assert_close(out, fn(q, k, v, keep), rtol=1e-5, atol=1e-6)
    assert report.sites[0].rewritten and report.sites[0].gqa_ratio == 4


@pytest.mark.parametrize("fn,reason", [
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.rand(2, 4, 5, 5) > 0.1),
     "per-head mask of shape (2, 4, 5, 5)"),
])
def test_sites_the_ops_cannot_take_are_left_with_a_reason(fn, reason):
    q, k, v = _qkv(5, 5)
    torch.manual_seed(0)
    _, report = _run(fn, q, k, v)
    assert not report.sites[0].rewritten
    assert reason in report.sites[0].reason


def test_an_additive_mask_broadcasts_as_torch_broadcasts_it():
    """A (S_q, S_kv) float mask is added to every batch and head: pse_shift, expanded."""
    q, k, v = _qkv(5, 5)
    bias = torch.linspace(-1, 1, 25).reshape(5, 5)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # noqa: E731
    out, report = _run(fn, q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-5, atol=1e-6)
    assert report.sites[0].rewritten and "pse_shift" in "; ".join(report.sites[0].notes)


def _fused_nodes(report: Report) -> list[torch.fx.Node]:
    return [n for gm in report.graph_modules for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("npu_attn.")]


def test_repeat_kv_is_removed_and_the_ratio_goes_to_num_key_value_heads():
    """transformers repeats K/V for GQA when a mask is passed; the fused op
    takes the original 2 KV heads and no repeated copy remains."""
    model = _llama()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        report = Report()
        actual = torch.compile(model, backend="npu_attn", fullgraph=True,
                               options={"report": report})(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[1], expected[1], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(actual[0, 2:], expected[0, 2:], rtol=RTOL, atol=ATOL)
    nodes = _fused_nodes(report)
    assert len(nodes) == 2
    for node in nodes:
        assert node.kwargs["num_key_value_heads"] == 2
        assert node.args[1].meta["val"].shape[1] == 2 and node.args[2].meta["val"].shape[1] == 2
    assert all(s.gqa_ratio == 2 and s.pattern.endswith("+repeat_kv") for s in report.sites)
    assert "aten.clone" in report.code_before[0] and "aten.clone" not in report.code_after[0]


@pytest.mark.parametrize("repeat", ["expand", "repeat_interleave"])
def test_repeat_kv_forms_on_a_small_function(repeat):
    def fn(q, k, v, keep):
        if repeat == "expand":
            b, n, s, d = k.shape
            k = k[:, :, None].expand(b, n, 4, s, d).reshape(b, n * 4, s, d)
            v = v[:, :, None].expand(b, n, 4, s, d).reshape(b, n * 4, s, d)
        else:
            k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    q, k, v = _qkv(5, 7, n=8, nkv=2)
    keep = torch.ones(2, 1, 5, 7, dtype=torch.bool).tril(2)
    out, report = _run(fn, q, k, v, keep)
    torch.testing.assert_close(out, fn(q, k, v, keep), rtol=1e-5, atol=1e-6)
    assert report.sites[0].gqa_ratio == 4
    (node,) = _fused_nodes(report)
    assert node.args[1].meta["val"].shape[1] == 2


def test_arbitrary_additive_mask_becomes_pse_shift():
    """A float mask that is not where(keep, 0, -inf) (here an ALiBi-like bias)
    is added to the scaled scores as pse_shift, exactly as SDPA adds it."""
    def fn(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    q, k, v = _qkv(5, 7)
    bias = -0.3 * (torch.arange(7).view(1, 1, 1, 7) - torch.arange(5).view(1, 1, 5, 1)).abs().float()
    out, report = _run(fn, q, k, v, bias)
    torch.testing.assert_close(out, fn(q, k, v, bias), rtol=1e-5, atol=1e-6)
    assert report.sites[0].rewritten
    (node,) = _fused_nodes(report)
    assert node.kwargs["pse_shift"] is not None and node.kwargs["atten_mask"] is None


def test_repeat_kv_with_different_key_and_value_factors_is_kept():
    """K repeated 4x but V only 2x (V already has 4 heads): not one GQA ratio."""
    def fn(q, k, v, keep):
        b, n, s, d = k.shape
        k = k[:, :, None].expand(b, n, 4, s, d).reshape(b, n * 4, s, d)
        v = v[:, :, None].expand(b, 4, 2, s, d).reshape(b, 8, s, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 8, 5, 32, generator=g), torch.randn(2, 2, 7, 32, generator=g), \
        torch.randn(2, 4, 7, 32, generator=g)
    keep = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    out, report = _run(fn, q, k, v, keep)
    torch.testing.assert_close(out, fn(q, k, v, keep), rtol=1e-5, atol=1e-6)
    (node,) = _fused_nodes(report)
    assert node.args[1].meta["val"].shape[1] == 8  # the repeated key stays
    assert report.sites[0].rewritten and "repeat_kv kept" in "; ".join(report.sites[0].notes)
