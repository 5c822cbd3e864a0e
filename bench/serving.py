"""Serving benchmark on CPU: the mini-vLLM engine compiled with npu_attn (executor "eager",
op by op, and executor "inductor"), the same engine eager, and transformers' generate()
with a static cache, batched, on the same requests.

    python bench/serving.py                    # defaults: 32 requests, tiny Llama, ~2 minutes
    python bench/serving.py --requests 64 --layers 4 --max-tokens 64

Each variant lives in its own subprocess (so its peak RSS is its own), started from one
invocation; warm-up (compilation, a first generate()) is excluded from the timings. The
timed runs are interleaved: round r runs each variant once, one after another, so a
change in this shared machine's speed hits every variant alike; each variant's time is
its fastest of --repeats rounds (default 5).
Reported: throughput (generated tokens/s), time per output token (mean over requests
of (finish - first token) / (tokens - 1); for generate(): (full run - 1-token run) /
(tokens - 1)), peak RSS of the process and the KV-cache size, each also as a ratio to
generate(). Greedy decoding; "equal" counts requests whose tokens equal generate()'s
for that prompt alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_model(args):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
                                      eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(config).eval()


def make_prompts(args):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.requests,), generator=g).tolist()
    return [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in lengths]


def engine_runner(args, compiled: bool, executor: str = "eager"):
    """Build and warm the engine; return a function that serves the prompts once, timed."""
    from examples.mini_vllm import LLMEngine, SamplingParams

    hf, prompts = make_model(args), make_prompts(args)
    max_model_len = args.max_len + args.max_tokens
    engine = LLMEngine.from_hf(hf, num_blocks=args.requests * -(-max_model_len // 16) + 1, block_size=16,
                               max_model_len=max_model_len, max_num_seqs=args.requests,
                               max_num_batched_tokens=args.max_num_batched_tokens, compile=compiled,
                               backend_options={"executor": executor})
    engine.warmup()
    cache = sum(c.numel() * c.element_size() for c in engine.kv_caches)

    def run():
        t0 = time.perf_counter()
        outputs = engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
        wall = time.perf_counter() - t0
        tpot = [(o.finish_time - o.first_token_time) / (len(o.output_token_ids) - 1) for o in outputs]
        return dict(wall=wall, tokens=sum(len(o.output_token_ids) for o in outputs), tpot=sum(tpot) / len(tpot),
                    cache=cache, outputs=[o.output_token_ids for o in outputs])

    return run


def hf_runner(args):
    """transformers' generate() with a StaticCache, all prompts in one left-padded batch."""
    import transformers

    hf, prompts = make_model(args), make_prompts(args)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def gen(n):
        cache = transformers.StaticCache(config=hf.config, max_cache_len=width + args.max_tokens)
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               past_key_values=cache, pad_token_id=0)

    gen(2)  # warm-up
    cfg = hf.config
    cache = 2 * cfg.num_hidden_layers * len(prompts) * (width + args.max_tokens) * cfg.num_key_value_heads * \
        (cfg.hidden_size // cfg.num_attention_heads) * 4

    def run():
        t0 = time.perf_counter()
        gen(1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = gen(args.max_tokens)
        wall = time.perf_counter() - t0
        return dict(wall=wall, tokens=len(prompts) * args.max_tokens, tpot=(wall - first) / (args.max_tokens - 1),
                    cache=cache, outputs=out[:, width:].tolist())

    return run


def reference_outputs(args):
    hf, prompts = make_model(args), make_prompts(args)
    with torch.no_grad():
        return [hf.generate(torch.tensor([p]), max_new_tokens=args.max_tokens, do_sample=False)[0, len(p):].tolist()
                for p in prompts]


VARIANTS = {"npu_attn": lambda a: engine_runner(a, True),
            "npu_attn+inductor": lambda a: engine_runner(a, True, "inductor"),
            "eager": lambda a: engine_runner(a, False), "hf_static": hf_runner}


def child(args) -> None:
    """One variant: warm up, then one timed run per line "run" on stdin, a JSON line each."""
    run = VARIANTS[args.variant](args)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        result = run()
        result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result), flush=True)


def _read(proc: subprocess.Popen, name: str) -> str:
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        sys.exit(f"{name} failed:\n{proc.stderr.read()[-4000:]}")
    return line


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="the engine's token budget per step (vLLM's default, 2048, admits all 32 default prompts "
                         "in one prefill, as generate() takes them in one batch)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds; each variant's fastest counts")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated variants to run (hf_static, the baseline, always runs)")
    ap.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.variant:  # child process
        child(args)
        return

    child_args = [a for a in sys.argv[1:]]
    names = [n for n in args.variants.split(",") if n != "hf_static"] + ["hf_static"]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    procs = {}
    for name in names:  # warmed one at a time (compiling takes both cores)
        procs[name] = subprocess.Popen([sys.executable, __file__, *child_args, "--variant", name], cwd=ROOT,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        while _read(procs[name], name).strip() != "ready":
            pass
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeats):  # interleaved rounds
        for name, proc in procs.items():
            proc.stdin.write("run\n")
            proc.stdin.flush()
            runs[name].append(json.loads(_read(proc, name)))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    results = {}
    for name, rs in runs.items():  # the fastest round of each (this shared machine's speed varies)
        results[name] = dict(rs[-1], wall=min(r["wall"] for r in rs), tpot=min(r["tpot"] for r in rs))
    expected = reference_outputs(args)
    base = results["hf_static"]
    print(f"{args.requests} requests, prompts {args.min_len}-{args.max_len} tokens, {args.max_tokens} new tokens each; "
          f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
          f"float32, CPU ({torch.get_num_threads()} threads)\n")
    print("| variant | tokens/s | vs HF | ms per output token | vs HF | peak RSS MB | vs HF | KV cache MB | vs HF "
          "| equal generate() |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        tps = r["tokens"] / r["wall"]
        equal = sum(o == e for o, e in zip(r["outputs"], expected))
        print(f"| {name} | {tps:.0f} | {tps / (base['tokens'] / base['wall']):.2f}x | {1000 * r['tpot']:.2f} | "
              f"{r['tpot'] / base['tpot']:.2f}x | {r['peak_rss'] / 2**20:.0f} | {r['peak_rss'] / base['peak_rss']:.2f}x | "
              f"{r['cache'] / 2**20:.1f} | {r['cache'] / base['cache']:.2f}x | {equal}/{len(expected)} |")


if __name__ == "__main__":
    main()
