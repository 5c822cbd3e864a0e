"""Reference kernels against torch SDPA on the same math (CPU).

Run:  python bench/kernels.py [--repeats N] [--quick]

Cases (fp32, CPU):
- prefill: B=1, S=2048, N=16, D=128, non-causal and causal
  (npu_prompt_flash_attention sparse_mode 0 / 3 vs SDPA / SDPA is_causal);
  these reach torch's fused SDPA kernel through the reference's fast path;
- prefill with ragged actual lengths (2048 and 1536) and rightDownCausal: the
  chunked path, against SDPA with the equivalent dense boolean mask;
- decode: B=16, KV length 4096, N=32, KV heads 8 (GQA 4), D=128
  (npu_incre_flash_attention dense vs SDPA enable_gqa), and the same with a
  paged cache of 128-token blocks in shuffled order;
- training: npu_fusion_attention forward + backward (B=2, S=1024, N=8, D=64,
  BNSD, no mask) against SDPA forward + backward on the same shapes; each call
  runs both passes and returns the output and the three gradients.

Times are the median of interleaved repeats in one process; peak memory is the
extra resident memory of one call, measured in a fresh subprocess per
(case, implementation) so that allocator caches do not leak between them.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import npu_attn_graph.ops as npu

Case = Callable[[], tuple[Callable[[], object], Callable[[], object]]]


def prefill(causal: bool, quick: bool):
    s = 512 if quick else 2048
    b, n, d = 1, 16, 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, s, d, generator=g) for _ in range(3))
    scale = 1 / math.sqrt(d)
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)

    def ours():
        if causal:
            return npu.npu_prompt_flash_attention(q, k, v, num_heads=n, scale_value=scale, input_layout="BNSD",
                                                  atten_mask=mask, sparse_mode=3)
        return npu.npu_prompt_flash_attention(q, k, v, num_heads=n, scale_value=scale, input_layout="BNSD")

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)

    return ours, sdpa


def prefill_ragged(quick: bool):
    """Ragged batch, rightDownCausal: our chunked path (mask built per chunk)
    against SDPA given the equivalent dense boolean mask."""
    s = 512 if quick else 2048
    b, n, d = 2, 16, 128
    lengths = [s, s * 3 // 4]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, s, d, generator=g) for _ in range(3))
    scale = 1 / math.sqrt(d)
    compressed = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    i = torch.arange(s).view(-1, 1)
    j = torch.arange(s).view(1, -1)
    keep = torch.stack([(j <= i) & (i < n_b) & (j < n_b) | (i >= n_b) & (j == 0) for n_b in lengths])[:, None]

    def ours():
        return npu.npu_prompt_flash_attention(q, k, v, num_heads=n, scale_value=scale, input_layout="BNSD",
                                              atten_mask=compressed, sparse_mode=3, actual_seq_lengths=lengths,
                                              actual_seq_lengths_kv=lengths)

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
        # padded query rows are zero in the NPU semantics
        return out * (torch.arange(s).view(1, 1, -1, 1) < torch.tensor(lengths).view(-1, 1, 1, 1))

    return ours, sdpa


def decode(paged: bool, quick: bool):
    b, n, nkv, d = 16, 32, 8, 128
    kv_len = 1024 if quick else 4096
    block = 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, n, 1, d, generator=g)
    k = torch.randn(b, nkv, kv_len, d, generator=g)
    v = torch.randn(b, nkv, kv_len, d, generator=g)
    scale = 1 / math.sqrt(d)
    lengths = [kv_len] * b
    if paged:
        blocks_per_seq = kv_len // block
        order = torch.randperm(b * blocks_per_seq, generator=g)
        table = order.view(b, blocks_per_seq).to(torch.int32)
        # (blocknum, numKvHeads, blocksize, D): scatter each sequence's blocks.
        k_cache = torch.empty(b * blocks_per_seq, nkv, block, d)
        v_cache = torch.empty_like(k_cache)
        k_cache[order] = k.view(b, nkv, blocks_per_seq, block, d).transpose(1, 2).reshape(-1, nkv, block, d)
        v_cache[order] = v.view(b, nkv, blocks_per_seq, block, d).transpose(1, 2).reshape(-1, nkv, block, d)

        def ours():
            return npu.npu_incre_flash_attention(q, k_cache, v_cache, num_heads=n, num_key_value_heads=nkv,
                                                 scale_value=scale, input_layout="BNSD", block_table=table,
                                                 block_size=block, actual_seq_lengths=lengths)
    else:
        def ours():
            return npu.npu_incre_flash_attention(q, k, v, num_heads=n, num_key_value_heads=nkv,
                                                 scale_value=scale, input_layout="BNSD",
                                                 actual_seq_lengths=lengths)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    return ours, sdpa


def fusion_training(quick: bool):
    """Forward and backward: the reference's autograd runs npu_fusion_attention_grad."""
    s = 256 if quick else 1024
    b, n, d = 2, 8, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, s, d, generator=g).requires_grad_() for _ in range(3))
    dy = torch.randn(b, n, s, d, generator=g)
    scale = 1 / math.sqrt(d)

    def run(attention):
        for t in (q, k, v):
            t.grad = None
        out = attention()
        out.backward(dy)
        return torch.cat([out.detach().flatten(), q.grad.flatten(), k.grad.flatten(), v.grad.flatten()])

    def ours():
        return run(lambda: npu.npu_fusion_attention(q, k, v, n, "BNSD", scale=scale)[0])

    def sdpa():
        return run(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))

    return ours, sdpa


CASES = {
    "prefill B1 S2048 N16 D128": lambda quick: prefill(False, quick),
    "prefill causal B1 S2048 N16 D128": lambda quick: prefill(True, quick),
    "prefill ragged causal B2 S2048 N16 D128": prefill_ragged,
    "decode B16 KV4096 GQA4 D128": lambda quick: decode(False, quick),
    "decode paged(128) B16 KV4096 GQA4 D128": lambda quick: decode(True, quick),
    "npu_fusion_attention fwd+bwd B2 S1024 N8 D64": fusion_training,
}
GOALS = {
    "prefill B1 S2048 N16 D128": 1.5,
    "prefill causal B1 S2048 N16 D128": 1.5,
    "prefill ragged causal B2 S2048 N16 D128": 1.5,
    "decode B16 KV4096 GQA4 D128": 1.5,
    "decode paged(128) B16 KV4096 GQA4 D128": 2.0,
    "npu_fusion_attention fwd+bwd B2 S1024 N8 D64": 2.0,
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def _peak_extra_mib(name: str, which: int, quick: bool, queue) -> None:
    fns = CASES[name](quick)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _rss_kib("VmRSS")
    fns[which]()
    queue.put((_rss_kib("VmHWM") - before) / 1024)


def peak_memory(name: str, which: int, quick: bool) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_extra_mib, args=(name, which, quick, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def timings(name: str, repeats: int, quick: bool) -> tuple[float, float, float]:
    ours, sdpa = CASES[name](quick)
    out_ours, out_sdpa = ours(), sdpa()  # warm-up, and a correctness check
    err = (out_ours - out_sdpa).abs().max().item()
    t_ours, t_sdpa = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, t_ours), (sdpa, t_sdpa)):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_sdpa), err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    header = "| case | ours ms | SDPA ms | time ratio | goal | ours peak MiB | SDPA peak MiB | max abs diff |"
    print(header)
    print("|" + "---|" * 8)
    rows = []
    for name in CASES:
        t_ours, t_sdpa, err = timings(name, args.repeats, args.quick)
        m_ours, m_sdpa = peak_memory(name, 0, args.quick), peak_memory(name, 1, args.quick)
        ratio = t_ours / t_sdpa
        rows.append(dict(case=name, ours_ms=t_ours * 1e3, sdpa_ms=t_sdpa * 1e3, ratio=ratio,
                         goal=GOALS[name], ours_peak_mib=m_ours, sdpa_peak_mib=m_sdpa, max_abs_diff=err))
        print(f"| {name} | {t_ours * 1e3:.1f} | {t_sdpa * 1e3:.1f} | {ratio:.2f}x | <= {GOALS[name]}x "
              f"| {m_ours:.0f} | {m_sdpa:.0f} | {err:.1e} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
