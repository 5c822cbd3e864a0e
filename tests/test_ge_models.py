"""Whole models become one Ascend GE graph through the real TorchAir (loaded
offline from the torch-npu wheel; only the GE runtime is a stand-in, see
npu_attn_graph/_torchair_offline_native.py), and what TorchAir does without
our passes, recorded per model.

Models: Llama (GQA), Qwen2, GPT-2, BERT (tiny random configs), with sdpa and
eager attention; prefill, static-cache prefill and static-cache decode.
"""

from __future__ import annotations

import pytest
import torch

from npu_attn_graph import to_ge_graph

pytest.importorskip("transformers")

from models import LAYERS, SCENARIOS, build, scenario_call, static_decode_to_ge  # noqa: E402

ATTENTION_TYPES = {"PromptFlashAttention", "IncreFlashAttention", "FusedInferAttentionScore"}
# GE op types of attention left as plain math (TorchAir's converters for bmm / softmax).
PLAIN_ATTENTION_TYPES = {"BatchMatMul", "BatchMatMulV2", "SoftmaxV2"}


def convert(kind: str, attn: str, scenario: str, tmp_path, **options):
    model, args, kwargs = scenario_call(kind, attn, scenario)
    with torch.no_grad():
        return to_ge_graph(model, *args, options=options or None, out_dir=tmp_path, **kwargs)


def expected_attention_type(scenario: str) -> str:
    return "IncreFlashAttention" if scenario == "static_decode" else "PromptFlashAttention"


def producers(graph_def) -> dict:
    return {op.name: op for op in graph_def.op}


def input_op(ops: dict, op, index: int):
    return ops[op.input[index].split(":")[0]]


@pytest.mark.parametrize("kind,attn,scenario", SCENARIOS)
def test_model_becomes_one_ge_graph_with_fused_ops(kind, attn, scenario, tmp_path):
    result = convert(kind, attn, scenario, tmp_path)
    assert result.single_graph, result.summary()
    assert result.graph_count == 1 and result.pbtxt_path.is_file()
    types = result.op_type_counts
    # Every attention site is one fused GE op of the expected kind; none stays as plain math.
    assert {t: n for t, n in types.items() if t in ATTENTION_TYPES} == {expected_attention_type(scenario): LAYERS}
    assert not PLAIN_ATTENTION_TYPES & set(types), result.summary()
    assert not [t for t in types if t.startswith(("aten.", "prims."))]  # no unconverted placeholders
    kv_writes = 2 * LAYERS if scenario.startswith("static") else 0
    assert types.get("Scatter", 0) == kv_writes
    assert all(site.rewritten for site in result.report.sites), result.report.table()
    # The float32 model's attention runs in float16 inside the fused op (the NPU ops take no float32);
    # reading a static cache, the cast covers the whole cache, which the report says.
    for site in result.report.sites:
        if site.kind == "attention":
            assert site.precision.startswith("float32 via float16")
            assert ("casts the whole KV cache" in site.precision) == scenario.startswith("static")


@pytest.mark.parametrize("kind,attn,scenario", [s for s in SCENARIOS if s[2] == "static_decode"])
def test_kv_cache_writes_are_in_place_in_the_ge_graph(kind, attn, scenario, tmp_path):
    """Each Scatter writes a cache graph input (a Data op) directly: no
    TensorMove copy of the cache before it, no Assign back after it, and the
    attention reads the Scatter's (in-place) output. (In static_prefill the
    caches are allocated inside the graph, transformers' lazy StaticCache
    initialization, so there is no cache input to write.)"""
    graph_def = convert(kind, attn, scenario, tmp_path).graphs[0].graph_def
    ops = producers(graph_def)
    scatters = [op for op in graph_def.op if op.type == "Scatter"]
    assert len(scatters) == 2 * LAYERS
    caches = {input_op(ops, op, 0).name for op in scatters}
    assert len(caches) == len(scatters), "each Scatter writes its own cache"
    assert all(ops[name].type == "Data" for name in caches)
    assert all(op.attr["reduce"].s == b"update" for op in scatters)
    for op in graph_def.op:
        if op.type in ("TensorMove", "Assign", "Identity"):
            assert not {i.split(":")[0] for i in op.input} & caches, f"{op.type} {op.name} copies a cache"
    cache_readers = [op for op in graph_def.op if op.type not in ("Scatter",)
                     and {i.split(":")[0] for i in op.input} & caches]
    assert not cache_readers, f"read the cache before its write: {[op.name for op in cache_readers]}"
    netoutput = next(op for op in graph_def.op if op.type == "NetOutput")
    assert not {input_op(ops, netoutput, i).name for i in range(len(netoutput.input))} & {s.name for s in scatters}
    # Attention reads the written caches: through the float16 cast of this float32 model
    # (see test_float16_model_decode_reads_the_cache_without_any_copy for a float16 model).
    for attention in (op for op in graph_def.op if op.type == "IncreFlashAttention"):
        for index in (1, 2):  # key0, value0
            cast = input_op(ops, attention, index)
            assert cast.type == "Cast" and input_op(ops, cast, 0).type == "Scatter"


def test_float16_model_decode_reads_the_cache_without_any_copy(tmp_path):
    """A float16 Llama decode step: each IncreFlashAttention reads its key and
    value straight from the in-place Scatter on the cache input: no cast, no
    copy of the cache anywhere in the GE graph."""
    pytest.importorskip("transformers")
    model = build("llama", "sdpa").half()
    result = static_decode_to_ge(model, torch.randint(1, 128, (2, 7)), tmp_path)
    assert result.single_graph, result.summary()
    graph_def = result.graphs[0].graph_def
    ops = producers(graph_def)
    attentions = [op for op in graph_def.op if op.type == "IncreFlashAttention"]
    assert len(attentions) == LAYERS
    for attention in attentions:
        for index in (1, 2):
            scatter = input_op(ops, attention, index)
            assert scatter.type == "Scatter" and input_op(ops, scatter, 0).type == "Data"
    assert not {"TensorMove", "Assign"} & set(result.op_type_counts)
    assert all(s.precision is None for s in result.report.sites)


# What TorchAir 2.13.0 does with these models on its own (no npu_attn passes).
BASELINE = {
    "sdpa": "stops at aten._scaled_dot_product_*",
    "static": "stops at aten.index_copy",
    "eager": "converts, with BatchMatMul and SoftmaxV2 and no fused attention op",
}


def baseline_outcome(result) -> str:
    targets = sorted({node.target for node in result.unconverted})
    if targets:
        kinds = {"aten._scaled_dot_product_*" if t.startswith("aten._scaled_dot_product") else
                 "aten.index_copy" if t.startswith("aten.index_copy") else t for t in targets}
        return "stops at " + " and ".join(sorted(kinds))
    types = result.op_type_counts
    fused = ATTENTION_TYPES & set(types)
    plain = sorted(t for t in ("BatchMatMul", "SoftmaxV2") if t in types)
    return (f"converts, with {' and '.join(plain)} and "
            f"{'fused attention ' + str(sorted(fused)) if fused else 'no fused attention op'}")


@pytest.mark.parametrize("kind,attn,scenario", SCENARIOS)
def test_torchair_alone_cannot_fuse_these_models(kind, attn, scenario, tmp_path):
    """Without our passes TorchAir either stops at an ATen op it has no GE
    converter for, or converts attention as plain batched matmul + softmax.
    The unsupported ops are named; a different outcome (a newer TorchAir) fails
    here with the new behaviour spelled out."""
    result = convert(kind, attn, scenario, tmp_path, passes=[])
    outcome = baseline_outcome(result)
    expected = {BASELINE[attn]}
    if scenario.startswith("static"):
        expected = {BASELINE["static"]} if attn == "eager" else \
            {"stops at aten._scaled_dot_product_* and aten.index_copy"}
    assert outcome in expected, f"TorchAir alone changed for {kind}/{attn}/{scenario}: now it {outcome}\n" \
                                f"{result.summary()}"
    for node in result.unconverted:  # TorchAir's own reason is kept
        assert node.reason and node.node and node.graph == result.graphs[0].name


def test_training_step_gives_forward_and_backward_ge_graphs_with_fusion_attention(tmp_path):
    """With gradients, attention becomes npu_fusion_attention before AOT; both
    the forward and the backward graph reach GE, as FlashAttentionScore and
    FlashAttentionScoreGrad."""
    model, (ids,), kwargs = scenario_call("bert", "sdpa", "prefill")
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # dropout > 0 is left alone in training graphs (the RNGs differ)
    result = to_ge_graph(model, ids, out_dir=tmp_path, **kwargs)
    assert [g.complete for g in result.graphs] == [True, True], result.summary()
    forward, backward = (g.op_types for g in result.graphs)
    assert forward["FlashAttentionScore"] == LAYERS and not PLAIN_ATTENTION_TYPES & set(forward)
    assert backward["FlashAttentionScoreGrad"] == LAYERS and not PLAIN_ATTENTION_TYPES & set(backward)
    assert {s.graph for s in result.report.sites} == {"training"}
    assert all(s.fused_op == "npu_fusion_attention" for s in result.report.sites)


def test_paged_kv_writes_are_one_in_place_scatter_pa_kv_cache(tmp_path):
    """vLLM-style slot-mapping writes of a key and a value cache: one
    ScatterPaKvCache writing both cache inputs directly."""
    from test_pass_paged_cache import _inputs, store_and_read

    result = to_ge_graph(store_and_read, *_inputs(), out_dir=tmp_path)
    assert result.single_graph, result.summary()
    graph_def = result.graphs[0].graph_def
    ops = producers(graph_def)
    (scatter,) = [op for op in graph_def.op if op.type == "ScatterPaKvCache"]
    caches = {input_op(ops, scatter, 1).name, input_op(ops, scatter, 4).name}  # key_cache, value_cache
    assert len(caches) == 2 and all(ops[name].type == "Data" for name in caches)
    assert not [op.name for op in graph_def.op if op.type in ("TensorMove", "Assign")
                and {i.split(":")[0] for i in op.input} & caches]
    assert not {"IndexPut", "ScatterNd", "ScatterNdUpdate"} & set(result.op_type_counts)


def test_dynamic_cache_decode_with_symbolic_shapes_is_one_ge_graph(tmp_path):
    """A DynamicCache decode step compiled with dynamic=True (one graph for every
    KV length): attention is one fused GE op per layer on symbolic KV. (SDPA
    only: the eager-attention pattern does not match graphs traced with every
    dimension symbolic; see the README.)"""
    transformers = pytest.importorskip("transformers")
    model = build("llama", "sdpa")
    ids = torch.randint(1, 128, (1, 9))
    with torch.no_grad():
        cache = transformers.DynamicCache(config=model.config)
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        result = to_ge_graph(model, token, past_key_values=cache, use_cache=True, dynamic=True, out_dir=tmp_path)
    assert result.single_graph, result.summary()
    assert result.op_type_counts["IncreFlashAttention"] == LAYERS
    assert not PLAIN_ATTENTION_TYPES & set(result.op_type_counts)
    symbolic = [n for n in result.report.graphs_before[0].nodes if n.op == "placeholder"
                and any(isinstance(d, torch.SymInt) for d in getattr(n.meta.get("val"), "shape", ()))]
    assert symbolic, "the graph has symbolic shapes"
