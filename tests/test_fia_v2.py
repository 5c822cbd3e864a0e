"""npu_fused_infer_attention_score_v2 (and the learnable_sink of the shared reference core).

* the reference against the independent fp64 oracle (tests/oracle.py: the sink
  column is concatenated, softmaxed and dropped) across layouts, GQA, masks and
  sparse modes, paged caches, TND, actual lengths, lse;
* torch.library.opcheck;
* one case per enforced rule (NpuAttnArgumentError naming the op, the argument,
  the rule and the value; the fake kernel raises the same);
* positions the op must not read (NaN / inf there) never reach the outputs.

Tolerances (as tests/test_attention_ops.py): fp32 rtol 1e-5 / atol 1e-6 -- the
reference and the oracle differ only by fp32 rounding of the same sums (the
sink only adds one exp to each denominator). fp16/bf16: the oracle gets the
same rounded inputs (and the same rounded sink); the reference accumulates in
fp32 and rounds once, on the final cast, so the error is ~1 ulp of the output
dtype (fp16 eps 9.8e-4, bf16 eps 7.8e-3): 2e-3 and 1.6e-2.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from npu_attn_graph.kernels import _inference
from npu_attn_graph.kernels._library import NpuAttnArgumentError
from npu_attn_graph.kernels.fused_infer_attention_score import npu_fused_infer_attention_score as fia
from npu_attn_graph.kernels.fused_infer_attention_score_v2 import npu_fused_infer_attention_score_v2 as fia2
from attention_inputs import cumulative, dense, paged_cache
from oracle import fia_v2_oracle

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {FP32: (1e-5, 1e-6), FP16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}
V2 = torch.ops.npu_attn.npu_fused_infer_attention_score_v2.default
MASK2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
FILLS = (float("nan"), float("inf"), float("-inf"))


pytestmark = pytest.mark.usefixtures("kernel_path")  # every kernel path (conftest)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(2024)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def assert_matches(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    rtol, atol = TOL[actual.dtype]
    torch.testing.assert_close(actual.to(FP32), expected.to(FP32), rtol=rtol, atol=atol)


def check(q, k, v, **kw):
    out, lse = fia2(q, k, v, **kw)
    e_out, e_lse = fia_v2_oracle(q, k, v, **kw)
    assert not out.isnan().any()
    assert_matches(out, e_out)
    if kw.get("return_softmax_lse"):
        assert lse.dtype == FP32
        torch.testing.assert_close(lse, e_lse.to(FP32), rtol=1e-5, atol=1e-5)  # +inf rows match exactly
    else:
        assert lse.shape == (1,) and lse.dtype == FP32 and lse.item() == 0
    return out, lse


def problem(layout, *, b=2, n=8, gqa=1, sq=6, skv=10, d=16, dtype=FP32, q_seg=(3, 7, 1), kv_seg=(5, 9, 4)):
    nkv = n // gqa
    kw = dict(num_query_heads=n, num_key_value_heads=0 if gqa == 1 else nkv, input_layout=layout,
              softmax_scale=0.3)
    if layout == "TND":
        q = torch.randn(sum(q_seg), n, d).to(dtype)
        k = torch.randn(sum(kv_seg), nkv, d).to(dtype)
        v = torch.randn(sum(kv_seg), nkv, d).to(dtype)
        kw.update(actual_seq_qlen=cumulative(q_seg), actual_seq_kvlen=cumulative(kv_seg))
    else:
        q, k, v = dense(layout, b, n, sq, d, dtype), dense(layout, b, nkv, skv, d, dtype), \
            dense(layout, b, nkv, skv, d, dtype)
    return q, k, v, kw


def sink(n, dtype=FP32):
    """Per-head logits around the scores' range: some heads' sinks dominate, some barely count."""
    return (torch.randn(n) * 2).to(dtype)


# ----------------------------------------------------------------------------
# Reference vs the fp64 oracle
# ----------------------------------------------------------------------------

LAYOUTS = ["BSH", "BSND", "BNSD", "BNSD_BSND", "TND"]


@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_gqa_lse(layout, gqa, with_sink):
    q, k, v, kw = problem(layout, gqa=gqa)
    s = sink(8) if with_sink else None
    check(q, k, v, learnable_sink=s, return_softmax_lse=True, **kw)


@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize("layout", ["BSND", "TND"])
def test_half_dtypes(layout, dtype):
    q, k, v, kw = problem(layout, gqa=2, dtype=dtype)
    check(q, k, v, learnable_sink=sink(8, BF16), return_softmax_lse=True, **kw)


@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_incremental_with_sink_and_lengths(layout):
    q, k, v, kw = problem(layout, b=3, gqa=2, sq=1, skv=12)
    check(q, k, v, learnable_sink=sink(8), actual_seq_kvlen=[12, 5, 0], return_softmax_lse=True, **kw)


@pytest.mark.parametrize("sparse_mode", [0, 1])
def test_user_mask_with_sink(sparse_mode):
    q, k, v, kw = problem("BNSD", gqa=2)
    mask = torch.rand(2, 1, 6, 10) < 0.4
    mask[0, 0, 2] = True  # a row with nothing to attend to: output 0, lse +inf
    out, lse = check(q, k, v, atten_mask=mask, sparse_mode=sparse_mode, pre_tokens=3, next_tokens=1,
                     learnable_sink=sink(8), return_softmax_lse=True, **kw)
    assert torch.all(out[0, :, 2] == 0) and torch.all(torch.isinf(lse[0, :, 2]))


@pytest.mark.parametrize("mode,pre,nxt", [(2, 0, 0), (3, 0, 0), (4, 2, 0), (4, 1, -1)])
def test_compressed_modes_and_bands_with_sink(mode, pre, nxt):
    q, k, v, kw = problem("BSND", gqa=2, sq=6, skv=9)
    check(q, k, v, atten_mask=MASK2048, sparse_mode=mode, pre_tokens=pre, next_tokens=nxt,
          actual_seq_qlen=[6, 4], actual_seq_kvlen=[9, 5], learnable_sink=sink(8), return_softmax_lse=True, **kw)


def test_tnd_zero_length_segments_and_causal():
    q, k, v, kw = problem("TND", n=4, gqa=2, q_seg=(3, 0, 5, 2), kv_seg=(4, 6, 0, 3))
    s = sink(4)
    out, lse = check(q, k, v, learnable_sink=s, return_softmax_lse=True, **kw)
    assert torch.all(out[3:8] == 0) and torch.all(torch.isinf(lse[3:8]))  # segment 2 has no keys
    check(q, k, v, atten_mask=MASK2048, sparse_mode=3, learnable_sink=s, return_softmax_lse=True, **kw)


@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("rank", [3, 4])
def test_paged_with_sink(rank, sq):
    b, n, nkv, d, bs = 2, 4, 2, 16, 16
    layout = "BNSD" if rank == 4 else "BSH"
    lens = [23, 9]
    k, table = paged_cache(torch.randn(b, nkv, 32, d), lens, bs, rank, "-1", spare_blocks=2)
    v, _ = paged_cache(torch.randn(b, nkv, 32, d), lens, bs, rank, "-1", spare_blocks=2, table=table)
    kw = dict(num_query_heads=n, num_key_value_heads=nkv, input_layout=layout, softmax_scale=0.25,
              actual_seq_kvlen=lens, block_table=table, block_size=bs, return_softmax_lse=True,
              learnable_sink=sink(n))
    q = dense(layout, b, n, sq, d)
    check(q, k, v, **kw)
    if sq > 1:
        check(q, k, v, atten_mask=MASK2048, sparse_mode=3, **kw)


@pytest.mark.parametrize("rank", [3, 4])
def test_paged_tnd_with_sink(rank):
    n, nkv, d, bs = 4, 2, 16, 16
    lens = [20, 3, 33]
    k, table = paged_cache(torch.randn(3, nkv, 33, d), lens, bs, rank, "-1", spare_blocks=2)
    v, _ = paged_cache(torch.randn(3, nkv, 33, d), lens, bs, rank, "-1", spare_blocks=2, table=table)
    check(torch.randn(9, n, d), k, v, num_query_heads=n, num_key_value_heads=nkv, input_layout="TND",
          softmax_scale=0.25, actual_seq_qlen=[2, 3, 9], actual_seq_kvlen=lens, block_table=table,
          block_size=bs, atten_mask=MASK2048, sparse_mode=3, learnable_sink=sink(n), return_softmax_lse=True)


def test_pse_and_rope_with_sink():
    q, k, v, kw = problem("BNSD", n=4, gqa=2, sq=3, skv=7, d=32)
    check(q, k, v, pse_shift=torch.randn(1, 4, 3, 7), query_rope=torch.randn(2, 4, 3, 16),
          key_rope=torch.randn(2, 2, 7, 16), learnable_sink=sink(4), return_softmax_lse=True, **kw)


def test_antiquant_and_int8_output_with_sink():
    """dequant_scale/offset_key/value (per-token, mode 1) and quant_scale_out: the int8 output
    may differ from the fp64 oracle by one step where out * scale lies near a rounding tie."""
    b, n, nkv, d = 2, 4, 2, 32
    q = torch.randn(b, n, 1, d).half()
    k = torch.randint(-128, 128, (b, nkv, 8, d), dtype=torch.int8)
    v = torch.randint(-128, 128, (b, nkv, 8, d), dtype=torch.int8)
    kw = dict(dequant_scale_key=torch.rand(b, 8) * 0.02, dequant_offset_key=torch.randn(b, 8),
              dequant_scale_value=torch.rand(b, 8) * 0.02, dequant_offset_value=torch.randn(b, 8),
              key_quant_mode=1, value_quant_mode=1, num_query_heads=n, num_key_value_heads=nkv,
              input_layout="BNSD", softmax_scale=0.2, actual_seq_kvlen=[8, 5], learnable_sink=sink(n))
    check(q, k, v, **kw)
    out, _ = fia2(q, k, v, quant_scale_out=torch.tensor([40.0]), quant_offset_out=torch.tensor([1.0]), **kw)
    expected, _ = fia_v2_oracle(q, k, v, quant_scale_out=torch.tensor([40.0]), quant_offset_out=torch.tensor([1.0]),
                                **kw)
    assert out.dtype == torch.int8
    assert (out.int() - expected.int()).abs().max() <= 1


def test_sink_formula_by_hand():
    """out = sum_j e^(s_j - m) v_j / (sum_j e^(s_j - m) + e^(sink - m)), lse of the scores alone."""
    q, k, v = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    s = torch.tensor([1.5])
    out, lse = fia2(q, k, v, learnable_sink=s, num_query_heads=1, softmax_scale=0.25, input_layout="BNSD",
                    return_softmax_lse=True)
    scores = (q[0, 0] @ k[0, 0].T).double() * 0.25
    m = torch.maximum(scores.amax(-1, keepdim=True), s.double())
    e = torch.exp(scores - m)
    expected = (e @ v[0, 0].double()) / (e.sum(-1, keepdim=True) + torch.exp(s.double() - m))
    torch.testing.assert_close(out[0, 0].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse[0, 0].double(), torch.logsumexp(scores, -1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_huge_and_minus_inf_sinks():
    """A sink far above every score takes (almost) all the mass: output ~0, never NaN; a -inf sink is no sink."""
    q, k, v, kw = problem("TND", n=4)
    big, _ = fia2(q, k, v, learnable_sink=torch.full((4,), 1e4), **kw)
    assert not big.isnan().any() and big.abs().max() < 1e-30
    none_out, _ = fia2(q, k, v, learnable_sink=torch.full((4,), float("-inf")), **kw)
    torch.testing.assert_close(none_out, fia2(q, k, v, **kw)[0], rtol=1e-5, atol=1e-6)  # SDPA or not


@pytest.mark.parametrize("layout", ["BSH", "BNSD_BSND", "TND"])
def test_without_sink_equals_v1(layout):
    """The v2 argument names map onto v1's computation exactly."""
    q, k, v, kw = problem(layout, gqa=2)
    v1_kw = dict(num_heads=kw["num_query_heads"], num_key_value_heads=kw["num_key_value_heads"],
                 input_layout=layout, scale=kw["softmax_scale"], softmax_lse_flag=True,
                 actual_seq_lengths=kw.get("actual_seq_qlen"), actual_seq_lengths_kv=kw.get("actual_seq_kvlen"))
    out, lse = fia2(q, k, v, return_softmax_lse=True, **kw)
    out1, lse1 = fia(q, k, v, **v1_kw)
    torch.testing.assert_close(out, out1, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse1, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------

TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
              "test_aot_dispatch_dynamic")


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=FP32: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    yield "tnd_sink_causal_lse", (r(9, 4, 16), r(12, 2, 16), r(12, 2, 16)), dict(
        atten_mask=MASK2048, sparse_mode=3, actual_seq_qlen=[4, 9], actual_seq_kvlen=[5, 12],
        learnable_sink=r(4, dtype=BF16), num_query_heads=4, num_key_value_heads=2, softmax_scale=0.25,
        input_layout="TND", return_softmax_lse=True)
    yield "bnsd_mask_sink", (r(2, 4, 6, 16), r(2, 2, 9, 16), r(2, 2, 9, 16)), dict(
        atten_mask=torch.rand(2, 1, 6, 9, generator=g) < 0.2, actual_seq_qlen=[6, 3], actual_seq_kvlen=[9, 7],
        learnable_sink=r(4), num_query_heads=4, num_key_value_heads=2, softmax_scale=0.25, input_layout="BNSD",
        return_softmax_lse=True)
    k, table = paged_cache(r(2, 2, 32, 16), [30, 5], 16, 3, "-1", spare_blocks=2)
    v, _ = paged_cache(r(2, 2, 32, 16), [30, 5], 16, 3, "-1", spare_blocks=2, table=table)
    yield "paged_bsh_sink", (r(2, 1, 64), k, v), dict(
        block_table=table, block_size=16, actual_seq_kvlen=[30, 5], learnable_sink=r(4), num_query_heads=4,
        num_key_value_heads=2, softmax_scale=0.25)
    yield "int8_kv_quant_out", (r(2, 4, 1, 32, dtype=FP16), torch.randint(-128, 128, (2, 2, 8, 32), dtype=torch.int8),
                                torch.randint(-128, 128, (2, 2, 8, 32), dtype=torch.int8)), dict(
        dequant_scale_key=torch.rand(2, 32, generator=g, dtype=FP32).half() * 0.02,
        dequant_scale_value=torch.rand(2, 32, generator=g, dtype=FP32).half() * 0.02,
        quant_scale_out=torch.tensor([30.0]), num_query_heads=4, num_key_value_heads=2, softmax_scale=0.2,
        input_layout="BNSD")


OPCHECK_CASES = list(_opcheck_cases())


@pytest.mark.parametrize("kernel_path", ["default"], indirect=True)
@pytest.mark.parametrize("name,args,kwargs", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(name, args, kwargs):
    torch.library.opcheck(V2, args, kwargs, test_utils=TEST_UTILS)


@pytest.mark.parametrize("kernel_path", ["default"], indirect=True)
@pytest.mark.parametrize("name,args,kwargs", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_fake_matches_reference_metadata(name, args, kwargs):
    eager = V2(*args, **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = V2(*[mode.from_tensor(a) for a in args],
                  **{k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    for e, f in zip(eager, fake, strict=True):
        assert tuple(e.shape) == tuple(f.shape) and e.dtype == f.dtype, (name, e.shape, f.shape)


# ----------------------------------------------------------------------------
# Constraints: one case per enforced rule
# ----------------------------------------------------------------------------


def _qkv(layout="BNSD", sq=6, n=4, nkv=4, d=16):
    q, k, v, _ = problem(layout, n=n, gqa=n // nkv, sq=sq, d=d)
    return q, k, v


BASE = dict(num_query_heads=4, input_layout="BNSD")
KV8 = lambda: (torch.randn(2, 4, 1, 32).half(), torch.randint(-128, 128, (2, 4, 8, 32), dtype=torch.int8),  # noqa: E731
               torch.randint(-128, 128, (2, 4, 8, 32), dtype=torch.int8))

# id -> (query/key/value factory, kwargs, expected message after "npu_fused_infer_attention_score_v2: ")
CONSTRAINTS = {
    "sink_wrong_shape": (_qkv, dict(BASE, learnable_sink=torch.zeros(3)),
                         "learnable_sink.shape must be (num_query_heads,) = (4,), got (3,)"),
    "sink_wrong_rank": (_qkv, dict(BASE, learnable_sink=torch.zeros(1, 4)),
                        "learnable_sink.shape must be (num_query_heads,) = (4,), got (1, 4)"),
    "sink_not_floating": (_qkv, dict(BASE, learnable_sink=torch.zeros(4, dtype=torch.int32)),
                          "learnable_sink.dtype must be one of [torch.float16, torch.bfloat16, torch.float32, "
                          "torch.float64], got torch.int32"),
    "dtype_override": (_qkv, dict(BASE, key_dtype=23),
                       "key_dtype must be None: the dtype overrides (fp8/hifloat8/fp4 reinterpretation) is not "
                       "supported by the reference kernel, got 23"),
    "out_dtype": (_qkv, dict(BASE, out_dtype=1),
                  "out_dtype must be None: the dtype overrides (fp8/hifloat8/fp4 reinterpretation) is not "
                  "supported by the reference kernel, got 1"),
    "ntd_layout": (_qkv, dict(BASE, input_layout="NTD_TND"),
                   "input_layout 'NTD_TND' is not supported by the reference kernel; use one of ['BSH', 'BSND', "
                   "'BNSD', 'BNSD_BSND', 'TND'], got 'NTD_TND'"),
    "unknown_layout": (_qkv, dict(BASE, input_layout="SBH"),
                       "input_layout must be one of ['BSH', 'BSND', 'BNSD', 'BNSD_BSND', 'TND'], got 'SBH'"),
    "int8_query": (lambda: tuple(torch.randint(-128, 128, (2, 4, 6, 32), dtype=torch.int8) for _ in range(3)), BASE,
                   "query.dtype must be floating: int8 queries (full quantisation with dequant_scale_query) is not "
                   "supported by the reference kernel, got torch.int8"),
    "dequant_scale_query": (_qkv, dict(BASE, dequant_scale_query=torch.ones(2, 4, 6)),
                            "dequant_scale_query must be None: query quantisation (per-token-per-head) is not "
                            "supported by the reference kernel, got a tensor"),
    "query_quant_mode": (_qkv, dict(BASE, query_quant_mode=3),
                         "query_quant_mode must be 0: query quantisation (mode 3, with dequant_scale_query) is not "
                         "supported by the reference kernel, got 3"),
    "quant_scale_p": (_qkv, dict(BASE, quant_scale_p=torch.ones(1)),
                      "quant_scale_p must be None: softmax probability quantisation (full quantisation) is not "
                      "supported by the reference kernel, got a tensor"),
    "dequant_scale_key_rope": (_qkv, dict(BASE, dequant_scale_key_rope=torch.ones(1)),
                               "dequant_scale_key_rope must be None (a reserved argument in the torch_npu docs), "
                               "got a tensor"),
    "inner_precise_range": (_qkv, dict(BASE, inner_precise=4), "inner_precise must be 0, 1, 2 or 3, got 4"),
    "inner_precise_incremental": (lambda: _qkv(sq=1), dict(BASE, inner_precise=2),
                                  "inner_precise must be 0 or 1 when the query length Q_S is 1, got 2"),
    "dequant_scale_key_alone": (KV8, dict(BASE, dequant_scale_key=torch.ones(4, 32).half()),
                                "dequant_scale_key/dequant_scale_value must be given together, got only one"),
    "dequant_offset_key_alone": (KV8, dict(BASE, dequant_scale_key=torch.ones(4, 32).half(),
                                           dequant_scale_value=torch.ones(4, 32).half(),
                                           dequant_offset_key=torch.ones(4, 32).half()),
                                 "dequant_offset_key/dequant_offset_value must be given together, got only one"),
    "int8_kv_without_dequant_scale": (KV8, BASE,
                                      "dequant_scale_key is required when key/value are int8 and the query is "
                                      "floating, got None"),
    "quant_modes_differ": (KV8, dict(BASE, dequant_scale_key=torch.ones(2, 8), dequant_scale_value=torch.ones(2, 8),
                                     key_quant_mode=1, value_quant_mode=0),
                           "key_quant_mode/value_quant_mode must be equal, or 0 and 1, got (1, 0)"),
    "quant_mode_prompt": (lambda: (torch.randn(2, 4, 3, 32).half(), *KV8()[1:]),
                          dict(BASE, dequant_scale_key=torch.ones(4, 1), dequant_scale_value=torch.ones(4, 1),
                               key_quant_mode=2, value_quant_mode=2),
                          "key_quant_mode must be one of [0, 1] when the query length Q_S is > 1 (or the layout is "
                          "TND), got 2"),
    "num_query_heads_mismatch": (_qkv, dict(BASE, num_query_heads=2),
                                 "num_query_heads must equal the query head count 4, got 2"),
    "quant_offset_out_alone": (_qkv, dict(BASE, quant_offset_out=torch.ones(1)),
                               "quant_offset_out requires quant_scale_out, got a tensor"),
    "quant_scale_out_numel": (_qkv, dict(BASE, quant_scale_out=torch.ones(7)),
                              "quant_scale_out must have 1 element (per-tensor) or N*D=64 elements (per-channel), "
                              "got (7,)"),
    "actual_seq_qlen_tnd": (lambda: _qkv("TND"), dict(num_query_heads=4, input_layout="TND",
                                                      actual_seq_kvlen=[5, 14, 18]),
                            "actual_seq_qlen is required (cumulative lengths) for input_layout TND, got None"),
}


@pytest.mark.parametrize("kernel_path", ["default"], indirect=True)
@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_constraint(name, fake):
    make, kwargs, message = CONSTRAINTS[name]
    qkv = make()
    expected = "^" + re.escape(f"npu_fused_infer_attention_score_v2: {message}") + "$"
    if not fake:
        with pytest.raises(NpuAttnArgumentError, match=expected):
            V2(*qkv, **kwargs)
        return
    with FakeTensorMode() as mode:
        to_fake = lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
        with pytest.raises(NpuAttnArgumentError, match=expected):
            V2(*[to_fake(t) for t in qkv], **{k: to_fake(v) for k, v in kwargs.items()})


NPU_SINK_RULES = {
    # On the NPU (CANN: learnable_sink DT_BF16 only; TND/NTD_TND with value D 64/128 only).
    "sink_dtype_on_npu": (dict(layout="TND", d=64, sink_dtype=FP32),
                          "learnable_sink.dtype must be torch.bfloat16 on the NPU, got torch.float32"),
    "sink_layout_on_npu": (dict(layout="BNSD", d=64, sink_dtype=BF16),
                           "learnable_sink is only supported with input_layout TND on the NPU, got BNSD"),
    "sink_value_dim_on_npu": (dict(layout="TND", d=32, sink_dtype=BF16),
                              "learnable_sink requires a value head dim in [64, 128] on the NPU, got 32"),
}


@pytest.mark.parametrize("kernel_path", ["default"], indirect=True)
@pytest.mark.parametrize("name", sorted(NPU_SINK_RULES))
def test_sink_rules_on_the_npu(name, monkeypatch):
    """The NPU-only rules, with the device test pointed at "this is the NPU" (no NPU here)."""
    spec, message = NPU_SINK_RULES[name]
    q, k, v, kw = problem(spec["layout"], n=4, d=spec["d"], dtype=BF16)
    s = torch.zeros(4, dtype=spec["sink_dtype"])
    fia2(q, k, v, learnable_sink=s, **kw)  # off the NPU: accepted
    monkeypatch.setattr(_inference, "on_npu_device", lambda t: True)
    with pytest.raises(NpuAttnArgumentError, match="^" + re.escape(f"npu_fused_infer_attention_score_v2: {message}")):
        fia2(q, k, v, learnable_sink=s, **kw)


@pytest.mark.parametrize("kernel_path", ["default"], indirect=True)
def test_sink_accepted_on_the_npu_when_documented(monkeypatch):
    q, k, v, kw = problem("TND", n=4, d=128, dtype=BF16)
    monkeypatch.setattr(_inference, "on_npu_device", lambda t: True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out, _ = V2(q, k, v, learnable_sink=torch.zeros(4, dtype=BF16), **kw)
    assert out.shape == q.shape


# ----------------------------------------------------------------------------
# Positions the op must not read
# ----------------------------------------------------------------------------


def assert_unread_ignored(run):
    clean = run(0.0)
    for fill in FILLS:
        dirty = run(fill)
        for i, (c, d) in enumerate(zip(clean, dirty)):
            if d.is_floating_point():
                assert not d.isnan().any(), f"output {i}: NaN with {fill} in unread positions"
            torch.testing.assert_close(d, c, rtol=0, atol=0)


@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("layout", ["BSND", "BNSD"])
def test_unread_kv_past_actual_lengths(layout, sq, with_sink):
    b, n, nkv, skv, d = 3, 4, 2, 9, 16
    q, k, v = dense(layout, b, n, sq, d), dense(layout, b, nkv, skv, d), dense(layout, b, nkv, skv, d)
    lens = [9, 4, 0]
    unread = torch.arange(skv).view(1, -1) >= torch.tensor(lens).view(-1, 1)  # (B, S)
    where = unread[:, :, None, None] if layout == "BSND" else unread[:, None, :, None]
    s = sink(n) if with_sink else None

    def run(fill):
        kf, vf = k.masked_fill(where, fill), v.masked_fill(where, fill)
        return fia2(q, kf, vf, actual_seq_kvlen=lens, learnable_sink=s, num_query_heads=n, num_key_value_heads=nkv,
                    input_layout=layout, softmax_scale=0.25, return_softmax_lse=True)

    assert_unread_ignored(run)


@pytest.mark.parametrize("rank", [3, 4])
def test_unread_paged_slots_and_blocks_tnd_with_sink(rank):
    n, nkv, d, bs = 4, 2, 16, 16
    lens = [20, 3, 33]
    k, table = paged_cache(torch.randn(3, nkv, 33, d), lens, bs, rank, "-1", spare_blocks=3)
    v, _ = paged_cache(torch.randn(3, nkv, 33, d), lens, bs, rank, "-1", spare_blocks=3, table=table)
    used = torch.zeros(k.shape[0], bs, dtype=torch.bool)  # (block, slot) read by some batch
    for bi, length in enumerate(lens):
        for t in range(length):
            used[int(table[bi, t // bs]), t % bs] = True
    where = (~used)[:, :, None] if rank == 3 else (~used)[:, None, :, None]
    q, s = torch.randn(9, n, d), sink(n)

    def run(fill):
        return fia2(q, k.masked_fill(where, fill), v.masked_fill(where, fill), num_query_heads=n,
                    num_key_value_heads=nkv, input_layout="TND", softmax_scale=0.25, actual_seq_qlen=[2, 3, 9],
                    actual_seq_kvlen=lens, block_table=table, block_size=bs, atten_mask=MASK2048, sparse_mode=3,
                    learnable_sink=s, return_softmax_lse=True)

    assert_unread_ignored(run)

