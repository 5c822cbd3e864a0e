"""The model matrix (issue 12): tiny random configs of thirteen transformers 5.23.0
families (tests/models.py: MATRIX_FAMILIES), with sdpa and eager attention where
transformers has both (Gemma2 and gpt-oss: eager only), compiled with the
npu_attn backend in up to three scenarios:

- prefill: a batch of 2, no cache (BERT: right padding; ViT: 16x16 images);
- static: greedy generate() of 16 tokens with a StaticCache (T5/BART: an
  EncoderDecoderCache of two StaticCaches, as generate builds for
  cache_implementation="static"), past the sliding window (4) where the family
  has one: the prefill graph and one decode graph for the 15 decode steps;
- dynamic: DynamicCache decode, an eager prefill and 3 compiled one-token steps.

Encoder-only models (BERT, ViT) have prefill only.

Each case is compiled and run once (models.run_case, cached), and each property
is its own test, so that a gap in one property does not hide the others:

- test_sites: every attention site and every KV-cache write is in the report,
  the fused count is all of them except the sites left alone by design
  (LEFT_ALONE, with the reason the report must give), and every site left alone
  has a reason;
- test_numerics: outputs (and static generate's tokens and caches) equal eager,
  fp32 to rtol 1e-4 / atol 1e-5;
- test_graph_breaks: none;
- test_recompiles: prefill one graph; static: the prefill graph and one decode
  graph, whose 15 steps never recompile; dynamic: the one recompile of torch's
  automatic dynamic shapes (the second step), reused by the third;
- test_ge_graph: the prefill and the static decode step each become one
  complete GE graph (to_ge_graph), with one fused GE attention op per fused
  site; a site left alone with a reason must still be in that one graph.
  Llama, Qwen2, GPT-2 and BERT are converted in tests/test_ge_models.py (same
  scenarios, same graph structure), so not again here.

Cases that miss a property today are xfail(strict=True) for that property only,
with what was measured (GAPS); `python tests/test_model_matrix.py` prints the
measured table (the README's "Model matrix").
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")

from models import (MATRIX_CASES, MATRIX_LAYERS, expected_sites, matrix_kind, matrix_markdown,  # noqa: E402
                    run_case)

# GE conversions of these families are tests/test_ge_models.py's (prefill, static decode step).
GE_ELSEWHERE = {"llama", "qwen2", "gpt2", "bert"}

# Sites left alone by design: (family, attn) -> (site kind, text the reason must contain). Every
# site of that kind in the case is left alone with it; all other sites must be fused.
LEFT_ALONE = {
    ("gemma2", "eager"): ("attention", "logit softcap tanh(scores / 50) * 50 (transformers' config field "
                                       "attn_logit_softcapping): no NPU inference attention op applies a softcap"),
}

# Measured 2026-12-02 (transformers 5.23.0, torch 2.13.0, TorchAir of torch-npu 2.13.0 offline):
# (family, attn, scenario) -> {test: what fails}. None today: gpt-oss's MoE block, the last gap,
# becomes npu_moe_compute_expert_tokens + npu_grouped_matmul (passes/moe_experts_to_fused.py).
GAPS: dict[tuple[str, str, str], dict[str, str]] = {}


def _params(test: str, scenarios: tuple[str, ...] = ("prefill", "static", "dynamic"), ge: bool = False) -> list:
    params = []
    for case in MATRIX_CASES:
        family, attn, scenario = case
        if scenario not in scenarios or (ge and family in GE_ELSEWHERE):
            continue
        reason = GAPS.get(case, {}).get(test)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(*case, id=f"{family}-{attn}-{scenario}", marks=marks))
    return params


def measured(family: str, attn: str, scenario: str):
    """The case's one compiled run (shared by every test of the case)."""
    needs_ge = scenario in ("prefill", "static") and family not in GE_ELSEWHERE
    result = run_case(family, attn, scenario, ge=needs_ge)
    assert result.error is None, f"{result.name}: the compiled run raised {result.error}"
    return result


@pytest.mark.parametrize("family,attn,scenario", _params("sites"))
def test_sites(family, attn, scenario):
    result = measured(family, attn, scenario)
    report = result.report
    attention = [s for s in report.sites if s.kind == "attention"]
    writes = [s for s in report.sites if s.kind == "kv_update"]
    want_attention, want_writes = expected_sites(family, scenario, report.graphs)
    assert (len(attention), len(writes)) == (want_attention, want_writes), \
        f"sites listed (attention, KV writes) vs expected over {report.graphs} graph(s)\n{report.table()}"
    assert all(s.reason for s in report.left_alone()), report.table()
    kind, reason = LEFT_ALONE.get((family, attn), (None, None))
    for site in report.sites:
        if site.kind == kind:
            assert not site.rewritten and reason in site.reason, report.table()
        else:
            assert site.rewritten, report.table()
    fused = sum(s.rewritten for s in report.sites)
    assert fused == len(report.sites) - sum(s.kind == kind for s in report.sites)


@pytest.mark.parametrize("family,attn,scenario", _params("numerics"))
def test_numerics(family, attn, scenario):
    result = measured(family, attn, scenario)
    assert result.numerics is None, result.numerics
    if scenario == "static":
        assert result.tokens_equal


@pytest.mark.parametrize("family,attn,scenario", _params("graph_breaks"))
def test_graph_breaks(family, attn, scenario):
    assert measured(family, attn, scenario).report.graph_breaks == []


@pytest.mark.parametrize("family,attn,scenario", _params("recompiles"))
def test_recompiles(family, attn, scenario):
    report = measured(family, attn, scenario).report
    if scenario == "prefill":
        assert (report.graphs, report.recompiles) == (1, []), report.table()
        return
    # static: prefill graph + the decode graph compiled at the first decode step (a recompile of the
    # same frame: new input shapes), reused by the 14 steps after it. dynamic: the second step's
    # automatic-dynamic recompile (a symbolic KV length; a sliding window's shrinking cache), reused after.
    assert report.graphs == 2 and len(report.recompiles) == 1, report.table()
    line = report.recompiles[0]
    if scenario == "dynamic":
        assert "past_key_values" in line and "mismatch" in line, line
    else:
        assert "input_ids" in line or "len(kwargs)" in line or "is_updated" in line, line


GE_ATTENTION_TYPES = {"PromptFlashAttention", "IncreFlashAttention", "FusedInferAttentionScore"}


@pytest.mark.parametrize("family,attn,scenario", _params("ge", ("prefill", "static"), ge=True))
def test_ge_graph(family, attn, scenario):
    result = measured(family, attn, scenario)
    assert result.ge_error is None, result.ge_error
    ge = result.ge
    assert ge.single_graph, ge.summary()
    assert not [t for t in ge.op_type_counts if t.startswith(("aten.", "prims."))], ge.summary()
    sites = ge.report.sites
    assert all(s.reason for s in sites if not s.rewritten), ge.report.table()
    fused = sum(s.kind == "attention" and s.rewritten for s in sites)
    attention_ops = sum(n for t, n in ge.op_type_counts.items() if t in GE_ATTENTION_TYPES)
    assert attention_ops == fused, ge.summary()
    per_graph = MATRIX_LAYERS * {"decoder": 1, "encoder": 1, "encoder-decoder": 3 if scenario == "prefill" else 2}[
        matrix_kind(family)]
    assert sum(s.kind == "attention" for s in sites) == per_graph, ge.report.table()
    if scenario == "static":  # the decode step's writes: one Scatter each
        assert ge.op_type_counts.get("Scatter", 0) == sum(s.kind == "kv_update" and s.rewritten for s in sites) \
            == 2 * MATRIX_LAYERS, ge.summary()


if __name__ == "__main__":  # the measured table, every case with its GE graphs
    with torch.no_grad():
        table = matrix_markdown([run_case(*case) for case in MATRIX_CASES])
    out = sys.argv[1] if len(sys.argv) > 1 else None
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")
    print(table)
