"""The fuzzer's oracle: a program compiled with backend="npu_attn" must behave like the program run eagerly.

A program (see programs.py) defines ``make_case() -> (fn, steps)``: ``fn`` is a function or an nn.Module, ``steps``
the argument tuples of successive calls (KV-cache programs call it several times with advancing positions; the
caches are the same tensor objects in every step, as in a decode loop). ``make_case`` is deterministic (a fixed
generator seed), so calling it three times gives three identical, independent copies of every input and buffer:

- eager:    the program as written, on copy 1;
- fp64:     the same program on copy 2 with every floating tensor (inputs, module buffers) upcast to float64;
- compiled: ``torch.compile(fn, backend="npu_attn", options={"executor": "eager", "report": report})`` on copy 3,
            after ``torch._dynamo.reset()`` (``dynamic=True`` where the program says so). A program whose TARGET
            is "ge" (a quarter of them, by seed) is rewritten as for TorchAir instead (ge_target_backend:
            functional KV writers, the copy back kept) and the rewritten graph is run by torch.

After EVERY step we compare what the call returned, every argument of the call (in-place writes into inputs) and
every module buffer. Outcomes:

- ``discarded``: eager raised (the generator made an invalid program), the fp64 evaluation raised, or eager
  computed some returned/mutated tensor entirely non-finite (nothing to compare);
- ``crash``: the compiled program raised (while compiling or running) where eager did not;
- ``wrong``: a shape, dtype or value differs beyond the bound below;
- ``report-incomplete``: values agree, but the backend's report lists fewer attention / kv_update sites than the
  generator knows the program has (second oracle, switchable: the report's semantics are being reworked);
- ``ok``.

Where a crash or a wrong value is found, the program is run once more with ``passes=[]`` (dynamo + AOT + executor
without our rewrites); the detail says whether that baseline was fine (so the rewrites are to blame).

Tolerance (one rule for every floating dtype). Let ``e``, ``c``, ``r`` be eager, compiled and the fp64 evaluation,
``eps`` the dtype's machine epsilon (float32 2**-23, float16 2**-10, bfloat16 2**-7) and ``M = max|r|`` over the
tensor. Then we require

    max|c - r|  <=  MULT * max|e - r|  +  max(ULPS * eps, FLOOR) * M     (MULT = 2, ULPS = 2)

over the positions where e and r are finite, with FLOOR = 1e-5 for float32 (the project's stated float32
tolerance) and 0 for float16/bfloat16 (their 2 * eps, 2e-3 and 1.6e-2, is already the looser bound). Why this bound:
- The fused reference kernels compute attention in float32 from the same low-precision q/k/v that eager sees and
  round once at the end; eager rounds after every op (scores, scale, mask add, softmax, matmul). So a correct
  rewrite is at most about as far from the exact (fp64) result as eager is, plus one final rounding of the output
  (half an ulp of |value| <= eps/2 * M). MULT = 2 allows for rewrites that move a rounding (a scale folded into
  the kernel, a bias added in float32) without the errors lining up, ULPS = 2 for the rounding of the output.
- The right-hand side uses eager's WORST error over the tensor, not its error per element: eager is exact at some
  elements by luck, and its worst error is what characterises how accurate the program can be in that dtype.
- A real defect (a mask applied to the wrong heads, a row zeroed, a cache row written at the wrong position)
  changes values by O(|value|), hundreds of ulps in float16 and ~10^6 ulps in float32, far above the bound.
- The float32 floor: the scores' own rounding (eps * |q . k|, which reaches 1e-6 for scores of magnitude 10)
  moves every softmax weight by that much relative, in any float32 implementation; eager's kernel is sometimes
  luckier, so twice its error is no bound. 1e-5 * M, the README's float32 rtol, covers it and is still ~10^5
  below what a real defect changes. Exact copies (cache writes) have e == r == c, so both sides are 0 there.
- Integer and boolean tensors must be equal.

Positions where the fp64 evaluation leaves the dtype's range are skipped too: a program that reads
``torch.finfo(x.dtype).min`` gets -1.8e308 in float64, which no float16/32 value approximates (returned masked
scores or log-probabilities).

Non-finite eager values: at a query row whose every key is masked with -inf, hand-written attention (softmax of
a row of -inf) gives NaN in eager (and in fp64), while SDPA and the NPU ops give 0. Such positions are not
comparable and are skipped (they are still checked for being non-finite in eager AND fp64, so a row that only
the compiled program computes is compared); a tensor that is non-finite everywhere in eager makes the program
``discarded``. Rows masked with finfo.min (a finite fill) are compared: eager's result there (the mean of V) is
what the program means.

The functions listed in PORTABLE depend on torch only; programs.render_script copies their source into every
reproduction script, so a script runs on its own (``python repro.py``) with exactly this oracle.
"""

from __future__ import annotations

import inspect
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch


def flat_tensors(obj: Any, name: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in a (nested) tuple/list/dict returned by a program, in order."""
    if isinstance(obj, torch.Tensor):
        return [(name, obj)]
    if isinstance(obj, (tuple, list)):
        return [item for i, x in enumerate(obj) for item in flat_tensors(x, f"{name}[{i}]")]
    if isinstance(obj, dict):
        return [item for k, x in obj.items() for item in flat_tensors(x, f"{name}[{k!r}]")]
    return []


def upcast_case(case: tuple[Any, list[tuple]]) -> tuple[Any, list[tuple]]:
    """The case with every floating tensor and module buffer in float64; shared tensors stay shared."""
    fn, steps = case
    if isinstance(fn, torch.nn.Module):
        fn = fn.double()
    memo: dict[int, Any] = {}

    def up(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            if id(x) not in memo:
                memo[id(x)] = x.double()
            return memo[id(x)]
        return x

    return fn, [tuple(up(a) for a in args) for args in steps]


def run_steps(case: tuple[Any, list[tuple]], compile_options: dict | None = None, dynamic: bool = False,
              after_first: Callable[[], None] | None = None) -> list[list[tuple[str, torch.Tensor]]]:
    """Call the program once per step (compiled if compile_options is given); after each step, clones of what it
    returned, of its arguments and of its module buffers, each with a name. after_first runs after step 0."""
    fn, steps = case
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    names = list(inspect.signature(target).parameters)
    if compile_options is not None:
        torch._dynamo.reset()
        options = dict(compile_options)
        if options.pop("target", "torch") == "ge":
            backend = ge_target_backend(options.get("report"), options.get("passes"))
            call = torch.compile(fn, backend=backend, dynamic=dynamic)
        else:
            call = torch.compile(fn, backend="npu_attn", dynamic=dynamic, options=options)
    else:
        call = fn
    seen = []
    with torch.no_grad():
        for args in steps:
            out = call(*args)
            state = flat_tensors(out, "output")
            state += [(f"argument {names[i] if i < len(names) else i}", a) for i, a in enumerate(args)
                      if isinstance(a, torch.Tensor)]
            if isinstance(fn, torch.nn.Module):
                state += [(f"buffer self.{n}", b) for n, b in fn.named_buffers()]
            seen.append([(n, t.detach().clone()) for n, t in state])
            if after_first is not None and len(seen) == 1:
                after_first()
    return seen


def mismatch(c: torch.Tensor, e: torch.Tensor, r: torch.Tensor, mult: float = 2.0, ulps: float = 2.0) -> str | None:
    """Why compiled `c` is not eager `e`, given the fp64 evaluation `r` (see the module docstring); None if it is."""
    if c.shape != e.shape:
        return f"shape {tuple(c.shape)} != eager {tuple(e.shape)}"
    if c.dtype != e.dtype:
        return f"dtype {c.dtype} != eager {e.dtype}"
    if not e.is_floating_point():
        return None if torch.equal(c, e) else f"values differ (exact compare): {(c != e).sum().item()} elements"
    c64, e64, r64 = c.double(), e.double(), r.double()
    # fp64 values beyond the dtype's range come from the program reading finfo(dtype).min in float64 (masked
    # scores, log-probabilities of masked keys): no value of the dtype approximates them, so skip them like NaN.
    comparable = torch.isfinite(e64) & (r64.abs() <= torch.finfo(e.dtype).max)
    if not comparable.any():
        return None
    if not torch.isfinite(c64[comparable]).all():
        bad = (~torch.isfinite(c64) & comparable).sum().item()
        return f"{bad} non-finite value(s) where eager is finite"
    err_c = (c64 - r64)[comparable].abs().max().item()
    err_e = (e64 - r64)[comparable].abs().max().item()
    scale = r64[comparable].abs().max().item()
    eps = torch.finfo(e.dtype).eps
    floor = 1e-5 if e.dtype == torch.float32 else 0.0  # the project's float32 tolerance (see the docstring)
    bound = mult * err_e + max(ulps * eps, floor) * scale
    if err_c <= bound:
        return None
    worst = int(((c64 - r64).abs() * comparable).flatten().argmax())
    return (f"max|compiled - fp64| = {err_c:.3g} > bound {bound:.3g} (= {mult:g} * max|eager - fp64| {err_e:.3g} "
            f"+ max({ulps:g} * eps {eps:.3g}, floor) * max|fp64| {scale:.3g}); max|compiled - eager| = "
            f"{(c64 - e64)[comparable].abs().max().item():.3g}; worst at flat index {worst}: "
            f"compiled {c64.flatten()[worst].item():.6g}, eager {e64.flatten()[worst].item():.6g}")


def not_comparable(seen: list[list[tuple[str, torch.Tensor]]]) -> str | None:
    """A returned or mutated floating tensor that eager computed non-finite everywhere."""
    for i, state in enumerate(seen):
        for name, t in state:
            if t.is_floating_point() and t.numel() and not torch.isfinite(t).any():
                return f"step {i}: eager {name} is non-finite everywhere"
    return None


def first_line(ex: BaseException) -> str:
    """The innermost exception of a (dynamo-wrapped) error, as 'Type: first line'."""
    while True:
        inner = getattr(ex, "inner_exception", None) or ex.__cause__
        if inner is None:
            break
        ex = inner
    lines = [ln.strip() for ln in str(ex).splitlines() if ln.strip()]
    return f"{type(ex).__name__}: {lines[0][:300] if lines else ''}"


def compare_runs(eager: list, fp64: list, compiled: list) -> str | None:
    """The first difference between the compiled and the eager run, step by step."""
    for i, (es, rs, cs) in enumerate(zip(eager, fp64, compiled)):
        if [n for n, _ in es] != [n for n, _ in cs]:
            return f"step {i}: compiled returned {[n for n, _ in cs]}, eager {[n for n, _ in es]}"
        for (name, e), (_, r), (_, c) in zip(es, rs, cs):
            why = mismatch(c, e, r)
            if why:
                return f"step {i}: {name}: {why}"
    return None


def ge_target_backend(report: Any, passes: list | None = None) -> Callable:
    """The rewrites exactly as the backend makes them for TorchAir (PassContext target "ge": functional KV
    writers with the copy back kept, arange-built masks), then the graph run by torch: GE's rewrites checked
    on the CPU, where no GE runtime exists."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from npu_attn_graph import Report
    from npu_attn_graph.passes import PASSES, PassContext, run_passes

    report = report if report is not None else Report()

    def compiler(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        run_passes(gm, list(PASSES) if passes is None else passes, report, PassContext("inference", "ge", "keep"))
        report.graphs += 1
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=compiler, inference_compiler=compiler, keep_inference_input_mutations=True)


def check_case(make_case: Callable[[], tuple[Any, list[tuple]]], dynamic: bool = False,
               expected: dict[str, int] | None = None, check_report: bool = True,
               target: str = "torch") -> tuple[str, str]:
    """(status, detail): status is ok / discarded / crash / wrong / report-incomplete."""
    import npu_attn_graph

    try:
        eager = run_steps(make_case())
    except Exception as ex:  # an invalid program: the generator's fault, not the backend's
        return "discarded", f"eager raised {first_line(ex)}"
    why = not_comparable(eager)
    if why:
        return "discarded", why
    try:
        fp64 = run_steps(upcast_case(make_case()))
    except Exception as ex:
        return "discarded", f"fp64 evaluation raised {first_line(ex)}"

    def baseline() -> str:
        try:
            why = compare_runs(eager, fp64, run_steps(make_case(), {"executor": "eager", "passes": [],
                                                                      "target": target}, dynamic))
        except Exception as ex:
            why = f"raised {first_line(ex)}"
        return "without passes: fine" if why is None else f"ALSO WITHOUT PASSES: {why}"

    report = npu_attn_graph.Report()
    counts: dict[str, int] = {}

    def count_sites() -> None:  # after the first call: later steps may recompile and list the sites again
        counts.update({kind: sum(1 for s in report.sites if s.kind == kind) for kind in ("attention", "kv_update", "moe")})

    try:
        compiled = run_steps(make_case(), {"executor": "eager", "report": report, "target": target}, dynamic,
                             count_sites)
    except Exception as ex:
        return "crash", f"{first_line(ex)} [{baseline()}]"
    why = compare_runs(eager, fp64, compiled)
    if why:
        return "wrong", f"{why} [{baseline()}]"
    if check_report and expected:
        missing = {k: (counts.get(k, 0), n) for k, n in expected.items() if counts.get(k, 0) < n}
        if missing:
            listed = ", ".join(f"{k}: {got} listed, {want} expected" for k, (got, want) in missing.items())
            return "report-incomplete", f"{listed}\n{report.table()}"
    return "ok", ""


PORTABLE = (flat_tensors, upcast_case, ge_target_backend, run_steps, mismatch, not_comparable, first_line, compare_runs, check_case)


def portable_source() -> str:
    """The source of the oracle functions, for reproduction scripts."""
    return "\n\n".join(inspect.getsource(fn) for fn in PORTABLE)


# ---------------------------------------------------------------------------------------------------------------
# Running generated programs (not copied into scripts)


@dataclass
class Outcome:
    status: str  # ok / discarded / crash / wrong / report-incomplete
    detail: str

    @property
    def failed(self) -> bool:
        return self.status in ("crash", "wrong", "report-incomplete")


_counter = 0


def materialise(source: str) -> types.ModuleType:
    """exec a program's source as a fresh module (registered, so dynamo and tracebacks find its code)."""
    global _counter
    _counter += 1
    name = f"npu_attn_fuzz_program_{_counter}"
    filename = f"<{name}>"
    import linecache

    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def release(module: types.ModuleType) -> None:
    sys.modules.pop(module.__name__, None)
    import linecache

    linecache.cache.pop(module.__file__, None)


def check_program(source: str, check_report: bool = True) -> Outcome:
    """Run the oracle on a program's source text (as made by programs.render_script)."""
    module = materialise(source)
    try:
        status, detail = check_case(module.make_case, dynamic=module.DYNAMIC, expected=module.EXPECTED,
                                    target=getattr(module, "TARGET", "torch"),
                                    check_report=check_report)
    finally:
        release(module)
        torch._dynamo.reset()
    return Outcome(status, detail)
