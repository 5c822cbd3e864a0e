"""The tests' models are the package's built-in demo models (npu_attn_graph.demos)."""

import torch
import transformers

from npu_attn_graph.demos import DECODERS, IMPLEMENTATIONS, LAYERS, build, scenario_call  # noqa: F401

SCENARIOS = [(kind, attn, scenario) for kind in DECODERS for attn in IMPLEMENTATIONS
             for scenario in ("prefill", "static_prefill", "static_decode")] + \
            [("bert", attn, "prefill") for attn in IMPLEMENTATIONS]


def generate_static_both_ways(model, backend, ids, new_tokens: int, options: dict | None = None):
    """Greedy generate() with a StaticCache, eagerly and with model.forward compiled
    by `backend`; returns (expected tokens, actual tokens, eager cache, compiled cache)."""
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager_cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        expected = model.generate(ids, past_key_values=eager_cache, **kwargs)
        model.forward = torch.compile(model.forward, backend=backend, fullgraph=True, options=options)
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        actual = model.generate(ids, past_key_values=cache, **kwargs)
    return expected, actual, eager_cache, cache


def assert_caches_close(cache, eager_cache, rtol: float, atol: float) -> None:
    for mine, theirs in zip(cache.layers, eager_cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=rtol, atol=atol)
        torch.testing.assert_close(mine.values, theirs.values, rtol=rtol, atol=atol)
