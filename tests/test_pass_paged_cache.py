"""Paged KV-cache writes through a slot mapping become npu_scatter_pa_kv_cache."""

from __future__ import annotations

import pytest
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


# ----------------------------------------------------------------------------
# The other spellings of the same write, each run compiled against eager on the same
# inputs (caches compared exactly), for the eager executor and for the GE target.
# ----------------------------------------------------------------------------

BLOCK_SIZE = 4


def _rows_of_heads(key, value, key_cache, value_cache, slots):
    n, d = key.shape[1], key.shape[2]
    key_cache.view(-1, n * d).index_copy_(0, slots, key.reshape(-1, n * d))
    value_cache.view(-1, n * d).index_copy_(0, slots, value.reshape(-1, n * d))


def _block_and_offset(key, value, key_cache, value_cache, slots):
    blocks, offsets = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    key_cache[blocks, offsets] = key
    value_cache[blocks, offsets] = value


def _block_and_offset_div(key, value, key_cache, value_cache, slots):
    blocks = torch.div(slots, BLOCK_SIZE, rounding_mode="floor")
    key_cache[blocks, slots % BLOCK_SIZE] = key
    value_cache[blocks, slots % BLOCK_SIZE] = value


def _reshape_and_cache(key, value, key_cache, value_cache, slots):
    def reshape_and_cache(k, v, kc, vc, slot_mapping):  # vLLM's helper, in plain PyTorch
        kc.view(-1, k.shape[1], k.shape[2])[slot_mapping] = k
        vc.view(-1, v.shape[1], v.shape[2])[slot_mapping] = v

    reshape_and_cache(key, value, key_cache, value_cache, slots)


def _list_of_caches(key, value, key_cache, value_cache, slots):
    caches = [key_cache, value_cache]
    for new, cache in zip((key, value), caches):
        cache.view(-1, new.shape[1], new.shape[2]).index_put_((slots,), new)


SPELLINGS = {"rows_of_heads": (_rows_of_heads, "index_copy(slot_mapping)"),
             "block_and_offset": (_block_and_offset, "index_put(block, offset)"),
             "block_and_offset_div": (_block_and_offset_div, "index_put(block, offset)"),
             "reshape_and_cache": (_reshape_and_cache, "index_put(slot_mapping)"),
             "list_of_caches": (_list_of_caches, "index_put(slot_mapping)")}


# index_copy rejects negative indices in eager as well: no padding case for it.
CASES = [(name, padding) for name in SPELLINGS for padding in (False, True)
         if not (padding and SPELLINGS[name][1].startswith("index_copy"))]


@pytest.mark.parametrize("target", ["torch", "ge"])
@pytest.mark.parametrize("name,padding", CASES, ids=[f"{n}-{'pad' if p else 'slots'}" for n, p in CASES])
def test_every_spelling_becomes_the_fused_writer(name, padding, target):
    from fuzz.oracle import ge_target_backend

    fn, pattern = SPELLINGS[name]
    key, value, key_cache, value_cache, slots, _ = _inputs()
    if padding:
        slots = slots.clone()
        slots[1] = -1  # vLLM's PAD_SLOT_ID: eager's index_put writes the last slot
    expected = [key_cache.clone(), value_cache.clone()]
    fn(key, value, *expected, slots)
    report = Report()
    backend = ge_target_backend(report) if target == "ge" else "npu_attn"
    options = None if target == "ge" else {"report": report}
    torch.compile(fn, backend=backend, fullgraph=True, options=options)(key, value, key_cache, value_cache, slots)
    torch.testing.assert_close(key_cache, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(value_cache, expected[1], rtol=0, atol=0)
    sites = [s for s in report.sites if s.kind == "kv_update"]
    assert len(sites) == 2 and all(s.rewritten and s.pattern == pattern for s in sites), report.table()
    targets = [n.target for n in report.graph_modules[0].graph.nodes] if report.graph_modules else []
    assert torch.ops.aten.index_put.default not in targets and torch.ops.aten.index_copy.default not in targets


def test_a_block_offset_write_with_another_block_size_is_not_a_slot_write():
    def fn(key, value, key_cache, value_cache, slots):
        key_cache[slots // 2, slots % 2] = key  # block size 2, the cache's is 4: another slot
        value_cache[slots // 2, slots % 2] = value

    key, value, key_cache, value_cache, _, _ = _inputs()
    slots = torch.tensor([0, 3, 5, 8, 11])
    expected = [key_cache.clone(), value_cache.clone()]
    fn(key, value, *expected, slots)
    report = Report()
    torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})(key, value, key_cache,
                                                                                       value_cache, slots)
    torch.testing.assert_close(key_cache, expected[0], rtol=0, atol=0)
    assert not any(s.rewritten for s in report.sites), report.table()


@pytest.mark.parametrize("target", ["torch", "ge"])
def test_layers_sharing_one_slot_mapping_pair_up_layer_by_layer(target):
    """Every layer writes its key and value caches through the same slot mapping: each key write
    pairs with the nearest later write (its layer's value write), so every layer is fused."""
    from fuzz.oracle import ge_target_backend

    layers = 3

    def model(keys, values, key_caches, value_caches, slots):
        out = 0
        for k, v, kc, vc in zip(keys, values, key_caches, value_caches):
            n, d = k.shape[1], k.shape[2]
            kc.view(-1, n, d)[slots] = k
            vc.view(-1, n, d)[slots] = v
            out = out + (kc[:2] * vc[:2]).sum()
        return out

    def state():
        g = torch.Generator().manual_seed(7)
        return ([torch.randn(5, 2, 16, generator=g) for _ in range(layers)],
                [torch.randn(5, 2, 16, generator=g) for _ in range(layers)],
                [torch.randn(6, 4, 2, 16, generator=g) for _ in range(layers)],
                [torch.randn(6, 4, 2, 16, generator=g) for _ in range(layers)], torch.tensor([3, 0, 21, 8, 13]))

    expected, args = state(), state()
    want = model(*expected)
    report = Report()
    backend = ge_target_backend(report) if target == "ge" else "npu_attn"
    options = None if target == "ge" else {"report": report}
    got = torch.compile(model, backend=backend, fullgraph=True, options=options)(*args)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    for e, a in zip(expected[2] + expected[3], args[2] + args[3]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    sites = [s for s in report.sites if s.kind == "kv_update"]
    assert len(sites) == 2 * layers and all(s.rewritten for s in sites), report.table()

