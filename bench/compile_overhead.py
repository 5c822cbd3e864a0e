"""Time spent in the npu_attn passes against total compile time (CPU).

Run:  python bench/compile_overhead.py [--layers 2 8 32]

For a tiny-width Llama config with 2, 8 and 32 layers, compiles a
static-cache decode step (the graph with the most sites: attention and KV
updates) with backend="npu_attn" and reports:
- total compile time: first call minus the steady-state time of one call;
- time inside our passes (measured by the backend, per pass);
- their ratio, and the pass time per layer (linear growth keeps it flat).
Goal: passes at most 5% of total compile time, growing linearly with layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import transformers

from npu_attn_graph import Report


def decode_step_model(layers: int):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def measure(layers: int) -> dict:
    model = decode_step_model(layers)
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    token = torch.randint(0, 256, (1, 1))
    position = torch.tensor([3])
    with torch.no_grad():  # StaticCache allocates lazily: do it before compiling
        model(token, past_key_values=cache, cache_position=position)
    torch._dynamo.reset()
    report = Report()
    compiled = torch.compile(model, backend="npu_attn", fullgraph=True, options={"report": report})
    with torch.no_grad():
        start = time.perf_counter()
        compiled(token, past_key_values=cache, cache_position=position)
        first = time.perf_counter() - start
        steady = []
        for _ in range(5):
            start = time.perf_counter()
            compiled(token, past_key_values=cache, cache_position=position)
            steady.append(time.perf_counter() - start)
    compile_s = first - statistics.median(steady)
    assert report.graphs == 1, f"expected one graph, got {report.graphs}"
    passes_s = sum(report.pass_seconds.values())
    return dict(layers=layers, compile_s=compile_s, passes_s=passes_s, share=passes_s / compile_s,
                per_layer_ms=1e3 * passes_s / layers, fused=len(report.fused()), sites=len(report.sites),
                per_pass=report.pass_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print("| layers | fused/sites | total compile s | our passes s | share | passes ms per layer | goal |")
    print("|---|---|---|---|---|---|---|")
    for layers in args.layers:
        r = measure(layers)
        print(f"| {layers} | {r['fused']}/{r['sites']} | {r['compile_s']:.2f} | {r['passes_s']:.3f} | "
              f"{100 * r['share']:.1f}% | {r['per_layer_ms']:.1f} | <= 5% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
