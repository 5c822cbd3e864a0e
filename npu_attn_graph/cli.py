"""npu-attn-graph command line."""

from __future__ import annotations

import argparse
import sys

from .demo import FP32_TOLERANCE, format_results, run_demo


def _demo(args: argparse.Namespace) -> int:
    print(f"npu_attn_graph demo: tiny GQA decoder attention (B={args.batch}, N=8, KV heads 2, D=64), "
          f"prompt {args.prompt} + {args.new_tokens} decode steps, reference kernels on CPU")
    results = run_demo(batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens)
    print(format_results(results))
    worst = max(r.max_abs_err for r in results)
    ok = worst <= FP32_TOLERANCE
    print(f"worst error {worst:.2e} ({'within' if ok else 'OVER'} the fp32 tolerance {FP32_TOLERANCE:.0e})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npu-attn-graph", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in default job",
                          description="Run a tiny GQA decoder attention through the fused ops and check it "
                                      "against SDPA. Example: npu-attn-graph demo --new-tokens 4")
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--prompt", type=int, default=24)
    demo.add_argument("--new-tokens", type=int, default=8)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
