"""Recompiles in explain(), to_ge_graph() and the CLI, taken from dynamo's compilation metrics
(torch 2.13 never increments counters["recompiles"], which the report used to read)."""

from __future__ import annotations

import json
import textwrap

import torch

import npu_attn_graph
from npu_attn_graph.backend import traced_afresh
from npu_attn_graph.cli import main
from npu_attn_graph.report import Report

sdpa = torch.nn.functional.scaled_dot_product_attention


def square(x):
    return x * x


def inner(x):
    print("", end="")  # graph break: the rest of inner is a frame of its own
    return sdpa(x, x, x)


def outer(a, b):
    return inner(a).sum() + inner(b).sum()  # second call: another shape -> that frame recompiles


def test_a_shape_change_without_dynamic_is_one_recompile():
    report = Report()
    with traced_afresh(report):
        compiled = torch.compile(square, backend="eager")
        compiled(torch.randn(8))
        compiled(torch.randn(8))  # same shape: cached
        compiled(torch.randn(12))  # new shape: recompiles (with a symbolic size)
        compiled(torch.randn(16))  # the symbolic graph takes it: no recompile
    assert len(report.recompiles) == 1, report.recompiles
    line = report.recompiles[0]
    assert line.startswith(f"square (test_recompiles.py:{square.__code__.co_firstlineno}): ")
    assert "size mismatch at index 0. expected 8, actual 12" in line


def test_no_recompile_with_dynamic_shapes_and_none_for_one_call():
    report = Report()
    with traced_afresh(report):
        compiled = torch.compile(square, backend="eager", dynamic=True)
        for n in (8, 12, 16):
            compiled(torch.randn(n))
    assert report.recompiles == []
    report = npu_attn_graph.explain(lambda q: sdpa(q, q, q), torch.randn(1, 2, 8, 16))
    assert report.recompiles == [] and report.graph_breaks == []
    assert report.table().splitlines()[-1].endswith("0 graph break(s), 0 recompile(s)")


def test_explain_counts_the_recompile_of_a_nested_frame():
    report = npu_attn_graph.explain(outer, torch.randn(1, 4, 8, 16), torch.randn(1, 4, 12, 16))
    assert len(report.recompiles) == 1, report.recompiles
    line = report.recompiles[0]
    assert line.startswith("inner (after the graph break at test_recompiles.py:")
    assert "tensor 'x' size mismatch at index 2. expected 8, actual 12" in line
    table = report.table()
    assert "1 recompile(s)" in table and f"recompile: {line}" in table
    # Only what runs inside counts: explaining again starts from zero, and a run without one reports none.
    again = npu_attn_graph.explain(outer, torch.randn(1, 4, 8, 16), torch.randn(1, 4, 8, 16))
    assert again.recompiles == []


def test_every_recompile_counts_past_torchs_metrics_limit():
    """torch keeps the metrics of the last 64 compiles only; traced_afresh makes room, then restores it."""
    from torch._dynamo import utils

    limit = utils._compilation_metrics.maxlen
    report = Report()
    with traced_afresh(report), torch._dynamo.config.patch(recompile_limit=100, automatic_dynamic_shapes=False):
        compiled = torch.compile(square, backend="eager")
        for n in range(1, 71):
            compiled(torch.randn(n))
    assert len(report.recompiles) == 69
    assert utils._compilation_metrics.maxlen == limit


def test_a_recompile_refused_by_the_limit_is_reported():
    with torch._dynamo.config.patch(recompile_limit=1):
        report = npu_attn_graph.explain(outer, torch.randn(1, 4, 8, 16), torch.randn(1, 4, 12, 16))
    assert len(report.recompiles) == 1
    assert report.recompiles[0].startswith("inner (after the graph break at")
    assert report.recompiles[0].endswith("(recompile limit reached: runs without compiling from now on)")


def test_to_ge_graph_counts_recompiles(tmp_path):
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(outer, torch.randn(1, 4, 8, 16), torch.randn(1, 4, 12, 16),
                                            out_dir=tmp_path)
    assert len(result.report.recompiles) == 1 and "expected 8, actual 12" in result.report.recompiles[0]


NESTED_TARGET = """
import torch


class Block(torch.nn.Module):
    def forward(self, x):
        print("", end="")  # graph break
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, a, b):
        return self.block(a).sum() + self.block(b).sum()


def make():
    return Model(), (torch.randn(1, 2, 8, 16, dtype=torch.float16), torch.randn(1, 2, 12, 16, dtype=torch.float16))
"""


def test_cli_check_explain_and_dump_show_recompiles(tmp_path, monkeypatch, capsys):
    """check requires one complete GE graph: a frame compiled twice in its one run is a second graph,
    so each recompile is a reason to fail; explain prints them, dump's report.json lists them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nested.py").write_text(textwrap.dedent(NESTED_TARGET))
    assert main(["check", "nested.py:make"]) == 1
    out = capsys.readouterr().out
    assert "  - recompile: " in out and "expected 8, actual 12" in out
    assert main(["explain", "nested.py:make"]) == 0
    out = capsys.readouterr().out
    assert "1 recompile(s)" in out and "\nrecompile: " in out
    assert main(["dump", "nested.py:make", "--out", str(tmp_path / "dump")]) == 0
    data = json.loads((tmp_path / "dump" / "report.json").read_text())
    assert len(data["recompiles"]) == 1 and "expected 8, actual 12" in data["recompiles"][0]

