"""The ``npu_attn`` torch.library namespace shared by every op module.

Each op module defines its schema here with the exact torch_npu 2.13.0 text, so
lowering to real torch_npu is a namespace swap (``npu_attn`` -> ``npu``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import weakref
from typing import Callable, Hashable, Iterator, Sequence, TypeVar, cast

import torch

NAMESPACE = "npu_attn"
T = TypeVar("T")

# One DEF library for the whole namespace; op modules add to it on import.
LIB = torch.library.Library(NAMESPACE, "DEF")

# Chunk budget of the reference kernels: each query chunk's fp32 score block
# (and each gathered block of a paged cache) stays under this many bytes, so
# extra memory is O(chunk x S_kv). Read at call time; tests shrink it to force
# many chunks.
SCORE_BLOCK_BYTES = 16 * 1024 * 1024


# Side of the compressed causal mask (triu(ones(2048, 2048), 1)) that
# sparse modes 2/3/4 (and the training op's 6/7/8) read as a pattern.
COMPRESSED_MASK_SIZE = 2048

# The compressed causal mask as a user writes it: the remedy quoted in every
# error that asks for it (sparse_mode 2/3/4 without, or with a wrong, atten_mask).
COMPRESSED_MASK_EXPRESSION = (f"torch.triu(torch.ones({COMPRESSED_MASK_SIZE}, {COMPRESSED_MASK_SIZE}, "
                              f"dtype=torch.bool), diagonal=1)")

# torch_npu's "unbounded" default for pre_tokens/next_tokens (int32 max).
INT_MAX = 2147483647
# The int64 "unbounded" band of the newer ops (npu_sparse_flash_attention's
# pre_tokens/next_tokens default) and of the reference kernels' Band.
INT64_MAX = 2**63 - 1


def once_per_version(tensor: torch.Tensor, tag: Hashable, key: Hashable, compute: Callable[[], T]) -> T:
    """compute(), a function of the tensor's contents and of `key`, evaluated once per
    tensor version and key: a model hands the same mask or block table to every layer
    (and a constant mask to every call).
    One entry per (tensor, tag), so a new key replaces the last; an entry goes when its
    tensor does, so the value must not hold the tensor or a view of it. Not cached for
    fake tensors and inference tensors (they have no version counter)."""
    try:
        version = tensor._version
    except RuntimeError:  # an inference tensor
        return compute()
    entry = _MEMO.get((id(tensor), tag))
    if entry is not None and entry[0]() is tensor and entry[1] == version and entry[2] == key:
        return cast(T, entry[3])
    value = compute()
    if not isinstance(tensor, torch._subclasses.FakeTensor):
        for stale in [k for k, (ref, *_) in _MEMO.items() if ref() is None]:
            del _MEMO[stale]
        _MEMO[(id(tensor), tag)] = (weakref.ref(tensor), version, key, value)
    return value


# Keyed by (id(tensor), tag); the weak reference tells a live tensor from a reused id.
_MEMO: dict[tuple[int, Hashable], tuple[weakref.ref, int, Hashable, object]] = {}


def once_per_contents(tensor: torch.Tensor, tag: Hashable, key: Hashable, compute: Callable[[], T],
                      max_bytes: int = SCORE_BLOCK_BYTES) -> T:
    """once_per_version, and also once for equal contents: compute() of the last tensor
    that missed (with this tag) is reused for a tensor equal to it (torch.equal) under
    the same key. For a value a model recomputes per layer into a fresh tensor (Inductor
    writes one copy of a mask for each op that reads it). The last tensor is held, one
    per tag and at most max_bytes, and used only while its version is the one it had."""
    try:
        version = tensor._version
    except RuntimeError:  # an inference tensor: no version to tell a later write by
        return compute()
    last = _LAST.get(tag)
    if last is not None:
        held, held_version, held_key, value = last
        if held_version != held._version or held_key != key:
            del _LAST[tag]
        elif held is tensor or (held.shape == tensor.shape and held.dtype == tensor.dtype
                                and held.device == tensor.device and torch.equal(held, tensor)):
            _LAST[tag] = (tensor, version, key, value)
            return cast(T, value)
    value = once_per_version(tensor, tag, key, compute)
    if tensor.numel() * tensor.element_size() <= max_bytes and \
            not isinstance(tensor, torch._subclasses.FakeTensor):
        _LAST[tag] = (tensor, version, key, value)
    return value


# tag -> (the last tensor, its version then, key, value).
_LAST: dict[Hashable, tuple[torch.Tensor, int, Hashable, object]] = {}


class NpuAttnArgumentError(ValueError):
    """A documented constraint of an op does not hold for the given arguments.

    The message always names the op, the argument, the rule and the value.
    """


_NPU_RULES = contextvars.ContextVar("npu_attn_npu_rules", default=False)


@contextlib.contextmanager
def npu_rules(enabled: bool = True) -> Iterator[None]:
    """Validate as on the NPU, whatever device the tensors are on: the graph
    passes use it when they build a graph for the NPU (the GE target) from
    CPU fake tensors, so rules that only the device enforces refuse there too."""
    token = _NPU_RULES.set(enabled)
    try:
        yield
    finally:
        _NPU_RULES.reset(token)


def npu_rules_apply(t: torch.Tensor) -> bool:
    """True for a tensor on the Ascend device, or inside npu_rules()."""
    return t.device.type == "npu" or _NPU_RULES.get()


def fail(op: str, argument: str, rule: str, value: object) -> None:
    raise NpuAttnArgumentError(f"{op}: {argument} {rule}, got {value}")


def check(condition: bool, op: str, argument: str, rule: str, value: object) -> None:
    """Raise NpuAttnArgumentError(op: argument rule, got value) unless condition."""
    if not condition:
        fail(op, argument, rule, value)


def remembered_per_metadata(validate: Callable[..., T]) -> Callable[..., T]:
    """validate(*args), remembered per the arguments' metadata (a tensor's shape, dtype and
    device; any other argument as it is), for a rule check that reads nothing else: a model
    repeats one call form in every layer and step, and the checks cost more than a small
    kernel. Calls with a tensor that is not a plain torch.Tensor (fake, functional) or under
    npu_rules() are not remembered, nor is a call that raises."""

    @functools.wraps(validate)
    def remembered(*args: object) -> T:
        if _NPU_RULES.get():
            return validate(*args)
        key: list[object] = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) is not torch.Tensor:
                    return validate(*args)
                key.append((a.shape, a.dtype, a.device))
            else:
                key.append(a)
        signature = tuple(key)
        try:
            return cast(T, memo[signature])
        except KeyError:
            pass
        value = validate(*args)
        if len(memo) >= _REMEMBERED_MAX:
            memo.clear()
        memo[signature] = value
        return value

    memo: dict[tuple, object] = {}
    return remembered


_REMEMBERED_MAX = 256


def define(name: str, schema: str, tags: tuple = ()) -> str:
    """Define ``npu_attn::<name>`` from the schema text after the op name."""
    LIB.define(name + schema, tags=tags)
    return f"{NAMESPACE}::{name}"


def torch_npu_installed() -> bool:
    """True when a torch_npu package is installed (found by importlib; not imported,
    so it may still fail to import without CANN). For "imports here", see
    torchair_bridge.torch_npu_available."""
    return importlib.util.find_spec("torch_npu") is not None


def schema_of(qualname: str) -> torch._C.FunctionSchema:
    """The registered schema of ``namespace::name`` (its default overload)."""
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default._schema


def with_schema_defaults(qualname: str, fn: Callable) -> Callable:
    """fn called with every argument of the op. The dispatcher leaves out the arguments
    a call passes at their schema default, so without this each kernel would need its
    own copy of every default."""
    arguments = schema_of(qualname).arguments
    positional = [a for a in arguments if not a.kwarg_only]
    keyword = {a.name: a.default_value for a in arguments if a.kwarg_only and a.has_default_value()}
    list_keywords = [name for name, v in keyword.items() if isinstance(v, list)]
    if not keyword and not any(a.has_default_value() for a in positional):
        return fn  # every argument is always passed

    @functools.wraps(fn)
    def kernel(*args, **kwargs):
        # Only arguments with a default can be left out (the dispatcher checked the call).
        if len(args) < len(positional):
            args += tuple(_fresh(a.default_value) for a in positional[len(args):])
        merged = dict(keyword)
        for name in list_keywords:
            merged[name] = list(merged[name])
        merged.update(kwargs)
        return fn(*args, **merged)

    return kernel


def _fresh(default: object) -> object:
    return list(default) if isinstance(default, list) else default  # a kernel may not share a list default


def register_fake(qualname: str) -> Callable[[Callable], Callable]:
    """Decorator: fn is the op's fake (meta) kernel, called with every argument."""

    def register(fn: Callable) -> Callable:
        torch.library.register_fake(qualname, with_schema_defaults(qualname, fn), lib=LIB)
        return fn

    return register


def register_reference(qualname: str, fn: Callable) -> None:
    """Register the device-generic reference kernel for every backend, called with every
    argument.

    CompositeExplicitAutograd covers CPU, CUDA and Meta-less backends alike; a
    backend-specific kernel (PrivateUse1 on an NPU host) takes precedence.
    """
    kernel = with_schema_defaults(qualname, fn)
    _REFERENCES[qualname] = kernel
    LIB.impl(qualname.split("::")[1], kernel, "CompositeExplicitAutograd")


_REFERENCES: dict[str, Callable] = {}


def call_op(qualname: str, *args, **kwargs):
    """``npu_attn::<name>`` called from another op's kernel (a wrapper calling the op it wraps).
    On CPU tensors, its reference kernel directly: that is the kernel the dispatcher picks
    there (CPU has no other), and a second trip through the dispatcher costs tens of
    microseconds a call, as much as a decode step's attention on small data. Elsewhere
    (an NPU, whose own kernel may be registered) through the dispatcher."""
    if args[0].device.type == "cpu":
        return _REFERENCES[qualname](*args, **kwargs)
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)(*args, **kwargs)


def register_npu(qualname: str, fn: Callable | None = None) -> None:
    """Register the PrivateUse1 (Ascend) kernel when torch_npu is installed; without
    fn, torch_npu's own op of the same name (torch.ops.npu.<name>)."""
    if torch_npu_installed():
        name = qualname.split("::")[1]
        LIB.impl(name, fn or _torch_npu_op(name), "PrivateUse1")


def _torch_npu_op(name: str) -> Callable:
    def kernel(*args, **kwargs):
        import torch_npu  # noqa: F401  (registers torch.ops.npu)

        return getattr(torch.ops.npu, name)(*args, **kwargs)

    return kernel


def int_list(values: Sequence[int] | torch.Tensor | None) -> list[int] | None:
    """torch_npu accepts lists or 1-D tensors for the length arguments."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        return [int(x) for x in values.tolist()]
    return list(values)
