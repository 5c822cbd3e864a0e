"""How fast can npu_attn+inductor be on the tiny zoo at best? (issue 15, goal 1: what stands in the way)

Run:  python bench/extern_floor.py [--rounds N]     (needs a C++ compiler and ninja: torch's cpp_extension)

Goal 1 asks for npu_attn+inductor at least as fast as Inductor on the zoo (hidden 64, 2 layers, 1 thread), with
our fused ops as extern kernels. `bench/executors.py` measures 1.3-2.0x Inductor's time there. This script
measures the floor of that design: it replaces the CPU kernels of the three ops a zoo step calls
(npu_prompt_flash_attention, npu_incre_flash_attention_paged, scatter_update_into) with C++ *stand-ins*:
check-free kernels, compiled here with torch.utils.cpp_extension, that do only the zoo's call forms (one
aten SDPA call on the valid K/V, one slice copy per write) and refuse any other form. They are not a mode of
the product: they skip every rule the reference kernels check. Every variant's first logits are checked
against eager (rtol = atol = 1e-4, float32).

Each mode runs in its own process (a C++ kernel registered for the CPU key replaces the Python one for the
whole process), and in each process the variants are interleaved with Inductor, so each ratio is against
Inductor's time measured in the same rounds:
- python: our reference kernels (the product as it is);
- cpp: the C++ stand-ins.
Variants: npu_attn+inductor (every rewrite), and attention-only (the static_cache_update pass off: the KV
writes stay Inductor's own index_copy, generated code; only the attention is an extern kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable

import torch
from executors import compiled, interleaved, rewound

MODES = ("python", "cpp")
VARIANTS = ("inductor", "npu_attn+inductor", "attention only")
CASES = (("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager"), ("gpt2", "eager"))
SCENARIOS = ("prefill", "static_decode")

# The stand-ins: the zoo's call forms only (TORCH_CHECK refuses any other), no validation.
STAND_INS = r"""
#include <ATen/ATen.h>
#include <torch/library.h>
#include <optional>

// Prefill: BNSD or BNSD_BSND, a bool mask (True = masked) or none, sparse_mode 0/1, no quant, no lengths.
at::Tensor prompt_flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& atten_mask,
    const std::optional<at::Tensor>& pse_shift, at::OptionalIntArrayRef actual_seq_lengths,
    const std::optional<at::Tensor>& deq_scale1, const std::optional<at::Tensor>& quant_scale1,
    const std::optional<at::Tensor>& deq_scale2, const std::optional<at::Tensor>& quant_scale2,
    const std::optional<at::Tensor>& quant_offset2, int64_t num_heads, double scale_value, int64_t pre_tokens,
    int64_t next_tokens, c10::string_view input_layout, int64_t num_key_value_heads,
    at::OptionalIntArrayRef actual_seq_lengths_kv, int64_t sparse_mode) {
  TORCH_CHECK(input_layout == "BNSD" || input_layout == "BNSD_BSND", "stand-in: layout ", input_layout);
  TORCH_CHECK(!pse_shift && !padding_mask && !actual_seq_lengths && !actual_seq_lengths_kv && !deq_scale1,
              "stand-in: only mask-only calls");
  TORCH_CHECK(sparse_mode <= 1, "stand-in: sparse_mode ", sparse_mode);
  std::optional<at::Tensor> keep;
  if (atten_mask) keep = atten_mask->logical_not();
  bool gqa = num_key_value_heads != 0 && num_key_value_heads != num_heads;
  auto out = at::scaled_dot_product_attention(q, k, v, keep, 0.0, false, scale_value, gqa);
  return (input_layout == "BNSD_BSND" ? out.transpose(1, 2) : out).contiguous();  // the fake's strides
}

// Decode: a dense BNSD cache (no block_table), no mask, one length shared by the batch.
at::Tensor incre_flash_attention_paged(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& block_table, const at::Tensor& actual_seq_lengths,
    const std::optional<at::Tensor>& atten_mask, const std::optional<at::Tensor>& pse_shift, int64_t num_heads,
    double scale_value, c10::string_view input_layout, int64_t num_key_value_heads, int64_t block_size,
    int64_t inner_precise) {
  TORCH_CHECK(input_layout == "BNSD" && !block_table && !atten_mask && !pse_shift, "stand-in: dense BNSD only");
  auto lengths = actual_seq_lengths.to(at::kLong).contiguous();
  const int64_t* l = lengths.data_ptr<int64_t>();
  for (int64_t b = 1; b < lengths.numel(); ++b) TORCH_CHECK(l[b] == l[0], "stand-in: one length for the batch");
  bool gqa = num_key_value_heads != 0 && num_key_value_heads != num_heads;
  return at::scaled_dot_product_attention(q, k.narrow(2, 0, l[0]), v.narrow(2, 0, l[0]), std::nullopt, 0.0,
                                          false, scale_value, gqa).contiguous();
}

// KV write: 1-D offsets, all equal, every batch row.
void scatter_update_into(at::Tensor& self, const at::Tensor& indices, const at::Tensor& updates, int64_t axis) {
  auto offsets = indices.to(at::kLong).contiguous();
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == self.size(0), "stand-in: one offset per batch row");
  for (int64_t b = 1; b < offsets.numel(); ++b) TORCH_CHECK(o[b] == o[0], "stand-in: one offset for the batch");
  int64_t dim = axis < 0 ? axis + self.dim() : axis;
  self.narrow(dim, o[0], updates.size(dim)).copy_(updates);
}

TORCH_LIBRARY_IMPL(npu_attn, CPU, m) {
  m.impl("npu_prompt_flash_attention", prompt_flash_attention);
  m.impl("npu_incre_flash_attention_paged", incre_flash_attention_paged);
  m.impl("scatter_update_into", scatter_update_into);
}
"""


def _load_stand_ins() -> None:
    from torch.utils.cpp_extension import load_inline

    import npu_attn_graph  # noqa: F401  (defines the ops the stand-ins implement)

    load_inline("npu_attn_bench_stand_ins", cpp_sources=STAND_INS, is_python_module=False)


def _compiled(model: torch.nn.Module, variant: str) -> Callable:
    if variant != "attention only":
        return compiled(model, variant)
    from npu_attn_graph.passes import PASSES

    passes = [p for p in PASSES if p != "static_cache_update"]
    return torch.compile(model, backend="npu_attn", fullgraph=True,
                         options={"executor": "inductor", "passes": passes})


def child(mode: str, rounds: int) -> list[dict]:
    from npu_attn_graph.demo_models import scenario_call

    torch.set_num_threads(1)
    if mode == "cpp":
        _load_stand_ins()
    rows = []
    with torch.no_grad():
        for kind, attn in CASES:
            for scenario in SCENARIOS:
                calls = {}
                for variant in VARIANTS:
                    torch._dynamo.reset()
                    model, args, kwargs = scenario_call(kind, attn, scenario)
                    eager, call = rewound(model, args, kwargs), rewound(_compiled(model, variant), args, kwargs)
                    expected = eager().logits
                    # float32; the kernels and Inductor sum in other orders
                    torch.testing.assert_close(call().logits, expected, rtol=1e-4, atol=1e-4,
                                               msg=lambda m: f"{mode} {kind} {attn} {scenario} {variant}: {m}")
                    calls[variant] = call
                rows.append({"mode": mode, "case": f"{kind} ({attn}) {scenario}", **interleaved(calls, rounds)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rounds)))
        return 0
    results = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--rounds", str(args.rounds)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode:
            sys.exit(f"the {mode} process failed:\n{out.stderr[-4000:]}")
        results[mode] = {row["case"]: row for row in json.loads(out.stdout.strip().splitlines()[-1])}
    print(f"torch {torch.__version__}, fp32 CPU, 1 thread, {args.rounds} interleaved rounds, medians; "
          "time against Inductor's in the same process\n")
    print("| model | inductor ms (python / cpp process) | npu_attn+inductor: python kernels | C++ stand-ins "
          "| attention only: python kernels | C++ stand-ins |")
    print("|---|---|---|---|---|---|")
    for case in results["python"]:
        p, c = results["python"][case], results["cpp"][case]
        cells = [f"{1e3 * p['inductor']:.2f} / {1e3 * c['inductor']:.2f}"]
        for variant in VARIANTS[1:]:
            cells += [f"{p[variant] / p['inductor']:.2f}x", f"{c[variant] / c['inductor']:.2f}x"]
        print(f"| {case} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
