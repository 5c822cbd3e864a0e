"""A combined KV cache input (2, num_blocks, block_size, Hkv, D), vLLM's FlashAttention-backend
layout: ``key_cache, value_cache = kv_cache.unbind(0)`` (or ``kv_cache[0]``, ``kv_cache[1]``).
Its paged writes become one npu_scatter_pa_kv_cache writing through the two halves of the
input (in place: no whole-cache copy), and its paged read the fused op with block_table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import npu_attn_graph
from npu_attn_graph import Report
from test_paged_attention_read import (BS, D, GATHERS, H, HKV, PAGED_OPS, compile_eager, decode_inputs, graph_of,
                                       make_inputs, repeat_kv, targets)

aten = torch.ops.aten
SCATTER = torch.ops.npu_attn.npu_scatter_pa_kv_cache.default


def _read(q, key_cache, value_cache, block_table, seq_lens):
    b, s_q = q.shape[0], q.shape[2]
    s_kv = block_table.shape[1] * key_cache.shape[1]
    keys = key_cache[block_table].view(b, s_kv, HKV, D).transpose(1, 2)
    values = value_cache[block_table].view(b, s_kv, HKV, D).transpose(1, 2)
    j, i = torch.arange(s_kv), torch.arange(s_q)
    keep = j[None, None, :] <= seq_lens[:, None, None] - s_q + i[None, :, None]
    keys, values = repeat_kv(keys, H // HKV), repeat_kv(values, H // HKV)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=keep[:, None])


def decode_unbind(q, k, v, kv_cache, slot_mapping, block_table, seq_lens):
    key_cache, value_cache = kv_cache.unbind(0)
    key_cache.view(-1, HKV, D)[slot_mapping] = k
    value_cache.view(-1, HKV, D)[slot_mapping] = v
    return _read(q.unsqueeze(2), key_cache, value_cache, block_table, seq_lens).flatten(1)


def decode_select_value_first(q, k, v, kv_cache, slot_mapping, block_table, seq_lens):
    """kv_cache[1] written first, with index_copy_."""
    kv_cache[1].view(-1, HKV, D).index_copy_(0, slot_mapping, v)
    kv_cache[0].view(-1, HKV, D).index_copy_(0, slot_mapping, k)
    return _read(q.unsqueeze(2), kv_cache[0], kv_cache[1], block_table, seq_lens).flatten(1)


def decode_block_offset(q, k, v, kv_cache, slot_mapping, block_table, seq_lens):
    """cache[slot // block_size, slot % block_size] = tokens into each half."""
    key_cache, value_cache = kv_cache.unbind(0)
    blocks, offsets = slot_mapping // BS, slot_mapping % BS
    key_cache[blocks, offsets] = k
    value_cache[blocks, offsets] = v
    return _read(q.unsqueeze(2), key_cache, value_cache, block_table, seq_lens).flatten(1)


def two_layers_list(q, k, v, kv_caches, slot_mapping, block_table, seq_lens):
    """One combined cache per layer, in a list; the layers share the slot mapping."""
    out = q
    for kv_cache in kv_caches:
        key_cache, value_cache = kv_cache.unbind(0)
        key_cache.view(-1, HKV, D)[slot_mapping] = k
        value_cache.view(-1, HKV, D)[slot_mapping] = v
        out = _read(out.unsqueeze(2), key_cache, value_cache, block_table, seq_lens)[:, :, 0]
    return out


def decode_args(dtype=torch.float32):
    q, k, v, k_cache, v_cache, slots, block_table, seq_lens = decode_inputs(dtype=dtype)
    return [q, k, v, torch.stack([k_cache, v_cache]), slots, block_table, seq_lens]


def _clone(args):
    return [[t.clone() for t in a] if isinstance(a, list) else a.clone() for a in args]


def run_both(fn, args):
    ref = _clone(args)
    expected = fn(*ref)
    report = Report()
    out = compile_eager(fn, report)(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    return report, ref


@pytest.mark.parametrize("fn", [decode_unbind, decode_select_value_first, decode_block_offset])
def test_combined_cache_decode_writes_in_place_through_the_halves_and_reads_paged(fn):
    args = decode_args()
    report, ref = run_both(fn, args)
    torch.testing.assert_close(args[3], ref[3], rtol=0, atol=0)  # the input written as eager wrote it
    kinds = sorted((s.kind, s.fused_op) for s in report.sites)
    assert kinds == [("attention", "npu_incre_flash_attention_paged"), ("kv_update", "npu_scatter_pa_kv_cache"),
                     ("kv_update", "npu_scatter_pa_kv_cache")], report.table()
    graph = graph_of(report)
    ops = targets(graph)
    assert ops.count(SCATTER) == 1
    # No whole-cache copy: no select_scatter, no copy_ back into the input, no dense gather.
    assert not {aten.select_scatter.default, aten.copy_.default, aten.index_put.default,
                aten.index_copy.default} & set(ops), graph
    assert not [t for t in ops if t in GATHERS]
    [scatter] = [n for n in graph.nodes if n.target is SCATTER]
    # The writer gets (tokens, tokens, half, half) in the order written: each half of the input.
    halves = scatter.args[2:4]
    assert all(a.target is aten.select.int and a.args[0].op == "placeholder" for a in halves), halves
    assert sorted(a.args[1:] for a in halves) == [(0, 0), (0, 1)]


def test_a_list_of_combined_caches_one_per_layer():
    args = decode_args()
    g = torch.Generator().manual_seed(5)
    args[3] = [args[3], torch.randn(args[3].shape, generator=g)]
    report, ref = run_both(two_layers_list, args)
    for got, want in zip(args[3], ref[3]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    fused = sorted(s.fused_op for s in report.sites)
    assert fused == ["npu_incre_flash_attention_paged"] * 2 + ["npu_scatter_pa_kv_cache"] * 4, report.table()
    assert targets(graph_of(report)).count(SCATTER) == 2


def test_chunked_prefill_write_and_causal_read_on_a_combined_cache():
    """T = B * S_q new tokens written, then the causal chunk read (sparse_mode 3)."""
    s_q = 3
    q, k_cache, v_cache, block_table, seq_lens = make_inputs(q_len=s_q, seq_lens=(5, 40, 64))
    pos = seq_lens[:, None] - s_q + torch.arange(s_q)  # the chunk's positions
    slots = (block_table.long().gather(1, pos // BS) * BS + pos % BS).flatten()
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(len(slots), HKV, D, generator=g), torch.randn(len(slots), HKV, D, generator=g)

    def prefill(q, k, v, kv_cache, slot_mapping, block_table, seq_lens):
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        key_cache.view(-1, HKV, D)[slot_mapping] = k
        value_cache.view(-1, HKV, D)[slot_mapping] = v
        return _read(q, key_cache, value_cache, block_table, seq_lens)

    args = [q, k, v, torch.stack([k_cache, v_cache]), slots, block_table, seq_lens]
    report, ref = run_both(prefill, args)
    torch.testing.assert_close(args[3], ref[3], rtol=0, atol=0)
    [attn] = [s for s in report.sites if s.kind == "attention"]
    assert attn.fused_op == "npu_fused_infer_attention_score_paged" and attn.sparse_mode == 3, report.table()
    assert sorted(s.fused_op for s in report.sites if s.kind == "kv_update") == ["npu_scatter_pa_kv_cache"] * 2


def test_read_only_combined_cache_is_a_paged_read():
    def read(q, kv_cache, block_table, seq_lens):
        key_cache, value_cache = kv_cache.unbind(0)
        return _read(q, key_cache, value_cache, block_table, seq_lens)

    q, k_cache, v_cache, block_table, seq_lens = make_inputs(q_len=2)
    report, _ = run_both(read, [q, torch.stack([k_cache, v_cache]), block_table, seq_lens])
    [node] = [n for n in graph_of(report).nodes if n.target in PAGED_OPS]
    assert node.kwargs["sparse_mode"] == 3


def two_writes_one_cache(q, k, v, kv_cache, slot_mapping, block_table, seq_lens):
    """Two tokens per sequence written one after the other into the same combined cache."""
    key_cache, value_cache = kv_cache.unbind(0)
    previous = slot_mapping - 1
    key_cache.view(-1, HKV, D)[previous] = k * 2
    value_cache.view(-1, HKV, D)[previous] = v * 2
    key_cache.view(-1, HKV, D)[slot_mapping] = k
    value_cache.view(-1, HKV, D)[slot_mapping] = v
    return _read(q.unsqueeze(2), key_cache, value_cache, block_table, seq_lens).flatten(1)


def two_writes_read_after_each(q, k, v, kv_cache, slot_mapping, block_table, seq_lens):
    """A read after each write pair: the first read must see the first pair only."""
    key_cache, value_cache = kv_cache.unbind(0)
    previous = slot_mapping - 1
    key_cache.view(-1, HKV, D)[previous] = k * 2
    value_cache.view(-1, HKV, D)[previous] = v * 2
    first = _read(q.unsqueeze(2), key_cache, value_cache, block_table, seq_lens).flatten(1)  # reads slot_mapping too
    key_cache.view(-1, HKV, D)[slot_mapping] = k
    value_cache.view(-1, HKV, D)[slot_mapping] = v
    return first, _read(q.unsqueeze(2), key_cache, value_cache, block_table, seq_lens).flatten(1)


@pytest.mark.parametrize("fn", [two_writes_one_cache, two_writes_read_after_each])
def test_two_write_pairs_into_one_combined_cache_both_in_place(fn):
    """Only the last pair's put-back is copied into the input; the first pair's is the next pair's
    source. Both write the input in place, in order, and a read between them sees the first only."""
    args = decode_args()
    ref = _clone(args)
    expected = fn(*ref)
    report = Report()
    out = compile_eager(fn, report)(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(args[3], ref[3], rtol=0, atol=0)
    writes = [s for s in report.sites if s.kind == "kv_update"]
    assert [s.fused_op for s in writes] == ["npu_scatter_pa_kv_cache"] * 4, report.table()
    ops = targets(graph_of(report))
    assert ops.count(SCATTER) == 2 and aten.select_scatter.default not in ops and aten.copy_.default not in ops


def test_two_writes_into_one_combined_cache_in_ge(tmp_path):
    """Functional writes: the second pair reads the first pair's put-back, not the input."""
    pytest.importorskip("google.protobuf")
    q, k, v, kv_cache, slots, block_table, seq_lens = decode_args(dtype=torch.float16)
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(two_writes_one_cache, q, k, v, kv_cache, slots, block_table,
                                            seq_lens.int(), out_dir=tmp_path)
    assert result.single_graph, result.summary()
    types = [op.type for op in result.graphs[0].graph_def.op]
    assert types.count("ScatterPaKvCache") == 2, types
    [gm] = result.report.graph_modules
    scatters = [n for n in gm.graph.nodes if n.target is torch.ops.npu_attn.npu_scatter_pa_kv_cache_functional.default]
    assert len(scatters) == 2
    # the second writer's halves are selects of the first's put-back (select_scatter), not of the input
    assert all(a.args[0].target is aten.select_scatter.default for a in scatters[1].args[2:4]), gm.graph


# --- refusals ------------------------------------------------------------------------------------


def read_between_the_writes(q, k, v, kv_cache, slot_mapping, block_table, seq_lens):
    key_cache, value_cache = kv_cache.unbind(0)
    key_cache.view(-1, HKV, D)[slot_mapping] = k
    peek = kv_cache.sum()  # the whole combined cache, between the two writes
    value_cache.view(-1, HKV, D)[slot_mapping] = v
    return _read(q.unsqueeze(2), key_cache, value_cache, block_table, seq_lens).flatten(1) + peek


def old_value_read_after(q, k, v, kv_cache, slot_mapping, block_table, seq_lens):
    before = kv_cache.clone()
    key_cache, value_cache = kv_cache.unbind(0)
    key_cache.view(-1, HKV, D)[slot_mapping] = k
    value_cache.view(-1, HKV, D)[slot_mapping] = v
    return _read(q.unsqueeze(2), key_cache, value_cache, block_table, seq_lens).flatten(1), before


@pytest.mark.parametrize("fn,reason", [(read_between_the_writes, "read between the writes")])
def test_combined_writes_not_provably_a_pair_stay_with_the_reason(fn, reason):
    args = decode_args()
    report, ref = run_both(fn, args)
    torch.testing.assert_close(args[3], ref[3], rtol=0, atol=0)
    writes = [s for s in report.sites if s.kind == "kv_update"]
    assert writes and all(s.fused_op is None for s in writes), report.table()
    assert all(reason in (s.reason or "") for s in writes), report.table()


def test_old_value_read_after_the_writes_gives_eagers_result():
    """The clone before the writes must keep the old value whatever the rule does."""
    args = decode_args()
    ref = _clone(args)
    expected, before = old_value_read_after(*ref)
    out, got_before = compile_eager(old_value_read_after, Report())(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_before, before, rtol=0, atol=0)
    torch.testing.assert_close(args[3], ref[3], rtol=0, atol=0)


# --- GE ------------------------------------------------------------------------------------------


def test_combined_cache_decode_is_one_ge_graph(tmp_path):
    """GE takes functional writes: the writer's outputs go back through the graph's own
    select_scatters (unfused, its index_put writes have no GE converter at all)."""
    pytest.importorskip("google.protobuf")
    q, k, v, kv_cache, slots, block_table, seq_lens = decode_args(dtype=torch.float16)
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(decode_unbind, q, k, v, kv_cache, slots, block_table, seq_lens.int(),
                                            out_dir=tmp_path)
    assert result.single_graph, result.summary()
    types = [op.type for op in result.graphs[0].graph_def.op]
    assert types.count("ScatterPaKvCache") == 1 and types.count("IncreFlashAttention") == 1, types
    assert not {"IndexByTensor", "IndexPut"} & set(types), types
