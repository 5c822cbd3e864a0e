"""Static KV-cache updates become in-place scatter_update_ writes: real
transformers generate() with a StaticCache, and small hand-built functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import build

from npu_attn_graph import Report

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 16


def _generate(model, ids, cache):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                          past_key_values=cache, pad_token_id=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_static_cache_generate_matches_eager_with_in_place_cache_writes(kind):
    model = build(kind, "sdpa")
    ids = torch.randint(1, 128, (2, 7))
    with torch.no_grad():
        eager_cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        expected = _generate(model, ids, eager_cache)

        report = Report()
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True,
                                      options={"report": report})
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        actual = _generate(model, ids, cache)

    assert torch.equal(actual, expected)
    for mine, theirs in zip(cache.layers, eager_cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-5)

    layers = model.config.num_hidden_layers
    assert report.graphs == 2, "prefill + one decode graph: no recompiles across the decode steps"
    assert report.recompiles == [] and report.graph_breaks == []
    for graph in range(2):
        graph_sites = report.sites[graph * 3 * layers:(graph + 1) * 3 * layers]
        assert sum(s.kind == "attention" and s.rewritten for s in graph_sites) == layers
        assert sum(s.kind == "kv_update" and s.rewritten for s in graph_sites) == 2 * layers
    # On the graph: no index_copy left and no copy_ of a whole cache back into its input.
    decode = report.graph_modules[1]
    assert not decode.graph.find_nodes(op="call_function", target=torch.ops.aten.index_copy.default)
    placeholders = set(decode.graph.find_nodes(op="placeholder"))
    cache_shape = tuple(cache.layers[0].keys.shape)
    for copy in decode.graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default):
        assert not (copy.args[0] in placeholders and tuple(copy.args[0].meta["val"].shape) == cache_shape)
    writes = decode.graph.find_nodes(op="call_function", target=torch.ops.npu_attn.scatter_update_.default)
    assert len(writes) == 2 * layers and all(w.args[0] in placeholders for w in writes)


# ----------------------------------------------------------------------------
# The pass alone
# ----------------------------------------------------------------------------


def _compile_and_run(fn, *args):
    report = Report()
    out = torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})(*args)
    return out, report


def _cache_and_states(s_new=1):
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 2, 16, 32, generator=g), torch.randn(2, 2, s_new, 32, generator=g)


@pytest.mark.parametrize("form", ["index_copy_", "index_put_", "slice"])
def test_write_forms_become_scatter_update(form):
    def step(cache, states, pos):
        if form == "index_copy_":
            cache.index_copy_(2, torch.arange(3) + pos, states)
        elif form == "index_put_":
            cache[:, :, torch.arange(3) + pos] = states
        else:
            cache[:, :, 5:8] = states
        return F.scaled_dot_product_attention(states, cache, cache)

    cache, states = _cache_and_states(3)
    pos = torch.tensor(5)
    expected_cache = cache.clone()
    expected = step(expected_cache, states, pos)
    out, report = _compile_and_run(step, cache, states, pos)
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    (site,) = [s for s in report.sites if s.kind == "kv_update"]
    assert site.fused_op == "scatter_update_", site.reason


def test_cache_written_in_place_without_a_copy():
    def step(cache, states, pos):
        cache.index_copy_(2, pos, states)
        return cache.sum()

    cache, states = _cache_and_states()
    storage = cache.data_ptr()
    _compile_and_run(step, cache, states, torch.tensor([4]))
    assert cache.data_ptr() == storage
    torch.testing.assert_close(cache[:, :, 4:5], states, rtol=0, atol=0)


def test_scattered_positions_are_left_alone():
    def step(cache, states, pos):
        cache.index_copy_(2, pos, states)
        return cache * 1

    cache, states = _cache_and_states(3)
    expected_cache = cache.clone()
    step(expected_cache, states, torch.tensor([1, 7, 3]))
    _, report = _compile_and_run(step, cache, states, torch.tensor([1, 7, 3]))
    (site,) = report.sites
    assert not site.rewritten and "not provably contiguous" in site.reason
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)


class _CachedAttention(torch.nn.Module):
    """A decode step whose KV cache lives in module buffers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("keys", torch.zeros(2, 2, 16, 32))
        self.register_buffer("values", torch.zeros(2, 2, 16, 32))

    def forward(self, q, k, v, pos):
        positions = torch.arange(k.shape[2]) + pos
        self.keys.index_copy_(2, positions, k)
        self.values.index_copy_(2, positions, v)
        return F.scaled_dot_product_attention(q, self.keys, self.values)


def test_caches_in_module_buffers_are_written_in_place():
    module, reference = _CachedAttention(), _CachedAttention()
    report = Report()
    compiled = torch.compile(module, backend="npu_attn", fullgraph=True, options={"report": report})
    g = torch.Generator().manual_seed(8)
    for step in range(3):
        q, k, v = (torch.randn(2, 2, 1, 32, generator=g) for _ in range(3))
        pos = torch.tensor(step)
        torch.testing.assert_close(compiled(q, k, v, pos), reference(q, k, v, pos), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.keys, reference.keys, rtol=0, atol=0)
    torch.testing.assert_close(module.values, reference.values, rtol=0, atol=0)
    kv_sites = [s for s in report.sites if s.kind == "kv_update"]
    assert kv_sites and all(s.fused_op == "scatter_update_" for s in kv_sites), report.table()
