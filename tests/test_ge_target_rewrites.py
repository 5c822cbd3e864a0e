"""The rewrites made for GE graphs (PassContext target "ge"), run by torch on
the same inputs as the original model: functional KV-cache writers with the
copy_ back kept, arange-built causal masks, and float32 attention computed in
float16 inside the fused op."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from npu_attn_graph import Report
from npu_attn_graph.passes import PASSES, PassContext, run_passes

transformers = pytest.importorskip("transformers")

from models import LAYERS, assert_caches_close, build, generate_static_both_ways  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5  # fp32, as the backend's model tests
npu_attn = torch.ops.npu_attn


def ge_target_backend(report: Report, fp32_attention: str):
    """The passes exactly as TorchAir gets them, then the graph run by torch."""
    def compiler(gm: torch.fx.GraphModule, example_inputs):
        run_passes(gm, list(PASSES), report, PassContext("inference", "ge", fp32_attention))
        report.graph_modules.append(gm)
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=compiler, inference_compiler=compiler, keep_inference_input_mutations=True)


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("gpt2", "eager"), ("qwen2", "sdpa")])
def test_functional_kv_writes_match_eager_over_decode_steps(kind, attn):
    model = build(kind, attn)
    ids = torch.randint(1, 128, (2, 7))
    report = Report()
    expected, actual, eager_cache, cache = generate_static_both_ways(
        model, ge_target_backend(report, "keep"), ids, 8)
    assert torch.equal(actual, expected)
    assert_caches_close(cache, eager_cache, RTOL, ATOL)
    kv_sites = [s for s in report.sites if s.kind == "kv_update"]
    assert kv_sites and all(s.fused_op == "scatter_update" for s in kv_sites), report.table()
    for gm in report.graph_modules:
        writers = gm.graph.find_nodes(op="call_function", target=npu_attn.scatter_update.default)
        assert len(writers) == 2 * LAYERS
        assert not gm.graph.find_nodes(op="call_function", target=npu_attn.scatter_update_.default)
        assert not gm.graph.find_nodes(op="call_function", target=torch.ops.prims.iota.default)


# float16 carries 11 significant bits (unit roundoff 4.9e-4). Rounding q, k, v and
# the attention output once each gives a few 1e-3 relative error per layer; two
# layers and the LM head of this tiny model stay below 1e-2 relative.
FP16_RTOL, FP16_ATOL = 1e-2, 1e-2


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("gpt2", "eager"), ("bert", "sdpa")])
def test_float32_attention_computed_in_float16(kind, attn):
    model = build(kind, attn)
    ids = torch.randint(1, 128, (2, 11))
    report = Report()
    with torch.no_grad():
        expected = model(ids, attention_mask=torch.ones_like(ids))
        compiled = torch.compile(model, backend=ge_target_backend(report, "float16"), fullgraph=True)
        actual = compiled(ids, attention_mask=torch.ones_like(ids))
    key = "logits" if hasattr(expected, "logits") else "last_hidden_state"
    torch.testing.assert_close(actual[key], expected[key], rtol=FP16_RTOL, atol=FP16_ATOL)
    attention = [s for s in report.sites if s.kind == "attention"]
    assert len(attention) == LAYERS and all(s.precision == "float32 via float16" for s in attention)
    gm = report.graph_modules[0]
    for op in (npu_attn.npu_prompt_flash_attention.default, npu_attn.npu_fused_infer_attention_score.default):
        for node in gm.graph.find_nodes(op="call_function", target=op):
            assert all(a.meta["val"].dtype == torch.float16 for a in node.args[:3])


def test_fp32_attention_unfused_leaves_float32_sites_alone():
    model = build("llama", "sdpa")
    ids = torch.randint(1, 128, (1, 5))
    report = Report()
    with torch.no_grad():
        expected = model(ids).logits
        actual = torch.compile(model, backend=ge_target_backend(report, "unfused"))(ids).logits
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    assert report.sites and not any(s.rewritten for s in report.sites if s.kind == "attention")
    assert all("fp32_attention='unfused'" in s.reason for s in report.sites if s.kind == "attention")


def test_float16_model_needs_no_casts():
    """A float16 model's graph is the same whether float32 sites would be cast or not."""
    model = build("llama", "sdpa").half()
    ids = torch.randint(1, 128, (1, 5))
    codes = []
    for fp32_attention in ("float16", "keep"):
        torch._dynamo.reset()
        report = Report()
        with torch.no_grad():
            torch.compile(model, backend=ge_target_backend(report, fp32_attention))(ids)
        attention = [s for s in report.sites if s.kind == "attention"]
        assert attention and all(s.rewritten and s.precision is None for s in attention)
        codes.append(report.graph_modules[0].code)
    assert codes[0] == codes[1]


def test_functional_paged_kv_writes_match_eager():
    from test_pass_paged_cache import _inputs, store_and_read

    args = _inputs()
    expected_args = [a.clone() for a in args]
    expected = store_and_read(*expected_args)
    report = Report()
    actual = torch.compile(store_and_read, backend=ge_target_backend(report, "keep"), fullgraph=True)(*args)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for mine, theirs in zip(args[2:4], expected_args[2:4]):  # the caches, written through the copy_ back
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert [s.fused_op for s in report.sites] == ["npu_scatter_pa_kv_cache_functional"] * 2
    graph = report.graph_modules[0].graph
    assert len(graph.find_nodes(op="call_function", target=npu_attn.npu_scatter_pa_kv_cache_functional.default)) == 1
    assert len(graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)) == 2
