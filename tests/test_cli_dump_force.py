"""`npu-attn-graph dump --force` replaces only dump's own earlier outputs.

dump records every file it writes, with its SHA-256, in the manifest
(npu-attn-graph-dump.json). --force may overwrite or remove only files listed
there that are still as dump wrote them; every other file in --out (foreign
files in fx/, ge/, pictures/ and at the top, files the user edited after a dump)
stays byte for byte, and a foreign file in the way of a file dump must write
stops the dump before anything changes.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from npu_attn_graph.cli import MANIFEST, main

# Two attention sites with a graph break between them: two FX graphs, two GE graphs.
TWO_GRAPHS = """
import torch

class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch._dynamo.graph_break()
        return torch.nn.functional.scaled_dot_product_attention(x, k, v)

def make():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    return Attention(), (q, q, q)
"""
ONE_GRAPH = """
import torch

class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

def make():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    return Attention(), (q, q, q)
"""
NO_ATTENTION = """
import torch

def make():
    return torch.nn.Linear(16, 16), (torch.randn(2, 16),)
"""
# Foreign files in every folder dump writes into, and at the top; binary content
# and names close to dump's own included.
FOREIGN = {
    "notes.md": b"mine\n",
    "report.txt.bak": b"an old report I keep\n",
    ".hidden": b"\x00\x01\x02",
    "fx/mine.txt": b"mine\n",
    "fx/graph_9_before.py.orig": b"# my copy\n",
    "fx/sub/deep.bin": bytes(range(256)),
    "ge/notes.md": b"mine\n",
    "ge/graph_my.pbtxt": b"name: 'mine'\n",
    "pictures/logo.png": b"\x89PNG\r\n\x1a\nnot really",
    "other/data.csv": b"a,b\n1,2\n",
}


@pytest.fixture
def targets(tmp_path, monkeypatch):
    """The target files, in their own folder (not inside --out)."""
    folder = tmp_path / "targets"
    folder.mkdir()
    for name, source in (("two", TWO_GRAPHS), ("one", ONE_GRAPH), ("none", NO_ATTENTION)):
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.chdir(folder)
    return folder


def put(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def assert_is_one_dump(out: Path, foreign: dict[str, bytes]) -> dict:
    """--out holds exactly the foreign files (unchanged), the files the manifest lists (with their
    recorded digests) and the manifest; no scratch folder is left."""
    files = snapshot(out)
    record = manifest(out)
    for rel, data in foreign.items():
        assert files.get(rel) == data, f"{rel} changed or disappeared"
        assert rel not in record["files"], f"the manifest claims the foreign file {rel}"
    for rel, digest in record["files"].items():
        assert hashlib.sha256(files[rel]).hexdigest() == digest, rel
    assert set(files) == set(foreign) | set(record["files"]) | {MANIFEST}
    assert not [p for p in out.iterdir() if p.name.startswith(".npu-attn-graph-dump-")], "scratch folder left"
    return record


def test_first_dump_into_a_non_empty_dir_keeps_every_foreign_file(targets, tmp_path, capsys):
    out = tmp_path / "out"
    put(out, FOREIGN)
    assert main(["dump", "two.py:make", "--out", str(out)]) == 2  # non-empty: --force needed
    assert "is not empty; pass --force" in capsys.readouterr().err
    assert snapshot(out) == FOREIGN

    assert main(["dump", "two.py:make", "--out", str(out), "--force"]) == 0
    record = assert_is_one_dump(out, FOREIGN)
    written = set(record["files"])
    assert {"report.txt", "report.json", "summary.txt", "ge/op_types.txt", "fx/graph_0_before.py",
            "fx/graph_1_after.py"} <= written
    assert len([rel for rel in written if rel.startswith("ge/") and rel.endswith(".pbtxt")]) == 2
    assert any(rel.startswith("pictures/") for rel in written)
    assert record["folders"] == [], "fx/, ge/ and pictures/ were the user's folders already"
    assert str(out / MANIFEST) in capsys.readouterr().out  # listed among the files


def test_second_dump_replaces_its_own_files_and_removes_its_stale_ones(targets, tmp_path):
    out = tmp_path / "out"
    assert main(["dump", "two.py:make", "--out", str(out)]) == 0
    first = manifest(out)
    assert first["folders"] == ["fx", "ge", "pictures"]
    put(out, FOREIGN)  # the user adds files next to the dump's, in every folder

    assert main(["dump", "one.py:make", "--out", str(out), "--force"]) == 0  # fewer graphs now
    second = assert_is_one_dump(out, FOREIGN)
    stale = set(first["files"]) - set(second["files"])
    assert {"fx/graph_1_before.py", "fx/graph_1_after.py"} <= stale
    assert any(rel.startswith("ge/") and rel.endswith(".pbtxt") for rel in stale)
    assert not any((out / rel).exists() for rel in stale)
    assert "1/1 sites fused" in (out / "report.txt").read_text()

    # No attention at all: no pictures this time. pictures/ stays (it holds the
    # user's logo); nothing of the earlier dumps is left in it.
    assert main(["dump", "none.py:make", "--out", str(out), "--force"]) == 0
    third = assert_is_one_dump(out, FOREIGN)
    assert not any(rel.startswith("pictures/") for rel in third["files"])
    assert sorted(p.name for p in (out / "pictures").iterdir()) == ["logo.png"]


def test_a_folder_dump_created_is_removed_when_a_later_dump_leaves_it_empty(targets, tmp_path):
    out = tmp_path / "out"
    assert main(["dump", "one.py:make", "--out", str(out)]) == 0
    assert (out / "pictures").is_dir()
    assert main(["dump", "none.py:make", "--out", str(out), "--force"]) == 0
    assert not (out / "pictures").exists()
    assert manifest(out)["folders"] == ["fx", "ge"]
    assert_is_one_dump(out, {})


@pytest.mark.parametrize("rel", ["report.txt", "summary.txt", "ge/op_types.txt", "fx/graph_0_before.py",
                                 "fx/graph_1_after.py"])
def test_force_refuses_to_overwrite_a_file_dump_did_not_write(targets, tmp_path, capsys, rel):
    """A file at one of dump's own names, with no manifest claiming it (the user's own report.txt, or a
    dump made before manifests): refused by name, before anything changes. report.txt & co. are refused
    before the conversion; the FX graph names only once it is known how many graphs there are."""
    out = tmp_path / "out"
    foreign = {**FOREIGN, rel: b"not dump's\n"}
    put(out, foreign)
    assert main(["dump", "two.py:make", "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert "would overwrite 1 file(s) it did not write" in err and str(out / rel) in err
    assert snapshot(out) == foreign  # nothing written, nothing removed, no scratch folder
    assert sorted(p.name for p in out.iterdir()) == sorted({r.split("/")[0] for r in foreign})


def test_a_file_the_user_edited_after_a_dump_is_the_users(targets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["dump", "two.py:make", "--out", str(out)]) == 0
    (out / "report.txt").write_text("my notes on the report\n")  # dump would write it again: refused
    before = snapshot(out)
    assert main(["dump", "two.py:make", "--out", str(out), "--force"]) == 2
    assert str(out / "report.txt") in capsys.readouterr().err
    assert snapshot(out) == before

    (out / "report.txt").unlink()
    (out / "fx" / "graph_1_after.py").write_text("# edited\n")  # stale after the next dump: kept
    assert main(["dump", "one.py:make", "--out", str(out), "--force"]) == 0
    assert "kept " + str(out / "fx" / "graph_1_after.py") in capsys.readouterr().err
    assert (out / "fx" / "graph_1_after.py").read_text() == "# edited\n"
    assert not (out / "fx" / "graph_1_before.py").exists()  # unchanged and stale: removed
    assert_is_one_dump(out, {"fx/graph_1_after.py": b"# edited\n"})


def test_force_never_writes_through_a_symbolic_link(targets, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    put(elsewhere, {"graph_0_before.py": b"precious\n"})
    out = tmp_path / "out"
    assert main(["dump", "one.py:make", "--out", str(out)]) == 0
    for path in sorted((out / "fx").iterdir()):
        path.unlink()
    (out / "fx").rmdir()
    (out / "fx").symlink_to(elsewhere, target_is_directory=True)
    assert main(["dump", "one.py:make", "--out", str(out), "--force"]) == 2
    assert f"{out / 'fx'} (not a folder)" in capsys.readouterr().err
    assert snapshot(elsewhere) == {"graph_0_before.py": b"precious\n"}


@pytest.mark.parametrize("content", [
    "not json",
    json.dumps({"written_by": "someone else", "files": {}, "folders": []}),
    json.dumps({"written_by": "npu-attn-graph dump", "files": {"../victim.txt": "0" * 64}, "folders": []}),
    json.dumps({"written_by": "npu-attn-graph dump", "files": {"fx/../../victim.txt": "0" * 64}, "folders": []}),
    json.dumps({"written_by": "npu-attn-graph dump", "files": {"/etc/passwd": "0" * 64}, "folders": []}),
    json.dumps({"written_by": "npu-attn-graph dump", "files": {}, "folders": [".."]}),
])
def test_a_manifest_dump_did_not_write_is_refused(targets, tmp_path, capsys, content):
    """Only a manifest naming paths dump itself writes is trusted: no manifest can make --force
    delete a file elsewhere."""
    out = tmp_path / "out"
    put(tmp_path, {"victim.txt": b"keep me\n"})
    put(out, {MANIFEST: content.encode()})
    assert main(["dump", "one.py:make", "--out", str(out), "--force"]) == 2
    assert f"{out / MANIFEST} is not a manifest written by npu-attn-graph dump" in capsys.readouterr().err
    assert (tmp_path / "victim.txt").read_bytes() == b"keep me\n"
    assert snapshot(out) == {MANIFEST: content.encode()}
