"""npu_attn_graph.export: torch.export programs with the fused ops (issue 14, the pt2 part).

Real clients only: transformers' tiny random models (tests/models.py builders), torch.export's
own export / run_decompositions / save / load, and a fresh Python process for the round trip.
"""

from __future__ import annotations

import collections
import copy
import functools
import subprocess
import sys
import textwrap

import pytest
import torch

import npu_attn_graph
from npu_attn_graph import Report

transformers = pytest.importorskip("transformers")

from tests.models import MATRIX_FAMILIES, MATRIX_LAYERS, WINDOW, build_matrix_model, prefill_call  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5  # fp32 logits (the issue asks atol 1e-4 or tighter)
ATTENTION_OPS = ("npu_prompt_flash_attention", "npu_incre_flash_attention", "npu_fused_infer_attention_score",
                 "npu_incre_flash_attention_paged", "npu_fused_infer_attention_score_paged")  # (KV lengths as a tensor)
STEPS = 8
CACHE_LEN = 16


def fused_counts(program: torch.export.ExportedProgram) -> collections.Counter:
    return collections.Counter(n.target.__name__.split(".")[0] for n in program.graph.nodes
                               if n.op == "call_function" and str(n.target).startswith("npu_attn."))


def attention_count(program) -> int:
    counts = fused_counts(program)
    return sum(counts[name] for name in ATTENTION_OPS)


def output(result) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def compare_prefill(family, model, program, args, kwargs) -> None:
    with torch.no_grad():
        expected, actual = output(model(*args, **kwargs)), output(program.module()(*args, **kwargs))
    if family == "bert":  # right padding: the padded rows are undefined
        valid = kwargs["attention_mask"].bool()
        expected, actual = expected[valid], actual[valid]
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


@functools.lru_cache(maxsize=None)
def exported_prefill(family: str, attn: str):
    """(model, args, kwargs, program, report) of the family's prefill, exported once per test session."""
    model = build_matrix_model(family, attn)
    args, kwargs = prefill_call(family, model)
    report = Report()
    program = npu_attn_graph.export(model, args, kwargs, options={"report": report})
    return model, args, kwargs, program, report


PREFILL_CASES = [(family, attn) for family in ("llama", "qwen2", "gpt2", "bert", "mistral", "gemma3", "gemma2")
                 for attn in MATRIX_FAMILIES[family][2]]


@pytest.mark.parametrize("family,attn", PREFILL_CASES, ids=[f"{f}-{a}" for f, a in PREFILL_CASES])
def test_prefill_fused_and_equal_to_eager(family, attn):
    model, args, kwargs, program, report = exported_prefill(family, attn)
    assert program.npu_attn_report is report
    attention_sites = [s for s in report.sites if s.kind == "attention"]
    assert len(attention_sites) == MATRIX_LAYERS, report.table()  # every layer listed, fused or not
    if family == "gemma2":  # logit softcapping: no NPU inference op computes it, the sites stay with the reason
        assert attention_count(program) == 0 and not report.fused()
        assert all("softcap" in s.reason for s in attention_sites), report.table()
    else:
        assert attention_count(program) == MATRIX_LAYERS and len(report.fused("attention")) == MATRIX_LAYERS, \
            report.table()
    compare_prefill(family, model, program, args, kwargs)


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("bert", "sdpa")])
def test_program_decomposed_before_export(family, attn):
    """A program the user decomposed to core ATen (SDPA becomes math with the _safe_softmax
    fix-up, every Tensor.to an _assert_tensor_metadata): the sites are found and fused."""
    model = build_matrix_model(family, attn)
    args, kwargs = prefill_call(family, model)
    decomposed = torch.export.export(model, args, kwargs).run_decompositions()
    report = Report()
    program = npu_attn_graph.export(decomposed, options={"report": report})
    assert attention_count(program) == MATRIX_LAYERS, report.table()
    compare_prefill(family, model, program, args, kwargs)


def test_program_decomposed_after_export_keeps_the_fused_ops():
    model, args, kwargs, exported, _ = exported_prefill("llama", "eager")
    program = exported.run_decompositions()
    assert attention_count(program) == MATRIX_LAYERS
    compare_prefill("llama", model, program, args, kwargs)


class MaskedAttention(torch.nn.Module):
    """SDPA with a boolean mask: one query row of batch 1 keeps no key (SDPA gives 0 there)."""

    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_decomposed_safe_softmax_fully_masked_row():
    """core ATen spells _safe_softmax as where(all(x == -inf), 0, softmax(x)): the rewritten
    program gives what the decomposed program gives on the same inputs, 0 on the empty row."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    mask[:, :, :, 0] = True
    mask[1, :, 2] = False
    args = (q, k, v, mask)
    decomposed = torch.export.export(MaskedAttention(), args).run_decompositions()
    assert any(n.target is torch.ops.aten.any.dim for n in decomposed.graph.nodes)  # the fix-up is there
    report = Report()
    program = npu_attn_graph.export(decomposed, options={"report": report})
    assert attention_count(program) == 1, report.table()
    expected, actual = decomposed.module()(*args), program.module()(*args)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(actual[1, :, 2], torch.zeros_like(actual[1, :, 2]))


# ---------------------------------------------------------------------------
# StaticCache decode steps: caches as module buffers, and caches as inputs


def _kv_shape(model) -> tuple[int, int]:
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def static_cache(model) -> "transformers.StaticCache":
    """A StaticCache of CACHE_LEN whose sliding-window layers are full-length StaticLayers, as transformers'
    own export recipe (TorchExportableModuleWithHybridCache) builds it: the window is then the mask's band.
    transformers' StaticSlidingWindowLayer keeps its fill level as a Python int (its write branch, the mask's
    query offset and, without position_ids, the positions), which torch.export bakes in at the traced step."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, transformers.cache_utils.StaticSlidingWindowLayer):
            cache.layers[i] = transformers.cache_utils.StaticLayer(CACHE_LEN)
    return cache


class BufferDecode(torch.nn.Module):
    """One decode step of a transformers model whose StaticCache tensors are this module's buffers
    (as transformers' TorchExportableModuleWithStaticCache holds them)."""

    def __init__(self, model, batch: int):
        super().__init__()
        self.model = model
        self.cache = static_cache(model)
        self.cache.early_initialization(batch, *_kv_shape(model), torch.float32, torch.device("cpu"))
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_{i}", layer.values, persistent=False)

    def forward(self, ids, cache_position):
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = getattr(self, f"key_{i}"), getattr(self, f"value_{i}")
            layer.cumulative_length = cache_position[0].clone()
        return self.model(ids, past_key_values=self.cache, cache_position=cache_position, use_cache=True).logits


class InputDecode(torch.nn.Module):
    """One decode step whose StaticCache tensors are the caller's inputs, written in place."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.cache = static_cache(model)

    def forward(self, ids, cache_position, *caches):
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = caches[2 * i], caches[2 * i + 1]
            layer.dtype, layer.device = layer.keys.dtype, layer.keys.device
            layer.k_head_dim = layer.v_head_dim = layer.keys.shape[-1]
            layer.cumulative_length = cache_position[0].clone()
            layer.is_initialized = True
        return self.model(ids, past_key_values=self.cache, cache_position=cache_position, use_cache=True).logits


def _new_caches(model, batch: int) -> list[torch.Tensor]:
    heads, dim = _kv_shape(model)
    return [torch.zeros(batch, heads, CACHE_LEN, dim) for _ in range(2 * model.config.num_hidden_layers)]


def _first_token(batch: int) -> torch.Tensor:
    return torch.randint(3, 128, (batch, 1), generator=torch.Generator().manual_seed(3))


def run_steps(step_a, step_b, caches_a=(), caches_b=(), batch: int = 2) -> None:
    """STEPS greedy decode steps of both, each fed its own argmax; logits compared at each step."""
    token_a = token_b = _first_token(batch)
    with torch.no_grad():
        for position in range(STEPS):
            a = step_a(token_a, torch.tensor([position]), *caches_a)
            b = step_b(token_b, torch.tensor([position]), *caches_b)
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {position}: {m}")
            token_a, token_b = a[:, -1:].argmax(-1), b[:, -1:].argmax(-1)


def _assert_decode_program(program, report, family):
    counts = fused_counts(program)
    assert counts["scatter_update_"] == 2 * MATRIX_LAYERS, report.table()  # in place, no copy back
    attention_sites = [s for s in report.sites if s.kind == "attention"]
    assert len(attention_sites) == MATRIX_LAYERS, report.table()
    if family == "gemma2":  # logit softcapping: no NPU op computes it, the sites stay with the reason
        assert attention_count(program) == 0 and all("softcap" in s.reason for s in attention_sites), report.table()
    else:
        assert attention_count(program) == MATRIX_LAYERS, report.table()
    mutations = [s for s in program.graph_signature.output_specs if s.kind.name.endswith("MUTATION")]
    assert len(mutations) >= 2 * MATRIX_LAYERS
    writers = {n.name for n in program.graph.nodes if "scatter_update_" in str(n.target)}
    cache_mutations = [s for s in mutations if s.arg.name in writers]
    assert len(cache_mutations) == 2 * MATRIX_LAYERS  # each cache's mutation is its writer's result
    assert not any(n.target is torch.ops.aten.copy_.default for n in program.graph.nodes)


# Every decoder family of the issue, each attention implementation transformers has for it. BERT is an
# encoder: no decode step.
DECODE_CASES = [(family, attn) for family in ("llama", "qwen2", "gpt2", "mistral", "gemma3", "gemma2")
                for attn in MATRIX_FAMILIES[family][2]]
SLIDING = ("mistral", "gemma3", "gemma2")


@functools.lru_cache(maxsize=None)
def exported_decode(family: str, attn: str):
    """(model, program, report): one StaticCache decode step, caches as inputs written in place, traced at
    position 0 and exported once per test session (tests/test_onnx_export.py takes it to ONNX)."""
    model = build_matrix_model(family, attn)
    report = Report()
    program = npu_attn_graph.export(InputDecode(model), (_first_token(2), torch.tensor([0]), *_new_caches(model, 2)),
                                    options={"report": report})
    return model, program, report


def eager_steps(model, steps: int = STEPS) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(tokens fed, logits, final caches) of `steps` greedy eager steps of InputDecode from empty caches."""
    step, caches, token = InputDecode(model), _new_caches(model, 2), _first_token(2)
    tokens, logits = [], []
    with torch.no_grad():
        for position in range(steps):
            tokens.append(token)
            logits.append(step(token, torch.tensor([position]), *caches))
            token = logits[-1][:, -1:].argmax(-1)
    return tokens, logits, caches


@pytest.mark.parametrize("family,attn", DECODE_CASES, ids=[f"{f}-{a}" for f, a in DECODE_CASES])
def test_static_cache_decode_inputs(family, attn):
    """The decode step traced at position 0 serves every position: STEPS greedy steps of .module(), each fed
    its own token, equal eager, caches included. For the sliding-window families the steps run past the
    window (WINDOW < STEPS), where the window is the mask's band over full-length caches."""
    model, program, report = exported_decode(family, attn)
    _assert_decode_program(program, report, family)
    mine, theirs = _new_caches(model, 2), _new_caches(model, 2)
    run_steps(program.module(), InputDecode(model), mine, theirs)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"cache {i}: {m}")
    assert theirs[0].abs().sum() > 0  # the steps did write the caches
    if family in SLIDING:
        # The eager reference itself (full-length caches) equals transformers' own StaticCache, whose
        # sliding layers keep only the last WINDOW positions, over the same steps.
        assert WINDOW < STEPS
        tokens, logits, _ = eager_steps(model)
        cache = transformers.StaticCache(config=model.config, max_cache_len=CACHE_LEN)
        with torch.no_grad():
            for position, (token, expected) in enumerate(zip(tokens, logits)):
                actual = model(token, past_key_values=cache, cache_position=torch.tensor([position])).logits
                torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{position}: {m}")


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("gpt2", "eager")])
def test_static_cache_decode_buffers(family, attn):
    model = build_matrix_model(family, attn)
    step = BufferDecode(model, batch=2)
    eager = copy.deepcopy(step)
    report = Report()
    program = npu_attn_graph.export(step, (_first_token(2), torch.tensor([0])), options={"report": report})
    _assert_decode_program(program, report, family)
    exported = program.module()
    run_steps(exported, eager)
    buffers = dict(exported.named_buffers())
    for name, expected in eager.named_buffers():
        torch.testing.assert_close(buffers[name], expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    assert buffers["key_0"].abs().sum() > 0  # the steps did write the caches


def test_static_cache_decode_decomposed_after_export():
    """Decomposed again (save/load: test_pt2_round_trip_in_a_fresh_process), the in-place writers become
    auto_functionalized calls of the same op; the program still equals eager, caches included."""
    model, program, _ = exported_decode("llama", "sdpa")
    decomposed = program.run_decompositions()
    assert sum(n.target is torch.ops.higher_order.auto_functionalized_v2 for n in decomposed.graph.nodes) == \
        2 * MATRIX_LAYERS
    mine, theirs = _new_caches(model, 2), _new_caches(model, 2)
    run_steps(decomposed.module(), InputDecode(model), mine, theirs)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_paged_decode_step_with_a_writer_that_returns_nothing(tmp_path):
    """npu_scatter_pa_kv_cache writes both caches in place and returns nothing: the mutation
    outputs are then the cache inputs themselves (before, export() raised). Saved, loaded and
    exported to ONNX (Attention + ScatterND), it equals eager, caches included."""
    from tests.test_paged_attention_read import decode_inputs, decode_step

    class Step(torch.nn.Module):
        def forward(self, *args):
            return decode_step(*args)

    args = decode_inputs()
    ref = [a.clone() for a in args]
    expected = decode_step(*ref)
    report = Report()
    program = npu_attn_graph.export(Step(), tuple(a.clone() for a in args), options={"report": report})
    assert sorted((s.kind, s.fused_op) for s in report.sites) == [
        ("attention", "npu_incre_flash_attention_paged"), ("kv_update", "npu_scatter_pa_kv_cache"),
        ("kv_update", "npu_scatter_pa_kv_cache")], report.table()
    torch.export.save(program, tmp_path / "paged.pt2")
    for ep in (program, torch.export.load(tmp_path / "paged.pt2")):
        mine = [a.clone() for a in args]
        torch.testing.assert_close(ep.module()(*mine), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine[3], ref[3], rtol=0, atol=0)
        torch.testing.assert_close(mine[4], ref[4], rtol=0, atol=0)
    onnx_program = npu_attn_graph.export_onnx(program)
    k_cache, v_cache, out = onnx_program(*[a.clone() for a in args])
    assert "Attention" in {n.op_type for n in onnx_program.model_proto.graph.node}
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, ref[3], rtol=0, atol=0)
    torch.testing.assert_close(v_cache, ref[4], rtol=0, atol=0)


# ---------------------------------------------------------------------------
# The pt2 round trip in a fresh process


ROUND_TRIP = """
import sys, torch
import npu_attn_graph  # registers the npu_attn ops: torch.export.load needs them
import transformers.modeling_outputs  # the programs return transformers' output types (pytree nodes)
def close(actual, expected):
    diff = (actual - expected).abs().max().item()
    return diff, diff <= 1e-5 + 1e-4 * expected.abs().max().item()
failures = []
for name in sys.argv[1:]:
    data = torch.load(name + ".inputs", weights_only=False)
    program = torch.export.load(name + ".pt2")
    fused = sum(str(n.target).startswith("npu_attn.") for n in program.graph.nodes)
    module = program.module()
    with torch.no_grad():
        if "tokens" in data:  # decode steps: eager's tokens fed in turn, the caches written in place
            caches = [torch.zeros_like(c) for c in data["caches"]]
            results = [close(module(t, torch.tensor([p]), *caches), e)
                       for p, (t, e) in enumerate(zip(data["tokens"], data["expected"]))]
            results += [close(a, b) for a, b in zip(caches, data["caches"])]
        else:
            out = module(*data["args"], **data["kwargs"])
            out, expected = out if isinstance(out, torch.Tensor) else out[0], data["expected"]
            if "valid" in data:  # right padding (BERT): the padded rows are undefined
                out, expected = out[data["valid"]], expected[data["valid"]]
            results = [close(out, expected)]
    print(name.rsplit("/", 1)[-1], fused, max(d for d, _ in results))
    if fused != data["fused"] or not all(ok for _, ok in results):
        failures.append(name)
sys.exit(1 if failures else 0)
"""


# One program per family of each kind, the attention implementations alternated, so that every family and
# every (family, attention) pair with a decode step is loaded once (each load costs ~1 s of CPU).
ROUND_TRIP_PREFILL = [("llama", "eager"), ("qwen2", "sdpa"), ("gpt2", "eager"), ("bert", "sdpa"),
                      ("mistral", "eager"), ("gemma3", "sdpa"), ("gemma2", "eager")]
ROUND_TRIP_DECODE = [("llama", "sdpa"), ("qwen2", "eager"), ("gpt2", "sdpa"), ("mistral", "sdpa"),
                     ("gemma3", "eager"), ("gemma2", "eager")]
ROUND_TRIP_STEPS = 2  # the second step reads what the first wrote; test_static_cache_decode_inputs runs STEPS


def test_pt2_round_trip_in_a_fresh_process(tmp_path):
    """Prefill and decode programs from above, saved, loaded in one fresh process and run: equal to eager
    (prefill logits; decode logits at each step and the caches after them), with the same fused ops."""
    names = []
    for kind, cases in (("prefill", ROUND_TRIP_PREFILL), ("decode", ROUND_TRIP_DECODE)):
        for family, attn in cases:
            name = str(tmp_path / f"{kind}-{family}-{attn}")
            if kind == "prefill":
                model, args, kwargs, program, _ = exported_prefill(family, attn)
                with torch.no_grad():
                    expected = output(model(*args, **kwargs))
                data = {"args": args, "kwargs": kwargs, "expected": expected}
                if family == "bert":
                    data["valid"] = kwargs["attention_mask"].bool()
            else:
                model, program, _ = exported_decode(family, attn)
                tokens, logits, caches = eager_steps(model, ROUND_TRIP_STEPS)
                data = {"tokens": tokens, "expected": logits, "caches": caches}
            data["fused"] = sum(fused_counts(program).values())
            torch.export.save(program, name + ".pt2")
            torch.save(data, name + ".inputs")
            names.append(name)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(ROUND_TRIP), *names], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(result.stdout.strip().splitlines()) == len(names), result.stdout


# ---------------------------------------------------------------------------
# Options and arguments


class EagerAttention(torch.nn.Module):
    """Hand-written causal attention (matmul, softmax, matmul), 2 heads."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / 4.0
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def _qkv(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))


def test_options_are_the_backends():
    model, args = EagerAttention(), _qkv()
    with pytest.raises(ValueError, match="unknown option"):
        npu_attn_graph.export(model, args, options={"nope": 1})
    with pytest.raises(ValueError, match="option 'executor' must be 'eager'.*got 'inductor'"):
        npu_attn_graph.export(model, args, options={"executor": "inductor"})
    with pytest.raises(ValueError, match="fp32_attention"):
        npu_attn_graph.export(model, args, options={"fp32_attention": "half"})
    seen = []
    program = npu_attn_graph.export(model, args, options={"passes": [], "report": seen.append})
    assert attention_count(program) == 0 and len(seen) == 1
    assert [s.reason for s in seen[0].sites] == ["the attention passes were not selected"]  # listed, left alone
    program = npu_attn_graph.export(model, args, options={"fp32_attention": "float16"})
    assert attention_count(program) == 1
    # float16 inside the fused op (casts around it): ~1e-3 relative.
    torch.testing.assert_close(program.module()(*args), model(*args), rtol=2e-3, atol=2e-3)


def test_exported_program_takes_no_new_arguments():
    program = torch.export.export(MaskedAttention(), tuple(torch.randn(1, 2, 4, 8) for _ in range(3)) +
                                  (torch.ones(1, 1, 4, 4, dtype=torch.bool),))
    with pytest.raises(ValueError, match="must be left out when model is an ExportedProgram"):
        npu_attn_graph.export(program, (torch.zeros(1),))
    with pytest.raises(ValueError, match="model must be a torch.nn.Module or a torch.export.ExportedProgram"):
        npu_attn_graph.export(lambda x: x, (torch.zeros(1),))


def test_symbolic_batch_and_length():
    model = build_matrix_model("llama", "sdpa")
    args, kwargs = prefill_call("llama", model)
    batch, length = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("length", min=2, max=64)
    shapes = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}, "use_cache": None}
    report = Report()
    program = npu_attn_graph.export(model, args, kwargs, dynamic_shapes=shapes, options={"report": report})
    assert attention_count(program) == MATRIX_LAYERS, report.table()
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(5))
    other = dict(kwargs, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        torch.testing.assert_close(output(program.module()(ids, **other)), output(model(ids, **other)),
                                   rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# npu-attn-graph export


SDPA_TARGET = """
import torch

class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

def make():
    g = torch.Generator().manual_seed(0)
    return Attention(), tuple(torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
"""


def test_cli_export_pt2_refuses_to_overwrite_and_writes_only_the_file(tmp_path, monkeypatch, capsys):
    from npu_attn_graph.cli import main

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "target.py").write_text(SDPA_TARGET)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", "target.py:make", "--format", "pt2", "--out", str(out / "llama.pt2")]) == 0
    printed = capsys.readouterr().out
    assert "1/1 sites fused" in printed and f"wrote {out / 'llama.pt2'} (pt2" in printed
    assert sorted(p.name for p in out.iterdir()) == ["llama.pt2"]
    program = torch.export.load(out / "llama.pt2")
    assert attention_count(program) == 1
    import target

    model, args = target.make()
    torch.testing.assert_close(program.module()(*args), model(*args), rtol=1e-5, atol=1e-5)

    before = (out / "llama.pt2").read_bytes()
    assert main(["export", "target.py:make", "--format", "pt2", "--out", str(out / "llama.pt2")]) == 2
    assert "exists; pass --force to overwrite it" in capsys.readouterr().err
    assert (out / "llama.pt2").read_bytes() == before
    assert main(["export", "target.py:make", "--format", "pt2", "--out", str(out / "llama.pt2"), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["llama.pt2"]
    capsys.readouterr()

    assert main(["export", "target.py:make", "--format", "pt2", "--out", str(tmp_path / "no" / "x.pt2")]) == 2
    assert "the folder" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main(["export", "target.py:make", "--format", "pt2", "--out", str(out), "--force"]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert main(["export", "target.py:make", "--format", "pt2", "--opset", "24", "--out",
                 str(out / "y.pt2")]) == 2
    assert "--opset applies to --format onnx only" in capsys.readouterr().err
    assert main(["export", "demo:nope", "--format", "pt2", "--out", str(out / "y.pt2")]) == 2
    assert "no built-in demo 'nope'" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["llama.pt2"]


def test_cli_export_failure_leaves_nothing(tmp_path, capsys):
    """demo:llama is a StaticCache decode step: torch.export cannot take the cache object."""
    from npu_attn_graph.cli import main

    assert main(["export", "demo:llama", "--format", "pt2", "--out", str(tmp_path / "llama.pt2")]) == 3
    assert "error:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_air_offline_is_ge_runtime_unavailable(tmp_path, capsys):
    """TorchAir is loaded offline here (its native modules are the project's stand-ins, the one test double:
    CANN cannot exist on this host): the export GE graph is built with the fused ops, then GE's native .air
    serialization raises GeRuntimeUnavailable, and nothing is written."""
    from npu_attn_graph.cli import main
    from npu_attn_graph.export import export_air
    from npu_attn_graph.torchair_bridge import GeRuntimeUnavailable, load_torchair

    if not load_torchair().offline:
        pytest.skip("an NPU host: TorchAir writes the .air file")
    from npu_attn_graph.demo_models import scenario_call

    model, args, kwargs = scenario_call("bert", "sdpa", "prefill")
    report = Report()
    with pytest.raises(GeRuntimeUnavailable, match=r"TorchAir built the export GE graph \(2/2 sites fused\)") as info:
        export_air(model, args, kwargs, f=tmp_path / "bert.air", options={"report": report})
    assert str(info.value.__cause__).startswith("export needs the GE runtime")  # TorchAir's last step
    assert [s.fused_op for s in report.sites] == ["npu_prompt_flash_attention"] * 2
    assert list(tmp_path.iterdir()) == []
    # The CLI on a small target: the same error, exit 3, nothing written.
    (tmp_path / "target.py").write_text(SDPA_TARGET)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert main(["export", "target.py:make", "--format", "air", "--out", "a.air"]) == 3
    assert "GeRuntimeUnavailable" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.py"]


def test_cli_export_help_has_an_example(capsys):
    from npu_attn_graph.cli import main

    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "Example:" in printed and "npu-attn-graph export" in printed and "{pt2,onnx,air}" in printed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_prefill_as_close_to_float32_as_eager(dtype):
    """Half precision: the fused op and eager round differently, so each is compared with the float32
    model; the exported program may be at most twice as far from it as eager is (plus one rounding step)."""
    model = build_matrix_model("llama", "sdpa")
    args, kwargs = prefill_call("llama", model)
    with torch.no_grad():
        reference = output(model(*args, **kwargs))
        model = model.to(dtype)
        program = npu_attn_graph.export(model, args, kwargs)
        eager_error = (output(model(*args, **kwargs)).float() - reference).abs().max().item()
        exported_error = (output(program.module()(*args, **kwargs)).float() - reference).abs().max().item()
    assert attention_count(program) == MATRIX_LAYERS
    ulp = torch.finfo(dtype).eps * reference.abs().max().item()
    assert exported_error <= 2 * eager_error + ulp, (exported_error, eager_error)


def test_cli_export_onnx_dispatch(tmp_path, monkeypatch, capsys):
    """--format onnx reaches export_onnx (the ONNX helper's module, tested there) and writes FILE only."""
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from npu_attn_graph.cli import main

    (tmp_path / "target.py").write_text(SDPA_TARGET)
    monkeypatch.chdir(tmp_path)
    assert main(["export", "target.py:make", "--format", "onnx", "--out", "a.onnx"]) == 0
    assert "Attention x1" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["a.onnx", "target.py"]
    import target

    model, args = target.make()
    session = onnxruntime.InferenceSession(str(tmp_path / "a.onnx"))
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    torch.testing.assert_close(torch.from_numpy(session.run(None, feeds)[0]), model(*args), rtol=1e-5, atol=1e-5)
