"""The rewrite mechanism's guarantees, one test per defect class: a site is
rewritten only into exactly what the program computes, otherwise it stays with
the reason; every compiled program here is compared with eager.

Tolerances: float32 throughout, rtol 1e-5 / atol 1e-6 (the reference kernels
compute in float32 with another summation order than eager's matmuls)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from npu_attn_graph import Report
from npu_attn_graph.passes import PASSES, PIPELINE, RULES

RTOL, ATOL = 1e-5, 1e-6
npu = torch.ops.npu_attn


def compile_and_compare(fn, *args, dynamic=False, options=None):
    """Run fn eagerly and compiled on clones of args; compare outputs and every
    argument after the call (in-place writes). Returns (report, compiled args)."""
    expected_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    actual_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        expected = fn(*expected_args)
        report = Report()
        actual = torch.compile(fn, backend="npu_attn", dynamic=dynamic,
                               options={"report": report, **(options or {})})(*actual_args)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    for got, want in zip(actual_args, expected_args):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    return report, actual_args


def fused_ops(report: Report, name: str) -> list[torch.fx.Node]:
    target = getattr(npu, name).default
    return [n for gm in report.graph_modules for n in gm.graph.find_nodes(op="call_function", target=target)]


def qkv(b=2, n=4, sq=5, skv=7, d=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, s, d, generator=g, dtype=dtype) for s in (sq, skv, skv))


# ----------------------------------------------------------------------------
# The mechanism: rules, registry, fixed order
# ----------------------------------------------------------------------------


def test_the_rules_are_readable_from_the_rule_list():
    assert [r.name for r in RULES] == ["sdpa", "eager:matmul-softmax-matmul", "eager:attention-with-sinks",
                                        "static-cache-write",
                                        "sliding-window-cache-write", "sliding-window-fill", "paged-cache-write",
                                        "paged:gather-attention", "static-cache:kv-lengths",
                                        "moe:sorted-experts-grouped-matmul",
                                        "moe:router-top-k-softmax", "sparse:topk-gather-attention",
                                        "nsa:compressed-attention-topk"]
    assert all(r.match and r.check and r.rewrite for r in RULES)


def test_passes_option_selects_but_never_reorders():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    q, k, v = qkv()
    reversed_names = [p.name for p in reversed(PIPELINE)]
    report, _ = compile_and_compare(fn, q, k, v, options={"passes": reversed_names})
    ran = [name for name in report.pass_seconds if name in PASSES]
    assert ran == [p.name for p in PIPELINE if p.stage == "post_aot"]
    assert report.pass_rewrites["sdpa_to_fused"] == 1


def test_training_pass_is_a_pre_aot_stage_selected_by_its_name():
    q, k, v = (t.requires_grad_() for t in qkv(d=16))
    report = Report()
    fn = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v).sum(), backend="npu_attn",
                       options={"report": report, "passes": ["sdpa_to_fused"]})
    fn(q, k, v).backward()
    assert not any(s.fused_op == "npu_fusion_attention" for s in report.sites)
    assert PASSES["training_sdpa_to_fusion"].stage == "pre_aot"


# ----------------------------------------------------------------------------
# Checks by the op: its validation and the replaced node's shape/dtype/strides
# ----------------------------------------------------------------------------


def test_the_ops_own_message_is_the_reason():
    def fn(q, k, v):
        return (q @ k.transpose(-1, -2) * 0.2).softmax(-1) @ v

    report, _ = compile_and_compare(fn, *qkv(d=24))
    (site,) = report.sites
    assert not site.rewritten and "query head_dim (D) must be a multiple of 16, got 24" in site.reason


def test_decode_with_a_wider_value_takes_the_prompt_op():
    """The incremental op requires value.shape == key.shape; the prompt op does not."""
    def fn(q, k, v):
        return (q @ k.transpose(-1, -2) / 4).softmax(-1) @ v

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 1, 32, generator=g), torch.randn(2, 4, 9, 32, generator=g), \
        torch.randn(2, 4, 9, 48, generator=g)
    report, _ = compile_and_compare(fn, q, k, v)
    assert report.sites[0].fused_op == "npu_prompt_flash_attention"


def test_a_value_of_another_dtype_is_left_alone():
    def fn(q, k, v):
        return F.softmax(q @ k.transpose(-1, -2), dim=-1, dtype=torch.float32) @ v.float()

    report, _ = compile_and_compare(fn, *qkv(dtype=torch.bfloat16))
    (site,) = report.sites
    assert not site.rewritten and "value.dtype" in site.reason


@pytest.mark.parametrize("case", ["output viewed (N, B)", "BSND query flattened as BNSD", "BSND value"])
def test_bmm_operands_are_read_as_bmm_reads_them(case):
    """Whatever views the program puts around the two bmm's, the rewrite computes
    what bmm computed: per index of the flattened batch."""
    def out_view_swapped(q, k, v):
        b, n, sq, d = q.shape
        s = torch.bmm(q.reshape(b * n, sq, d), k.transpose(-1, -2).reshape(b * n, d, -1)).view(b, n, sq, -1)
        return torch.bmm(s.softmax(-1).reshape(b * n, sq, -1), v.reshape(b * n, -1, d)).view(n, b, sq, d)

    def query_bsnd(q, k, v):  # q is (B, S, N, D) but flattened as if (B, N, S, D)
        b, sq, n, d = q.shape
        s = torch.bmm(q.reshape(b * n, sq, d), k.transpose(-1, -2).reshape(b * n, d, -1)).view(b, n, sq, -1)
        return torch.bmm(s.softmax(-1).reshape(b * n, sq, -1), v.reshape(b * n, -1, d)).view(b, n, sq, d)

    def value_bsnd(q, k, v):
        b, n, sq, d = q.shape
        p = (q @ k.transpose(-1, -2) * 0.25).softmax(-1)
        return torch.bmm(p.reshape(b * n, sq, -1), v.reshape(b * n, -1, d)).view(b, n, sq, d)

    g = torch.Generator().manual_seed(2)
    if case == "output viewed (N, B)":
        fn, args = out_view_swapped, (torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 4, 5, 16, generator=g),
                                      torch.randn(2, 4, 5, 16, generator=g))
    elif case == "BSND query flattened as BNSD":
        fn, args = query_bsnd, (torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g),
                                torch.randn(1, 2, 5, 16, generator=g))
    else:
        fn, args = value_bsnd, (torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g),
                                torch.randn(1, 5, 2, 16, generator=g))
    report, _ = compile_and_compare(fn, *args)
    assert [s.rewritten for s in report.sites] == [True]


# ----------------------------------------------------------------------------
# Mask semantics by values
# ----------------------------------------------------------------------------


def test_a_bool_tensor_added_to_scores_is_a_bias_of_one():
    q, k, v = qkv()
    flags = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(3)) > 0.5

    def fn(q, k, v, flags):
        return (q @ k.transpose(-1, -2) / math.sqrt(32) + flags).softmax(-1) @ v

    report, _ = compile_and_compare(fn, q, k, v, flags)
    (node,) = fused_ops(report, "npu_prompt_flash_attention")
    assert node.kwargs["atten_mask"] is None and node.kwargs["pse_shift"] is not None


@pytest.mark.parametrize("shape", [(2, 1, 1, 7), (1, 1, 1, 7), (1, 7), (5, 7), (2, 1, 5, 1)])
def test_masks_broadcast_over_any_axis_as_torch_broadcasts_them(shape):
    q, k, v = qkv()
    keep = torch.rand(*shape, generator=torch.Generator().manual_seed(4)) > 0.3
    keep[..., 0] = True  # no fully masked row

    def sdpa(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    def hand(q, k, v, keep):
        return (q @ k.transpose(-1, -2) * 0.2).masked_fill(~keep, float("-inf")).softmax(-1) @ v

    for fn in (sdpa, hand):
        torch._dynamo.reset()
        report, _ = compile_and_compare(fn, q, k, v, keep)
        assert all(s.rewritten for s in report.sites), report.table()


def test_a_3d_mask_indexes_heads_so_a_per_head_one_stays():
    q, k, v = qkv(b=2, n=2)
    masked = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(5)) > 0.6
    masked[..., 0] = False

    def fn(q, k, v, masked):
        return (q @ k.transpose(-1, -2) * 0.2).masked_fill(masked, float("-inf")).softmax(-1) @ v

    report, _ = compile_and_compare(fn, q, k, v, masked)
    assert "per-head mask" in report.sites[0].reason
    torch._dynamo.reset()
    report, _ = compile_and_compare(fn, q, k, v, masked[:1])  # one (S_q, S_kv) pattern for all heads
    assert report.sites[0].rewritten


@pytest.mark.parametrize("form", ["masked_fill", "where", "additive", "sdpa"])
def test_a_finfo_min_mask_keeps_eagers_mean_of_v_for_rows_with_no_key(form):
    q, k, v = qkv()
    masked = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(6)) > 0.5
    masked[..., 0] = False
    masked[1, 0, 3] = True  # batch 1, query row 3: nothing to attend to
    low = torch.finfo(torch.float32).min

    def fn(q, k, v, masked):
        s = q @ k.transpose(-1, -2) * 0.2
        if form == "masked_fill":
            s = s.masked_fill(masked, low)
        elif form == "where":
            s = torch.where(~masked, s, low)
        elif form == "additive":
            s = s + torch.where(masked, low, 0.0)
        else:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(masked, low, 0.0))
        return s.softmax(-1) @ v

    report, _ = compile_and_compare(fn, q, k, v, masked)
    (site,) = report.sites
    assert site.rewritten and any("fully-masked-row fix-up" in n for n in site.notes)


@pytest.mark.parametrize("form", ["masked_fill", "additive", "sdpa_bool", "sdpa_math"])
def test_an_inf_mask_keeps_eagers_value_for_rows_with_no_key(form):
    """aten's softmax over a row of all -inf is NaN: the rewrite gives those rows NaN
    too (the op gives 0). SDPA (and its math decomposition's _safe_softmax) gives 0,
    as the op does, so no fix-up there."""
    q, k, v = qkv()
    masked = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(6)) > 0.5
    masked[..., 0] = False
    masked[1, 0, 3] = True  # batch 1, query row 3: nothing to attend to

    def fn(q, k, v, masked):
        if form == "sdpa_bool":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=~masked)
        if form == "sdpa_math":
            return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, ~masked)[0]
        s = q @ k.transpose(-1, -2) * 0.2
        s = s.masked_fill(masked, float("-inf")) if form == "masked_fill" else \
            s + torch.where(masked, float("-inf"), 0.0)
        return s.softmax(-1) @ v

    with torch.no_grad():
        expected = fn(q, k, v, masked)
        report = Report()
        actual = torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})(q, k, v, masked)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(expected[1, :, 3]).all() == (form in ("masked_fill", "additive"))
    (site,) = report.sites
    assert site.rewritten, report.table()
    assert any("rows with no key get NaN" in n for n in site.notes) == (form in ("masked_fill", "additive"))


def test_an_other_fill_value_is_not_a_mask():
    q, k, v = qkv()
    masked = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(7)) > 0.5

    def fn(q, k, v, masked):
        return (q @ k.transpose(-1, -2)).masked_fill(masked, -1e4).softmax(-1) @ v

    report, _ = compile_and_compare(fn, q, k, v, masked)
    assert "set to -10000, which is not a mask value" in report.sites[0].reason


def test_float16_additive_min_mask_on_rows_with_no_key():
    """float16's min absorbs scaled scores within +-16, so a row with no key left is the
    mean of V, what the program computes in float64 too (eager's float16 rounding of
    s - 65504 decides only beyond that); a float32 pse_shift would give softmax(s)."""
    q, k, v = qkv(sq=1, dtype=torch.float16)
    keep = torch.rand(2, 1, 1, 7, generator=torch.Generator().manual_seed(8)) > 0.5
    keep[0] = False  # batch 0: no key at all

    def fn(q, k, v, keep):
        bias = torch.where(keep, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
        return (q @ k.transpose(-1, -2) / math.sqrt(32) + bias).softmax(-1) @ v

    with torch.no_grad():
        expected = fn(q.double(), k.double(), v.double(), keep)
        report = Report()
        actual = torch.compile(fn, backend="npu_attn", options={"report": report})(q, k, v, keep)
    # float16 output: within 2 ulp of the float64 result (the kernel accumulates in float32).
    torch.testing.assert_close(actual.double(), expected, rtol=2e-3, atol=2e-3)
    (site,) = report.sites
    assert site.rewritten and any("fully-masked-row fix-up" in n for n in site.notes)


def test_symbolic_sizes_are_graph_values_never_literals():
    def fn(x, bias, w):
        b, s, _ = x.shape
        q = F.linear(x, w).view(b, s, 2, 16).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=bias)

    g = torch.Generator().manual_seed(9)
    report, _ = compile_and_compare(fn, torch.randn(2, 5, 32, generator=g), torch.randn(2, 1, 5, 5, generator=g),
                                    torch.randn(32, 32, generator=g), dynamic=True)
    assert report.sites[0].rewritten


# ----------------------------------------------------------------------------
# Atomic rewrites
# ----------------------------------------------------------------------------


def test_stacked_attention_sites_are_each_matched_on_the_rewritten_graph():
    def fn(q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        b = (a @ k.transpose(-1, -2) * 0.2).softmax(-1) @ v  # a is the query
        return F.scaled_dot_product_attention(q, b, b)  # b is key and value

    q, k, v = qkv(sq=7)
    report, _ = compile_and_compare(fn, q, k, v)
    assert [s.rewritten for s in report.sites] == [True, True, True]


# ----------------------------------------------------------------------------
# KV writes: positions, in place only where the user wrote in place
# ----------------------------------------------------------------------------


def _attend(q, k_cache, v_cache):
    return F.scaled_dot_product_attention(q, k_cache, v_cache)


def _cache_args(s=2, length=10, seed=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 2, s, 16, generator=g), torch.randn(1, 2, s, 16, generator=g),
            torch.randn(1, 2, s, 16, generator=g), torch.randn(1, 2, length, 16, generator=g),
            torch.randn(1, 2, length, 16, generator=g))


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_add_alpha_positions(alpha):
    def fn(q, k, v, kc, vc, start):
        pos = torch.add(torch.arange(k.shape[2]), start, alpha=alpha)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        return _attend(q, kc, vc)

    report, _ = compile_and_compare(fn, *_cache_args(), torch.tensor(2))
    assert all(s.rewritten for s in report.sites if s.kind == "kv_update")


def test_positions_plus_a_vector_are_not_contiguous():
    def fn(q, k, v, kc, vc, offsets):
        pos = torch.arange(k.shape[2]) + offsets
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        return _attend(q, kc, vc)

    report, _ = compile_and_compare(fn, *_cache_args(), torch.tensor([4, 0]))
    kv = [s for s in report.sites if s.kind == "kv_update"]
    assert kv and all(not s.rewritten and "needs a scalar offset" in s.reason for s in kv)


@pytest.mark.parametrize("start", [-2, -5])
def test_negative_slice_starts_are_normalised(start):
    def fn(q, k, v, kc, vc):
        kc[:, :, start:start + 2 if start + 2 else None] = k
        vc[:, :, start:start + 2 if start + 2 else None] = v
        return _attend(q, kc, vc)

    report, _ = compile_and_compare(fn, *_cache_args())
    assert all(s.rewritten for s in report.sites)


def test_index_put_wraps_negative_positions_as_eager_does():
    def fn(q, k, v, kc, vc, pos):
        kc[:, :, pos] = k
        vc[:, :, pos] = v
        return _attend(q, kc, vc)

    report, _ = compile_and_compare(fn, *_cache_args(s=1), torch.tensor([-3]))
    assert all(s.rewritten for s in report.sites)


@pytest.mark.parametrize("form", ["index_copy", "slice_scatter", "index_put"])
def test_an_out_of_place_write_never_touches_the_callers_cache(form):
    def fn(q, k, v, kc, vc, start):
        if form == "index_copy":
            pos = torch.arange(k.shape[2]) + start
            k_all, v_all = kc.index_copy(2, pos, k), vc.index_copy(2, pos, v)
        elif form == "slice_scatter":
            k_all = torch.slice_scatter(kc, k, dim=2, start=3, end=5)
            v_all = torch.slice_scatter(vc, v, dim=2, start=3, end=5)
        else:
            pos = torch.arange(k.shape[2]) + start
            k_all, v_all = kc.clone(), vc.clone()  # written in place, but into copies
            k_all[:, :, pos], v_all[:, :, pos] = k, v
        return _attend(q, k_all, v_all)

    args = (*_cache_args(), torch.tensor(3))
    report, actual_args = compile_and_compare(fn, *args)
    assert torch.equal(actual_args[3], args[3]) and torch.equal(actual_args[4], args[4])
    assert not fused_ops(report, "scatter_update_")


def test_a_view_read_after_the_write_sees_the_write_as_in_eager():
    def fn(q, k, v, kc, vc):
        rows = kc[:, :, 3:6]  # a view of the cache, read after the write it overlaps
        kc[:, :, 4:6] = k
        vc[:, :, 4:6] = v
        return _attend(q, kc, vc) + rows.sum()

    report, _ = compile_and_compare(fn, *_cache_args())
    assert fused_ops(report, "scatter_update_")


def test_a_functional_graph_reading_the_old_cache_after_the_write_keeps_the_copy():
    """A graph (as a functional program can hand over) that reads the cache input's
    old value after computing its new one: writing in place at the write would
    change that read, so the functional writer is used and the copy_ stays."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from npu_attn_graph.passes import PassContext, run_passes

    def program(kc, k, start):
        new = torch.index_copy(kc, 2, torch.arange(2) + start, k)
        old_total = kc.sum()  # the old value, after the write
        kc.copy_(new)
        return new, old_total

    g = torch.Generator().manual_seed(12)
    kc, k, pos = torch.randn(1, 2, 6, 16, generator=g), torch.randn(1, 2, 2, 16, generator=g), torch.tensor(1)
    gm = make_fx(program, tracing_mode="fake")(kc, k, pos)
    report = Report()
    run_passes(gm, list(PASSES), report, PassContext("inference"))
    (site,) = [s for s in report.sites if s.kind == "kv_update"]
    assert site.fused_op == "scatter_update" and "copy back into the cache kept" in site.notes[0]
    mine, theirs = kc.clone(), kc.clone()
    torch.testing.assert_close(gm(mine, k, pos), program(theirs, k, pos), rtol=0, atol=0)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_caches_in_buffers_written_over_several_steps():
    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("kc", torch.zeros(2, 2, 8, 16))
            self.register_buffer("vc", torch.zeros(2, 2, 8, 16))

        def forward(self, q, k, v, pos):
            self.kc.index_copy_(2, pos, k)
            self.vc.index_copy_(2, pos, v)
            return F.scaled_dot_product_attention(q, self.kc, self.vc)

    eager, compiled = Step(), Step()
    report = Report()
    run = torch.compile(compiled, backend="npu_attn", options={"report": report})
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for step in range(4):
            q, k, v = (torch.randn(2, 2, 1, 16, generator=g) for _ in range(3))
            pos = torch.tensor([step])
            torch.testing.assert_close(run(q, k, v, pos), eager(q, k, v, pos), rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(compiled.kc, eager.kc, rtol=0, atol=0)
            torch.testing.assert_close(compiled.vc, eager.vc, rtol=0, atol=0)
    assert fused_ops(report, "scatter_update_")


def test_a_min_mask_among_other_terms():
    """Row 0 is masked by the causal fill everywhere; the padding mask adds -inf or min
    on top. Eager gives that row the mean of V over the keys masked least (min + min
    overflows to -inf): only the exact sum of added terms may be fused."""
    q, k, v = qkv(sq=8, skv=7)
    low = torch.finfo(torch.float32).min
    causal = torch.ones(8, 7, dtype=torch.bool).tril(-1)  # row 0 keeps no key
    pad = torch.rand(2, 1, 1, 7, generator=torch.Generator().manual_seed(13)) > 0.4
    pad[..., 0] = True

    def fill_then_add(q, k, v, pad):
        s = (q @ k.transpose(-1, -2) * 0.2).masked_fill(~causal, low)
        return (s + torch.where(pad, 0.0, float("-inf"))).softmax(-1) @ v

    def add_then_add(q, k, v, pad):
        s = q @ k.transpose(-1, -2) * 0.2 + torch.where(causal, 0.0, low)
        return (s + torch.where(pad, 0.0, low)).softmax(-1) @ v

    report, _ = compile_and_compare(fill_then_add, q, k, v, pad)
    assert "combined with other mask or bias terms" in report.sites[0].reason
    torch._dynamo.reset()
    report, _ = compile_and_compare(add_then_add, q, k, v, pad)
    (node,) = fused_ops(report, "npu_prompt_flash_attention")
    assert node.kwargs["pse_shift"] is not None and node.kwargs["atten_mask"] is None


def test_float16_min_masks_among_other_added_terms_stay():
    q, k, v = qkv(sq=1, dtype=torch.float16)
    pad = torch.rand(2, 1, 1, 7, generator=torch.Generator().manual_seed(14)) > 0.5
    low = torch.finfo(torch.float16).min

    def fn(q, k, v, pad):
        s = q @ k.transpose(-1, -2) * 0.2 + torch.where(pad, 0.0, low).to(q.dtype)
        return (s + torch.where(pad.flip(-1), 0.0, low).to(q.dtype)).softmax(-1) @ v

    with torch.no_grad():
        report = Report()
        torch.compile(fn, backend="npu_attn", options={"report": report})(q, k, v, pad)
    assert "float16 torch.finfo(dtype).min mask combined" in report.sites[0].reason


@pytest.mark.parametrize("spelling", ["masked_fill on zeros", "scaled complement", "cast then scaled"])
def test_a_mask_is_read_from_its_values_whatever_the_spelling(spelling):
    """A term that is an element-wise function of one boolean is evaluated on True and
    False with the program's own ops: each spelling here is (0 where kept, min where not)."""
    q, k, v = qkv(sq=1, dtype=torch.float16)
    keep = torch.rand(2, 1, 1, 7, generator=torch.Generator().manual_seed(15)) > 0.4
    keep[0] = False  # batch 0: no key at all -> eager's mean of V

    def fn(q, k, v, keep):
        low = torch.finfo(q.dtype).min
        if spelling == "masked_fill on zeros":
            bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, low)
        elif spelling == "scaled complement":
            bias = ((1.0 - keep.to(q.dtype)) * low).to(q.dtype)
        else:
            bias = (~keep).to(q.dtype) * low
        return (q @ k.transpose(-1, -2) * 0.125 + bias).softmax(-1) @ v

    with torch.no_grad():
        expected = fn(q.double(), k.double(), v.double(), keep)
        report = Report()
        actual = torch.compile(fn, backend="npu_attn", options={"report": report})(q, k, v, keep)
    torch.testing.assert_close(actual.double(), expected, rtol=2e-3, atol=2e-3)  # float16: 2 ulp of fp64
    (site,) = report.sites
    assert site.rewritten and any("fully-masked-row fix-up" in n for n in site.notes), report.table()
