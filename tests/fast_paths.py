"""What the reference kernels' fast-path tests share (test_paged_decode_fast.py,
test_dense_decode_fast.py, test_varlen_prefill_fast.py): forcing a call down the general
path, reading which path a call took, and the tolerances against the fp64 oracle.

Each fast-path module (kernels/_paged_decode.py, _dense_decode.py, _varlen_prefill.py)
has ``eligible(call, g)`` and a ``PATHS`` counter of the calls it saw ("fast" / "general").
"""

from __future__ import annotations

from types import ModuleType

import torch

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Against the fp64 oracle: fp32 rounding of the same sums; fp16/bf16 inputs are rounded
# alike for both, the kernel computes in fp32 and rounds once at the end: twice the
# output dtype's eps (as tests/test_attention_ops.py).
TOL = {FP32: (1e-5, 1e-6), FP16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}


def general(path: ModuleType, fn, *args, **kwargs):
    """fn(...) with `path`'s fast path refused: the general (chunked) path computes it."""
    eligible = path.eligible
    path.eligible = lambda call, g: False
    try:
        return fn(*args, **kwargs)
    finally:
        path.eligible = eligible


def taken(path: ModuleType, fn, *args, **kwargs):
    """fn(...) and the way ("fast" / "general") its one call counted by `path` went."""
    before = dict(path.PATHS)
    out = fn(*args, **kwargs)
    paths = [p for p in ("fast", "general") if path.PATHS[p] != before.get(p, 0)]
    assert len(paths) == 1, paths
    return out, paths[0]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOL[actual.dtype]
    torch.testing.assert_close(actual.to(FP32), expected.to(FP32), rtol=rtol, atol=atol)


def fast_equals_oracle_and_general(path: ModuleType, fn, oracle, *args, **kwargs) -> torch.Tensor:
    """fn(*args, **kwargs), an op returning one tensor shaped and typed as its query args[0]:
    it takes `path`'s fast path, matches the oracle within TOL and the general path within
    1e-6 (fp32; fp16/bf16 within TOL: the two round differently once)."""
    out, way = taken(path, fn, *args, **kwargs)
    assert way == "fast"
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert_matches(out, oracle(*args, **kwargs))
    slow, way = taken(path, general, path, fn, *args, **kwargs)
    assert way == "general"
    if out.dtype == FP32:
        torch.testing.assert_close(out, slow, rtol=1e-6, atol=1e-6)
    else:
        assert_matches(out, slow)
    return out
