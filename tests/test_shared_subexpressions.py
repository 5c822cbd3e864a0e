"""shared_subexpressions: the identical pure nodes the rules built for several sites
become one; nothing whose value could differ is merged.

Graphs are traced with make_fx; the nodes a rule would have inserted are marked as
Rewrite.call marks them (meta INSERTED). Each rewritten graph runs against the
original on the same inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from npu_attn_graph.passes._context import PassContext
from npu_attn_graph.passes._fx import INSERTED
from npu_attn_graph.passes.shared_subexpressions import shared_subexpressions
from npu_attn_graph.report import Report

aten = torch.ops.aten


def _traced(fn, *inputs):
    gm = make_fx(fn)(*inputs)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.meta[INSERTED] = True
    return gm


def _merged(gm) -> int:
    return shared_subexpressions(gm, Report(), PassContext("inference"))


def _calls(gm, target) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=target))


def test_every_layers_copy_of_a_mask_chain_becomes_one_and_the_graph_computes_the_same():
    def layers(mask, x):
        out = x
        for _ in range(4):  # each layer: the rule's own copy of mask -> ~mask[None, None] expanded
            npu_mask = mask.unsqueeze(0).unsqueeze(0).logical_not().expand(2, 1, 8, 8)
            out = out.masked_fill(npu_mask, 0.0) + 1
        return out

    mask, x = torch.rand(8, 8) > 0.5, torch.randn(2, 1, 8, 8)
    gm = _traced(layers, mask, x)
    original = copy.deepcopy(gm)
    assert _calls(gm, aten.logical_not.default) == 4
    assert _merged(gm) == 3 * 4  # unsqueeze, unsqueeze, logical_not, expand of layers 2-4
    assert _calls(gm, aten.logical_not.default) == 1
    assert _calls(gm, aten.masked_fill.Scalar) == 4  # the per-layer work stays
    torch.testing.assert_close(gm(mask, x), original(mask, x), rtol=0, atol=0)


def test_a_read_of_a_tensor_written_in_place_is_never_merged():
    def step(cache, row):
        before = cache.sum(0)  # read, then the write, then the same read
        cache.index_copy_(0, torch.tensor([1]), row)
        after = cache.sum(0)
        view_before, view_after = cache[0], cache[0]
        return before, after, view_before + view_after

    cache, row = torch.zeros(3, 4), torch.ones(1, 4)
    gm = _traced(step, cache.clone(), row)
    original = copy.deepcopy(gm)
    assert _calls(gm, aten.sum.dim_IntList) == 2
    _merged(gm)
    assert _calls(gm, aten.sum.dim_IntList) == 2
    a, b = cache.clone(), cache.clone()
    for got, want in zip(gm(a, row), original(b, row)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(gm(cache.clone(), row)[0], gm(cache.clone(), row)[1])


def test_scalars_of_another_type_or_sign_are_different_arguments():
    def scaled(x, i):
        return x * 2, x * 2.0, x * 0.0, x * -0.0, i * 2, i * 2.0

    x, i = torch.tensor([-1.0, 1.0]), torch.tensor([3])
    gm = _traced(scaled, x, i)
    original = copy.deepcopy(gm)
    assert _merged(gm) == 0
    for got, want in zip(gm(x, i), original(x, i)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert torch.equal(torch.signbit(got.float()), torch.signbit(want.float()))


def test_random_and_uninitialised_results_are_never_merged():
    def draws(x):
        return torch.rand_like(x), torch.rand_like(x), torch.empty_like(x).fill_(1), torch.empty_like(x).fill_(2)

    gm = _traced(draws, torch.zeros(4))
    assert _merged(gm) == 0
    first, second, one, two = gm(torch.zeros(4))
    assert not torch.equal(first, second)
    assert torch.equal(one, torch.ones(4)) and torch.equal(two, torch.full((4,), 2.0))


def test_the_models_own_nodes_stay_as_written_except_views():
    def model(x):
        return x.exp() + x.exp(), x.t() + x.t()

    gm = make_fx(model)(torch.randn(3, 3))  # nothing marked: the model's own graph
    assert _merged(gm) == 1  # the second x.t(), a view; both exp stay
    assert _calls(gm, aten.exp.default) == 2 and _calls(gm, aten.t.default) == 1
    x = torch.randn(3, 3)
    for got, want in zip(gm(x), model(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("executor", ["eager", "inductor"])
def test_mini_vllm_prefill_reads_its_mask_once_per_call(executor):
    """Every layer's packed prefill gets the one mask node, so the run-time plan (the
    mask's segments) is worked out once per prefill call, not once per layer."""
    from examples.mini_vllm.model import ModelConfig, PagedCausalLM
    from npu_attn_graph.kernels import prompt_attention_packed

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=16, rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=False)
    model = PagedCausalLM(cfg, 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)).eval()
    caches = [torch.zeros(64, 4, 2, 16) for _ in range(2 * cfg.num_layers)]

    def batch(lengths):  # 256 tokens in all
        positions = torch.cat([torch.arange(n) for n in lengths])
        seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        return torch.randint(0, 64, (256,)), positions, seq_ids, torch.arange(256)

    compiled = torch.compile(model.prefill, backend="npu_attn", fullgraph=True, options={"executor": executor})
    plans = []
    real_plan = prompt_attention_packed.packed_plan

    def counted(*args):
        plans.append(args)
        return real_plan(*args)

    with torch.no_grad():
        compiled(*batch([100, 60, 96]), [c.clone() for c in caches])  # compiles
        inputs = batch([50, 110, 96])  # another packing: its own plan
        expected = model.prefill(*inputs, [c.clone() for c in caches])
        prompt_attention_packed.packed_plan = counted
        try:
            got = compiled(*inputs, [c.clone() for c in caches])
        finally:
            prompt_attention_packed.packed_plan = real_plan
    assert prompt_attention_packed.PATHS["tnd"] > 0
    assert len(plans) == 1, f"{len(plans)} plans for {cfg.num_layers} layers"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32: rounding only
