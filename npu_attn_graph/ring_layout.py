"""Run-time layout of ring-buffer sliding-window caches.

A graph compiled with ring order (passes.sliding_window_ring) reads and writes a
full window with the token at position p in slot p mod W; eager code, and a graph
kept in eager's order, keep the window shifted (slot k holds position seen - W + k).
Both are right on their own; mixing them silently would not be. This module keeps
them apart at the boundary of every graph the backend compiles:

- each window tensor a ring graph ran on is recorded with its version counter
  (`Tensor._version`, bumped by every in-place write);
- a ring graph given a window in eager order (an eager prefill, a step another
  graph kept in eager's order) rotates it into ring order first: one copy of the
  window, at the switch only;
- a graph in eager's order given a ring window rotates it back;
- a recorded window written since by anything else (eager code: a step dynamo ran
  without compiling, a direct write into ``layer.keys``) raises RingLayoutError,
  unless the layer was reset (its token count back under W, or the window zeroed);
- a ring window reaching a graph as an input it does not know as a window (a graph
  break between the cache update and the attention) raises RingLayoutError.

What it cannot see: eager code reading a ring window (``layer.keys``) between
steps; `window_in_eager_order` gives that read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.weak import WeakTensorKeyDictionary

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


# window tensor -> its version counter right after the last ring graph ran on it
_RINGS: Any = WeakTensorKeyDictionary()


def is_ring(window: torch.Tensor) -> bool:
    """The window was left in ring order by a compiled step, and nothing wrote it since."""
    version = _RINGS.get(window)
    return version is not None and version == _version(window)


def cache_shaped(example_inputs: Sequence[Any]) -> tuple[int | None, ...]:
    """Per input: its rank when it is a floating-point tensor of rank >= 3 (what a KV
    cache is), else None. (The plan is made from this, not from the inputs, so that
    the compiled function keeps no example tensor alive.)"""
    return tuple(x.dim() if isinstance(x, torch.Tensor) and x.dim() >= 3 and x.dtype.is_floating_point else None
                 for x in example_inputs)


def plan_for(sources: Sequence[str | None], ranks: Sequence[int | None], ring_sources: Iterable[str]) -> LayoutPlan:
    """The layout plan of a graph: its inputs' dynamo sources, their cache_shaped
    ranks, and the sources its sliding-window pass put in ring order."""
    ring = set(ring_sources)
    index_of = {s: i for i, s in enumerate(sources) if s}
    windows, others = [], []
    for i, (source, rank) in enumerate(zip(sources, ranks)):
        if rank is None:
            continue
        layer = next((source[: -len(s)] for s in (".keys", ".values") if source and source.endswith(s)), None)
        seen = index_of.get(f"{layer}.cumulative_length_int") if layer is not None else None
        if seen is not None and rank == 4:
            windows.append(Window(i, source or "", seen, source in ring))
        elif "._parameters[" not in (source or ""):
            others.append((i, source or f"input {i}"))
    return LayoutPlan(tuple(windows), tuple(others))


def untracked_reason(example_inputs: Sequence[Any], sources: Sequence[str | None]) -> str | None:
    """Why the windows among these inputs could not be tracked (inference tensors
    have no version counter), or None."""
    for source, x in zip(sources, example_inputs):
        if source and source.endswith((".keys", ".values")) and isinstance(x, torch.Tensor) and x.is_inference():
            return (f"{source} is an inference tensor (made under torch.inference_mode), which has no version "
                    f"counter, so a ring order could not be tracked at run time; use torch.no_grad()")
    return None


def guarded(compiled: Callable[..., Any], plan: Callable[[], LayoutPlan]) -> Callable[..., Any]:
    """`compiled` (called with the graph's inputs) with the layout checks around it.
    `plan` is asked once, at the first call (the passes have run by then)."""
    chosen: list[LayoutPlan] = []

    def run(*args: Any) -> Any:  # dynamo calls the compiled graph with its inputs as arguments
        if not chosen:
            chosen.append(plan())
        layout = chosen[0]
        if not layout.windows and not _RINGS:
            return compiled(*args)
        _before(layout, args)
        out = compiled(*args)
        _after(layout, args)
        return out

    return run


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # an inference tensor has no version counter: not tracked


def _order(slots: int, shift: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(slots, device=device) + shift) % slots


def _before(plan: LayoutPlan, inputs: Sequence[Any]) -> None:
    if _RINGS:
        for i, source in plan.others:
            x = inputs[i]
            if isinstance(x, torch.Tensor) and _recorded_ring(x, source, seen=None):
                raise RingLayoutError(
                    f"{source} holds a sliding-window cache in ring order (left so by an earlier compiled step), "
                    f"and this graph reads it as a plain tensor, in eager's order (a graph break between the "
                    f"cache update and the attention?). Compile with fullgraph=True, or use "
                    f"sliding_window_cache='shift'")
    for w in plan.windows:
        window, seen = inputs[w.index], int(inputs[w.seen_index])
        slots = window.shape[WINDOW_DIM]
        ring = _recorded_ring(window, w.source, seen)
        if seen < slots or seen % slots == 0:
            continue  # both orders agree
        with torch.no_grad():
            if w.ring and not ring:  # eager order -> ring slot j holds eager slot (j - seen) mod W
                window.copy_(window.index_select(WINDOW_DIM, _order(slots, -seen, window.device)))
            elif not w.ring and ring:  # ring -> eager slot k holds ring slot (k + seen) mod W
                window.copy_(window.index_select(WINDOW_DIM, _order(slots, seen, window.device)))
                del _RINGS[window]


def _recorded_ring(window: torch.Tensor, source: str, seen: int | None) -> bool:
    """The window is in ring order as a compiled step left it. A recorded window
    written since by anything else is forgotten when the layer was reset (token
    count under W, or the window zeroed), and an error otherwise."""
    recorded = _RINGS.get(window)
    if recorded is None:
        return False
    if recorded == _version(window):
        return True
    slots = window.shape[WINDOW_DIM] if window.dim() > WINDOW_DIM else 0
    if (seen is None or seen >= slots) and bool(window.any()):
        raise RingLayoutError(
            f"the sliding-window cache {source} was written by code outside the compiled graphs (eager "
            f"code: a step dynamo ran without compiling, or a direct write into the layer's tensors) after "
            f"a compiled step left it in ring order (slot = position mod {slots}); the two orders are now "
            f"mixed and the cache is wrong. Compile with fullgraph=True and keep every step compiled, or "
            f"use sliding_window_cache='shift'")
    del _RINGS[window]
    return False


def _after(plan: LayoutPlan, inputs: Sequence[Any]) -> None:
    for w in plan.windows:
        window = inputs[w.index]
        if w.ring:
            _RINGS[window] = _version(window)
        elif window in _RINGS:
            del _RINGS[window]
