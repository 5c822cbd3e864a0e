"""Command-line TARGETs: what to compile, named on the command line.

A TARGET is ``path/to/file.py:factory``, ``package.module:factory`` or
``demo:NAME``; factory() returns ``(model, example_args)`` or
``(model, example_args, example_kwargs)``. A target's code is imported only
when it is named. Every problem is one TargetError with a one-line message.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

FORMS = "path/to/file.py:factory, package.module:factory or demo:NAME"


class TargetError(Exception):
    """A TARGET that cannot be loaded; the message is one line."""


@dataclass
class Target:
    spec: str
    model: Callable
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)


def load_target(spec: str) -> Target:
    factory = _factory(spec)
    try:
        produced = factory()
    except Exception as error:
        raise TargetError(f"{spec}: the factory raised {type(error).__name__}: {_one_line(error)}") from error
    return _unpack(spec, produced)


def _factory(spec: str) -> Callable:
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise TargetError(f"TARGET {spec!r} is not one of {FORMS}")
    if location == "demo":
        from .demo_models import DEMOS

        if name not in DEMOS:
            raise TargetError(f"{spec}: no built-in demo {name!r}; choose one of {sorted(DEMOS)}")
        return DEMOS[name]
    module = _import_file(location) if location.endswith(".py") or "/" in location else _import_module(location)
    factory = getattr(module, name, None)
    if factory is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise TargetError(f"{spec}: {location} has no factory {name!r} (its functions: {', '.join(found) or 'none'})")
    if not callable(factory):
        raise TargetError(f"{spec}: {name!r} in {location} is a {type(factory).__name__}, not a callable factory")
    return factory


def _import_file(location: str):
    """Import a file as ``python path/to/file.py`` would see it: its folder on
    sys.path (for its sibling imports, also when the factory runs later), and the
    module registered in sys.modules while it executes (dataclasses need that)."""
    path = Path(location)
    if not path.is_file():
        raise TargetError(f"file not found: {location}")
    module_name = f"npu_attn_graph_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"{location}: not a Python file (no import loader for it)")
    module = importlib.util.module_from_spec(spec)
    _prepend_to_path(str(path.resolve().parent))
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise TargetError(f"importing {location} failed: {type(error).__name__}: {_one_line(error)}") from error
    return module


def _import_module(location: str):
    _prepend_to_path(os.getcwd())  # as python -m does; a console script does not
    try:
        return importlib.import_module(location)
    except Exception as error:
        raise TargetError(f"cannot import module {location!r}: {type(error).__name__}: {_one_line(error)}") from error


def _prepend_to_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _unpack(spec: str, produced: Any) -> Target:
    shape = f"must return (model, example_args) or (model, example_args, example_kwargs); got {_describe(produced)}"
    if not isinstance(produced, (tuple, list)) or len(produced) not in (2, 3):
        raise TargetError(f"{spec}: the factory {shape}")
    model, args = produced[0], produced[1]
    kwargs = produced[2] if len(produced) == 3 else {}
    if not callable(model):
        raise TargetError(f"{spec}: the factory {shape} (the model is not callable)")
    if not isinstance(args, (tuple, list)):
        raise TargetError(f"{spec}: the factory {shape} (example_args is not a tuple or list)")
    if not isinstance(kwargs, dict):
        raise TargetError(f"{spec}: the factory {shape} (example_kwargs is not a dict)")
    return Target(spec, model, tuple(args), dict(kwargs))


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."
