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

Renderers (`renderer=`), both Graphviz's `dot` layout given the same DOT
source: "pygraphviz" lays out and renders in-process with the Graphviz
libraries bundled in the pygraphviz wheel (Graphviz 14.1; the `pictures`
extra, so a pip install alone draws); "dot" runs Graphviz's `dot` program (a
system package, e.g. Debian's graphviz).  "auto" (the default) takes
pygraphviz when it is installed, else `dot` from PATH: the bundled Graphviz
is newer than the distributions' (Debian 12 ships 2.42, whose labels touch
their box borders) and draws the same on every machine.  With
neither, the `.dot` sources are written next to where the pictures would
have gone and a RuntimeError says how to get a renderer.  PNG text needs
some system font (fontconfig's): without one only the SVGs, whose text the
viewer draws, are written and a RuntimeError says so.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .report import Report, node_location

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool"}
_FUSED, _REMOVED, _ADDED = "#ffb347", "#f8c8d0", "#d8f3dc"
RENDERERS = ("auto", "dot", "pygraphviz")
_HOW = {"dot": "Graphviz program 'dot' not found on PATH",
        "pygraphviz": "pygraphviz (Graphviz bundled in its wheel) not installed"}
_INSTALL = ("pip install pygraphviz (the npu_attn_graph[pictures] extra), or install Graphviz "
            "(Debian/Ubuntu: apt-get install graphviz), or render them with `dot -Tsvg`")


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


def _have_pygraphviz() -> bool:
    try:  # a real import: a wheel whose bundled libraries do not load counts as missing
        import pygraphviz  # noqa: F401
    except ImportError:
        return False
    return True


def choose_renderer(renderer: str = "auto") -> str | None:
    """The renderer that `renderer` names, if it can run here: "auto" is "pygraphviz" when that is
    installed, else "dot" when the `dot` program is on PATH; None when the named one (or, for "auto",
    either) is missing. ValueError for a name not in RENDERERS."""
    if renderer not in RENDERERS:
        raise ValueError(f"renderer must be one of {', '.join(RENDERERS)}; got {renderer!r}")
    have = {"dot": shutil.which("dot") is not None, "pygraphviz": _have_pygraphviz()}
    if renderer == "auto":
        return next((r for r in ("pygraphviz", "dot") if have[r]), None)
    return renderer if have[renderer] else None


def _render(g: Any, renderer: str, formats: tuple[str, ...]) -> list[bytes]:  # g: a graphviz.Digraph
    if renderer == "dot":
        return [g.pipe(format=fmt) for fmt in formats]
    import pygraphviz

    graph = pygraphviz.AGraph(string=g.source)
    with _quiet_fontconfig():
        graph.layout(prog="dot")  # in-process, once for all formats: the wheel's libgvc and dot layout plugin
        return [graph.draw(format=fmt) for fmt in formats]


def _fonts_found() -> bool:
    """Whether the fontconfig bundled in the pygraphviz wheel finds any font for the PNG text (a bare
    container has none, and cairo would draw a box for every letter). Asked through the wheel's own
    library, as pango will; True when it cannot be asked (macOS and Windows always have fonts)."""
    import ctypes
    import glob

    import pygraphviz

    libs = glob.glob(os.path.join(os.path.dirname(pygraphviz.__file__), os.pardir, "pygraphviz.libs",
                                  "libfontconfig*.so*"))
    if not libs:
        return True

    class FontSet(ctypes.Structure):  # FcFontSet
        _fields_ = [("nfont", ctypes.c_int), ("sfont", ctypes.c_int), ("fonts", ctypes.c_void_p)]

    try:
        fc = ctypes.CDLL(libs[0])
        fc.FcInitLoadConfigAndFonts.restype = ctypes.c_void_p
        fc.FcConfigGetFonts.restype = ctypes.POINTER(FontSet)
        fc.FcConfigGetFonts.argtypes = [ctypes.c_void_p, ctypes.c_int]
        fc.FcConfigDestroy.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return True
    with _quiet_fontconfig():
        config = fc.FcInitLoadConfigAndFonts()
    if not config:
        return True
    try:
        system = fc.FcConfigGetFonts(config, 0)  # FcSetSystem
        return bool(system) and system.contents.nfont > 0
    finally:
        fc.FcConfigDestroy(config)


@contextlib.contextmanager
def _quiet_fontconfig() -> Iterator[None]:
    """Drop the 'Fontconfig warning:' lines that the wheel's older fontconfig writes to fd 2 (C stderr)
    when it reads a newer system configuration (e.g. an unknown <reset-dirs> element); anything else
    written to fd 2 meanwhile is passed on."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None under pythonw
            stream.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().splitlines(keepends=True)
                    if not line.startswith(b"Fontconfig warning:")]
            os.write(2, b"".join(kept))


def draw_attention_layer(before: torch.fx.Graph, after: torch.fx.Graph, layer: str, out_dir: Path,
                         stem: str = "attention", renderer: str = "auto") -> list[Path]:
    """Draw `layer`'s nodes of `before` and `after`; write {stem}_{before,after}.{svg,png}
    in `out_dir` and return their paths. `renderer`: one of RENDERERS (see the module
    docstring). ValueError if the layer has no node in `before` or for an unknown
    renderer; RuntimeError (after writing the .dot sources) if the renderer is missing, or
    (after writing the SVGs) if pygraphviz's fontconfig finds no font for the PNG text."""
    chosen = choose_renderer(renderer)
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
    if chosen is None:
        sources = [out_dir / f"{stem}_{tag}.dot" for tag, _, _ in pictures]
        for path, (_, g, _) in zip(sources, pictures):
            path.write_text(g.source)
        missing = " and ".join(_HOW[r] for r in (("pygraphviz", "dot") if renderer == "auto" else (renderer,)))
        raise RuntimeError(f"{missing}; wrote the sources {', '.join(map(str, sources))} instead. "
                           f"To draw them: {_INSTALL}.")
    formats = ("svg", "png") if chosen == "dot" or _fonts_found() else ("svg",)
    paths = []
    for tag, g, _ in pictures:
        for fmt, data in zip(formats, _render(g, chosen, formats)):
            path = out_dir / f"{stem}_{tag}.{fmt}"
            path.write_bytes(data)
            paths.append(path)
    if "png" not in formats:
        raise RuntimeError(f"wrote {', '.join(map(str, paths))} but no PNG: fontconfig finds no font for its text "
                           "(every letter would be a box); install any font (Debian/Ubuntu: apt-get install "
                           "fonts-dejavu-core) and draw again")
    return paths


def pick_attention_layer(report: Report) -> str | None:
    """Layer of the first rewritten attention site, else of the first attention site, else None."""
    sites = [s for s in report.sites if s.kind == "attention"]
    chosen = next((s for s in sites if s.rewritten), sites[0] if sites else None)
    return chosen.layer if chosen else None


def draw_report(report: Report, out_dir: Path, layer: str | None = None, stem: str = "attention",
                renderer: str = "auto") -> list[Path]:
    """draw_attention_layer on the first graph of `report` holding `layer` (default: pick_attention_layer)."""
    layer = layer or pick_attention_layer(report)
    if layer is None:
        raise ValueError("the report has no attention site")
    for before, after in zip(report.graphs_before, report.graphs_after):  # copies taken around the passes
        if any(_in_layer(n, _norm(layer)) for n in before.nodes):
            return draw_attention_layer(before, after, layer, out_dir, stem, renderer)
    raise ValueError(f"no graph of the report holds layer {layer!r}")
