"""Paged KV-cache writes through a slot mapping become npu_scatter_pa_kv_cache."""

from __future__ import annotations

import torch

from npu_attn_graph import Report


def store_and_read(key, value, key_cache, value_cache, slots, block_table):
    """vLLM-style: store the new tokens, then gather one sequence's keys/values."""
    n, d = key.shape[1], key.shape[2]
    key_cache.view(-1, n, d)[slots] = key
    value_cache.view(-1, n, d).index_copy_(0, slots, value)
    keys = key_cache[block_table].flatten(0, 1)
    values = value_cache[block_table].flatten(0, 1)
    return (keys * values).sum(-1)


def _inputs(tokens=5):
    g = torch.Generator().manual_seed(4)
    key, value = torch.randn(tokens, 2, 16, generator=g), torch.randn(tokens, 2, 16, generator=g)
    key_cache, value_cache = torch.randn(6, 4, 2, 16, generator=g), torch.randn(6, 4, 2, 16, generator=g)
    slots = torch.randperm(24, generator=g)[:tokens]
    block_table = torch.tensor([3, 0, 5])
    return key, value, key_cache, value_cache, slots, block_table


def test_key_and_value_writes_become_one_in_place_fused_write():
    args = _inputs()
    expected_args = [a.clone() for a in args]
    expected = store_and_read(*expected_args)
    report = Report()
    out = torch.compile(store_and_read, backend="npu_attn", fullgraph=True, options={"report": report})(*args)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(args[2], expected_args[2], rtol=0, atol=0)
    torch.testing.assert_close(args[3], expected_args[3], rtol=0, atol=0)
    sites = [s for s in report.sites if s.kind == "kv_update"]
    assert len(sites) == 2 and all(s.fused_op == "npu_scatter_pa_kv_cache" for s in sites), report.table()
    graph = report.graph_modules[0].graph
    assert len(graph.find_nodes(op="call_function", target=torch.ops.npu_attn.npu_scatter_pa_kv_cache.default)) == 1
    assert not graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)  # no full-cache copies
    assert not graph.find_nodes(op="call_function", target=torch.ops.aten.index_put.default)


def test_a_lone_write_is_left_with_the_reason():
    def store_key(key, key_cache, slots):
        key_cache.view(-1, key.shape[1], key.shape[2])[slots] = key
        return key_cache.sum()

    key, _, key_cache, _, slots, _ = _inputs()
    expected_cache = key_cache.clone()
    store_key(key, expected_cache, slots)
    report = Report()
    torch.compile(store_key, backend="npu_attn", fullgraph=True, options={"report": report})(key, key_cache, slots)
    (site,) = report.sites
    assert not site.rewritten and "no second cache write with the same slot mapping" in site.reason
    torch.testing.assert_close(key_cache, expected_cache, rtol=0, atol=0)


def test_a_read_between_the_writes_keeps_them():
    def store(key, value, key_cache, value_cache, slots, block_table):
        n, d = key.shape[1], key.shape[2]
        key_cache.view(-1, n, d)[slots] = key
        seen = key_cache.sum()  # reads the key cache before the value write
        value_cache.view(-1, n, d)[slots] = value
        return seen + value_cache.sum()

    args = _inputs()
    expected = store(*[a.clone() for a in args])
    report = Report()
    out = torch.compile(store, backend="npu_attn", fullgraph=True, options={"report": report})(*args)
    torch.testing.assert_close(out, expected)
    assert all(not s.rewritten and "read between" in s.reason for s in report.sites)
