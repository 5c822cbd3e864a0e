"""Real transformers models (tiny random configs), compiled with the npu_attn
backend: every attention and static KV-cache update fused, numerics equal to
eager, no graph breaks, no recompiles across static-cache decode steps."""

from __future__ import annotations

import pytest
import torch

from npu_attn_graph import Report

transformers = pytest.importorskip("transformers")

from models import (DECODERS, IMPLEMENTATIONS, LAYERS, assert_caches_close, build,  # noqa: E402
                    generate_static_both_ways)

RTOL, ATOL = 1e-4, 1e-5  # fp32 logits
NEW_TOKENS = 16


def output_of(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def attention_sites(report: Report) -> list:
    return [s for s in report.sites if s.kind == "attention"]


FUSED_ATTENTION_OPS = (torch.ops.npu_attn.npu_prompt_flash_attention.default,
                       torch.ops.npu_attn.npu_incre_flash_attention.default,
                       torch.ops.npu_attn.npu_fused_infer_attention_score.default)


def fused_attention_nodes(gm: torch.fx.GraphModule) -> int:
    return sum(len(gm.graph.find_nodes(op="call_function", target=op)) for op in FUSED_ATTENTION_OPS)


def kv_writer_nodes(gm: torch.fx.GraphModule) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=torch.ops.npu_attn.scatter_update_.default))


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", DECODERS + ["bert"])
def test_prefill(kind, attn):
    model = build(kind, attn)
    ids = torch.randint(1, 128, (2, 11))
    mask = torch.ones_like(ids)
    if kind == "bert":
        mask[1, 8:] = 0  # right padding: the encoder's usual batch
    report = Report()
    with torch.no_grad():
        expected = output_of(model(ids, attention_mask=mask))
        compiled = torch.compile(model, backend="npu_attn", fullgraph=True, options={"report": report})
        actual = output_of(compiled(ids, attention_mask=mask))
    valid = mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=RTOL, atol=ATOL)
    sites = attention_sites(report)
    assert len(sites) == LAYERS and all(s.rewritten for s in sites), report.table()
    assert report.graphs == 1
    assert fused_attention_nodes(report.graph_modules[0]) == LAYERS


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", DECODERS)
def test_static_cache_generate(kind, attn):
    model = build(kind, attn)
    ids = torch.randint(1, 128, (2, 7))
    report = Report()
    expected, actual, eager_cache, cache = generate_static_both_ways(model, "npu_attn", ids, NEW_TOKENS,
                                                                     {"report": report})
    assert torch.equal(actual, expected)
    assert_caches_close(cache, eager_cache, RTOL, ATOL)
    assert report.graphs == 2  # prefill + decode; the 15 later decode steps reuse the decode graph
    assert all(s.rewritten for s in report.sites), report.table()
    assert sum(s.kind == "attention" for s in report.sites) == 2 * LAYERS
    assert sum(s.kind == "kv_update" for s in report.sites) == 2 * 2 * LAYERS  # key + value, both graphs
    for gm in report.graph_modules:
        assert fused_attention_nodes(gm) == LAYERS and kv_writer_nodes(gm) == 2 * LAYERS
        assert not gm.graph.find_nodes(op="call_function", target=torch.ops.aten.index_copy.default)


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", DECODERS)
def test_dynamic_cache_decode_steps(kind, attn):
    """The second decode step recompiles with a symbolic KV length (torch's
    automatic dynamic shapes); attention in that graph is fused too."""
    model = build(kind, attn)
    ids = torch.randint(1, 128, (1, 5))
    report = Report()
    with torch.no_grad():
        eager_cache = transformers.DynamicCache(config=model.config)
        cache = transformers.DynamicCache(config=model.config)
        expected = model(ids, past_key_values=eager_cache, use_cache=True)
        compiled = torch.compile(model, backend="npu_attn", fullgraph=True, options={"report": report})
        actual = compiled(ids, past_key_values=cache, use_cache=True)
        torch.testing.assert_close(actual.logits, expected.logits, rtol=RTOL, atol=ATOL)
        token = expected.logits[:, -1:].argmax(-1)
        for _ in range(3):
            expected = model(token, past_key_values=eager_cache, use_cache=True)
            actual = compiled(token, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(actual.logits, expected.logits, rtol=RTOL, atol=ATOL)
            token = expected.logits[:, -1:].argmax(-1)
    assert report.graphs >= 2
    symbolic = report.graph_modules[-1]
    assert any(isinstance(s, torch.SymInt) for n in symbolic.graph.find_nodes(op="placeholder")
               for s in getattr(n.meta.get("val"), "shape", ())), "the last graph has symbolic shapes"
    assert all(s.rewritten for s in attention_sites(report)), report.table()
    assert len(attention_sites(report)) == LAYERS * report.graphs
    assert all(fused_attention_nodes(gm) == LAYERS for gm in report.graph_modules)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_training_step_uses_the_fusion_attention_op_and_its_grad(kind):
    """With gradients, attention becomes npu_fusion_attention before AOT; the
    backward graph then holds npu_fusion_attention_grad."""
    model = build(kind, "sdpa").train()
    for module in model.modules():  # BERT's dropout is random in training: compare without it
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(1, 128, (2, 9))
    eager_out = output_of(model(ids)).float().square().mean()
    eager_out.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    report = Report()
    compiled = torch.compile(model, backend="npu_attn", fullgraph=True, options={"report": report})
    out = output_of(compiled(ids)).float().square().mean()
    out.backward()
    torch.testing.assert_close(out, eager_out, rtol=RTOL, atol=ATOL)
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=RTOL, atol=ATOL)
    sites = attention_sites(report)
    assert len(sites) == LAYERS and all(s.fused_op == "npu_fusion_attention" for s in sites), report.table()
    targets = [n.target for gm in report.graph_modules for n in gm.graph.nodes]
    assert targets.count(torch.ops.npu_attn.npu_fusion_attention.default) == LAYERS
    assert targets.count(torch.ops.npu_attn.npu_fusion_attention_grad.default) == LAYERS
