"""Pictures of one attention layer before and after the npu_attn rewrite.

`draw_attention_layer` takes the ATen FX graph before the passes and the
rewritten one (`Report.graphs_before[i]`, `Report.graphs_after[i]`) and
draws only the nodes whose module stack lies inside one layer (e.g.
"model.layers.0.self_attn", its q/k/v/o projections included), rendered by
Graphviz `dot` as SVG and PNG.  A whole model graph has hundreds of nodes and
is unreadable as a picture; one layer is a few dozen, enough to see which
matmul/softmax (or ATen SDPA) chain became which fused op.  So that it stays
small:

- one box per FX node of the layer: short op name (`mm`, `_softmax`,
  `npu_prompt_flash_attention`) and output shape/dtype (`2x4x7x16 f32`);
  `getitem` nodes are folded into their producer (edges leave the producer);
- values made outside the layer: one small grey ellipse per producer;
  values of the layer used outside: one small blue "output" ellipse each;
- npu_attn ops filled orange; in the before picture the nodes that the
  rewrite removed (their names are gone from the after graph) are pink, in the
  after picture the nodes it added are light green;
- title: "<layer>: before (N nodes)" / "after (M nodes)", N and M counting
  the boxes.

Without the `dot` program the `.dot` sources are written next to where the
pictures would have gone and a RuntimeError says how to install Graphviz.
"""

from __future__ import annotations

import operator
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .report import Report, node_location

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool"}
_FUSED, _REMOVED, _ADDED = "#ffb347", "#f8c8d0", "#d8f3dc"


def _norm(layer: str) -> str:
    """"model.layers[0].self_attn" -> "model.layers.0.self_attn"."""
    return re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", layer)


def _in_layer(node: torch.fx.Node, layer: str) -> bool:
    where = _norm(node_location(node)[0])
    return where == layer or where.startswith(layer + ".")


def _is_getitem(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node)


def _rep(node: torch.fx.Node) -> torch.fx.Node:
    """The node drawn for `node`: a getitem is drawn as its producer."""
    return _rep(node.args[0]) if _is_getitem(node) else node  # type: ignore[arg-type]


def _op(node: torch.fx.Node) -> str:
    if _is_getitem(node):
        return f"{_op(node.args[0])}[{node.args[1]}]"  # type: ignore[arg-type]
    if node.op == "call_function":
        t = node.target
        return getattr(t, "_opname", None) or getattr(t, "__name__", None) or str(t)
    return {"placeholder": node.name, "output": "graph output"}.get(node.op, str(node.target))


def _describe(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        shape = "x".join(str(d) for d in val.shape) or "scalar"
        return f"{shape} {_DTYPES.get(val.dtype, str(val.dtype).removeprefix('torch.'))}"
    if isinstance(val, (tuple, list)):
        parts = [_describe(v) for v in val if isinstance(v, torch.Tensor)]
        if len(parts) > 1 and len(set(parts)) == 1:
            return f"{len(parts)} x {parts[0]}"
        return ", ".join(parts[:2]) + (", ..." if len(parts) > 2 else "")
    return "" if val is None else type(val).__name__


def _is_fused(node: torch.fx.Node) -> bool:
    return getattr(node.target, "namespace", None) == "npu_attn"


def _digraph(graph: torch.fx.Graph, layer: str, title: str, tint: set[str], tint_colour: str, key: str):
    import graphviz

    inside = [n for n in graph.nodes if _in_layer(n, layer)]
    members = set(inside)
    boxes = [n for n in inside if not _is_getitem(n)]
    g = graphviz.Digraph(engine="dot", graph_attr={"rankdir": "TB", "fontsize": "12", "labelloc": "t",
                                                   "nodesep": "0.2", "ranksep": "0.25"},
                         node_attr={"shape": "box", "fontsize": "9", "height": "0.3", "style": "rounded,filled",
                                    "fillcolor": "white"},
                         edge_attr={"arrowsize": "0.5"})
    g.attr(label=rf"{layer}: {title} ({len(boxes)} nodes)\n{key}")
    for n in boxes:
        fill = _FUSED if _is_fused(n) else tint_colour if n.name in tint else "white"
        g.node(f"n/{n.name}", rf"{_op(n)}\n{_describe(n.meta.get('val'))}", fillcolor=fill,
               penwidth="2" if _is_fused(n) else "1")
    small = {"shape": "ellipse", "fontsize": "7", "height": "0.2", "style": "filled", "color": "grey50"}
    edges: set[tuple[str, str]] = set()
    for n in boxes:
        for p in n.all_input_nodes:
            src = _rep(p)
            if src in members:
                edges.add((f"n/{src.name}", f"n/{n.name}"))
            else:
                g.node(f"in/{p.name}", rf"{_op(p)}\n{_describe(p.meta.get('val'))}", fillcolor="#eeeeee", **small)
                edges.add((f"in/{p.name}", f"n/{n.name}"))
    for n in inside:
        outside = sorted({_op(u) for u in n.users if u not in members})
        if outside and _rep(n) in members:
            g.node(f"out/{n.name}", r"output\n-> " + ", ".join(outside[:2]), fillcolor="#dde7f7", **small)
            edges.add((f"n/{_rep(n).name}", f"out/{n.name}"))
    for a, b in sorted(edges):
        g.edge(a, b)
    return g, len(boxes)


def draw_attention_layer(before: torch.fx.Graph, after: torch.fx.Graph, layer: str, out_dir: Path,
                         stem: str = "attention") -> list[Path]:
    """Draw `layer`'s nodes of `before` and `after`; write {stem}_{before,after}.{svg,png}
    in `out_dir` and return their paths. ValueError if the layer has no node in
    `before`; RuntimeError (after writing the .dot sources) if `dot` is missing."""
    layer, out_dir = _norm(layer), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names_before = {n.name for n in before.nodes}
    names_after = {n.name for n in after.nodes}
    pictures = [("before", *_digraph(before, layer, "before", names_before - names_after, _REMOVED,
                                     "orange: npu_attn op, pink: removed by the rewrite")),
                ("after", *_digraph(after, layer, "after", names_after - names_before, _ADDED,
                                    "orange: npu_attn op, green: added by the rewrite"))]
    if pictures[0][2] == 0:
        raise ValueError(f"no node of the graph lies in layer {layer!r}")
    if shutil.which("dot") is None:
        sources = [out_dir / f"{stem}_{tag}.dot" for tag, _, _ in pictures]
        for path, (_, g, _) in zip(sources, pictures):
            path.write_text(g.source)
        raise RuntimeError("Graphviz program 'dot' not found on PATH; wrote the sources "
                           f"{', '.join(map(str, sources))} instead. Install Graphviz "
                           "(Debian/Ubuntu: apt-get install graphviz) or render them with `dot -Tsvg`.")
    paths = []
    for tag, g, _ in pictures:
        for fmt in ("svg", "png"):
            path = out_dir / f"{stem}_{tag}.{fmt}"
            path.write_bytes(g.pipe(format=fmt))
            paths.append(path)
    return paths


def pick_attention_layer(report: Report) -> str | None:
    """Layer of the first rewritten attention site, else of the first attention site, else None."""
    sites = [s for s in report.sites if s.kind == "attention"]
    chosen = next((s for s in sites if s.rewritten), sites[0] if sites else None)
    return chosen.layer if chosen else None


def draw_report(report: Report, out_dir: Path, layer: str | None = None, stem: str = "attention") -> list[Path]:
    """draw_attention_layer on the first graph of `report` holding `layer` (default: pick_attention_layer)."""
    layer = layer or pick_attention_layer(report)
    if layer is None:
        raise ValueError("the report has no attention site")
    for before, after in zip(report.graphs_before, report.graphs_after):  # copies taken around the passes
        if any(_in_layer(n, _norm(layer)) for n in before.nodes):
            return draw_attention_layer(before, after, layer, out_dir, stem)
    raise ValueError(f"no graph of the report holds layer {layer!r}")
