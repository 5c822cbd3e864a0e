"""``npu_scatter_nd_update`` / ``npu_scatter_nd_update_``: tf.scatter_nd_update on the NPU.

Schemas: torch_npu 2.13.0's (namespace ``npu_attn``), each written once, in its ``define``
call below; the drop-in functions' docstrings show them.

Semantics: with a = indices.shape[-1] (1 <= a <= self.dim()),
``out[tuple(indices[p])] = updates[p]`` for every prefix position p of
``indices.shape[:-1]``, each write covering the slice ``self.shape[a:]``; so
``updates.shape == indices.shape[:-1] + self.shape[a:]``. Example: self (4, 5, 6),
indices (3, 2) -> updates (3, 6). Duplicate indices give an unspecified result.
"""

from __future__ import annotations

import torch

from ._dropin import dropin
from ._library import check, define, fail, register_fake, register_npu, register_reference

__all__ = ["npu_scatter_nd_update", "npu_scatter_nd_update_"]

# fp32, fp16, bool, bf16, int64, int8 are the NPU dtypes; float64 is for CPU tests.
_DTYPES = (torch.float32, torch.float16, torch.bool, torch.bfloat16, torch.int64, torch.int8, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _validate(op: str, self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> int:
    """Shape/dtype rules shared by the fake and reference kernels; returns a = indices.shape[-1]."""
    rank = self.dim()
    check(1 <= rank <= 8, op, "self.dim()", "must be in [1, 8]", rank)
    check(self.dtype in _DTYPES, op, "self.dtype", f"must be one of {list(_DTYPES)}", self.dtype)
    check(updates.dtype == self.dtype, op, "updates.dtype", f"must equal self.dtype ({self.dtype})", updates.dtype)
    check(indices.dtype in _INDEX_DTYPES, op, "indices.dtype", "must be int32 or int64", indices.dtype)
    check(indices.dim() >= 2, op, "indices.dim()", "must be at least 2", indices.dim())
    a = indices.shape[-1]
    check(1 <= a <= rank, op, "indices.shape[-1]", f"must be in [1, self.dim()] = [1, {rank}]", a)
    expected = list(indices.shape[:-1]) + list(self.shape[a:])
    check(list(updates.shape) == expected, op, "updates.shape",
          f"must equal indices.shape[:-1] + self.shape[{a}:] = {expected}", list(updates.shape))
    return a


def _scatter_nd_into(op: str, out: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> None:
    a = _validate(op, out, indices, updates)
    idx = indices.reshape(-1, a).to(torch.int64)
    if idx.shape[0] == 0:
        return
    bounds = torch.tensor(list(out.shape[:a]), dtype=torch.int64, device=idx.device)
    bad = ((idx < 0) | (idx >= bounds)).any(dim=1)
    if bool(bad.any()):
        fail(op, "indices", f"must lie in [0, self.shape[:{a}]) = {list(out.shape[:a])}", idx[bad].tolist())
    out[tuple(idx.unbind(1))] = updates.reshape(-1, *out.shape[a:])


# ---------------------------------------------------------------------------- functional

NPU_SCATTER_ND_UPDATE = define("npu_scatter_nd_update", "(Tensor self, Tensor indices, Tensor updates) -> Tensor")


@register_fake(NPU_SCATTER_ND_UPDATE)
def _fake(self, indices, updates):
    _validate("npu_scatter_nd_update", self, indices, updates)
    return torch.empty_like(self)


def _ref(self, indices, updates):
    out = self.clone()
    _scatter_nd_into("npu_scatter_nd_update", out, indices, updates)
    return out


register_reference(NPU_SCATTER_ND_UPDATE, _ref)
register_npu(NPU_SCATTER_ND_UPDATE)


npu_scatter_nd_update = dropin(NPU_SCATTER_ND_UPDATE, __name__, """\
tf.scatter_nd_update: returns a copy of ``self`` with ``out[tuple(indices[p])] =
updates[p]`` for every position p of indices.shape[:-1]; ``self`` is untouched.
Rules: indices int32/int64, at least 2-D, a = indices.shape[-1] in [1, self.dim()];
updates.shape == indices.shape[:-1] + self.shape[a:]; self 1-D to 8-D, dtype fp32,
fp16, bool, bf16, int64, int8 (float64 on the reference kernel), updates same dtype.
The reference kernel also requires every index in range (the NPU does not check).""")


# ---------------------------------------------------------------------------- in place

# Tagged in-place: AOT functionalizes it into npu_scatter_nd_update.
NPU_SCATTER_ND_UPDATE_ = define("npu_scatter_nd_update_",
                                "(Tensor(a!) self, Tensor indices, Tensor updates) -> Tensor(a!)",
                                tags=(torch.Tag.inplace,))


@register_fake(NPU_SCATTER_ND_UPDATE_)
def _fake_(self, indices, updates):
    _validate("npu_scatter_nd_update_", self, indices, updates)
    return self


def _ref_(self, indices, updates):
    _scatter_nd_into("npu_scatter_nd_update_", self, indices, updates)
    return self


register_reference(NPU_SCATTER_ND_UPDATE_, _ref_)
register_npu(NPU_SCATTER_ND_UPDATE_)


npu_scatter_nd_update_ = dropin(NPU_SCATTER_ND_UPDATE_, __name__, """\
In-place :func:`npu_scatter_nd_update` (same rules): writes into ``self`` (same
storage) and returns ``self``. Not functionalizable by AOT autograd (its return
aliases a mutated input); use ``self.copy_(npu_scatter_nd_update(...))`` under
torch.compile.""")
