"""Run-time layout of ring-buffer sliding-window caches.

A graph compiled with ring order (passes.sliding_window_ring) reads and writes a
full window with the token at position p in slot p mod W; eager code, and a graph
kept in eager's order, keep the window shifted (slot k holds position seen - W + k).
Both are right on their own; mixing them silently would not be. This module keeps
them apart at the boundary of every graph the backend compiles. Each window tensor
a compiled graph ran on (or allocated) is recorded with the order it left it in:

- a ring graph given a window recorded in eager's order rotates it into ring order
  first: one copy of the window, at the switch only;
- a graph in eager's order given a ring window rotates it back;
- a ring window written since by anything else (its version counter,
  ``Tensor._version``, moved: eager code, a step dynamo ran without compiling, a
  direct write into ``layer.keys``) raises RingLayoutError, unless the layer was
  reset (token count back under W, or the window zeroed);
- a ring graph given a full window no compiled graph recorded (a copy made by
  eager code, e.g. transformers' ``reorder_cache`` for beam search, which may hold
  either order) raises RingLayoutError;
- a ring window reaching a graph as an input it does not know as a window (a graph
  break between the cache update and the attention) raises RingLayoutError.

What it cannot see: eager code reading a ring window (``layer.keys``) between
steps; `window_in_eager_order` gives that read.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .passes.sliding_window_ring import token_count_source

WINDOW_DIM = 2  # transformers' sliding layers keep (batch, kv heads, W, head dim)


class RingLayoutError(RuntimeError):
    """A sliding-window cache in ring order met code that keeps eager's order."""


@dataclass(frozen=True)
class Window:
    """One layer window among a compiled graph's inputs."""

    index: int  # position among the graph's inputs
    source: str  # dynamo's name for it ("L['past_key_values'].layers[0].keys")
    seen_index: int  # the input holding the layer's token count
    ring: bool  # the graph reads and writes it in ring order


@dataclass(frozen=True)
class LayoutPlan:
    windows: tuple[Window, ...]
    others: tuple[tuple[int, str], ...]  # other cache-shaped inputs (index, source): never a ring window
    new_windows: bool = False  # the graph allocates windows (in eager's order): its cache-shaped outputs
    # the layer windows among `others` (no token count in this graph: read and written in eager's order)
    plain_windows: tuple[int, ...] = ()


RING, EAGER = "ring", "eager"


class _Record:
    """The order the last compiled graph left a window in, and its version counter then."""

    __slots__ = ("order", "version")

    def __init__(self, order: str, version: int) -> None:
        self.order, self.version = order, version


# window tensor -> its _Record
_LAYOUT: Any = WeakTensorKeyDictionary()
# Bumped whenever a window is recorded for the first time, changes order or is forgotten: a
# guard whose inputs are the tensors of its last call, unwritten since but by itself, with
# the epoch unchanged, has nothing to check (its fast path, see guarded).
_EPOCH = [0]


def is_ring(window: torch.Tensor) -> bool:
    """The window was left in ring order by a compiled step, and nothing wrote it since."""
    record = _LAYOUT.get(window)
    return record is not None and record.order == RING and record.version == _version(window)


def _record(window: torch.Tensor, order: str) -> _Record:
    record = _LAYOUT.get(window)
    if record is None:
        record = _LAYOUT[window] = _Record(order, _version(window))
        _EPOCH[0] += 1
    else:
        if record.order != order:
            record.order = order
            _EPOCH[0] += 1
        record.version = _version(window)
    return record


def _forget(window: torch.Tensor) -> None:
    del _LAYOUT[window]
    _EPOCH[0] += 1


def cache_shaped(example_inputs: Sequence[Any]) -> tuple[int | None, ...]:
    """Per input: its rank when it is a floating-point tensor of rank >= 3 (what a KV
    cache is), else None. (The plan is made from this, not from the inputs, so that
    the compiled function keeps no example tensor alive.)"""
    return tuple(x.dim() if isinstance(x, torch.Tensor) and x.dim() >= 3 and x.dtype.is_floating_point else None
                 for x in example_inputs)


def plan_for(sources: Sequence[str | None], ranks: Sequence[int | None], ring_sources: Iterable[str],
             new_windows: bool = False) -> LayoutPlan:
    """The layout plan of a graph: its inputs' dynamo sources, their cache_shaped
    ranks, the sources its sliding-window pass put in ring order, and whether it
    allocates windows."""
    ring = set(ring_sources)
    index_of = {s: i for i, s in enumerate(sources) if s}
    windows, others = [], []
    for i, (source, rank) in enumerate(zip(sources, ranks)):
        if rank is None:
            continue
        count = token_count_source(source)
        seen = index_of.get(count) if count is not None else None
        if seen is not None and rank == 4:
            windows.append(Window(i, source or "", seen, source in ring))
        elif "._parameters[" not in (source or ""):
            others.append((i, source or f"input {i}"))
    plain = tuple(i for i, source in others if token_count_source(source) is not None)
    return LayoutPlan(tuple(windows), tuple(others), new_windows, plain)


def untracked_reason(example_inputs: Sequence[Any], sources: Sequence[str | None]) -> str | None:
    """Why the windows among these inputs could not be tracked (inference tensors
    have no version counter), or None."""
    for source, x in zip(sources, example_inputs):
        if token_count_source(source) is not None and isinstance(x, torch.Tensor) and x.is_inference():
            return (f"{source} is an inference tensor (made under torch.inference_mode), which has no version "
                    f"counter, so a ring order could not be tracked at run time; use torch.no_grad()")
    return None


def guarded(compiled: Callable[..., Any], plan: Callable[[], LayoutPlan]) -> Callable[..., Any]:
    """`compiled` (called with the graph's inputs) with the layout checks around it.
    `plan` is asked once, at the first call (the passes have run by then)."""
    chosen: list[LayoutPlan] = []
    # After a full check: the epoch, each checked input (index, weak reference: a cache the
    # caller drops is not kept alive) and the records of the windows this graph recorded,
    # so that a steady decode loop costs an identity and a version test per window (the
    # records are updated in place).
    memo: list[Any] = [None, (), ()]

    def run(*args: Any) -> Any:  # dynamo calls the compiled graph with its inputs as arguments
        if not chosen:
            chosen.append(plan())
        layout = chosen[0]
        if not (layout.windows or layout.new_windows or layout.plain_windows or _LAYOUT):
            return compiled(*args)
        epoch, inputs, records = memo
        if epoch == _EPOCH[0] and all(args[i] is t() for i, t in inputs) and \
                all(r.version == _version(args[i]) for (i, _), r in zip(inputs, records)):
            out = compiled(*args)
            for (i, _), r in zip(inputs, records):
                r.version = _version(args[i])
            return out
        _before(layout, args)
        out = compiled(*args)
        written = _after(layout, args, out)
        checked = [i for i, _ in layout.others if i not in written]
        # (others last: records only cover the recorded windows, zip stops there)
        memo[:] = [None if layout.new_windows else _EPOCH[0],
                   tuple((i, weakref.ref(args[i])) for i in list(written) + checked), tuple(written.values())]
        return out

    return run


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # an inference tensor has no version counter: not tracked


def _order(slots: int, shift: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(slots, device=device) + shift) % slots


def _before(plan: LayoutPlan, inputs: Sequence[Any]) -> None:
    if _LAYOUT:
        for i, source in plan.others:
            x = inputs[i]
            if isinstance(x, torch.Tensor) and _order_of(x, source, seen=None) == RING:
                raise RingLayoutError(
                    f"{source} holds a sliding-window cache in ring order (left so by an earlier compiled step), "
                    f"and this graph reads it as a plain tensor, in eager's order (a graph break between the "
                    f"cache update and the attention?). Compile with fullgraph=True, or use "
                    f"sliding_window_cache='shift'")
    for w in plan.windows:
        window, seen = inputs[w.index], int(inputs[w.seen_index])
        slots = window.shape[WINDOW_DIM]
        order = _order_of(window, w.source, seen)
        if seen < slots or seen % slots == 0:
            continue  # both orders agree
        if w.ring and order is None:
            raise RingLayoutError(
                f"the sliding-window cache {w.source} is full ({seen} tokens, {slots} slots) and no compiled step "
                f"left it in either order: eager code made or copied it (transformers' reorder_cache for beam "
                f"search and offload copy the layer's tensors, which may hold a ring), so this ring step cannot "
                f"know its order. Compile every step from the prefill on, or use sliding_window_cache='shift'")
        with torch.no_grad():
            if w.ring and order == EAGER:  # ring slot j holds eager slot (j - seen) mod W
                window.copy_(window.index_select(WINDOW_DIM, _order(slots, -seen, window.device)))
            elif not w.ring and order == RING:  # eager slot k holds ring slot (k + seen) mod W
                window.copy_(window.index_select(WINDOW_DIM, _order(slots, seen, window.device)))


def _order_of(window: torch.Tensor, source: str, seen: int | None) -> str | None:
    """The order a compiled step left the window in: RING, EAGER, or None (none did).
    A window in eager's order stays so whatever eager code writes into it; a ring
    written since by anything else is forgotten when the layer was reset (token count
    under W, or the window zeroed), and an error otherwise."""
    record = _LAYOUT.get(window)
    if record is None:
        return None
    if record.order != RING or record.version == _version(window):
        return record.order
    slots = window.shape[WINDOW_DIM] if window.dim() > WINDOW_DIM else 0
    if (seen is None or seen >= slots) and bool(window.any()):
        raise RingLayoutError(
            f"the sliding-window cache {source} was written by code outside the compiled graphs (eager "
            f"code: a step dynamo ran without compiling, or a direct write into the layer's tensors) after "
            f"a compiled step left it in ring order (slot = position mod {slots}); the two orders are now "
            f"mixed and the cache is wrong. Compile with fullgraph=True and keep every step compiled, or "
            f"use sliding_window_cache='shift'")
    _forget(window)
    return None


def _after(plan: LayoutPlan, inputs: Sequence[Any], out: Any) -> dict[int, _Record]:
    """Record the order this graph left its windows in; returns input index -> record."""
    written = {w.index: _record(inputs[w.index], RING if w.ring else EAGER) for w in plan.windows}
    for i in plan.plain_windows:
        written[i] = _record(inputs[i], EAGER)
    if plan.new_windows:  # allocated and filled in eager's order
        for x in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype.is_floating_point and x not in _LAYOUT:
                _record(x, EAGER)
    return written
