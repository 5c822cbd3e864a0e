"""Run the mini-vLLM engine on a set of prompts and print per-request outputs and throughput.

    python -m examples.mini_vllm --prompts 16                  # tiny random Llama, npu_attn backend
    python -m examples.mini_vllm --prompts 16 --eager          # no torch.compile
    python -m examples.mini_vllm --model /path/to/checkpoint   # a local Llama/Qwen2 folder
"""

from __future__ import annotations

import argparse
import time

import torch

from .engine import LLMEngine
from .sampler import SamplingParams


def tiny_llama(kind: str = "llama", layers: int = 2, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    config = transformers.LlamaConfig(**common) if kind == "llama" else transformers.Qwen2Config(**common)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.mini_vllm", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="number of requests (random prompts)")
    ap.add_argument("--model", default="tiny-llama", help="tiny-llama, tiny-qwen2, or a local checkpoint folder")
    ap.add_argument("--min-len", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--waves", type=int, default=2, help="requests arrive in this many waves")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-blocks", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--eager", action="store_true", help="run the model definition without torch.compile")
    ap.add_argument("--executor", default="eager", help='npu_attn executor option ("eager", "inductor", ...)')
    args = ap.parse_args(argv)

    if args.model in ("tiny-llama", "tiny-qwen2"):
        hf = tiny_llama(args.model.split("-")[1])
        engine_cls = lambda **kw: LLMEngine.from_hf(hf, **kw)  # noqa: E731
        vocab = hf.config.vocab_size
    else:
        engine_cls = lambda **kw: LLMEngine.from_pretrained(args.model, **kw)  # noqa: E731
        vocab = None
    max_model_len = args.max_len + args.max_tokens
    kw = dict(num_blocks=args.num_blocks, block_size=args.block_size, max_model_len=max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max(256, max_model_len))
    kw.update(compile=False) if args.eager else kw.update(backend_options={"executor": args.executor})
    engine = engine_cls(**kw)
    vocab = vocab or engine.model.config.vocab_size

    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    per_wave = -(-args.prompts // max(1, args.waves))
    arrivals = [(i // per_wave) * 4 for i in range(args.prompts)]
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed + i) for i in range(args.prompts)]

    t0 = time.perf_counter()
    engine.warmup()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs = engine.generate(prompts, params, arrivals)
    wall = time.perf_counter() - t0

    for o in outputs:
        print(f"request {o.request_id:>3}  prompt {len(o.prompt_token_ids):>3} tokens  "
              f"-> {o.output_token_ids}  ({o.finish_reason}{', preempted' if o.num_preemptions else ''})")
    generated = sum(len(o.output_token_ids) for o in outputs)
    steps = engine.step_stats
    mode = "eager" if args.eager else f"npu_attn (executor {args.executor})"
    print(f"\n{len(outputs)} requests, {generated} generated tokens in {wall:.2f} s: {generated / wall:.1f} tokens/s, "
          f"{1000 * wall / generated:.2f} ms per output token; {len(steps)} iterations, "
          f"max {max(s.decode_requests for s in steps)} concurrent decodes; {mode}; warm-up {warm:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
