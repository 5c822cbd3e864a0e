"""What one compile does more than once, counted (structure, not time: the
times are bench/compile_overhead.py's).

- The mask classification (passes/_masks.two_valued) runs a mask's ops on a
  True and a False under the compile's fake mode. Every layer reads the same
  mask, and each site asks twice (the split of its terms, then the plan): the
  values are computed once per distinct mask program in a graph.
- The rewritten graph's Python code is generated and compiled once: the
  report's code before the passes does not compile a forward the passes make
  stale, and the eager executor runs the forward compiled for the report's code
  after them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx._lazy_graph_module import _LazyGraphModule

from npu_attn_graph import Report
from npu_attn_graph.passes import _masks

LAYERS = 3


def _stacked(q, k, v, keep, fill):
    mask = torch.where(keep, 0.0, fill)  # one additive mask, read by every layer
    x = q
    for _ in range(LAYERS):
        x = F.scaled_dot_product_attention(x, k, v, attn_mask=mask)
    return x


def _inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 16) for _ in range(3))
    keep = torch.ones(4, 4, dtype=torch.bool).tril()
    return q, k, v, keep


def _compile(fn, *args):
    report = Report()
    out = torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report, "executor": "eager"})(*args)
    return report, out


def _counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("fill", [-math.inf, torch.finfo(torch.float32).min], ids=["-inf", "finfo.min"])
def test_a_mask_shared_by_every_layer_is_evaluated_once(monkeypatch, fill):
    evaluations = _counting(monkeypatch, _masks, "_evaluate")
    classified = _counting(monkeypatch, _masks, "two_valued")
    args = _inputs()
    report, out = _compile(lambda q, k, v, keep: _stacked(q, k, v, keep, fill), *args)
    assert len(report.fused("attention")) == LAYERS, report.table()
    assert len(classified) >= 2 * LAYERS  # asked for by every site, twice
    assert len(evaluations) == 1
    torch.testing.assert_close(out, _stacked(*args, fill), rtol=1e-5, atol=1e-6)


def test_distinct_mask_programs_are_each_evaluated(monkeypatch):
    evaluations = _counting(monkeypatch, _masks, "_evaluate")

    def two_masks(q, k, v, keep):
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(keep, 0.0, -math.inf))
        x = F.scaled_dot_product_attention(x, k, v, attn_mask=torch.where(keep, 0.0, -1e4))  # a bias, not a mask
        return F.scaled_dot_product_attention(x, k, v, attn_mask=torch.where(keep, 0.0, -math.inf))

    args = _inputs()
    report, out = _compile(two_masks, *args)
    assert len(report.fused("attention")) == 3, report.table()
    assert len(evaluations) == 2
    # The -1e4 term differs from the -inf mask by its constant alone: classified on its own values (a bias).
    assert sum("additive term as pse_shift" in s.notes for s in report.sites) == 1, report.table()
    torch.testing.assert_close(out, two_masks(*args), rtol=1e-5, atol=1e-6)


def test_the_rewritten_graph_is_compiled_once(monkeypatch):
    compiled = _counting(monkeypatch, _LazyGraphModule, "_real_recompile")
    args = _inputs()
    report, out = _compile(lambda q, k, v, keep: _stacked(q, k, v, keep, -math.inf), *args)
    (gm,) = report.graph_modules
    assert sum(1 for (module,) in compiled if module is gm) == 1
    assert "scaled_dot_product" in report.code_before[0] and "scaled_dot_product" not in report.code_after[0]
    assert report.code_after[0] == gm.code  # what runs is what the report shows
    torch.testing.assert_close(out, _stacked(*args, -math.inf), rtol=1e-5, atol=1e-6)
