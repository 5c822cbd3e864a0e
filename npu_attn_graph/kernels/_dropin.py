"""Drop-in Python functions generated from the registered op schemas.

Each op's schema text, given once to ``define()`` in its kernel module, is the
one source of its Python signature: :func:`dropin` reads the registered
``FunctionSchema`` and builds a plain function with the schema's argument
names, order, keyword-only marker and defaults, so ``inspect.signature`` and
``help()`` show torch_npu's signature and a call binds exactly as the op does.
The body calls the ``torch.ops`` overload; ``int[]`` arguments also accept 1-D
tensors (torch_npu's Python API does), converted by ``int_list``.

The function is compiled from generated source (as ``dataclasses`` builds
``__init__``) rather than given a ``__signature__`` over ``*args``: a real
signature binds in C, and torch.compile traces it like any Python function.
"""

from __future__ import annotations

import linecache
import textwrap
from typing import Any, Callable

import torch

from ._library import int_list, schema_of

__all__ = ["annotation", "dropin", "schema_of", "schema_text"]

_SCALARS = {"TensorType": "torch.Tensor", "IntType": "int", "SymIntType": "int", "FloatType": "float",
            "BoolType": "bool", "StringType": "str", "NumberType": "float", "ScalarTypeType": "int"}


def schema_text(schema: torch._C.FunctionSchema) -> str:
    """The schema as torch_npu writes it: no namespace."""
    return str(schema).split("::", 1)[-1]


def annotation(jit_type: Any, *, returned: bool = False) -> str:
    """The Python annotation (a string, as under ``from __future__ import annotations``)
    of a schema type: Tensor? -> ``torch.Tensor | None``, int[] -> ``Sequence[int]``
    (lists or 1-D tensors are taken), Tensor[] -> ``list[torch.Tensor]``."""
    kind = jit_type.kind()
    if kind == "OptionalType":
        return f"{annotation(jit_type.getElementType(), returned=returned)} | None"
    if kind == "ListType":
        element = annotation(jit_type.getElementType())
        return f"list[{element}]" if element == "torch.Tensor" or returned else f"Sequence[{element}]"
    if kind not in _SCALARS:
        raise TypeError(f"no Python annotation for schema type {jit_type} ({kind})")
    return _SCALARS[kind]


def _return_annotation(schema: torch._C.FunctionSchema) -> str:
    types = [annotation(r.type, returned=True) for r in schema.returns]
    if not types:
        return "None"
    return types[0] if len(types) == 1 else f"tuple[{', '.join(types)}]"


def _is_int_list(jit_type: Any) -> bool:
    if jit_type.kind() == "OptionalType":
        jit_type = jit_type.getElementType()
    return jit_type.kind() == "ListType" and jit_type.getElementType().kind() in ("IntType", "SymIntType")


def _wrapped(text: str, width: int = 96) -> str:
    """text broken into lines between arguments (never inside "Tensor? name=None")."""
    lines, line = [], ""
    parts = text.split(", ")
    for i, part in enumerate(parts):
        piece = part + (", " if i < len(parts) - 1 else "")
        if line.strip() and len(line) + len(piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = "    "
        line += piece
    return "\n".join(lines + [line])


def dropin(qualname: str, module: str, doc: str | None = None) -> Callable[..., Any]:
    """torch_npu's Python function for the registered op ``qualname``, defined in ``module``.

    Its docstring is the schema (one line, as torch_npu's yaml has it) followed by
    ``doc`` (default: "torch_npu.<name>, runnable on any device (see module docstring).").
    """
    schema = schema_of(qualname)
    name = schema.name.split("::", 1)[1]
    positional = [a for a in schema.arguments if not a.kwarg_only]
    keyword = [a for a in schema.arguments if a.kwarg_only]
    defaults = [a.default_value for a in positional if a.has_default_value()]
    if any(not a.has_default_value() for a in positional[len(positional) - len(defaults):]):
        raise TypeError(f"{qualname}: a positional argument without default follows one with a default")

    def passed(a: Any) -> str:
        return f"_int_list({a.name})" if _is_int_list(a.type) else a.name

    params = [a.name for a in positional] + (["*"] + [a.name for a in keyword] if keyword else [])
    call = [passed(a) for a in positional] + [f"{a.name}={passed(a)}" for a in keyword]
    filename = f"<npu_attn_graph dropin {name}>"
    source = (f"def {name}({', '.join(params)}):\n"
              f"    return _op({', '.join(call)})\n")
    # The overload packet, as a hand-written wrapper would call it (traced graphs keep that target).
    scope: dict[str, Any] = {"_op": getattr(getattr(torch.ops, qualname.split("::")[0]), name), "_int_list": int_list}
    exec(compile(source, filename, "exec"), scope)  # noqa: S102  (source built above from the schema's names)
    # Tracebacks and inspect.getsource show the generated lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    fn = scope[name]
    fn.__defaults__ = tuple(defaults) or None
    fn.__kwdefaults__ = {a.name: a.default_value for a in keyword if a.has_default_value()} or None
    fn.__annotations__ = {**{a.name: annotation(a.type) for a in schema.arguments},
                          "return": _return_annotation(schema)}
    fn.__module__ = module
    fn.__qualname__ = name
    text = doc if doc is not None else f"torch_npu.{name}, runnable on any device (see module docstring)."
    fn.__doc__ = f"{_wrapped(f'``{schema_text(schema)}``')}\n\n{textwrap.dedent(text).strip()}\n"
    return fn
