"""Static-cache decode and 512-token prefill on CPU: npu_attn against eager and Inductor.

Run:  python bench/decode_cpu.py [--steps 32] [--quick]

A Llama config (hidden 512, 8 heads of 64, 2 KV heads, 4 layers, random
weights) with a StaticCache of 1024 positions. For each way of running the
model it times a 512-token prefill and then single-token decode steps. Every
variant is compiled and warmed up first; then --rounds rounds run each variant
once, one after another (interleaved, so a change in this shared machine's speed
hits every variant alike); reported are the median prefill over rounds and the
median decode step over all rounds' steps:
- eager: the model as is (SDPA attention, index_copy_ cache writes);
- inductor: torch.compile(backend="inductor");
- npu_attn: torch.compile(backend="npu_attn"), fused ops with reference
  kernels, rest of the graph run op by op;
- npu_attn+inductor: the same with options={"executor": "inductor"}.
Ratios are against eager, measured in the same process, interleaved. Goal: npu_attn no
slower than eager.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import transformers


def build(quick: bool):
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256 if quick else 512,
                                   intermediate_size=512 if quick else 1024, num_hidden_layers=2 if quick else 4,
                                   num_attention_heads=4 if quick else 8, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


VARIANTS = ("eager", "inductor", "npu_attn", "npu_attn+inductor")


class Contender:
    """One way of running the model, compiled and warmed up; `round()` times one prefill
    (on a fresh cache) and `steps` decode steps after it."""

    def __init__(self, variant: str, prompt_len: int, steps: int, quick: bool):
        self.model, self.prompt_len, self.steps = build(quick), prompt_len, steps
        backend = {"inductor": "inductor", "npu_attn": "npu_attn", "npu_attn+inductor": "npu_attn"}.get(variant)
        if backend is not None:
            options = {"options": {"executor": "inductor"}} if variant == "npu_attn+inductor" else {}
            self.model.forward = torch.compile(self.model.forward, backend=backend, fullgraph=True, **options)
        self.ids = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(1))
        self.round()  # warm-up: compiles the prefill and the decode graph

    def round(self) -> tuple[float, list[float], torch.Tensor]:
        model, n = self.model, self.prompt_len
        cache = transformers.StaticCache(config=model.config, max_cache_len=n + self.steps + 8)
        with torch.no_grad():
            start = time.perf_counter()
            out = model(self.ids, past_key_values=cache, cache_position=torch.arange(n), use_cache=True)
            prefill_s = time.perf_counter() - start
            token = out.logits[:, -1:].argmax(-1)
            tokens, times = [], []
            for i in range(self.steps):
                start = time.perf_counter()
                out = model(token, past_key_values=cache, cache_position=torch.tensor([n + i]), use_cache=True)
                times.append(time.perf_counter() - start)
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(token)
        return prefill_s, times, torch.cat(tokens, dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--quick", action="store_true", help="a smaller model, for a smoke run")
    args = parser.parse_args(argv)
    contenders = {}
    for variant in VARIANTS:  # each compiled and warmed up before any timing
        contenders[variant] = Contender(variant, args.prompt, args.steps, args.quick)
    prefills: dict[str, list[float]] = {v: [] for v in VARIANTS}
    steps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    tokens: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):  # interleaved: a change in the machine's speed hits every variant alike
        for variant, contender in contenders.items():
            prefill_s, step_times, tokens[variant] = contender.round()
            prefills[variant].append(prefill_s)
            steps[variant].extend(step_times)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, prompt {args.prompt}, "
          f"{args.steps} decode steps, {args.rounds} interleaved rounds (medians)")
    print("| variant | prefill ms | vs eager | decode step ms | vs eager | tokens equal eager |")
    print("|---|---|---|---|---|---|")
    base_prefill, base_step = statistics.median(prefills["eager"]), statistics.median(steps["eager"])
    for variant in VARIANTS:
        prefill_s, step_s = statistics.median(prefills[variant]), statistics.median(steps[variant])
        same = torch.equal(tokens[variant], tokens["eager"])
        print(f"| {variant} | {1e3 * prefill_s:.1f} | {prefill_s / base_prefill:.2f}x | {1e3 * step_s:.2f} | "
              f"{step_s / base_step:.2f}x | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
