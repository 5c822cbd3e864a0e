"""npu_attn's executors against Inductor and eager, side by side (issue 15, goal 1).

Run:  python bench/executors.py [--part zoo|realistic|all] [--rounds N] [--quick]

Variants, all on the same model and inputs, compiled once, then called in
interleaved rounds (one call of each variant per round; the median per variant):
- eager: the model as is;
- inductor: torch.compile(backend="inductor");
- npu_attn: backend="npu_attn", the default eager executor (rewritten graph run op by op);
- npu_attn+inductor: backend="npu_attn", options={"executor": "inductor"} (the same
  rewrites, the graph around our ops compiled by Inductor, our ops extern kernels).

Parts:
- zoo: the built-in demo models (hidden 64, 2 layers: Llama and Qwen2 with SDPA,
  Llama and GPT-2 with eager attention), 1 thread, a 2-prompt prefill and one
  static-cache decode step each;
- realistic: Llama, hidden 2048, 16 heads, 4 KV heads, 4 layers, float32, 2 threads:
  a decode step at batch 4 with a StaticCache of 2048 (1024 tokens cached) and a
  1024-token prefill at batch 1. (--quick: hidden 512, cache 512, prefill 256.)

Goals: npu_attn+inductor at least as fast as Inductor on every zoo row, and at the
realistic size at least as fast as Inductor and as eager, for decode and prefill.
Ratios are times against Inductor's (< 1.00x: faster than Inductor).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from typing import Any, Callable

import torch

VARIANTS = ("eager", "inductor", "npu_attn", "npu_attn+inductor")


def compiled(model: torch.nn.Module, variant: str) -> Callable:
    if variant == "eager":
        return model
    if variant == "inductor":
        return torch.compile(model, backend="inductor", fullgraph=True)
    options = {"executor": "inductor"} if variant == "npu_attn+inductor" else {}
    return torch.compile(model, backend="npu_attn", fullgraph=True, options=options)


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each variant, the variants taking turns in each round
    (after two warm-up calls each, which compile)."""
    for call in calls.values():
        call(), call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _case(make: Callable[[], tuple[torch.nn.Module, tuple, dict]], rounds: int) -> dict[str, float]:
    """Each variant on its own fresh state from `make()` (a static cache advances with
    every call): its first call's logits equal eager's, then the timed calls."""
    calls = {}
    with torch.no_grad():
        expected = None
        for name in VARIANTS:
            model, args, kwargs = make()
            calls[name] = call = rewound(compiled(model, name), args, kwargs)
            logits = call().logits
            if expected is None:
                expected = logits
            # float32 throughout; the fused reference kernels and Inductor sum in other orders
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        return interleaved(calls, rounds)


def rewound(fn: Callable, args: tuple, kwargs: dict) -> Callable[[], Any]:
    """fn(*args, **kwargs) as a call to repeat: a static cache's write position is put back first to
    where it is now (transformers' StaticCache layers advance it with every call, so repeated decode
    steps would run past the cache's end)."""
    cache = kwargs.get("past_key_values")
    layers = [layer for layer in getattr(cache, "layers", []) if hasattr(layer, "cumulative_length")]
    starts = [layer.cumulative_length.clone() for layer in layers]

    def call() -> Any:
        for layer, start in zip(layers, starts):
            layer.cumulative_length.copy_(start)
        return fn(*args, **kwargs)

    return call


def _row(name: str, t: dict[str, float]) -> str:
    base = t["inductor"]
    cells = " | ".join(f"{1e3 * t[v]:.2f} ({t[v] / base:.2f}x)" for v in VARIANTS)
    return f"| {name} | {cells} | {t['eager'] / t['npu_attn+inductor']:.2f}x |"


def zoo(rounds: int) -> None:
    from npu_attn_graph.demo_models import scenario_call

    torch.set_num_threads(1)
    print("\nzoo (demo models, hidden 64, 2 layers), 1 thread; ms per call (vs Inductor)\n")
    print("| model | " + " | ".join(VARIANTS) + " | npu_attn+inductor speed-up over eager |")
    print("|---|---|---|---|---|---|")
    for kind, attn in (("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager"), ("gpt2", "eager")):
        for scenario in ("prefill", "static_decode"):
            torch._dynamo.reset()
            make = functools.partial(scenario_call, kind, attn, scenario)
            print(_row(f"{kind} ({attn}) {scenario}", _case(make, rounds)), flush=True)


def realistic(rounds: int, quick: bool) -> None:
    import transformers

    torch.set_num_threads(2)
    hidden, cache_len, prefill = (512, 512, 256) if quick else (2048, 2048, 1024)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                   num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                                   head_dim=hidden // 16, max_position_embeddings=cache_len)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    print(f"\nrealistic (Llama hidden {hidden}, 16/4 heads, 4 layers, fp32), 2 threads; ms per call (vs Inductor)\n")
    print("| step | " + " | ".join(VARIANTS) + " | npu_attn+inductor speed-up over eager |")
    print("|---|---|---|---|---|---|")
    batch, valid = 4, cache_len // 2
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (batch, valid), generator=g)
    token = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g)

    def decode_step():  # a fresh cache holding the prompt (eager prefill), then one token
        cache = transformers.StaticCache(config=cfg, max_cache_len=cache_len)
        with torch.no_grad():
            model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(valid), use_cache=True)
        return model, (), dict(input_ids=token, past_key_values=cache, cache_position=torch.tensor([valid]),
                               use_cache=True)

    torch._dynamo.reset()
    print(_row(f"decode (batch {batch}, cache {cache_len}, {valid} cached)", _case(decode_step, rounds)), flush=True)
    ids = torch.randint(0, cfg.vocab_size, (1, prefill), generator=g)
    torch._dynamo.reset()
    print(_row(f"prefill ({prefill} tokens)", _case(lambda: (model, (ids,), {"use_cache": False}), rounds)),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("zoo", "realistic", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="the realistic part at hidden 512")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, fp32 CPU, {args.rounds} interleaved rounds, medians")
    if args.part in ("zoo", "all"):
        zoo(args.rounds)
    if args.part in ("realistic", "all"):
        realistic(args.rounds, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
