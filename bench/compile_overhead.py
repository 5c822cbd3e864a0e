"""Import time and first-call (compile) time of npu_attn against torch and aot_eager (CPU).

Run:  python bench/compile_overhead.py [--layers 2 16 32] [--rounds 3] [--import-rounds 7] [--no-bytecode-cache]
      python bench/compile_overhead.py --profile 16   # cProfile of our passes, one compile in this process

Every timing runs in a fresh Python process, so that nothing imported or
compiled before it is counted for it or saved for it.

Bytecode: an installed package has its modules' bytecode cached (pip compiles
them at install, torch's wheel ships it in its __pycache__), so a fresh process
does not compile their source. This environment sets PYTHONDONTWRITEBYTECODE,
which would leave only torch's cached and make every process compile
npu_attn_graph's source (0.3-0.5 s of its imports and of the first call). By
default every child runs with one bytecode cache for all modules
(PYTHONPYCACHEPREFIX, a temporary directory, filled by warm-up processes that
are not timed), as an installed package runs; --no-bytecode-cache measures
without it (the source of every module of ours compiled in every process).

1. Import time: ``import torch``, ``import npu_attn_graph`` and ``import
   npu_attn_graph.ops``, each timed inside its own process (interpreter
   start-up excluded), the three interleaved in rotating order; medians of
   ``--import-rounds`` rounds. Goal: both imports <= 1.2x ``import torch``
   (the package's time includes torch's, which it imports).
2. First call: a static-cache decode step of a tiny-width Llama (the graph with
   the most sites: attention and KV updates) at each ``--layers``, compiled with
   backend="aot_eager" and backend="npu_attn" (eager executor), the two
   interleaved in alternating order for ``--rounds`` rounds. Each process builds
   the model and imports torch._dynamo (which every torch.compile needs, so the
   same cost for both) before the clock starts; the clock covers
   ``torch.compile(...)`` and the first call, so it includes importing our
   backend and passes through the entry point. Reported: median first call,
   their ratio (goal <= 1.1x), compile time (first call minus the median of 5
   steady calls), the time inside our passes (measured by the backend, per
   pass), its share of npu_attn's compile time (goal <= 5%), per layer, and
   per layer added since the previous row (goal: flat, i.e. linear in layers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
IMPORTS = ("torch", "npu_attn_graph", "npu_attn_graph.ops")
BACKENDS = ("aot_eager", "npu_attn")


# The children's environment (main sets the bytecode cache); None: this process's.
_CHILD_ENV: dict[str, str] | None = None


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, HERE, *args], check=True, capture_output=True, text=True,
                         env=_CHILD_ENV).stdout
    return json.loads(out.strip().splitlines()[-1])


def _bytecode_cache(directory: str) -> None:
    """Children read and write every module's bytecode under `directory`; warm-up
    children (not timed) fill it with everything the timed ones import."""
    global _CHILD_ENV
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = directory
    _CHILD_ENV = env
    for module in IMPORTS:
        _run_child(["--child-import", module])
    for backend in BACKENDS:
        _run_child(["--child-compile", backend, "2"])


def child_import(module: str) -> dict:
    start = time.perf_counter()
    __import__(module)
    return {"seconds": time.perf_counter() - start}


def decode_step_model(layers: int):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def decode_inputs(model):
    import torch
    import transformers

    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    token = torch.randint(0, 256, (1, 1))
    position = torch.tensor([3])
    with torch.no_grad():  # StaticCache allocates lazily: do it before compiling
        model(token, past_key_values=cache, cache_position=position)
    return dict(input_ids=token, past_key_values=cache, cache_position=position)


def child_compile(backend: str, layers: int) -> dict:
    import torch
    import torch._dynamo  # noqa: F401  (torch.compile imports it: the same for both backends, so not timed)

    from npu_attn_graph import Report  # light: the backend itself is imported by torch.compile, timed

    model = decode_step_model(layers)
    inputs = decode_inputs(model)
    report = Report()
    options = {"report": report} if backend == "npu_attn" else None
    with torch.no_grad():
        start = time.perf_counter()
        compiled = torch.compile(model, backend=backend, fullgraph=True, options=options)
        compiled(**inputs)
        first = time.perf_counter() - start
        steady = []
        for _ in range(5):
            start = time.perf_counter()
            compiled(**inputs)
            steady.append(time.perf_counter() - start)
    result = dict(first=first, steady=statistics.median(steady))
    if backend == "npu_attn":
        assert report.graphs == 1, f"expected one graph, got {report.graphs}"
        result.update(passes=sum(report.pass_seconds.values()), per_pass=report.pass_seconds,
                      fused=len(report.fused()), sites=len(report.sites))
    return result


def profile_passes(layers: int, top: int = 30) -> None:
    """cProfile of one npu_attn compile, in this process (imports not counted)."""
    import cProfile
    import pstats

    import torch
    import torch._dynamo

    import npu_attn_graph.backend  # noqa: F401  (imported before profiling: only the compile is profiled)
    import npu_attn_graph.passes as passes

    model = decode_step_model(layers)
    inputs = decode_inputs(model)
    profiler = cProfile.Profile()
    real_run_passes = passes.run_passes

    def profiled(*args, **kwargs):
        profiler.enable()
        try:
            return real_run_passes(*args, **kwargs)
        finally:
            profiler.disable()

    npu_attn_graph.backend.run_passes = profiled
    try:
        with torch.no_grad():
            torch.compile(model, backend="npu_attn", fullgraph=True)(**inputs)
    finally:
        npu_attn_graph.backend.run_passes = real_run_passes
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def bench_imports(rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {m: [] for m in IMPORTS}
    for r in range(rounds):
        for i in range(len(IMPORTS)):  # rotating order: none always runs first or last
            module = IMPORTS[(r + i) % len(IMPORTS)]
            times[module].append(_run_child(["--child-import", module])["seconds"])
    return times


def bench_first_call(layers: int, rounds: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    for r in range(rounds):
        for backend in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
            results[backend].append(_run_child(["--child-compile", backend, str(layers)]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 16, 32])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per backend and layer count")
    parser.add_argument("--import-rounds", type=int, default=7, help="fresh processes per import")
    parser.add_argument("--skip-imports", action="store_true")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="children compile the source of modules with no cached bytecode (see above)")
    parser.add_argument("--profile", type=int, metavar="LAYERS", help="cProfile our passes at this many layers")
    parser.add_argument("--child-import", help=argparse.SUPPRESS)
    parser.add_argument("--child-compile", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_import:
        print(json.dumps(child_import(args.child_import)))
        return 0
    if args.child_compile:
        print(json.dumps(child_compile(args.child_compile[0], int(args.child_compile[1]))))
        return 0
    if args.profile:
        profile_passes(args.profile)
        return 0

    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; every timing in a fresh process, "
          f"{'without a bytecode cache' if args.no_bytecode_cache else 'with a warm bytecode cache'}")
    if args.no_bytecode_cache:
        return _bench(args)
    with tempfile.TemporaryDirectory(prefix="npu_attn_bench_bytecode_") as directory:
        _bytecode_cache(directory)
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    if not args.skip_imports:
        times = bench_imports(args.import_rounds)
        base = statistics.median(times["torch"])
        print(f"\nImport time, median of {args.import_rounds} interleaved fresh processes:\n")
        print("| import | median s | min s | vs import torch | goal |")
        print("|---|---|---|---|---|")
        for module in IMPORTS:
            median = statistics.median(times[module])
            goal = "" if module == "torch" else "<= 1.2x"
            print(f"| `import {module}` | {median:.2f} | {min(times[module]):.2f} | {median / base:.2f}x | {goal} |",
                  flush=True)

    print(f"\nFirst compiled call of a static-cache decode step, median of {args.rounds} interleaved fresh "
          "processes per backend:\n")
    print("| layers | fused/sites | aot_eager first call s | npu_attn first call s | ratio | npu_attn compile s "
          "| our passes s | share | passes ms per layer | ms per added layer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    previous = None
    for layers in args.layers:
        results = bench_first_call(layers, args.rounds)
        aot = statistics.median(r["first"] for r in results["aot_eager"])
        ours = results["npu_attn"]
        first = statistics.median(r["first"] for r in ours)
        compile_s = statistics.median(r["first"] - r["steady"] for r in ours)
        passes_s = statistics.median(r["passes"] for r in ours)
        # Linear in layers: the pass time each added layer costs stays the same from row to row
        # (ms per layer alone also spreads the one-off cost of the first pass run over the layers).
        added = "" if previous is None else f"{1e3 * (passes_s - previous[1]) / (layers - previous[0]):.1f}"
        previous = (layers, passes_s)
        print(f"| {layers} | {ours[0]['fused']}/{ours[0]['sites']} | {aot:.2f} | {first:.2f} | {first / aot:.2f}x | "
              f"{compile_s:.2f} | {passes_s:.3f} | {100 * passes_s / compile_s:.1f}% | {1e3 * passes_s / layers:.1f} | "
              f"{added} |", flush=True)
    print("\nGoals: first call <= 1.1x aot_eager's; passes <= 5% of compile time, and linear in layers "
          "(ms per added layer flat).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
