"""A paged *read* (K/V gathered from paged caches through a block table, masked by the
sequence lengths) becomes the fused op reading the caches through block_table.

Each spelling is a small plain-PyTorch function written the way a model author writes
it; the compiled function (eager executor: the rewritten graph run by torch, with the
reference kernels) is compared with the function run eagerly on the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import npu_attn_graph
from npu_attn_graph import NpuAttnArgumentError, Report
from npu_attn_graph.passes._fx import CASTS

OPS = torch.ops.npu_attn
aten = torch.ops.aten
PAGED_OPS = (OPS.npu_incre_flash_attention_paged.default, OPS.npu_fused_infer_attention_score_paged.default)
GATHERS = (aten.index.Tensor, aten.index_select.default, aten.gather.default)

B, H, HKV, D, BS, NB, MAXB = 3, 4, 2, 16, 16, 12, 4
S_KV = MAXB * BS


def repeat_kv(x, groups):  # transformers' repeat_kv
    b, n, s, d = x.shape
    return x[:, :, None].expand(b, n, groups, s, d).reshape(b, n * groups, s, d)


def keep_mask(seq_lens, s_kv=S_KV):
    return torch.arange(s_kv) < seq_lens[:, None]  # (B, S_kv), True = attend


def attend(q, k, v, keep):
    """Hand-written softmax attention with a -inf masked_fill."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


# --- the spellings -------------------------------------------------------------------------------


def index_view_sdpa_gqa(q, k_cache, v_cache, block_table, seq_lens):
    """mini-vLLM's decode: cache[block_table].view(...).transpose, repeat_kv, SDPA with a bool mask."""
    b = q.shape[0]
    s_kv = block_table.shape[1] * k_cache.shape[1]
    k = k_cache[block_table].view(b, s_kv, HKV, D).transpose(1, 2)
    v = v_cache[block_table].view(b, s_kv, HKV, D).transpose(1, 2)
    mask = torch.arange(s_kv) < seq_lens[:, None]
    k, v = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


def index_select_handwritten(q, k_cache, v_cache, block_table, seq_lens):
    """index_select of the flattened table, reshape, hand-written attention (GQA by repeat_interleave)."""
    b = q.shape[0]
    k = k_cache.index_select(0, block_table.flatten()).reshape(b, S_KV, HKV, D).transpose(1, 2)
    v = v_cache.index_select(0, block_table.flatten()).reshape(b, S_KV, HKV, D).transpose(1, 2)
    k, v = k.repeat_interleave(H // HKV, dim=1), v.repeat_interleave(H // HKV, dim=1)
    return attend(q, k, v, keep_mask(seq_lens))


def gather_sdpa_additive(q, k_cache, v_cache, block_table, seq_lens):
    """torch.gather with the table expanded over a block, an additive -inf mask built with where.
    (The index is int64: torch 2.13's CPU gather reads an expanded int32 index wrongly.)"""
    b = q.shape[0]
    idx = block_table.long().reshape(-1, 1, 1, 1).expand(-1, BS, HKV, D)
    k = torch.gather(k_cache, 0, idx).view(b, S_KV, HKV, D).transpose(1, 2)
    v = torch.gather(v_cache, 0, idx).view(b, S_KV, HKV, D).transpose(1, 2)
    bias = torch.where(keep_mask(seq_lens), 0.0, float("-inf"))[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


def heads_first_cache(q, k_cache, v_cache, block_table, seq_lens):
    """Caches (num_blocks, Hkv, block_size, D): gather, move the heads in front, merge the blocks."""
    b = q.shape[0]
    k = k_cache[block_table].transpose(1, 2).reshape(b, HKV, S_KV, D)
    v = v_cache[block_table].transpose(1, 2).reshape(b, HKV, S_KV, D)
    keep = keep_mask(seq_lens)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)


def flat_cache_where(q, k_cache, v_cache, block_table, seq_lens):
    """Caches (num_blocks, block_size, H): flatten the blocks, split H into heads; mask by where."""
    b = q.shape[0]
    k = k_cache[block_table].flatten(1, 2).view(b, S_KV, HKV, D).transpose(1, 2)
    v = v_cache[block_table].flatten(1, 2).view(b, S_KV, HKV, D).transpose(1, 2)
    k, v = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
    scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    scores = torch.where(keep_mask(seq_lens)[:, None, None, :], scores, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


def masked_fill_additive_mha(q, k_cache, v_cache, block_table, seq_lens):
    """MHA (Hkv = H), an additive mask zeros().masked_fill(~keep, -inf), lengths written with <=."""
    b = q.shape[0]
    k = k_cache[block_table].view(b, S_KV, H, D).transpose(1, 2)
    v = v_cache[block_table].view(b, S_KV, H, D).transpose(1, 2)
    keep = torch.arange(S_KV) <= (seq_lens - 1)[:, None]
    mask = torch.zeros(b, S_KV).masked_fill(~keep, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


def bsnd_einsum(q, k_cache, v_cache, block_table, seq_lens):
    """K/V kept BSND (no transpose), einsum attention, query (B, 1, H, D), MHA."""
    b = q.shape[0]
    k = k_cache[block_table].view(b, S_KV, H, D)
    v = v_cache[block_table].view(b, S_KV, H, D)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
    scores = scores.masked_fill(~keep_mask(seq_lens)[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


SPELLINGS = {
    "index-view-sdpa-gqa": (index_view_sdpa_gqa, "bshd", HKV, "npu_incre_flash_attention_paged"),
    "index_select-handwritten": (index_select_handwritten, "bshd", HKV, "npu_incre_flash_attention_paged"),
    "gather-sdpa-additive": (gather_sdpa_additive, "bshd", HKV, "npu_incre_flash_attention_paged"),
    "heads-first-cache": (heads_first_cache, "bhsd", HKV, "npu_incre_flash_attention_paged"),
    "flat-cache-where": (flat_cache_where, "bsH", HKV, "npu_incre_flash_attention_paged"),
    "masked_fill-additive-mha": (masked_fill_additive_mha, "bshd", H, "npu_incre_flash_attention_paged"),
    "bsnd-einsum": (bsnd_einsum, "bshd", H, "npu_incre_flash_attention_paged"),
}


def make_inputs(cache_form="bshd", kv_heads=HKV, q_len=1, seed=0, dtype=torch.float32, seq_lens=(5, 40, 64),
                q_layout="bnsd", table_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    shape = {"bshd": (NB, BS, kv_heads, D), "bhsd": (NB, kv_heads, BS, D), "bsH": (NB, BS, kv_heads * D)}[cache_form]
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    q_shape = (B, H, q_len, D) if q_layout == "bnsd" else (B, q_len, H, D)
    q = torch.randn(q_shape, generator=g).to(dtype)
    block_table = torch.randperm(NB, generator=g)[: B * MAXB].reshape(B, MAXB).to(table_dtype)
    return q, k_cache, v_cache, block_table, torch.tensor(seq_lens)


def compile_eager(fn, report, **options):
    return torch.compile(fn, backend="npu_attn", fullgraph=True,
                         options={"executor": "eager", "report": report, **options})


def graph_of(report):
    (gm,) = report.graph_modules
    return gm.graph


def targets(graph):
    return [n.target for n in graph.nodes if n.op == "call_function"]


def assert_paged(report, fused_op):
    graph = graph_of(report)
    assert not [t for t in targets(graph) if t in GATHERS], graph  # the dense gather is gone
    assert not [t for t in targets(graph) if t in (aten.arange.default, aten.lt.Tensor)], graph  # so is the mask
    [site] = [s for s in report.sites if s.kind == "attention"]
    assert site.pattern == "paged:gather-attention" and site.fused_op == fused_op, report.table()
    assert "block_table" in site.notes[0], site.notes
    [node] = [n for n in graph.nodes if n.target in PAGED_OPS]
    return node


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_each_spelling_reads_the_caches_through_block_table(name):
    fn, form, kv_heads, fused = SPELLINGS[name]
    args = make_inputs(form, kv_heads, q_layout="bsnd" if name == "bsnd-einsum" else "bnsd")
    expected = fn(*args)
    report = Report()
    out = compile_eager(fn, report)(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    node = assert_paged(report, fused)
    assert node.kwargs["block_size"] == BS
    assert node.kwargs["num_key_value_heads"] in (0, kv_heads) and node.kwargs["num_heads"] == H


def dirty_caches(k_cache, v_cache, block_table, seq_lens, heads_first=False):
    """Copies of the caches with NaN/inf in every block no table row uses and NaN past each
    sequence's length in its last block, and the table with row 0 padded by -1 past its
    first block (as vLLM pads unused entries)."""
    used = {int(x) for row, n in zip(block_table, seq_lens) for x in row[: math.ceil(int(n) / BS)]}
    dirty_k, dirty_v = k_cache.clone(), v_cache.clone()
    for blk in range(NB):
        if blk not in used:
            dirty_k[blk], dirty_v[blk] = float("nan"), float("inf")
    for row, n in zip(block_table, seq_lens):  # the tail of each last used block
        n = int(n)
        last = int(row[(n - 1) // BS])
        tail = (last, slice(None), slice(n % BS or BS, None)) if heads_first else (last, slice(n % BS or BS, None))
        dirty_k[tail], dirty_v[tail] = float("nan"), float("nan")
    table = block_table.clone()
    table[0, 1:] = -1
    return dirty_k, dirty_v, table


@pytest.mark.parametrize("name", ["index-view-sdpa-gqa", "index_select-handwritten", "heads-first-cache"])
def test_nan_in_unused_blocks_and_past_the_lengths_never_reaches_the_output(name):
    """Blocks no table names, table entries past a sequence's blocks and positions past its
    length hold NaN; the fused op must give what eager gives on clean caches."""
    fn, form, kv_heads, fused = SPELLINGS[name]
    q, k_cache, v_cache, block_table, seq_lens = make_inputs(form, kv_heads, seq_lens=(5, 17, 33))
    expected = fn(q, k_cache, v_cache, block_table, seq_lens)
    dirty_k, dirty_v, table = dirty_caches(k_cache, v_cache, block_table, seq_lens, heads_first=form == "bhsd")
    report = Report()
    out = compile_eager(fn, report)(q, dirty_k, dirty_v, table, seq_lens)
    assert_paged(report, fused)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_lengths_outside_zero_to_capacity_give_eagers_result():
    """The lengths go in as clamp(seq_lens, 0, S_kv): exactly eager's "j < seq_len" for any value
    (a length 0 row: SDPA gives 0 for a row with no key, as the op does)."""
    q, k_cache, v_cache, block_table, _ = make_inputs()
    seq_lens = torch.tensor([0, S_KV + 7, -3])
    expected = index_view_sdpa_gqa(q, k_cache, v_cache, block_table, seq_lens)
    report = Report()
    out = compile_eager(index_view_sdpa_gqa, report)(q, k_cache, v_cache, block_table, seq_lens)
    assert_paged(report, "npu_incre_flash_attention_paged")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_a_minus_inf_row_with_no_key_is_nan_as_in_eager_through_the_lengths():
    """Hand-written -inf attention gives NaN on a length-0 row; the fix-up now reads the lengths."""
    q, k_cache, v_cache, block_table, _ = make_inputs()
    seq_lens = torch.tensor([0, 20, 64])
    expected = index_select_handwritten(q, k_cache, v_cache, block_table, seq_lens)
    report = Report()
    out = compile_eager(index_select_handwritten, report)(q, k_cache, v_cache, block_table, seq_lens)
    assert_paged(report, "npu_incre_flash_attention_paged")
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1:]).any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert any("fix-up reads the lengths" in n for n in report.sites[0].notes)


def test_int64_block_table_is_cast_and_the_lengths_change_without_recompiling():
    report = Report()
    compiled = compile_eager(index_view_sdpa_gqa, report)
    for step, lens in enumerate([(5, 40, 64), (6, 41, 1), (7, 42, 2)]):
        args = make_inputs(seq_lens=lens, table_dtype=torch.int64, seed=step)
        torch.testing.assert_close(compiled(*args), index_view_sdpa_gqa(*args), rtol=1e-5, atol=1e-6)
    assert len(report.graph_modules) == 1  # one graph for every step
    assert_paged(report, "npu_incre_flash_attention_paged")


def two_layers(q, k_cache, v_cache, block_table, seq_lens):
    """Two attention layers reading one int64 table (a model's decode step)."""
    h = index_view_sdpa_gqa(q, k_cache, v_cache, block_table, seq_lens)
    return index_view_sdpa_gqa(h, v_cache, k_cache, block_table, seq_lens)


def two_layers_table_written_between(q, k_cache, v_cache, block_table, seq_lens):
    h = index_view_sdpa_gqa(q, k_cache, v_cache, block_table, seq_lens)
    block_table[:, :2] = block_table[:, :2].flip(0)  # in place, between the two reads
    return index_view_sdpa_gqa(h, v_cache, k_cache, block_table, seq_lens)


@pytest.mark.parametrize("fn,casts", [(two_layers, 1), (two_layers_table_written_between, 2)])
def test_int64_table_is_cast_once_per_graph_unless_written_between(fn, casts):
    report = Report()
    args = make_inputs(table_dtype=torch.int64)
    expected = fn(*[a.clone() for a in args])
    torch.testing.assert_close(compile_eager(fn, report)(*args), expected, rtol=1e-5, atol=1e-6)
    graph = graph_of(report)
    assert len([n for n in graph.nodes if n.target in PAGED_OPS]) == 2
    # The rule casts with prims.convert_element_type; the eager executor runs it as aten._to_copy.
    assert sum(targets(graph).count(t) for t in CASTS) == casts, graph


def test_a_cast_is_not_reused_across_a_write_of_the_table():
    """Dynamo's graphs are functional, so the case is built by hand: a write of the table
    (directly, or through a view of it) between the cast and a later read forbids reuse."""
    from npu_attn_graph.passes.paged_attention_read import _written_between

    for write, expected in (("none", False), ("direct", True), ("view", True), ("unknown", True)):
        graph = torch.fx.Graph()
        table, other = graph.placeholder("table"), graph.placeholder("other")
        cast = graph.call_function(torch.ops.prims.convert_element_type.default, (table, torch.int32))
        graph.call_function(aten.sum.default, (table,))
        if write == "direct":
            graph.call_function(aten.copy_.default, (table, other))
        elif write == "view":
            part = graph.call_function(aten.slice.Tensor, (table, 1, 0, 2))
            graph.call_function(aten.fill_.Scalar, (part, 0))
        elif write == "unknown":
            graph.call_function(lambda t: t.zero_(), (table,))
        later = graph.call_function(aten.neg.default, (other,))
        graph.output(later)
        assert _written_between(cast, later, table) is expected, write


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision(dtype, tol):
    """fp16/bf16: the reference accumulates in fp32 and rounds once, eager SDPA rounds its
    intermediate products in the input dtype: about one output ulp apart (README's bounds)."""
    args = make_inputs(dtype=dtype)
    expected = index_view_sdpa_gqa(*[a.float() if a.is_floating_point() else a for a in args])
    report = Report()
    out = compile_eager(index_view_sdpa_gqa, report)(*args)
    assert out.dtype == dtype
    assert_paged(report, "npu_incre_flash_attention_paged")
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(out.float(), index_view_sdpa_gqa(*args).float(), rtol=2 * tol, atol=2 * tol)


def test_several_query_tokens_attending_every_valid_key_use_fused_infer():
    """S_q > 1 with the lengths mask only (no causal term, e.g. scoring candidates against the
    context): npu_fused_infer_attention_score with block_table and no mask."""
    args = make_inputs(q_len=3)
    expected = index_view_sdpa_gqa(*args)
    report = Report()
    out = compile_eager(index_view_sdpa_gqa, report)(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    node = assert_paged(report, "npu_fused_infer_attention_score_paged")
    assert node.kwargs.get("atten_mask") is None and node.kwargs.get("sparse_mode", 0) == 0


# --- refusals (a causal chunk is fused: tests/test_paged_chunk.py) -------------------------------


def keys_past_the_length(q, k_cache, v_cache, block_table, seq_lens):
    b = q.shape[0]
    k = k_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2)
    v = v_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2)
    keep = torch.arange(S_KV) >= seq_lens[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)


def finfo_min_mask(q, k_cache, v_cache, block_table, seq_lens):
    b = q.shape[0]
    k = k_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2).repeat_interleave(2, 1)
    v = v_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2).repeat_interleave(2, 1)
    scores = q @ k.transpose(-1, -2) * D ** -0.5
    scores = scores + torch.where(keep_mask(seq_lens), 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    return scores.softmax(-1) @ v


def two_length_tensors(q, k_cache, v_cache, block_table, seq_lens):
    b = q.shape[0]
    k = k_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2)
    v = v_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2)
    keep = (torch.arange(S_KV) < seq_lens[:, None]) & (torch.arange(S_KV) >= (seq_lens // 4)[:, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)


def no_mask(q, k_cache, v_cache, block_table, seq_lens):
    b = q.shape[0]
    k = k_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2)
    v = v_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True) + seq_lens.sum()


REFUSALS = {
    "keys-past-the-length": (keys_past_the_length, 1, "is not 'key j kept iff j < seq_len[b]'"),
    "finfo-min-mask": (finfo_min_mask, 1, "the mean of every gathered value"),
    "two-length-tensors": (two_length_tensors, 1, "is not 'key j kept iff j < seq_len[b]'"),
    "no-mask": (no_mask, 1, "no mask: every gathered position"),
}


def assert_left_dense(fn, args, reason):
    """fn compiled equals eager, its attention fused but left reading the dense gather, with reason."""
    expected = fn(*args)
    report = Report()
    out = compile_eager(fn, report)(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    [site] = [s for s in report.sites if s.kind == "attention"]
    assert site.pattern == "paged:gather-attention", report.table()
    assert site.fused_op is not None, report.table()
    note = next(n for n in site.notes if n.startswith("paged read left as the dense gather"))
    assert reason in note, note
    graph = graph_of(report)
    # No block_table. (static_cache_lengths may still hand the dense gather's op its KV lengths
    # through the same wrapper, without block_table, where a mask term is a key bound.)
    assert not [n for n in graph.nodes if n.target in PAGED_OPS and n.kwargs.get("block_table") is not None]
    assert [t for t in targets(graph) if t in GATHERS]


@pytest.mark.parametrize("name", list(REFUSALS))
def test_sites_not_provably_a_paged_read_stay_dense_with_the_reason(name):
    fn, q_len, reason = REFUSALS[name]
    assert_left_dense(fn, make_inputs(q_len=q_len, seq_lens=(5, 40, 64)), reason)


def test_a_gather_that_is_not_whole_blocks_is_refused_with_the_reason():
    """The gathered blocks regrouped so that a sequence position is not (block, offset)."""
    def shuffled(q, k_cache, v_cache, block_table, seq_lens):
        b = q.shape[0]
        k = k_cache[block_table].transpose(1, 2).reshape(b, S_KV, HKV, D).transpose(1, 2)  # (offset, block)
        v = v_cache[block_table].transpose(1, 2).reshape(b, S_KV, HKV, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask(seq_lens)[:, None, None, :],
                                              enable_gqa=True)

    args = make_inputs()
    report = Report()
    torch.testing.assert_close(compile_eager(shuffled, report)(*args), shuffled(*args), rtol=1e-5, atol=1e-6)
    [site] = [s for s in report.sites if s.kind == "attention"]
    assert any("sequence = (table column, offset in block)" in n for n in site.notes), site.notes


# --- with the paged write, as a serving engine's decode step runs it -----------------------------


def decode_step(q, k, v, k_cache, v_cache, slot_mapping, block_table, seq_lens):
    """Write the new token's K/V through the slot mapping, then the paged read (mini-vLLM)."""
    b = q.shape[0]
    k_cache.view(-1, HKV, D)[slot_mapping] = k
    v_cache.view(-1, HKV, D)[slot_mapping] = v
    s_kv = block_table.shape[1] * k_cache.shape[1]
    keys = k_cache[block_table].view(b, s_kv, HKV, D).transpose(1, 2)
    values = v_cache[block_table].view(b, s_kv, HKV, D).transpose(1, 2)
    mask = torch.arange(s_kv, device=q.device) < seq_lens[:, None]
    keys, values = repeat_kv(keys, H // HKV), repeat_kv(values, H // HKV)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :])
    return out.reshape(b, H * D)


def decode_inputs(dtype=torch.float32, seed=0):
    q, k_cache, v_cache, block_table, _ = make_inputs(dtype=dtype, seed=seed)
    seq_lens = torch.tensor([5, 40, 64])
    g = torch.Generator().manual_seed(seed + 1)
    pos = seq_lens - 1
    slots = (block_table.long().gather(1, (pos // BS)[:, None])[:, 0] * BS + pos % BS)
    k, v = torch.randn(B, HKV, D, generator=g).to(dtype), torch.randn(B, HKV, D, generator=g).to(dtype)
    return q[:, :, 0], k, v, k_cache, v_cache, slots, block_table, seq_lens


def test_decode_step_with_the_paged_write_fuses_both():
    args = decode_inputs()
    ref = [a.clone() for a in args]
    expected = decode_step(*ref)
    report = Report()
    out = compile_eager(decode_step, report)(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(args[3], ref[3], rtol=0, atol=0)  # caches written as eager wrote them
    torch.testing.assert_close(args[4], ref[4], rtol=0, atol=0)
    kinds = sorted((s.kind, s.fused_op) for s in report.sites)
    assert kinds == [("attention", "npu_incre_flash_attention_paged"), ("kv_update", "npu_scatter_pa_kv_cache"),
                     ("kv_update", "npu_scatter_pa_kv_cache")], report.table()
    assert not [t for t in targets(graph_of(report)) if t in GATHERS]


def test_decode_step_under_the_inductor_executor_fuses_both():
    """Inductor's decompositions spell the mask's arange as prims.iota, and Inductor rejects ops
    its decompositions remove (aten.clamp): the rewrite reads the one and inserts clamp_min/max."""
    args = decode_inputs()
    ref = [a.clone() for a in args]
    expected = decode_step(*ref)
    report = Report()
    compiled = torch.compile(decode_step, backend="npu_attn", fullgraph=True,
                             options={"executor": "inductor", "report": report})
    out = compiled(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(args[3], ref[3], rtol=0, atol=0)
    torch.testing.assert_close(args[4], ref[4], rtol=0, atol=0)
    kinds = sorted((s.kind, s.fused_op) for s in report.sites)
    assert kinds == [("attention", "npu_incre_flash_attention_paged"), ("kv_update", "npu_scatter_pa_kv_cache"),
                     ("kv_update", "npu_scatter_pa_kv_cache")], report.table()
    assert not [t for t in targets(graph_of(report)) if t in GATHERS]


def _producer(graph, op, input_name):
    names = [d.name for d in op.input_desc]
    src = [s for s in op.input if not s.endswith(":-1")][names.index(input_name)]
    if not src:
        return None
    name = src.rsplit(":", 1)[0]
    return next(o for o in graph.op if o.name == name)


def _source(graph, op, input_name, through=8):
    """(op, output index) at the end of the first-input chain from op.input_name: a Data op,
    or the first op that is not a Reshape / Cast / ClipByValueV2 / Identity."""
    names = [d.name for d in op.input_desc]
    src = [s for s in op.input if not s.endswith(":-1")][names.index(input_name)]
    for _ in range(through):
        assert src, f"{op.type}.{input_name} is unfed"
        name, index = src.rsplit(":", 1)
        node = next(o for o in graph.op if o.name == name)
        if node.type not in ("Reshape", "Cast", "ClipByValueV2", "Identity"):
            return node, int(index)
        src = [s for s in node.input if not s.endswith(":-1")][0]
    raise AssertionError(f"{op.type}.{input_name}: no source within {through} ops")


def _is_arg(node, tensor) -> bool:
    """A Data op whose recorded meta is the argument's (dtype and shape)."""
    meta = node.output_desc[0].attr["_meta"].s.decode() if node.type == "Data" else ""
    return meta.startswith(f"Tensor(dtype={tensor.dtype}, shape={tensor.shape}")


def test_decode_step_is_one_ge_graph_with_incre_flash_attention_reading_block_table(tmp_path):
    pytest.importorskip("google.protobuf")
    q, k, v, k_cache, v_cache, slots, block_table, seq_lens = decode_inputs(dtype=torch.float16)
    seq_lens = seq_lens.int()  # int32: the one (B,) int32 argument, told apart from the int64 slots
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(decode_step, q, k, v, k_cache, v_cache, slots, block_table, seq_lens,
                                            out_dir=tmp_path)
    assert result.single_graph, result.summary()
    graph = result.graphs[0].graph_def
    types = [op.type for op in graph.op]
    [ifa] = [op for op in graph.op if op.type == "IncreFlashAttention"]
    [scatter] = [op for op in graph.op if op.type == "ScatterPaKvCache"]
    assert not {"GatherV2", "IndexByTensor", "GatherElements", "IndexSelect", "Less"} & set(types), types
    # block_table is the table argument (int32 as given), the lengths the seq_lens argument (through
    # the clamp), the caches the ScatterPaKvCache's in-place outputs (viewed (blocks, block_size, Hkv*D)).
    assert _is_arg(_source(graph, ifa, "block_table")[0], block_table)
    assert _is_arg(_source(graph, ifa, "actual_seq_lengths")[0], seq_lens)
    assert _source(graph, ifa, "key0") == (scatter, 0) and _source(graph, ifa, "value0") == (scatter, 1)
    names = [d.name for d in ifa.input_desc]
    assert not [s for s in ifa.input if not s.endswith(":-1")][names.index("atten_mask")]  # no mask
    assert ifa.attr["block_size"].i == BS and ifa.attr["num_heads"].i == H
    assert ifa.attr["num_key_value_heads"].i == HKV and ifa.attr["input_layout"].s.decode() == "BNSD"


def test_prefill_chunk_without_causality_is_fused_infer_attention_score_in_ge(tmp_path):
    pytest.importorskip("google.protobuf")
    q, k_cache, v_cache, block_table, seq_lens = make_inputs("bhsd", q_len=3, dtype=torch.float16)
    seq_lens = seq_lens.int()
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(heads_first_cache, q, k_cache, v_cache, block_table, seq_lens,
                                            out_dir=tmp_path)
    assert result.single_graph, result.summary()
    graph = result.graphs[0].graph_def
    types = [op.type for op in graph.op]
    assert not {"IndexByTensor", "Less", "PromptFlashAttention"} & set(types), types
    [fia] = [op for op in graph.op if op.type == "FusedInferAttentionScore"]
    assert _is_arg(_source(graph, fia, "block_table")[0], block_table)
    assert _is_arg(_source(graph, fia, "actual_seq_lengths_kv")[0], seq_lens)
    assert _is_arg(_source(graph, fia, "key0")[0], k_cache)  # the (num_blocks, Hkv, block_size, D) cache itself
    names = [d.name for d in fia.input_desc]
    fed = [s for s in fia.input if not s.endswith(":-1")]
    assert not fed[names.index("actual_seq_lengths")] and not fed[names.index("atten_mask")]
    assert fia.attr["block_size"].i == BS and fia.attr["input_layout"].s.decode() == "BNSD"


# --- the wrapper ops -----------------------------------------------------------------------------


def test_wrappers_equal_the_wrapped_ops_with_host_lengths():
    q, k_cache, v_cache, block_table, seq_lens = make_inputs("bhsd")
    kw = dict(num_heads=H, num_key_value_heads=HKV, input_layout="BNSD", block_size=BS, scale_value=0.25)
    got = OPS.npu_incre_flash_attention_paged(q, k_cache, v_cache, block_table=block_table,
                                              actual_seq_lengths=seq_lens, **kw)
    want = OPS.npu_incre_flash_attention(q, k_cache, v_cache, block_table=block_table,
                                         actual_seq_lengths=seq_lens.tolist(), **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    kw["scale"] = kw.pop("scale_value")
    got = OPS.npu_fused_infer_attention_score_paged(q, k_cache, v_cache, block_table=block_table,
                                                    actual_seq_lengths_kv=seq_lens.int(), **kw)
    want = OPS.npu_fused_infer_attention_score(q, k_cache, v_cache, block_table=block_table,
                                               actual_seq_lengths_kv=seq_lens.tolist(), **kw)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.library.opcheck(OPS.npu_incre_flash_attention_paged.default, (q, k_cache, v_cache),
                          dict(block_table=block_table, actual_seq_lengths=seq_lens, num_heads=H,
                               num_key_value_heads=HKV, input_layout="BNSD", block_size=BS))


def test_wrapper_checks_are_the_wrapped_ops():
    q, k_cache, v_cache, block_table, seq_lens = make_inputs("bhsd")
    kw = dict(num_heads=H, num_key_value_heads=HKV, input_layout="BNSD")
    with pytest.raises(NpuAttnArgumentError, match="npu_incre_flash_attention: block_size must be a multiple of 16"):
        OPS.npu_incre_flash_attention_paged(q, k_cache, v_cache, block_table=block_table,
                                            actual_seq_lengths=seq_lens, block_size=8, **kw)
    with pytest.raises(NpuAttnArgumentError, match="actual_seq_lengths.dtype must be one of"):
        OPS.npu_incre_flash_attention_paged(q, k_cache, v_cache, block_table=block_table,
                                            actual_seq_lengths=seq_lens.float(), block_size=BS, **kw)
    with pytest.raises(NpuAttnArgumentError, match=r"block_table.shape\[1\] must be >= ceil\(max\(actual_seq_lengths\) / block_size\)"):
        OPS.npu_incre_flash_attention_paged(q, k_cache, v_cache, block_table=block_table,
                                            actual_seq_lengths=torch.tensor([1, 2, S_KV + 1]), block_size=BS, **kw)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, pytest.raises(NpuAttnArgumentError, match="block_size must be a multiple"):
        fakes = [mode.from_tensor(t) for t in (q, k_cache, v_cache, block_table, seq_lens)]
        OPS.npu_incre_flash_attention_paged(*fakes[:3], block_table=fakes[3], actual_seq_lengths=fakes[4],
                                            block_size=8, **kw)


def test_a_two_dim_mask_whose_bound_moves_with_the_batch_row_is_not_read_as_lengths():
    """In the op's (B, S_kv) mask form, axis -2 is the batch, not a query row of index 0:
    'key j kept iff j < L[b] + b' is not the lengths L (it was read as them, offset 0)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from npu_attn_graph.passes.paged_attention_read import Refused, _lengths_mask

    def masked(lengths):
        return ~(torch.arange(S_KV)[None, :] < (lengths[:, None] + torch.arange(B)[:, None]))

    graph = make_fx(masked, tracing_mode="fake")(torch.tensor([4, 5, 6])).graph
    mask = [n for n in graph.nodes if n.op == "call_function"][-1]
    with pytest.raises(Refused, match="axis 0"):
        _lengths_mask(mask, 1)
    # the same bound without the row term is the lengths
    graph = make_fx(lambda lengths: ~(torch.arange(S_KV)[None, :] < lengths[:, None]),
                    tracing_mode="fake")(torch.tensor([4, 5, 6])).graph
    assert _lengths_mask([n for n in graph.nodes if n.op == "call_function"][-1], 1).offset == 0
