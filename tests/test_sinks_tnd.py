"""Attention with sinks (gpt-oss) fused for the NPU: FIA v2 in the TND layout.

On the NPU, npu_fused_infer_attention_score_v2 takes learnable_sink only as
bfloat16, with input_layout TND and a value head dim of 64 or 128 (its fake
enforces that for the GE target). A bfloat16 site is therefore rewritten into
TND: q (B*S_q, N, D), k/v (B*S_kv, N_kv, D) (un-repeated: GQA through
num_key_value_heads), cumulative actual_seq_qlen/actual_seq_kvlen, masks built
from positions as sparse_mode 3/4 with the compressed mask. A float32 site is
never cast: it stays with the op's dtype reason.

Tolerances (bfloat16 keeps 8 significant bits, unit roundoff 2^-8 = 3.9e-3):
eager rounds the scores, the softmax and the probabilities to bfloat16 at each
step, the fused op (reference kernel) computes in float32 and rounds its output
once. So the fused result is compared with a float64/float32 computation of
the same bfloat16 inputs and weights: its error must not exceed eager's own
bfloat16 error (a single site), or 1.5x it (the whole model, where the two
roundings feed different later roundings). Greedy tokens of a random tiny
bfloat16 model are not robust to that difference (a near tie flips), so decode
is compared teacher-forced, token by token, where eager's top-2 margin is
larger than the logits' error bound.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from npu_attn_graph import Report, to_ge_graph
from npu_attn_graph.passes import PASSES, PassContext, run_passes

T = pytest.importorskip("transformers")

from test_ge_converters import attr_value, const_value, data_index, producer  # noqa: E402

V2 = "npu_fused_infer_attention_score_v2"
WINDOW = 4
npu_attn = torch.ops.npu_attn


def ge_target_backend(report: Report):
    """The passes as TorchAir gets them (target "ge": the NPU's rules), the graph run by torch."""
    def compiler(gm: torch.fx.GraphModule, example_inputs):
        run_passes(gm, list(PASSES), report, PassContext("inference", "ge"))
        report.graph_modules.append(gm)
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=compiler, inference_compiler=compiler, keep_inference_input_mutations=True)


def gptoss(dtype=torch.bfloat16, head_dim=64):
    from test_attention_sinks import _gptoss

    model, cfg = _gptoss(window=WINDOW, head_dim=head_dim)
    return model.to(dtype), cfg


def _ids(b=2, s=10):
    return torch.randint(1, 128, (b, s), generator=torch.Generator().manual_seed(1))


def _attention(report: Report):
    return [s for s in report.sites if s.kind == "attention"]


def _fused_nodes(report: Report):
    target = npu_attn.npu_fused_infer_attention_score_v2.default
    return [n for gm in report.graph_modules for n in gm.graph.find_nodes(op="call_function", target=target)]


# ----------------------------------------------------------------------------
# One site: the rewrite against the program, on the same inputs
# ----------------------------------------------------------------------------


def sink_attention(q, k, v, sinks, window):
    """gpt-oss's eager attention with its mask built from positions (causal, or a
    sliding window of `window` keys), GQA through repeat_interleave."""
    s_q, s_kv = q.shape[-2], k.shape[-2]
    rows = torch.arange(s_q).view(-1, 1) + (s_kv - s_q)
    cols = torch.arange(s_kv).view(1, -1)
    keep = cols <= rows
    if window is not None:
        keep = keep & (cols > rows - window)
    mask = torch.zeros(s_q, s_kv, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, s_q, -1)
    combined = torch.cat([scores, column], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(probs, v)


def _site_inputs(dtype, d=64, s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, s, d, generator=g).to(dtype)
    k = torch.randn(2, 2, s, d, generator=g).to(dtype)
    v = torch.randn(2, 2, s, d, generator=g).to(dtype)
    sinks = torch.randn(4, generator=g).to(dtype)
    return q, k, v, sinks


@pytest.mark.parametrize("window,mode", [(None, 3), (WINDOW, 4)])
def test_bf16_site_is_tnd_and_at_least_as_exact_as_eager(window, mode):
    q, k, v, sinks = _site_inputs(torch.bfloat16)
    report = Report()
    with torch.no_grad():
        eager = sink_attention(q, k, v, sinks, window)
        exact = sink_attention(*(x.double() for x in (q, k, v, sinks)), window)
        fused = torch.compile(lambda *a: sink_attention(*a, window), backend=ge_target_backend(report),
                              fullgraph=True)(q, k, v, sinks)
    (site,) = _attention(report)
    assert site.rewritten and site.fused_op == V2 and site.layout == "TND" and site.sparse_mode == mode, \
        report.table()
    assert site.gqa_ratio == 2 and site.pattern.endswith("+repeat_kv")
    (node,) = _fused_nodes(report)
    assert node.kwargs["input_layout"] == "TND" and node.kwargs["num_key_value_heads"] == 2
    assert node.kwargs["actual_seq_qlen"] == [12, 24] and node.kwargs["actual_seq_kvlen"] == [12, 24]
    assert node.kwargs["learnable_sink"].meta["val"].dtype == torch.bfloat16
    assert node.kwargs["pre_tokens"] == (WINDOW - 1 if window else 2147483647)
    assert [tuple(a.meta["val"].shape) for a in node.args[:3]] == [(24, 4, 64), (24, 2, 64), (24, 2, 64)]
    assert fused.dtype == torch.bfloat16 and fused.shape == eager.shape
    fused_error = (fused.double() - exact).abs().max().item()
    eager_error = (eager.double() - exact).abs().max().item()
    assert fused_error <= eager_error, (fused_error, eager_error)


def test_float32_site_keeps_the_dtype_reason():
    """No silent cast of a float32 model's sink: the op's own reason stays, TND is not tried."""
    q, k, v, sinks = _site_inputs(torch.float32)
    report = Report()
    with torch.no_grad():
        actual = torch.compile(lambda *a: sink_attention(*a, WINDOW), backend=ge_target_backend(report),
                               fullgraph=True)(q, k, v, sinks)
    torch.testing.assert_close(actual, sink_attention(q, k, v, sinks, WINDOW), rtol=0, atol=0)
    (site,) = _attention(report)
    assert not site.rewritten
    assert site.reason == f"{V2}: learnable_sink.dtype must be torch.bfloat16 on the NPU, got torch.float32", \
        site.reason
    assert not _fused_nodes(report)


def test_bf16_head_dim_16_keeps_the_ops_reason():
    q, k, v, sinks = _site_inputs(torch.bfloat16, d=16)
    report = Report()
    with torch.no_grad():
        torch.compile(lambda *a: sink_attention(*a, None), backend=ge_target_backend(report),
                      fullgraph=True)(q, k, v, sinks)
    (site,) = _attention(report)
    assert not site.rewritten and "requires a value head dim in [64, 128] on the NPU, got 16" in site.reason, \
        site.reason


# ----------------------------------------------------------------------------
# gpt-oss, bfloat16, head_dim 64
# ----------------------------------------------------------------------------


def _logit_errors(model, run):
    """(max |fused - float32|, max |eager - float32|, max |fused - eager|) of run(model)'s logits."""
    reference = copy.deepcopy(model).float()
    report = Report()
    with torch.no_grad():
        exact = run(reference).double()
        eager = run(model).double()
        fused = run(torch.compile(model, backend=ge_target_backend(report))).double()
    return report, (fused - exact).abs().max().item(), (eager - exact).abs().max().item(), \
        (fused - eager).abs().max().item()


def test_gptoss_bf16_prefill_fuses_every_sink_site_in_tnd():
    model, _ = gptoss()
    ids = _ids()
    report, fused_error, eager_error, difference = _logit_errors(model, lambda m: m(ids, use_cache=False).logits)
    # Measured: fused 0.125, eager 0.118 from float32 (logits up to 6), fused vs eager 0.133.
    assert fused_error <= 1.5 * eager_error, (fused_error, eager_error, difference)
    sites = _attention(report)
    assert len(sites) == 2 and all(s.rewritten and s.fused_op == V2 and s.layout == "TND" for s in sites), \
        report.table()
    # Layer 0 slides (window 4: band -3 <= kv - q <= 0), layer 1 is causal.
    assert [s.sparse_mode for s in sites] == [4, 3], report.table()
    for site in sites:
        # V is the projection's (B, S, N, D): a view; rope'd q/k are BNSD: a transpose copy each.
        assert "query transposed into TND (tokens, heads, D): a copy" in site.notes
        assert "key transposed into TND (tokens, heads, D): a copy" in site.notes
        assert not any(n.startswith("value transposed") or "output copied" in n for n in site.notes), site.notes
    for node in _fused_nodes(report):
        assert node.kwargs["actual_seq_qlen"] == [10, 20] and node.kwargs["actual_seq_kvlen"] == [10, 20]
    # The TND output is the o_proj's (B, S, N*D) input as it is: no transpose, no copy after the op.
    for node in _fused_nodes(report):
        (out,) = node.users
        (bsnd,) = out.users
        assert bsnd.target is torch.ops.aten.reshape.default and tuple(bsnd.meta["val"].shape) == (2, 10, 4, 64)
        assert all(u.target is torch.ops.aten.view.default for u in bsnd.users), list(bsnd.users)


def test_gptoss_bf16_ge_graph_has_one_fused_op_per_site_with_learnable_sink(tmp_path):
    model, _ = gptoss()
    with torch.no_grad():
        result = to_ge_graph(model, _ids(), use_cache=False, out_dir=tmp_path)
    sites = _attention(result.report)
    assert len(sites) == 2 and all(s.rewritten and s.layout == "TND" for s in sites), result.report.table()
    assert result.op_type_counts.get("FusedInferAttentionScore") == 2, result.summary()
    assert "SoftmaxV2" not in result.op_type_counts, result.summary()
    # The whole bfloat16 model is one complete GE graph: its MoE blocks (aten._grouped_mm in
    # bfloat16) and routers are fused too.
    assert result.single_graph, result.summary()
    assert (result.op_type_counts["GroupedMatmul"], result.op_type_counts["MoeGatingTopKSoftmaxV2"]) == (4, 2)
    assert all(s.rewritten for s in result.report.sites), result.report.table()
    graph = result.graphs[0].graph_def
    ops = [op for op in graph.op if op.type == "FusedInferAttentionScore"]
    sink_inputs = set()
    for op, (mode, pre) in zip(ops, [(4, WINDOW - 1), (3, 2147483647)]):
        assert attr_value(op, "input_layout") == "TND" and attr_value(op, "sparse_mode") == mode
        assert attr_value(op, "pre_tokens") == pre and attr_value(op, "num_key_value_heads") == 2
        sink, index = producer(graph, op, "learnable_sink")
        assert sink.type == "Data" and index == 0, sink.type  # the layer's sinks parameter, as it is
        meta = sink.output_desc[0].attr["_meta"].s.decode()
        assert meta.startswith("Tensor(dtype=torch.bfloat16, shape=torch.Size([4])"), meta
        sink_inputs.add(data_index(sink))
        for name in ("actual_seq_lengths", "actual_seq_lengths_kv"):
            assert const_value(producer(graph, op, name)[0])[1] == [10, 20]
        assert producer(graph, op, "atten_mask") is not None  # the compressed mask of sparse modes 3/4
    assert len(sink_inputs) == 2


def test_gptoss_float32_prefill_keeps_the_dtype_reason_for_the_npu():
    model, _ = gptoss(torch.float32)
    report = Report()
    with torch.no_grad():
        torch.compile(model, backend=ge_target_backend(report))(_ids(), use_cache=False)
    sites = _attention(report)
    assert len(sites) == 2 and all(
        not s.rewritten and s.reason == f"{V2}: learnable_sink.dtype must be torch.bfloat16 on the NPU, got "
        "torch.float32" for s in sites), report.table()


def test_gptoss_bf16_static_cache_prefill_tnd_decode_left_alone():
    """A StaticCache driven by hand (the masks are built in the graph from positions):
    the prefill's sites are TND (the full-attention layer reads the whole cache,
    transposed into TND: a copy, noted); a decode step's mask depends on the
    cache position (a graph input), a full (B, 1, 1, S_kv) mask that TND does not
    take, so decode stays plain math with the op's reason. Decoding past the
    window, teacher-forced on eager's greedy tokens: each step's logits within the
    bfloat16 bound, tokens equal wherever eager's top-2 margin exceeds twice it."""
    model, cfg = gptoss()
    ids = _ids(s=6)
    steps = 6

    def run(forward, tokens=None):
        """Last-position logits of the prefill and `steps` decode steps, fed `tokens`
        (None: greedy, each step fed the previous argmax)."""
        cache = T.StaticCache(config=cfg, max_cache_len=32)
        logits = [forward(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]]
        for i in range(steps):
            fed = logits[-1].argmax(-1, keepdim=True) if tokens is None else tokens[:, i:i + 1]
            logits.append(forward(input_ids=fed, past_key_values=cache, use_cache=True).logits[:, -1])
        return torch.stack(logits, 1).double()

    report = Report()
    with torch.no_grad():
        eager = run(model.forward)
        tokens = eager.argmax(-1)  # eager's greedy tokens, fed to every run below
        exact = run(copy.deepcopy(model).float().forward, tokens)
        fused = run(torch.compile(model.forward, backend=ge_target_backend(report), fullgraph=True), tokens)
    bound = 1.5 * (eager - exact).abs().max().item()
    assert (fused - exact).abs().max().item() <= bound
    top2 = eager.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * bound  # no error within the bound can flip these
    assert clear.any()
    assert torch.equal(fused.argmax(-1)[clear], tokens[clear])
    prefill = [s for s in _attention(report) if s.graph == "inference" and s.rewritten]
    decode = [s for s in _attention(report) if not s.rewritten]
    assert len(prefill) == 2 and all(s.layout == "TND" for s in prefill), report.table()
    assert "value transposed into TND (tokens, heads, D): a copy" in prefill[1].notes  # the cache's BNSD V
    assert len(decode) == 2 and all(
        "atten_mask with input_layout TND is only supported as the compressed mask" in s.reason for s in decode), \
        report.table()


def test_gptoss_bf16_generate_static_cache_tokens_equal_eager():
    """generate() builds eager attention's 4-D float mask before the compiled forward:
    to the graph an additive tensor (pse_shift), which TND does not take, so every
    site stays plain math with the op's reason, and the tokens are eager's exactly
    (16 new tokens, past the window of 4)."""
    model, cfg = gptoss()
    ids = _ids(s=6)

    def generate():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              pad_token_id=0, past_key_values=T.StaticCache(config=cfg, max_cache_len=32))

    report = Report()
    with torch.no_grad():
        expected = generate()
        model.forward = torch.compile(model.forward, backend=ge_target_backend(report), fullgraph=True)
        actual = generate()
    assert torch.equal(actual, expected)
    sites = _attention(report)
    assert len(sites) == 4 and all(not s.rewritten and "pse_shift is not supported with input_layout TND" in s.reason
                                   for s in sites), report.table()
