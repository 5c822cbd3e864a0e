"""The eager-attention pass alone, on small hand-written attention functions."""

from __future__ import annotations

import math

import pytest
import torch

from npu_attn_graph import Report


def _run(fn, *args):
    report = Report()
    out = torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})(*args)
    return out, report


def _qkv(sq=6, skv=9, n=4, d=32):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, n, sq, d, generator=g), torch.randn(2, n, skv, d, generator=g),
            torch.randn(2, n, skv, d, generator=g))


def scale_mul(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1) @ v


def scale_div(q, k, v):
    return torch.softmax(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1]), dim=-1) @ v


def scale_on_query(q, k, v):
    return torch.softmax((q * 0.2) @ k.transpose(-1, -2), dim=-1) @ v


def fp32_upcast(q, k, v):
    scores = q @ k.transpose(-1, -2) * 0.1
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def causal_where(q, k, v):  # GPT-2's causal buffer: where(keep, scores, lowest)
    keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    scores = torch.where(keep, q @ k.transpose(-1, -2), torch.finfo(q.dtype).min)
    return torch.softmax(scores, dim=-1) @ v


def masked_fill(q, k, v):
    masked = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1 + k.shape[2] - q.shape[2])
    scores = (q @ k.transpose(-1, -2) * 0.1).masked_fill(masked, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def additive_where_mask(q, k, v):
    keep = torch.ones(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.bool).tril(2)
    mask = torch.where(keep, 0.0, torch.finfo(q.dtype).min)
    return torch.softmax(q @ k.transpose(-1, -2) * 0.1 + mask, dim=-1) @ v


def dropout_in_eval(q, k, v):
    probs = torch.nn.functional.dropout(torch.softmax(q @ k.transpose(-1, -2), -1), p=0.1, training=False)
    return probs @ v


@pytest.mark.parametrize("fn", [scale_mul, scale_div, scale_on_query, fp32_upcast, causal_where, masked_fill,
                                additive_where_mask, dropout_in_eval])
def test_hand_written_attention_becomes_one_fused_op(fn):
    q, k, v = _qkv()
    out, report = _run(fn, q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-5, atol=1e-6)
    (site,) = report.sites
    assert site.rewritten and site.fused_op == "npu_prompt_flash_attention", report.table()
    graph = report.graph_modules[0].graph
    assert not graph.find_nodes(op="call_function", target=torch.ops.aten._softmax.default)
    assert not graph.find_nodes(op="call_function", target=torch.ops.aten.bmm.default)


def test_single_query_row_becomes_incremental_attention():
    q, k, v = _qkv(sq=1)
    out, report = _run(scale_mul, q, k, v)
    torch.testing.assert_close(out, scale_mul(q, k, v), rtol=1e-5, atol=1e-6)
    assert report.sites[0].fused_op == "npu_incre_flash_attention"


def test_returned_attention_weights_keep_the_chain():
    def fn(q, k, v):
        probs = torch.softmax(q @ k.transpose(-1, -2) * 0.1, dim=-1)
        return probs @ v, probs

    q, k, v = _qkv()
    (out, probs), report = _run(fn, q, k, v)
    (site,) = report.sites
    assert not site.rewritten and "also used by" in site.reason
    torch.testing.assert_close(out, fn(q, k, v)[0], rtol=1e-5, atol=1e-6)


def test_softmax_over_another_axis_is_not_attention():
    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v

    q, k, v = _qkv(sq=9)
    out, report = _run(fn, q, k, v)
    assert report.sites == []
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-5, atol=1e-6)


def test_unsupported_head_dim_is_left_with_the_reason():
    q, k, v = _qkv(d=40)
    out, report = _run(scale_mul, q, k, v)
    (site,) = report.sites
    # The op's own validation decides, and its message is the reason.
    assert not site.rewritten and "head_dim (D) must be a multiple of 16, got 40" in site.reason
    torch.testing.assert_close(out, scale_mul(q, k, v), rtol=1e-5, atol=1e-6)


def test_layout_pass_reads_and_writes_bsnd_so_transposes_and_the_output_copy_vanish():
    """q/k/v projected as (B, S, N, D) and transposed for attention; the output
    transposed back and made contiguous: the fused op takes BSND in and out."""
    def block(x, wq, wk, wv):
        b, s, _ = x.shape
        q = (x @ wq).view(b, s, 4, 32).transpose(1, 2)
        k = (x @ wk).view(b, s, 4, 32).transpose(1, 2)
        v = (x @ wv).view(b, s, 4, 32).transpose(1, 2)
        out = torch.softmax(q @ k.transpose(-1, -2) * 0.1, dim=-1) @ v
        return out.transpose(1, 2).contiguous().view(b, s, 128)

    g = torch.Generator().manual_seed(9)
    # Weights scaled like a trained layer's (1/sqrt(fan_in)), keeping logits O(1).
    x, wq, wk, wv = (torch.randn(*shape, generator=g) / shape[0] ** 0.5
                     for shape in [(2, 6, 64), (64, 128), (64, 128), (64, 128)])
    out, report = _run(block, x, wq, wk, wv)
    torch.testing.assert_close(out, block(x, wq, wk, wv), rtol=1e-5, atol=1e-6)
    (site,) = report.sites
    assert site.layout == "BSND"
    graph = report.graph_modules[0].graph
    (node,) = graph.find_nodes(op="call_function", target=torch.ops.npu_attn.npu_prompt_flash_attention.default)
    assert node.kwargs["input_layout"] == "BSND"
    assert not graph.find_nodes(op="call_function", target=torch.ops.aten.clone.default)
    assert not graph.find_nodes(op="call_function", target=torch.ops.aten.transpose.int)


class ScaledAttention(torch.nn.Module):
    """transformers-style: the scale is a Python float attribute."""

    def __init__(self, scaling: float):
        super().__init__()
        self.scaling = scaling

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * self.scaling, dim=-1) @ v


@pytest.mark.parametrize("specialize_float", [False, True])
def test_dynamic_true_float_scale(specialize_float):
    """dynamic=True turns the Python float scale into a graph input: the fused op
    takes its scale as a constant, so the runtime scale multiplies the query
    instead (softmax(s * q @ k^T) = softmax((s * q) @ k^T)); with specialize_float
    the scale is a constant again and goes to the op."""
    q, k, v = _qkv()
    for t in (q, k, v):
        torch._dynamo.mark_static(t, 1)  # heads and head_dim stay static, as in models that
        torch._dynamo.mark_static(t, 3)  # view(..., num_heads, head_dim)
    module = ScaledAttention(0.125)
    report = Report()
    with torch._dynamo.config.patch(specialize_float=specialize_float):
        compiled = torch.compile(module, backend="npu_attn", dynamic=True, options={"report": report})
        out = compiled(q, k, v)
        module.scaling = 0.3  # a new value of the runtime scale reuses the graph
        out_changed = compiled(q, k, v)
    torch.testing.assert_close(out, ScaledAttention(0.125)(q, k, v), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_changed, ScaledAttention(0.3)(q, k, v), rtol=1e-5, atol=1e-6)
    site = report.sites[0]
    assert site.rewritten, site.reason
    folded = [n for n in site.notes if "folded into the query (q * s)" in n]
    assert bool(folded) != specialize_float, site.notes


class RuntimeScaleAfterMask(torch.nn.Module):
    def __init__(self, scaling: float):
        super().__init__()
        self.scaling = scaling

    def forward(self, q, k, v, bias):
        return torch.softmax((q @ k.transpose(-1, -2) + bias) * self.scaling, dim=-1) @ v


class RuntimeScaleDivided(RuntimeScaleAfterMask):
    def forward(self, q, k, v, bias):
        return torch.softmax(q @ k.transpose(-1, -2) / self.scaling + bias, dim=-1) @ v


@pytest.mark.parametrize("module, fused", [(RuntimeScaleDivided(4.0), True), (RuntimeScaleAfterMask(0.25), False)])
def test_dynamic_true_runtime_scale_folds_only_before_terms(module, fused):
    """A runtime divisor folds as q / s; a runtime scale applied after a bias would
    scale the bias too, which the op cannot do: that site stays, with the reason."""
    q, k, v = _qkv()
    bias = torch.randn(1, 1, q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(3))
    for t in (q, k, v):
        torch._dynamo.mark_static(t, 1)
        torch._dynamo.mark_static(t, 3)
    report = Report()
    with torch._dynamo.config.patch(specialize_float=False):
        out = torch.compile(module, backend="npu_attn", dynamic=True, options={"report": report})(q, k, v, bias)
    torch.testing.assert_close(out, module(q, k, v, bias), rtol=1e-5, atol=1e-6)
    (site,) = report.sites
    assert site.rewritten == fused, site.reason
    if fused:
        assert any("folded into the query (q / s)" in n for n in site.notes), site.notes
    else:
        assert "after a mask or bias term" in site.reason
