"""Pictures of one attention layer before/after the rewrite (npu_attn_graph.pictures),
drawn from explain() reports of a tiny Llama (SDPA) and GPT-2 (eager attention)."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch

from npu_attn_graph import Report, Site, explain
from npu_attn_graph.pictures import _in_layer, _is_getitem, draw_attention_layer, draw_report, pick_attention_layer

pytest.importorskip("transformers")

from models import build  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CASES = {"llama": ("sdpa", "model.layers.{}.self_attn"), "gpt2": ("eager", "transformer.h.{}.attn")}


@pytest.fixture(scope="module", params=sorted(CASES))
def drawn(request, tmp_path_factory):
    kind = request.param
    attn, layer = CASES[kind]
    torch._dynamo.reset()
    torch.manual_seed(1)
    ids = torch.randint(1, 128, (2, 7))
    with torch.no_grad():
        report = explain(build(kind, attn), ids, attention_mask=torch.ones_like(ids))
    torch._dynamo.reset()
    out = tmp_path_factory.mktemp(f"pictures_{kind}")
    paths = draw_report(report, out)
    return kind, report, layer, {p.name: p for p in paths}


def svg_text(path) -> str:
    return "".join(ET.parse(path).getroot().itertext())


def box_names(path) -> set[str]:
    """FX node names of the boxes (graphviz node ids 'n/<name>')."""
    titles = (g.find(f"{SVG}title") for g in ET.parse(path).getroot().iter(f"{SVG}g") if g.get("class") == "node")
    return {t.text[2:] for t in titles if t is not None and t.text.startswith("n/")}


def test_picks_first_rewritten_attention_layer(drawn):
    _, report, layer, _ = drawn
    assert pick_attention_layer(report) == layer.format(0)
    sites = [Site("kv_update", "g", "a.kv", "-", "-", fused_op="scatter_update"),
             Site("attention", "g", "a.0", "-", "-"), Site("attention", "g", "a.1", "-", "-", fused_op="x")]
    assert pick_attention_layer(Report(sites=sites)) == "a.1"
    assert pick_attention_layer(Report(sites=sites[:2])) == "a.0"
    assert pick_attention_layer(Report(sites=sites[:1])) is None


def test_files_are_svg_and_png(drawn):
    _, _, _, files = drawn
    assert sorted(files) == ["attention_after.png", "attention_after.svg", "attention_before.png",
                             "attention_before.svg"]
    for name, path in files.items():
        data = path.read_bytes()
        if name.endswith(".png"):
            assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        else:
            assert ET.fromstring(data).tag == f"{SVG}svg"


def test_before_shows_aten_attention_after_shows_fused_op(drawn):
    _, report, _, files = drawn
    before, after = svg_text(files["attention_before.svg"]), svg_text(files["attention_after.svg"])
    fused_op = report.fused("attention")[0].fused_op
    assert fused_op in after and fused_op not in before
    assert "softmax" in before or "scaled_dot_product" in before
    assert "softmax" not in after and "scaled_dot_product" not in after


def test_titles_count_the_boxes(drawn):
    kind, _, layer, files = drawn
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
    _, report, layer, files = drawn
    before, after = report.graphs_before[0], report.graphs_after[0]
    for graph, tag in ((before, "before"), (after, "after")):
        drawn_names = box_names(files[f"attention_{tag}.svg"])
        expected = {n.name for n in graph.nodes if _in_layer(n, layer.format(0)) and not _is_getitem(n)}
        other = {n.name for n in graph.nodes if _in_layer(n, layer.format(1))}
        assert drawn_names == expected and other and not drawn_names & other


def test_removed_nodes_are_tinted(drawn):
    _, report, layer, files = drawn
    removed = {n.name for n in report.graphs_before[0].nodes if _in_layer(n, layer.format(0))} - \
        {n.name for n in report.graphs_after[0].nodes}
    assert removed
    root = ET.parse(files["attention_before.svg"]).getroot()
    for g in root.iter(f"{SVG}g"):
        title = g.find(f"{SVG}title")
        if g.get("class") == "node" and title.text[2:] in removed:
            assert g.find(f"{SVG}path").get("fill") == "#f8c8d0"


def test_unknown_layer_and_missing_dot(drawn, tmp_path, monkeypatch):
    _, report, layer, _ = drawn
    before, after = report.graphs_before[0], report.graphs_after[0]
    with pytest.raises(ValueError, match="no node"):
        draw_attention_layer(before, after, "model.nowhere", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="apt-get install graphviz"):
        draw_attention_layer(before, after, layer.format(0), tmp_path, stem="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_after.dot", "x_before.dot"]
    assert "npu_prompt_flash_attention" in (tmp_path / "x_after.dot").read_text()
