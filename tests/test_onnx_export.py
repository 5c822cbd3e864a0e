"""npu_attn_graph.export_onnx / onnx_translation_table: npu_attn ops as standard ONNX (issue 14, the ONNX part).

Real clients only: torch.onnx's dynamo exporter with the translation table, onnx.checker (full check, inside
export_onnx), onnxruntime's CPU provider, and transformers' tiny random models (tests/models.py builders).
Each translated op runs in onnxruntime and is compared with the op's own eager (reference) kernel.
"""

from __future__ import annotations

import collections

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from npu_attn_graph import export_onnx, onnx_translation_table  # noqa: E402
from npu_attn_graph.onnx_export import OnnxTranslationError  # noqa: E402

A = torch.ops.npu_attn
ATOL_OP = 1e-5  # fp32, op level
ATOL_MODEL = 1e-4  # fp32 logits
INT_MAX = 2147483647
B, N, NKV, S, D = 2, 4, 2, 6, 16
CAUSAL_2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


class Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def run_onnx(program, inputs) -> list:
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs), names
    return session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})


def op_counts(program) -> collections.Counter:
    return collections.Counter(n.op_type for n in program.model_proto.graph.node)


def export_call(fn, *inputs):
    """fn's torch.export program through export_onnx (the ExportedProgram path): ONNX outputs vs eager."""
    program = export_onnx(torch.export.export(Call(fn), inputs))
    want = fn(*inputs)
    want = list(want) if isinstance(want, tuple) else [want]
    got = run_onnx(program, inputs)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=0, atol=ATOL_OP, msg=lambda m: f"output {i}: {m}")
    return program


def _qkv(layout: str, s_q: int = S, s_kv: int = S, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, s_q, D, generator=g)
    k = torch.randn(B, NKV, s_kv, D, generator=g)
    v = torch.randn(B, NKV, s_kv, D, generator=g)
    if layout == "BNSD" or layout == "BNSD_BSND":
        return q, k, v
    q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    if layout == "BSH":
        q, k, v = (x.flatten(2) for x in (q, k, v))
    return q, k, v


def _mask(shape, seed=1, p=0.3):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


# ---------------------------------------------------------------------------------------------------------
# Attention ops -> Attention: layouts, GQA, scale, masks (NPU True = masked), sparse modes, bands, lengths

PFA = dict(num_heads=N, num_key_value_heads=NKV, scale_value=0.25)


def _pfa(layout, **kw):
    return lambda q, k, v, *m: A.npu_prompt_flash_attention(
        q, k, v, **({"atten_mask": m[0]} if m else {}), input_layout=layout, **PFA, **kw)


ATTENTION_CASES = {
    # name: (fn, inputs)
    "pfa-bnsd-no-mask": (_pfa("BNSD"), _qkv("BNSD")),
    "pfa-bsnd-mask-mode0": (_pfa("BSND", next_tokens=INT_MAX), (*_qkv("BSND"), _mask((B, 1, S, S)))),
    "pfa-bsh-mask-default-next-tokens-0": (_pfa("BSH"), (*_qkv("BSH"), _mask((S, S)))),
    "pfa-mask-larger-than-sequence": (_pfa("BNSD", next_tokens=INT_MAX), (*_qkv("BNSD"), _mask((B, S + 3, S + 5)))),
    "pfa-int8-mask": (_pfa("BNSD", next_tokens=INT_MAX), (*_qkv("BNSD"), _mask((1, 1, S, S)).to(torch.int8))),
    "pfa-mode2-top-left-causal": (_pfa("BNSD", sparse_mode=2), (*_qkv("BNSD", S, S + 3), CAUSAL_2048)),
    "pfa-mode3-bottom-right-causal": (_pfa("BNSD", sparse_mode=3), (*_qkv("BNSD", S, S + 3), CAUSAL_2048)),
    "pfa-mode3-square": (_pfa("BNSD_BSND", sparse_mode=3), (*_qkv("BNSD"), CAUSAL_2048)),
    "pfa-mode4-band": (_pfa("BNSD", sparse_mode=4, pre_tokens=2, next_tokens=1),
                       (*_qkv("BNSD", S, S + 2), CAUSAL_2048)),
    "pfa-mode0-band-with-mask": (_pfa("BNSD", pre_tokens=1, next_tokens=2), (*_qkv("BNSD"), _mask((S, S)))),
    "pfa-lengths": (_pfa("BNSD", actual_seq_lengths=[4, 6], actual_seq_lengths_kv=[5, 3]), _qkv("BNSD")),
    "pfa-lengths-mode3": (_pfa("BNSD", sparse_mode=3, actual_seq_lengths=[4, 6], actual_seq_lengths_kv=[5, 3]),
                          (*_qkv("BNSD"), CAUSAL_2048)),
    "pfa-fully-masked-row": (_pfa("BNSD", next_tokens=INT_MAX),
                             (*_qkv("BNSD"), torch.zeros(S, S, dtype=torch.bool).index_fill_(0, torch.tensor([2]), 1))),
    "pfa-pse-shift-and-mask": (
        lambda q, k, v, m, p: A.npu_prompt_flash_attention(q, k, v, atten_mask=m, pse_shift=p, input_layout="BNSD",
                                                           next_tokens=INT_MAX, **PFA),
        (*_qkv("BNSD"), _mask((S, S)).index_fill_(0, torch.tensor([1]), 1), torch.randn(1, N, S, S))),
    "ifa-bnsd-batch-mask-lengths": (
        lambda q, k, v, m: A.npu_incre_flash_attention(q, k, v, atten_mask=m, num_heads=N, num_key_value_heads=NKV,
                                                       input_layout="BNSD", scale_value=0.3,
                                                       actual_seq_lengths=[5, 6]),
        (*_qkv("BNSD", 1, S), _mask((B, S)))),
    "ifa-bsh": (
        lambda q, k, v: A.npu_incre_flash_attention(q, k, v, num_heads=N, num_key_value_heads=NKV, scale_value=0.3),
        _qkv("BSH", 1, S)),
    "fia-bsnd-mode3": (
        lambda q, k, v, m: A.npu_fused_infer_attention_score(q, k, v, atten_mask=m, num_heads=N, scale=0.25,
                                                             num_key_value_heads=NKV, input_layout="BSND",
                                                             sparse_mode=3),
        (*_qkv("BSND", S, S + 2), CAUSAL_2048)),
    "fia-tnd-equal-segments": (
        lambda q, k, v, m: A.npu_fused_infer_attention_score(q, k, v, atten_mask=m, num_heads=N, scale=0.25,
                                                             num_key_value_heads=NKV, input_layout="TND",
                                                             sparse_mode=3, actual_seq_lengths=[S, 2 * S],
                                                             actual_seq_lengths_kv=[S, 2 * S]),
        (*(x.reshape(B * S, x.shape[2], D) for x in _qkv("BSND")), CAUSAL_2048)),
    "fia-tnd-segments": (
        lambda q, k, v, m: A.npu_fused_infer_attention_score(q, k, v, atten_mask=m, num_heads=N, scale=0.25,
                                                             num_key_value_heads=NKV, input_layout="TND",
                                                             sparse_mode=3, actual_seq_lengths=[4, 12],
                                                             actual_seq_lengths_kv=[5, 12]),
        (*(x.reshape(B * S, x.shape[2], D) for x in _qkv("BSND")), CAUSAL_2048)),
    "fia-query-and-key-rope": (
        lambda q, k, v, qr, kr: A.npu_fused_infer_attention_score(q, k, v, query_rope=qr, key_rope=kr, num_heads=N,
                                                                  scale=0.2, num_key_value_heads=NKV,
                                                                  input_layout="BNSD"),
        (*_qkv("BNSD"), torch.randn(B, N, S, 16), torch.randn(B, NKV, S, 16))),
    "fia-v2-mode3": (
        lambda q, k, v, m: A.npu_fused_infer_attention_score_v2(q, k, v, atten_mask=m, num_query_heads=N,
                                                                num_key_value_heads=NKV, softmax_scale=0.25,
                                                                input_layout="BNSD", sparse_mode=3),
        (*_qkv("BNSD", S, S + 1), CAUSAL_2048)),
    "packed-prompt": (
        lambda q, k, v, m: A.npu_prompt_flash_attention_packed(q, k, v, m, num_heads=N, num_key_value_heads=NKV,
                                                               scale_value=0.25, input_layout="BSND"),
        (*_qkv("BSND"), ~torch.block_diag(torch.ones(2, 2), torch.ones(4, 4)).bool().tril())),
    "packed-fia": (
        lambda q, k, v, m: A.npu_fused_infer_attention_score_packed(q, k, v, m, num_heads=N, num_key_value_heads=NKV,
                                                                    scale=0.25, input_layout="BNSD"),
        (*_qkv("BNSD"), ~torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).bool().tril())),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_op_is_one_onnx_attention(name):
    fn, inputs = ATTENTION_CASES[name]
    program = export_call(fn, *inputs)
    counts = op_counts(program)
    segments = 2 if name == "fia-tnd-segments" else 1  # one Attention per TND segment of unequal lengths
    assert counts["Attention"] == segments, counts
    assert counts["Softmax"] == 0 and not any(n.domain for n in program.model_proto.graph.node)


def test_causal_with_equal_lengths_is_the_attention_flag():
    fn, inputs = ATTENTION_CASES["pfa-mode3-square"]
    program = export_call(fn, *inputs)
    (node,) = [n for n in program.model_proto.graph.node if n.op_type == "Attention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["is_causal"] == 1 and attrs["scale"] == pytest.approx(0.25)
    assert len([i for i in node.input if i]) == 3  # q, k, v: no mask input


def _sink_call(layout, **kw):
    return lambda q, k, v, m, sink: A.npu_fused_infer_attention_score_v2(
        q, k, v, atten_mask=m, learnable_sink=sink, num_query_heads=N, num_key_value_heads=NKV, softmax_scale=0.25,
        input_layout=layout, sparse_mode=3, **kw)


@pytest.mark.parametrize("layout", ["BNSD", "TND"])
def test_learnable_sink_is_decomposed(layout):
    """ONNX Attention has no sink input: the sink joins a plain Softmax as one more column."""
    q, k, v = _qkv("BSND" if layout == "TND" else "BNSD")
    kw = {}
    if layout == "TND":
        q, k, v = (x.reshape(B * S, x.shape[2], D) for x in (q, k, v))
        kw = dict(actual_seq_qlen=[S, 2 * S], actual_seq_kvlen=[S, 2 * S])
    program = export_call(_sink_call(layout, **kw), q, k, v, CAUSAL_2048, torch.randn(N))
    counts = op_counts(program)
    assert counts["Attention"] == 0 and counts["Softmax"] == 1


# ---------------------------------------------------------------------------------------------------------
# Paged K/V: gathered through block_table, positions past the lengths zeroed (unused blocks hold NaN here)

BLOCK = 16


def _paged(layout4: bool, lengths=(20, 7)):
    g = torch.Generator().manual_seed(5)
    blocks = 6
    if layout4:
        k = torch.randn(blocks, NKV, BLOCK, D, generator=g)
        v = torch.randn(blocks, NKV, BLOCK, D, generator=g)
    else:
        k = torch.randn(blocks, BLOCK, NKV * D, generator=g)
        v = torch.randn(blocks, BLOCK, NKV * D, generator=g)
    table = torch.tensor([[4, 1], [2, 0]], dtype=torch.int32)
    k[5] = float("nan")  # a block no batch uses
    v[3] = float("nan")
    return k, v, table, torch.tensor(lengths, dtype=torch.int64)


@pytest.mark.parametrize("cache_rank", [3, 4])
def test_paged_incremental_attention(cache_rank):
    k, v, table, lengths = _paged(cache_rank == 4)
    layout = "BNSD" if cache_rank == 4 else "BSH"
    q = _qkv(layout, 1, 1)[0]
    fn = lambda q, k, v, t, n: A.npu_incre_flash_attention_paged(  # noqa: E731
        q, k, v, block_table=t, actual_seq_lengths=n, num_heads=N, num_key_value_heads=NKV, scale_value=0.25,
        input_layout=layout, block_size=BLOCK)
    program = export_call(fn, q, k, v, table, lengths)
    assert op_counts(program)["Attention"] == 1


def test_paged_fused_infer_causal_chunk():
    k, v, table, lengths = _paged(True, (21, 9))
    q = _qkv("BNSD", 3, 3)[0]
    fn = lambda q, k, v, t, n, m: A.npu_fused_infer_attention_score_paged(  # noqa: E731
        q, k, v, block_table=t, actual_seq_lengths_kv=n, atten_mask=m, num_heads=N, num_key_value_heads=NKV,
        scale=0.25, input_layout="BNSD", block_size=BLOCK, sparse_mode=3)
    program = export_call(fn, q, k, v, table, lengths, CAUSAL_2048)
    assert op_counts(program)["Attention"] == 1


# ---------------------------------------------------------------------------------------------------------
# KV-cache writers -> TensorScatter / ScatterND


def test_scatter_update_per_batch_offsets_is_tensor_scatter():
    cache, new = torch.randn(B, NKV, 8, D), torch.randn(B, NKV, 2, D)
    fn = lambda c, i, u: A.scatter_update(c, i, u, -2)  # noqa: E731
    program = export_call(fn, cache, torch.tensor([1, 5]), new)
    assert op_counts(program)["TensorScatter"] == 1 and op_counts(program)["ScatterND"] == 0


@pytest.mark.parametrize("indices", [torch.tensor([[2, 1], [0, 6]], dtype=torch.int32), torch.tensor([3])])
def test_scatter_update_other_index_forms_are_scatter_nd(indices):
    cache, new = torch.randn(3, 8, NKV, D), torch.randn(indices.shape[0], 2, NKV, D)
    program = export_call(lambda c, i, u: A.scatter_update(c, i, u, 1), cache, indices, new)
    assert op_counts(program)["ScatterND"] == 1


def test_scatter_nd_update():
    cache = torch.randn(4, 5, 6)
    program = export_call(lambda c, i, u: A.npu_scatter_nd_update(c, i, u), cache,
                          torch.tensor([[1, 2], [3, 0]]), torch.randn(2, 6))
    assert op_counts(program)["ScatterND"] == 1


@pytest.mark.parametrize("mode", ["Norm", "PA_NZ"])
def test_scatter_pa_kv_cache_skips_negative_slots(mode):
    tokens, blocks, heads, dim = 3, 3, 2, 16
    key, value = torch.randn(tokens, heads, dim), torch.randn(tokens, heads, dim)
    if mode == "Norm":
        kc, vc = torch.randn(blocks, BLOCK, heads, dim), torch.randn(blocks, BLOCK, heads, dim)
    else:  # fp32: c0 = 8
        kc, vc = torch.randn(blocks, heads * dim // 8, BLOCK, 8), torch.randn(blocks, heads * dim // 8, BLOCK, 8)
    slots = torch.tensor([17, -1, 40], dtype=torch.int32)
    fn = lambda k, v, kc, vc, s: A.npu_scatter_pa_kv_cache_functional(k, v, kc, vc, s, cache_mode=mode)  # noqa: E731
    program = export_call(fn, key, value, kc, vc, slots)
    assert op_counts(program)["ScatterND"] == 2


# ---------------------------------------------------------------------------------------------------------
# What has no translation fails naming the op, the argument and why; never a custom-domain node


def test_table_covers_every_npu_attn_op():
    table = onnx_translation_table()
    names = {str(op).split(".")[1] for op in table}
    defined = {name for name in dir(A) if not name.startswith("_") and hasattr(getattr(A, name), "default")}
    assert defined <= names, defined - names


@pytest.mark.parametrize("fn,inputs,match", [
    (lambda q, k, v: A.npu_fused_infer_attention_score(q, k, v, num_heads=N, num_key_value_heads=NKV,
                                                       input_layout="BNSD", softmax_lse_flag=True),
     _qkv("BNSD"), r"npu_fused_infer_attention_score: softmax_lse_flag.*no log-sum-exp"),
    (lambda q, k, v, s: A.npu_incre_flash_attention(q, k, v, antiquant_scale=s, num_heads=N, num_key_value_heads=NKV,
                                                    input_layout="BNSD"),
     (torch.randn(B, N, 1, 32), torch.ones(B, NKV, S, 32, dtype=torch.int8), torch.ones(B, NKV, S, 32, dtype=torch.int8),
      torch.ones(2, NKV * 32)), r"npu_incre_flash_attention: antiquant_scale: int8"),
    (lambda q, k, v: A.npu_fusion_attention(q, k, v, N, "BNSD")[0],
     (_qkv("BNSD")[0], _qkv("BNSD")[0], _qkv("BNSD")[0]), r"npu_fusion_attention: .*training op"),
])
def test_untranslatable_calls_fail_with_the_reason(fn, inputs, match):
    program = torch.export.export(Call(fn), inputs)
    with pytest.raises(OnnxTranslationError, match=match):
        export_onnx(program)


def test_opset_below_24_is_refused():
    with pytest.raises(ValueError, match="opset_version: must be >= 24"):
        export_onnx(torch.export.export(Call(_pfa("BNSD")), _qkv("BNSD")), opset_version=23)


def test_translation_table_with_torch_onnx_directly(tmp_path):
    """The table as users pass it to torch.onnx themselves."""
    q, k, v = _qkv("BNSD")
    program = torch.onnx.export(Call(_pfa("BNSD")), (q, k, v), dynamo=True, opset_version=24,
                                custom_translation_table=onnx_translation_table())
    program.save(tmp_path / "pfa.onnx")
    onnx.checker.check_model(str(tmp_path / "pfa.onnx"), full_check=True)
    got = run_onnx(program, (q, k, v))[0]
    torch.testing.assert_close(torch.from_numpy(got), _pfa("BNSD")(q, k, v), rtol=0, atol=ATOL_OP)


# ---------------------------------------------------------------------------------------------------------
# Models (transformers, tiny random configs): prefill logits, node counts; StaticCache decode in onnxruntime

transformers = pytest.importorskip("transformers")

from tests.models import MATRIX_LAYERS, build_matrix_model, prefill_call  # noqa: E402
# test_export as pytest imports it (tests/ is on sys.path): its exported decode programs are cached once
# per session for both files.
from test_export import (DECODE_CASES, STEPS, BufferDecode, InputDecode, _first_token, _new_caches,  # noqa: E402
                         exported_decode)

# Gemma2's softcapped scores have no fused NPU op: the rules leave them, and export_onnx folds them
# into Attention(softcap=...).
PREFILL = [(family, attn) for family in ("llama", "qwen2", "gpt2", "bert", "mistral", "gemma3")
           for attn in ("sdpa", "eager")] + [("gemma2", "eager")]
FAST = {("llama", "eager")}


def _flat_inputs(args, kwargs) -> list[torch.Tensor]:
    return [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]


def _logits(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("family,attn", [pytest.param(*c, marks=() if c in FAST else pytest.mark.slow)
                                         for c in PREFILL])
def test_model_prefill(family, attn):
    model = build_matrix_model(family, attn)
    args, kwargs = prefill_call(family, model)
    with torch.no_grad():
        want = _logits(model(*args, **kwargs))
    program = export_onnx(model, args, kwargs)
    got = torch.from_numpy(run_onnx(program, _flat_inputs(args, kwargs))[0])
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL_MODEL)
    counts = op_counts(program)
    assert counts["Attention"] == MATRIX_LAYERS and counts["Softmax"] == 0, counts
    assert not any(n.domain for n in program.model_proto.graph.node)


@pytest.mark.parametrize("family,attn", [pytest.param(*c, marks=() if c == ("llama", "sdpa") else pytest.mark.slow)
                                         for c in DECODE_CASES], ids=[f"{f}-{a}" for f, a in DECODE_CASES])
def test_static_cache_decode_steps_in_onnxruntime(family, attn):
    """One decode step (test_export's program, traced at position 0) exported with the caches as inputs and
    outputs (TensorScatter per cache write), then STEPS greedy steps in onnxruntime feeding the new caches
    back: logits and caches equal eager. The sliding-window families run past the window (a band mask)."""
    model, exported, _ = exported_decode(family, attn)
    program = export_onnx(exported)
    counts = op_counts(program)
    assert counts["TensorScatter"] == 2 * MATRIX_LAYERS and counts["ScatterND"] == 0, counts
    assert counts["Attention"] == MATRIX_LAYERS and counts["Softmax"] == 0, counts  # no MatMul-Softmax-MatMul
    graph = program.model_proto.graph
    if family == "gemma2":  # the softcapped scores folded into Attention(softcap=...); the one Tanh left
        caps = [a.f for n in graph.node if n.op_type == "Attention" for a in n.attribute if a.name == "softcap"]
        assert caps == [model.config.attn_logit_softcapping] * MATRIX_LAYERS, caps
        assert counts["Tanh"] == 1, counts  # is the final logits' softcap (final_logit_softcapping)
    assert len(graph.output) == 2 * MATRIX_LAYERS + 1  # the new caches, then the logits

    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    step = InputDecode(model)
    mine = [c.numpy() for c in _new_caches(model, 2)]
    theirs = _new_caches(model, 2)
    token_a = token_b = _first_token(2)
    with torch.no_grad():
        for position in range(STEPS):
            feeds = dict(zip(names, [token_a.numpy(), torch.tensor([position]).numpy(), *mine]))
            *mine, logits = session.run(None, feeds)
            want = step(token_b, torch.tensor([position]), *theirs)
            torch.testing.assert_close(torch.from_numpy(logits), want, rtol=0, atol=ATOL_MODEL,
                                       msg=lambda m: f"step {position}: {m}")
            token_a, token_b = torch.from_numpy(logits)[:, -1:].argmax(-1), want[:, -1:].argmax(-1)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=0, atol=ATOL_MODEL, msg=lambda m: f"cache {i}: {m}")
    assert theirs[0].abs().sum() > 0


def test_caches_as_buffers_are_refused():
    """An ONNX graph has no state: caches held as mutated buffers would be constants there."""
    model = build_matrix_model("llama", "sdpa")
    with pytest.raises(ValueError, match=r"buffers \['key_0'.* written in place"):
        export_onnx(BufferDecode(model, batch=2), (_first_token(2), torch.tensor([0])))


@pytest.mark.slow
def test_dynamic_batch_and_length():
    """Symbolic batch and length (Mistral: the sliding-window band over symbolic dims), run at other sizes
    with a left-padded row."""
    model = build_matrix_model("mistral", "eager")
    args, kwargs = prefill_call("mistral", model)
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=64)
    program = export_onnx(model, args, kwargs, dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                               "attention_mask": {0: batch, 1: seq},
                                                               "use_cache": None})
    assert op_counts(program)["Attention"] == MATRIX_LAYERS and op_counts(program)["Softmax"] == 0
    for b, s in ((3, 11), (1, 4)):
        ids = torch.randint(3, 128, (b, s), generator=torch.Generator().manual_seed(b))
        mask = torch.ones_like(ids)
        mask[-1, : s // 3] = 0
        with torch.no_grad():
            want = model(ids, attention_mask=mask, use_cache=False).logits
        got = torch.from_numpy(run_onnx(program, [ids, mask])[0])
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL_MODEL, msg=lambda m: f"B={b}, S={s}: {m}")


@pytest.mark.parametrize("sparse_mode,pre,nxt", [(2, INT_MAX, 0), (3, INT_MAX, 0), (4, 2, 1), (0, 1, 0)])
def test_symbolic_query_length_of_one_ignores_the_band(sparse_mode, pre, nxt):
    """fused_infer with a symbolic S_q: at S_q == 1 the op ignores sparse_mode and pre/next tokens,
    at S_q > 1 it applies them; the ONNX graph does both."""
    mask = CAUSAL_2048 if sparse_mode else _mask((1, 1, S, S + 2))
    fn = lambda q, k, v, m: A.npu_fused_infer_attention_score(  # noqa: E731
        q, k, v, atten_mask=m, num_heads=N, num_key_value_heads=NKV, scale=0.25, input_layout="BNSD",
        sparse_mode=sparse_mode, pre_tokens=pre, next_tokens=nxt)
    q, k, v = _qkv("BNSD", 3, S + 2)
    s_q = torch.export.Dim("s_q", min=1, max=S)
    program = export_onnx(torch.export.export(Call(fn), (q, k, v, mask), dynamic_shapes=(({2: s_q}, None, None, None),)))
    for length in (1, 3, S):
        q = _qkv("BNSD", length, S + 2, seed=length)[0]
        got = torch.from_numpy(run_onnx(program, (q, k, v, mask))[0])
        torch.testing.assert_close(got, fn(q, k, v, mask)[0], rtol=0, atol=ATOL_OP, msg=lambda m: f"S_q={length}: {m}")


def test_float16_attention():
    """fp16 in, fp16 out: onnxruntime's fp16 Attention vs the fp64 reference (fp16 rounds to ~1e-3 here)."""
    q, k, v = (x.half() for x in _qkv("BSND"))
    fn = lambda q, k, v, m: A.npu_prompt_flash_attention(  # noqa: E731
        q, k, v, atten_mask=m, input_layout="BSND", sparse_mode=3, **PFA)
    program = export_onnx(torch.export.export(Call(fn), (q, k, v, CAUSAL_2048)))
    got = torch.from_numpy(run_onnx(program, (q, k, v, CAUSAL_2048))[0])
    assert got.dtype == torch.float16
    want = fn(q.double(), k.double(), v.double(), CAUSAL_2048)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-3)


class InPlaceWrites(torch.nn.Module):
    """In-place writers, the caches read after the write (as the rewritten programs read them)."""

    def forward(self, k, v, kc, vc, slots, cache, starts, new):
        A.npu_scatter_pa_kv_cache(k, v, kc, vc, slots, cache_mode="Norm")
        A.scatter_update_(cache, starts, new, -2)
        return kc.sum(-1) + vc.sum(-1), cache * 2


@pytest.mark.parametrize("decomposed", [False, True])
def test_in_place_writers_are_read_after_the_write(decomposed):
    """As exported, and decomposed after export (the writers as auto_functionalized_v2 calls, whose new
    bases are then graph outputs too)."""
    inputs = (torch.randn(3, 2, 16), torch.randn(3, 2, 16), torch.zeros(3, BLOCK, 2, 16), torch.zeros(3, BLOCK, 2, 16),
              torch.tensor([17, -1, 40], dtype=torch.int32), torch.zeros(B, NKV, 8, D), torch.tensor([1, 3]),
              torch.randn(B, NKV, 2, D))
    program = torch.export.export(InPlaceWrites(), inputs)
    if decomposed:
        program = program.run_decompositions()
        assert any("auto_functionalized" in str(n.target) for n in program.graph.nodes)
    program = export_onnx(program)
    counts = op_counts(program)
    assert counts["ScatterND"] == 2 and counts["TensorScatter"] == 1, counts
    got = run_onnx(program, inputs)
    written = [x.clone() for x in inputs]
    want = InPlaceWrites()(*written)
    if decomposed:  # the written inputs (key/value cache, cache) come first
        want = (written[2], written[3], written[5], *want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=0, atol=ATOL_OP)


class SoftcapAttention(torch.nn.Module):
    """Gemma2's spelling: softmax(cap * tanh(q @ k^T * scale / cap) + mask) @ v; or, mask_first, the mask
    added inside the tanh (another function, which must stay as written)."""

    def __init__(self, cap: float, mask_first: bool = False):
        super().__init__()
        self.cap, self.mask_first = cap, mask_first

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.25
        if self.mask_first:
            scores = scores + mask
        scores = torch.tanh(scores / self.cap) * self.cap
        if not self.mask_first:
            scores = scores + mask
        return torch.matmul(torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("mask_first", [False, True])
def test_softcap_attention_folds_into_attention(mask_first):
    q, k, v = (torch.randn(B, N, S, D, generator=torch.Generator().manual_seed(i)) * 3 for i in range(3))
    mask = torch.zeros(B, 1, S, S).masked_fill(_mask((B, 1, S, S)), torch.finfo(torch.float32).min)
    module = SoftcapAttention(cap=2.0, mask_first=mask_first)
    program = export_onnx(torch.export.export(module, (q, k, v, mask)))
    got = torch.from_numpy(run_onnx(program, (q, k, v, mask))[0])
    torch.testing.assert_close(got, module(q, k, v, mask), rtol=0, atol=ATOL_OP)
    counts = op_counts(program)
    assert (counts["Attention"], counts["Softmax"]) == ((0, 1) if mask_first else (1, 0)), counts
