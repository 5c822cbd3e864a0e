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
