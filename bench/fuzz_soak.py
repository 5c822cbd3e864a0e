"""Soak the npu_attn backend with the fuzzer's generated programs (tests/fuzz) and summarise the failures.

    python bench/fuzz_soak.py --n 500 [--seed S] [--out DIR] [--families sdpa,eager,kv,paged,stacked]
                              [--no-report-oracle] [--shrink [--shrink-seconds 60]]

Each family gets n / len(families) programs drawn by Hypothesis (generation only: no shrinking) from --seed
(random when not given; printed, so a run can be repeated). Every failing program's standalone reproduction
script is written to --out (default bench/results/fuzz-<seed>) as <status>-<family>-<n>.py; existing files are
never overwritten. The summary gives ok / wrong / crash / discarded / report-incomplete per family, the
programs per second, and the failure classes (same status and the same normalised message), each with its
count and its shortest reproduction script.

With --shrink, each failure class is then shrunk by Hypothesis: the family is replayed from the same seed, and
a program counts as failing only when it fails in that class, so Hypothesis finds the same first member of the
class and shrinks it (at most --shrink-seconds per class) to a minimal program, written as
minimal-<class>.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from fuzz import oracle, programs  # noqa: E402

STATUSES = ("ok", "wrong", "crash", "report-incomplete", "discarded")


def failure_class(status: str, detail: str, program: programs.Program) -> str:
    """A failure's class: the status and its message with numbers, shapes and names of generated values removed;
    for wrong values (whose messages say little) also the family and the program's signature (the features that
    usually decide such defects: mask kind, write and positions, ...), for incomplete reports the family."""
    head = detail.split("\n", 1)[0]
    head = re.sub(r"\[(without passes: fine|ALSO WITHOUT PASSES.*)\]$", "", head).strip()
    where = f"[{program.family}: {program.signature}]"
    if status == "wrong":  # "step i: <what>: <why>" -> the kind of tensor and of difference
        m = re.match(r"step \d+: (output|argument|buffer)[^:]*: (\w+)", head)
        if m:
            what = m.group(1) if m.group(1) == "output" else "in-place write"
            kind = {"max": "values", "shape": "shape", "dtype": "dtype"}.get(m.group(2), m.group(2))
            return f"wrong {what} {kind} {where}"
    if status == "report-incomplete":
        return "report-incomplete " + ", ".join(re.findall(r"(\w+): \d+ listed", head)) + f" [{program.family}]"
    head = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", head)
    head = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", head)
    return f"{status} {head[:160]}"


def quietly(fn, *args, **kwargs):
    """fn(...) with its stderr (torch's tracebacks of failing generated graphs, warnings) swallowed."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def write_script(out: Path, name: str, text: str) -> Path:
    """Write text to out/name (exclusive create: another file of that name is never touched)."""
    stem, n = name.removesuffix(".py"), 0
    while True:
        path = out / (f"{stem}.py" if n == 0 else f"{stem}-{n}.py")
        try:
            with open(path, "x") as f:
                f.write(text)
            return path
        except FileExistsError:
            n += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="number of programs (split evenly over the families)")
    ap.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random, printed)")
    ap.add_argument("--out", type=Path, default=None, help="where failing programs' scripts go "
                    "(default bench/results/fuzz-<seed>)")
    ap.add_argument("--families", default=",".join(programs.FAMILIES), help="comma-separated families")
    ap.add_argument("--no-report-oracle", action="store_true", help="do not check the report's completeness")
    ap.add_argument("--quiet", action="store_true", help="no line per failure")
    ap.add_argument("--shrink", action="store_true", help="shrink one program of each failure class")
    ap.add_argument("--shrink-seconds", type=int, default=60, help="shrinking time per class")
    args = ap.parse_args(argv)
    run_seed = args.seed if args.seed is not None else random.randrange(2**32)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in programs.FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {list(programs.FAMILIES)}")
    out = args.out or ROOT / "bench" / "results" / f"fuzz-{run_seed}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"seed {run_seed}; {args.n} programs over {families}; failing programs -> {out}", flush=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    counts: dict[str, Counter] = defaultdict(Counter)
    classes: dict[str, list[tuple[int, Path, str]]] = defaultdict(list)
    class_family: dict[str, tuple[int, str]] = {}  # a class's first family (index and name)
    discards: Counter = Counter()  # why programs were not comparable
    started = time.perf_counter()
    total = 0

    for i, family in enumerate(families):
        quota = args.n // len(families) + (1 if i < args.n % len(families) else 0)
        if quota == 0:
            continue

        @seed(run_seed + i)
        @settings(max_examples=quota, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(programs.FAMILIES[family]())
        def one(program: programs.Program) -> None:
            nonlocal total
            total += 1
            outcome = quietly(oracle.check_program, program.source, check_report=not args.no_report_oracle)
            counts[family][outcome.status] += 1
            if outcome.status == "discarded":
                discards[failure_class(outcome.status, outcome.detail, program)] += 1
            if outcome.failed:
                script = program.script
                header = f"# {outcome.status}: {outcome.detail.splitlines()[0] if outcome.detail else ''}\n"
                path = write_script(out, f"{outcome.status}-{family}-{total:04d}.py", header + script)
                name = failure_class(outcome.status, outcome.detail, program)
                classes[name].append((len(program.source), path, outcome.detail))
                class_family.setdefault(name, (i, family))
                if not args.quiet:
                    print(f"  {outcome.status:17} {family:8} {path.name}: {outcome.detail.splitlines()[0][:200]}",
                          flush=True)

        one()

    elapsed = time.perf_counter() - started
    print()
    print(f"{'family':10}" + "".join(f"{s:>19}" for s in ("programs",) + STATUSES))
    grand: Counter = Counter()
    for family in families:
        c = counts[family]
        grand.update(c)
        print(f"{family:10}{sum(c.values()):>19}" + "".join(f"{c[s]:>19}" for s in STATUSES))
    n = sum(grand.values())
    print(f"{'all':10}{n:>19}" + "".join(f"{grand[s]:>19}" for s in STATUSES))
    compared = n - grand["discarded"]
    if compared:
        print(f"of {compared} compared programs: wrong {grand['wrong'] / compared:.1%}, crash "
              f"{grand['crash'] / compared:.1%}, report-incomplete {grand['report-incomplete'] / compared:.1%}")
    print(f"{n} programs in {elapsed:.1f} s: {n / elapsed:.2f} programs/s (seed {run_seed})")
    if discards:
        print("\ndiscarded (count, reason):")
        for name, n_ in discards.most_common():
            print(f"{n_:5}  {name}")
    if classes:
        print("\nfailure classes (count, shortest reproduction):")
        for name, items in sorted(classes.items(), key=lambda kv: -len(kv[1])):
            shortest = min(items, key=lambda t: t[0])
            print(f"{len(items):5}  {name}\n       {shortest[1]}")
    if args.shrink and classes:
        print(f"\nshrinking each class (at most {args.shrink_seconds} s each):")
        for name, (i, family) in class_family.items():
            path = shrink_class(name, family, run_seed + i, args, out)
            print(f"  {name}\n       {path or 'not reproduced'}", flush=True)
    return 1 if any(grand[s] for s in ("wrong", "crash", "report-incomplete")) else 0


class _InClass(Exception):
    """Raised for programs of the class being shrunk, so Hypothesis shrinks them."""


def shrink_class(name: str, family: str, family_seed: int, args: argparse.Namespace, out: Path) -> Path | None:
    """A minimal program of failure class `name` (Hypothesis' shrinker; the same stream as the soak run)."""
    from hypothesis.internal.conjecture import engine

    if hasattr(engine, "MAX_SHRINKING_SECONDS"):  # Hypothesis' own cap is 300 s
        engine.MAX_SHRINKING_SECONDS = args.shrink_seconds
    smallest: list[programs.Program] = []
    quota = args.n // len(args.families.split(",")) + 1

    @seed(family_seed)
    @settings(max_examples=quota, database=None, deadline=None, phases=[Phase.generate, Phase.shrink],
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
    @given(programs.FAMILIES[family]())
    def one(program: programs.Program) -> None:
        outcome = quietly(oracle.check_program, program.source, check_report=not args.no_report_oracle)
        if outcome.failed and failure_class(outcome.status, outcome.detail, program) == name:
            if not smallest or len(program.source) <= len(smallest[0].source):
                smallest[:] = [program]
            raise _InClass(name)

    try:
        one()
    except _InClass:
        pass
    if not smallest:
        return None
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80]
    outcome = oracle.check_program(smallest[0].source, check_report=not args.no_report_oracle)
    header = f"# {outcome.status}: {outcome.detail.splitlines()[0] if outcome.detail else ''}\n"
    return write_script(out, f"minimal-{slug}.py", header + smallest[0].script)


if __name__ == "__main__":
    sys.exit(main())
