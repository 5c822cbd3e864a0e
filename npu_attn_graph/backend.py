"""The "npu_attn" torch.compile backend.

    torch.compile(model, backend="npu_attn", options={...})

Pipeline, top to bottom:
1. dynamo hands over its FX graph;
2. AOT autograd functionalizes it into ATen graphs (one inference graph, or a
   forward and a backward graph when gradients are needed);
3. our passes rewrite each ATen graph (see npu_attn_graph.passes);
4. the executor runs it: "eager" runs the rewritten graph as is (the fused ops
   run their reference kernels off the NPU), "inductor" compiles everything
   that is not our op with Inductor.

With executor "torchair" (the default where torch_npu imports) steps 2-4 are
TorchAir's npu backend instead: it runs AOT autograd, calls our passes at its
``post_grad_custom_pre_pass`` seam (chained before any pass the user set in
their CompilerConfig), converts the graph into one GE graph (our ops through
npu_attn_graph.converters) and compiles and runs it on the NPU.
"""

from __future__ import annotations

import copy
import re
import reprlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.experimental import _config as fx_config

from . import kernels  # noqa: F401  (registers the npu_attn ops)
from . import ring_layout
from ._logging import graphs_log, log
from .passes import PASSES, PassContext, run_passes, run_pre_aot_passes
from .passes._context import FP32_ATTENTION, SLIDING_WINDOW_CACHE, WindowOrders
from .passes._fx import CONSTANT
from .report import Report
from .torchair_bridge import TorchAir, load_torchair, torch_npu_available

EXECUTORS = ("eager", "inductor", "torchair")
OPTION_DOCS = {
    "passes": f"list of pass names to run; they always run in the fixed order {list(PASSES)} (default: all)",
    "executor": f"one of {list(EXECUTORS)} (default: 'torchair' where torch_npu imports, else 'eager')",
    "report": "a Report to fill, or a callable receiving the Report after each graph",
    "torchair_config": "TorchAir CompilerConfig for executor 'torchair' (copied; our passes run before "
                       "its post_grad_custom_pre_pass)",
    "fp32_attention": f"one of {list(FP32_ATTENTION)}: float32 attention sites are fused as float32 ('keep'), "
                      "computed in float16/bfloat16 inside the fused op, or left as plain math ('unfused') "
                      "(default: 'float16' with executor 'torchair', else 'keep')",
    "sliding_window_cache": f"one of {list(SLIDING_WINDOW_CACHE)}: a full sliding-window KV cache takes a decode "
                            "token into slot position mod W with no shift ('ring': the cache tensors hold the "
                            "window rotated; a graph that cannot hold a ring fails to compile), by shifting the "
                            "window one slot in eager's order ('shift', a copy of the window per step), or ring "
                            "where the graph can hold it and shift where not ('auto', the default); see the README",
}


@dataclass
class BackendOptions:
    passes: list[str] | None = None  # None: every pass
    executor: str | None = None  # None: "torchair" where torch_npu imports, else "eager"
    report: Report | Callable[[Report], Any] | None = None
    torchair_config: Any = None
    fp32_attention: str | None = None
    sliding_window_cache: str = "auto"

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTION_DOCS), key=str)
        if unknown:
            valid = "; ".join(f"{k}: {v}" for k, v in OPTION_DOCS.items())
            given = ", ".join(f"{k}={reprlib.repr(options[k])}" for k in unknown)
            raise ValueError(f"npu_attn backend: unknown option(s) {unknown} (given {given}); valid options are "
                             f"{valid}")
        parsed = cls(**options)
        if parsed.executor is None:
            parsed.executor = "torchair" if torch_npu_available() else "eager"
        if parsed.fp32_attention is None:
            parsed.fp32_attention = "float16" if parsed.executor == "torchair" else "keep"
        if parsed.passes is None:
            parsed.passes = list(PASSES)
        if not isinstance(parsed.passes, (list, tuple)) or not all(p in PASSES for p in parsed.passes):
            raise ValueError(f"npu_attn backend: option 'passes' must be a list of names from {list(PASSES)}, "
                             f"got {parsed.passes!r}")
        if parsed.executor not in EXECUTORS:
            raise ValueError(f"npu_attn backend: option 'executor' must be one of {list(EXECUTORS)}, "
                             f"got {parsed.executor!r}")
        if parsed.fp32_attention not in FP32_ATTENTION:
            raise ValueError(f"npu_attn backend: option 'fp32_attention' must be one of {list(FP32_ATTENTION)}, "
                             f"got {parsed.fp32_attention!r}")
        if parsed.sliding_window_cache not in SLIDING_WINDOW_CACHE:
            raise ValueError(f"npu_attn backend: option 'sliding_window_cache' must be one of "
                             f"{list(SLIDING_WINDOW_CACHE)}, got {parsed.sliding_window_cache!r}")
        if parsed.executor == "torchair" and parsed.fp32_attention == "keep":
            raise ValueError("npu_attn backend: fp32_attention='keep' cannot be used with executor 'torchair': "
                             "the NPU's inference attention ops take float16/bfloat16 only, and a GE graph must "
                             "not hold one in float32 (use 'float16', 'bfloat16' or 'unfused')")
        if parsed.torchair_config is not None and parsed.executor != "torchair":
            raise ValueError(f"npu_attn backend: option 'torchair_config' needs executor 'torchair', "
                             f"got executor {parsed.executor!r}")
        if parsed.report is not None and not (isinstance(parsed.report, Report) or callable(parsed.report)):
            raise ValueError(f"npu_attn backend: option 'report' must be a Report or a callable, "
                             f"got {reprlib.repr(parsed.report)} ({type(parsed.report).__name__})")
        return parsed


def npu_attn_backend(gm: torch.fx.GraphModule, example_inputs: list[Any],
                     options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """torch.compile backend: AOT autograd, our passes, then the chosen executor."""
    opts = BackendOptions.parse(options)
    report = opts.report if isinstance(opts.report, Report) else Report()
    if opts.executor == "torchair":
        return compile_with_torchair(gm, example_inputs, opts, report, load_torchair())
    with _dropped_if_restarted(report):
        return _compile_with_aot(gm, example_inputs, opts, report)


def _compile_with_aot(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: BackendOptions,
                      report: Report) -> Callable[..., Any]:
    _rewrite_for_training(gm, example_inputs, opts, report)

    sources = input_sources(gm)
    orders, untracked = WindowOrders(), ring_layout.untracked_reason(example_inputs, sources)

    def compiler(graph_name: str) -> Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]:
        def compile_graph(aten_gm: torch.fx.GraphModule, aten_inputs: list[Any]) -> Callable[..., Any]:
            assert opts.executor is not None and opts.fp32_attention is not None  # BackendOptions.parse filled in every default
            _rewrite(aten_gm, opts, report, PassContext(graph_name, "torch", opts.fp32_attention,
                                                        sliding_window_cache=opts.sliding_window_cache,
                                                        input_sources=sources, window_orders=orders,
                                                        ring_untracked=untracked))
            return _execute(aten_gm, aten_inputs, opts.executor)

        return compile_graph

    # No decompositions beyond AOT's own, for every executor: the passes see the
    # same graph whatever runs it (Inductor's table, applied before them, would turn
    # an eager softmax into amax/sub/exp/sum/div that no rule matches). The
    # rewritten graph is decomposed for Inductor afterwards (_decompose_for_inductor).
    compiled = aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        # Input mutations (KV caches) stay in the graph as copy_ nodes, so the
        # cache-update pass can turn them into in-place writes.
        keep_inference_input_mutations=True,
    )(gm, example_inputs)
    return _with_window_layout(compiled, sources, example_inputs, orders)


def _with_window_layout(compiled: Callable[..., Any], sources: tuple[str | None, ...], example_inputs: list[Any],
                        orders: WindowOrders) -> Callable[..., Any]:
    """compiled, with the run-time guard that keeps sliding-window caches in the
    order each graph reads them (ring_layout); `orders` is filled by the passes."""
    ranks = ring_layout.cache_shaped(example_inputs)
    return ring_layout.guarded(compiled, lambda: ring_layout.plan_for(
        sources, ranks, orders.ring, new_windows=orders.new_windows))


class NpuAttnBackend:
    """The npu_attn backend with its options checked when it is built:

        torch.compile(model, backend=NpuAttnBackend(executor="eager", report=report))

    A bad option (unknown key, bad value, bad combination) raises ValueError here,
    before torch.compile is called. With the string form
    ``torch.compile(model, backend="npu_attn", options={...})`` it cannot, in
    torch 2.13: torch.compile resolves "npu_attn" through the entry point to
    npu_attn_backend (lookup_backend) and keeps the options dict in its own
    torch._TorchCompileWrapper (``kwargs``), which passes it to the backend only
    in its ``__call__``, when dynamo compiles the first graph. What torch does
    at torch.compile time never involves the registered function or the
    options: eval_frame._optimize wraps that wrapper in WrapBackendDebug and
    looks up ``backend_ctx_ctor`` and ``get_compiler_config`` on it, which a
    _TorchCompileWrapper does not have (only the inductor wrapper does). So the
    string form's options are checked at the first call, and dynamo reports our
    ValueError as BackendCompilerFailed. (Patching torch to change that is ruled out.)

    Options also given to torch.compile(options=...) reach the backend only at
    the first compile (torch's design): they are merged over these and checked then.
    """

    def __init__(self, **options: Any) -> None:
        BackendOptions.parse(options)  # raises ValueError naming the option, the rule and the value
        self.options: dict[str, Any] = dict(options)
        # torch names a backend by __name__ (errors, logs) and treats the name
        # "npu_attn" as the registered backend: this is the same backend.
        self.__name__ = "npu_attn"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any],
                 options: dict[str, Any] | None = None) -> Callable[..., Any]:
        # Parsed again (cheap): the checked options give the same result.
        return npu_attn_backend(gm, example_inputs, {**self.options, **(options or {})})

    def __repr__(self) -> str:
        # torch names the backend by this in its logs: short values only (a Report would be huge).
        shown = ", ".join(f"{k}={v!r}" if isinstance(v, (str, list, tuple)) else f"{k}=<{type(v).__name__}>"
                          for k, v in self.options.items())
        return f"NpuAttnBackend({shown})"


@contextmanager
def _dropped_if_restarted(report: Report) -> Iterator[None]:
    """What one backend call adds to the report, taken out again if dynamo restarts the
    compile (RestartAnalysis, e.g. TensorifyScalarRestartAnalysis when AOT specializes a
    float that dynamic=True made an input): dynamo then traces again and calls the
    backend anew, which lists the same sites again. (A training graph's sites are listed
    before AOT, where such a restart is raised.)"""
    lists = ("sites", "code_before", "code_after", "graph_modules", "graphs_before", "graphs_after")
    lengths = {name: len(getattr(report, name)) for name in lists}
    graphs, rewrites = report.graphs, dict(report.pass_rewrites)
    try:
        yield
    except torch._dynamo.exc.RestartAnalysis:
        for name, length in lengths.items():
            del getattr(report, name)[length:]
        report.graphs, report.pass_rewrites = graphs, rewrites
        raise


def _rewrite_for_training(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: BackendOptions,
                          report: Report) -> None:
    assert opts.passes is not None  # BackendOptions.parse filled in every default
    if _needs_gradients(example_inputs):
        # Inference ops cannot carry gradients: attention goes to the training
        # op before AOT, whose autograd formula AOT then differentiates.
        run_pre_aot_passes(gm, opts.passes, report, PassContext("training", "torch", opts.fp32_attention or "keep"))


def _rewrite(aten_gm: torch.fx.GraphModule, opts: BackendOptions, report: Report, ctx: PassContext) -> None:
    assert opts.passes is not None  # BackendOptions.parse filled in every default
    report.code_before.append(_code(aten_gm))
    report.graphs_before.append(_copy_graph(aten_gm.graph))
    first_site = len(report.sites)
    run_passes(aten_gm, opts.passes, report, ctx)
    report.code_after.append(aten_gm.code)
    report.graphs_after.append(_copy_graph(aten_gm.graph))
    _log_graph(report, ctx, first_site)
    report.graph_modules.append(aten_gm)
    report.graphs += 1
    if callable(opts.report) and not isinstance(opts.report, Report):
        opts.report(report)


def _code(gm: torch.fx.GraphModule) -> str:
    """gm.code. A lazy module (AOT's) not compiled yet is not compiled for it: the
    passes change the graph, so that forward would never run; the text is the same
    (a GraphModule's code is its graph's python_code for root "self")."""
    if isinstance(gm, _LazyGraphModule) and gm._needs_recompile():
        return gm.graph.python_code(root_module="self", record_func=fx_config.enrich_profiler_metadata).src
    return gm.code


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    duplicate = torch.fx.Graph()
    duplicate.output(duplicate.graph_copy(graph, {}))  # node meta (shapes, module stack) included
    return duplicate


def _log_graph(report: Report, ctx: PassContext, first_site: int) -> None:
    sites = report.sites[first_site:]
    log.info("%s graph: %d of %d site(s) fused", ctx.graph_name, sum(s.rewritten for s in sites), len(sites))
    for s in sites:
        where = f"{s.kind} {s.layer} ({s.source}) pattern {s.pattern}"
        if s.rewritten:
            log.info("fused %s -> %s layout %s%s", where, s.fused_op, s.layout,
                     f", {s.precision}" if s.precision else "")
        else:
            log.info("left alone %s: %s", where, s.reason)
    log.debug("pass seconds so far: %s", {k: round(v, 4) for k, v in report.pass_seconds.items()})
    graphs_log.debug("%s graph before npu_attn passes:\n%s\nafter:\n%s", ctx.graph_name, report.code_before[-1],
                     report.code_after[-1])


def compile_with_torchair(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: BackendOptions,
                          report: Report, torchair: TorchAir,
                          progress: Callable[[str], None] | None = None) -> Callable[..., Any]:
    """Hand the dynamo graph to TorchAir's npu backend, our passes at its
    post_grad_custom_pre_pass seam; returns what TorchAir's backend returns.
    progress gets a line before the passes and before GE conversion."""
    with _dropped_if_restarted(report):
        return _compile_with_torchair(gm, example_inputs, opts, report, torchair, progress)


def _compile_with_torchair(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: BackendOptions,
                           report: Report, torchair: TorchAir,
                           progress: Callable[[str], None] | None) -> Callable[..., Any]:
    say = progress or (lambda message: None)
    from . import converters  # noqa: F401  (registers our ops' GE converters with TorchAir)

    _rewrite_for_training(gm, example_inputs, opts, report)
    needs_gradients = _needs_gradients(example_inputs)
    config = copy.deepcopy(opts.torchair_config) if opts.torchair_config is not None \
        else torchair.module.CompilerConfig()
    user_pass = config.post_grad_custom_pre_pass.value

    def npu_attn_passes(aten_gm: torch.fx.GraphModule, aten_inputs: list[Any], torchair_config: Any) -> None:
        assert opts.fp32_attention is not None  # BackendOptions.parse filled in every default
        is_backward = any(n.op == "placeholder" and n.name.startswith("tangents") for n in aten_gm.graph.nodes)
        graph_name = "backward" if is_backward else "forward" if needs_gradients else "inference"
        say(f"npu_attn passes on the {graph_name} graph ({len(aten_gm.graph.nodes)} ATen nodes)")
        # Functional KV writers: TorchAir turns writer + copy_ into in-place GE writes.
        _rewrite(aten_gm, opts, report, PassContext(graph_name, "ge", opts.fp32_attention,
                                                    sliding_window_cache=opts.sliding_window_cache,
                                                    input_sources=sources, window_orders=orders,
                                                    ring_untracked=untracked))
        if user_pass is not None:
            user_pass(aten_gm, aten_inputs, torchair_config)
        say(f"TorchAir: converting the {graph_name} graph into a GE graph")

    sources = input_sources(gm)
    orders, untracked = WindowOrders(), ring_layout.untracked_reason(example_inputs, sources)
    config.post_grad_custom_pre_pass = npu_attn_passes
    compiled = torchair.module.get_npu_backend(compiler_config=config)(gm, example_inputs)
    return _with_window_layout(compiled, sources, example_inputs, orders)


def input_sources(gm: torch.fx.GraphModule) -> tuple[str | None, ...]:
    """dynamo's source name of each input of its graph, in order (the ATen graph's
    inputs after AOT, for an inference graph); None where an input has none."""
    names = []
    for node in gm.graph.find_nodes(op="placeholder"):
        name = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", None)
        names.append(name if isinstance(name, str) else None)
    return tuple(names)


def _needs_gradients(example_inputs: list[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def _execute(gm: torch.fx.GraphModule, example_inputs: list[Any], executor: str) -> Callable[..., Any]:
    if executor == "inductor":
        from torch._guards import detect_fake_mode
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._subclasses.fake_tensor import FakeTensorMode

        _writes_returning_nothing(gm)
        constants = _lift_pass_constants(gm)
        fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode()
        inputs = [*example_inputs, *(fake_mode.from_tensor(c) for c in constants)]
        compiled = compile_fx_inner(_decompose_for_inductor(gm, inputs), inputs)
        if not constants:
            return compiled

        def with_constants(args: list[Any]) -> Any:
            full = [*args, *constants]
            args.clear()  # boxed: the caller's list is handed over, as to the compiled graph itself
            return compiled(full)

        with_constants._boxed_call = True  # type: ignore[attr-defined]
        return with_constants
    _fold_pass_constants(gm)
    _casts_through_aten(gm)
    return make_boxed_func(gm)  # AOT calls compiled graphs with a boxed (list) argument


def _writes_returning_nothing(gm: torch.fx.GraphModule) -> None:
    """Each in-place cache write (scatter_update_, which returns its `self`) as
    scatter_update_into, which returns nothing; its readers read `self`, written in
    place before them. Inductor runs a mutating op without outputs in place, as an
    extern kernel (as npu_scatter_pa_kv_cache); the returned alias it mishandles."""
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.npu_attn.scatter_update_.default):
        with gm.graph.inserting_before(node):
            into = gm.graph.call_function(torch.ops.npu_attn.scatter_update_into.default, node.args, node.kwargs)
        into.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        into.meta["val"] = None
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.recompile()


def _decompose_for_inductor(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> torch.fx.GraphModule:
    """The rewritten graph traced again through Inductor's decompositions, which it
    lowers only after (it refuses an op its table decomposes, such as aten.clamp or
    aten._to_copy that a rewrite inserted). Our ops have no decomposition: they stay
    as calls, which Inductor runs as extern kernels."""
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode()
    fake_inputs = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) and not
                   isinstance(x, torch._subclasses.FakeTensor) else x for x in example_inputs]
    with fake_mode, torch._dynamo.utils.preserve_rng_state():
        decomposed = make_fx(torch.fx.Interpreter(gm).run, decomposition_table=select_decomp_table(),
                             record_module_stack=True)(*fake_inputs)
    return decomposed


def _constant_values(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, Any]:
    """The nodes the passes marked constant (the 2048x2048 causal mask), evaluated."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    values: dict[torch.fx.Node, Any] = {}
    with unset_fake_temporarily():
        for node in gm.graph.nodes:
            if node.meta.get(CONSTANT):
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
                values[node] = node.target(*args, **kwargs)
    return values


def _replace_constants(gm: torch.fx.GraphModule, values: dict[torch.fx.Node, Any],
                       stand_in: Callable[[torch.fx.Node, Any], torch.fx.Node]) -> list[torch.fx.Node]:
    """Each evaluated constant that a node outside the constants reads is replaced by
    stand_in(node, value); the constant nodes left unused are erased. Returns the
    replaced nodes, in graph order."""
    replaced = [node for node in values if any(user not in values for user in node.users)]
    for node in replaced:
        node.replace_all_uses_with(stand_in(node, values[node]))
    for node in reversed(list(values)):
        if not node.users:
            gm.graph.erase_node(node)
    return replaced


def _lift_pass_constants(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """For Inductor: each constant the passes marked, evaluated once, becomes an extra graph
    input (after the others) whose value the executor passes on every call. Left in the
    graph, Inductor would rebuild it on every call, and once for each fused op that reads
    it: it realises an extern kernel's input per kernel (4 layers, 4 masks of 2048x2048).
    Returns the values, in the order of the new inputs."""
    values = _constant_values(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))

    def new_input(node: torch.fx.Node, value: Any) -> torch.fx.Node:
        with gm.graph.inserting_after(placeholders[-1]):
            placeholder = gm.graph.placeholder(f"npu_attn_constant_{len(placeholders)}")
        placeholder.meta.update({k: v for k, v in node.meta.items() if k != CONSTANT})
        placeholders.append(placeholder)
        return placeholder

    lifted = _replace_constants(gm, values, new_input)
    if values:
        gm.recompile()
    return [values[node] for node in lifted]


def _fold_pass_constants(gm: torch.fx.GraphModule) -> None:
    """Evaluate the nodes the passes marked constant (the 2048x2048 causal
    mask) once, and keep the results as graph attributes: run op by op, the
    graph would otherwise rebuild them on every call. (Inductor's own constant
    folding leaves iota alone, so this is done here.)"""
    values = _constant_values(gm)
    if not values and isinstance(gm, _LazyGraphModule):
        return  # graph unchanged: keep the forward compiled for the report's code (_rewrite), not a second one

    def buffer(node: torch.fx.Node, value: Any) -> torch.fx.Node:
        name = f"_npu_attn_constant_{len(gm._buffers)}"
        gm.register_buffer(name, value)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta.update(node.meta)
        return attr

    _replace_constants(gm, values, buffer)
    gm.recompile()


def _casts_through_aten(gm: torch.fx.GraphModule) -> None:
    """Each prims.convert_element_type(x, dtype) as aten._to_copy(x, dtype=dtype): the
    same values, but run op by op the prim goes through its Python implementation,
    about 70 µs a call against 6 µs (the rules write casts as prims for Inductor,
    which lowers them, and TorchAir, which converts them to GE Cast)."""
    casts = gm.graph.find_nodes(op="call_function", target=torch.ops.prims.convert_element_type.default)
    for node in casts:
        x, dtype = node.args
        with gm.graph.inserting_before(node):
            copy = gm.graph.call_function(torch.ops.aten._to_copy.default, (x,), {"dtype": dtype})
        copy.meta.update(node.meta)
        node.replace_all_uses_with(copy)
        gm.graph.erase_node(node)
    if casts:
        gm.recompile()


def explain(model: Callable, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Report:
    """Compile `model` with the npu_attn backend, run it once on the arguments,
    and return the report: every attention site found, rewritten or not (and
    why), plus graph breaks and recompiles. It resets torch._dynamo first, so
    functions compiled earlier in the process recompile on their next call."""
    report = Report()
    # A bad option: ValueError before anything is traced (a bad 'report' too, though explain fills its own).
    BackendOptions.parse(options)
    backend = NpuAttnBackend(**{**(options or {}), "report": report})
    with traced_afresh(report):
        torch.compile(model, backend=backend)(*args, **kwargs)
    return report


@contextmanager
def traced_afresh(report: Report) -> Iterator[None]:
    """Reset dynamo, then record in `report` the graph breaks and recompiles of
    what runs inside (explain and to_ge_graph).

    Recompiles come from dynamo's compilation metrics: every frame compile
    leaves one CompilationMetrics, whose recompile_reason is set (the first
    failed guard, as TORCH_LOGS=recompiles prints it) when the frame had
    compiled code already. (torch 2.13 never increments
    counters["recompiles"], so that counter always read 0.)"""
    from torch._dynamo import utils

    torch._dynamo.reset()
    breaks_before = Counter(utils.counters["graph_break"])
    earlier = utils.get_compilation_metrics()  # kept alive while inside, so that their ids stay theirs
    metrics_before = {id(m) for m in earlier}
    # torch keeps only the last 64 compiles' metrics: room for every compile inside.
    limit = getattr(getattr(utils, "_compilation_metrics", None), "maxlen", None) or \
        utils.DEFAULT_COMPILATION_METRICS_LIMIT
    utils.set_compilation_metrics_limit(max(limit, 1_000_000))
    try:
        yield
        report.graph_breaks = sorted((Counter(utils.counters["graph_break"]) - breaks_before).elements())
        report.recompiles = _recompiles([m for m in utils.get_compilation_metrics() if id(m) not in metrics_before])
    finally:
        utils.set_compilation_metrics_limit(limit)


def _recompiles(metrics: list[Any]) -> list[str]:
    """One line per recompile: the function, where it is, and the failed guard."""
    # A compile refused by the recompile limit carries no code name: take it
    # from another compile of the same frame (compile ids are frame/count).
    names = {str(m.compile_id).rsplit("/", 1)[0]: m for m in metrics if m.co_name}
    lines = []
    for m in metrics:
        if m.recompile_reason is None:
            continue
        code = m if m.co_name else names.get(str(m.compile_id).rsplit("/", 1)[0])
        where = "?" if code is None else _function_name(code.co_name, code.co_filename, code.co_firstlineno)
        reason = re.sub(r"^\[?[0-9/_!]+\]?: ", "", m.recompile_reason.strip())  # "0/1: " names the cache entry
        line = f"{where}: {' '.join(reason.split())}"
        if "recompile limit" in (m.fail_reason or ""):
            line += " (recompile limit reached: runs without compiling from now on)"
        lines.append(line)
    return lines


def _function_name(co_name: str, filename: str | None, lineno: int | None) -> str:
    file = (filename or "?").rsplit("/", 1)[-1]
    resumed = re.fullmatch(r"torch_dynamo_resume_in_(.+)_at_(\d+)", co_name)
    if resumed:  # the rest of a function after a graph break is a code object of its own
        return f"{resumed[1]} (after the graph break at {file}:{resumed[2]})"
    return f"{co_name} ({file}:{lineno})"
