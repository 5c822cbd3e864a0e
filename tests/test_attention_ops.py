"""npu_prompt_flash_attention / npu_incre_flash_attention / npu_fused_infer_attention_score
against the independent fp64 oracle in tests/oracle.py."""

from __future__ import annotations


import pytest
import torch

from npu_attn_graph.kernels.fused_infer_attention_score import npu_fused_infer_attention_score as fia
from npu_attn_graph.kernels.incre_flash_attention import npu_incre_flash_attention as ifa
from npu_attn_graph.kernels.prompt_flash_attention import npu_prompt_flash_attention as pfa
from attention_inputs import cumulative, dense, paged_cache
from oracle import INT_MAX, bnsd, fia_oracle, ifa_oracle, pfa_oracle

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Tolerances. fp32: the reference and the oracle differ only by fp32 rounding of
# the same sums. fp16/bf16: the oracle is fed the same rounded fp16/bf16 inputs;
# the reference accumulates in fp32 and only the final cast to the output dtype
# rounds, so the error is ~1 ulp of the output dtype: fp16 eps = 9.8e-4,
# bf16 eps = 7.8e-3 -- the tolerances below are twice that.
TOL = {FP32: (1e-5, 1e-6), FP16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}


pytestmark = pytest.mark.usefixtures("kernel_path")  # every kernel path (conftest)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="module")
def compressed_mask():
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    rtol, atol = TOL[actual.dtype]
    if actual.dtype == FP32:
        torch.testing.assert_close(actual, expected.to(FP32), rtol=rtol, atol=atol)
    else:
        torch.testing.assert_close(actual.to(FP32), expected.to(FP32), rtol=rtol, atol=atol)


def assert_lse_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == FP32
    # +inf (empty rows) must match exactly; assert_close treats inf == inf.
    torch.testing.assert_close(actual, expected.to(FP32), rtol=1e-5, atol=1e-5)


def quant_channels(t: torch.Tensor, out: torch.Tensor, layout_out: str, heads: int) -> torch.Tensor:
    """A per-tensor / per-channel (N*Dv elements) quant parameter broadcast to the output layout."""
    t = t.to(torch.float64)
    if t.numel() == 1:
        return t.reshape(())
    if layout_out == "BSH":
        return t.reshape(-1)
    dv = t.numel() // heads
    if layout_out == "BNSD":
        return t.reshape(heads, 1, dv)
    return t.reshape(heads, dv)  # BSND, TND


def assert_int8_matches(actual: torch.Tensor, expected: torch.Tensor, unquantised: torch.Tensor,
                        scale2: torch.Tensor, offset2: torch.Tensor | None, layout_out: str, heads: int) -> None:
    """int8 outputs are compared exactly, except that a difference of 1 is allowed
    where the exact pre-rounding value lies on a rounding tie (x.5): the reference
    computes attention in fp32 and the oracle in fp64, so values within ~1e-6 of
    a tie may legitimately round to neighbouring integers."""
    assert actual.dtype == torch.int8 and expected.dtype == torch.int8
    assert actual.shape == expected.shape
    diff = actual.to(torch.int32) - expected.to(torch.int32)
    assert diff.abs().max().item() <= 1, diff.abs().max()
    if diff.any():
        y = unquantised * quant_channels(scale2, unquantised, layout_out, heads)
        if offset2 is not None:
            y = y + quant_channels(offset2, unquantised, layout_out, heads)
        y = y.expand_as(unquantised)[diff != 0]
        distance_to_tie = ((y - y.floor()) - 0.5).abs()
        assert distance_to_tie.max().item() < 1e-3, distance_to_tie.max()


def dense_int8(layout: str, b: int, n: int, s: int, d: int) -> torch.Tensor:
    return torch.randint(-128, 128, dense(layout, b, n, s, d).shape, dtype=torch.int8)


def problem(layout: str, *, b=2, n=8, gqa=1, sq=6, skv=10, d=16, dv=None, dtype=FP32,
            q_seg=(3, 7, 1), kv_seg=(5, 9, 4)):
    """query, key, value and the layout/head kwargs; TND uses the ragged segments."""
    nkv = n // gqa
    dv = dv or d
    kw = dict(num_heads=n, num_key_value_heads=0 if gqa == 1 else nkv, input_layout=layout)
    if layout == "TND":
        q = torch.randn(sum(q_seg), n, d).to(dtype)
        k = torch.randn(sum(kv_seg), nkv, d).to(dtype)
        v = torch.randn(sum(kv_seg), nkv, dv).to(dtype)
        kw.update(actual_seq_lengths=cumulative(q_seg), actual_seq_lengths_kv=cumulative(kv_seg))
    else:
        q = dense(layout, b, n, sq, d, dtype)
        k = dense(layout, b, nkv, skv, d, dtype)
        v = dense(layout, b, nkv, skv, dv, dtype)
    return q, k, v, kw


def check_pfa(q, k, v, **kw) -> torch.Tensor:
    actual = pfa(q, k, v, **kw)
    expected = pfa_oracle(q, k, v, **kw)
    assert_matches(actual, expected)
    return actual


def check_fia(q, k, v, **kw):
    out, lse = fia(q, k, v, **kw)
    e_out, e_lse = fia_oracle(q, k, v, **kw)
    assert_matches(out, e_out)
    if kw.get("softmax_lse_flag"):
        assert_lse_matches(lse, e_lse)
    else:
        assert lse.shape == (1,) and lse.dtype == FP32 and lse.item() == 0
    return out, lse


def check_ifa(q, k, v, **kw) -> torch.Tensor:
    actual = ifa(q, k, v, **kw)
    expected = ifa_oracle(q, k, v, **kw)
    assert_matches(actual, expected)
    return actual




# ----------------------------------------------------------------------------
# Layouts and GQA
# ----------------------------------------------------------------------------

LAYOUTS = ["BSH", "BSND", "BNSD", "BNSD_BSND", "TND"]


@pytest.mark.parametrize("gqa", [1, 2, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pfa_layouts_gqa(layout, gqa):
    q, k, v, kw = problem(layout, gqa=gqa)
    out = check_pfa(q, k, v, scale_value=0.25, **kw)
    if layout == "BNSD_BSND":
        assert out.shape == (2, 6, 8, 16)


@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pfa_layouts_half_dtypes(layout, dtype):
    q, k, v, kw = problem(layout, gqa=2, dtype=dtype)
    out = check_pfa(q, k, v, scale_value=0.25, **kw)
    assert out.dtype == dtype


@pytest.mark.parametrize("gqa", [1, 2, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fia_prompt_layouts_gqa(layout, gqa):
    q, k, v, kw = problem(layout, gqa=gqa)
    check_fia(q, k, v, scale=0.25, softmax_lse_flag=True, **kw)


@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fia_layouts_half_dtypes(layout, dtype):
    q, k, v, kw = problem(layout, gqa=2, dtype=dtype)
    out, _ = check_fia(q, k, v, scale=0.25, softmax_lse_flag=True, **kw)
    assert out.dtype == dtype


@pytest.mark.parametrize("gqa", [1, 2, 8])
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
def test_fia_incremental_layouts_gqa(layout, gqa):
    q, k, v, kw = problem(layout, gqa=gqa, sq=1, b=3)
    check_fia(q, k, v, scale=0.25, softmax_lse_flag=True, actual_seq_lengths_kv=[10, 3, 7], **kw)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("gqa", [1, 2, 8])
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
def test_ifa_layouts_gqa(layout, gqa, dtype):
    q, k, v, kw = problem(layout, gqa=gqa, sq=1, b=3, skv=13, dtype=dtype)
    out = check_ifa(q, k, v, scale_value=0.25, actual_seq_lengths=[13, 1, 8], **kw)
    assert out.shape == q.shape and out.dtype == dtype


def test_fia_value_head_dim_differs():
    q, k, v, kw = problem("BSH", gqa=2, d=32, dv=16)
    out, _ = check_fia(q, k, v, scale=0.2, **kw)
    assert out.shape == (2, 6, 8 * 16)
    q, k, v, kw = problem("TND", gqa=2, d=32, dv=16)
    out, _ = check_fia(q, k, v, scale=0.2, softmax_lse_flag=True, **kw)
    assert out.shape == (11, 8, 16)


# ----------------------------------------------------------------------------
# User masks (sparse_mode 0 / 1)
# ----------------------------------------------------------------------------

MASK_DTYPES = [torch.bool, torch.int8, torch.uint8]


def user_mask(kind: str, b: int, sq: int, skv: int, dtype, p: float = 0.3) -> torch.Tensor:
    shapes = {
        "2d": (sq, skv), "2d_padded": (sq + 3, skv + 5),
        "3d_b": (b, sq, skv), "3d_1": (1, sq, skv),
        "4d_b": (b, 1, sq, skv), "4d_1": (1, 1, sq, skv), "4d_padded": (b, 1, sq + 2, skv + 6),
    }
    m = torch.rand(shapes[kind]) < p
    m[..., 2, :] = True  # a fully masked query row -> zeros
    return m.to(dtype)


@pytest.mark.parametrize("sparse_mode", [0, 1])
@pytest.mark.parametrize("sq,skv", [(6, 11), (9, 9)])
@pytest.mark.parametrize("kind", ["2d", "2d_padded", "3d_b", "3d_1", "4d_b", "4d_1", "4d_padded"])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_pfa_user_mask(mask_dtype, kind, sq, skv, sparse_mode):
    q, k, v, kw = problem("BSH", b=2, n=4, gqa=2, sq=sq, skv=skv)
    mask = user_mask(kind, 2, sq, skv, mask_dtype)
    out = check_pfa(q, k, v, atten_mask=mask, sparse_mode=sparse_mode, scale_value=0.25,
                    pre_tokens=INT_MAX, next_tokens=INT_MAX, **kw)
    assert torch.all(out[:, 2] == 0)  # the fully masked row


@pytest.mark.parametrize("kind", ["2d", "3d_b", "4d_1"])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_fia_prompt_user_mask(mask_dtype, kind):
    q, k, v, kw = problem("BNSD", b=2, n=4, gqa=4, sq=7, skv=12)
    mask = user_mask(kind, 2, 7, 12, mask_dtype)
    out, lse = check_fia(q, k, v, atten_mask=mask, scale=0.25, softmax_lse_flag=True, **kw)
    assert torch.all(out[:, :, 2] == 0) and torch.all(torch.isinf(lse[:, :, 2]))


@pytest.mark.parametrize("shape", ["(B,KV)", "(B,1,KV)", "(B,1,1,KV)", "(1,KV)", "padded"])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_ifa_and_fia_incremental_mask(mask_dtype, shape):
    b, skv = 3, 13
    q, k, v, kw = problem("BSH", b=b, n=4, gqa=2, sq=1, skv=skv)
    dims = {"(B,KV)": (b, skv), "(B,1,KV)": (b, 1, skv), "(B,1,1,KV)": (b, 1, 1, skv), "(1,KV)": (1, skv),
            "padded": (b, 1, 1, skv + 7)}[shape]
    mask = (torch.rand(dims) < 0.4)
    if shape != "(1,KV)":
        mask[1] = True  # batch 1 fully masked -> zeros
    mask = mask.to(mask_dtype)
    out = check_ifa(q, k, v, atten_mask=mask, scale_value=0.3, **kw)
    if shape != "(1,KV)":
        assert torch.all(out[1] == 0)
    check_fia(q, k, v, atten_mask=mask, scale=0.3, softmax_lse_flag=True, actual_seq_lengths_kv=[13, 5, 9], **kw)


# ----------------------------------------------------------------------------
# sparse_mode 0 bands and sparse modes 2/3/4
# ----------------------------------------------------------------------------

SEQ_SHAPES = [(6, 11), (9, 9), (11, 6)]
BANDS_MODE0 = [None, (INT_MAX, 0), (3, 2), (2, -1), (-1, 3), (0, 0), (INT_MAX, INT_MAX), (4, -3)]


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("sq,skv", SEQ_SHAPES)
@pytest.mark.parametrize("band", BANDS_MODE0, ids=str)
def test_pfa_mode0_band_with_mask(band, sq, skv, ragged):
    q, k, v, kw = problem("BNSD", b=2, n=4, gqa=2, sq=sq, skv=skv)
    mask = torch.rand(2, 1, sq, skv) < 0.1
    if ragged:
        kw.update(actual_seq_lengths=[sq - 2, sq], actual_seq_lengths_kv=[skv, skv - 3])
    if band is not None:  # None: the PFA defaults pre_tokens=2147483647, next_tokens=0
        kw.update(pre_tokens=band[0], next_tokens=band[1])
    check_pfa(q, k, v, atten_mask=mask, scale_value=0.25, **kw)


@pytest.mark.parametrize("band", [(0, 0), (2, -1), (INT_MAX, 0)], ids=str)
def test_pfa_mode0_without_mask_ignores_band(band):
    q, k, v, kw = problem("BSND", n=4, sq=7, skv=9)
    full = pfa(q, k, v, scale_value=0.25, pre_tokens=INT_MAX, next_tokens=INT_MAX, **kw)
    out = check_pfa(q, k, v, scale_value=0.25, pre_tokens=band[0], next_tokens=band[1], **kw)
    torch.testing.assert_close(out, full, rtol=0, atol=0)


MODES_234 = [(2, None), (3, None), (4, None), (4, (3, 1)), (4, (5, -2)), (4, (-2, 4)), (4, (0, 0)),
             (4, (INT_MAX, INT_MAX)), (2, (1, 1)), (3, (1, -1))]


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("sq,skv", SEQ_SHAPES)
@pytest.mark.parametrize("mode,band", MODES_234, ids=str)
def test_pfa_compressed_mask_modes(mode, band, sq, skv, ragged, compressed_mask):
    q, k, v, kw = problem("BSH", b=2, n=4, gqa=2, sq=sq, skv=skv)
    if ragged:
        kw.update(actual_seq_lengths=[sq - 2, sq], actual_seq_lengths_kv=[skv, skv - 3])
    if band is not None:
        kw.update(pre_tokens=band[0], next_tokens=band[1])
    check_pfa(q, k, v, atten_mask=compressed_mask, sparse_mode=mode, scale_value=0.25, **kw)


@pytest.mark.parametrize("form", ["2d", "3d", "4d"])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("mode", [2, 3, 4])
def test_compressed_mask_forms(mode, mask_dtype, form, compressed_mask):
    mask = compressed_mask.to(mask_dtype)
    mask = {"2d": mask, "3d": mask[None], "4d": mask[None, None]}[form]
    q, k, v, kw = problem("BSND", b=2, n=4, gqa=1, sq=8, skv=12)
    kw.update(actual_seq_lengths=[5, 8], actual_seq_lengths_kv=[12, 4])
    check_pfa(q, k, v, atten_mask=mask, sparse_mode=mode, scale_value=0.25, **kw)
    check_fia(q, k, v, atten_mask=mask, sparse_mode=mode, scale=0.25, softmax_lse_flag=True, **kw)


@pytest.mark.parametrize("mode,band", [(3, None), (2, None), (4, (2, 1))], ids=str)
def test_fia_tnd_compressed_modes(mode, band, compressed_mask):
    q, k, v, kw = problem("TND", n=4, gqa=2, q_seg=(3, 7, 1, 4), kv_seg=(5, 9, 4, 2))
    if band is not None:
        kw.update(pre_tokens=band[0], next_tokens=band[1])
    check_fia(q, k, v, atten_mask=compressed_mask, sparse_mode=mode, scale=0.25, softmax_lse_flag=True, **kw)
    check_pfa(q, k, v, atten_mask=compressed_mask, sparse_mode=mode, scale_value=0.25, **kw)


@pytest.mark.parametrize("sparse_mode", [1, 2, 3, 4])
def test_fia_incremental_ignores_sparse_mode(sparse_mode):
    """Query S == 1: sparse_mode, pre_tokens and next_tokens are ignored (no mask needed)."""
    q, k, v, kw = problem("BNSD", b=2, n=4, sq=1, skv=9)
    base, _ = fia(q, k, v, scale=0.3, actual_seq_lengths_kv=[9, 4], **kw)
    out, _ = check_fia(q, k, v, scale=0.3, actual_seq_lengths_kv=[9, 4], sparse_mode=sparse_mode,
                       pre_tokens=0, next_tokens=-1, **kw)
    torch.testing.assert_close(out, base, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# Ragged actual lengths
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_BSND"])
def test_pfa_ragged_lengths_zero_padded_rows(layout):
    q, k, v, kw = problem(layout, b=3, n=4, gqa=2, sq=7, skv=10)
    q_lens, kv_lens = [3, 7, 0], [10, 4, 0]
    out = check_pfa(q, k, v, scale_value=0.25, actual_seq_lengths=q_lens, actual_seq_lengths_kv=kv_lens,
                    next_tokens=INT_MAX, **kw)
    out_bnsd = bnsd(out, "BSND" if layout in ("BSND", "BNSD_BSND") else layout, 4)
    for b, n in enumerate(q_lens):
        assert torch.all(out_bnsd[b, :, n:] == 0)
        assert torch.any(out_bnsd[b, :, :n] != 0) or n == 0


def test_pfa_empty_kv_batch_is_zero():
    q, k, v, kw = problem("BSH", b=2, n=2, sq=5, skv=6)
    out = check_pfa(q, k, v, scale_value=0.25, actual_seq_lengths_kv=[6, 0], **kw)
    assert torch.all(out[1] == 0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_lengths_broadcast_and_tensor(as_tensor):
    q, k, v, kw = problem("BSH", b=3, n=4, sq=6, skv=9)
    q_lens, kv_lens = [4], [7, 9, 2, 99]  # one entry broadcast; extra entries ignored
    if as_tensor:
        q_lens, kv_lens = torch.tensor(q_lens), torch.tensor(kv_lens)
    check_pfa(q, k, v, scale_value=0.25, actual_seq_lengths=q_lens, actual_seq_lengths_kv=kv_lens, **kw)
    check_fia(q, k, v, scale=0.25, actual_seq_lengths=q_lens, actual_seq_lengths_kv=kv_lens,
              softmax_lse_flag=True, **kw)


def test_fia_tnd_lse_and_zero_length_segments():
    q, k, v, kw = problem("TND", n=4, gqa=4, q_seg=(3, 0, 5, 2), kv_seg=(4, 6, 0, 3))
    out, lse = check_fia(q, k, v, scale=0.25, softmax_lse_flag=True, **kw)
    assert lse.shape == (10, 4, 1)
    assert torch.all(out[3:8] == 0) and torch.all(torch.isinf(lse[3:8]))  # segment 2 has no keys


# ----------------------------------------------------------------------------
# Paged KV caches
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("table_fill", ["-1", "garbage"])
@pytest.mark.parametrize("rank", [3, 4])
def test_ifa_paged(rank, table_fill, gqa):
    b, n, d, bs = 3, 4, 16, 16
    nkv = n // gqa
    layout = "BNSD" if rank == 4 else "BSH"
    lens = [17, 40, 5]
    kd = torch.randn(b, nkv, 40, d)
    vd = torch.randn(b, nkv, 40, d)
    k, table = paged_cache(kd, lens, bs, rank, table_fill)
    v, _ = paged_cache(vd, lens, bs, rank, table_fill, table=table)
    q = dense(layout, b, n, 1, d)
    kw = dict(num_heads=n, num_key_value_heads=nkv, input_layout=layout, scale_value=0.25,
              actual_seq_lengths=lens, block_table=table, block_size=bs)
    out = check_ifa(q, k, v, **kw)
    # Same result as the dense (right padded) cache.
    kdl = kd if layout == "BNSD" else kd.permute(0, 2, 1, 3).reshape(b, 40, nkv * d)
    vdl = vd if layout == "BNSD" else vd.permute(0, 2, 1, 3).reshape(b, 40, nkv * d)
    dense_out = ifa(q, kdl, vdl, num_heads=n, num_key_value_heads=nkv, input_layout=layout, scale_value=0.25,
                    actual_seq_lengths=lens)
    torch.testing.assert_close(out, dense_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("table_fill", ["-1", "garbage"])
@pytest.mark.parametrize("rank", [3, 4])
def test_fia_paged(rank, table_fill, sq):
    b, n, nkv, d, bs = 2, 4, 2, 16, 16
    layout = "BNSD" if rank == 4 else "BSH"
    lens = [23, 9]
    k, table = paged_cache(torch.randn(b, nkv, 32, d), lens, bs, rank, table_fill)
    v, _ = paged_cache(torch.randn(b, nkv, 32, d), lens, bs, rank, table_fill, table=table)
    q = dense(layout, b, n, sq, d)
    kw = dict(num_heads=n, num_key_value_heads=nkv, input_layout=layout, scale=0.25, actual_seq_lengths_kv=lens,
              block_table=table, block_size=bs, softmax_lse_flag=True)
    check_fia(q, k, v, **kw)
    if sq > 1:  # with a band mask sized to the block table, and rightDownCausal
        mask = torch.rand(b, 1, sq, table.shape[1] * bs) < 0.2
        check_fia(q, k, v, atten_mask=mask, next_tokens=1, **kw)


@pytest.mark.parametrize("rank", [3, 4])
def test_fia_paged_tnd(rank, compressed_mask):
    n, nkv, d, bs = 4, 2, 16, 16
    lens = [20, 3, 33]  # per batch (not cumulative) with a block table
    k, table = paged_cache(torch.randn(3, nkv, 33, d), lens, bs, rank, "-1")
    v, _ = paged_cache(torch.randn(3, nkv, 33, d), lens, bs, rank, "-1", table=table)
    q = torch.randn(9, n, d)
    kw = dict(num_heads=n, num_key_value_heads=nkv, input_layout="TND", scale=0.25,
              actual_seq_lengths=[2, 3, 9], actual_seq_lengths_kv=lens, block_table=table, block_size=bs,
              softmax_lse_flag=True)
    check_fia(q, k, v, **kw)
    check_fia(q, k, v, atten_mask=compressed_mask, sparse_mode=3, **kw)


def test_ifa_paged_with_mask_and_pse():
    b, n, d, bs = 2, 4, 16, 16
    lens = [30, 7]
    k, table = paged_cache(torch.randn(b, n, 32, d), lens, bs, 4, "garbage")
    v, _ = paged_cache(torch.randn(b, n, 32, d), lens, bs, 4, "garbage", table=table)
    q = dense("BNSD", b, n, 1, d)
    width = table.shape[1] * bs
    mask = torch.rand(b, 1, 1, width) < 0.3
    pse = torch.randn(b, n, 1, width)
    check_ifa(q, k, v, num_heads=n, input_layout="BNSD", scale_value=0.25, actual_seq_lengths=lens,
              block_table=table, block_size=bs, atten_mask=mask, pse_shift=pse)


# ----------------------------------------------------------------------------
# Left padding
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [2, 0, -3])
def test_ifa_kv_padding(pad):
    b, n, skv = 3, 4, 12
    q, k, v, kw = problem("BSH", b=b, n=n, gqa=2, sq=1, skv=skv)
    lens = [5, 10, 11]
    out = check_ifa(q, k, v, scale_value=0.25, actual_seq_lengths=lens,
                    kv_padding_size=torch.tensor([pad], dtype=torch.int64), **kw)
    if pad == 2:  # batch 2 starts at 12 - 2 - 11 = -1 < 0 -> zeros
        assert torch.all(out[2] == 0) and torch.all(out[:2].abs().sum(-1) > 0)


@pytest.mark.parametrize("sq", [1, 6])
@pytest.mark.parametrize("pad", [3, -1])
def test_fia_kv_padding(sq, pad):
    q, k, v, kw = problem("BNSD", b=3, n=4, gqa=2, sq=sq, skv=12)
    out, lse = check_fia(q, k, v, scale=0.25, actual_seq_lengths_kv=[5, 9, 10], softmax_lse_flag=True,
                         kv_padding_size=torch.tensor([pad]), **kw)
    if pad == 3:  # batch 2: 12 - 3 - 10 < 0
        assert torch.all(out[2] == 0) and torch.all(torch.isinf(lse[2]))


def test_fia_query_padding():
    q, k, v, kw = problem("BSH", b=2, n=4, gqa=2, sq=8, skv=10)
    out, lse = check_fia(q, k, v, scale=0.25, actual_seq_lengths=[4, 6], actual_seq_lengths_kv=[7, 10],
                         query_padding_size=torch.tensor([2]), kv_padding_size=torch.tensor([1]),
                         softmax_lse_flag=True, **kw)
    # valid query rows: [8-2-4, 8-2) = [2, 6) and [0, 6)
    assert torch.all(out[0, :2] == 0) and torch.all(out[0, 6:] == 0) and torch.all(out[1, 6:] == 0)
    assert torch.all(out[0, 2:6].abs().sum(-1) > 0)


@pytest.mark.parametrize("padding", ["query", "kv"])
def test_fia_left_padding_mask_ignores_pre_next(padding):
    """sparse_mode 0 with a mask and left padding: torch_npu ignores pre/next tokens."""
    q, k, v, kw = problem("BNSD", b=2, n=2, sq=6, skv=9)
    mask = torch.rand(2, 1, 6, 9) < 0.2
    pads = {"query_padding_size": torch.tensor([1])} if padding == "query" else \
        {"kv_padding_size": torch.tensor([2])}
    kw.update(actual_seq_lengths=[5, 3], actual_seq_lengths_kv=[7, 6], atten_mask=mask, scale=0.25, **pads)
    banded, _ = check_fia(q, k, v, pre_tokens=0, next_tokens=0, **kw)
    full, _ = fia(q, k, v, **kw)
    torch.testing.assert_close(banded, full, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# int8 KV antiquant
# ----------------------------------------------------------------------------


def per_channel(shape, dtype):
    return (torch.rand(shape) * 0.02 + 0.005).to(dtype)


def offsets(shape, dtype):
    return (torch.randn(shape) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [FP16, FP32])
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("layout,kind", [("BNSD", "(2,N,1,D)"), ("BSH", "(2,H)"), ("BSND", "(2,N,D)"),
                                         ("BSH", "(2,)"), ("BNSD", "(2,)")])
def test_ifa_antiquant_combined(layout, kind, with_offset, dtype):
    b, n, nkv, skv, d = 2, 4, 2, 11, 32
    q = dense(layout, b, n, 1, d, dtype)
    k, v = dense_int8(layout, b, nkv, skv, d), dense_int8(layout, b, nkv, skv, d)
    shape = {"(2,N,1,D)": (2, nkv, 1, d), "(2,H)": (2, nkv * d), "(2,N,D)": (2, nkv, d), "(2,)": (2,)}[kind]
    kw = dict(num_heads=n, num_key_value_heads=nkv, input_layout=layout, scale_value=0.2,
              actual_seq_lengths=[11, 6], antiquant_scale=per_channel(shape, dtype),
              antiquant_offset=offsets(shape, dtype) if with_offset else None)
    check_ifa(q, k, v, **kw)
    # FIA S == 1 with the same combined parameters (antiquant_mode 0).
    kw["scale"] = kw.pop("scale_value")
    kw["actual_seq_lengths_kv"] = kw.pop("actual_seq_lengths")
    check_fia(q, k, v, **kw)


@pytest.mark.parametrize("with_offset", [False, True])
def test_fia_antiquant_mode1_per_token(with_offset):
    b, n, nkv, skv, d = 3, 4, 2, 9, 32
    q = dense("BSH", b, n, 1, d, FP16)
    k, v = dense_int8("BSH", b, nkv, skv, d), dense_int8("BSH", b, nkv, skv, d)
    scale = per_channel((2, b, skv), FP32)
    check_fia(q, k, v, num_heads=n, num_key_value_heads=nkv, scale=0.2, antiquant_mode=1, antiquant_scale=scale,
              antiquant_offset=offsets((2, b, skv), FP32) if with_offset else None,
              actual_seq_lengths_kv=[9, 2, 5], softmax_lse_flag=True)


SEPARATE_MODES = [
    (0, 0, "(N,1,D)"), (0, 0, "(1,N,1,D)"), (0, 0, "(1,N,D)"), (0, 0, "(1,H)"), (0, 0, "(1,)"),
    (1, 1, "(B,S)"), (1, 1, "(1,B,S)"), (2, 2, "(N,)"), (3, 3, "(B,N,S)"), (0, 1, "K(1,N,1,D)/V(1,B,S)"),
]


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("kmode,vmode,kind", SEPARATE_MODES, ids=str)
def test_fia_separate_antiquant(kmode, vmode, kind, with_offset):
    b, n, nkv, skv, d = 2, 4, 2, 10, 32
    q = dense("BNSD", b, n, 1, d, FP16)
    k, v = dense_int8("BNSD", b, nkv, skv, d), dense_int8("BNSD", b, nkv, skv, d)

    def shape_of(mode, kind):
        if mode == 0:
            kind = kind.split("/")[0].lstrip("K")
            return {"(N,1,D)": (nkv, 1, d), "(1,N,1,D)": (1, nkv, 1, d), "(1,N,D)": (1, nkv, d),
                    "(1,H)": (1, nkv * d), "(1,)": (1,)}[kind]
        if mode == 1:
            return (b, skv) if kind == "(B,S)" else (1, b, skv)
        return {2: (nkv,), 3: (b, nkv, skv)}[mode]

    def params(mode):
        dtype = FP16 if mode in (0, 2) else FP32  # per-token scales are float32
        shape = shape_of(mode, kind)
        return per_channel(shape, dtype), (offsets(shape, dtype) if with_offset else None)

    ks, ko = params(kmode)
    vs, vo = params(vmode)
    check_fia(q, k, v, num_heads=n, num_key_value_heads=nkv, input_layout="BNSD", scale=0.2,
              key_antiquant_scale=ks, key_antiquant_offset=ko, value_antiquant_scale=vs,
              value_antiquant_offset=vo, key_antiquant_mode=kmode, value_antiquant_mode=vmode,
              actual_seq_lengths_kv=[10, 7], softmax_lse_flag=True)


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("mode", [4, 5])
@pytest.mark.parametrize("rank", [3, 4])
def test_fia_separate_antiquant_paged(rank, mode, with_offset):
    b, n, nkv, d, bs = 2, 4, 2, 32, 32
    layout = "BNSD" if rank == 4 else "BSH"
    lens = [40, 13]
    k, table = paged_cache(torch.randint(-128, 128, (b, nkv, 64, d), dtype=torch.int8), lens, bs, rank, "-1")
    v, _ = paged_cache(torch.randint(-128, 128, (b, nkv, 64, d), dtype=torch.int8), lens, bs, rank, "-1",
                       table=table)
    blocknum = k.shape[0]
    shape = (blocknum, bs) if mode == 4 else (blocknum, nkv, bs)
    q = dense(layout, b, n, 1, d, FP16)
    check_fia(q, k, v, num_heads=n, num_key_value_heads=nkv, input_layout=layout, scale=0.2,
              key_antiquant_scale=per_channel(shape, FP32), value_antiquant_scale=per_channel(shape, FP32),
              key_antiquant_offset=offsets(shape, FP32) if with_offset else None,
              value_antiquant_offset=offsets(shape, FP32) if with_offset else None,
              key_antiquant_mode=mode, value_antiquant_mode=mode, block_table=table, block_size=bs,
              actual_seq_lengths_kv=lens, softmax_lse_flag=True)


@pytest.mark.parametrize("rank", [3, 4])
def test_ifa_antiquant_paged(rank):
    b, n, nkv, d, bs = 2, 4, 2, 32, 32
    layout = "BNSD" if rank == 4 else "BSH"
    lens = [33, 20]
    k, table = paged_cache(torch.randint(-128, 128, (b, nkv, 64, d), dtype=torch.int8), lens, bs, rank, "garbage")
    v, _ = paged_cache(torch.randint(-128, 128, (b, nkv, 64, d), dtype=torch.int8), lens, bs, rank, "garbage",
                       table=table)
    shape = (2, nkv, 1, d) if layout == "BNSD" else (2, nkv * d)
    check_ifa(dense(layout, b, n, 1, d, FP16), k, v, num_heads=n, num_key_value_heads=nkv, input_layout=layout,
              scale_value=0.2, antiquant_scale=per_channel(shape, FP16), antiquant_offset=offsets(shape, FP16),
              block_table=table, block_size=bs, actual_seq_lengths=lens)


def test_fia_prompt_antiquant_per_channel():
    b, n, nkv, sq, skv, d = 2, 4, 2, 5, 9, 32
    q = dense("BSH", b, n, sq, d, FP16)
    k, v = dense_int8("BSH", b, nkv, skv, d), dense_int8("BSH", b, nkv, skv, d)
    shape = (2, nkv * d)
    check_fia(q, k, v, num_heads=n, num_key_value_heads=nkv, scale=0.2, antiquant_scale=per_channel(shape, FP16),
              antiquant_offset=offsets(shape, FP16), actual_seq_lengths=[5, 3], actual_seq_lengths_kv=[9, 4],
              softmax_lse_flag=True)


# ----------------------------------------------------------------------------
# int8 output quantisation
# ----------------------------------------------------------------------------


def quant_params(numel_shape, with_offset, dtype=FP32):
    scale = (torch.rand(numel_shape) * 40 + 20).to(dtype)
    offset = (torch.randn(numel_shape) * 3).to(dtype) if with_offset else None
    return scale, offset


QUANT_CASES = [("BSH", "(1,)"), ("BSH", "(H,)"), ("BSH", "(1,1,H)"), ("BNSD", "(1,N,1,D)"), ("BNSD", "(N,D)"),
               ("BSND", "(1,1,N,D)"), ("BNSD_BSND", "(N,D)"), ("TND", "(N,D)"), ("TND", "(1,)")]


def quant_shape(kind, n, d):
    return {"(1,)": (1,), "(H,)": (n * d,), "(1,1,H)": (1, 1, n * d), "(1,N,1,D)": (1, n, 1, d),
            "(N,D)": (n, d), "(1,1,N,D)": (1, 1, n, d)}[kind]


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("layout,kind", QUANT_CASES)
def test_pfa_and_fia_int8_output(layout, kind, with_offset, dtype):
    n, d = 4, 16
    q, k, v, kw = problem(layout, b=2, n=n, gqa=2, sq=6, skv=9, d=d, dtype=dtype)
    scale2, offset2 = quant_params(quant_shape(kind, n, d), with_offset)
    out_layout = layout.split("_")[-1]
    mask_kw = {} if layout == "TND" else dict(atten_mask=torch.rand(6, 9) < 0.2, next_tokens=2)
    for op, oracle, scale_name in ((pfa, pfa_oracle, "scale_value"), (fia, fia_oracle, "scale")):
        args = dict(kw, quant_scale2=scale2, quant_offset2=offset2, **{scale_name: 0.25}, **mask_kw)
        actual = op(q, k, v, **args)
        expected = oracle(q, k, v, **args)
        if op is fia:
            actual, expected = actual[0], expected[0]
        unquantised = oracle(q, k, v, **dict(args, quant_scale2=None, quant_offset2=None))
        if op is fia:
            unquantised = unquantised[0]
        assert_int8_matches(actual, expected, unquantised, scale2, offset2, out_layout, n)


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("layout,kind", [("BSH", "(1,)"), ("BSH", "(H,)"), ("BNSD", "(1,N,1,D)"),
                                         ("BSND", "(N,D)")])
def test_ifa_int8_output(layout, kind, with_offset):
    n, d = 4, 16
    q, k, v, kw = problem(layout, b=3, n=n, gqa=4, sq=1, skv=9, d=d, dtype=FP16)
    scale2, offset2 = quant_params(quant_shape(kind, n, d), with_offset)
    args = dict(kw, scale_value=0.25, actual_seq_lengths=[9, 3, 6], quant_scale2=scale2, quant_offset2=offset2)
    actual = ifa(q, k, v, **args)
    assert actual.dtype == torch.int8 and actual.shape == q.shape
    unquantised = ifa_oracle(q, k, v, **dict(args, quant_scale2=None, quant_offset2=None))
    assert_int8_matches(actual, ifa_oracle(q, k, v, **args), unquantised, scale2, offset2, layout, n)
    # FIA S == 1 post-quant
    fargs = dict(kw, scale=0.25, actual_seq_lengths_kv=[9, 3, 6], quant_scale2=scale2, quant_offset2=offset2)
    assert_int8_matches(fia(q, k, v, **fargs)[0], fia_oracle(q, k, v, **fargs)[0], unquantised, scale2, offset2,
                        layout, n)


def test_int8_output_bf16_scale():
    n, d = 4, 16
    q, k, v, kw = problem("BSH", n=n, sq=5, skv=7, dtype=BF16)
    scale2, offset2 = quant_params((n * d,), True, BF16)
    args = dict(kw, scale_value=0.25, quant_scale2=scale2, quant_offset2=offset2)
    unquantised = pfa_oracle(q, k, v, **dict(args, quant_scale2=None, quant_offset2=None))
    assert_int8_matches(pfa(q, k, v, **args), pfa_oracle(q, k, v, **args), unquantised, scale2, offset2, "BSH", n)


def test_int8_output_round_half_even_and_saturation():
    """A single key makes softmax exactly 1, so out == value exactly and the
    quantised values sit exactly on ties: round-half-even, then saturate."""
    n, d = 1, 16
    q = torch.randn(1, 1, d)
    k = torch.randn(1, 1, d)
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 127.5, 200.0, -128.5, -300.0, 4.0, -3.25, 0.0,
                         126.5, 5.5])
    v = ties.reshape(1, 1, d)
    expected = torch.tensor([0, 2, 2, 0, -2, -2, 4, 127, 127, -128, -128, 4, -3, 0, 126, 6], dtype=torch.int8)
    for op, args in ((pfa, dict(scale_value=1.0)), (ifa, dict(scale_value=1.0)), (fia, dict(scale=1.0))):
        out = op(q, k, v, num_heads=n, quant_scale2=torch.tensor([1.0]), **args)
        out = out[0] if op is fia else out
        assert torch.equal(out.reshape(-1), expected), (op, out)
    # With offset: x * 2 + 0.5 -> 0.5*2+0.5 = 1.5 -> 2, 1.5*2+.5 = 3.5 -> 4
    out = pfa(q, k, v, num_heads=n, quant_scale2=torch.tensor([2.0]), quant_offset2=torch.tensor([0.5]))
    assert out.reshape(-1)[:3].tolist() == [2, 4, 6]


# ----------------------------------------------------------------------------
# pse_shift
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("pse_batch,larger", [(2, False), (1, True), (2, True)])
def test_pfa_and_fia_pse_shift(pse_batch, larger, dtype):
    n, sq, skv = 4, 6, 9
    q, k, v, kw = problem("BNSD", b=2, n=n, gqa=2, sq=sq, skv=skv, dtype=dtype)
    pse = (torch.randn(pse_batch, n, sq + 2 * larger, skv + 3 * larger) * 2).to(dtype)
    mask = torch.rand(2, 1, sq, skv) < 0.2
    kw.update(pse_shift=pse, atten_mask=mask, actual_seq_lengths=[6, 4], actual_seq_lengths_kv=[7, 9])
    check_pfa(q, k, v, scale_value=0.25, next_tokens=3, **kw)
    check_fia(q, k, v, scale=0.25, softmax_lse_flag=True, **kw)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("pse_batch", [1, 3])
def test_ifa_and_fia_incremental_pse_shift(pse_batch, dtype):
    n, skv = 4, 10
    q, k, v, kw = problem("BSH", b=3, n=n, gqa=2, sq=1, skv=skv, dtype=dtype)
    pse = torch.randn(pse_batch, n, 1, skv + 2).to(dtype)
    check_ifa(q, k, v, scale_value=0.25, pse_shift=pse, actual_seq_lengths=[10, 4, 1], **kw)
    check_fia(q, k, v, scale=0.25, pse_shift=pse, actual_seq_lengths_kv=[10, 4, 1], softmax_lse_flag=True, **kw)


# ----------------------------------------------------------------------------
# softmax_lse
# ----------------------------------------------------------------------------


def test_fia_lse_bnsd_ragged_with_empty_rows():
    q, k, v, kw = problem("BNSD", b=3, n=4, gqa=2, sq=7, skv=8)
    mask = torch.rand(3, 1, 7, 8) < 0.3
    mask[0, 0, 1] = True
    out, lse = check_fia(q, k, v, scale=0.25, softmax_lse_flag=True, atten_mask=mask,
                         actual_seq_lengths=[7, 3, 5], actual_seq_lengths_kv=[8, 8, 0], **kw)
    assert lse.shape == (3, 4, 7, 1) and lse.dtype == FP32
    assert torch.all(torch.isinf(lse[0, :, 1])) and torch.all(torch.isinf(lse[1, :, 3:]))
    assert torch.all(torch.isinf(lse[2])) and torch.all(out[2] == 0)
    assert torch.all(torch.isfinite(lse[1, :, :3]))


@pytest.mark.parametrize("layout", ["BSH", "TND", "BNSD_BSND"])
def test_fia_lse_flag_false(layout):
    q, k, v, kw = problem(layout, n=4)
    out, lse = check_fia(q, k, v, scale=0.25, softmax_lse_flag=False, **kw)
    assert lse.shape == (1,) and lse.dtype == FP32 and torch.all(lse == 0)


def test_fia_lse_tnd_shape():
    q, k, v, kw = problem("TND", n=4, gqa=2)
    _, lse = check_fia(q, k, v, scale=0.25, softmax_lse_flag=True, **kw)
    assert lse.shape == (11, 4, 1)


# ----------------------------------------------------------------------------
# Shared prefix and rope
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_len", [None, 3, 0])
@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_fia_shared_prefix(layout, sq, prefix_len):
    n, nkv, d, sp = 4, 2, 16, 6
    q, k, v, kw = problem(layout, b=2, n=n, gqa=2, sq=sq, skv=8, d=d)
    pk, pv = dense(layout, 1, nkv, sp, d), dense(layout, 1, nkv, sp, d)
    plen = None if prefix_len is None else [prefix_len]
    check_fia(q, k, v, scale=0.25, key_shared_prefix=pk, value_shared_prefix=pv, actual_shared_prefix_len=plen,
              actual_seq_lengths_kv=[8, 5], softmax_lse_flag=True, **kw)


def test_fia_shared_prefix_with_right_down_causal(compressed_mask):
    q, k, v, kw = problem("BSND", b=2, n=4, gqa=2, sq=6, skv=8)
    pk, pv = dense("BSND", 1, 2, 5, 16), dense("BSND", 1, 2, 5, 16)
    check_fia(q, k, v, scale=0.25, key_shared_prefix=pk, value_shared_prefix=pv, actual_shared_prefix_len=[4],
              atten_mask=compressed_mask, sparse_mode=3, actual_seq_lengths=[6, 3], actual_seq_lengths_kv=[8, 2],
              softmax_lse_flag=True, **kw)


@pytest.mark.parametrize("prefix_len", [None, 2])
def test_fia_shared_prefix_with_mask_and_pse(prefix_len):
    """Masks and pse index the prefix + key sequence, so they span prefix_len + KV_S keys."""
    q, k, v, kw = problem("BNSD", b=2, n=4, gqa=2, sq=5, skv=8)
    pk, pv = dense("BNSD", 1, 2, 3, 16), dense("BNSD", 1, 2, 3, 16)
    plen = 3 if prefix_len is None else prefix_len
    mask = torch.rand(2, 1, 5, plen + 8) < 0.2
    pse = torch.randn(1, 4, 5, plen + 8)
    check_fia(q, k, v, scale=0.25, key_shared_prefix=pk, value_shared_prefix=pv,
              actual_shared_prefix_len=None if prefix_len is None else [prefix_len], atten_mask=mask,
              pse_shift=pse, actual_seq_lengths_kv=[8, 6], next_tokens=2, softmax_lse_flag=True, **kw)


@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("layout", ["BSH", "BNSD", "TND"])
def test_fia_rope(layout, sq):
    n, nkv, d, dr = 4, 2, 32, 16
    q, k, v, kw = problem(layout, b=2, n=n, gqa=2, sq=sq, skv=9, d=d, q_seg=(2, 3), kv_seg=(5, 4))
    if layout == "TND":
        qr, kr = torch.randn(q.shape[0], n, dr), torch.randn(k.shape[0], nkv, dr)
    else:
        qr, kr = dense(layout, 2, n, sq, dr), dense(layout, 2, nkv, 9, dr)
    check_fia(q, k, v, scale=0.15, query_rope=qr, key_rope=kr, softmax_lse_flag=True, **kw)


@pytest.mark.parametrize("rank", [3, 4])
def test_fia_rope_paged(rank):
    b, n, nkv, d, dr, bs = 2, 4, 1, 32, 16, 16
    layout = "BNSD" if rank == 4 else "BSH"
    lens = [20, 11]
    k, table = paged_cache(torch.randn(b, nkv, 32, d), lens, bs, rank, "-1")
    v, _ = paged_cache(torch.randn(b, nkv, 32, d), lens, bs, rank, "-1", table=table)
    kr, _ = paged_cache(torch.randn(b, nkv, 32, dr), lens, bs, rank, "-1", table=table)
    q, qr = dense(layout, b, n, 1, d), dense(layout, b, n, 1, dr)
    check_fia(q, k, v, query_rope=qr, key_rope=kr, num_heads=n, num_key_value_heads=nkv, input_layout=layout,
              scale=0.15, block_table=table, block_size=bs, actual_seq_lengths_kv=lens)


# ----------------------------------------------------------------------------
# Cross-op agreement
# ----------------------------------------------------------------------------


def _ifa_cases():
    b, n, nkv, d = 3, 4, 2, 32
    q, k, v, kw = problem("BSH", b=b, n=n, gqa=2, sq=1, skv=12, d=d)
    yield "dense_mask_pse", (q, k, v), dict(kw, atten_mask=torch.rand(b, 12) < 0.3,
                                             pse_shift=torch.randn(1, n, 1, 12)), [12, 5, 8]
    yield "kv_padding", (q, k, v), dict(kw, kv_padding_size=torch.tensor([1])), [4, 11, 7]
    yield "quant", (q, k, v), dict(kw, quant_scale2=torch.tensor([30.0]), quant_offset2=torch.tensor([1.0])), [12]
    k8, v8 = dense_int8("BSH", b, nkv, 12, d), dense_int8("BSH", b, nkv, 12, d)
    q16 = q.to(FP16)
    yield "antiquant", (q16, k8, v8), dict(kw, antiquant_scale=per_channel((2, nkv * d), FP16),
                                           antiquant_offset=offsets((2, nkv * d), FP16)), [12, 3, 9]
    lens = [20, 7, 16]
    kc, table = paged_cache(torch.randn(b, nkv, 32, d), lens, 16, 4, "-1")
    vc, _ = paged_cache(torch.randn(b, nkv, 32, d), lens, 16, 4, "-1", table=table)
    qb = dense("BNSD", b, n, 1, d)
    yield "paged", (qb, kc, vc), dict(num_heads=n, num_key_value_heads=nkv, input_layout="BNSD",
                                      block_table=table, block_size=16), lens


@pytest.mark.parametrize("case", list(_ifa_cases()), ids=lambda c: c[0])
def test_ifa_and_fia_incremental_agree(case):
    _, (q, k, v), kw, lens = case
    a = ifa(q, k, v, scale_value=0.2, actual_seq_lengths=lens, **kw)
    f, _ = fia(q, k, v, scale=0.2, actual_seq_lengths_kv=lens, **kw)
    torch.testing.assert_close(a, f, rtol=0, atol=0)
    if a.dtype != torch.int8:
        assert_matches(a, ifa_oracle(q, k, v, scale_value=0.2, actual_seq_lengths=lens, **kw))


def _pfa_cases(mask2048):
    q, k, v, kw = problem("BSH", b=2, n=4, gqa=2, sq=6, skv=9)
    yield "mask_band", (q, k, v), dict(kw, atten_mask=torch.rand(6, 9) < 0.2, pre_tokens=3, next_tokens=1,
                                       actual_seq_lengths=[6, 4], actual_seq_lengths_kv=[9, 5])
    yield "mode1", (q, k, v), dict(kw, atten_mask=torch.rand(2, 6, 9) < 0.2, sparse_mode=1)
    for mode in (2, 3, 4):
        yield f"mode{mode}", (q, k, v), dict(kw, atten_mask=mask2048, sparse_mode=mode, pre_tokens=4,
                                              next_tokens=0, actual_seq_lengths=[5, 6],
                                              actual_seq_lengths_kv=[9, 3])
    yield "pse", (q, k, v), dict(kw, pse_shift=torch.randn(2, 4, 6, 9), next_tokens=INT_MAX)
    yield "quant", (q, k, v), dict(kw, quant_scale2=torch.rand(64) * 40, next_tokens=INT_MAX)
    qt, kt, vt, kwt = problem("TND", n=4, gqa=4)
    yield "tnd", (qt, kt, vt), dict(kwt, next_tokens=INT_MAX)
    qb, kb, vb, kwb = problem("BNSD_BSND", n=4, gqa=2)
    yield "bnsd_bsnd", (qb, kb, vb), dict(kwb, next_tokens=INT_MAX)


PFA_CASES = list(_pfa_cases(torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)))


@pytest.mark.parametrize("case", PFA_CASES, ids=[c[0] for c in PFA_CASES])
def test_fia_prompt_agrees_with_pfa(case):
    _, (q, k, v), kw = case
    p = pfa(q, k, v, scale_value=0.3, **kw)
    f, _ = fia(q, k, v, scale=0.3, **kw)
    torch.testing.assert_close(p, f, rtol=0, atol=0)
    if p.dtype != torch.int8:
        assert_matches(p, pfa_oracle(q, k, v, scale_value=0.3, **kw))
