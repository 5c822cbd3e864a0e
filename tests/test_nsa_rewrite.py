"""NSA compressed attention written in plain PyTorch -> npu_nsa_compress_attention_infer (issue 13).

The compressed-attention branch of Native Sparse Attention as a model author writes it
from the paper, for decode (one query token per sequence): the compressed keys/values
(one per compression block of size l, stride d) sit in paged caches read through a
block table; the query attends to its sequence's cmp_lens[b] compressed tokens; the
probabilities are mapped onto selection blocks of size l' by the paper's Eq. 9 and summed
over each GQA group; the first block and the two local blocks are always kept; the top
select_block_count blocks are the selection. The backend must rewrite it into
npu_nsa_compress_attention_infer (passes/nsa_compress_attention_to_fused.py; lengths as a
tensor through kernels/nsa_compress_attention_lengths.py) with both outputs equal to
eager, and leave every near miss alone with a reason naming what differs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import npu_attn_graph
from npu_attn_graph import Report
from npu_attn_graph.kernels._library import NpuAttnArgumentError

sys.path.insert(0, str(Path(__file__).parent))

PATTERN = "nsa:compressed-attention-topk"
FUSED = "npu_nsa_compress_attention_infer_lengths"


class NSACompressedAttention(torch.nn.Module):
    """NSA's compressed attention and top-k block selection over a paged compressed KV cache (decode).

    q (B, N, D); k_cache (num_blocks, page, N_kv * D); v_cache (num_blocks, page, N_kv * Dv);
    block_table (B, max_blocks); cmp_lens (B,) the compressed tokens of each sequence. Returns the
    attention output (B, N, Dv) and the selected blocks (B, N_kv, select_block_count) int32.

    variant: "" (as the op defines it), or a near miss: "topk" (torch.topk instead of a stable
    sort), "group_max" (a max over the group's heads instead of a sum), "mask_le" (a mask that
    keeps one slot too many), "no_initial_block" (block 0 not forced), "eq9_j_eq_s" (Eq. 9 with
    j = s), "no_value_zeroing" (the gathered V is not zeroed past the length: NaN garbage reaches
    eager's output, never the op's), "int64" (the sorted indices returned as they are: an int64 slice),
    "eq9_buffer" (Eq. 9 as a (blocks, L) matrix computed in __init__ and kept as a buffer: a graph input
    whose values the compiler cannot know).
    """

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 32, v_dim: int = 16,
                 compress_block_size: int = 32, compress_stride: int = 16, select_block_size: int = 64,
                 select_block_count: int = 2, page_block_size: int = 16, max_blocks: int = 4,
                 variant: str = "") -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.v_dim = heads, kv_heads, head_dim, v_dim
        self.l, self.d, self.l_sel = compress_block_size, compress_stride, select_block_size
        self.count, self.page, self.max_blocks, self.variant = select_block_count, page_block_size, max_blocks, variant
        self.scale = head_dim ** -0.5
        if variant == "eq9_buffer":
            length, r, qn = max_blocks * page_block_size, select_block_size // compress_stride, \
                compress_block_size // compress_stride
            n_blocks = -(-((length - 1) * compress_stride + compress_block_size) // select_block_size)
            weights = torch.zeros(n_blocks, length)
            for s in range(n_blocks):
                for m in range(r):
                    for n in range(qn):
                        if 0 <= r * (s + 1) - m - n < length:
                            weights[s, r * (s + 1) - m - n] += 1
            self.register_buffer("eq9", weights)

    def forward(self, q, k_cache, v_cache, block_table, cmp_lens):
        b, hk, g = q.shape[0], self.kv_heads, self.heads // self.kv_heads
        length = self.max_blocks * self.page  # the compressed tokens the table can address
        k = k_cache[block_table].view(b, length, hk, self.head_dim)
        v = v_cache[block_table].view(b, length, hk, self.v_dim)
        pos = torch.arange(length, device=q.device)
        keep = pos[None, :] <= cmp_lens[:, None] if self.variant == "mask_le" else pos[None, :] < cmp_lens[:, None]
        if self.variant != "no_value_zeroing":
            v = v.masked_fill(~keep[:, :, None, None], 0.0)  # slots past the length may hold anything
        scores = torch.einsum("bkgd,blkd->bkgl", q.view(b, hk, g, self.head_dim), k) * self.scale
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        p = scores.softmax(dim=-1)  # p_cmp
        out = torch.einsum("bkgl,blkd->bkgd", p, v).reshape(b, self.heads, self.v_dim)

        # Eq. 9: p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[(l'/d) j - m - n], j = s + 1 for block s.
        r, qn = self.l_sel // self.d, self.l // self.d
        n_blocks = -(-((length - 1) * self.d + self.l) // self.l_sel)
        s = torch.arange(n_blocks, device=q.device)
        m, n = torch.arange(r, device=q.device), torch.arange(qn, device=q.device)
        j = s if self.variant == "eq9_j_eq_s" else s + 1
        idx = r * j[:, None, None] - m[None, :, None] - n[None, None, :]
        valid = (idx >= 0) & (idx < length)
        p_slc = (p[..., idx.clamp(0, length - 1)] * valid).sum(dim=(-1, -2))  # (B, N_kv, G, S)
        importance = p_slc.amax(dim=2) if self.variant == "group_max" else p_slc.sum(dim=2)  # shared by the group
        if self.variant == "eq9_buffer":
            importance = torch.einsum("bkgl,sl->bks", p, self.eq9)

        # 1 initial block and 2 local blocks are always selected; blocks past the sequence never.
        n_sel = -(-((cmp_lens - 1) * self.d + self.l) // self.l_sel)
        fixed = (s == n_sel[:, None] - 2) | (s == n_sel[:, None] - 1)
        if self.variant != "no_initial_block":
            fixed = fixed | (s == 0)
        importance = importance.masked_fill(fixed[:, None, :], float("inf"))
        importance = importance.masked_fill((s >= n_sel[:, None])[:, None, :], float("-inf"))
        if self.variant == "topk":
            selected = importance.topk(self.count, dim=-1).indices
        else:  # ties (the forced blocks) by ascending block index
            selected = torch.sort(importance, dim=-1, descending=True, stable=True).indices[..., :self.count]
        return out, selected if self.variant == "int64" else selected.to(torch.int32)


class NSAMatmulWhere(NSACompressedAttention):
    """Another author's spelling of the same computation: index_select gathers, matmuls, torch.where
    for every mask, Eq. 9 as an (S, L) matrix of overlap counts built in forward and applied to the
    group-summed probabilities with a matmul."""

    def forward(self, q, k_cache, v_cache, block_table, cmp_lens):
        b, hk, g = q.shape[0], self.kv_heads, self.heads // self.kv_heads
        length = self.max_blocks * self.page
        rows = block_table.flatten()
        k = k_cache.index_select(0, rows).reshape(b, length, hk, self.head_dim).permute(0, 2, 3, 1)  # (B, Hk, D, L)
        v = v_cache.index_select(0, rows).reshape(b, length, hk, self.v_dim).transpose(1, 2)  # (B, Hk, L, Dv)
        keep = torch.arange(length)[None, :] < cmp_lens[:, None]
        v = torch.where(keep[:, None, :, None], v, 0.0)
        scores = (q.reshape(b, hk, g, self.head_dim) @ k) / self.head_dim ** 0.5
        p = torch.where(keep[:, None, None, :], scores, float("-inf")).softmax(-1)
        out = (p @ v).flatten(1, 2)
        r, qn = self.l_sel // self.d, self.l // self.d
        n_blocks = -(-((length - 1) * self.d + self.l) // self.l_sel)
        s = torch.arange(n_blocks)
        hit = r * (s[:, None, None] + 1) - torch.arange(r)[None, :, None] - torch.arange(qn)[None, None, :]
        overlap = (hit[..., None] == torch.arange(length)).sum(dim=(1, 2)).to(p.dtype)  # (S, L)
        importance = p.sum(dim=2) @ overlap.T
        n_sel = (((cmp_lens - 1) * self.d + self.l) + self.l_sel - 1) // self.l_sel
        forced = (s == 0) | (s == n_sel[:, None] - 2) | (s == n_sel[:, None] - 1)
        importance = torch.where(forced[:, None, :], float("inf"), importance)
        importance = torch.where((s < n_sel[:, None])[:, None, :], importance, float("-inf"))
        return out, importance.sort(dim=-1, descending=True, stable=True).indices[..., :self.count].int()


def inputs(model: NSACompressedAttention, lens=(20, 64, 33), dtype=torch.float32, seed: int = 0, garbage=None,
           unused: int = -1):
    """Distinct random blocks per sequence, spare blocks, `unused` in unused table columns; `garbage`
    fills every slot the sequences do not use (unused blocks and the tail of the last block)."""
    g = torch.Generator().manual_seed(seed)
    b, page, width = len(lens), model.page, model.max_blocks
    need = [math.ceil(n / page) for n in lens]
    num_blocks = sum(need) + 3
    ids = torch.randperm(num_blocks, generator=g)
    table = torch.full((b, width), unused, dtype=torch.int32)
    used = 0
    for i, k in enumerate(need):
        table[i, :k] = ids[used:used + k].to(torch.int32)
        used += k
    q = torch.randn(b, model.heads, model.head_dim, generator=g).to(dtype)
    k_cache = torch.randn(num_blocks, page, model.kv_heads * model.head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page, model.kv_heads * model.v_dim, generator=g).to(dtype)
    if garbage is not None:
        live = torch.zeros(num_blocks, page, dtype=torch.bool)
        for i, n in enumerate(lens):
            for t in range(n):
                live[table[i, t // page], t % page] = True
        k_cache[~live] = garbage
        v_cache[~live] = garbage
    return q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int64)


def compiled(model, *args, report: Report):
    with torch.no_grad():
        return torch.compile(model, backend="npu_attn", fullgraph=True,
                             options={"executor": "eager", "report": report})(*args)


def sites(report: Report):
    return [s for s in report.sites if s.kind == "attention"]


def code(report: Report) -> str:
    return "\n".join(report.code_after)


# ----------------------------------------------------------------------------
# Rewritten: the op in the graph, both outputs equal eager
# ----------------------------------------------------------------------------


CONFIGS = {  # (heads, kv_heads, l, d, l', count, page, max_blocks, lens)
    "gqa2_l32_d16_sel64": (4, 2, 32, 16, 64, 2, 16, 4, (20, 64, 33)),
    "mha_l16_d16_sel16": (2, 2, 16, 16, 16, 3, 16, 3, (5, 48, 17, 30)),
    "gqa4_l64_d32_sel64_page32": (8, 2, 64, 32, 64, 2, 32, 2, (40, 9, 64)),
    "mqa_l32_d32_sel32": (4, 1, 32, 32, 32, 4, 16, 4, (64, 37)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nsa_compressed_attention_becomes_the_op(name):
    heads, kv, l, d, sel, count, page, width, lens = CONFIGS[name]
    model = NSACompressedAttention(heads=heads, kv_heads=kv, compress_block_size=l, compress_stride=d,
                                   select_block_size=sel, select_block_count=count, page_block_size=page,
                                   max_blocks=width)
    args = inputs(model, lens, seed=len(name))
    with torch.no_grad():
        out, selected = model(*args)
    report = Report()
    got, got_selected = compiled(model, *args, report=report)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    assert got_selected.dtype == torch.int32 and torch.equal(got_selected, selected), (got_selected, selected)
    (site,) = sites(report)
    assert site.rewritten and site.fused_op == FUSED and site.pattern == PATTERN, report.table()
    assert site.layout == "TND" and site.gqa_ratio == heads // kv
    assert f"select_block_count {count}" in site.notes[0]
    after = code(report)
    assert "npu_attn.npu_nsa_compress_attention_infer_lengths.default" in after
    # The dense gathers, the products, the softmax and the sort are gone.
    for gone in ("aten.index.Tensor", "aten.bmm", "aten._softmax", "aten.sort"):
        assert gone not in after, after


def test_another_spelling_becomes_the_op():
    """index_select, matmul, torch.where and Eq. 9 as a matrix: the proofs read what is computed."""
    model = NSAMatmulWhere(heads=8, kv_heads=2, compress_block_size=32, compress_stride=16, select_block_size=32,
                           select_block_count=3)
    args = inputs(model, (30, 64, 17), seed=11, garbage=math.nan, unused=0)  # index_select takes no -1
    with torch.no_grad():
        out, selected = model(*args)
    report = Report()
    got, got_selected = compiled(model, *args, report=report)
    (site,) = sites(report)
    assert site.rewritten and site.fused_op == FUSED, report.table()
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_selected, selected)
    assert "aten.where" not in code(report) and "aten.index_select" not in code(report)


def test_the_block_sizes_passed_reproduce_the_programs_ratios():
    """The program fixes only l'/d and l/d; the op's results depend on nothing else, and the rule passes
    the smallest sizes with those ratios (l 64, d 32, l' 64: l'/d = l/d = 2, passed as 32, 16, 32)."""
    model = NSACompressedAttention(compress_block_size=64, compress_stride=32, select_block_size=64)
    args = inputs(model, (50, 64, 21), seed=3)
    with torch.no_grad():
        out, selected = model(*args)
    report = Report()
    got, got_selected = compiled(model, *args, report=report)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_selected, selected)
    (site,) = sites(report)
    assert "compress_block_size 32, compress_stride 16, select_block_size 32" in site.notes[0], site.notes


def test_int64_indices_keep_the_slices_strides():
    """The program returns sort(...).indices[..., :K] itself (int64, strides of the (B, N_kv, S) sort
    result): the op's int32 indices are cast and padded to S blocks and sliced, so the replacement has
    the site's strides."""
    model = NSACompressedAttention(variant="int64")
    args = inputs(model, (20, 64, 33), seed=5)
    with torch.no_grad():
        out, selected = model(*args)
    report = Report()
    got, got_selected = compiled(model, *args, report=report)
    assert sites(report)[0].rewritten, report.table()
    assert got_selected.dtype == torch.int64 and got_selected.stride() == selected.stride()
    assert torch.equal(got_selected, selected)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)


def test_two_layers_each_become_the_op():
    """Two NSA sites in one graph (the second layer's query is the first's output, mixed): each is
    matched on its own softmax and sort."""

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = NSACompressedAttention(), NSACompressedAttention(select_block_count=1)
            self.mix = torch.nn.Linear(16, 32)

        def forward(self, q, k_cache, v_cache, block_table, cmp_lens):
            out, first = self.a(q, k_cache, v_cache, block_table, cmp_lens)
            out2, second = self.b(self.mix(out), k_cache, v_cache, block_table, cmp_lens)
            return out2, first, second

    torch.manual_seed(0)
    model = TwoLayers().eval()
    args = inputs(model.a, (20, 64, 33), seed=6)
    with torch.no_grad():
        want = model(*args)
    report = Report()
    got = compiled(model, *args, report=report)
    assert [s.fused_op for s in sites(report)] == [FUSED, FUSED], report.table()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_tolerance_of_float64(dtype):
    """fp16/bf16: eager rounds the scores and probabilities to the input dtype, the op accumulates in
    fp32, so the outputs differ by about an output ulp (the op tests' tolerances, 2e-3 / 1.6e-2). The
    selection equals float64 eager's here; in general blocks whose scores tie within the rounding may
    swap (the rule's notes and README say so)."""
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    model = NSACompressedAttention()
    args = inputs(model, (20, 64, 33), dtype=dtype, seed=9)
    with torch.no_grad():
        exact, exact_selected = model(*[a.double() if a.is_floating_point() else a for a in args])
    report = Report()
    got, got_selected = compiled(model, *args, report=report)
    assert sites(report)[0].rewritten, report.table()
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)
    assert torch.equal(got_selected, exact_selected)


def test_nan_in_unused_paged_blocks_never_reaches_the_outputs():
    """Unused blocks, the tail of each sequence's last block and the -1 table columns hold NaN: eager
    masks them (scores -inf, V zeroed), and so does the op (it never reads them)."""
    model = NSACompressedAttention()
    args = inputs(model, (20, 50, 33), seed=7, garbage=math.nan)
    assert torch.isnan(args[1]).any() and torch.isnan(args[2]).any()
    with torch.no_grad():
        out, selected = model(*args)
    report = Report()
    got, got_selected = compiled(model, *args, report=report)
    assert sites(report)[0].rewritten, report.table()
    assert torch.isfinite(got).all() and torch.isfinite(out).all()
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_selected, selected)


def test_without_value_zeroing_the_op_still_never_reads_the_garbage():
    """No zeroing of V: on finite caches eager and the op agree; with NaN past the lengths eager's
    0 * NaN is NaN, the op's output stays finite (it reads only the sequence's slots)."""
    model = NSACompressedAttention(variant="no_value_zeroing")
    args = inputs(model, (20, 50, 33), seed=8)
    with torch.no_grad():
        out, selected = model(*args)
    report = Report()
    got, got_selected = compiled(model, *args, report=report)
    assert sites(report)[0].rewritten, report.table()
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_selected, selected)
    nan_args = inputs(model, (20, 50, 33), seed=8, garbage=math.nan)
    with torch.no_grad():
        eager_nan, _ = model(*nan_args)
        got_nan, _ = torch.compile(model, backend="npu_attn", fullgraph=True,
                                   options={"executor": "eager"})(*nan_args)
    assert torch.isnan(eager_nan).any() and torch.isfinite(got_nan).all()


def test_a_length_the_op_does_not_accept_is_a_clear_error():
    """Length 0 (eager: NaN) and lengths too short for select_block_count blocks are outside the op's
    domain: the wrapped op names the argument and the value at run time."""
    model = NSACompressedAttention()
    q, k, v, table, lens = inputs(model, (20, 64, 33), seed=1)
    report = Report()
    fn = torch.compile(model, backend="npu_attn", fullgraph=True, options={"executor": "eager", "report": report})
    with torch.no_grad():
        fn(q, k, v, table, lens)
        with pytest.raises(NpuAttnArgumentError, match="actual_cmp_seq_kvlen"):
            fn(q, k, v, table, torch.tensor([0, 64, 33]))
        with pytest.raises(NpuAttnArgumentError, match="select_block_count"):
            fn(q, k, v, table, torch.tensor([3, 64, 33]))
    assert sites(report)[0].rewritten


def test_the_lengths_wrapper_passes_opcheck_and_names_what_its_fake_refuses():
    """The wrapper (kernels/nsa_compress_attention_lengths.py) is a real torch.library op: schema, fake
    and AOT dispatch agree (opcheck; static batch: the wrapped op needs one length per batch, so its fake
    refuses a symbolic batch by name). Its fake refuses, with the op's message, attributes no length can
    satisfy: 9 selection blocks of 64 need (n - 1) * 16 + 32 >= 576, n >= 35, and the 2 x 16 table holds
    32 compressed tokens; 4 blocks need n >= 15, which fits."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from npu_attn_graph.kernels.nsa_compress_attention_lengths import (npu_nsa_compress_attention_infer_lengths,
                                                                      smallest_valid_length)

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 32, generator=g), torch.randn(6, 16, 64, generator=g), torch.randn(6, 16, 32,
                                                                                                   generator=g)
    table, lens = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([20, 32])
    args = (q, k, v, 0.2, 4, 2, 64, 4, 16, 32, 16)
    torch.library.opcheck(torch.ops.npu_attn.npu_nsa_compress_attention_infer_lengths.default, args,
                          dict(block_table=table, actual_cmp_seq_kvlen=lens),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_static"))
    assert smallest_valid_length(64, 4, 32, 16) == 15
    out, selected = npu_nsa_compress_attention_infer_lengths(*args, block_table=table, actual_cmp_seq_kvlen=lens)
    assert out.shape == (2, 4, 16) and selected.shape == (2, 2, 4) and selected.dtype == torch.int32
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in (q, k, v, table, lens)]
        with pytest.raises(NpuAttnArgumentError, match="actual_cmp_seq_kvlen entries must be <= block_table"):
            npu_nsa_compress_attention_infer_lengths(*fake[:3], 0.2, 4, 2, 64, 9, 16, 32, 16,
                                                     block_table=fake[3], actual_cmp_seq_kvlen=fake[4])
        with pytest.raises(NpuAttnArgumentError, match="actual_cmp_seq_kvlen.dtype"):
            npu_nsa_compress_attention_infer_lengths(*fake[:3], 0.2, 4, 2, 64, 2, 16, 32, 16, block_table=fake[3],
                                                     actual_cmp_seq_kvlen=fake[4].float())


# ----------------------------------------------------------------------------
# Near misses: left alone, listed once with what differs, values equal eager
# ----------------------------------------------------------------------------


NEAR_MISSES = {
    "topk": "torch.topk, whose order of tied scores",
    "group_max": "not a linear map of the probabilities",
    "mask_le": "the score mask is not 'l >= cmp_lens[b]'",
    "no_initial_block": "the op ranks +inf at blocks [0,",
    "eq9_j_eq_s": "the importance is not the NSA Eq. 9 map",
    "eq9_buffer": "multiplies the probabilities by the graph input",
}


# Sites the op refuses: its validation's message is the reason (no length at all: the rule says why).
OP_REFUSES = {
    "head_dim_256": (dict(head_dim=256), "query.shape[2] (D) must be <= 192"),
    "select_count_past_capacity": (dict(select_block_count=17), "select_block_count 17 needs (n - 1) * 16 + 32 "
                                                                ">= 17 * 64, n >= 67, and the block table holds 64"),
    "page_24": (dict(page_block_size=24, max_blocks=3), "page_block_size must be a multiple of 16"),
}


@pytest.mark.parametrize("variant", sorted(NEAR_MISSES) + sorted(OP_REFUSES))
def test_near_misses_are_left_alone_with_the_reason(variant):
    kwargs, reason = OP_REFUSES.get(variant, (dict(variant=variant), NEAR_MISSES.get(variant)))
    model = NSACompressedAttention(**kwargs)
    args = inputs(model, (20, 50, 33), seed=2)
    with torch.no_grad():
        out, selected = model(*args)
    report = Report()
    got, got_selected = compiled(model, *args, report=report)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_selected, selected)
    listed = sites(report)
    assert len(listed) == 1, report.table()  # by the rule, not again as an unfused softmax
    (site,) = listed
    assert not site.rewritten and site.pattern == PATTERN and reason in site.reason, report.table()
    assert "npu_nsa_compress_attention_infer" not in code(report)


def test_without_the_rule_the_site_is_still_listed():
    """The passes option without nsa_compress_attention_to_fused: the attention is still one report row
    (the generic rules' or the completeness check's), never silently dropped, and values equal eager."""
    from npu_attn_graph.passes import PIPELINE

    model = NSACompressedAttention()
    args = inputs(model, (20, 50, 33), seed=2)
    with torch.no_grad():
        out, selected = model(*args)
        report = Report()
        passes = [p.name for p in PIPELINE if p.name != "nsa_compress_attention_to_fused"]
        got, got_selected = torch.compile(model, backend="npu_attn", fullgraph=True,
                                          options={"executor": "eager", "report": report, "passes": passes})(*args)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_selected, selected)
    (site,) = sites(report)
    assert site.pattern != PATTERN and not site.rewritten and site.reason, report.table()


def test_symbolic_sizes_are_left_alone_with_the_reason():
    """dynamic=True: the batch and cache sizes are symbols; the proofs need static shapes."""
    model = NSACompressedAttention()
    args = inputs(model, (20, 50, 33), seed=2)
    report = Report()
    with torch.no_grad():
        out, selected = model(*args)
        got, got_selected = torch.compile(model, backend="npu_attn", fullgraph=True, dynamic=True,
                                          options={"executor": "eager", "report": report})(*args)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_selected, selected)
    (site,) = sites(report)
    assert site.pattern == PATTERN and not site.rewritten and "symbolic sizes" in site.reason, report.table()


def test_ge_target_rewrite_runs_equal_to_eager():
    """The rewrite as made for TorchAir (the GE target: the NPU's dtype rules), run by torch, float16."""
    from fuzz.oracle import ge_target_backend

    model = NSACompressedAttention()
    args = inputs(model, (20, 64, 33), dtype=torch.float16, seed=4)
    report = Report()
    with torch.no_grad():
        out, selected = model(*args)
        got, got_selected = torch.compile(model, backend=ge_target_backend(report), fullgraph=True)(*args)
    (site,) = sites(report)
    assert site.rewritten and site.fused_op == FUSED, report.table()
    torch.testing.assert_close(got, out, rtol=2e-3, atol=2e-3)
    assert torch.equal(got_selected, selected)


def test_plain_attention_whose_weights_feed_a_top_k_is_not_claimed():
    """Heavy-hitter style (dense K/V, the weights summed over queries and top-k'd): not NSA's, so the
    rule does not claim the softmax; the generic attention rule reads the site as it always did."""

    def heavy_hitters(q, k, v):
        p = (q @ k.transpose(-1, -2) * 0.125).softmax(-1)
        return p @ v, p.sum(dim=-2).topk(2, dim=-1).indices

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 16, generator=g) for _ in range(3))
    report = Report()
    with torch.no_grad():
        want = heavy_hitters(q, k, v)
        got = torch.compile(heavy_hitters, backend="npu_attn", fullgraph=True,
                            options={"executor": "eager", "report": report})(q, k, v)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    (site,) = sites(report)
    assert site.pattern != PATTERN, report.table()


# ----------------------------------------------------------------------------
# One complete GE graph
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nsa_decode_is_one_complete_ge_graph_with_the_op(dtype, tmp_path):
    """float16 goes in as it is; float32 (the NPU op takes float16/bfloat16) is computed in float16 with
    casts around the op (fp32_attention's default for GE), and the precision column says so."""
    from test_ge_converters import attr_value, only_op, producer

    model = NSACompressedAttention()
    args = inputs(model, (20, 64, 33), dtype=dtype, seed=4)
    report = Report()
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(model, *args, out_dir=tmp_path, options={"report": report})
    assert result.single_graph, result.summary()
    types = result.op_type_counts
    assert types["NsaCompressAttentionInfer"] == 1 and not [t for t in types if "." in t], result.summary()
    assert "SoftmaxV2" not in types and "BatchMatMulV2" not in types and "Sort" not in types, types
    graph = result.graphs[0].graph_def
    op = only_op(graph, "NsaCompressAttentionInfer")
    assert attr_value(op, "numHeads") == 4 and attr_value(op, "numKeyValueHeads") == 2
    assert (attr_value(op, "compressBlockSize"), attr_value(op, "compressStride"),
            attr_value(op, "selectBlockSize"), attr_value(op, "selectBlockCount")) == (32, 16, 64, 2)
    assert attr_value(op, "pageBlockSize") == 16 and attr_value(op, "layoutOptional") == "TND"
    assert abs(attr_value(op, "scaleValue") - 32 ** -0.5) < 1e-6
    # The lengths come from the graph input (cast to int64 in the graph), not from a constant.
    lengths, _ = producer(graph, op, "actualCmpKvSeqLenOptional")
    assert lengths.type in ("Data", "Cast"), lengths.type
    assert producer(graph, op, "blockTableOptional")[0].type in ("Data", "Cast")
    (site,) = sites(report)
    assert site.rewritten and site.fused_op == FUSED, report.table()
    assert site.precision == (None if dtype == torch.float16 else "float32 via float16"), report.table()
