"""The npu-attn-graph CLI: dump, check, explain, demo; TARGET errors; TORCH_LOGS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from npu_attn_graph.cli import main

pytest.importorskip("transformers")

GOOD = """
import torch

class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

def make():
    q = torch.randn(1, 2, 8, {d}, dtype=torch.float16)
    return Attention(), (q, q, q)
"""


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# Subprocesses start without TORCH_LOGS (torch rejects some values at import).
QUIET_ENV = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npu_attn_graph", *argv], capture_output=True, text=True,
                          timeout=600, env=QUIET_ENV)


@pytest.mark.parametrize("command", ["dump", "check", "explain", "demo"])
def test_every_command_has_help_with_an_example(command):
    result = cli(command, "--help")
    assert result.returncode == 0 and "Example:" in result.stdout and "npu-attn-graph " + command in result.stdout


@pytest.mark.parametrize("target_source,spec,message", [
    (None, "missing.py:make", "file not found: missing.py"),
    ("def make():\n    return 1, (2,)\n", "t.py:nothing", "has no factory 'nothing' (its functions: make)"),
    ("def make():\n    raise RuntimeError('no weights')\n", "t.py:make", "the factory raised RuntimeError: no weights"),
    ("def make():\n    return 42\n", "t.py:make", "must return (model, example_args) or"),
    ("def make():\n    return len, 3\n", "t.py:make", "(example_args is not a tuple or list)"),
    ("import not_a_module_anywhere\n", "t.py:make", "importing t.py failed: ModuleNotFoundError"),
    (None, "no_colon_here", "is not one of path/to/file.py:factory"),
    (None, "demo:nope", "no built-in demo 'nope'"),
    (None, "no_such_pkg.mod:make", "cannot import module 'no_such_pkg.mod'"),
])
def test_bad_targets_are_one_line_errors(tmp_path, monkeypatch, capsys, target_source, spec, message):
    monkeypatch.chdir(tmp_path)
    if target_source is not None:
        write(tmp_path, "t.py", target_source)
    assert main(["explain", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 + sum("[npu-attn-graph]" in line for line in err[:-1])  # progress lines, then one error
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert main(["explain", spec, "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_only_the_named_target_is_imported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.py", GOOD.format(d=16) + "print('imported a')\n")
    write(tmp_path, "b.py", "print('imported b')\n")
    assert main(["explain", "a.py:make"]) == 0
    out = capsys.readouterr().out
    assert "imported a" in out and "imported b" not in out
    assert "npu_prompt_flash_attention" in out and "1/1 sites fused" in out


def test_check_passes_for_the_demo_llama(capsys):
    assert main(["check", "demo:llama"]) == 0
    assert capsys.readouterr().out.startswith("OK demo:llama: 6/6 sites fused, one GE graph")


def test_check_passes_for_the_example_target(capsys):
    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_decoder.py"
    assert main(["check", f"{example}:make"]) == 0
    assert "3/3 sites fused, one GE graph" in capsys.readouterr().out


def test_check_fails_with_reasons(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "odd.py", GOOD.format(d=20))  # head_dim 20: the NPU ops need a multiple of 16
    assert main(["check", "odd.py:make"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL odd.py:make: 0/1 sites fused")
    assert "left alone" in out and "multiple of 16" in out and "unconverted GE node" in out


def test_dump_writes_everything_inside_out_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "dump"
    assert main(["dump", "demo:llama", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump"]
    captured = capsys.readouterr()
    printed = captured.out
    assert "6/6 sites fused" in printed and "one complete GE graph" in printed and str(out / "report.txt") in printed
    for step in ("loading demo:llama", "tracing the model with dynamo", "npu_attn passes on the inference graph",
                 "TorchAir: converting the inference graph into a GE graph", "writing FX graphs, report and pictures"):
        assert f"[npu-attn-graph] {step}" in captured.err  # progress, on stderr
    assert (out / "fx" / "graph_0_before.py").read_text().count("aten.index_copy.default(") == 4
    after = (out / "fx" / "graph_0_after.py").read_text()
    assert after.count("npu_attn.npu_incre_flash_attention") == 2 and "aten.index_copy" not in after
    data = json.loads((out / "report.json").read_text())
    assert data["single_ge_graph"] and len(data["sites"]) == 6
    # The decode attention with its KV lengths (static_cache_lengths): the demo step's mask is j <= cache_position.
    assert {s["fused_op"] for s in data["sites"]} == {"npu_incre_flash_attention_paged", "scatter_update"}
    assert "IncreFlashAttention" in (out / "ge" / "op_types.txt").read_text()
    assert list((out / "ge").glob("*.pbtxt"))
    report = (out / "report.txt").read_text()
    assert "sites left alone: 0" in report and "gqa" in report
    for stage in ("before", "after"):
        assert (out / "pictures" / f"attention_{stage}.svg").is_file()
        assert (out / "pictures" / f"attention_{stage}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The printed "files:" list (also in summary.txt) names every file the dump wrote, and only those.
    listed = printed.split("\nfiles:\n", 1)[1].split()
    assert sorted(listed) == sorted(str(p) for p in out.rglob("*") if p.is_file())
    assert str(out / "summary.txt") in listed and list((out / "ge").glob("*.ge.txt"))
    assert (out / "summary.txt").read_text() == printed


def test_dump_refuses_a_non_empty_out_without_force(tmp_path, capsys):
    out = tmp_path / "dump"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "report.txt").write_text("old")
    assert main(["dump", "demo:bert", "--out", str(out)]) == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    # report.txt is dump's name, but no earlier dump wrote this one: --force refuses it too.
    assert main(["dump", "demo:bert", "--out", str(out), "--force"]) == 2
    assert str(out / "report.txt") in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine" and (out / "report.txt").read_text() == "old"
    (out / "report.txt").rename(tmp_path / "report.txt")
    assert main(["dump", "demo:bert", "--out", str(out), "--force"]) == 0
    assert (out / "keep.txt").read_text() == "mine" and "sites fused" in (out / "report.txt").read_text()


def test_demo_command_generates_like_eager():
    result = cli("demo", "--new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "generated tokens identical to eager" in result.stdout and "sites fused in 2 graph(s)" in result.stdout


def test_torch_logs_shows_matches_and_misses(tmp_path):
    write(tmp_path, "odd.py", GOOD.format(d=20))
    write(tmp_path, "good.py", GOOD.format(d=16))
    code = textwrap.dedent("""
        import torch, sys
        sys.path.insert(0, sys.argv[1])
        import good, odd
        for m in (good, odd):
            torch._dynamo.reset()
            model, args = m.make()
            torch.compile(model, backend="npu_attn")(*args)
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TORCH_LOGS": "+npu_attn"})
    assert result.returncode == 0, result.stderr
    assert "fused attention" in result.stderr and "-> npu_prompt_flash_attention" in result.stderr
    assert "left alone attention" in result.stderr and "multiple of 16" in result.stderr
    assert "pass seconds" in result.stderr  # DEBUG level


def test_file_targets_import_like_scripts(tmp_path, monkeypatch, capsys):
    """A dataclass in the file (needs the module in sys.modules) and a sibling
    import inside the factory (needs the folder on sys.path when it runs)."""
    monkeypatch.chdir(tmp_path)
    sub = tmp_path / "models"
    sub.mkdir()
    write(sub, "helper.py", GOOD.format(d=16))
    write(sub, "entry.py", """
        from __future__ import annotations
        from dataclasses import dataclass

        @dataclass
        class Settings:
            heads: int = 2

        def make():
            from helper import make as build
            return build()
    """)
    assert main(["explain", "models/entry.py:make"]) == 0
    assert "1/1 sites fused" in capsys.readouterr().out


def test_module_targets_resolve_from_the_working_directory(tmp_path):
    """The installed console script finds package.module targets in the current
    directory, as python -m does."""
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg, "models.py", GOOD.format(d=16))
    script = Path(sys.executable).parent / "npu-attn-graph"
    result = subprocess.run([str(script), "explain", "mypkg.models:make"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, env=QUIET_ENV)
    assert result.returncode == 0, result.stderr
    assert "1/1 sites fused" in result.stdout
