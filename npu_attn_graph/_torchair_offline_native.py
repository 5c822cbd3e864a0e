"""Stand-ins for TorchAir's four native modules, used only in offline mode.

TorchAir (inside the torch_npu wheel) builds GE graphs in Python and calls its
native modules to initialise, load, compile and run them on the GE runtime,
which needs CANN and an NPU. Offline there is no runtime, so:

* graph-building calls behave as on an NPU host whose runtime has not started
  yet (initialising is a no-op, CANN compatibility checks pass: the graph is
  built for the newest CANN);
* the GE operator registry knows exactly the op types that npu_attn_graph's
  converters emit through TorchAir's custom-op builder, with the IR
  definitions the converters declare (``converters._ge.register_ir``);
* everything that would load, compile, run or export a graph raises
  :class:`GeRuntimeUnavailable`: offline mode never pretends to run a graph.

This is the one place where a test double replaces real code: the CANN
runtime cannot exist on a host without an NPU.
"""

from __future__ import annotations

import enum
import sys
from types import ModuleType
from typing import Any

NATIVE_MODULES = (
    "torchair.core._torchair",
    "torchair.core._npu_graph_executor",
    "torchair.core._abi_compat_ge_apis",
    "torchair.core._npu_utils",
)


class GeRuntimeUnavailable(RuntimeError):
    """Raised by offline TorchAir for anything that needs the GE runtime."""


def _unavailable(what: str):
    def call(*args, **kwargs):
        raise GeRuntimeUnavailable(
            f"{what} needs the GE runtime (CANN on an Ascend NPU host); TorchAir is loaded offline here, "
            "where GE graphs are built and dumped but never compiled or run")

    call.__name__ = what
    return call


# Where the converters declare the GE IR of the op types they build (GE_IR); read
# only once the converters are loaded (they load after TorchAir), never imported here.
_CONVERTERS_GE = __name__.rsplit(".", 1)[0] + ".converters._ge"


def _get_registered_ir_def(op_type: str):
    declared = getattr(sys.modules.get(_CONVERTERS_GE), "GE_IR", {})
    if op_type in declared:
        return ("SUCCESS", *declared[op_type])
    # Neither "SUCCESS" nor "ERROR": TorchAir reads this as "registry not
    # queryable" and neither auto-generates converters nor compiles callbacks.
    return ("None", [], [], [])


class _TorchNpuGraphBase:
    def __init__(self, name: str = ""):
        self.name = name

    load = compile = run = auto_tune = set_hint_shape = summary = _unavailable("TorchNpuGraph")


# (functional API: the enum is named as TorchAir's, the variable kept private here)
_TorchDataType = enum.IntEnum("TorchDataType", [  # type: ignore[misc]
    "BOOL", "UINT8", "INT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64", "BF16", "FLOAT16",
    "FLOAT32", "FLOAT64", "COMPLEX64", "COMPLEX128"])


def _torchair_module(name: str) -> ModuleType:
    module: Any = ModuleType(name, __doc__)  # attributes set below, as the native module has them
    module.TorchNpuGraphBase = _TorchNpuGraphBase
    module.TorchDataType = _TorchDataType
    module.get_registered_ir_def = _get_registered_ir_def
    module.check_cann_compat = lambda op_type, optional_inputs, optional_attrs: ""
    module.InitializeGraphEngine = lambda options: None
    module.FinalizeGraphEngine = lambda: None
    module.SetDebugLogPath = lambda path: None
    for what in ("AclmdlSetDump", "AclopStartDumpArgs", "AclopStopDumpArgs", "GetSocName",
                 "InitDeviceStdoutChannel", "StupidRepeat", "as_torch_tensors", "export"):
        setattr(module, what, _unavailable(what))
    return module


def make_native_module(name: str) -> ModuleType:
    """The stand-in for one of NATIVE_MODULES."""
    if name == "torchair.core._torchair":
        return _torchair_module(name)
    module: Any = ModuleType(name, __doc__)  # a module-level __getattr__ (PEP 562) set below

    def runtime_entry(attr: str):
        if attr.startswith("__"):  # import machinery probes (__path__, __spec__, ...)
            raise AttributeError(attr)
        return _unavailable(f"{name.rsplit('.', 1)[1]}.{attr}")

    module.__getattr__ = runtime_entry
    return module
