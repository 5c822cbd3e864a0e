"""The MoE ops (npu_grouped_matmul, npu_moe_compute_expert_tokens), their GE converters,
and the moe_experts_to_fused rule.

- reference kernels against the independent fp64 oracle (tests/moe_oracle.py);
- opcheck (schema, fake vs reference, autograd registration) on each supported form;
- the fakes refuse what the docs rule out, naming argument, rule and value;
- the converters' GE ops read back from the GE protobuf TorchAir builds (as in
  tests/test_ge_converters.py): input wiring, unfed inputs, attributes, outputs;
- the rule: transformers' sorted-experts block (gpt-oss's experts) rewritten for both
  targets, the rewritten graph run against the original on the same inputs (fp32,
  rtol 1e-5), and the forms it must leave alone, each with its reason.
"""

from __future__ import annotations

import pytest
import torch

import npu_attn_graph  # noqa: F401  (registers the ops)
from npu_attn_graph import NpuAttnArgumentError, Report, ops
from npu_attn_graph.passes import PASSES, PassContext, run_passes

import moe_oracle as oracle

OPS = torch.ops.npu_attn
GMM = OPS.npu_grouped_matmul.default
TOKENS = OPS.npu_moe_compute_expert_tokens.default


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _routed(rows: int = 11, experts: int = 4, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, experts, (rows,), generator=_gen(seed), dtype=torch.int32)
    ids[0] = experts - 1  # and one expert left empty below, so empty groups are covered
    ids[ids == 1] = 2
    return ids.sort().values


# ----------------------------------------------------------------------------
# Reference kernels against the oracle
# ----------------------------------------------------------------------------


def test_compute_expert_tokens_matches_the_oracle():
    for experts, seed in ((4, 0), (1, 1), (8, 2)):
        ids = torch.randint(0, experts, (17,), generator=_gen(seed), dtype=torch.int32).sort().values
        out = ops.npu_moe_compute_expert_tokens(ids, experts)
        assert out.dtype == torch.int32 and out.tolist() == oracle.expert_tokens(ids.tolist(), experts)
    assert ops.npu_moe_compute_expert_tokens(torch.empty(0, dtype=torch.int32), 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize("group_list_type", [0, 1])
@pytest.mark.parametrize("stacked", [True, False], ids=["weight_3d", "weight_list"])
def test_grouped_matmul_with_group_list_matches_the_oracle(group_list_type, stacked):
    ids = _routed()
    ends = oracle.expert_tokens(ids.tolist(), 4)
    group_list = ends if group_list_type == 0 else [b - a for a, b in zip([0] + ends, ends)]
    x = torch.randn(ids.shape[0], 6, generator=_gen(1))
    w = torch.randn(4, 6, 5, generator=_gen(2))
    weight = [w] if stacked else list(w.unbind(0))
    bias = None if stacked else [torch.randn(5, generator=_gen(3 + g)) for g in range(4)]
    (y,) = ops.npu_grouped_matmul([x], weight, bias=bias, group_list=torch.tensor(group_list), split_item=3,
                                  group_type=0, group_list_type=group_list_type)
    want = oracle.grouped_rows(x.double(), [m.double() for m in w.unbind(0)], group_list, group_list_type,
                               [b.double() for b in bias] if bias else None)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_rows_past_the_last_group_are_zero():
    x, w = torch.randn(7, 4, generator=_gen()), torch.randn(2, 4, 3, generator=_gen(1))
    (y,) = ops.npu_grouped_matmul([x], [w], group_list=torch.tensor([2, 5]), split_item=2, group_type=0)
    assert torch.equal(y[5:], torch.zeros(2, 3))


@pytest.mark.parametrize("split_item", [0, 1, 2, 3])
def test_grouped_matmul_without_group_list_matches_the_oracle(split_item):
    rank3 = split_item == 0  # split_item 0 takes 2-D to 6-D x
    xs = [torch.randn(*((2, 3) if rank3 else (3,)), 4, generator=_gen(g)) for g in range(3)]
    ws = [torch.randn(4, 5, generator=_gen(10 + g)) for g in range(3)]
    bias = [torch.randn(5, generator=_gen(20 + g)) for g in range(3)]
    outs = ops.npu_grouped_matmul(xs, ws, bias=bias, split_item=split_item)
    want = oracle.per_group([x.double() for x in xs], [w.double() for w in ws], [b.double() for b in bias])
    if split_item in (2, 3):
        want = [torch.cat(want, 0)]
    assert len(outs) == len(want)
    for got, expected in zip(outs, want):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_half_precision_accumulates_in_float32():
    x = torch.randn(9, 64, generator=_gen()).to(torch.bfloat16)
    w = torch.randn(3, 64, 8, generator=_gen(1)).to(torch.bfloat16)
    (y,) = ops.npu_grouped_matmul([x], [w], group_list=torch.tensor([3, 3, 9]), split_item=3, group_type=0)
    want = oracle.grouped_rows(x.double(), [m.double() for m in w.unbind(0)], [3, 3, 9], 0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=1e-2)  # one bfloat16 rounding of the result


# ----------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------

OPCHECK = [
    pytest.param(TOKENS, (_routed(), 4), {}, id="compute_expert_tokens"),
    pytest.param(GMM, ([torch.randn(11, 6)], [torch.randn(4, 6, 5)]),
                 dict(group_list=torch.tensor([3, 3, 8, 11]), split_item=3, group_type=0), id="gmm-group_list"),
    pytest.param(GMM, ([torch.randn(11, 6)], [torch.randn(6, 5) for _ in range(2)]),
                 dict(bias=[torch.randn(5), torch.randn(5)], group_list=torch.tensor([4, 7]), split_item=2,
                      group_type=0, group_list_type=1), id="gmm-group_list-counts-bias"),
    pytest.param(GMM, ([torch.randn(3, 6), torch.randn(2, 6)], [torch.randn(6, 5), torch.randn(6, 4)]), {},
                 id="gmm-per-group"),
]


@pytest.mark.parametrize("op,args,kwargs", OPCHECK)
def test_opcheck(op, args, kwargs):
    torch.library.opcheck(op, args, kwargs)


# ----------------------------------------------------------------------------
# The fakes refuse what the docs rule out
# ----------------------------------------------------------------------------


def _fake_call(fn):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        return fn()


REFUSED = [
    ("npu_moe_compute_expert_tokens: sorted_expert_for_source_row.dtype must be torch.int32, got torch.int64",
     lambda: ops.npu_moe_compute_expert_tokens(torch.zeros(4, dtype=torch.int64), 2)),
    ("npu_moe_compute_expert_tokens: sorted_expert_for_source_row.dim() must be 1, got 2",
     lambda: ops.npu_moe_compute_expert_tokens(torch.zeros(2, 2, dtype=torch.int32), 2)),
    ("npu_moe_compute_expert_tokens: num_expert must be at least 1, got 0",
     lambda: ops.npu_moe_compute_expert_tokens(torch.zeros(2, dtype=torch.int32), 0)),
    ("npu_grouped_matmul: group_list.dtype must be torch.int64, got torch.int32",
     lambda: ops.npu_grouped_matmul([torch.randn(4, 3)], [torch.randn(2, 3, 5)], split_item=3, group_type=0,
                                    group_list=torch.tensor([1, 4], dtype=torch.int32))),
    ("npu_grouped_matmul: group_list.shape[0] must equal the number of groups (2), got 3",
     lambda: ops.npu_grouped_matmul([torch.randn(4, 3)], [torch.randn(2, 3, 5)], split_item=3, group_type=0,
                                    group_list=torch.tensor([1, 2, 4]))),
    ("npu_grouped_matmul: split_item must be 2 or 3 (one output tensor) with group_list",
     lambda: ops.npu_grouped_matmul([torch.randn(4, 3)], [torch.randn(2, 3, 5)], group_type=0,
                                    group_list=torch.tensor([1, 4]))),
    ("npu_grouped_matmul: group_type must be 0",
     lambda: ops.npu_grouped_matmul([torch.randn(4, 3)], [torch.randn(2, 3, 5)], split_item=3, group_type=2,
                                    group_list=torch.tensor([1, 4]))),
    ("npu_grouped_matmul: weight K must equal x[0].shape[1] (3), got 4",
     lambda: ops.npu_grouped_matmul([torch.randn(4, 3)], [torch.randn(2, 4, 5)], split_item=3, group_type=0,
                                    group_list=torch.tensor([1, 4]))),
    ("npu_grouped_matmul: weight[0].dtype must equal x's dtype (torch.float32), got torch.float16",
     lambda: ops.npu_grouped_matmul([torch.randn(4, 3)], [torch.randn(2, 3, 5).half()], split_item=3,
                                    group_type=0, group_list=torch.tensor([1, 4]))),
    ("npu_grouped_matmul: scale has no reference semantics here",
     lambda: ops.npu_grouped_matmul([torch.randn(4, 3)], [torch.randn(3, 5)], scale=[torch.ones(5)])),
    ("npu_grouped_matmul: act_type must be 0",
     lambda: ops.npu_grouped_matmul([torch.randn(4, 3)], [torch.randn(3, 5)], act_type=1)),
    ("npu_grouped_matmul: bias[0].dtype must be torch.float32 with torch.bfloat16 x, got torch.bfloat16",
     lambda: ops.npu_grouped_matmul([torch.randn(4, 3).bfloat16()], [torch.randn(3, 5).bfloat16()],
                                    bias=[torch.randn(5).bfloat16()])),
    ("npu_grouped_matmul: bias is implemented with per-group 2-D weights only",
     lambda: ops.npu_grouped_matmul([torch.randn(4, 3)], [torch.randn(2, 3, 5)], bias=[torch.randn(2, 5)],
                                    split_item=3, group_type=0, group_list=torch.tensor([1, 4]))),
]


@pytest.mark.parametrize("message,call", REFUSED, ids=[m.split(":")[1].split(" must")[0].strip() for m, _ in REFUSED])
def test_fake_refuses_with_the_argument_rule_and_value(message, call):
    with pytest.raises(NpuAttnArgumentError) as error:
        _fake_call(call)
    assert str(error.value).startswith(message), str(error.value)


def test_float64_is_for_the_reference_only():
    from npu_attn_graph.kernels._library import npu_rules

    call = lambda: ops.npu_grouped_matmul([torch.randn(4, 3).double()], [torch.randn(3, 5).double()])  # noqa: E731
    _fake_call(call)
    with npu_rules(), pytest.raises(NpuAttnArgumentError, match=r"x\[0\].dtype must be one of"):
        _fake_call(call)


@pytest.mark.parametrize("ids,message", [
    ([0, 2, 1], "must be sorted in ascending order"),
    ([0, 1, 5], "values must lie in [0, num_expert - 1] = [0, 3]"),
])
def test_compute_expert_tokens_reference_checks_values(ids, message):
    with pytest.raises(NpuAttnArgumentError) as error:
        ops.npu_moe_compute_expert_tokens(torch.tensor(ids, dtype=torch.int32), 4)
    assert message in str(error.value)


@pytest.mark.parametrize("group_list,group_list_type,message", [
    ([3, 2], 0, "non-decreasing"), ([3, 9], 0, "at most x's 7 rows"), ([3, -1], 1, "non-negative counts")])
def test_grouped_matmul_reference_checks_group_list_values(group_list, group_list_type, message):
    with pytest.raises(NpuAttnArgumentError, match=message):
        ops.npu_grouped_matmul([torch.randn(7, 3)], [torch.randn(2, 3, 4)], group_list=torch.tensor(group_list),
                               split_item=3, group_type=0, group_list_type=group_list_type)


# ----------------------------------------------------------------------------
# GE converters, read back from the GE protobuf
# ----------------------------------------------------------------------------


def _reads_argument(graph, op, name: str, arg: torch.Tensor) -> bool:
    """op's input `name` is the Data op of `arg` (its recorded meta; dynamo may number
    list-held inputs in another order than the parameters)."""
    from test_ge_converters import producer

    src, out = producer(graph, op, name)
    meta = src.output_desc[0].attr["_meta"].s.decode() if src.type == "Data" else ""
    return out == 0 and meta.startswith(f"Tensor(dtype={arg.dtype}, shape={arg.shape}")


def _ge_graph(fn, args, tmp_path):
    from test_ge_converters import PLAIN

    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(fn, *args, options=PLAIN, out_dir=tmp_path)
    assert result.single_graph, result.summary()
    return result.graphs[0].graph_def


def test_ge_moe_compute_expert_tokens(tmp_path):
    from test_ge_converters import data_index, only_op, producer

    graph = _ge_graph(lambda ids: ops.npu_moe_compute_expert_tokens(ids, 4), (_routed(),), tmp_path)
    op = only_op(graph, "MoeComputeExpertTokens")
    src, index = producer(graph, op, "sorted_experts")
    assert (src.type, index, data_index(src)) == ("Data", 0, 0)
    assert op.attr["num_experts"].i == 4
    assert only_op(graph, "NetOutput").input[0] == f"{op.name}:0"


@pytest.mark.parametrize("dtype,bias_type", [(torch.float32, "DT_FLOAT"), (torch.float16, "DT_FLOAT16"),
                                             (torch.bfloat16, "DT_FLOAT")])
def test_ge_grouped_matmul(dtype, bias_type, tmp_path):
    """x0, weight0 and group_list from the arguments; bias0, scale0, offset0 and antiquant_*0
    fed the empty (0,) placeholders TorchAir's converter feeds; per_token_scale unfed."""
    from test_ge_converters import attr_value, const_value, only_op, producer

    def fn(x, w, group_list):
        return ops.npu_grouped_matmul([x], [w], group_list=group_list, split_item=3, group_type=0,
                                      group_list_type=1)[0]

    args = (torch.randn(8, 16).to(dtype), torch.randn(4, 16, 32).to(dtype), torch.tensor([2, 0, 5, 1]))
    graph = _ge_graph(fn, args, tmp_path)
    op = only_op(graph, "GroupedMatmul")
    for name, arg in zip(("x0", "weight0", "group_list"), args):
        assert _reads_argument(graph, op, name, arg), name
    placeholders = {"bias0": bias_type, "scale0": "DT_UINT64", "offset0": "DT_FLOAT",
                    "antiquant_scale0": "DT_FLOAT16", "antiquant_offset0": "DT_FLOAT16"}
    from torchair.ge import DataType

    for name, ge_dtype in placeholders.items():
        fill, _ = producer(graph, op, name)
        dims, _ = producer(graph, fill, "dims")
        value, _ = producer(graph, fill, "value")
        assert fill.type == "Fill" and const_value(dims) == ("DT_INT64", [0]), name  # an empty (0,) tensor
        assert value.type == "Cast" and value.attr["dst_type"].i == getattr(DataType, ge_dtype), name
    assert producer(graph, op, "per_token_scale") is None
    assert {name: attr_value(op, name) for name in ("split_item", "dtype", "transpose_weight", "transpose_x",
                                                     "group_type", "group_list_type", "act_type")} == dict(
        split_item=3, dtype=-1, transpose_weight=False, transpose_x=False, group_type=0, group_list_type=1,
        act_type=0)
    assert list(op.attr["tuning_config"].list.i) == [0]
    assert [d.name for d in op.output_desc] == ["y0"]
    assert only_op(graph, "NetOutput").input[0] == f"{op.name}:0"


def test_ge_grouped_matmul_bias_list(tmp_path):
    from test_ge_converters import only_op, producer

    def fn(x0, x1, w0, w1, b0, b1):
        return ops.npu_grouped_matmul([x0, x1], [w0, w1], bias=[b0, b1])

    args = (torch.randn(3, 16), torch.randn(2, 16), torch.randn(16, 8), torch.randn(16, 4), torch.randn(8),
            torch.randn(4))
    graph = _ge_graph(fn, args, tmp_path)
    op = only_op(graph, "GroupedMatmul")
    for name, arg in zip(("x0", "x1", "weight0", "weight1", "bias0", "bias1"), args):
        assert _reads_argument(graph, op, name, arg), name
    assert producer(graph, op, "group_list") is None
    net = [s for s in only_op(graph, "NetOutput").input if not s.endswith(":-1")]
    assert net == [f"{op.name}:0", f"{op.name}:1"]


# ----------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _experts_block(experts: int = 4, top_k: int = 2, dtype=torch.float32) -> torch.nn.Module:
    """gpt-oss's MLP (router + experts, transformers' default grouped_mm experts), random weights."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=experts,
                                       num_experts_per_tok=top_k)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = GptOssMLP(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block.to(dtype).eval()


class _Capture:
    """An AOT backend that runs the passes for `target` and, on every call, both the
    original and the rewritten graph on the same inputs (a training step's forward graph
    is named "forward", as the backend names it)."""

    def __init__(self, target: str = "torch") -> None:
        self.report, self.target, self.pairs, self.graphs = Report(), target, [], []

    def backend(self):
        from torch._dynamo.backends.common import aot_autograd

        def compiler(gm, example_inputs, graph_name="inference"):
            graph = torch.fx.Graph()
            graph.output(graph.graph_copy(gm.graph, {}))
            original = torch.fx.GraphModule(gm, graph)
            run_passes(gm, list(PASSES), self.report, PassContext(graph_name, self.target))
            self.graphs.append(gm)

            def run(args):
                expected, actual = original(*args), gm(*args)
                self.pairs.append((expected, actual))
                return actual

            run._boxed_call = True
            return run

        return aot_autograd(fw_compiler=lambda gm, ex: compiler(gm, ex, "forward"), inference_compiler=compiler)


def _targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("target", ["torch", "ge"])
@pytest.mark.parametrize("tokens,experts,top_k", [(7, 4, 2), (1, 4, 2), (13, 8, 3)])
def test_rewritten_block_equals_the_original(target, tokens, experts, top_k):
    block = _experts_block(experts, top_k)
    hidden = torch.randn(1, tokens, 32, generator=_gen(5))
    capture = _Capture(target)
    with torch.no_grad():
        eager = block(hidden)[0]
        out = torch.compile(block, backend=capture.backend(), fullgraph=True)(hidden)[0]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    (expected, actual), = capture.pairs
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    (site,) = [s for s in capture.report.sites if s.pattern == "moe:sorted-experts-grouped-matmul"]
    assert site.rewritten and site.fused_op == "npu_grouped_matmul" and site.reason is None, capture.report.table()
    code = _targets(capture.graphs[0])
    assert code.count("npu_attn.npu_grouped_matmul.default") == 2
    assert code.count("npu_attn.npu_moe_compute_expert_tokens.default") == 1
    assert code.count("npu_attn.npu_scatter_nd_update.default") == 1
    assert not [t for t in code if "histc" in t or "index_put" in t or "grouped_mm_fallback" in t or
                t == "aten.cumsum.default"], code


@pytest.mark.parametrize("target", ["torch", "ge"])
def test_a_bfloat16_block_through_aten_grouped_mm_is_rewritten(target):
    """In bfloat16 transformers calls F.grouped_mm (aten._grouped_mm), not its fallback. Both sides
    accumulate in float32 and round once to bfloat16: rtol 2**-7 (one bfloat16 ulp), atol 1e-2 for
    sums of terms of magnitude ~1 that cancel."""
    block = _experts_block(dtype=torch.bfloat16)
    hidden = torch.randn(1, 9, 32, generator=_gen(8)).bfloat16()
    capture = _Capture(target)
    with torch.no_grad():
        eager = block(hidden)[0]
        out = torch.compile(block, backend=capture.backend(), fullgraph=True)(hidden)[0]
    torch.testing.assert_close(out, eager, rtol=2.0 ** -7, atol=1e-2)
    (expected, actual), = capture.pairs
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=2.0 ** -7, atol=1e-2)
    (site,) = [s for s in capture.report.sites if s.pattern == "moe:sorted-experts-grouped-matmul"]
    assert site.rewritten, capture.report.table()
    code = _targets(capture.graphs[0])
    assert code.count("npu_attn.npu_grouped_matmul.default") == 2 and "aten._grouped_mm.default" not in code, code


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_block_becomes_one_complete_ge_graph(dtype, tmp_path):
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(_experts_block(dtype=dtype), torch.randn(1, 5, 32).to(dtype),
                                            out_dir=tmp_path)
    assert result.single_graph, result.summary()
    types = result.op_type_counts
    assert (types["GroupedMatmul"], types["MoeComputeExpertTokens"], types["ScatterNdUpdate"]) == (2, 1, 1)
    assert not [t for t in types if "." in t], result.summary()


def _experts_only(experts: int = 4):
    """The experts alone: the ids come straight from the caller, not from a top-k."""
    block = _experts_block(experts)

    def fn(hidden, ids, weights):
        return block.experts(hidden, ids, weights)

    return fn


def test_ids_not_known_to_be_in_range_are_left_alone():
    capture = _Capture("ge")
    hidden, weights = torch.randn(6, 32), torch.rand(6, 2)
    ids = torch.randint(0, 4, (6, 2), generator=_gen())
    fn = _experts_only()
    with torch.no_grad():
        eager = fn(hidden, ids, weights)
        out = torch.compile(fn, backend=capture.backend(), fullgraph=True)(hidden, ids, weights)
    torch.testing.assert_close(out, eager)
    (site,) = [s for s in capture.report.sites if s.pattern == "moe:sorted-experts-grouped-matmul"]
    assert not site.rewritten and "are not top-k indices over 4 experts" in site.reason, capture.report.table()
    assert "transformers.grouped_mm_fallback.default" in _targets(capture.graphs[0])


def test_the_ops_own_validation_refuses_float64_for_the_ge_target():
    block = _experts_block(dtype=torch.float64)
    capture = _Capture("ge")
    hidden = torch.randn(1, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.compile(block, backend=capture.backend(), fullgraph=True)(hidden)
    (site,) = [s for s in capture.report.sites if s.pattern == "moe:sorted-experts-grouped-matmul"]
    assert not site.rewritten and site.reason.startswith("npu_grouped_matmul: x[0].dtype must be one of"), \
        capture.report.table()
    assert "aten.histc.default" in _targets(capture.graphs[0])  # rolled back: the graph as it was


def test_the_inductor_executor_takes_the_rewritten_block():
    """After Inductor's decompositions the inverse permutation reads empty + prims.iota; the
    rewrite still applies, and its casts are ones Inductor lowers."""
    from npu_attn_graph import NpuAttnBackend

    block, hidden, report = _experts_block(), torch.randn(1, 7, 32, generator=_gen(3)), Report()
    with torch.no_grad():
        eager = block(hidden)[0]
        out = torch.compile(block, backend=NpuAttnBackend(report=report), options={"executor": "inductor"},
                            fullgraph=True)(hidden)[0]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    (site,) = [s for s in report.sites if s.pattern == "moe:sorted-experts-grouped-matmul"]
    assert site.rewritten, report.table()
