"""What npu_attn adds to TorchAir, measured: GE graphs and op-type counts per
model and scenario, with TorchAir alone (no passes) and with npu_attn.

    python bench/ge_graphs.py [--full]

Uses TorchAir offline (the torch-npu wheel) unless torch_npu imports.
--full prints every GE op type; the default prints the attention, KV-write
and placeholder (unconverted) types and the total. The seconds are the whole
to_ge_graph call (dynamo, AOT, passes, GE conversion), side by side.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from npu_attn_graph import to_ge_graph
from npu_attn_graph.demo_models import DECODERS, IMPLEMENTATIONS, scenario_call

INTERESTING = ("PromptFlashAttention", "IncreFlashAttention", "FusedInferAttentionScore", "BatchMatMul",
               "BatchMatMulV2", "SoftmaxV2", "Scatter", "TensorMove", "Assign")


def describe(result, full: bool) -> str:
    types = result.op_type_counts
    shown = sorted(types.items()) if full else [(t, n) for t, n in sorted(types.items())
                                                 if t in INTERESTING or t.startswith(("aten.", "prims."))]
    state = "one complete GE graph" if result.single_graph else \
        f"{result.graph_count} graph(s), {len(result.unconverted)} unconverted"
    return f"{state}; {sum(types.values())} ops: " + ", ".join(f"{t} x{n}" for t, n in shown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cases = [(k, a, s) for k in DECODERS for a in IMPLEMENTATIONS for s in ("prefill", "static_decode")]
    cases += [("bert", a, "prefill") for a in IMPLEMENTATIONS]
    for kind, attn, scenario in cases:
        for label, options in (("TorchAir alone", {"passes": []}), ("with npu_attn", None)):
            model, call_args, kwargs = scenario_call(kind, attn, scenario)
            start = time.perf_counter()
            with torch.no_grad():
                result = to_ge_graph(model, *call_args, options=options, **kwargs)
            seconds = time.perf_counter() - start
            print(f"{kind:5} {attn:5} {scenario:13} {label:14} {seconds:5.2f} s  {describe(result, args.full)}")


if __name__ == "__main__":
    main()
