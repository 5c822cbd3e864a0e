"""Turn a model into Ascend GE graphs with TorchAir: ``to_ge_graph``.

This is the backend's own path with executor "torchair": dynamo -> TorchAir's
npu backend (AOT autograd) -> our passes at TorchAir's
``post_grad_custom_pre_pass`` seam -> TorchAir's FX-to-GE conversion, which
uses the converters in npu_attn_graph.converters for our ops. to_ge_graph stops
there: it records and dumps every GE graph built (with gradients, the forward
and the backward graph of each dynamo graph), runs the model's FX graphs
eagerly so tracing reaches every graph, and never compiles or runs a GE graph
(offline, nothing could).

Nodes TorchAir cannot convert do not stop the conversion: each is recorded
with TorchAir's reason and stands in the GE graph as a placeholder op whose
type is the FX target (TorchAir's own placeholder convention), so one run
names every unconverted node. A GE graph with placeholders is incomplete.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ._logging import log
from .report import Report
from .torchair_bridge import load_torchair


@dataclass
class UnconvertedNode:
    """An FX node TorchAir could not convert into GE ops."""

    graph: str  # GE graph name
    node: str  # FX node name
    target: str  # the FX target, e.g. aten.index_copy.default
    reason: str  # TorchAir's message

    def __str__(self) -> str:
        return f"{self.graph}: {self.node} ({self.target}): {self.reason}"


@dataclass
class GeGraph:
    """One GE graph TorchAir built from one FX graph."""

    name: str
    graph_def: Any  # TorchAir's GE GraphDef protobuf message (ge_ir_pb2.GraphDef)
    pbtxt_path: Path | None  # TorchAir's pbtxt dump (viewable in Netron)
    unconverted: list[UnconvertedNode] = field(default_factory=list)
    optimized: bool = True  # TorchAir's runtime-independent GE passes ran (in-place KV writes need them)

    @property
    def complete(self) -> bool:
        return not self.unconverted and self.optimized

    @property
    def op_types(self) -> Counter:
        return Counter(op.type for op in self.graph_def.op)


@dataclass
class GeConversion:
    """What to_ge_graph produced."""

    graphs: list[GeGraph]
    graph_breaks: list[str]
    report: Report  # our passes' sites, as explain() reports them
    torchair: str  # where TorchAir came from, and whether GE graphs can run here
    offline: bool
    out_dir: Path
    failures: list[str] = field(default_factory=list)  # graphs TorchAir gave up on entirely

    @property
    def graph_count(self) -> int:
        """GE graphs built (complete or not)."""
        return len(self.graphs)

    @property
    def op_type_counts(self) -> Counter:
        total: Counter = Counter()
        for graph in self.graphs:
            total.update(graph.op_types)
        return total

    @property
    def pbtxt_path(self) -> Path | None:
        """The pbtxt dump (the first graph's when there are several; see graphs)."""
        return self.graphs[0].pbtxt_path if self.graphs else None

    @property
    def unconverted(self) -> list[UnconvertedNode]:
        return [node for graph in self.graphs for node in graph.unconverted]

    @property
    def single_graph(self) -> bool:
        """The model became exactly one complete GE graph, with no graph break."""
        return (len(self.graphs) == 1 and self.graphs[0].complete and not self.graph_breaks
                and not self.failures)

    def summary(self) -> str:
        lines = [self.torchair]
        for graph in self.graphs:
            state = "complete" if graph.complete else f"{len(graph.unconverted)} unconverted node(s)"
            ops = ", ".join(f"{t} x{n}" for t, n in sorted(graph.op_types.items()))
            lines.append(f"{graph.name}: {len(graph.graph_def.op)} GE ops ({state}); {graph.pbtxt_path}")
            lines.append(f"  op types: {ops}")
        lines += [f"unconverted: {node}" for node in self.unconverted]
        lines += [f"graph break: {b}" for b in self.graph_breaks]
        lines += [f"failed: {f}" for f in self.failures]
        verdict = "one complete GE graph" if self.single_graph else f"{self.graph_count} GE graph(s), not one complete"
        lines.append(f"result: {verdict}")
        return "\n".join(lines)


class _ConversionAborted(Exception):
    """A node could be neither converted nor given a placeholder."""


class _Recorder:
    """Collects the GE graphs TorchAir builds while `recording()` is active."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.graphs: list[GeGraph] = []
        self.failures: list[str] = []
        self._pending: dict[int, list[UnconvertedNode]] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        from torchair._ge_concrete_graph import fx2ge_converter

        original = fx2ge_converter.GeConcreteGraph
        fx2ge_converter.GeConcreteGraph = _recording_class(original, self)
        try:
            yield
        finally:
            fx2ge_converter.GeConcreteGraph = original

    def unconverted(self, concrete: Any, node: torch.fx.Node | None, target: object, error: Exception) -> None:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        self._pending.setdefault(id(concrete), []).append(
            UnconvertedNode(concrete.graph.name, node.name if node is not None else "-", _target_name(target),
                            reason))

    def has_unconverted(self, concrete: Any) -> bool:
        return bool(self._pending.get(id(concrete)))

    def built(self, concrete: Any, optimized: bool) -> None:
        from torchair._ge_concrete_graph.ge_ir_pb2 import GraphDef

        graph_def = GraphDef()
        graph_def.ParseFromString(concrete.graph._proto.SerializeToString())
        name = concrete.graph.name
        path = self.out_dir / f"{name}.pbtxt"
        concrete.dump(str(path))
        (self.out_dir / f"{name}.ge.txt").write_text(str(graph_def))  # the GE protobuf as text
        graph = GeGraph(name, graph_def, path, self._pending.pop(id(concrete), []), optimized)
        self.graphs.append(graph)
        log.info("GE graph %s: %d ops, %s; dumped to %s", name, len(graph_def.op),
                 "complete" if graph.complete else f"{len(graph.unconverted)} unconverted node(s)", path)
        for node in graph.unconverted:
            log.info("TorchAir could not convert %s", node)


def _recording_class(base: type, recorder: _Recorder) -> type:
    """TorchAir's GeConcreteGraph, recording instead of stopping at the first
    unconvertible node, and reporting each finished graph."""
    from torchair._ge_concrete_graph.fx2ge_converter import set_ge_outputs

    class RecordingGeConcreteGraph(base):
        def parse_node(self, target: Any, args: Any, kwargs: Any, meta_outputs: Any) -> Any:
            try:
                return super().parse_node(target, args, kwargs, meta_outputs)
            except Exception as error:  # TorchAir's reason, whatever its type
                node = getattr(self._converter_ctx, "node", None)
                recorder.unconverted(self, node, target, error)
                try:
                    placeholder = self._create_mock_node_for_op(target, args, kwargs)
                except Exception as mock_error:
                    raise _ConversionAborted(f"{node}: {error}; no placeholder possible: {mock_error}") from error
                if isinstance(meta_outputs, (tuple, list)) and isinstance(placeholder, (tuple, list)):
                    # Non-tensor results (ints) keep their traced values; only tensors get GE outputs.
                    placeholder = [p if isinstance(m, torch.Tensor) else m for p, m in zip(placeholder, meta_outputs)]
                if meta_outputs is not None:
                    set_ge_outputs(placeholder, meta_outputs)
                return placeholder

        def optimize_graph_without_runtime(self, *args: Any, **kwargs: Any) -> None:
            try:
                super().optimize_graph_without_runtime(*args, **kwargs)
            except Exception:
                if recorder.has_unconverted(self):  # placeholders can trip TorchAir's GE passes
                    recorder.built(self, optimized=False)
                    return
                raise
            recorder.built(self, optimized=True)

    return RecordingGeConcreteGraph


def _target_name(target: object) -> str:
    text = str(target)
    return text if not text.startswith("<") else getattr(target, "__name__", text)


def to_ge_graph(model: Callable, *args: Any, options: dict[str, Any] | None = None, out_dir: str | Path | None = None,
                progress: Callable[[str], None] | None = None, dynamic: bool | None = None,
                **kwargs: Any) -> GeConversion:
    """Convert `model` (called on `args`/`kwargs` once) into GE graphs the way
    ``torch.compile(model, backend="npu_attn")`` does on an NPU host.

    options: the backend's options (passes, fp32_attention, torchair_config);
    ``{"passes": []}`` shows what TorchAir does alone. out_dir receives one
    ``<graph>.pbtxt`` (TorchAir's dump) and ``<graph>.ge.txt`` (the GE protobuf as
    text) per graph; default: a new temporary directory. progress gets one-line
    messages about the slow steps. dynamic is torch.compile's (True: symbolic
    shapes from the first call, as one serving graph for many lengths has).
    It resets torch._dynamo before and after (so that the model is traced afresh):
    functions compiled earlier in the process recompile on their next call.
    """
    from .backend import BackendOptions, compile_with_torchair, traced_afresh

    say = progress or (lambda message: None)
    torchair = load_torchair(progress)
    opts = BackendOptions.parse({**(options or {}), "executor": "torchair"})
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="npu_attn_ge_"))
    out.mkdir(parents=True, exist_ok=True)
    recorder = _Recorder(out)
    report = opts.report if isinstance(opts.report, Report) else Report()

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        say(f"dynamo graph of {len(gm.graph.nodes)} FX nodes: AOT autograd through TorchAir")
        with recorder.recording():
            try:
                compile_with_torchair(gm, example_inputs, opts, report, torchair, say)
            except torch._dynamo.exc.RestartAnalysis:
                raise  # dynamo's own control flow: it retraces and calls the backend again
            except Exception as error:  # recorded; the model still runs eagerly below
                recorder.failures.append(" ".join(f"{type(error).__name__}: {error}".split())[:2000])
        return gm.forward  # run the FX graph as is: tracing goes on to the next graph

    say("tracing the model with dynamo")
    # With gradients, AOT would build the backward graph only at the first
    # backward call; lowering it right away puts its GE graph in the result too.
    with traced_afresh(report), torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
        torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    torch._dynamo.reset()
    return GeConversion(recorder.graphs, report.graph_breaks, report, torchair.describe(), torchair.offline, out,
                        recorder.failures)


__all__ = ["GeConversion", "GeGraph", "UnconvertedNode", "to_ge_graph"]
