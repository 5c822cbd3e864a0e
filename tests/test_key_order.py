"""passes/_key_order: which uses of a key-ordered window may read it permuted.

The claim the analysis makes, tested directly: when it accepts a region, feeding
the windows permuted along their key axis and permuting the foreign operands it
names the same way leaves every output unchanged (any permutation, not only the
ring's). Programs are traced to ATen with make_fx, as the passes see them.
Where the order can matter (a sink column concatenated along the key axis, the
scores returned, a slice of the keys, a cumulative sum), it refuses and says
which op.

Tolerance: float32, rtol 1e-5 / atol 1e-6 (the softmax sums its keys in another
order)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from npu_attn_graph.passes._key_order import KeyOrderUnproven, key_order_region

B, N, NKV, W, D = 2, 4, 2, 6, 8
aten = torch.ops.aten


def _repeat_kv(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, N // h, s, d).reshape(b, N, s, d)


def softcap_additive(q, k, v, mask):  # Gemma2's eager attention
    scores = torch.matmul(q, _repeat_kv(k).transpose(2, 3)) * D ** -0.5
    scores = torch.tanh(scores / 50.0) * 50.0 + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32), _repeat_kv(v))


def manual_softmax_bool_mask(q, k, v, mask):
    scores = (q @ _repeat_kv(k).transpose(-1, -2)).masked_fill(mask < -1, float("-inf"))
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ _repeat_kv(v)


def where_mask_and_key_bias(q, k, v, mask):
    bias = torch.linspace(-1, 1, W)  # one value per key: foreign, moved with the keys
    scores = torch.where(mask[:1] > -1, q @ _repeat_kv(k).transpose(-1, -2), -1e9) + bias
    return torch.softmax(scores, -1) @ _repeat_kv(v)


def einsum_spelling(q, k, v, mask):
    kk, vv = _repeat_kv(k), _repeat_kv(v)
    probs = torch.softmax(torch.einsum("bnqd,bnkd->bnqk", q, kk) + mask, -1)
    return torch.einsum("bnqk,bnkd->bnqd", probs, vv)


def sink_column(q, k, v, mask):
    scores = q @ _repeat_kv(k).transpose(-1, -2) + mask
    sinks = torch.zeros(B, N, 1, 1)
    probs = torch.softmax(torch.cat([scores, sinks], -1), -1)[..., :-1]
    return probs @ _repeat_kv(v)


def scores_returned(q, k, v, mask):
    scores = q @ _repeat_kv(k).transpose(-1, -2) + mask
    return torch.softmax(scores, -1) @ _repeat_kv(v), scores


def sliced_keys(q, k, v, mask):
    scores = q @ _repeat_kv(k[:, :, 1:]).transpose(-1, -2)
    return torch.softmax(scores, -1) @ _repeat_kv(v[:, :, 1:])


def cumulative(q, k, v, mask):
    scores = q @ _repeat_kv(k).transpose(-1, -2)
    return torch.softmax(scores.cumsum(-1), -1) @ _repeat_kv(v)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((B, N, 1, D), (B, NKV, W, D), (B, NKV, W, D)))
    mask = torch.zeros(B, 1, 1, W)
    mask[1, ..., :2] = torch.finfo(torch.float32).min  # row 1's first keys are padding
    return q, k, v, mask


def _region(fn):
    gm = make_fx(fn, tracing_mode="fake")(*_inputs())
    q, k, v, mask = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return gm, key_order_region(gm.graph, {k: (2, "ring"), v: (2, "ring")}, skip=set())


@pytest.mark.parametrize("fn", [softcap_additive, manual_softmax_bool_mask, where_mask_and_key_bias, einsum_spelling])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_accepted_region_gives_the_same_result_with_the_keys_permuted(fn, seed):
    gm, plan = _region(fn)
    assert plan.foreign, "the mask or bias meets the key axis and must be named"
    perm = torch.randperm(W, generator=torch.Generator().manual_seed(100 + seed))
    gm.register_buffer("key_perm", perm)
    for user, operand, dim, _ in plan.foreign:
        with gm.graph.inserting_before(user):
            index = gm.graph.get_attr("key_perm")
            user.replace_input_with(operand, gm.graph.call_function(aten.index_select.default, (operand, dim, index)))
    gm.recompile()
    q, k, v, mask = _inputs(seed)
    expected = fn(q, k, v, mask)
    actual = gm(q, k[:, :, perm], v[:, :, perm], mask)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # and the permutation matters: without moving the mask, row 1 attends to other keys
    plain = make_fx(fn, tracing_mode="fake")(*_inputs())
    assert not torch.allclose(plain(q, k[:, :, perm], v[:, :, perm], mask)[1], expected[1], atol=1e-3)


@pytest.mark.parametrize("fn, op", [(sink_column, "cat"), (scores_returned, "output"),
                                    (sliced_keys, "slice"), (cumulative, "cumsum")])
def test_a_use_that_may_depend_on_the_order_is_refused_by_name(fn, op):
    with pytest.raises(KeyOrderUnproven, match=op):
        _region(fn)


def test_windows_in_two_orders_meeting_are_refused():
    gm = make_fx(softcap_additive, tracing_mode="fake")(*_inputs())
    q, k, v, mask = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with pytest.raises(KeyOrderUnproven, match="another window's order|different orders"):
        key_order_region(gm.graph, {k: (2, "layer 0"), v: (2, "layer 1")}, skip=set())
