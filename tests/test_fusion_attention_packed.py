"""npu_fusion_attention_packed / npu_fusion_attention_packed_grad (kernels/fusion_attention_packed.py).

The reference against an independent float64 implementation written here (per
sequence, plain causal softmax attention for packed masks; per batch and head, masked
softmax attention for any other mask), forward, softmax statistics and gradients
(float64 autograd); torch.library.opcheck; and one test per argument constraint,
eagerly and under FakeTensorMode.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from npu_attn_graph.kernels import NpuAttnArgumentError
from npu_attn_graph.kernels.fusion_attention_packed import packed_segments

PACKED = torch.ops.npu_attn.npu_fusion_attention_packed.default
PACKED_GRAD = torch.ops.npu_attn.npu_fusion_attention_packed_grad.default
TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
              "test_aot_dispatch_dynamic")
RTOL, ATOL = 1e-5, 1e-6
# float64 inputs: the softmax statistics are float32 (as on the NPU) and the backward
# recomputes the probabilities from them, so gradients are good to about 1e-7 relative to their largest entries.
DTYPES = [(torch.float64, 1e-6, 1e-6), (torch.float32, RTOL, ATOL)]


def packed_mask(batch_lengths: list[list[int]]) -> torch.Tensor:
    """(B, 1, S, S), True = masked out: causal within each sequence, nothing across."""
    masks = []
    for lengths in batch_lengths:
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        seq = len(ids)
        keep = (ids[:, None] == ids[None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
        masks.append(~keep)
    return torch.stack(masks).unsqueeze(1)


def random_mask(batch: int, seq: int, seed: int) -> torch.Tensor:
    """(B, 1, S, S) random, every row keeping at least its diagonal key."""
    mask = torch.rand(batch, 1, seq, seq, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask &= ~torch.eye(seq, dtype=torch.bool)
    return mask


def _leaves(batch, heads, kv_heads, seq, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, seq, dim, generator=g, dtype=torch.float64) for _ in range(2))
    dy = torch.randn(batch, heads, seq, dim, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], dy.to(dtype)


# ----------------------------------------------------------------------------
# The oracle (float64, written independently of the kernels)
# ----------------------------------------------------------------------------


def oracle_packed(q, k, v, batch_lengths, scale):
    """Per sequence: plain causal softmax attention over its own tokens. Returns
    (out, row max, row sum), the statistics of the scaled scores as (B, N, S)."""
    heads = q.shape[1]
    group = heads // k.shape[1]
    outs, maxes, sums = [], [], []
    for b, lengths in enumerate(batch_lengths):
        per_head = []
        for h in range(heads):
            pieces, start = [], 0
            for n in lengths:
                qs = q[b, h, start:start + n].double()
                ks, vs = k[b, h // group, start:start + n].double(), v[b, h // group, start:start + n].double()
                scores = (scale * qs @ ks.T).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
                m = scores.max(-1).values
                e = (scores - m[:, None]).exp()
                pieces.append(((e / e.sum(-1, keepdim=True)) @ vs, m, e.sum(-1)))
                start += n
            per_head.append([torch.cat(parts) for parts in zip(*pieces)])
        outs.append(torch.stack([o for o, _, _ in per_head]))
        maxes.append(torch.stack([m for _, m, _ in per_head]))
        sums.append(torch.stack([s for _, _, s in per_head]))
    return torch.stack(outs), torch.stack(maxes), torch.stack(sums)


def oracle_masked(q, k, v, mask, scale):
    """Per batch and head: softmax attention with the mask (True = masked out)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = scale * q.double() @ kk.transpose(-2, -1)
    scores = scores.masked_fill(mask.expand_as(scores), float("-inf"))
    m = scores.max(-1).values
    e = (scores - m[..., None]).exp()
    return (e / e.sum(-1, keepdim=True)) @ vv, m, e.sum(-1)


def _check_against(oracle, q, k, v, dy, mask, scale, heads, rtol, atol):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, softmax_max, softmax_sum = PACKED(*leaves, mask, heads, scale)
    grads = torch.autograd.grad(out, leaves, dy)
    double = [t.double().requires_grad_() for t in (q, k, v)]
    want, want_max, want_sum = oracle(*double)
    want_grads = torch.autograd.grad(want, double, dy.double())
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
    # The statistics are of the scaled scores, repeated over a last axis of 8.
    assert softmax_max.shape == (*q.shape[:3], 8) and softmax_max.dtype == torch.float32
    torch.testing.assert_close(softmax_max.double(), want_max[..., None].expand(*want_max.shape, 8),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(softmax_sum.double(), want_sum[..., None].expand(*want_sum.shape, 8),
                               rtol=1e-5, atol=1e-5)
    for name, got, expected in zip("qkv", grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")


PACKED_CASES = {
    "one-batch": (1, 4, 4, [[3, 5, 4]]),
    "two-batches-gqa": (2, 4, 2, [[3, 5], [8]]),
    "single-tokens-mqa": (1, 4, 1, [[1, 2, 1, 3, 1]]),
    "one-sequence": (2, 2, 2, [[6], [6]]),
}


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("name", list(PACKED_CASES))
def test_packed_masks_equal_per_sequence_causal_attention(name, dtype, rtol, atol):
    batch, heads, kv_heads, batch_lengths = PACKED_CASES[name]
    seq = sum(batch_lengths[0])
    (q, k, v), dy = _leaves(batch, heads, kv_heads, seq, 16, dtype, seed=len(name))
    mask = packed_mask(batch_lengths)
    flat = [n for lengths in batch_lengths for n in lengths]
    # The op computes this one through TND with the cumulative lengths over the B * S tokens.
    assert packed_segments(mask, batch, seq) == torch.tensor(flat).cumsum(0).tolist()
    _check_against(lambda *t: oracle_packed(*t, batch_lengths, 0.3), q, k, v, dy, mask, 0.3, heads, rtol, atol)


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_other_masks_equal_masked_attention(dtype, rtol, atol):
    """Not block-diagonal causal: the op computes the BNSD call with the mask."""
    (q, k, v), dy = _leaves(2, 4, 2, 7, 8, dtype, seed=3)
    for mask in (random_mask(2, 7, seed=5), random_mask(1, 7, seed=6)[0, 0]):
        assert packed_segments(mask, 2, 7) is None
        _check_against(lambda *t: oracle_masked(*t, mask, 0.25), q, k, v, dy, mask, 0.25, 4, rtol, atol)


# ----------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------


def _opcheck_cases():
    yield "packed", packed_mask([[3, 5], [2, 6]]), 4, 2
    yield "packed-shared", packed_mask([[2, 2, 4]]), 4, 4
    yield "random", random_mask(2, 8, seed=1), 4, 1
    yield "2-d", random_mask(1, 8, seed=2)[0, 0], 2, 2


OPCHECK_CASES = list(_opcheck_cases())


@pytest.mark.parametrize("name,mask,heads,kv_heads", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(name, mask, heads, kv_heads):
    (q, k, v), dy = _leaves(2, heads, kv_heads, 8, 16, seed=9)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(PACKED, (*leaves, mask, heads, 0.25), test_utils=TEST_UTILS)
    out, softmax_max, softmax_sum = PACKED(q, k, v, mask, heads, 0.25)
    torch.library.opcheck(PACKED_GRAD, (q, k, v, dy, mask, out, softmax_max,
                                        softmax_sum, heads, 0.25), test_utils=TEST_UTILS)


# ----------------------------------------------------------------------------
# Argument checks: the op, the argument, the rule and the value
# ----------------------------------------------------------------------------


def _forward_args(**override):
    (q, k, v), _ = _leaves(2, 4, 2, 6, 8, seed=4)
    args = dict(query=q, key=k, value=v, atten_mask=packed_mask([[2, 4], [6]]), head_num=4, scale=0.5)
    args.update(override)
    return args


def _grad_args(**override):
    args = _forward_args()
    out, softmax_max, softmax_sum = PACKED(*args.values())
    grad = dict(query=args["query"], key=args["key"], value=args["value"], dy=torch.randn_like(out),
                atten_mask=args["atten_mask"], attention_in=out, softmax_max=softmax_max, softmax_sum=softmax_sum,
                head_num=4, scale=0.5)
    grad.update(override)
    return grad


FORWARD_ERRORS = [
    (dict(query=torch.randn(2, 6, 32)), "query.dim() must be 4 for input_layout BNSD, got 3"),
    (dict(head_num=2), "head_num must equal the query head count 4, got 2"),
    (dict(key=torch.randn(2, 3, 6, 8), value=torch.randn(2, 3, 6, 8)),
     "head_num must be a multiple of the key/value head count 3, got 4"),
    (dict(key=torch.randn(1, 2, 6, 8), value=torch.randn(1, 2, 6, 8)), "key batch B must equal the query batch 2"),
    (dict(value=torch.randn(2, 2, 5, 8)), "value batch/sequence must equal key's (2, 6), got (2, 5)"),
    (dict(key=torch.randn(2, 2, 6, 4)), "key head dim D must equal the query head dim 8, got 4"),
    (dict(query=torch.zeros(2, 4, 6, 8, dtype=torch.int32)), "query.dtype must be one of"),
    (dict(atten_mask=torch.zeros(2, 1, 6, 6)), "atten_mask.dtype must be one of [torch.bool, torch.uint8]"),
    (dict(atten_mask=torch.zeros(2, 1, 6, 5, dtype=torch.bool)), "atten_mask must be (Sq, Skv), (1, 1, Sq, Skv)"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("override,message", FORWARD_ERRORS, ids=[m.split(" ")[0] for _, m in FORWARD_ERRORS])
def test_forward_constraints(override, message, fake):
    args = _forward_args(**override)
    _raises(PACKED, args, "npu_fusion_attention_packed", message, fake)


GRAD_ERRORS = [
    (dict(dy=torch.randn(2, 4, 6, 4)), "dy.shape must be the attention output's shape (2, 4, 6, 8), got (2, 4, 6, 4)"),
    (dict(attention_in=torch.randn(2, 4, 5, 8)), "attention_in.shape must be the attention output's shape"),
    (dict(dy=torch.randn(2, 4, 6, 8, dtype=torch.float64)), "dy.dtype must equal query.dtype (torch.float32)"),
    (dict(softmax_max=torch.zeros(2, 4, 6, 1)), "softmax_max.shape must be the forward's (B, N, S, 8) = (2, 4, 6, 8)"),
    (dict(softmax_sum=torch.zeros(2, 4, 6, 8, dtype=torch.float16)), "softmax_sum.dtype must be torch.float32"),
    (dict(atten_mask=torch.zeros(6, 6)), "atten_mask.dtype must be one of"),
    (dict(head_num=8), "head_num must equal the query head count 4, got 8"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("override,message", GRAD_ERRORS, ids=[m.split(" ")[0] for _, m in GRAD_ERRORS])
def test_grad_constraints(override, message, fake):
    args = _grad_args(**override)
    _raises(PACKED_GRAD, args, "npu_fusion_attention_packed_grad", message, fake)


def _raises(op, args, name, message, fake):
    pattern = "^" + re.escape(f"{name}: {message}")
    if not fake:
        with pytest.raises(NpuAttnArgumentError, match=pattern):
            op(*args.values())
        return
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args.values()]
        with pytest.raises(NpuAttnArgumentError, match=pattern):
            op(*fakes)
