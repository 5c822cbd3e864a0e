"""What the sliding-window layout guard (npu_attn_graph.ring_layout) adds to each call
of a compiled graph, against the same call without it, side by side in one process.

    python bench/ring_guard.py [--windows 4,16,64] [--calls 2000]

A steady decode loop takes the guard's fast path: the same window tensors as its last
call, written since only by itself, so per window one identity and one version test
and a version update. The "call" here writes one slot of each window in place (what a
ring decode step does to its caches) and nothing else, so the ratio is an upper bound
on the guard's share of a real step.
"""

from __future__ import annotations

import argparse
import time

import torch

from npu_attn_graph import ring_layout
from npu_attn_graph.ring_layout import LayoutPlan, Window


def measure(windows: int, calls: int, rounds: int = 5) -> tuple[float, float]:
    """(microseconds per call unguarded, guarded), the best of `rounds` interleaved rounds."""
    plan = LayoutPlan(windows=tuple(Window(i, f"layers[{i}].keys", windows, True) for i in range(windows)),
                      others=())

    def step(*args):
        for window in args[:windows]:
            window[:, :, 0] = 1.0

    guarded = ring_layout.guarded(step, lambda: plan)
    mine = [torch.zeros(1, 8, 1024, 128) for _ in range(windows)]
    theirs = [torch.zeros(1, 8, 1024, 128) for _ in range(windows)]
    guarded(*mine, 2048)  # a multiple of W: recorded without a rotation
    best = {"bare": float("inf"), "guarded": float("inf")}
    for _ in range(rounds):
        for name, fn, args in (("bare", step, [*theirs, 2049]), ("guarded", guarded, [*mine, 2049])):
            start = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    return best["bare"], best["guarded"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", default="4,16,64")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| windows | call alone (us) | with the guard (us) | guard per call (us) | per window (us) |")
    print("|---|---|---|---|---|")
    for n in (int(x) for x in args.windows.split(",")):
        bare, guarded = measure(n, args.calls)
        print(f"| {n} | {bare:.1f} | {guarded:.1f} | {guarded - bare:.1f} | {(guarded - bare) / n:.2f} |")


if __name__ == "__main__":
    main()
