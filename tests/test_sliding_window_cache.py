"""Sliding-window KV caches (transformers' StaticSlidingWindowLayer) in eager's
order (sliding_window_cache="shift"): generate() for more than three windows
equals eager, tokens and cache tensors, with every cache write fused, and a
full-window decode step is one complete GE graph (also under the default "auto",
whose first compile of a decode step cannot hold a ring: see test_ring_layout).

Tolerances: cache tensors to rtol 1e-4 / atol 1e-5 (float32; the projections
that produce them are the same ops, the attention between them is fused)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from models import sliding_window_model

from npu_attn_graph import Report, to_ge_graph

WINDOW, PROMPT, NEW_TOKENS = 4, 5, 14  # the window fills at token 4 and slides for 3.5 windows more
SHIFT = {"sliding_window_cache": "shift"}


def _model(name: str, window: int = WINDOW):
    return sliding_window_model(name, window)


@pytest.mark.parametrize("name", ["mistral", "gemma3", "gemma2-eager", "gpt-oss-eager"])
def test_generate_past_the_window_equals_eager_with_every_write_fused(name):
    model = _model(name)
    ids = torch.randint(1, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager_cache = T.StaticCache(config=model.config, max_cache_len=32)
        expected = model.generate(ids, past_key_values=eager_cache, **kwargs)
        report = Report()
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True,
                                      options={**SHIFT, "report": report})
        cache = T.StaticCache(config=model.config, max_cache_len=32)
        actual = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(actual, expected)
    for mine, theirs in zip(cache.layers, eager_cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-5)
    writes = [s for s in report.sites if s.kind == "kv_update"]
    assert any("sliding window" in s.pattern for s in writes), report.table()
    assert all(s.rewritten for s in writes), report.table()
    assert not any("aten.roll" in code for code in report.code_after)
    if name in ("mistral", "gemma3"):  # sdpa attention: every site fused
        assert all(s.rewritten for s in report.sites), report.table()


def test_full_window_decode_step_is_one_ge_graph_with_fused_writes(tmp_path):
    model = _model("mistral")
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(2))  # longer than the window
    with torch.no_grad():
        cache = T.StaticCache(config=model.config, max_cache_len=32)
        logits = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(9)).logits
        result = to_ge_graph(model, logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True,
                             cache_position=torch.tensor([9]), out_dir=tmp_path)
    assert result.single_graph, result.summary()
    assert result.op_type_counts.get("IncreFlashAttention") == 2, result.summary()
    assert result.op_type_counts.get("Scatter", 0) == 4, result.summary()  # key and value per layer
    assert all(s.rewritten for s in result.report.sites), result.report.table()


def test_a_full_window_step_copies_the_cache_no_more_than_eager():
    """Eager's step is roll (a copy) + copy back (a copy). The rewrite keeps eager's
    cache order, so it makes the same two: the shift (cat) and the copy back."""
    model = _model("mistral")
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = T.StaticCache(config=model.config, max_cache_len=32)
        logits = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(9)).logits
        report = Report()
        step = torch.compile(model, backend="npu_attn", options={**SHIFT, "report": report})
        step(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True, cache_position=torch.tensor([9]))
    (graph,) = [gm.graph for gm in report.graph_modules]
    window = tuple(cache.layers[0].keys.shape)
    full_copies = [n for n in graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
                   and tuple(n.meta["val"].shape) == window
                   and n.target in (torch.ops.aten.cat.default, torch.ops.aten.copy.default,
                                    torch.ops.aten.copy_.default, torch.ops.aten.roll.default)]
    kinds = sorted(str(n.target).split(".")[1] for n in full_copies)
    assert kinds == ["cat"] * 4 + ["copy_"] * 4, kinds  # key and value caches of two layers


def test_a_prompt_longer_than_the_window_fills_the_cache_the_prefill_allocates():
    """transformers' layers allocate their caches in the first call (the prefill
    graph); a prompt longer than the window copies its last W states into them.
    Those writes are listed and become the functional writer."""
    from npu_attn_graph import explain

    model = _model("mistral")
    cfg = model.config
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        report = explain(model, ids, past_key_values=T.StaticCache(config=cfg, max_cache_len=32), use_cache=True,
                         cache_position=torch.arange(5))
    fills = [s for s in report.sites if s.kind == "kv_update"]
    assert len(fills) == 4 and all(s.rewritten and s.fused_op == "scatter_update" and "window fill" in s.pattern
                                   for s in fills), report.table()
