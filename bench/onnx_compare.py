"""npu_attn_graph.export_onnx vs plain torch.onnx.export(dynamo=True, opset_version=23), same tiny models.

    python bench/onnx_compare.py [--only prefill|decode]

Per model: the ONNX graph's Attention / Softmax / TensorScatter / ScatterND node counts and the largest
difference of onnxruntime's output from eager (prefill logits; for the StaticCache decode step, the logits
and new caches over 8 steps fed back). Plain export is the un-rewritten model (SDPA already maps to
Attention there; eager attention stays MatMul-Softmax-MatMul).
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from npu_attn_graph import export_onnx  # noqa: E402
from tests.models import build_matrix_model, prefill_call  # noqa: E402
from tests.test_export import STEPS, InputDecode, _first_token, _new_caches  # noqa: E402

PREFILL = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager"), ("gpt2", "sdpa"),
           ("gpt2", "eager"), ("bert", "sdpa"), ("bert", "eager"), ("mistral", "sdpa"), ("mistral", "eager"),
           ("gemma3", "sdpa"), ("gemma3", "eager"), ("gemma2", "eager")]
DECODE = [case for case in PREFILL if case[0] != "bert"]  # BERT is an encoder: no decode step
KINDS = ("Attention", "Softmax", "TensorScatter", "ScatterND")


def _session(program):
    return ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _counts(program) -> str:
    c = collections.Counter(n.op_type for n in program.model_proto.graph.node)
    return "/".join(str(c[k]) for k in KINDS)


def _plain(model, args, kwargs):
    return torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, opset_version=23, verbose=False)


def prefill_row(family: str, attn: str) -> list[str]:
    model = build_matrix_model(family, attn)
    args, kwargs = prefill_call(family, model)
    flat = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
    with torch.no_grad():
        out = model(*args, **kwargs)
    want = (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()
    row = [f"{family} ({attn})", "prefill"]
    for export in (lambda: export_onnx(model, args, kwargs), lambda: _plain(model, args, kwargs)):
        program = export()
        session = _session(program)
        got = session.run(None, dict(zip([i.name for i in session.get_inputs()], [x.numpy() for x in flat])))[0]
        row += [_counts(program), f"{abs(got - want).max():.1e}"]
    return row


def decode_row(family: str, attn: str) -> list[str]:
    model = build_matrix_model(family, attn)
    step = InputDecode(model)
    example = (_first_token(2), torch.tensor([0]), *_new_caches(model, 2))
    row = [f"{family} ({attn})", f"StaticCache decode, {STEPS} steps"]
    for ours in (True, False):
        program = export_onnx(step, example) if ours else _plain(step, example, None)
        try:
            row += _decode_steps(model, step, program)
        except Exception as e:  # noqa: BLE001  (the table reports it)
            row += [_counts(program), f"fails in onnxruntime: {str(e).split('Status Message: ')[-1][:90]}"]
    return row


def _decode_steps(model, step, program) -> list[str]:
    """STEPS steps in onnxruntime, caches fed back when they are outputs: [counts, max diff]."""
    session = _session(program)
    names = [i.name for i in session.get_inputs()]
    caches = [c.numpy() for c in _new_caches(model, 2)]
    eager_caches = _new_caches(model, 2)
    token, diff = _first_token(2), 0.0
    with torch.no_grad():
        for position in range(STEPS):
            outs = session.run(None, dict(zip(names, [token.numpy(), torch.tensor([position]).numpy(), *caches])))
            want = step(token, torch.tensor([position]), *eager_caches)
            if len(outs) == len(caches) + 1:  # new caches, then logits: fed back
                *caches, logits = outs
            else:  # the caches are not outputs: the next step reads the old ones
                logits = outs[0]
            diff = max(diff, float(abs(logits - want.numpy()).max()))
            token = want[:, -1:].argmax(-1)  # both follow eager's tokens
    diff = max(diff, *(float(abs(a - b.numpy()).max()) for a, b in zip(caches, eager_caches)))
    return [_counts(program) + ("" if len(outs) > 1 else " (caches not outputs)"), f"{diff:.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("prefill", "decode"), help="one kind of row")
    only = parser.parse_args().only
    warnings.filterwarnings("ignore")
    header = ["model", "graph", "ours: " + "/".join(KINDS), "ours: max diff",
              "plain opset 23: " + "/".join(KINDS), "plain: max diff"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for family, attn in PREFILL if only != "decode" else ():
        print("| " + " | ".join(prefill_row(family, attn)) + " |", flush=True)
    for family, attn in DECODE if only != "prefill" else ():
        print("| " + " | ".join(decode_row(family, attn)) + " |", flush=True)


if __name__ == "__main__":
    main()
