"""Every registered npu_attn schema equals torch_npu 2.13.0's, namespace aside."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import npu_attn_graph  # noqa: F401  (registers the ops)
from npu_attn_graph import ops

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "torch_npu_2.13.0_schemas.txt"
# The reference file ships beside the repository; a copy is kept in tests/data
# so the test also runs from an sdist or a clone without shared/.
LOCAL_COPY = Path(__file__).with_name("data") / "torch_npu_2.13.0_schemas.txt"
# Schemas of ops beyond the shared reference list, extracted from the torch_npu
# 2.13.0 wheel's torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml (the
# functional "func:" line of each op, its "- func: " or "  func: " prefix dropped;
# the MoE ops' entries start with "- exposed: true", so their func line is indented).
WHEEL_EXTRACTS = [Path(__file__).with_name("data") / "torch_npu_2.13.0_v2_schemas.txt",
                  Path(__file__).with_name("data") / "torch_npu_2.13.0_moe_schemas.txt"]
WHEEL_YAML = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"

# Ops of this issue; later op-library work extends the list.
IMPLEMENTED = sorted(ops.__all__)


def _reference_schemas() -> dict[str, str]:
    path = REFERENCE if REFERENCE.exists() else LOCAL_COPY
    schemas = {}
    for source in (path, *WHEEL_EXTRACTS):
        for line in source.read_text().splitlines():
            line = line.strip()
            if line:
                schemas[line.split("(", 1)[0]] = line
    return schemas


def _normalised(schema_text: str) -> str:
    return str(torch._C.parse_schema(schema_text)).split("::", 1)[-1]


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"{REFERENCE} is absent (shared/ is not beside this checkout)")
def test_reference_copy_matches_shared_file():
    assert LOCAL_COPY.read_text() == REFERENCE.read_text()


def _cached_wheel() -> Path | None:
    """The torch_npu 2.13.0 wheel torchair_bridge caches (None when absent: the check is skipped)."""
    import os

    from npu_attn_graph.torchair_bridge import WHEEL_ENV, cache_dir

    places = [cache_dir() / "wheels"]
    if os.environ.get(WHEEL_ENV):
        given = Path(os.environ[WHEEL_ENV])
        places.insert(0, given if given.is_dir() else given.parent)
    for place in places:
        found = sorted(place.glob("torch_npu-2.13.0-*.whl"))
        if found:
            return found[-1]
    return None


@pytest.mark.parametrize("extract", WHEEL_EXTRACTS, ids=lambda p: p.name)
def test_wheel_extracts_match_the_cached_wheel(extract):
    """Each extracted line is, verbatim, a functional "- func:" line of the wheel's yaml."""
    import zipfile

    wheel = _cached_wheel()
    if wheel is None:
        pytest.skip("no cached torch_npu 2.13.0 wheel")
    with zipfile.ZipFile(wheel) as archive:
        yaml_text = archive.read(WHEEL_YAML).decode()
    funcs = {line[len("- func: "):].strip() for line in yaml_text.splitlines()
             if line.startswith(("- func: ", "  func: "))}
    lines = [line.strip() for line in extract.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert line in funcs, f"{line.split('(', 1)[0]}: not a 'func:' line of {wheel.name}'s {WHEEL_YAML}"


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_schema_matches_torch_npu(name):
    reference = _reference_schemas()
    assert name in reference, f"{name} is not a torch_npu 2.13.0 op"
    registered = getattr(torch.ops.npu_attn, name).default._schema
    assert registered.name == f"npu_attn::{name}"
    assert _normalised(str(registered)) == _normalised("npu_attn::" + reference[name])


def assert_signature_matches(fn, schema: torch._C.FunctionSchema) -> None:
    """fn takes the schema's arguments: names, order, keyword-only split and defaults."""
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params] == [a.name for a in schema.arguments]
    for p, a in zip(params, schema.arguments):
        assert (p.kind == inspect.Parameter.KEYWORD_ONLY) == a.kwarg_only, p.name
        if a.has_default_value():
            assert p.default == a.default_value, p.name
        else:
            assert p.default is inspect.Parameter.empty, p.name


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"{REFERENCE} is absent (shared/ is not beside this checkout)")
@pytest.mark.parametrize("name", IMPLEMENTED)
def test_public_function_signature_matches_torch_npu_yaml(name):
    """The drop-in function, generated from the registered schema, takes torch_npu's own
    arguments (the yaml's schema, not ours): names, order, keyword-only split and defaults."""
    reference = torch._C.parse_schema("npu::" + _reference_schemas()[name])
    assert_signature_matches(getattr(ops, name), reference)


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_public_function_is_generated_from_the_registered_schema(name):
    """No hand-written copy of a signature: the function is dropin()'s, its docstring
    opens with the registered schema and its annotations follow the schema's types."""
    from npu_attn_graph.kernels._dropin import annotation, schema_text

    fn = getattr(ops, name)
    schema = getattr(torch.ops.npu_attn, name).default._schema
    assert fn.__code__.co_filename == f"<npu_attn_graph dropin {name}>"
    assert " ".join(inspect.getdoc(fn).split("``")[1].split()) == schema_text(schema)
    params = inspect.signature(fn).parameters
    assert {p: params[p].annotation for p in params} == {a.name: annotation(a.type) for a in schema.arguments}


def test_int_list_arguments_take_a_tensor():
    """torch_npu's Python API takes an int[] as a list or a 1-D tensor; so do the drop-ins."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1, 4, 16) for _ in range(3))
    kwargs = dict(num_heads=1, input_layout="BNSD", scale_value=0.5)
    as_list = ops.npu_prompt_flash_attention(q, k, v, actual_seq_lengths=[4, 2], **kwargs)
    as_tensor = ops.npu_prompt_flash_attention(q, k, v, actual_seq_lengths=torch.tensor([4, 2]), **kwargs)
    assert torch.equal(as_list, as_tensor)
    assert as_list[1, :, 2:].abs().sum() == 0  # rows past batch 1's length 2 are 0: the lengths were read
