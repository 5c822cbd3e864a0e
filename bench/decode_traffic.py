"""Bytes one decode step moves on the NPU, against the ideal (issue 15, goal 3).

    python bench/decode_traffic.py [--quick] [--dtypes float16,bfloat16] [--models llama,qwen2,mistral,gpt-oss]

Each model is built under FakeTensorMode (CPU fake tensors: no memory, no
compute; the meta device would make AOT pick SDPA's math decomposition instead
of the CPU fused form a real trace has), its static cache filled up to the
valid length, and one decode step converted by npu_attn_graph.to_ge_graph
(TorchAir offline). npu_attn_graph.traffic counts the bytes of every op of the
FX graph our passes hand to TorchAir and of the GE graph TorchAir builds, and
compares them with the ideal: every weight read once, the valid K/V read once,
the new K/V written once. Goal: <= 1.02x ideal, and no op that moves a whole
KV cache per step. "TorchAir alone" is the same step with options
{"passes": []} (FX graph only: TorchAir cannot convert it into one GE graph).
--ring adds Mistral's and gpt-oss's step with options {"sliding_window_cache":
"ring"}: the ring needs the layers' token count as a graph input, which a
decode step compiled on its own gets only with dynamic=True (every tensor
marked static, so the count is the one symbolic value).

Default size (the issue's): hidden 2048, 16 heads, 4 KV heads (head_dim 128),
4 layers, vocabulary 32000, batch 4, cache 2048, valid length 1025; Mistral's
sliding window 1024 (each step a full window), gpt-oss's 128 on every other
layer, 8 experts of 1024 (top 2). --quick: a small size to check the script.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from npu_attn_graph import to_ge_graph
from npu_attn_graph.traffic import Traffic, fx_traffic, ge_traffic

MODELS = ("llama", "qwen2", "mistral", "gpt-oss")


@dataclass
class Size:
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 4
    layers: int = 4
    vocab: int = 32000
    intermediate: int = 5632
    batch: int = 4
    cache: int = 2048
    valid: int = 1025
    window: int = 1024
    oss_window: int = 128


QUICK = Size(hidden=256, heads=4, kv_heads=2, layers=2, vocab=1024, intermediate=512, batch=2, cache=256, valid=129,
             window=128, oss_window=32)


def build_config(family: str, size: Size, dtype: torch.dtype):
    import transformers as T

    common = dict(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                  num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                  max_position_embeddings=2 * size.cache)
    head_dim = size.hidden // size.heads
    if family == "llama":
        cfg, cls = T.LlamaConfig(**common, head_dim=head_dim), T.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = T.Qwen2Config(**common), T.Qwen2ForCausalLM
    elif family == "mistral":
        cfg, cls = T.MistralConfig(**common, head_dim=head_dim, sliding_window=size.window), T.MistralForCausalLM
    elif family == "gpt-oss":
        cfg = T.GptOssConfig(**{**common, "intermediate_size": size.hidden // 2}, head_dim=head_dim,
                             num_local_experts=8, num_experts_per_tok=2, sliding_window=size.oss_window)
        cls = T.GptOssForCausalLM
        if dtype != torch.bfloat16:  # aten._grouped_mm takes bfloat16 only off the GPU: per-token expert matmuls
            cfg._experts_implementation = "batched_mm"
    else:
        raise ValueError(f"unknown model {family!r}; choose from {MODELS}")
    # gpt-oss has no sdpa path in transformers 5.23 (its sinks): eager attention.
    cfg._attn_implementation = "eager" if family == "gpt-oss" else "sdpa"
    return cfg, cls


def decode_step(family: str, size: Size, dtype: torch.dtype, passes: list[str] | None = None, ring: bool = False):
    """(fx Traffic, ge Traffic or None, GeConversion) of one decode step at size; ring: with
    sliding_window_cache="ring" (dynamic=True, every tensor static: the token counts symbolic)."""
    import transformers as T
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg, cls = build_config(family, size, dtype)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    default = torch.get_default_dtype()
    with mode, torch.no_grad():
        torch.set_default_dtype(dtype)  # .half() cannot swap fake parameters
        try:
            model = cls(cfg).eval()
        finally:
            torch.set_default_dtype(default)
        cache = T.StaticCache(config=cfg, max_cache_len=size.cache)
        ids = torch.zeros(size.batch, 1, dtype=torch.long)
        pos = torch.tensor([size.valid - 1])
        model(ids, past_key_values=cache, use_cache=True, cache_position=pos)  # allocates the cache layers
        for layer in cache.layers:  # the step writes the valid-th token: sliding windows are full
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = size.valid - 1
        options = None if passes is None else {"passes": passes}
        if ring:
            options = {**(options or {}), "sliding_window_cache": "ring"}
            for t in [ids, pos, *model.parameters(), *model.buffers()] + \
                    [t for layer in cache.layers for t in (layer.keys, layer.values)]:
                torch._dynamo.mark_static(t)
        result = to_ge_graph(model, ids, past_key_values=cache, use_cache=True, cache_position=pos,
                             options=options, dynamic=True if ring else None)
    graph = result.report.graphs_after[-1]
    fx = fx_traffic(graph, valid_kv=size.valid)
    ge = ge_traffic(result.graphs[0].graph_def, fx.ideal, valid_kv=size.valid, kv_len=size.cache) \
        if result.single_graph else None
    return fx, ge, result


def row(family: str, dtype: torch.dtype, label: str, t: Traffic | None) -> list[str]:
    if t is None:
        return [family, str(dtype).replace("torch.", ""), label, "-", "-", "-", "-", "(no complete GE graph)"]
    flagged = t.whole_cache()
    top = "; ".join(f"{o.op} {o.total / 2 ** 20:.1f}" for o in t.top(3))
    return [family, str(dtype).replace("torch.", ""), label, f"{t.total / 2 ** 20:.1f}",
            f"{t.ideal.total / 2 ** 20:.1f}", f"{t.ratio:.3f}x",
            f"{len(flagged)} ({sum(o.total for o in flagged) / 2 ** 20:.1f} MiB)", top]


def markdown(rows: list[list[str]]) -> str:
    head = ["model", "dtype", "graph", "MiB/step", "ideal MiB", "ratio", "whole-cache ops", "top 3 ops (MiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small size (checks the script)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--baseline", action="store_true", help="also TorchAir alone (passes=[]), FX graph")
    parser.add_argument("--details", action="store_true", help="print each graph's op lines and flagged ops")
    parser.add_argument("--ring", action="store_true",
                        help='also the sliding-window models with sliding_window_cache="ring"')
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    size = QUICK if args.quick else Size()
    print(f"size: {size}", flush=True)
    rows = []
    for family in args.models.split(","):
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            start = time.perf_counter()
            fx, ge, result = decode_step(family, size, dtype)
            took = time.perf_counter() - start
            print(f"{family} {name}: {took:.1f} s, {len(result.report.fused())}/{len(result.report.sites)} "
                  f"sites fused, {'one complete GE graph' if result.single_graph else 'NOT one GE graph'}",
                  flush=True)
            if args.details:
                for line in fx.lines(5) + (ge.lines(5) if ge else []):
                    print("   ", line)
            rows += [row(family, dtype, "npu_attn FX", fx), row(family, dtype, "npu_attn GE", ge)]
            if args.baseline:
                base, _, _ = decode_step(family, size, dtype, passes=[])
                rows.append(row(family, dtype, "TorchAir alone FX", base))
            if args.ring and family in ("mistral", "gpt-oss"):
                fx, ge, result = decode_step(family, size, dtype, ring=True)
                if not result.single_graph:
                    print(f"{family} {name} ring: no complete GE graph: {(result.failures or ['?'])[0][:240]}", flush=True)
                if args.details:
                    for line in fx.lines(5) + (ge.lines(5) if ge else []):
                        print("   ", line)
                rows += [row(family, dtype, "ring FX", fx), row(family, dtype, "ring GE", ge)]
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
