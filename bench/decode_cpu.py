"""Static-cache decode and 512-token prefill on CPU: npu_attn against eager and Inductor.

Run:  python bench/decode_cpu.py [--steps 32] [--quick]

A Llama config (hidden 512, 8 heads of 64, 2 KV heads, 4 layers, random
weights) with a StaticCache of 1024 positions. For each way of running the
model it times a 512-token prefill and then single-token decode steps (median
of --steps), after a warm-up that includes compilation:
- eager: the model as is (SDPA attention, index_copy_ cache writes);
- inductor: torch.compile(backend="inductor");
- npu_attn: torch.compile(backend="npu_attn"), fused ops with reference
  kernels, rest of the graph run op by op;
- npu_attn+inductor: the same with options={"executor": "inductor"}.
Ratios are against eager, measured in the same process. Goal: npu_attn no
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


def run(variant: str, prompt_len: int, steps: int, quick: bool) -> tuple[float, float, torch.Tensor]:
    model = build(quick)
    if variant == "inductor":
        model.forward = torch.compile(model.forward, backend="inductor", fullgraph=True)
    elif variant == "npu_attn":
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True)
    elif variant == "npu_attn+inductor":
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True,
                                      options={"executor": "inductor"})
    ids = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(1))

    def fresh_cache():
        return transformers.StaticCache(config=model.config, max_cache_len=prompt_len + steps + 8)

    def prefill(cache):
        return model(ids, past_key_values=cache, cache_position=torch.arange(prompt_len), use_cache=True)

    with torch.no_grad():
        # Warm-up: compiles the prefill and the decode graph.
        cache = fresh_cache()
        out = prefill(cache)
        token = out.logits[:, -1:].argmax(-1)
        model(token, past_key_values=cache, cache_position=torch.tensor([prompt_len]), use_cache=True)

        cache = fresh_cache()
        start = time.perf_counter()
        out = prefill(cache)
        prefill_s = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        tokens, times = [], []
        for i in range(steps):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, cache_position=torch.tensor([prompt_len + i]), use_cache=True)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
    return prefill_s, statistics.median(times), torch.cat(tokens, dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="a smaller model, for a smoke run")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, prompt {args.prompt}, "
          f"{args.steps} decode steps")
    print("| variant | prefill ms | vs eager | decode step ms | vs eager | tokens equal eager |")
    print("|---|---|---|---|---|---|")
    base = None
    for variant in ("eager", "inductor", "npu_attn", "npu_attn+inductor"):
        torch._dynamo.reset()
        prefill_s, step_s, tokens = run(variant, args.prompt, args.steps, args.quick)
        if base is None:
            base = (prefill_s, step_s, tokens)
        same = torch.equal(tokens, base[2])
        print(f"| {variant} | {1e3 * prefill_s:.1f} | {prefill_s / base[0]:.2f}x | {1e3 * step_s:.2f} | "
              f"{step_s / base[1]:.2f}x | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
