"""Property-based: random sliding-window programs, compiled in both window modes, equal eager.

Each program drives transformers' own StaticSlidingWindowLayer (the real cache code: lazy
allocation, the write branch, roll + index_put once full, the cat branch for several
tokens) through a random sequence of chunks: a prompt of 1..2W tokens, then single
tokens and chunks of 2..W+1, for three windows and more. Around it, a hand-written
model step reads the returned window with a sliding causal mask built from the token
count (as transformers' mask functions do), left padding per batch row, GQA, and one of
three attention spellings: SDPA, eager matmul-softmax-matmul, and Gemma2's softcap
(which no fused op takes: it stays unfused and, in ring mode, reads the ring through
passes/_key_order's proof or a gather).

Compiled with `sliding_window_cache="shift"`, `"ring"` and `"auto"` (fullgraph; dynamo may not fall
back to eager, which would write the ring in eager order), every step's output and the
cache after it equal eager's: the ring's cache read in eager order with
window_in_eager_order. Drawn from a fixed (derandomized) Hypothesis stream.

Tolerance: float32, rtol 1e-4 / atol 1e-5 (fused attention sums its keys in another
order; the ring permutes them)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from npu_attn_graph import Report, ring_layout, window_in_eager_order

transformers = pytest.importorskip("transformers")
# the switches of tests/test_fuzz.py: NPU_ATTN_FUZZ_SCALE multiplies the budget, NPU_ATTN_FUZZ_SHRINK=0 reports
# the first failing program as drawn
EXAMPLES = max(1, round(8 * float(os.environ.get("NPU_ATTN_FUZZ_SCALE", "1"))))
PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("NPU_ATTN_FUZZ_SHRINK", "1") != "0" else [])
MIN = torch.finfo(torch.float32).min


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def _step(layer, q, k, v, pad, window: int, attention: str):
    """One model step over transformers' sliding-window layer: write, then attend."""
    seen, n = layer.cumulative_length_int, k.shape[-2]
    keys, values = layer.update(k, v)
    length = keys.shape[-2]
    # absolute position of each returned key slot: the write branch returns the window
    # with slot j = position j; the others the last `length` positions
    offset = 0 if seen + n <= window else seen + n - length
    key_pos = torch.arange(length) + offset
    query_pos = torch.arange(n) + seen
    keep = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - window)
    keep = keep[None, None] & (key_pos >= pad[:, None, None, None])
    mask = torch.where(keep, 0.0, MIN)
    group = q.shape[1] // k.shape[1]
    if attention == "sdpa":
        return F.scaled_dot_product_attention(q, _repeat_kv(keys, group), _repeat_kv(values, group), attn_mask=mask)
    scores = q @ _repeat_kv(keys, group).transpose(-1, -2) * q.shape[-1] ** -0.5
    if attention == "softcap":
        scores = torch.tanh(scores / 20.0) * 20.0
    return torch.softmax(scores + mask, dim=-1) @ _repeat_kv(values, group)


@st.composite
def window_programs(draw):
    window = draw(st.integers(2, 5))
    chunks = [draw(st.integers(1, 2 * window))]
    while sum(chunks) < 3 * window + 2:
        chunks.append(draw(st.sampled_from([1, 1, 1, 2, window, window + 1])))
    nkv = draw(st.sampled_from([1, 2]))
    return dict(window=window, chunks=chunks, batch=draw(st.integers(1, 2)), nkv=nkv,
                group=draw(st.sampled_from([1, 2])), dim=draw(st.sampled_from([8, 16])),
                pad=draw(st.integers(0, 3)), attention=draw(st.sampled_from(["sdpa", "eager", "softcap"])),
                seed=draw(st.integers(0, 2**16)))


def _run(p: dict, step) -> tuple[list[torch.Tensor], object]:
    g = torch.Generator().manual_seed(p["seed"])
    b, nkv, d = p["batch"], p["nkv"], p["dim"]
    layer = transformers.cache_utils.StaticSlidingWindowLayer(max_cache_len=64, sliding_window=p["window"])
    pad = torch.tensor([p["pad"] if i == b - 1 else 0 for i in range(b)])  # left padding on the last row
    outputs = []
    for n in p["chunks"]:
        q = torch.randn(b, nkv * p["group"], n, d, generator=g)
        k, v = torch.randn(b, nkv, n, d, generator=g), torch.randn(b, nkv, n, d, generator=g)
        outputs.append(step(layer, q, k, v, pad, p["window"], p["attention"]))
    return outputs, layer


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow])
@given(program=window_programs(), mode=st.sampled_from(["shift", "ring", "auto"]))
def test_sliding_window_programs_equal_eager(program, mode):
    torch._dynamo.reset()
    expected, eager_layer = _run(program, _step)
    report = Report()
    compiled = torch.compile(_step, backend="npu_attn", fullgraph=True,
                             options={"sliding_window_cache": mode, "report": report})
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        actual, layer = _run(program, compiled)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {i}: {m}\n{program} {mode}")
    keys, values = layer.keys, layer.values
    if ring_layout.is_ring(keys):
        keys, values = (window_in_eager_order(x, layer.cumulative_length_int) for x in (keys, values))
    assert ring_layout.is_ring(layer.keys) == (mode == "ring") or mode == "auto"  # the last step's window is full
    torch.testing.assert_close(keys, eager_layer.keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(values, eager_layer.values, rtol=1e-4, atol=1e-5)
    writes = [s for s in report.sites if s.kind == "kv_update"]
    assert writes and all(s.rewritten for s in writes), report.table()
