"""Bad backend options raise a ValueError naming the option, the rule and the value, at the earliest
point torch allows: NpuAttnBackend(...) and explain() before anything is traced; the string form
backend="npu_attn" only at the first call (torch 2.13 hands the options to the backend no earlier)."""

from __future__ import annotations

import pytest
import torch

import npu_attn_graph
from npu_attn_graph import NpuAttnBackend, Report
from npu_attn_graph.backend import PASSES

sdpa = torch.nn.functional.scaled_dot_product_attention


class NotAConfig:
    pass


# (options, fragments the message must hold: the option, the rule, the value)
BAD = {
    "unknown key": ({"bogus": 1}, ["unknown option(s) ['bogus'] (given bogus=1)", "valid options are passes:"]),
    "unknown keys": ({"zeta": "z", "alpha": [1, 2]},
                     ["unknown option(s) ['alpha', 'zeta'] (given alpha=[1, 2], zeta='z')", "executor: one of"]),
    "misspelt key": ({"executer": "eager"}, ["unknown option(s) ['executer'] (given executer='eager')"]),
    "executor": ({"executor": "tpu"}, ["option 'executor' must be one of ['eager', 'inductor', 'torchair']",
                                       "got 'tpu'"]),
    "executor type": ({"executor": 1}, ["option 'executor' must be one of", "got 1"]),
    "passes name": ({"passes": ["sdpa_to_fused", "nope"]},
                    [f"option 'passes' must be a list of names from {list(PASSES)}",
                     "got ['sdpa_to_fused', 'nope']"]),
    "passes string": ({"passes": "sdpa_to_fused"}, ["option 'passes' must be a list", "got 'sdpa_to_fused'"]),
    "passes number": ({"passes": 3}, ["option 'passes' must be a list", "got 3"]),
    "fp32_attention": ({"fp32_attention": "float8"},
                       ["option 'fp32_attention' must be one of ['keep', 'float16', 'bfloat16', 'unfused']",
                        "got 'float8'"]),
    "report": ({"report": 42}, ["option 'report' must be a Report or a callable", "got 42 (int)"]),
    "torchair with fp32 keep": ({"executor": "torchair", "fp32_attention": "keep"},
                                ["fp32_attention='keep' cannot be used with executor 'torchair'"]),
    "torchair_config without torchair": ({"executor": "eager", "torchair_config": NotAConfig()},
                                         ["option 'torchair_config' needs executor 'torchair'",
                                          "got executor 'eager'"]),
    "torchair_config with inductor": ({"executor": "inductor", "torchair_config": NotAConfig()},
                                      ["option 'torchair_config' needs executor 'torchair'",
                                       "got executor 'inductor'"]),
}
CASES = pytest.mark.parametrize("options,fragments", list(BAD.values()), ids=list(BAD))


def assert_names(error: BaseException, fragments: list[str]) -> None:
    text = str(error)
    assert text.startswith("npu_attn backend: "), text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


@CASES
def test_npu_attn_backend_object_raises_when_built(options, fragments):
    with pytest.raises(ValueError) as raised:
        NpuAttnBackend(**options)  # before torch.compile is even called
    assert_names(raised.value, fragments)


@CASES
def test_explain_raises_before_tracing(options, fragments):
    calls = []

    def model(q):
        calls.append(1)
        return sdpa(q, q, q)

    with pytest.raises(ValueError) as raised:
        npu_attn_graph.explain(model, torch.randn(1, 2, 8, 16), options=options)
    assert_names(raised.value, fragments)
    assert calls == [], "the model ran (was traced) before the options were checked"


@CASES
def test_string_form_raises_at_the_first_call(options, fragments):
    """torch.compile(backend="npu_attn", options=...) cannot check them: torch 2.13 keeps the dict in its
    _TorchCompileWrapper and calls no code of ours until the first graph is compiled. Then dynamo wraps
    our ValueError in BackendCompilerFailed, with the same message."""
    compiled = torch.compile(lambda q: sdpa(q, q, q), backend="npu_attn", options=dict(options))  # no error yet
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as raised:
        compiled(torch.randn(1, 2, 8, 16))
    assert isinstance(raised.value.inner_exception, ValueError)
    assert_names(raised.value.inner_exception, fragments)
    assert "backend='npu_attn' raised:\nValueError: npu_attn backend: " in str(raised.value)


def test_string_form_gets_nothing_of_ours_at_compile_time():
    """The fact the string form's timing rests on: what torch builds at torch.compile(...) holds the
    options only in its own wrapper, and the backend it resolved is our plain function."""
    from torch._dynamo.backends.registry import lookup_backend

    compiled = torch.compile(lambda x: x, backend="npu_attn", options={"bogus": 1})
    assert callable(compiled)
    assert lookup_backend("npu_attn") is npu_attn_graph.npu_attn_backend


def test_npu_attn_backend_object_compiles_and_fills_the_report():
    report = Report()
    backend = NpuAttnBackend(executor="eager", report=report)
    assert repr(backend) == "NpuAttnBackend(executor='eager', report=<Report>)"
    q = torch.randn(1, 2, 8, 16)
    with torch.no_grad():
        out = torch.compile(lambda q: sdpa(q, q, q, is_causal=True), backend=backend)(q)
    torch.testing.assert_close(out, sdpa(q, q, q, is_causal=True))
    assert [s.fused_op for s in report.sites] == ["npu_prompt_flash_attention"]


def test_options_given_to_torch_compile_too_are_merged_and_checked_at_the_first_call():
    report = Report()
    compiled = torch.compile(lambda q: sdpa(q, q, q), backend=NpuAttnBackend(executor="eager"),
                             options={"report": report})
    with torch.no_grad():
        compiled(torch.randn(1, 2, 8, 16))
    assert len(report.sites) == 1 and report.sites[0].rewritten

    torch._dynamo.reset()
    # Each half is valid alone; together they are not, which only the first call can see.
    compiled = torch.compile(lambda q: sdpa(q, q, q), backend=NpuAttnBackend(executor="eager"),
                             options={"torchair_config": NotAConfig()})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as raised:
        compiled(torch.randn(1, 2, 8, 16))
    assert_names(raised.value.inner_exception, ["option 'torchair_config' needs executor 'torchair'"])


def test_valid_options_are_accepted_when_built():
    for options in ({}, {"passes": []}, {"passes": list(PASSES)}, {"executor": "inductor"},
                    {"executor": "eager", "fp32_attention": "unfused"}, {"report": print},
                    {"executor": "torchair", "fp32_attention": "bfloat16"}):
        assert NpuAttnBackend(**options).options == options
