"""The TorchAir bridge: TorchAir loaded offline from the torch-npu wheel (its
Python package only; the four native GE runtime modules are the stand-ins in
_torchair_offline_native), and the backend's executor "torchair"."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import npu_attn_graph
from npu_attn_graph import to_ge_graph
from npu_attn_graph.torchair_bridge import CACHE_ENV, WHEEL_ENV, GeRuntimeUnavailable, load_torchair

npu_attn = torch.ops.npu_attn


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_package_imports_and_runs_without_torchair():
    result = run_python("""
        import sys, torch, npu_attn_graph
        q = torch.randn(1, 2, 4, 16)
        out = torch.ops.npu_attn.npu_prompt_flash_attention(q, q, q, num_heads=2, input_layout="BNSD")
        assert out.shape == q.shape
        loaded = [m for m in sys.modules if m.split(".")[0] in ("torchair", "torch_npu")
                  or m.startswith("npu_attn_graph.converters")]
        print(loaded)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_offline_torchair_is_the_wheels_package_with_native_stand_ins():
    torchair = load_torchair()
    assert torchair.offline and "not compiled or run" in torchair.describe()
    assert Path(torchair.source).name.startswith("torch_npu-2.13.0")
    package = Path(torchair.module.__file__).parent
    assert (package / "npu_fx_compiler.py").is_file() and not list(package.rglob("*.so"))
    native = sys.modules["torchair.core._torchair"]
    assert native.__name__ == "torchair.core._torchair" and "stand-in" in (native.__doc__ or "").lower()
    assert "torch_npu" not in sys.modules
    with pytest.raises(GeRuntimeUnavailable, match="GE runtime"):
        native.TorchNpuGraphBase("g").compile()


def test_wheel_from_the_environment_variable_and_signal_handlers_kept(tmp_path):
    wheel = load_torchair().source
    result = run_python("""
        import signal
        def mine(signum, frame): pass
        signal.signal(signal.SIGINT, mine)
        from npu_attn_graph.torchair_bridge import load_torchair
        torchair = load_torchair()
        assert signal.getsignal(signal.SIGINT) is mine, "TorchAir's SIGINT handler left installed"
        print(torchair.mode, torchair.source)
    """, **{WHEEL_ENV: wheel, CACHE_ENV: str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["offline", wheel]
    assert not (tmp_path / "wheels").exists()  # nothing downloaded
    assert (tmp_path / "torchair" / Path(wheel).stem / "torchair" / "__init__.py").is_file()


def test_bad_wheel_path_is_a_clear_error(tmp_path):
    result = run_python("from npu_attn_graph.torchair_bridge import load_torchair; load_torchair()",
                        **{WHEEL_ENV: str(tmp_path / "missing.whl"), CACHE_ENV: str(tmp_path)})
    assert result.returncode != 0
    assert f"{WHEEL_ENV}=" in result.stderr and "no torch_npu wheel file there" in result.stderr


def test_first_use_downloads_the_paired_wheel_with_a_progress_message(tmp_path):
    result = run_python("from npu_attn_graph.torchair_bridge import load_torchair; print(load_torchair().source)",
                        **{CACHE_ENV: str(tmp_path), WHEEL_ENV: ""})
    assert result.returncode == 0, result.stderr
    assert "fetching the torch-npu 2.13.0 wheel" in result.stderr
    assert Path(result.stdout.strip()).parent == tmp_path / "wheels"


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def qkv(dtype=torch.float16):
    torch.manual_seed(0)
    return [torch.randn(1, 2, 32, 16, dtype=dtype) for _ in range(3)]


def test_executor_torchair_builds_the_ge_graph_and_refuses_to_run_it_offline():
    torch._dynamo.reset()
    compiled = torch.compile(Attention(), backend="npu_attn", options={"executor": "torchair"})
    with pytest.raises(Exception, match="GE runtime") as error, torch.no_grad():
        compiled(*qkv())
    assert "never compiled or run" in str(error.value)
    torch._dynamo.reset()


def test_user_torchair_config_passes_through_and_its_pass_runs_after_ours(tmp_path):
    torchair = load_torchair().module
    seen = []

    def user_pass(gm, example_inputs, config):
        seen.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])

    config = torchair.CompilerConfig()
    config.post_grad_custom_pre_pass = user_pass
    config.debug.graph_dump.type = "pbtxt"
    config.debug.graph_dump.path = str(tmp_path / "torchair_dump")
    (tmp_path / "torchair_dump").mkdir()
    with torch.no_grad():
        result = to_ge_graph(Attention(), *qkv(), options={"torchair_config": config}, out_dir=tmp_path / "ge")
    assert result.single_graph and result.op_type_counts["PromptFlashAttention"] == 1
    assert len(seen) == 1 and "npu_attn.npu_prompt_flash_attention.default" in seen[0]  # ours ran first
    assert config.post_grad_custom_pre_pass.value is user_pass  # the user's config is not modified
    assert list((tmp_path / "torchair_dump").glob("*.pbtxt")), "TorchAir used the user's dump settings"


@pytest.mark.parametrize("options,message", [
    ({"executor": "torchair", "fp32_attention": "keep"}, "float16/bfloat16 only"),
    ({"executor": "eager", "torchair_config": object()}, "needs executor 'torchair'"),
    ({"fp32_attention": "float8"}, "fp32_attention"),
    ({"executor": "ge"}, "executor"),
])
def test_bad_backend_options(options, message):
    with pytest.raises(ValueError, match=message):
        npu_attn_graph.backend.BackendOptions.parse(options)


def test_eager_executor_default_off_the_npu():
    assert npu_attn_graph.backend.BackendOptions.parse({}).executor == "eager"
    assert npu_attn_graph.backend.BackendOptions.parse({"executor": "torchair"}).fp32_attention == "float16"
