"""What the npu_attn backend found, rewrote and left alone, as data and as a table."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass
class Site:
    """One attention site or KV-cache update found in a graph."""

    kind: str  # "attention", "kv_update" or "moe"
    graph: str  # "inference" / "forward" / ...
    layer: str
    source: str
    pattern: str
    fused_op: str | None = None  # None: left as it was
    layout: str | None = None
    sparse_mode: int | None = None
    gqa_ratio: int | None = None
    reason: str | None = None  # why it was left alone
    precision: str | None = None  # e.g. "float32 via float16": casts around the fused op
    # What the rewrite costs or keeps that a better match would not (repeat_kv kept,
    # an additive mask as pse_shift, the fully-masked-row fix-up, a copy kept, ...).
    notes: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> bool:
        return self.fused_op is not None


@dataclass
class Report:
    sites: list[Site] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    recompiles: list[str] = field(default_factory=list)  # one per recompile: function, file:line, failed guard
    graphs: int = 0
    # Readable code of each ATen graph before and after the passes, and the
    # rewritten graphs themselves.
    code_before: list[str] = field(default_factory=list)
    code_after: list[str] = field(default_factory=list)
    graph_modules: list[torch.fx.GraphModule] = field(default_factory=list)
    # Copies of each graph just before and just after the passes (the modules above
    # may change later: TorchAir rewrites views, Inductor lowers).
    graphs_before: list[torch.fx.Graph] = field(default_factory=list)
    graphs_after: list[torch.fx.Graph] = field(default_factory=list)
    pass_seconds: dict[str, float] = field(default_factory=dict)  # wall time spent in each pass
    pass_rewrites: dict[str, int] = field(default_factory=dict)  # sites or nodes each pass rewrote

    def fused(self, kind: str | None = None) -> list[Site]:
        return [s for s in self.sites if s.rewritten and (kind is None or s.kind == kind)]

    def left_alone(self) -> list[Site]:
        return [s for s in self.sites if not s.rewritten]

    def table(self) -> str:
        headers = ["graph", "kind", "layer", "source", "pattern", "fused op", "layout", "sparse", "gqa",
                   "precision", "reason / notes"]
        rows = [[s.graph, s.kind, s.layer, s.source, s.pattern, s.fused_op or "-", s.layout or "-",
                 "-" if s.sparse_mode is None else str(s.sparse_mode),
                 "-" if s.gqa_ratio is None else str(s.gqa_ratio), s.precision or "-",
                 s.reason or "; ".join(s.notes)]
                for s in self.sites]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        fused = len(self.fused())
        lines.append(f"{fused}/{len(self.sites)} sites fused in {self.graphs} graph(s); "
                     f"{len(self.graph_breaks)} graph break(s), {len(self.recompiles)} recompile(s)")
        for b in self.graph_breaks:
            lines.append(f"graph break: {b}")
        for r in self.recompiles:  # "function (file:line): the guard that failed"
            lines.append(f"recompile: {r}")
        return "\n".join(lines)

    def traffic(self, ge_graphs: list | None = None) -> list:
        """Bytes moved per call by each graph after the passes (and each GE graph of to_ge_graph's result),
        against the ideal, with the ops that move a whole KV cache: npu_attn_graph.traffic."""
        from .traffic import report_traffic

        return report_traffic(self, ge_graphs)

    def __str__(self) -> str:
        return self.table()


def node_location(node: torch.fx.Node) -> tuple[str, str]:
    """(layer, 'file:line') of the user code that produced an FX node."""
    stack = node.meta.get("nn_module_stack") or {}
    layer = "-"
    if stack:
        path = list(stack.values())[-1][0]
        layer = re.sub(r"^L\['self'\]\.?", "", str(path)) or "-"
    source = "-"
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if frames:
        file, line = frames[-1]
        source = f"{file.rsplit('/', 1)[-1]}:{line}"
    return layer, source
