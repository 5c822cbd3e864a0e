"""npu_moe_gating_top_k_softmax_v2: its reference kernel, fake, GE converter, and the
moe_router_to_gating rule on transformers' routers (gpt-oss, Qwen3-MoE, Mixtral).

- the reference against the independent fp64 oracle (tests/moe_oracle.py), both modes,
  2-D and 3-D, float32 (rtol 1e-6: one float32 softmax) and half precision (y rounded
  once from float32: rtol 2**-10 for float16, 2**-7 for bfloat16, i.e. one ulp);
- opcheck, the refusals naming argument, rule and value, softmax_result's shapes;
- the GE op read back from the GE protobuf TorchAir builds;
- the rule: original and rewritten graph run on the same inputs (ids exact, weights
  rtol 1e-5 in float32), the forms it leaves alone with their reasons, and gpt-oss as
  one complete GE graph with its routers fused.
"""

from __future__ import annotations

import pytest
import torch

import npu_attn_graph
from npu_attn_graph import NpuAttnArgumentError, ops

import moe_oracle as oracle
from test_moe import _Capture, _fake_call, _targets

GATING = torch.ops.npu_attn.npu_moe_gating_top_k_softmax_v2.default


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------
# Reference kernel
# ----------------------------------------------------------------------------

HALF_RTOL = {torch.float32: 1e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("renorm", [0, 1])
@pytest.mark.parametrize("shape,k", [((7, 8), 2), ((2, 5, 16), 4), ((3, 6), 6), ((4, 3), 1)])
def test_reference_matches_the_oracle(shape, k, renorm, dtype):
    # Distinct logits exact in every dtype (multiples of 1/8 below 2): no ties, whose order
    # the op does not define.
    rows, experts = int(torch.tensor(shape[:-1]).prod()), shape[-1]
    x = torch.stack([torch.randperm(experts, generator=_gen(k + renorm + r)) for r in range(rows)])
    x = ((x.float() - experts / 2) / 8).reshape(shape).to(dtype)
    y, ids, softmax = ops.npu_moe_gating_top_k_softmax_v2(x, k=k, renorm=renorm)
    assert y.dtype == dtype and ids.dtype == torch.int32 and y.shape == ids.shape == (*shape[:-1], k)
    assert softmax.shape == (0,) and softmax.dtype == torch.float32
    want_y, want_ids = oracle.gating_top_k_softmax(x.double().reshape(-1, shape[-1]), k, renorm)
    assert ids.reshape(-1, k).tolist() == want_ids
    torch.testing.assert_close(y.reshape(-1, k).double(), torch.tensor(want_y, dtype=torch.float64),
                               rtol=HALF_RTOL[dtype], atol=0.0)


def test_softmax_result_is_returned_with_renorm_0_only():
    x = torch.randn(2, 3, 8, generator=_gen(1)).half()
    _, _, probs = ops.npu_moe_gating_top_k_softmax_v2(x, k=2, renorm=0, output_softmax=True)
    assert probs.dtype == torch.float32 and probs.shape == x.shape  # torch_npu's meta says (2, 3): its bug
    torch.testing.assert_close(probs, torch.softmax(x.float(), -1))
    _, _, ignored = ops.npu_moe_gating_top_k_softmax_v2(x, k=2, renorm=1, output_softmax=True)
    assert ignored.shape == (0,)


def test_finished_rows_get_num_expert_as_their_ids():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0], [2.0, 0.0, 1.0, 3.0]])
    finished = torch.tensor([False, True])
    y, ids, _ = ops.npu_moe_gating_top_k_softmax_v2(x, k=2, finished=finished, renorm=1)
    assert ids.tolist() == [[1, 2], [4, 4]]
    want = torch.softmax(torch.tensor([3.0, 2.0]), -1)
    torch.testing.assert_close(y, torch.stack([want, want]))  # y as for any row


OPCHECK = [
    pytest.param((torch.randn(5, 8),), dict(k=2, renorm=1), id="renorm1"),
    pytest.param((torch.randn(2, 3, 8),), dict(k=3, renorm=0, output_softmax=True), id="renorm0-softmax-3d"),
    pytest.param((torch.randn(4, 6).half(),), dict(k=1, finished=torch.tensor([True, False, False, True])),
                 id="finished-half"),
]


@pytest.mark.parametrize("args,kwargs", OPCHECK)
def test_opcheck(args, kwargs):
    torch.library.opcheck(GATING, args, kwargs)


REFUSED = [
    ("npu_moe_gating_top_k_softmax_v2: x.dim() must be 2 or 3, got 1",
     lambda: ops.npu_moe_gating_top_k_softmax_v2(torch.randn(8), k=2)),
    ("npu_moe_gating_top_k_softmax_v2: k must be in [1, x.shape[-1]] = [1, 8], got 9",
     lambda: ops.npu_moe_gating_top_k_softmax_v2(torch.randn(3, 8), k=9)),
    ("npu_moe_gating_top_k_softmax_v2: k must be at most 1024, got 1025",
     lambda: ops.npu_moe_gating_top_k_softmax_v2(torch.randn(1, 2048), k=1025)),
    ("npu_moe_gating_top_k_softmax_v2: renorm must be 0 (softmax, then top-k) or 1 (top-k, then softmax), got 2",
     lambda: ops.npu_moe_gating_top_k_softmax_v2(torch.randn(3, 8), k=2, renorm=2)),
    ("npu_moe_gating_top_k_softmax_v2: finished.dtype must be torch.bool, got torch.int64",
     lambda: ops.npu_moe_gating_top_k_softmax_v2(torch.randn(3, 8), k=2, finished=torch.zeros(3, dtype=torch.long))),
    ("npu_moe_gating_top_k_softmax_v2: finished.shape must be x.shape[:-1] = [3], got [3, 1]",
     lambda: ops.npu_moe_gating_top_k_softmax_v2(torch.randn(3, 8), k=2,
                                                 finished=torch.zeros(3, 1, dtype=torch.bool))),
    ("npu_moe_gating_top_k_softmax_v2: x.dtype must be one of",
     lambda: ops.npu_moe_gating_top_k_softmax_v2(torch.randn(3, 8).to(torch.int32), k=2)),
]


@pytest.mark.parametrize("message,call", REFUSED, ids=[m.split(": ")[1].split(" must")[0] + str(i)
                                                       for i, (m, _) in enumerate(REFUSED)])
def test_fake_refuses_with_the_argument_rule_and_value(message, call):
    with pytest.raises(NpuAttnArgumentError) as error:
        _fake_call(call)
    assert str(error.value).startswith(message), str(error.value)


def test_float64_is_for_the_reference_only():
    from npu_attn_graph.kernels._library import npu_rules

    x = torch.randn(3, 8, dtype=torch.float64)
    _fake_call(lambda: ops.npu_moe_gating_top_k_softmax_v2(x, k=2))
    with npu_rules(), pytest.raises(NpuAttnArgumentError, match=r"x.dtype must be one of"):
        _fake_call(lambda: ops.npu_moe_gating_top_k_softmax_v2(x, k=2))


# ----------------------------------------------------------------------------
# GE converter
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("renorm,output_softmax", [(1, False), (0, True)])
def test_ge_moe_gating_top_k_softmax_v2(renorm, output_softmax, tmp_path):
    from test_ge_converters import PLAIN, attr_value, data_index, only_op, producer

    def fn(x):
        return ops.npu_moe_gating_top_k_softmax_v2(x, k=2, renorm=renorm, output_softmax=output_softmax)

    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(fn, torch.randn(6, 8).half(), options=PLAIN, out_dir=tmp_path)
    assert result.single_graph, result.summary()
    graph = result.graphs[0].graph_def
    op = only_op(graph, "MoeGatingTopKSoftmaxV2")
    src, index = producer(graph, op, "x")
    assert (src.type, index, data_index(src)) == ("Data", 0, 0)
    assert producer(graph, op, "finished") is None
    assert (attr_value(op, "k"), attr_value(op, "renorm"), attr_value(op, "output_softmax")) == \
        (2, renorm, output_softmax)
    assert [d.name for d in op.output_desc] == ["y", "expert_idx", "softmax_result"]
    net = [s for s in only_op(graph, "NetOutput").input if not s.endswith(":-1")]
    assert net == [f"{op.name}:0", f"{op.name}:1", f"{op.name}:2"]


# ----------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _router(family: str, dtype=torch.float32, **config):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    if family == "gpt-oss":
        router = GptOssTopKRouter(transformers.GptOssConfig(hidden_size=32, num_local_experts=8,
                                                            num_experts_per_tok=2))
    elif family == "qwen3-moe":
        router = Qwen3MoeTopKRouter(transformers.Qwen3MoeConfig(hidden_size=32, num_experts=8,
                                                                num_experts_per_tok=3, **config))
    else:
        router = MixtralTopKRouter(transformers.MixtralConfig(hidden_size=32, num_local_experts=8,
                                                              num_experts_per_tok=2))
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0.0, 0.5)
    return router.to(dtype).eval()


ROUTERS = [("gpt-oss", {}, "moe:router-top-k-softmax", 1),
           ("qwen3-moe", dict(norm_topk_prob=True), "moe:router-softmax-top-k", 0),
           ("qwen3-moe", dict(norm_topk_prob=False), "moe:router-softmax-top-k", 0),
           ("mixtral", {}, "moe:router-softmax-top-k", 0)]


@pytest.mark.parametrize("target", ["torch", "ge"])
@pytest.mark.parametrize("family,config,pattern,renorm", ROUTERS, ids=[f"{r[0]}-{i}" for i, r in enumerate(ROUTERS)])
def test_rewritten_router_equals_the_original(family, config, pattern, renorm, target):
    router = _router(family, **config)
    hidden = torch.randn(9, 32, generator=_gen(2))
    capture = _Capture(target)
    with torch.no_grad():
        eager = router(hidden)
        out = torch.compile(router, backend=capture.backend(), fullgraph=True)(hidden)
    for a, e in zip(out, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    (expected, actual), = capture.pairs
    for e, a in zip(expected, actual):
        if e.dtype == torch.int64:
            assert torch.equal(a, e)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    (site,) = capture.report.sites
    assert (site.kind, site.pattern, site.fused_op, site.reason) == \
        ("moe", pattern, "npu_moe_gating_top_k_softmax_v2", None), capture.report.table()
    assert site.layout.startswith(f"k={router.top_k}, renorm={renorm}")
    code = _targets(capture.graphs[0])
    assert code.count("npu_attn.npu_moe_gating_top_k_softmax_v2.default") == 1
    assert "aten.topk.default" not in code and "aten._softmax.default" not in code, code


def test_a_bfloat16_qwen_router_takes_the_float32_logits():
    """softmax(logits, dtype=float32): the op runs on the cast logits, so the weights are
    float32 as in eager and the expert choice is the same."""
    router = _router("qwen3-moe", dtype=torch.bfloat16, norm_topk_prob=True)
    hidden = torch.randn(9, 32, generator=_gen(3)).bfloat16()
    capture = _Capture()
    with torch.no_grad():
        eager = router(hidden)
        out = torch.compile(router, backend=capture.backend(), fullgraph=True)(hidden)
    assert torch.equal(out[2], eager[2])
    torch.testing.assert_close(out[1], eager[1], rtol=0, atol=0)  # the same float32 ops, then one rounding
    assert capture.report.sites[0].rewritten, capture.report.table()


def test_probabilities_read_elsewhere_come_from_output_softmax():
    def router(logits):
        probs = torch.softmax(logits, dim=-1)
        top, ids = torch.topk(probs, 2, dim=-1)
        return top, ids, probs.mean(0)  # e.g. a load-balancing statistic

    capture = _Capture()
    logits = torch.randn(6, 8, generator=_gen(4))
    with torch.no_grad():
        eager = router(logits)
        out = torch.compile(router, backend=capture.backend(), fullgraph=True)(logits)
    for a, e in zip(out, eager):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    (site,) = capture.report.sites
    assert site.rewritten and site.layout == "k=2, renorm=0, output_softmax", capture.report.table()


def test_half_probabilities_ranked_by_the_router_are_left_alone():
    def router(logits):
        probs = torch.softmax(logits, dim=-1)
        top, ids = torch.topk(probs, 2, dim=-1)
        return top, ids

    capture = _Capture()
    logits = torch.randn(6, 8, generator=_gen(4)).half()
    with torch.no_grad():
        torch.compile(router, backend=capture.backend(), fullgraph=True)(logits)
    (site,) = capture.report.sites
    assert not site.rewritten and site.reason.startswith(
        "the router ranks torch.float16 probabilities, the op float32 ones"), capture.report.table()
    assert "aten.topk.default" in _targets(capture.graphs[0])


@pytest.mark.parametrize("topk_kwargs", [dict(largest=False), dict(sorted=False), dict(dim=0)])
def test_other_top_k_forms_are_not_routers(topk_kwargs):
    def fn(logits):
        top, ids = torch.topk(logits, 2, **{"dim": -1, **topk_kwargs})
        return torch.softmax(top, dim=-1), ids

    capture = _Capture()
    with torch.no_grad():
        torch.compile(fn, backend=capture.backend(), fullgraph=True)(torch.randn(6, 8, generator=_gen(5)))
    assert not capture.report.sites, capture.report.table()


def test_top_k_logits_read_elsewhere_are_left_alone():
    def fn(logits):
        top, ids = torch.topk(logits, 2, dim=-1)
        return torch.softmax(top, dim=-1), ids, top

    capture = _Capture()
    with torch.no_grad():
        torch.compile(fn, backend=capture.backend(), fullgraph=True)(torch.randn(6, 8, generator=_gen(5)))
    (site,) = capture.report.sites
    assert not site.rewritten and site.reason.startswith("the top-k logits are also read by"), capture.report.table()


def test_a_training_graph_keeps_its_router():
    router = _router("gpt-oss")
    capture = _Capture()
    hidden = torch.randn(5, 32, generator=_gen(6))
    out = torch.compile(router, backend=capture.backend(), fullgraph=True)(hidden)
    out[1].sum().backward()
    (site,) = capture.report.sites
    assert not site.rewritten and site.reason.startswith(
        "npu_moe_gating_top_k_softmax_v2 is inference-only (torch_npu's doc; no backward), and this is the "
        "forward graph"), capture.report.table()
    assert router.weight.grad is not None


def test_gpt_oss_routers_fused_in_one_complete_ge_graph(tmp_path):
    config = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    ids = torch.randint(1, 128, (2, 10), generator=_gen(7))
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(model, ids, use_cache=False, out_dir=tmp_path)
    assert result.single_graph, result.summary()
    assert result.op_type_counts["MoeGatingTopKSoftmaxV2"] == 2
    assert "TopKV2" not in result.op_type_counts and "TopK" not in result.op_type_counts, result.summary()
    routers = [s for s in result.report.sites if s.pattern == "moe:router-top-k-softmax"]
    assert len(routers) == 2 and all(s.rewritten for s in routers), result.report.table()
