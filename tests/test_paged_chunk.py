"""A paged read with a causal query chunk (chunked prefill, prefix-cache continuation): S_q new
tokens per sequence attend to the paged cache through the block table with the bottom-right
aligned causal mask "key j kept iff j <= L[b] - S_q + i" (L the total length, chunk included).
It becomes npu_fused_infer_attention_score (the paged wrapper, lengths as a tensor) with the
op's sparse_mode 3 (rightDownCausal: j <= i + kv_len[b] - S_q) and the compressed mask.

Each spelling is plain PyTorch; the compiled function (eager executor) is compared with the
function run eagerly on the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import npu_attn_graph
from npu_attn_graph import NpuAttnArgumentError, Report
from test_paged_attention_read import (BS, D, GATHERS, H, HKV, PAGED_OPS, S_KV, _is_arg, _source,
                                       assert_left_dense, compile_eager, dirty_caches, graph_of, make_inputs,
                                       repeat_kv, targets)

S_Q = 3
FIA = "npu_fused_infer_attention_score_paged"


def causal_keep(seq_lens, s_q, s_kv=S_KV):
    """(B, S_q, S_kv): key j kept for query row i iff j <= L[b] - S_q + i."""
    j = torch.arange(s_kv)
    i = torch.arange(s_q)
    return j[None, None, :] <= (seq_lens[:, None, None] - s_q + i[None, :, None])


# --- the spellings -------------------------------------------------------------------------------


def index_sdpa_lengths_and_causal(q, k_cache, v_cache, block_table, seq_lens):
    """cache[block_table].view.transpose, SDPA with a bool mask: (j < L) & (j <= L - S_q + i)."""
    b, s_q = q.shape[0], q.shape[2]
    k = k_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2)
    v = v_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2)
    j = torch.arange(S_KV)
    keep = (j[None, None, :] < seq_lens[:, None, None]) & causal_keep(seq_lens, s_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=True)


def index_select_handwritten(q, k_cache, v_cache, block_table, seq_lens):
    """index_select of the flat table, repeat_kv, hand-written -inf masked_fill (causal term only)."""
    b, s_q = q.shape[0], q.shape[2]
    k = k_cache.index_select(0, block_table.flatten()).reshape(b, S_KV, HKV, D).transpose(1, 2)
    v = v_cache.index_select(0, block_table.flatten()).reshape(b, S_KV, HKV, D).transpose(1, 2)
    k, v = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(~causal_keep(seq_lens, s_q)[:, None], float("-inf"))
    return scores.softmax(-1) @ v


def gather_sdpa_additive(q, k_cache, v_cache, block_table, seq_lens):
    """torch.gather with the table expanded over a block, an additive -inf mask built with where."""
    b, s_q = q.shape[0], q.shape[2]
    idx = block_table.long().reshape(-1, 1, 1, 1).expand(-1, BS, HKV, D)
    k = torch.gather(k_cache, 0, idx).view(b, S_KV, HKV, D).transpose(1, 2)
    v = torch.gather(v_cache, 0, idx).view(b, S_KV, HKV, D).transpose(1, 2)
    bias = torch.where(causal_keep(seq_lens, s_q), 0.0, float("-inf"))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


def heads_first_context_lengths(q, k_cache, v_cache, block_table, context_lens):
    """Caches (num_blocks, Hkv, block_size, D); the lengths given as the context *before* the chunk
    (prefix-cache continuation): key j kept iff j <= context_len + i."""
    b, s_q = q.shape[0], q.shape[2]
    k = k_cache[block_table].transpose(1, 2).reshape(b, HKV, S_KV, D)
    v = v_cache[block_table].transpose(1, 2).reshape(b, HKV, S_KV, D)
    keep = torch.arange(S_KV)[None, None, :] <= context_lens[:, None, None] + torch.arange(s_q)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=True)


def flat_cache_where(q, k_cache, v_cache, block_table, seq_lens):
    """Caches (num_blocks, block_size, H); a where on the scores, the causal test written with >."""
    b, s_q = q.shape[0], q.shape[2]
    k = k_cache[block_table].flatten(1, 2).view(b, S_KV, HKV, D).transpose(1, 2)
    v = v_cache[block_table].flatten(1, 2).view(b, S_KV, HKV, D).transpose(1, 2)
    k, v = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
    masked = torch.arange(S_KV)[None, None, :] > (seq_lens[:, None, None] - s_q + torch.arange(s_q)[:, None])
    scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    scores = torch.where(masked[:, None], float("-inf"), scores)
    return torch.matmul(scores.softmax(-1), v)


def bsnd_matmul_mha(q, k_cache, v_cache, block_table, seq_lens):
    """K/V gathered BSND, query (B, S_q, H, D), transposed to heads-first for matmul, MHA.
    (The einsum spelling of decode is not recognised as attention with S_q > 1: see the report.)"""
    b, s_q = q.shape[0], q.shape[1]
    k = k_cache[block_table].view(b, S_KV, H, D)
    v = v_cache[block_table].view(b, S_KV, H, D)
    scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * D ** -0.5
    scores = scores.masked_fill(~causal_keep(seq_lens, s_q)[:, None], float("-inf"))
    return (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)


SPELLINGS = {  # fn, cache form, kv heads, query layout, lengths offset (kv_len = input + offset)
    "index-sdpa-lengths-and-causal": (index_sdpa_lengths_and_causal, "bshd", HKV, "bnsd", 0),
    "index_select-handwritten": (index_select_handwritten, "bshd", HKV, "bnsd", 0),
    "gather-sdpa-additive": (gather_sdpa_additive, "bshd", HKV, "bnsd", 0),
    "heads-first-context-lengths": (heads_first_context_lengths, "bhsd", HKV, "bnsd", S_Q),
    "flat-cache-where": (flat_cache_where, "bsH", HKV, "bnsd", 0),
    "bsnd-matmul-mha": (bsnd_matmul_mha, "bshd", H, "bsnd", 0),
}


def chunk_inputs(name, seq_lens=(5, 40, 64), **kw):
    fn, form, kv_heads, q_layout, offset = SPELLINGS[name]
    args = list(make_inputs(form, kv_heads, q_len=S_Q, seq_lens=seq_lens, q_layout=q_layout, **kw))
    args[4] = args[4] - offset  # the context lengths spelling takes L - S_q
    return fn, args


def assert_causal_paged(report):
    graph = graph_of(report)
    assert not [t for t in targets(graph) if t in GATHERS], graph  # the dense gather is gone
    [site] = [s for s in report.sites if s.kind == "attention"]
    assert site.pattern == "paged:gather-attention" and site.fused_op == FIA, report.table()
    assert site.sparse_mode == 3 and "rightDownCausal" in site.notes[0], site.notes
    [node] = [n for n in graph.nodes if n.target in PAGED_OPS]
    assert node.kwargs["sparse_mode"] == 3 and node.kwargs["block_size"] == BS
    mask = node.kwargs["atten_mask"]  # the compressed mask (a folded constant or the triu construction)
    value = getattr(graph.owning_module, mask.target) if mask.op == "get_attr" else None
    if value is not None:
        assert torch.equal(value, torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1))
    return node


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_each_spelling_becomes_fia_with_sparse_mode_3(name):
    fn, args = chunk_inputs(name)
    expected = fn(*args)
    report = Report()
    out = compile_eager(fn, report)(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert_causal_paged(report)


@pytest.mark.parametrize("name", ["index-sdpa-lengths-and-causal", "index_select-handwritten", "flat-cache-where"])
def test_nan_in_unused_blocks_and_past_the_lengths_never_reaches_the_output(name):
    fn, args = chunk_inputs(name, seq_lens=(5, 17, 33))
    q, k_cache, v_cache, block_table, seq_lens = args
    expected = fn(*args)
    dirty_k, dirty_v, table = dirty_caches(k_cache, v_cache, block_table, seq_lens)
    report = Report()
    out = compile_eager(fn, report)(q, dirty_k, dirty_v, table, seq_lens)
    assert_causal_paged(report)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["index-sdpa-lengths-and-causal", "index_select-handwritten",
                                  "gather-sdpa-additive"])
def test_rows_before_a_short_sequence_start_are_eagers(name):
    """A chunk longer than its sequence (L < S_q: rows i < S_q - L keep no key, and L <= 0 none at
    all): SDPA gives those rows 0 as the op does; the hand-written -inf softmax gives NaN, through
    the fix-up that now reads the lengths."""
    fn, args = chunk_inputs(name, seq_lens=(1, 0, 64))
    expected = fn(*args)
    report = Report()
    out = compile_eager(fn, report)(*args)
    assert_causal_paged(report)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    if name == "index_select-handwritten":
        assert torch.isnan(out[0, :, :2]).all() and not torch.isnan(out[0, :, 2]).any()
        assert torch.isnan(out[1]).all() and not torch.isnan(out[2]).any()
        assert any("fix-up reads the lengths (rows i < S_q - kv_len)" in n for n in report.sites[0].notes)
    args[4] = torch.tensor([-2, 2, 7])
    torch.testing.assert_close(compile_eager(fn, Report())(*args), fn(*args), rtol=1e-5, atol=1e-6,
                               equal_nan=True)


def test_a_length_past_the_gathered_capacity_is_a_clear_error():
    """Clamping such a length would move the causal diagonal, so it goes in as given and the op's
    own check names it (eager would attend up to the table's capacity)."""
    fn, args = chunk_inputs("index-sdpa-lengths-and-causal")
    compiled = compile_eager(fn, Report())
    compiled(*args)
    args[4] = torch.tensor([5, 40, S_KV + 1])
    with pytest.raises(NpuAttnArgumentError, match=r"ceil\(max\(actual_seq_lengths_kv\) / block_size\) = 5"):
        compiled(*args)


@pytest.mark.parametrize("name", ["index-sdpa-lengths-and-causal", "index_select-handwritten"])
def test_a_new_chunk_length_recompiles_once_dynamic_and_stays_fused(name):
    """Symbolic S_q: the causal offset is still proved (S_q - 1 - (S_q - 1) = 0), and the -inf
    fix-up is built from the mask's symbolic sizes."""
    fn = SPELLINGS[name][0]
    report = Report()
    compiled = compile_eager(fn, report)
    for s_q, lens in [(3, (5, 40, 64)), (5, (2, 41, 0)), (7, (8, 50, 3))]:
        q, k_cache, v_cache, table, seq_lens = make_inputs(q_len=s_q, seq_lens=lens, seed=s_q)
        torch.testing.assert_close(compiled(q, k_cache, v_cache, table, seq_lens),
                                   fn(q, k_cache, v_cache, table, seq_lens), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert len(report.graph_modules) == 2, report.table()  # static, then one dynamic graph
    for gm in report.graph_modules:
        assert [n for n in gm.graph.nodes if n.target in PAGED_OPS], gm.graph
        assert not [t for t in targets(gm.graph) if t in GATHERS], gm.graph


def test_half_precision():
    """fp16: the reference accumulates in fp32 and rounds once; eager in fp32 is the oracle."""
    fn, args = chunk_inputs("index-sdpa-lengths-and-causal", dtype=torch.float16)
    expected = fn(*[a.float() if a.is_floating_point() else a for a in args])
    report = Report()
    out = compile_eager(fn, report)(*args)
    assert out.dtype == torch.float16
    assert_causal_paged(report)
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)


# --- refusals ------------------------------------------------------------------------------------


def _gathered(q, k_cache, v_cache, block_table):
    b = q.shape[0]
    k = k_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2)
    v = v_cache[block_table].view(b, S_KV, HKV, D).transpose(1, 2)
    return k, v


def top_left_causal(q, k_cache, v_cache, block_table, seq_lens):
    """(j < L) & (j <= i): the causal diagonal at the first key, not at the sequence's end."""
    k, v = _gathered(q, k_cache, v_cache, block_table)
    j, i = torch.arange(S_KV), torch.arange(q.shape[2])
    keep = (j[None, None, :] < seq_lens[:, None, None]) & (j[None, None, :] <= i[None, :, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=True)


def causal_past_the_lengths(q, k_cache, v_cache, block_table, seq_lens):
    """(j < L) & (j <= L - S_q + 1 + i): the band's last row would reach key L, which the lengths cut."""
    k, v = _gathered(q, k_cache, v_cache, block_table)
    j = torch.arange(S_KV)
    keep = (j[None, None, :] < seq_lens[:, None, None]) & causal_keep(seq_lens + 1, q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=True)


def per_sequence_chunk_lengths(q, k_cache, v_cache, block_table, seq_lens):
    """Different chunk lengths in one batch (right-padded query rows): j <= L - chunk[b] + i, the
    offset another tensor. The padding rows keep keys in eager; the op would need per-batch query
    lengths and would give them 0."""
    k, v = _gathered(q, k_cache, v_cache, block_table)
    chunk = (seq_lens % 3) + 1
    j, i = torch.arange(S_KV), torch.arange(q.shape[2])
    keep = j[None, None, :] <= (seq_lens - chunk)[:, None, None] + i[None, :, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=True)


def finfo_min_causal(q, k_cache, v_cache, block_table, seq_lens):
    """An additive finfo.min mask: a row with no key (L < S_q) is the mean of every gathered value in
    eager, unused blocks included; the op gives it 0."""
    k, v = _gathered(q, k_cache, v_cache, block_table)
    k, v = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
    scores = q @ k.transpose(-1, -2) * D ** -0.5
    bias = torch.where(causal_keep(seq_lens, q.shape[2]), 0.0, torch.finfo(torch.float32).min)
    return (scores + bias[:, None]).softmax(-1) @ v


def sliding_window_chunk(q, k_cache, v_cache, block_table, seq_lens):
    """Causal and a window of 8 keys: a lower bound on the key the op's sparse_mode 3 does not have."""
    k, v = _gathered(q, k_cache, v_cache, block_table)
    j, i = torch.arange(S_KV), torch.arange(q.shape[2])
    last = seq_lens[:, None, None] - q.shape[2] + i[None, :, None]
    keep = (j[None, None, :] <= last) & (j[None, None, :] > last - 8)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=True)


REFUSALS = {
    "top-left-causal": (top_left_causal, "aligned top-left"),
    "causal-past-the-lengths": (causal_past_the_lengths, "the band ends past the sequence"),
    "per-sequence-chunk-lengths": (per_sequence_chunk_lengths, "two length tensors"),
    "finfo-min-causal": (finfo_min_causal, "the mean of every gathered value"),
    "sliding-window-chunk": (sliding_window_chunk, "is not 'key j kept iff j < seq_len[b]'"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_chunks_not_provably_right_down_causal_stay_dense_with_the_reason(name):
    fn, reason = REFUSALS[name]
    assert_left_dense(fn, make_inputs(q_len=S_Q, seq_lens=(5, 40, 64)), reason)


# --- GE ------------------------------------------------------------------------------------------


def test_causal_chunk_is_fused_infer_attention_score_with_sparse_mode_3_in_ge(tmp_path):
    pytest.importorskip("google.protobuf")
    fn, args = chunk_inputs("index-sdpa-lengths-and-causal", dtype=torch.float16)
    q, k_cache, v_cache, block_table, seq_lens = args
    seq_lens = seq_lens.int()
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(fn, q, k_cache, v_cache, block_table, seq_lens, out_dir=tmp_path)
    assert result.single_graph, result.summary()
    graph = result.graphs[0].graph_def
    types = [op.type for op in graph.op]
    assert not {"IndexByTensor", "GatherV2", "LessEqual", "PromptFlashAttention"} & set(types), types
    [fia] = [op for op in graph.op if op.type == "FusedInferAttentionScore"]
    assert _is_arg(_source(graph, fia, "block_table")[0], block_table)
    assert _is_arg(_source(graph, fia, "actual_seq_lengths_kv")[0], seq_lens)
    names = [d.name for d in fia.input_desc]
    fed = [s for s in fia.input if not s.endswith(":-1")]
    assert not fed[names.index("actual_seq_lengths")]  # every query row
    assert fed[names.index("atten_mask")]  # the compressed causal mask
    assert fia.attr["sparse_mode"].i == 3 and fia.attr["block_size"].i == BS
    assert fia.attr["input_layout"].s.decode() == "BNSD" and fia.attr["num_key_value_heads"].i == HKV
