"""``scatter_update`` / ``scatter_update_``: torch_npu's KV-cache row update (the CANN Scatter op).

Schemas: torch_npu 2.13.0's (namespace ``npu_attn``), each written once, in its ``define``
call below; the drop-in functions' docstrings show them.

Semantics (CANN Scatter, shown for axis = -2 of a 4-D ``self`` (a, b, c, d)):

* 1-D ``indices`` (n,), n <= a: ``indices[i]`` is the *start offset* along ``axis``
  for batch row i: ``out[i, j, indices[i] + k, l] = updates[i, j, k, l]`` for every
  k < updates.shape[axis].
* 2-D ``indices`` (n, 2): column 0 picks the batch row of ``self``, column 1 is the
  start offset: ``out[indices[i, 0], j, indices[i, 1] + k, l] = updates[i, j, k, l]``.

Dim 0 is the batch dim, so ``axis`` (negative allowed) must not resolve to 0.
Duplicate targets give an unspecified result (as on the NPU).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._dropin import dropin
from ._library import check, define, fail, register_fake, register_npu, register_reference, remembered_per_metadata

__all__ = ["scatter_update", "scatter_update_"]

# int8, fp16, fp32, bf16, int32 are the NPU dtypes; float64 is for CPU tests.
_DTYPES = (torch.int8, torch.float16, torch.float32, torch.bfloat16, torch.int32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)

class _Plan(NamedTuple):
    axis: int  # normalised, in [1, self.dim())


def _validate(op: str, self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> _Plan:
    """Shape/dtype rules shared by the fake and reference kernels (no data access)."""
    rank = self.dim()
    check(2 <= rank <= 8, op, "self.dim()", "must be in [2, 8]", rank)
    check(self.dtype in _DTYPES, op, "self.dtype", f"must be one of {list(_DTYPES)}", self.dtype)
    check(updates.dtype == self.dtype, op, "updates.dtype", f"must equal self.dtype ({self.dtype})", updates.dtype)
    check(indices.dtype in _INDEX_DTYPES, op, "indices.dtype", "must be int32 or int64", indices.dtype)
    check(indices.dim() in (1, 2), op, "indices.dim()", "must be 1 or 2", indices.dim())
    if indices.dim() == 2:
        check(indices.shape[1] == 2, op, "indices.shape[1]", "must be 2 for 2-D indices (batch row, start offset)",
              indices.shape[1])
    check(-rank <= axis < rank, op, "axis", f"must be in [-{rank}, {rank})", axis)
    ax = axis % rank
    check(ax != 0, op, "axis", "must not be the batch dim 0", axis)
    check(updates.dim() == rank, op, "updates.dim()", f"must equal self.dim() ({rank})", updates.dim())
    check(updates.shape[0] == indices.shape[0], op, "updates.shape[0]",
          f"must equal indices.shape[0] ({indices.shape[0]})", updates.shape[0])
    check(indices.shape[0] <= self.shape[0], op, "indices.shape[0]",
          f"must be <= self.shape[0] ({self.shape[0]})", indices.shape[0])
    for d in range(1, rank):
        if d == ax:
            check(updates.shape[d] <= self.shape[d], op, f"updates.shape[{d}] (axis)",
                  f"must be <= self.shape[{d}] ({self.shape[d]})", updates.shape[d])
        else:
            check(updates.shape[d] == self.shape[d], op, f"updates.shape[{d}]",
                  f"must equal self.shape[{d}] ({self.shape[d]})", updates.shape[d])
    return _Plan(ax)


# The reference kernels' validation: a decode step writes every layer's cache with one call form.
_validated = remembered_per_metadata(_validate)


def _scatter_into(op: str, out: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> None:
    """Write ``updates`` into ``out`` in place (validation of the data included)."""
    ax = _validated(op, out, indices, updates, axis).axis
    n, width, extent = indices.shape[0], updates.shape[ax], out.shape[ax]
    if n == 0 or width == 0:
        return
    if indices.dim() == 1:
        # One host read (n <= self.shape[0], the batch): the range rule and the shape.
        offsets = indices.tolist()
        low, high = min(offsets), max(offsets)
        if low == high and 0 <= low and low + width <= extent:
            # Every row at one offset (a decode step, or a batch prefilled together): one slice copy.
            target = out.narrow(ax, low, width)
            (target if n == out.shape[0] else target.narrow(0, 0, n)).copy_(updates)
            return
    idx = indices.to(torch.int64)
    if idx.dim() == 1:
        rows, starts = torch.arange(n, device=out.device), idx
    else:
        rows, starts = idx[:, 0], idx[:, 1]
        bad = (rows < 0) | (rows >= out.shape[0])
        if bool(bad.any()):
            fail(op, "indices[:, 0]", f"must be batch rows in [0, {out.shape[0]})", rows[bad].tolist())
    bad = (starts < 0) | (starts + width > extent)
    if bool(bad.any()):
        fail(op, "indices (start offsets)",
             f"must satisfy 0 <= index and index + updates.shape[{ax}] ({width}) <= self.shape[{ax}] ({extent})",
             starts[bad].tolist())
    positions = starts[:, None] + torch.arange(width, device=out.device)[None, :]  # (n, width)
    target = out.movedim(ax, 1)  # a view: writes go to `out`
    target[rows[:, None].expand(n, width), positions] = updates.movedim(ax, 1)


# ---------------------------------------------------------------------------- scatter_update

SCATTER_UPDATE = define("scatter_update", "(Tensor self, Tensor indices, Tensor updates, int axis) -> Tensor")


@register_fake(SCATTER_UPDATE)
def _scatter_update_fake(self, indices, updates, axis):
    _validate("scatter_update", self, indices, updates, axis)
    return torch.empty_like(self)


def _scatter_update_ref(self, indices, updates, axis):
    out = self.clone()
    _scatter_into("scatter_update", out, indices, updates, axis)
    return out


register_reference(SCATTER_UPDATE, _scatter_update_ref)
register_npu(SCATTER_UPDATE)


scatter_update = dropin(SCATTER_UPDATE, __name__, """\
Returns a copy of ``self`` with ``updates`` written at the start offsets ``indices``
along ``axis``; ``self`` is left untouched. With 1-D ``indices`` (n,):
``out[i, ..., indices[i] + k, ...] = updates[i, ..., k, ...]``; with 2-D ``indices``
(n, 2): ``out[indices[i, 0], ..., indices[i, 1] + k, ...] = updates[i, ..., k, ...]``
(k < updates.shape[axis], the position along ``axis``). ``self`` is 2-D to 8-D;
``updates`` has its rank, updates.shape[0] == indices.shape[0] <= self.shape[0],
and its dims other than 0 and ``axis`` equal those of ``self``. ``axis`` may be
negative but not the batch dim 0. Dtypes: int8, fp16, fp32, bf16, int32 (and
float64 on the reference kernel); indices int32/int64.
Raises NpuAttnArgumentError when a shape/dtype rule or (reference kernel) an
index range does not hold.""")


# ---------------------------------------------------------------------------- scatter_update_

# Tagged in-place: AOT functionalizes it into the functional scatter_update (the op of the same
# name without the underscore), so it compiles like torch's own in-place ops.
SCATTER_UPDATE_ = define("scatter_update_",
                         "(Tensor(a!) self, Tensor indices, Tensor updates, int axis) -> Tensor(a!)",
                         tags=(torch.Tag.inplace,))


@register_fake(SCATTER_UPDATE_)
def _scatter_update__fake(self, indices, updates, axis):
    _validate("scatter_update_", self, indices, updates, axis)
    return self


def _scatter_update__ref(self, indices, updates, axis):
    _scatter_into("scatter_update_", self, indices, updates, axis)
    return self


register_reference(SCATTER_UPDATE_, _scatter_update__ref)
register_npu(SCATTER_UPDATE_)


scatter_update_ = dropin(SCATTER_UPDATE_, __name__, """\
In-place :func:`scatter_update` (same rules): writes ``updates`` into ``self``
(same storage) and returns ``self``. Not functionalizable by AOT autograd (its return aliases a
mutated input); use ``self.copy_(scatter_update(...))`` under torch.compile.""")



# ---------------------------------------------------------------------------- scatter_update_into (internal)

# scatter_update_ returning nothing. Not a torch_npu op and never in a GE graph: the
# Inductor executor hands its in-place cache writes to Inductor in this form, which
# it runs in place as a mutating extern kernel. scatter_update_ itself comes out as
# wrong cache contents there, even functionalized into auto_functionalized_v2:
# Inductor (torch 2.13) takes its returned alias of `self` for a new buffer and
# reuses the written cache's storage for another buffer while the cache is live
# (measured on a StaticCache prefill, whose caches the graph creates).
SCATTER_UPDATE_INTO = define("scatter_update_into",
                             "(Tensor(a!) self, Tensor indices, Tensor updates, int axis) -> ()")


@register_fake(SCATTER_UPDATE_INTO)
def _scatter_update_into_fake(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> None:
    _validate("scatter_update_into", self, indices, updates, axis)


def _scatter_update_into_ref(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> None:
    _scatter_into("scatter_update_into", self, indices, updates, axis)


def _scatter_update_into_npu(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> None:
    import torch_npu  # noqa: F401

    torch.ops.npu.scatter_update_(self, indices, updates, axis)


register_reference(SCATTER_UPDATE_INTO, _scatter_update_into_ref)
register_npu(SCATTER_UPDATE_INTO, _scatter_update_into_npu)
