"""Pictures of one attention layer before/after the rewrite (npu_attn_graph.pictures),
drawn from explain() reports of a tiny Llama (SDPA) and GPT-2 (eager attention), by both
renderers: Graphviz's `dot` program and, with no `dot` on PATH, pygraphviz's bundled Graphviz
(the pip-only path). Checked the way a person sees them: the SVG text and boxes, the PNG's
pixels (decoded with Pillow)."""

from __future__ import annotations

import re
import shutil
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from npu_attn_graph import Report, Site, explain
from npu_attn_graph.pictures import (_in_layer, _is_getitem, choose_renderer, draw_attention_layer, draw_report,
                                     pick_attention_layer)

pytest.importorskip("transformers")

from models import build  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CASES = {"llama": ("sdpa", "model.layers.{}.self_attn"), "gpt2": ("eager", "transformer.h.{}.attn")}


RENDERERS = ("dot", "pygraphviz")
_REPORTS: dict = {}


def report_of(kind: str) -> Report:
    if kind not in _REPORTS:
        attn, _ = CASES[kind]
        torch._dynamo.reset()
        torch.manual_seed(1)
        ids = torch.randint(1, 128, (2, 7))
        with torch.no_grad():
            _REPORTS[kind] = explain(build(kind, attn), ids, attention_mask=torch.ones_like(ids))
        torch._dynamo.reset()
    return _REPORTS[kind]


@pytest.fixture(scope="module", params=[(k, r) for k in sorted(CASES) for r in RENDERERS], ids="-".join)
def drawn(request, tmp_path_factory):
    """(kind, report, layer, {file name: path}, renderer). The pygraphviz case runs with PATH
    emptied and the default renderer="auto": the machine without Graphviz's `dot`, pip only."""
    kind, renderer = request.param
    if renderer == "dot" and shutil.which("dot") is None:
        pytest.skip("Graphviz's `dot` is not on PATH (.ci/run installs it); the pygraphviz cases still run")
    report = report_of(kind)
    out = tmp_path_factory.mktemp(f"pictures_{kind}_{renderer}")
    with pytest.MonkeyPatch.context() as mp:
        if renderer == "pygraphviz":
            mp.setenv("PATH", str(out / "no-dot-here"))
            assert shutil.which("dot") is None and choose_renderer() == "pygraphviz"
        paths = draw_report(report, out, renderer="auto" if renderer == "pygraphviz" else "dot")
    return kind, report, CASES[kind][1], {p.name: p for p in paths}, renderer


def svg_text(path) -> str:
    return "".join(ET.parse(path).getroot().itertext())


def labels(path) -> list[str]:
    """The drawn text lines (node labels, title, key), sorted."""
    return sorted(t.text for t in ET.parse(path).getroot().iter(f"{SVG}text"))


def box_names(path) -> set[str]:
    """FX node names of the boxes (graphviz node ids 'n/<name>')."""
    titles = (g.find(f"{SVG}title") for g in ET.parse(path).getroot().iter(f"{SVG}g") if g.get("class") == "node")
    return {t.text[2:] for t in titles if t is not None and t.text.startswith("n/")}


def test_picks_first_rewritten_attention_layer(drawn):
    _, report, layer, _, _ = drawn
    assert pick_attention_layer(report) == layer.format(0)
    sites = [Site("kv_update", "g", "a.kv", "-", "-", fused_op="scatter_update"),
             Site("attention", "g", "a.0", "-", "-"), Site("attention", "g", "a.1", "-", "-", fused_op="x")]
    assert pick_attention_layer(Report(sites=sites)) == "a.1"
    assert pick_attention_layer(Report(sites=sites[:2])) == "a.0"
    assert pick_attention_layer(Report(sites=sites[:1])) is None


def test_files_are_svg_and_png(drawn):
    _, _, _, files, _ = drawn
    assert sorted(files) == ["attention_after.png", "attention_after.svg", "attention_before.png",
                             "attention_before.svg"]
    for name, path in files.items():
        data = path.read_bytes()
        if name.endswith(".png"):
            assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        else:
            assert ET.fromstring(data).tag == f"{SVG}svg"


def test_before_shows_aten_attention_after_shows_fused_op(drawn):
    _, report, _, files, _ = drawn
    before, after = svg_text(files["attention_before.svg"]), svg_text(files["attention_after.svg"])
    fused_op = report.fused("attention")[0].fused_op
    assert fused_op in after and fused_op not in before
    assert "softmax" in before or "scaled_dot_product" in before
    assert "softmax" not in after and "scaled_dot_product" not in after


def test_titles_count_the_boxes(drawn):
    kind, _, layer, files, _ = drawn
    counts = {}
    for tag in ("before", "after"):
        path = files[f"attention_{tag}.svg"]
        m = re.search(rf"{re.escape(layer.format(0))}: {tag} \((\d+) nodes\)", svg_text(path))
        assert m, svg_text(path)[:200]
        counts[tag] = int(m.group(1))
        assert counts[tag] == len(box_names(path))
        assert 5 < counts[tag] < 80  # one layer, small enough to read
    assert counts["after"] < counts["before"]
    if kind == "gpt2":  # eager matmul/softmax/matmul chain: a dozen nodes replaced by one
        assert counts["before"] - counts["after"] >= 10


def test_only_the_chosen_layer_is_drawn(drawn):
    _, report, layer, files, _ = drawn
    before, after = report.graphs_before[0], report.graphs_after[0]
    for graph, tag in ((before, "before"), (after, "after")):
        drawn_names = box_names(files[f"attention_{tag}.svg"])
        expected = {n.name for n in graph.nodes if _in_layer(n, layer.format(0)) and not _is_getitem(n)}
        other = {n.name for n in graph.nodes if _in_layer(n, layer.format(1))}
        assert drawn_names == expected and other and not drawn_names & other


def test_removed_nodes_are_tinted(drawn):
    _, report, layer, files, _ = drawn
    removed = {n.name for n in report.graphs_before[0].nodes if _in_layer(n, layer.format(0))} - \
        {n.name for n in report.graphs_after[0].nodes}
    assert removed
    root = ET.parse(files["attention_before.svg"]).getroot()
    for g in root.iter(f"{SVG}g"):
        title = g.find(f"{SVG}title")
        if g.get("class") == "node" and title.text[2:] in removed:
            assert g.find(f"{SVG}path").get("fill") == "#f8c8d0"


def png_pixels(path):
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.convert("RGB")


def colour_counts(image) -> dict[str, int]:
    """{'#rrggbb': number of pixels of exactly that colour}."""
    return {"#%02x%02x%02x" % c: n for n, c in image.getcolors(image.width * image.height)}


def test_png_is_the_svg_drawn(drawn):
    """The PNG as a person sees it: the SVG's size at 96 dpi, a white page with dark text and lines,
    the fused op's orange box in the after picture, the removed nodes' pink in the before one."""
    _, _, _, files, _ = drawn
    for tag, tint in (("before", "#f8c8d0"), ("after", "#d8f3dc")):
        image = png_pixels(files[f"attention_{tag}.png"])
        svg = ET.parse(files[f"attention_{tag}.svg"]).getroot()
        width_pt, height_pt = (float(svg.get(k).removesuffix("pt")) for k in ("width", "height"))
        assert abs(image.width - width_pt * 96 / 72) <= 2 and abs(image.height - height_pt * 96 / 72) <= 2
        assert 200 <= image.width <= 4000 and 300 <= image.height <= 6000, image.size
        pixels, colours = image.width * image.height, colour_counts(image)
        dark = sum(n for n, v in image.convert("L").getcolors(256) if v < 100)  # text, borders, edges
        white = colours.get("#ffffff", 0)
        assert 0.005 * pixels < dark < 0.2 * pixels and white > 0.4 * pixels, (dark, white, pixels)
        assert colours.get(tint, 0) > 500  # removed (pink) / added (green) nodes
        if tag == "after":
            assert colours.get("#ffb347", 0) > 1000  # the fused op's orange box
        else:
            assert "#ffb347" not in colours


def test_renderers_draw_the_same_boxes(drawn, tmp_path):
    """Forcing the other renderer gives the same boxes and labels (both are Graphviz's dot layout)."""
    _, report, _, files, renderer = drawn
    other = "pygraphviz" if renderer == "dot" else "dot"
    if choose_renderer(other) is None:
        pytest.skip(f"renderer {other!r} is not available here")
    paths = {p.name: p for p in draw_report(report, tmp_path, renderer=other)}
    assert sorted(paths) == sorted(files)
    for tag in ("before", "after"):
        name = f"attention_{tag}.svg"
        assert box_names(paths[name]) == box_names(files[name])
        assert labels(paths[name]) == labels(files[name])


def test_unknown_layer_renderer_and_missing_renderers(drawn, tmp_path, monkeypatch):
    _, report, layer, _, _ = drawn
    before, after = report.graphs_before[0], report.graphs_after[0]
    with pytest.raises(ValueError, match="no node"):
        draw_attention_layer(before, after, "model.nowhere", tmp_path)
    with pytest.raises(ValueError, match=r"renderer must be one of auto, dot, pygraphviz; got 'cairo'"):
        draw_attention_layer(before, after, layer.format(0), tmp_path, renderer="cairo")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match=r"'dot' not found on PATH; wrote the sources .*pip install pygraphviz"):
        draw_attention_layer(before, after, layer.format(0), tmp_path, stem="x", renderer="dot")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_after.dot", "x_before.dot"]
    assert "npu_prompt_flash_attention" in (tmp_path / "x_after.dot").read_text()
    monkeypatch.setitem(sys.modules, "pygraphviz", None)  # import pygraphviz now raises ImportError
    assert choose_renderer() is None and choose_renderer("pygraphviz") is None
    with pytest.raises(RuntimeError, match=r"pygraphviz \(Graphviz bundled in its wheel\) not installed and "
                                           r"Graphviz program 'dot' not found on PATH.*apt-get install graphviz"):
        draw_attention_layer(before, after, layer.format(0), tmp_path, stem="y")
    assert sorted(p.name for p in tmp_path.glob("y_*")) == ["y_after.dot", "y_before.dot"]


def test_fontconfig_warnings_are_dropped_from_stderr(capfd):
    """pygraphviz's bundled (older) fontconfig warns on fd 2 about newer system config elements; only
    those lines are dropped, the rest of fd 2 is passed on."""
    import os

    from npu_attn_graph.pictures import _quiet_fontconfig

    with _quiet_fontconfig():
        os.write(2, b'Fontconfig warning: "/etc/fonts/conf.d/05-reset-dirs-sample.conf", line 6: unknown\n')
        os.write(2, b"something else\n")
    assert capfd.readouterr().err == "something else\n"


def test_dump_renderer_option(tmp_path, monkeypatch, capsys):
    """`dump --renderer`: parsed with choices, and passed to the pictures (here: dot forced on a
    machine without it -> a note and the .dot sources, the rest of the dump stands)."""
    from npu_attn_graph.cli import _write_pictures, build_parser

    report = report_of("llama")
    parser = build_parser()
    assert parser.parse_args(["dump", "demo:llama", "--out", "d"]).renderer == "auto"
    assert parser.parse_args(["dump", "demo:llama", "--out", "d", "--renderer", "dot"]).renderer == "dot"
    with pytest.raises(SystemExit):
        parser.parse_args(["dump", "demo:llama", "--out", "d", "--renderer", "cairo"])
    assert "invalid choice: 'cairo'" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    notes: list[str] = []
    paths = _write_pictures(tmp_path / "dot", report, notes, "dot")
    assert [p.name for p in paths] == ["attention_after.dot", "attention_before.dot"]
    assert len(notes) == 1 and notes[0].startswith("pictures: not drawn: Graphviz program 'dot' not found on PATH")
    paths = _write_pictures(tmp_path / "auto", report, notes, "auto")  # pygraphviz, no dot needed
    assert sorted(p.name for p in paths) == ["attention_after.png", "attention_after.svg", "attention_before.png",
                                             "attention_before.svg"] and len(notes) == 1


def test_no_font_for_png_text(tmp_path, monkeypatch):
    """A machine where fontconfig finds no font (a bare container): pygraphviz would draw a box for every
    letter of the PNG, so only the SVGs are written and the error says how to get a font. The font
    probe asks the wheel's own fontconfig, here with a configuration that lists no font folder."""
    from npu_attn_graph import pictures

    if not pictures._have_pygraphviz():
        pytest.skip("pygraphviz is not installed")
    assert pictures._fonts_found()  # the machines this suite runs on have fonts (Graphviz's package brings one)
    conf = tmp_path / "fonts.conf"
    conf.write_text(f'<?xml version="1.0"?>\n<fontconfig><cachedir>{tmp_path / "cache"}</cachedir></fontconfig>\n')
    with monkeypatch.context() as mp:
        mp.setenv("FONTCONFIG_FILE", str(conf))  # read by each new fontconfig configuration, as the probe makes
        assert not pictures._fonts_found()
    report = report_of("llama")
    monkeypatch.setattr(pictures, "_fonts_found", lambda: False)
    with pytest.raises(RuntimeError, match=r"attention_after.svg but no PNG: fontconfig finds no font .*apt-get "
                                           r"install fonts-dejavu-core"):
        draw_report(report, tmp_path / "out", renderer="pygraphviz")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["attention_after.svg", "attention_before.svg"]
