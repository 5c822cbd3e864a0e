"""The op-level tour, `npu-attn-graph demo --ops`, runs and checks itself (the
main job, `npu-attn-graph demo`, is tested in test_cli.py)."""

from __future__ import annotations

import subprocess
import sys

from npu_attn_graph.op_tour import FP32_TOLERANCE, run_demo


def test_demo_steps_match_sdpa():
    results = run_demo(new_tokens=3)
    assert [r.phase for r in results].count("prefill") == 1
    assert [r.phase for r in results].count("decode paged") == 3
    assert max(r.max_abs_err for r in results) <= FP32_TOLERANCE


def test_ops_demo_command_exits_zero_and_prints_table():
    proc = subprocess.run([sys.executable, "-m", "npu_attn_graph", "demo", "--ops", "--new-tokens", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "npu_incre_flash_attention" in proc.stdout
    assert "within the fp32 tolerance" in proc.stdout
