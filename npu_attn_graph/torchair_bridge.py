"""Access to TorchAir, the torch_npu component that turns FX graphs into Ascend GE graphs.

Two modes:

* **npu** - torch_npu imports (an Ascend host with CANN): the real ``torchair``
  is used, and GE graphs are compiled and run by the GE runtime.
* **offline** - anywhere else. TorchAir's graph construction is pure Python;
  only loading, compiling and running a GE graph need its native modules. So
  the torch-npu wheel that pairs with the installed torch is obtained (from
  ``$NPU_ATTN_GRAPH_TORCH_NPU_WHEEL``, or downloaded once with pip into a user
  cache), TorchAir's Python files are unpacked from it, and the package is
  imported with its four native modules replaced by the stand-ins in
  ``_torchair_offline_native``. torch_npu itself is never installed or imported.
  Offline mode builds and dumps GE graphs; it never compiles or runs them, and
  any attempt to do so raises :class:`GeRuntimeUnavailable`.

Never install torch_npu into an environment without CANN: ``import torch``
itself then fails (device-backend autoload).
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from ._torchair_offline_native import NATIVE_MODULES, GeRuntimeUnavailable, make_native_module

WHEEL_ENV = "NPU_ATTN_GRAPH_TORCH_NPU_WHEEL"
CACHE_ENV = "NPU_ATTN_GRAPH_CACHE"
TORCHAIR_IN_WHEEL = "torch_npu/dynamo/torchair/"
# Where this host's own platform has no torch-npu wheel (macOS, an unsupported Python).
FALLBACK_WHEEL = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                  "--abi", "cp311"]


class TorchAirUnavailable(RuntimeError):
    """TorchAir could be neither imported from torch_npu nor loaded offline."""


@dataclass(frozen=True)
class TorchAir:
    """The loaded TorchAir package and where it came from."""

    module: ModuleType
    mode: str  # "npu" or "offline"
    source: str  # torch_npu's location, or the wheel the offline copy was unpacked from

    @property
    def offline(self) -> bool:
        return self.mode == "offline"

    def describe(self) -> str:
        if self.offline:
            return (f"TorchAir offline (from {self.source}): GE graphs are built and dumped; "
                    "they are not compiled or run (no GE runtime on this host)")
        return f"TorchAir from torch_npu ({self.source}): GE graphs are compiled and run on the NPU"


_loaded: TorchAir | None = None
_lock = threading.Lock()


def load_torchair(progress: Callable[[str], None] | None = None) -> TorchAir:
    """Return TorchAir, loading it on first use (see the module docstring).

    `progress` receives one-line messages for the slow steps (the first wheel
    download); by default they go to stderr.
    """
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load(progress or _print_progress)
        return _loaded


def torch_npu_available() -> bool:
    """True when ``import torch_npu`` succeeds here (an Ascend host with CANN); it
    imports torch_npu. Installed but failing to import (no CANN) counts as absent;
    kernels._library.torch_npu_installed only checks that the package is installed."""
    if "torch_npu" in sys.modules:
        return True
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401
    except Exception:  # torch_npu installed without CANN: not an NPU host
        return False
    return True


def _print_progress(message: str) -> None:
    print(f"[npu_attn_graph] {message}", file=sys.stderr, flush=True)


def _load(progress: Callable[[str], None]) -> TorchAir:
    if torch_npu_available():
        import torch_npu
        import torchair

        _follow_aot_input_flattening(torchair)
        return TorchAir(torchair, "npu", str(Path(torch_npu.__file__).parent))
    if "torchair" in sys.modules:
        raise TorchAirUnavailable("a module named 'torchair' is already imported but torch_npu is not: "
                                  "cannot load TorchAir offline over it")
    _require_protobuf()
    wheel = _find_or_fetch_wheel(progress)
    package_dir = _unpack_torchair(wheel, progress)
    module = _import_offline(package_dir)
    _follow_aot_input_flattening(module)
    return TorchAir(module, "offline", str(wheel))


def _follow_aot_input_flattening(torchair: ModuleType) -> None:
    """Make TorchAir's per-input attributes (parameter and static-input marks) land
    on the inputs AOT autograd hands its compilers when dynamo's inputs hold tensor
    subclasses or opaque objects (a DTensor tensor-parallel model: DTensor parameters
    and the DeviceMesh).

    TorchAir 2.13 reads the attributes from dynamo's example inputs and sets them again
    on AOT's, indexed from the end (``npu_fx_compiler._get_inputs_custom_attr``). AOT
    flattens every subclass input into its inner values (a DTensor into its local
    tensor and its DeviceMesh, the mesh a FakeScriptObject while tracing), so the
    indices miss: a parameter mark falls on a FakeScriptObject, whose ``__setattr__``
    raises ("Tried to call __setattr__ with attr '_dynamo_static_input_type' on a
    FakeScriptObject"), and no GE graph is built. Here the indices count AOT's flattened
    inputs (``__tensor_flatten__``, recursively, as AOT does): a subclass parameter's
    marks go to its inner tensors, opaque objects get none. Inputs without a subclass
    or opaque object keep TorchAir's own function. Applied on NPU hosts too: the
    mismatch is between TorchAir and torch, not offline-specific."""
    from torch._opaque_base import OpaqueBase
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    compiler: Any = importlib.import_module(f"{torchair.__name__}.npu_fx_compiler")  # TorchAir's, patched below
    original = getattr(compiler, "_get_inputs_custom_attr", None)
    if original is None or getattr(original, "_npu_attn_graph_flattening", False):
        return  # another TorchAir (no such function), or already done

    def leaves(value: Any) -> list:
        if not is_traceable_wrapper_subclass(value):
            return [value]
        names, _ = value.__tensor_flatten__()
        return [leaf for name in names for leaf in leaves(getattr(value, name))]

    def inputs_custom_attr(example_inputs: list[Any]) -> dict[int, dict]:
        if not any(is_traceable_wrapper_subclass(x) or isinstance(x, OpaqueBase) for x in example_inputs):
            return original(example_inputs)
        flat: list[dict] = []
        for value in example_inputs:
            marks = original([value]).get(-1, {}) if isinstance(value, torch.Tensor) else {}
            flat += [marks if isinstance(leaf, torch.Tensor) else {} for leaf in leaves(value)]
        return {i - len(flat): marks for i, marks in enumerate(flat) if marks}

    inputs_custom_attr._npu_attn_graph_flattening = True  # type: ignore[attr-defined]  # marks the patch as done
    compiler._get_inputs_custom_attr = inputs_custom_attr


def _require_protobuf() -> None:
    if importlib.util.find_spec("google.protobuf") is None:
        raise TorchAirUnavailable("TorchAir needs protobuf to build GE graphs: pip install 'npu_attn_graph[ge]' "
                                  "(or pip install protobuf pyyaml)")


def paired_torch_npu_version() -> str:
    """The torch-npu release that pairs with the installed torch (same X.Y.Z)."""
    return torch.__version__.split("+")[0]


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "npu_attn_graph"


def _find_or_fetch_wheel(progress: Callable[[str], None]) -> Path:
    version = paired_torch_npu_version()
    given = os.environ.get(WHEEL_ENV)
    if given:
        path = Path(given)
        if path.is_dir():  # a folder of wheels: the one pairing with torch
            wheels = sorted(path.glob(f"torch_npu-{version}*.whl"))
            if not wheels:
                raise TorchAirUnavailable(f"{WHEEL_ENV}={given!r}: no torch_npu-{version} wheel in that folder "
                                          f"(torch {torch.__version__} pairs with torch-npu {version})")
            return wheels[-1]
        if not path.is_file():
            raise TorchAirUnavailable(f"{WHEEL_ENV}={given!r}: no torch_npu wheel file there")
        if not path.name.startswith(f"torch_npu-{version}"):
            progress(f"warning: {path.name} is not torch-npu {version}, which pairs with torch {torch.__version__}")
        return path
    wheels_dir = cache_dir() / "wheels"
    cached = sorted(wheels_dir.glob(f"torch_npu-{version}*.whl"))
    if cached:
        return cached[-1]
    wheels_dir.mkdir(parents=True, exist_ok=True)
    progress(f"fetching the torch-npu {version} wheel (about 45 MB, once) into {wheels_dir} "
             f"to load TorchAir offline; set {WHEEL_ENV} to use a wheel you already have")
    with tempfile.TemporaryDirectory(dir=wheels_dir) as tmp:
        command = [sys.executable, "-m", "pip", "download", f"torch-npu=={version}.*", "--no-deps",
                   "--only-binary=:all:", "--disable-pip-version-check", "--quiet", "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            # torch-npu ships Linux wheels for some CPython versions only; TorchAir's
            # Python files are the same in each, so any of them serves here.
            result = subprocess.run(command + FALLBACK_WHEEL, capture_output=True, text=True)
        fetched = sorted(Path(tmp).glob("torch_npu-*.whl"))
        if result.returncode != 0 or not fetched:
            raise TorchAirUnavailable(
                f"could not download torch-npu=={version}.* with pip (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-800:]}\n"
                f"Download the wheel elsewhere (pip download torch-npu=={version} --no-deps) and set {WHEEL_ENV} "
                "to its path.")
        target = wheels_dir / fetched[-1].name
        os.replace(fetched[-1], target)
    progress(f"saved {target.name}")
    return target


def _unpack_torchair(wheel: Path, progress: Callable[[str], None]) -> Path:
    """Unpack TorchAir's Python files (not its native modules) once per wheel;
    returns the directory holding the ``torchair`` package."""
    root = cache_dir() / "torchair" / wheel.stem
    package_dir = root / "torchair"
    if (package_dir / "__init__.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".unpack-"))
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist()
                       if m.startswith(TORCHAIR_IN_WHEEL) and not m.endswith((".so", "/"))]
            if not members:
                raise TorchAirUnavailable(f"{wheel} holds no {TORCHAIR_IN_WHEEL} package")
            for member in members:
                target = staging / "torchair" / member[len(TORCHAIR_IN_WHEEL):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        try:
            os.replace(staging, root)  # atomic: a concurrent unpack of the same wheel wins or loses whole
        except OSError:
            if not (package_dir / "__init__.py").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"unpacked TorchAir's Python package from {wheel.name}")
    return root


class _OfflineTorchAirFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torchair`` in the unpacked directory and serves the native
    modules as stand-ins. Nothing else is affected."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname in NATIVE_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self)
        if fullname == "torchair":
            return importlib.util.spec_from_file_location(
                fullname, self.root / "torchair" / "__init__.py",
                submodule_search_locations=[str(self.root / "torchair")])
        return None

    def create_module(self, spec):
        return make_native_module(spec.name)

    def exec_module(self, module):
        pass


def _import_offline(root: Path) -> ModuleType:
    finder = _OfflineTorchAirFinder(root)
    sys.meta_path.insert(0, finder)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # TorchAir's converters for torch_npu's own ops cannot register without
    # torch_npu, and it warns once per module (now or when it first converts a
    # graph). Expected offline, so silenced; nothing else is.
    warnings.filterwarnings("ignore", message=r"Failed to import torchair\._ge_concrete_graph\.ge_converter\.",
                            category=UserWarning)
    try:
        import torchair
    except Exception as error:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m == "torchair" or m.startswith("torchair.")]:
            del sys.modules[name]
        raise TorchAirUnavailable(f"importing TorchAir offline from {root} failed: {error}") from error
    finally:
        # TorchAir installs SIGINT/SIGTERM handlers and an exit hook that shut
        # down the GE runtime; offline there is none, so the process keeps its own.
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
    backend = sys.modules.get("torchair.core._backend")
    if backend is not None and hasattr(backend, "finalize_graph_engine"):
        atexit.unregister(backend.finalize_graph_engine)
    return torchair


__all__ = ["TorchAir", "TorchAirUnavailable", "GeRuntimeUnavailable", "load_torchair", "torch_npu_available",
           "paired_torch_npu_version", "cache_dir", "WHEEL_ENV", "CACHE_ENV"]
