"""Import cost, checked by structure (never by time; bench/compile_overhead.py times it):
``import npu_attn_graph`` and ``import npu_attn_graph.ops`` load nothing heavy beyond
what ``import torch`` loads itself, the lazily imported names still resolve, and the
passes do not import Inductor's pattern matcher (seconds on a first compile that
aot_eager does not pay)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Modules that would each add seconds to the import (or need an optional install):
# torch._dynamo and symbolic_shapes bring sympy; torch._inductor its lowerings.
HEAVY = ("torch._dynamo", "torch._inductor", "torch._functorch.aot_autograd", "torch.fx.experimental.symbolic_shapes",
         "sympy", "transformers", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "torchair", "torch_npu")

CHILD = f"""
import json, sys
import torch
after_torch = set(sys.modules)

def heavy_since_torch():  # the HEAVY entries loaded (a module or its submodules) since import torch
    loaded = set(sys.modules) - after_torch
    return sorted(h for h in {HEAVY!r} if any(m == h or m.startswith(h + ".") for m in loaded))

result = {{}}
import npu_attn_graph
result["package"] = heavy_since_torch()
import npu_attn_graph.ops
result["ops"] = heavy_since_torch()
result["torch_loads"] = sorted(h for h in {HEAVY!r} if h in after_torch)

# The lazy names, and the function `export` even once its submodule is imported.
from npu_attn_graph.export import export_air
result["export"] = type(npu_attn_graph.export).__name__ + " " + npu_attn_graph.export.__module__
from npu_attn_graph import NpuAttnBackend, explain, npu_attn_backend, to_ge_graph, GeConversion, export_onnx
result["lazy"] = [f.__module__ for f in (NpuAttnBackend, explain, npu_attn_backend, to_ge_graph, GeConversion,
                                         export_onnx, npu_attn_graph.onnx_translation_table)]
result["inductor_passes"] = sorted(m for m in ("torch._inductor.pattern_matcher", "torch._inductor.lowering")
                                   if m in sys.modules)
# The string backend resolves to ours through the entry point.
result["backend"] = torch._dynamo.lookup_backend("npu_attn") is npu_attn_backend
print(json.dumps(result))
"""


def test_import_loads_nothing_heavy_and_lazy_names_resolve():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # What `import torch` loads itself is not ours to avoid (torch 2.13 loads none of these).
    assert result["package"] == [], f"import npu_attn_graph loaded {result['package']} (torch loads {result['torch_loads']})"
    assert result["ops"] == [], f"import npu_attn_graph.ops loaded {result['ops']}"
    assert result["export"] == "function npu_attn_graph.export"
    assert result["lazy"] == ["npu_attn_graph.backend"] * 3 + ["npu_attn_graph.ge_graph"] * 2 + \
        ["npu_attn_graph.onnx_export"] * 2
    # Importing the backend, passes and exporters (done above) leaves Inductor's matcher out.
    assert result["inductor_passes"] == []
    assert result["backend"] is True


def test_submodules_resolve_as_attributes_and_unknown_names_raise():
    import npu_attn_graph

    assert npu_attn_graph.backend.BackendOptions.__module__ == "npu_attn_graph.backend"

    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        npu_attn_graph.no_such_name
