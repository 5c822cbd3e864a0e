"""npu-attn-graph: see what npu_attn_graph does to a model, and why.

Commands: dump (everything to a directory), check (a CI gate), explain (the
site table), demo (the built-in tiny Llama, compiled and generating).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .demos import DEMO_HELP
from .targets import FORMS, TargetError, load_target

PROG = "npu-attn-graph"
TARGET_HELP = (f"what to compile: {FORMS}; the factory returns (model, example_args) or "
               "(model, example_args, example_kwargs); demos: "
               + "; ".join(f"demo:{name} ({text})" for name, text in DEMO_HELP.items()))
# Exit codes: 0 ok; 1 check found sites left alone / not one GE graph (or demo
# differed from eager); 2 bad command line or TARGET; 3 anything else failed.
EXIT_FAILED, EXIT_USAGE, EXIT_ERROR = 1, 2, 3
# What dump writes inside --out (all of it, nothing elsewhere).
DUMP_ENTRIES = ("fx", "ge", "pictures", "report.txt", "report.json", "summary.txt")


class UsageError(Exception):
    """Bad command-line input; one line."""


def _progress(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


class _Steps:
    """Progress lines with the time each step took."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        _progress(f"{message} ({time.perf_counter() - self.start:.1f} s)")


def _load(spec: str, say: Callable[[str], None]):
    say(f"loading {spec}")
    return load_target(spec)


def _convert(target, say: Callable[[str], None], out_dir: Path | None = None, passes: list[str] | None = None):
    import torch

    from .ge_graph import to_ge_graph

    say("converting to GE graphs through TorchAir (first use fetches the torch-npu wheel)")
    options = {"passes": passes} if passes is not None else None
    with torch.no_grad():
        return to_ge_graph(target.model, *target.args, options=options, out_dir=out_dir, progress=say,
                           **target.kwargs)


def _verdict(result) -> list[str]:
    """Why the model is not one complete GE graph with every site fused (empty: it is)."""
    report = result.report
    problems = []
    if not any(s.kind == "attention" for s in report.sites):
        problems.append("no attention site was found (a pattern the passes do not know leaves no trace)")
    for s in report.left_alone():
        problems.append(f"{s.kind} site left alone at {s.layer} ({s.source}), pattern {s.pattern}: {s.reason}")
    problems += [f"unconverted GE node {n}" for n in result.unconverted]
    problems += [f"graph break: {b}" for b in result.graph_breaks]
    problems += [f"TorchAir failed: {f}" for f in result.failures]
    if result.graph_count != 1:
        problems.append(f"{result.graph_count} GE graphs instead of one")
    return problems


# ---------------------------------------------------------------- commands


def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from .backend import explain

    say = _Steps()
    target = _load(args.target, say)
    say("tracing and rewriting with the npu_attn backend")
    with torch.no_grad():  # the eager executor: the report needs no GE graph, on any host
        report = explain(target.model, *target.args, options={"executor": "eager"}, **target.kwargs)
    print(report.table())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    say = _Steps()
    target = _load(args.target, say)
    with tempfile.TemporaryDirectory(prefix="npu_attn_check_") as scratch:  # the GE dumps are not kept
        result = _convert(target, say, out_dir=Path(scratch))
    problems = _verdict(result)
    fused = len(result.report.fused())
    if problems:
        print(f"FAIL {args.target}: {fused}/{len(result.report.sites)} sites fused, "
              f"{result.graph_count} GE graph(s)")
        for problem in problems:
            print(f"  - {problem}")
        return EXIT_FAILED
    print(f"OK {args.target}: {fused}/{len(result.report.sites)} sites fused, one GE graph "
          f"({sum(result.op_type_counts.values())} GE ops)")
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _prepare_out(out, args.force)
    say = _Steps()
    target = _load(args.target, say)
    result = _convert(target, say, out_dir=out / "ge")
    report = result.report
    say("writing FX graphs, report and pictures")
    notes: list[str] = []
    paths = _write_fx(out / "fx", report) + _write_report(out, result)
    paths += _write_pictures(out / "pictures", report, notes)
    summary = _summary(args.target, result, paths, notes)
    (out / "summary.txt").write_text(summary + "\n")
    print(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.ops:
        return _ops_demo(args)
    import torch

    from .demos import _transformers, build
    from .report import Report

    transformers = _transformers()
    say = _Steps()
    model = build("llama", "sdpa")
    torch.manual_seed(0)
    prompt = torch.randint(1, 128, (2, 7))
    generate = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=0)
    print("npu_attn_graph demo: a tiny Llama (2 layers, 4 heads, 2 KV heads, random weights) generates "
          f"{args.new_tokens} tokens with a static KV cache, compiled with backend='npu_attn'")
    with torch.no_grad():
        say("generating eagerly (the reference)")
        expected = model.generate(prompt, past_key_values=transformers.StaticCache(config=model.config,
                                                                                   max_cache_len=64), **generate)
        report = Report()
        say("compiling with torch.compile(backend='npu_attn') and generating")
        eager_forward = model.forward
        # The model lives on the CPU: the eager executor runs the fused ops' reference kernels.
        model.forward = torch.compile(model.forward, backend="npu_attn",
                                      options={"report": report, "executor": "eager"})
        actual = model.generate(prompt, past_key_values=transformers.StaticCache(config=model.config,
                                                                                 max_cache_len=64), **generate)
        model.forward = eager_forward
    print(report.table())
    same = bool(torch.equal(actual, expected))
    print(f"generated tokens {'identical to' if same else 'DIFFERENT from'} eager: {actual[0, 7:].tolist()}")
    print(f"Next: {PROG} dump demo:llama --out llama_dump   (FX graphs, GE graph, pictures)")
    return 0 if same and all(s.rewritten for s in report.sites) else EXIT_FAILED


def _ops_demo(args: argparse.Namespace) -> int:
    from .demo import FP32_TOLERANCE, format_results, run_demo

    print(f"npu_attn_graph op tour: tiny GQA decoder attention (B=2, N=8, KV heads 2, D=64), prompt 24 + "
          f"{args.new_tokens} decode steps, reference kernels on CPU")
    results = run_demo(new_tokens=args.new_tokens)
    print(format_results(results))
    worst = max(r.max_abs_err for r in results)
    ok = worst <= FP32_TOLERANCE
    print(f"worst error {worst:.2e} ({'within' if ok else 'OVER'} the fp32 tolerance {FP32_TOLERANCE:.0e})")
    return 0 if ok else EXIT_FAILED


# ---------------------------------------------------------------- dump pieces


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UsageError(f"--out {out} is not empty; pass --force to overwrite what {PROG} dump writes there")
        for name in DUMP_ENTRIES:  # only our own entries: nothing else in the directory is touched
            entry = out / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_fx(fx_dir: Path, report) -> list[Path]:
    fx_dir.mkdir()
    paths = []
    for i, (before, after) in enumerate(zip(report.code_before, report.code_after)):
        for stage, code in (("before", before), ("after", after)):
            path = fx_dir / f"graph_{i}_{stage}.py"
            path.write_text(f"# ATen graph {i} {stage} the npu_attn passes\n{code.strip()}\n")
            paths.append(path)
    return paths


def _write_report(out: Path, result) -> list[Path]:
    report = result.report
    lines = [report.table(), ""]
    left = report.left_alone()
    lines.append(f"sites left alone: {len(left)}")
    lines += [f"  {s.kind} {s.layer} ({s.source}) {s.pattern}: {s.reason}" for s in left]
    lines += ["", "GE conversion:", result.summary()]
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    data = {
        "sites": [asdict(s) for s in report.sites],
        "graph_breaks": result.graph_breaks,
        "ge_graphs": [{"name": g.name, "complete": g.complete, "pbtxt": str(g.pbtxt_path),
                       "op_types": dict(sorted(g.op_types.items())),
                       "unconverted": [asdict(n) for n in g.unconverted]} for g in result.graphs],
        "single_ge_graph": result.single_graph,
        "torchair": result.torchair,
    }
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    counts = out / "ge" / "op_types.txt"
    counts.write_text("".join(f"{n:5d}  {t}\n" for t, n in result.op_type_counts.most_common()))
    return [out / "report.txt", out / "report.json", counts] + [g.pbtxt_path for g in result.graphs]


def _write_pictures(pictures_dir: Path, report, notes: list[str]) -> list[Path]:
    from .pictures import draw_report, pick_attention_layer

    if pick_attention_layer(report) is None:
        notes.append("pictures: none (no attention site)")
        return []
    pictures_dir.mkdir()
    try:
        return draw_report(report, pictures_dir)
    except (RuntimeError, ValueError) as error:  # e.g. Graphviz's dot missing: the rest of the dump stands
        notes.append(f"pictures: not drawn: {' '.join(str(error).split())}")
        return sorted(pictures_dir.iterdir())


def _summary(spec: str, result, paths: list[Path], notes: list[str]) -> str:
    report = result.report
    verdict = "one complete GE graph" if result.single_graph else "NOT one complete GE graph"
    lines = [f"{spec}: {len(report.fused())}/{len(report.sites)} sites fused in {report.graphs} graph(s); "
             f"{result.graph_count} GE graph(s), {verdict}"]
    top = ", ".join(f"{t} x{n}" for t, n in result.op_type_counts.most_common(8))
    lines.append(f"GE op types (top): {top}")
    lines.append(result.torchair)
    lines += notes
    lines.append("files:")
    lines += [f"  {p}" for p in paths]
    return "\n".join(lines)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Example: {PROG} check demo:llama\nRun '{PROG} COMMAND --help' for each command.\n"
               "Exit codes: 0 ok, 1 check failed, 2 bad command line or TARGET, 3 error.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, summary: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary, epilog=f"Example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--verbose", action="store_true", help="show the full traceback of an error")
        p.set_defaults(func=func)
        return p

    dump = command("dump", cmd_dump, "Write the FX graphs before/after the passes, the site report, the GE graph "
                   "(pbtxt, op-type counts) and pictures of one attention layer to --out.",
                   f"{PROG} dump demo:llama --out llama_dump")
    dump.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    dump.add_argument("--out", required=True, metavar="DIR", help="directory to write into (created if missing)")
    dump.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing earlier dumps")

    check = command("check", cmd_check, "Exit 0 only if every attention and KV-cache site is fused and the model "
                    "becomes exactly one GE graph; otherwise print why and exit 1 (a CI gate).",
                    f"{PROG} check my_model.py:make_model")
    check.add_argument("target", metavar="TARGET", help=TARGET_HELP)

    explain = command("explain", cmd_explain, "Print the table of attention and KV-cache sites: pattern, fused op, "
                      "layout, sparse_mode, GQA ratio, and why a site was left alone.",
                      f"{PROG} explain mypackage.models:tiny_decoder")
    explain.add_argument("target", metavar="TARGET", help=TARGET_HELP)

    demo = command("demo", cmd_demo, "Compile the built-in tiny Llama with backend='npu_attn', generate with a "
                   "static KV cache, compare with eager and show the report.", f"{PROG} demo --new-tokens 8")
    demo.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    demo.add_argument("--ops", action="store_true", help="instead: the op-level tour (each fused op vs SDPA)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (TargetError, UsageError) as error:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        text = " ".join(str(error).split())
        print(f"{PROG} {args.command}: error: {type(error).__name__}: {text[:500]}"
              f"{'' if args.verbose else ' (--verbose shows the traceback)'}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
