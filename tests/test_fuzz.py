"""Property-based fuzzing of the npu_attn backend with generated programs (tests/fuzz).

Each test draws programs of one family from a fixed (derandomized) Hypothesis stream, compiles each with
``torch.compile(fn, backend="npu_attn", options={"executor": "eager", "report": report})`` and checks it against
eager and an fp64 evaluation after every call (tests/fuzz/oracle.py states the tolerance), and that the report
lists every attention-shaped site and in-place cache write. A failure prints the standalone reproduction script
(program, inputs from a fixed seed, and the oracle): save it and run ``python repro.py``.

Environment switches:
- ``NPU_ATTN_FUZZ_REPORT=0``: skip the report-completeness oracle (values are still compared);
- ``NPU_ATTN_FUZZ_SHRINK=0``: report the first failing program as drawn instead of shrinking it to a minimal
  one (shrinking took 5-20 s per failing test when measured; Hypothesis stops it after 5 minutes);
- ``NPU_ATTN_FUZZ_SCALE=<float>``: multiply every family's budget (e.g. 0.1 for a smoke run, 10 for a soak;
  bench/fuzz_soak.py is the better soak: it never stops at the first failure).

test_known_defect_class runs one program per defect class found so far (programs.known_defects(), the classes
of the shared repros folder), each as its own test. The fuzz tests then draw BUDGET[family] programs per family:
210 in all: 64 s for the whole file in a full suite run in a quiet phase of the 2-core machine (330 until
2026-12-03: 57-78 s alone, 150 s in a full run in a slow phase). A failing family stops at its first
failure and shrinks it (5-20 s measured).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings

from fuzz import oracle, programs

CHECK_REPORT = os.environ.get("NPU_ATTN_FUZZ_REPORT", "1") != "0"
SHRINK = os.environ.get("NPU_ATTN_FUZZ_SHRINK", "1") != "0"
SCALE = float(os.environ.get("NPU_ATTN_FUZZ_SCALE", "1"))
# Programs per family (measured cost per program differs: KV programs call 1-3 times and may recompile).
# Sized to the CI budget (30 minutes for the whole suite on 2 cores); bench/fuzz_soak.py draws thousands.
BUDGET = {"sdpa": 45, "eager": 50, "kv": 40, "paged": 25, "stacked": 30, "router": 20}
KNOWN = programs.known_defects()


def fuzz_settings(family: str) -> settings:
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    return settings(max_examples=max(1, round(BUDGET[family] * SCALE)), derandomize=True, database=None,
                    deadline=None, phases=phases, report_multiple_bugs=False, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def check(program: programs.Program, in_hypothesis: bool = True) -> None:
    outcome = oracle.check_program(program.source, check_report=CHECK_REPORT)
    if in_hypothesis:
        event(f"{program.family}: {outcome.status}")
    if outcome.failed:
        pytest.fail(f"{outcome.status}: {outcome.detail}\n\n"
                    f"Reproduction script (save it and run `python repro.py` from the project root):\n\n"
                    f"{program.script}", pytrace=False)


@pytest.mark.parametrize("name", list(KNOWN))
def test_known_defect_class(name: str) -> None:
    """One program per defect class found so far (programs.known_defects()), whatever the random draws are."""
    check(KNOWN[name], in_hypothesis=False)


@fuzz_settings("sdpa")
@given(programs.sdpa_programs())
def test_fuzz_sdpa(program: programs.Program) -> None:
    check(program)


@fuzz_settings("eager")
@given(programs.eager_programs())
def test_fuzz_hand_written_attention(program: programs.Program) -> None:
    check(program)


@fuzz_settings("kv")
@given(programs.kv_programs())
def test_fuzz_static_kv_cache_writes(program: programs.Program) -> None:
    check(program)


@fuzz_settings("paged")
@given(programs.paged_programs())
def test_fuzz_paged_kv_cache_writes(program: programs.Program) -> None:
    check(program)


@fuzz_settings("stacked")
@given(programs.stacked_programs())
def test_fuzz_stacked_attention(program: programs.Program) -> None:
    check(program)


@fuzz_settings("router")
@given(programs.router_programs())
def test_fuzz_moe_routers(program: programs.Program) -> None:
    check(program)
