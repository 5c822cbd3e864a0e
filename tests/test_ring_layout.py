"""The default sliding_window_cache="auto" and the run-time layout guard (ring_layout).

"auto" writes a full window as a ring (slot = position mod W, no shift) in every
graph that can hold one, and keeps eager's order, with the reason, in a graph that
cannot (a decode step whose layer token count dynamo specialised on a first compile).
ring_layout keeps the two orders apart at run time: a ring graph given a window in
eager's order rotates it once; a recorded ring written since by eager code is an
error, never silently mixed.

The integration tests run transformers' Mistral (tiny, random weights) against
eager; the unit tests drive the guard with a compiled function written here that
writes one slot in place, as a ring graph does (no model is needed to check the
bookkeeping). Tolerances: tokens exactly; logits and caches rtol 1e-4 / atol 1e-5
(float32, the attention is fused and sums its keys in another order)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from models import assert_caches_close, sliding_window_model

from npu_attn_graph import Report, window_in_eager_order
from npu_attn_graph import ring_layout
from npu_attn_graph.ring_layout import LayoutPlan, RingLayoutError, Window

WINDOW = 4


def _steps(forward, chunks, cache, start=0):
    """Run the chunks through forward one call each, from position `start`; their logits."""
    position, logits = start, []
    for chunk in chunks:
        out = forward(input_ids=chunk, past_key_values=cache, use_cache=True,
                      cache_position=torch.arange(position, position + chunk.shape[1]))
        position += chunk.shape[1]
        logits.append(out.logits)
    return logits


def _chunks(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (1, n), generator=g) for n in lengths]


def test_an_eager_prefill_then_compiled_decode_steps():
    """The prefill runs eagerly (a prompt longer than the window: eager's order). The
    first compiled step specialises the layer's token count, so it cannot hold a ring
    and keeps eager's order, saying why; the next compile holds the count as an input
    and writes the ring, after the guard rotates each window once."""
    model = sliding_window_model("mistral", WINDOW)
    prompt, decode = _chunks([9]), _chunks([1] * 10, seed=2)
    with torch.no_grad():
        eager_cache = T.StaticCache(config=model.config, max_cache_len=32)
        expected = _steps(model, prompt + decode, eager_cache)
        cache = T.StaticCache(config=model.config, max_cache_len=32)
        report = Report()
        step = torch.compile(model, backend="npu_attn", fullgraph=True, options={"report": report})
        actual = _steps(model, prompt, cache) + _steps(step, decode, cache, start=9)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_caches_close(cache, eager_cache, rtol=1e-4, atol=1e-5)
    assert all(ring_layout.is_ring(layer.keys) for layer in cache.layers)
    notes = [" ".join(s.notes) for s in report.sites if "roll(-1)" in s.pattern]
    assert any("kept in eager's order (sliding_window_cache='auto')" in n and "cumulative_length_int" in n
               for n in notes), report.table()
    assert any("ring buffer" in n for n in notes), report.table()
    assert all(s.rewritten for s in report.sites), report.table()


def test_an_eager_step_after_a_ring_step_is_an_error_not_a_wrong_cache():
    """A step run eagerly (as dynamo does past its recompile limit) shifts a window
    that a compiled step left in ring order. The next compiled step refuses."""
    model = sliding_window_model("mistral", WINDOW)
    chunks = _chunks([3] + [1] * 8)
    with torch.no_grad():
        cache = T.StaticCache(config=model.config, max_cache_len=32)
        step = torch.compile(model, backend="npu_attn", fullgraph=True)
        _steps(step, chunks, cache)
        assert all(ring_layout.is_ring(layer.keys) for layer in cache.layers)
        _steps(model, _chunks([1], seed=3), cache, start=11)  # eager: roll + write into the ring
        with pytest.raises(RingLayoutError, match=r"layers\[0\]\.keys was written by code outside the compiled "
                                                  r"graphs.*ring order \(slot = position mod 4\)"):
            _steps(step, _chunks([1], seed=4), cache, start=12)


def test_beam_search_refuses_a_copied_ring_and_equals_eager_in_eager_order():
    """generate(num_beams=2): transformers' reorder_cache replaces the layers' tensors
    with copies (index_select over the beams), which no compiled step recorded and
    which may hold a ring. The default refuses them, naming reorder_cache;
    sliding_window_cache="shift" (eager's order throughout) equals eager."""
    model = sliding_window_model("mistral", WINDOW)
    forward = model.forward
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, num_beams=2)
    with torch.no_grad():
        expected = model.generate(ids, past_key_values=T.StaticCache(config=model.config, max_cache_len=32), **kwargs)
        model.forward = torch.compile(forward, backend="npu_attn", fullgraph=True,
                                      options={"sliding_window_cache": "shift"})
        actual = model.generate(ids, past_key_values=T.StaticCache(config=model.config, max_cache_len=32), **kwargs)
        assert torch.equal(actual, expected)
        torch._dynamo.reset()
        model.forward = torch.compile(forward, backend="npu_attn", fullgraph=True)
        with pytest.raises(RingLayoutError, match=r"layers\[0\]\.keys is full \(5 tokens, 4 slots\) and no "
                                                  r"compiled step left it in either order.*reorder_cache"):
            model.generate(ids, past_key_values=T.StaticCache(config=model.config, max_cache_len=32), **kwargs)


def test_a_reset_cache_generates_again():
    """cache.reset() zeroes the windows and the token counts: the second generate()
    with the same cache object equals eager."""
    model = sliding_window_model("mistral", WINDOW)
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, past_key_values=T.StaticCache(config=model.config, max_cache_len=32), **kwargs)
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True)
        cache = T.StaticCache(config=model.config, max_cache_len=32)
        first = model.generate(ids, past_key_values=cache, **kwargs)
        cache.reset()
        second = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_inference_tensors_keep_eager_order_with_the_reason():
    """Under torch.inference_mode the windows have no version counter, so "auto" does
    not risk a ring whose layout it could not track."""
    model = sliding_window_model("mistral", WINDOW)
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(6))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        expected = model.generate(ids, past_key_values=T.StaticCache(config=model.config, max_cache_len=32), **kwargs)
        report = Report()
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True, options={"report": report})
        actual = model.generate(ids, past_key_values=T.StaticCache(config=model.config, max_cache_len=32), **kwargs)
    assert torch.equal(actual, expected)
    decode = [s for s in report.sites if "roll(-1)" in s.pattern]
    assert decode and all(s.rewritten and "ring buffer" not in " ".join(s.notes) for s in decode), report.table()
    assert any("inference tensor" in " ".join(s.notes) for s in report.sites), report.table()


# ----------------------------------------------------------------------------
# The guard on its own
# ----------------------------------------------------------------------------


def _ring_step(window: torch.Tensor, seen: int, token: torch.Tensor) -> torch.Tensor:
    """What a ring graph does to its window: the token into slot seen mod W, in place."""
    window[:, :, seen % window.shape[2]] = token
    return window


def _plan(ring: bool) -> LayoutPlan:
    return LayoutPlan(windows=(Window(index=0, source="layer.keys", seen_index=1, ring=ring),), others=())


def _eager_window(seen: int, slots: int = WINDOW) -> torch.Tensor:
    """A window in eager's order after `seen` tokens: slot k holds position seen - W + k."""
    positions = torch.arange(seen - slots, seen, dtype=torch.float32)
    return positions.view(1, 1, slots, 1).repeat(1, 2, 1, 3).clone()


def test_a_ring_graph_rotates_an_eager_window_once():
    ring = ring_layout.guarded(lambda w, seen, t: _ring_step(w, seen, t), lambda: _plan(ring=True))
    eager = ring_layout.guarded(lambda w, seen: w.sum(), lambda: _plan(ring=False))
    window = _eager_window(seen=6)
    eager(window, 6)  # a graph in eager's order ran on it: recorded so
    ring(window, 6, torch.full((1, 2, 3), 6.0))
    # ring slot j holds the position p = j mod W among the last W: 7 tokens seen, positions 3..6
    assert window[0, 0, :, 0].tolist() == [4.0, 5.0, 6.0, 3.0]
    assert ring_layout.is_ring(window)
    ring(window, 7, torch.full((1, 2, 3), 7.0))  # recorded: written in place, no rotation
    assert window[0, 0, :, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    torch.testing.assert_close(window_in_eager_order(window, 8), _eager_window(seen=8))


def test_a_graph_in_eager_order_rotates_a_ring_back():
    ring = ring_layout.guarded(lambda w, seen, t: _ring_step(w, seen, t), lambda: _plan(ring=True))
    eager = ring_layout.guarded(lambda w, seen: w.sum(), lambda: _plan(ring=False))
    window = _eager_window(seen=6)
    eager(window, 6)
    ring(window, 6, torch.full((1, 2, 3), 6.0))
    eager(window, 7)
    torch.testing.assert_close(window, _eager_window(seen=7))
    assert not ring_layout.is_ring(window)


def test_a_window_on_a_multiple_of_its_size_is_not_copied():
    ring = ring_layout.guarded(lambda w, seen: None, lambda: _plan(ring=True))
    window = _eager_window(seen=8)
    version = window._version
    ring(window, 8)
    assert window._version == version  # slot k holds position 4 + k = position mod 4 already


def test_an_outside_write_into_a_ring_is_an_error_and_a_reset_is_not():
    ring = ring_layout.guarded(lambda w, seen, t: _ring_step(w, seen, t), lambda: _plan(ring=True))
    window = _eager_window(seen=4)
    ring(window, 4, torch.full((1, 2, 3), 4.0))  # 4 tokens: both orders agree
    ring(window, 5, torch.full((1, 2, 3), 5.0))
    window[:, :, -1] = 99.0  # eager code writing the last slot
    with pytest.raises(RingLayoutError, match=r"layer\.keys was written by code outside the compiled graphs"):
        ring(window, 7, torch.full((1, 2, 3), 7.0))
    with pytest.raises(RingLayoutError):  # and it stays refused
        ring(window, 7, torch.full((1, 2, 3), 7.0))
    window.zero_()  # cache.reset()
    ring(window, 0, torch.full((1, 2, 3), 0.0))
    assert ring_layout.is_ring(window)


def test_a_full_window_no_compiled_step_recorded_is_an_error_in_a_ring_graph():
    """A copy made by eager code (transformers' reorder_cache for beam search) may hold
    either order: a ring step refuses to guess; a step in eager's order takes it as is."""
    ring = ring_layout.guarded(lambda w, seen, t: _ring_step(w, seen, t), lambda: _plan(ring=True))
    eager = ring_layout.guarded(lambda w, seen: w.sum(), lambda: _plan(ring=False))
    window = _eager_window(seen=6)
    with pytest.raises(RingLayoutError, match=r"layer\.keys is full \(6 tokens, 4 slots\) and no compiled step left "
                                              r"it in either order"):
        ring(window, 6, torch.full((1, 2, 3), 6.0))
    ring(_eager_window(seen=8), 8, torch.full((1, 2, 3), 8.0))  # on a multiple of W both orders agree
    eager(window, 6)
    ring(window, 6, torch.full((1, 2, 3), 6.0))
    copy = window.index_select(0, torch.tensor([0]))
    with pytest.raises(RingLayoutError, match="no compiled step left it in either order"):
        ring(copy, 7, torch.full((1, 2, 3), 7.0))


def test_windows_a_graph_allocates_are_recorded_in_eager_order():
    new = torch.zeros(1, 2, WINDOW, 3)
    prefill = ring_layout.guarded(lambda: (torch.zeros(1, 5), new),
                                  lambda: LayoutPlan(windows=(), others=(), new_windows=True))
    logits, window = prefill()
    window.copy_(_eager_window(seen=6))  # (what the prefill graph wrote)
    ring = ring_layout.guarded(lambda w, seen, t: _ring_step(w, seen, t), lambda: _plan(ring=True))
    ring(window, 6, torch.full((1, 2, 3), 6.0))
    assert window[0, 0, :, 0].tolist() == [4.0, 5.0, 6.0, 3.0]


def test_a_ring_window_read_as_a_plain_input_is_an_error():
    ring = ring_layout.guarded(lambda w, seen, t: _ring_step(w, seen, t), lambda: _plan(ring=True))
    reader = ring_layout.guarded(lambda x: x.sum(), lambda: LayoutPlan(windows=(), others=((0, "L['key_states']"),)))
    window = _eager_window(seen=6)
    reader(window)  # not a ring yet
    ring_layout.guarded(lambda w, seen: None, lambda: _plan(ring=False))(window, 6)
    ring(window, 6, torch.full((1, 2, 3), 6.0))
    with pytest.raises(RingLayoutError, match=r"L\['key_states'\] holds a sliding-window cache in ring order"):
        reader(window)


def test_the_plan_finds_windows_by_their_layer():
    sources = ("L['c'].layers[0].keys", "L['c'].layers[0].values", "L['c'].layers[0].cumulative_length_int",
               "L['c'].layers[1].keys", "L['self']._parameters['weight']", "L['x']")
    example = (torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4, 3), 5, torch.zeros(1, 2, 8, 3),
               torch.zeros(3, 3, 3), torch.zeros(2))
    plan = ring_layout.plan_for(sources, ring_layout.cache_shaped(example), {"L['c'].layers[0].keys"})
    assert plan.windows == (Window(0, sources[0], 2, True), Window(1, sources[1], 2, False))
    assert plan.others == ((3, sources[3]),)  # no token count: never a ring; the parameter and the vector are not caches
    assert plan.plain_windows == (3,)  # a layer window read in eager's order: recorded so after each call
