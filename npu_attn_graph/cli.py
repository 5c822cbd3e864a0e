"""npu-attn-graph: see what npu_attn_graph does to a model, and why.

Commands: dump (everything to a directory), check (a CI gate), explain (the
site table), export (a pt2, ONNX or TorchAir file), demo (the built-in tiny
Llama, compiled and generating).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .demo_models import DEMO_HELP
from .targets import FORMS, TargetError, load_target

PROG = "npu-attn-graph"
TARGET_HELP = (f"what to compile: {FORMS}; the factory returns (model, example_args) or "
               "(model, example_args, example_kwargs); demos: "
               + "; ".join(f"demo:{name} ({text})" for name, text in DEMO_HELP.items()))
# Exit codes: 0 ok; 1 check found sites left alone / not one GE graph (or demo
# differed from eager); 2 bad command line or TARGET; 3 anything else failed.
EXIT_FAILED, EXIT_USAGE, EXIT_ERROR = 1, 2, 3
# What dump writes inside --out (all of it, nothing elsewhere): these files at
# the top, files directly inside these folders, and the manifest, which lists
# every file one dump wrote with its SHA-256. --force replaces or removes only
# files listed there that are still as dump wrote them; any other file is the
# user's and is never deleted or overwritten.
DUMP_FILES = ("report.txt", "report.json", "summary.txt")
DUMP_FOLDERS = ("fx", "ge", "pictures")
MANIFEST = "npu-attn-graph-dump.json"
MANIFEST_OWNER = f"{PROG} dump"
# Written by every dump whatever the model: checked before the slow conversion.
ALWAYS_WRITTEN = DUMP_FILES + ("ge/op_types.txt",)


class UsageError(Exception):
    """Bad command-line input; one line."""


def _progress(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


class _Steps:
    """Progress lines with the time each step took."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        _progress(f"{message} ({time.perf_counter() - self.start:.1f} s)")


def _load(spec: str, say: Callable[[str], None]):
    say(f"loading {spec}")
    return load_target(spec)


def _convert(target, say: Callable[[str], None], out_dir: Path | None = None, passes: list[str] | None = None):
    import torch

    from .ge_graph import to_ge_graph

    say("converting to GE graphs through TorchAir (first use fetches the torch-npu wheel)")
    options = {"passes": passes} if passes is not None else None
    with torch.no_grad():
        return to_ge_graph(target.model, *target.args, options=options, out_dir=out_dir, progress=say,
                           **target.kwargs)


def _verdict(result) -> list[str]:
    """Why the model is not one complete GE graph with every site fused (empty: it is)."""
    report = result.report
    problems = []
    if not any(s.kind == "attention" for s in report.sites):
        problems.append("no attention site was found (a pattern the passes do not know leaves no trace)")
    for s in report.left_alone():
        problems.append(f"{s.kind} site left alone at {s.layer} ({s.source}), pattern {s.pattern}: {s.reason}")
    problems += [f"unconverted GE node {n}" for n in result.unconverted]
    problems += [f"graph break: {b}" for b in result.graph_breaks]
    # A recompile in the single run means a second graph for the same code.
    problems += [f"recompile: {r}" for r in report.recompiles]
    problems += [f"TorchAir failed: {f}" for f in result.failures]
    if result.graph_count != 1:
        problems.append(f"{result.graph_count} GE graphs instead of one")
    return problems


# ---------------------------------------------------------------- commands


def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from .backend import explain
    from .traffic import report_lines

    say = _Steps()
    target = _load(args.target, say)
    say("tracing and rewriting with the npu_attn backend")
    with torch.no_grad():  # the eager executor: the report needs no GE graph, on any host
        report = explain(target.model, *target.args, options={"executor": "eager"}, **target.kwargs)
    print(report.table())
    print("\n".join(report_lines(report)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    say = _Steps()
    target = _load(args.target, say)
    with tempfile.TemporaryDirectory(prefix="npu_attn_check_") as scratch:  # the GE dumps are not kept
        result = _convert(target, say, out_dir=Path(scratch))
    problems = _verdict(result)
    fused = len(result.report.fused())
    if problems:
        print(f"FAIL {args.target}: {fused}/{len(result.report.sites)} sites fused, "
              f"{result.graph_count} GE graph(s)")
        for problem in problems:
            print(f"  - {problem}")
        return EXIT_FAILED
    print(f"OK {args.target}: {fused}/{len(result.report.sites)} sites fused, one GE graph "
          f"({sum(result.op_type_counts.values())} GE ops)")
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    out = Path(args.out)
    manifest = _prepare_out(out, args.force)
    say = _Steps()
    target = _load(args.target, say)
    # Everything is written into a fresh folder inside --out first, and moved
    # into place only once it is known that no file of the user's is in the way.
    stage = Path(tempfile.mkdtemp(prefix=".npu-attn-graph-dump-", dir=out))
    try:
        result = _convert(target, say, out_dir=stage / "ge")
        for graph in result.graphs:  # report and summary name the files where they end up
            if graph.pbtxt_path is not None:
                graph.pbtxt_path = out / "ge" / graph.pbtxt_path.name
        report = result.report
        say("writing FX graphs, report and pictures")
        notes: list[str] = []
        paths = _write_fx(stage / "fx", report) + _write_report(stage, result)
        paths += _write_pictures(stage / "pictures", report, notes, args.renderer)
        paths = [out / p.relative_to(stage) if p.is_relative_to(stage) else p for p in paths]
        notes = [note.replace(str(stage), str(out)) for note in notes]
        summary = _summary(args.target, result, paths + [out / "summary.txt", out / MANIFEST], notes)
        (stage / "summary.txt").write_text(summary + "\n")
        _install(stage, out, manifest, say)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # our own scratch folder, created above
    print(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.ops:
        return _ops_demo(args)
    import torch

    from .demo_models import _transformers, build
    from .report import Report

    transformers = _transformers()
    say = _Steps()
    model: Any = build("llama", "sdpa")  # a transformers model: generate() is not nn.Module's
    torch.manual_seed(0)
    prompt = torch.randint(1, 128, (2, 7))
    generate = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=0)
    print("npu_attn_graph demo: a tiny Llama (2 layers, 4 heads, 2 KV heads, random weights) generates "
          f"{args.new_tokens} tokens with a static KV cache, compiled with backend='npu_attn'")
    with torch.no_grad():
        say("generating eagerly (the reference)")
        expected = model.generate(prompt, past_key_values=transformers.StaticCache(config=model.config,
                                                                                   max_cache_len=64), **generate)
        report = Report()
        say("compiling with torch.compile(backend='npu_attn') and generating")
        eager_forward = model.forward
        # The model lives on the CPU: the eager executor runs the fused ops' reference kernels.
        # torch.compile's annotation of options allows str/int/bool/callable values only; the backend takes a Report
        model.forward = torch.compile(model.forward, backend="npu_attn",
                                      options={"report": report, "executor": "eager"})  # type: ignore[dict-item]
        actual = model.generate(prompt, past_key_values=transformers.StaticCache(config=model.config,
                                                                                 max_cache_len=64), **generate)
        model.forward = eager_forward
    print(report.table())
    same = bool(torch.equal(actual, expected))
    print(f"generated tokens {'identical to' if same else 'DIFFERENT from'} eager: {actual[0, 7:].tolist()}")
    print(f"Next: {PROG} dump demo:llama --out llama_dump   (FX graphs, GE graph, pictures)")
    return 0 if same and all(s.rewritten for s in report.sites) else EXIT_FAILED


def _ops_demo(args: argparse.Namespace) -> int:
    from .op_tour import FP32_TOLERANCE, format_results, run_demo

    print(f"npu_attn_graph op tour: tiny GQA decoder attention (B=2, N=8, KV heads 2, D=64), prompt 24 + "
          f"{args.new_tokens} decode steps, reference kernels on CPU")
    results = run_demo(new_tokens=args.new_tokens)
    print(format_results(results))
    worst = max(r.max_abs_err for r in results)
    ok = worst <= FP32_TOLERANCE
    print(f"worst error {worst:.2e} ({'within' if ok else 'OVER'} the fp32 tolerance {FP32_TOLERANCE:.0e})")
    return 0 if ok else EXIT_FAILED


EXPORT_FORMATS = ("pt2", "onnx", "air")


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_export_out(out, args.force)
    if args.opset is not None and args.format != "onnx":
        raise UsageError(f"--opset applies to --format onnx only, got --format {args.format}")
    say = _Steps()
    target = _load(args.target, say)
    # Written into a scratch folder first and copied to --out only when complete: a failed
    # export leaves nothing, and nothing but FILE is ever written where the user looks.
    with tempfile.TemporaryDirectory(prefix="npu_attn_export_") as scratch:
        written = Path(scratch) / (out.name or "export")
        summary = _EXPORTERS[args.format](target, written, args, say)
        extra = sorted(p.name for p in Path(scratch).iterdir() if p != written)
        if extra:
            raise RuntimeError(f"the {args.format} export wrote more than one file ({', '.join(extra)} besides "
                               f"{written.name}); nothing was written to {out}")
        shutil.copyfile(written, out)
    print(summary)
    print(f"wrote {out} ({args.format}, {out.stat().st_size} bytes)")
    return 0


def _check_export_out(out: Path, force: bool) -> None:
    """Before the slow work: FILE's folder exists, and FILE is new, or a regular file and --force."""
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist (export creates no folders)")
    if os.path.lexists(out):
        if out.is_symlink() or not out.is_file():
            raise UsageError(f"--out {out} exists and is not a regular file; choose another --out")
        if not force:
            raise UsageError(f"--out {out} exists; pass --force to overwrite it")


def _export_pt2(target, path: Path, args: argparse.Namespace, say: Callable[[str], None]) -> str:
    import torch

    from .export import export
    from .report import Report

    report = Report()
    say("exporting with torch.export and rewriting with the npu_attn passes")
    with torch.no_grad():
        program = export(target.model, tuple(target.args), target.kwargs, options={"report": report})
    say("saving with torch.export.save")
    torch.export.save(program, path)
    return report.table()


def _export_onnx(target, path: Path, args: argparse.Namespace, say: Callable[[str], None]) -> str:
    import torch

    from .onnx_export import export_onnx

    say("exporting to ONNX (npu_attn_graph.export, then torch.onnx with the npu_attn translation table)")
    options = {} if args.opset is None else {"opset_version": args.opset}
    with torch.no_grad():
        program = export_onnx(target.model, tuple(target.args), target.kwargs, f=path, **options)
    counts: dict[str, int] = {}
    for node in program.model_proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    shown = ", ".join(f"{t} x{counts[t]}" for t in ("Attention", "TensorScatter", "ScatterND") if t in counts)
    return f"{target.spec}: ONNX graph with {sum(counts.values())} nodes ({shown or 'no attention node'})"


def _export_air(target, path: Path, args: argparse.Namespace, say: Callable[[str], None]) -> str:
    from .export import export_air

    say("exporting through TorchAir's dynamo_export (GE graph with the npu_attn passes)")
    report = export_air(target.model, tuple(target.args), target.kwargs, f=path, progress=say)
    return report.table()


_EXPORTERS = {"pt2": _export_pt2, "onnx": _export_onnx, "air": _export_air}


# ---------------------------------------------------------------- dump pieces


@dataclass
class _Manifest:
    """What an earlier dump into --out wrote (empty: no earlier dump)."""

    files: dict[str, str] = field(default_factory=dict)  # path relative to --out ("fx/x.py") -> SHA-256
    folders: list[str] = field(default_factory=list)  # the DUMP_FOLDERS that dump created


def _prepare_out(out: Path, force: bool) -> _Manifest:
    """Check --out before the slow work, create it, and return the earlier dump's manifest."""
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out} is not empty; pass --force to write there anyway ({PROG} dump then "
                         "replaces only the files an earlier dump wrote and never touches any other file)")
    manifest = _read_manifest(out)
    _refuse_conflicts(out, _conflicts(out, list(ALWAYS_WRITTEN), manifest))
    out.mkdir(parents=True, exist_ok=True)
    return manifest


def _read_manifest(out: Path) -> _Manifest:
    path = out / MANIFEST
    if not os.path.lexists(path):
        return _Manifest()
    problem = None
    if path.is_symlink() or not path.is_file():
        problem = "not a regular file"
    else:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problem = f"unreadable: {error}"
        else:
            files, folders = (data.get("files"), data.get("folders")) if isinstance(data, dict) else (None, None)
            if not isinstance(data, dict) or data.get("written_by") != MANIFEST_OWNER:
                problem = f"its 'written_by' is not {MANIFEST_OWNER!r}"
            elif not (isinstance(files, dict) and all(isinstance(d, str) and _dump_path(r) for r, d in files.items())):
                problem = "its 'files' is not a map from paths dump writes to SHA-256 digests"
            elif not (isinstance(folders, list) and all(f in DUMP_FOLDERS for f in folders)):
                problem = f"its 'folders' is not a list of names from {list(DUMP_FOLDERS)}"
            else:
                return _Manifest(dict(files), list(folders))
    raise UsageError(f"--out {out}: {path} is not a manifest written by {PROG} dump ({problem}); "
                     "move it away or choose another --out")


def _dump_path(rel: str) -> bool:
    """A path dump itself may write: a top-level report file, or a plain name in one of its folders.
    (Checked on every manifest entry, so that no manifest can name a file elsewhere.)"""
    parts = rel.split("/") if isinstance(rel, str) else []
    if len(parts) == 1:
        return parts[0] in DUMP_FILES
    return (len(parts) == 2 and parts[0] in DUMP_FOLDERS and parts[1] not in ("", ".", "..")
            and "\\" not in parts[1])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _still_ours(out: Path, rel: str, manifest: _Manifest) -> bool:
    """rel is listed in the manifest and is still the very file dump wrote: a regular file, reached without
    a symbolic link, with the recorded SHA-256 (a file the user changed since is the user's now)."""
    if rel not in manifest.files:
        return False
    path, folder = out / rel, out / rel.split("/")[0]
    if folder.is_symlink() or path.is_symlink() or not path.is_file():
        return False
    return _sha256(path) == manifest.files[rel]


def _conflicts(out: Path, new: list[str], manifest: _Manifest) -> list[str]:
    """Paths in --out that writing `new` would overwrite and that are not dump's own unchanged files."""
    if not out.is_dir():
        return []
    in_the_way = []
    for folder in sorted({rel.split("/")[0] for rel in new if "/" in rel}):
        path = out / folder
        if os.path.lexists(path) and (path.is_symlink() or not path.is_dir()):
            in_the_way.append(f"{path} (not a folder)")
    for rel in new:
        path = out / rel
        if os.path.lexists(path) and not _still_ours(out, rel, manifest):
            in_the_way.append(str(path))
    return in_the_way


def _refuse_conflicts(out: Path, conflicts: list[str]) -> None:
    if conflicts:
        raise UsageError(f"--out {out}: {PROG} dump would overwrite {len(conflicts)} file(s) it did not write "
                         f"(or that changed since it wrote them): {', '.join(conflicts)}; move them away or choose "
                         "another --out (--force replaces only what an earlier dump wrote)")


def _install(stage: Path, out: Path, manifest: _Manifest, say: Callable[[str], None]) -> None:
    """Move the files written under `stage` into `out`, replacing the earlier dump's own files; remove the
    earlier dump's files this one does not write again; write the new manifest. Refuses (before changing
    anything) when a file dump did not write, or one changed since, is in the way."""
    new = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    if not all(_dump_path(rel) for rel in new):  # a later dump could not recognise such a file as its own
        raise RuntimeError(f"{PROG} dump wrote files outside its layout: {[r for r in new if not _dump_path(r)]}")
    _refuse_conflicts(out, _conflicts(out, new, manifest))
    stale = [rel for rel in manifest.files if rel not in new and _still_ours(out, rel, manifest)]
    kept = [rel for rel in manifest.files if rel not in new and rel not in stale and os.path.lexists(out / rel)]
    digests = {rel: _sha256(stage / rel) for rel in new}
    for rel in stale:
        (out / rel).unlink()
    folders = [f for f in manifest.folders if (out / f).is_dir() and not (out / f).is_symlink()]
    new_folders = sorted({rel.split("/")[0] for rel in new if "/" in rel})
    for folder in new_folders:
        if not (out / folder).exists():
            (out / folder).mkdir()
            folders.append(folder)
    for rel in new:
        os.replace(stage / rel, out / rel)
    for folder in [f for f in folders if f not in new_folders]:
        if not any((out / folder).iterdir()):  # a folder dump made, now empty: remove it again
            (out / folder).rmdir()
            folders.remove(folder)
    record = {"written_by": MANIFEST_OWNER, "files": digests, "folders": sorted(folders)}
    (stage / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    os.replace(stage / MANIFEST, out / MANIFEST)
    if stale:
        say(f"removed {len(stale)} file(s) of the earlier dump that this one does not write")
    for rel in kept:
        say(f"kept {out / rel}: changed since the earlier dump wrote it, so it is yours now")


def _write_fx(fx_dir: Path, report) -> list[Path]:
    fx_dir.mkdir()
    paths = []
    for i, (before, after) in enumerate(zip(report.code_before, report.code_after)):
        for stage, code in (("before", before), ("after", after)):
            path = fx_dir / f"graph_{i}_{stage}.py"
            path.write_text(f"# ATen graph {i} {stage} the npu_attn passes\n{code.strip()}\n")
            paths.append(path)
    return paths


def _write_report(out: Path, result) -> list[Path]:
    from .traffic import report_lines

    report = result.report
    lines = [report.table(), ""]
    left = report.left_alone()
    lines.append(f"sites left alone: {len(left)}")
    lines += [f"  {s.kind} {s.layer} ({s.source}) {s.pattern}: {s.reason}" for s in left]
    lines += ["", "GE conversion:", result.summary()]
    traffic = report.traffic(result.graphs)
    lines += [""] + report_lines(report, result.graphs)
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    data = {
        "sites": [asdict(s) for s in report.sites],
        "graph_breaks": result.graph_breaks,
        "recompiles": report.recompiles,
        "ge_graphs": [{"name": g.name, "complete": g.complete, "pbtxt": str(g.pbtxt_path),
                       "op_types": dict(sorted(g.op_types.items())),
                       "unconverted": [asdict(n) for n in g.unconverted]} for g in result.graphs],
        "single_ge_graph": result.single_graph,
        "torchair": result.torchair,
        "traffic": [{"graph": t.graph, "bytes": t.total, "ideal_bytes": t.ideal.total, "ratio": t.ratio,
                     "top_ops": [asdict(o) for o in t.top(3)], "whole_cache_ops": [asdict(o) for o in t.whole_cache()]}
                    for t in traffic],
    }
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    counts = out / "ge" / "op_types.txt"
    counts.write_text("".join(f"{n:5d}  {t}\n" for t, n in result.op_type_counts.most_common()))
    # Each graph's TorchAir dump (<name>.pbtxt) and GE protobuf as text (<name>.ge.txt, ge_graph writes it beside).
    return [out / "report.txt", out / "report.json", counts] + [
        path for g in result.graphs for path in (g.pbtxt_path, g.pbtxt_path.with_name(f"{g.name}.ge.txt"))]


def _write_pictures(pictures_dir: Path, report, notes: list[str], renderer: str = "auto") -> list[Path]:
    from .pictures import draw_report, pick_attention_layer

    if pick_attention_layer(report) is None:
        notes.append("pictures: none (no attention site)")
        return []
    pictures_dir.mkdir()
    try:
        return draw_report(report, pictures_dir, renderer=renderer)
    except (RuntimeError, ValueError) as error:  # e.g. no Graphviz at all: the rest of the dump stands
        notes.append(f"pictures: not drawn: {' '.join(str(error).split())}")
        return sorted(pictures_dir.iterdir())


def _summary(spec: str, result, paths: list[Path], notes: list[str]) -> str:
    report = result.report
    verdict = "one complete GE graph" if result.single_graph else "NOT one complete GE graph"
    lines = [f"{spec}: {len(report.fused())}/{len(report.sites)} sites fused in {report.graphs} graph(s); "
             f"{result.graph_count} GE graph(s), {verdict}"]
    top = ", ".join(f"{t} x{n}" for t, n in result.op_type_counts.most_common(8))
    lines.append(f"GE op types (top): {top}")
    for t in report.traffic(result.graphs):
        flagged = t.whole_cache()
        lines.append(f"{t.graph} bytes per call: {t.total / 2 ** 20:.2f} MiB, {t.ratio:.3f}x ideal"
                     + (f"; {len(flagged)} op(s) move a whole KV cache (report.txt)" if flagged else ""))
    lines.append(result.torchair)
    lines += notes
    lines.append("files:")
    lines += [f"  {p}" for p in paths]
    return "\n".join(lines)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Example: {PROG} check demo:llama\nRun '{PROG} COMMAND --help' for each command.\n"
               "Exit codes: 0 ok, 1 check failed, 2 bad command line or TARGET, 3 error.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, summary: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary, epilog=f"Example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--verbose", action="store_true", help="show the full traceback of an error")
        p.set_defaults(func=func)
        return p

    dump = command("dump", cmd_dump, "Write the FX graphs before/after the passes, the site report, the GE graph "
                   "(pbtxt, op-type counts) and pictures of one attention layer to --out.",
                   f"{PROG} dump demo:llama --out llama_dump")
    dump.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    dump.add_argument("--out", required=True, metavar="DIR", help="directory to write into (created if missing)")
    dump.add_argument("--force", action="store_true",
                      help=f"write into a non-empty --out: replace or remove only the files an earlier dump wrote "
                           f"(listed in {MANIFEST} and unchanged since); refuse if any other file is in the way")
    dump.add_argument("--renderer", choices=("auto", "dot", "pygraphviz"), default="auto",
                      help="who draws the pictures: pygraphviz (Graphviz bundled in its wheel, the 'pictures' "
                           "extra), dot (Graphviz's program on PATH), auto (default: pygraphviz if installed, "
                           "else dot); with neither, the .dot sources are written instead")

    check = command("check", cmd_check, "Exit 0 only if every attention and KV-cache site is fused and the model "
                    "becomes exactly one GE graph; otherwise print why and exit 1 (a CI gate).",
                    f"{PROG} check my_model.py:make_model")
    check.add_argument("target", metavar="TARGET", help=TARGET_HELP)

    explain = command("explain", cmd_explain, "Print the table of attention and KV-cache sites: pattern, fused op, "
                      "layout, sparse_mode, GQA ratio, and why a site was left alone.",
                      f"{PROG} explain mypackage.models:tiny_decoder")
    explain.add_argument("target", metavar="TARGET", help=TARGET_HELP)

    export = command("export", cmd_export, "Export the model with its attention and KV-cache sites fused: "
                     "pt2 (torch.export.save of npu_attn_graph.export; load it in a process that imported "
                     "npu_attn_graph), onnx (standard ONNX ops, npu_attn_graph.export_onnx) or air (TorchAir's "
                     "offline GE model for ATC; needs the GE runtime of an NPU host). The TARGET's call must be "
                     "exportable by torch.export: tensors and pytree containers in and out (e.g. use_cache=False, "
                     "or caches held as buffers).",
                     f"{PROG} export demo:bert --format pt2 --out bert.pt2")
    export.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to write")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to write (its folder must exist)")
    export.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (--format onnx only)")
    export.add_argument("--force", action="store_true", help="overwrite FILE if it exists")

    demo = command("demo", cmd_demo, "Compile the built-in tiny Llama with backend='npu_attn', generate with a "
                   "static KV cache, compare with eager and show the report.", f"{PROG} demo --new-tokens 8")
    demo.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    demo.add_argument("--ops", action="store_true", help="instead: the op-level tour (each fused op vs SDPA)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (TargetError, UsageError) as error:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        text = " ".join(str(error).split())
        print(f"{PROG} {args.command}: error: {type(error).__name__}: {text[:500]}"
              f"{'' if args.verbose else ' (--verbose shows the traceback)'}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
