"""The training-graph rewrite alone: SDPA -> npu_fusion_attention before AOT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from npu_attn_graph import Report


def _leaves(sq=6, skv=6, n=4, nkv=2):
    g = torch.Generator().manual_seed(6)
    return [torch.randn(2, h, s, 32, generator=g).requires_grad_() for h, s in ((n, sq), (nkv, skv), (nkv, skv))]


@pytest.mark.parametrize("sq,skv,causal", [(6, 6, True), (4, 7, True), (5, 5, False)])
def test_gradients_flow_through_the_fusion_op(sq, skv, causal):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    leaves = _leaves(sq, skv)
    expected = fn(*leaves)
    expected_grads = torch.autograd.grad(expected.square().sum(), leaves)
    report = Report()
    out = torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    (site,) = report.sites
    assert site.fused_op == "npu_fusion_attention" and site.graph == "training"
    assert site.sparse_mode == ((3 if sq == skv else 2) if causal else 0)
    assert report.pass_rewrites["training_sdpa_to_fusion"] == 1  # the pass returns its count (it returned None)


def test_boolean_mask_and_dropout_in_training():
    def masked(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)

    def dropped(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, enable_gqa=True)

    leaves = _leaves()
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    report = Report()
    out = torch.compile(masked, backend="npu_attn", fullgraph=True, options={"report": report})(*leaves, keep)
    torch.testing.assert_close(out, masked(*leaves, keep), rtol=1e-5, atol=1e-6)
    assert report.sites[0].fused_op == "npu_fusion_attention" and report.sites[0].sparse_mode == 1

    torch._dynamo.reset()
    report = Report()
    torch.compile(dropped, backend="npu_attn", fullgraph=True, options={"report": report})(*leaves, keep)
    assert not report.sites[0].rewritten and "dropout_p=0.2" in report.sites[0].reason


# ----------------------------------------------------------------------------
# The report: one row per SDPA call in a training graph, once per compiled graph
# ----------------------------------------------------------------------------


def _float_mask(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(q.shape[2], k.shape[2]))


def _autocast(q, k, v):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _dropout_3d(q, k, v):
    return F.scaled_dot_product_attention(q[0], k[0], v[0], dropout_p=0.3)


@pytest.mark.parametrize("fn,reason", [(_float_mask, "a float attn_mask"), (_autocast, "inside torch.autocast"),
                                       (_dropout_3d, "dropout_p=0.3")])
def test_an_sdpa_call_left_alone_in_training_is_listed_once(fn, reason):
    """The training rewrite lists it (graph "training", with its reason); what AOT makes of
    the call (SDPA's ATen kernel, or its math decomposition) is not listed again."""
    torch._dynamo.reset()
    report = Report()
    out = torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})(*_leaves(nkv=4))
    out.float().sum().backward()
    assert len(report.sites) == 1, report.table()
    (site,) = report.sites
    assert site.graph == "training" and not site.rewritten and reason in site.reason


def test_an_sdpa_call_fused_through_its_decomposition_is_listed_once():
    """3-D q/k/v: the SDPA rewrite leaves the call alone, the hand-written rule fuses its
    math decomposition (the graph is traced for a hand-written attention next to it): one
    row, fused, saying so; values and gradients equal eager."""
    def fn(q, k, v, x):
        hand = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v
        return hand.square().sum() + F.scaled_dot_product_attention(x, x, x).square().sum()

    leaves = [*_leaves(nkv=4), torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()]
    expected = fn(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch._dynamo.reset()
    report = Report()
    out = torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})(*leaves)
    grads = torch.autograd.grad(out, leaves)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert len(report.sites) == 2, report.table()
    assert all(s.graph == "training" and s.fused_op == "npu_fusion_attention" for s in report.sites)
    sdpa_row = [s for s in report.sites if any("decomposition" in n for n in s.notes)]
    assert len(sdpa_row) == 1 and "not 4-D" in sdpa_row[0].notes[-1]


class _FloatAttributes(torch.nn.Module):
    """dynamic=True makes the float attributes graph inputs; AOT specializes them again,
    and dynamo restarts the compile (TensorifyScalarRestartAnalysis) after the training
    rewrite has listed the site once already."""

    def __init__(self):
        super().__init__()
        self.p, self.scale = 0.0, 0.25

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, scale=self.scale)


def test_a_recompiled_training_graph_lists_each_site_once_per_compiled_graph():
    from npu_attn_graph.backend import traced_afresh

    report = Report()
    with traced_afresh(report):
        compiled = torch.compile(_FloatAttributes().train(), backend="npu_attn", dynamic=True,
                                 options={"report": report})
        for batch in (2, 3):  # the second batch size recompiles
            leaves = [torch.randn(batch, 4, 6, 8, requires_grad=True) for _ in range(3)]
            compiled(*leaves).sum().backward()
    compiles = 1 + len(report.recompiles)
    assert report.recompiles and report.graphs == 2 * compiles  # a forward and a backward graph each
    assert len(report.sites) == compiles, report.table()
    assert all(s.graph == "training" and s.fused_op == "npu_fusion_attention" for s in report.sites)
    assert len(report.code_before) == len(report.graph_modules) == report.graphs
