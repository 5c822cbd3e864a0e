"""Every registered npu_attn schema equals torch_npu 2.13.0's, namespace aside."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import npu_attn_graph  # noqa: F401  (registers the ops)
from npu_attn_graph import ops

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "torch_npu_2.13.0_schemas.txt"
# The reference file ships beside the repository; a copy is kept in tests/data
# so the test also runs from an sdist or a clone without shared/.
LOCAL_COPY = Path(__file__).with_name("data") / "torch_npu_2.13.0_schemas.txt"

# Ops of this issue; later op-library work extends the list.
IMPLEMENTED = sorted(ops.__all__)


def _reference_schemas() -> dict[str, str]:
    path = REFERENCE if REFERENCE.exists() else LOCAL_COPY
    schemas = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            schemas[line.split("(", 1)[0]] = line
    return schemas


def _normalised(schema_text: str) -> str:
    return str(torch._C.parse_schema(schema_text)).split("::", 1)[-1]


def test_reference_copy_matches_shared_file():
    if REFERENCE.exists():
        assert LOCAL_COPY.read_text() == REFERENCE.read_text()


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_schema_matches_torch_npu(name):
    reference = _reference_schemas()
    assert name in reference, f"{name} is not a torch_npu 2.13.0 op"
    registered = getattr(torch.ops.npu_attn, name).default._schema
    assert registered.name == f"npu_attn::{name}"
    assert _normalised(str(registered)) == _normalised("npu_attn::" + reference[name])


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_public_function_signature_matches_schema(name):
    """The drop-in function takes the schema's arguments, in order, with its defaults."""
    import inspect

    schema = getattr(torch.ops.npu_attn, name).default._schema
    params = list(inspect.signature(getattr(ops, name)).parameters.values())
    assert [p.name for p in params] == [a.name for a in schema.arguments]
    for p, a in zip(params, schema.arguments):
        assert (p.kind == inspect.Parameter.KEYWORD_ONLY) == a.kwarg_only, p.name
        if a.has_default_value():
            assert p.default == a.default_value, p.name
        else:
            assert p.default is inspect.Parameter.empty, p.name
