"""sliding_window_cache="ring": a full sliding-window cache takes a decode token
into slot position mod W, in place, with no shift of the window.

generate() for more than three windows equals eager (tokens; caches once read in
eager order with window_in_eager_order), with every cache write fused and no
node that copies a whole window on the decode path; several tokens written into
a full window, prompts shorter and longer than the window, a window filled exactly, and a
left-padded batch (whose mask must move with the keys) all equal eager; a full
decode step is one complete GE graph. What cannot be kept in ring form fails to
compile with SlidingWindowRingError, never silently in eager's order.

Tolerances: tokens exactly; logits and cache tensors rtol 1e-4 / atol 1e-5
(float32; the attention is fused and sums its keys in another order)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from models import assert_caches_close, sliding_window_model

from npu_attn_graph import Report, to_ge_graph, window_in_eager_order

WINDOW, PROMPT, NEW_TOKENS = 4, 6, 14  # the window slides for 3.5 windows past the prompt
RING = {"sliding_window_cache": "ring"}
aten = torch.ops.aten


def _model(name: str, window: int = WINDOW):
    return sliding_window_model(name, window)


def _generate(model, ids, mask, options=None):
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, attention_mask=mask)
    cache = T.StaticCache(config=model.config, max_cache_len=32)
    return model.generate(ids, past_key_values=cache, **kwargs), cache


@pytest.mark.parametrize("mode", ["ring", "auto"])  # "auto": the default
@pytest.mark.parametrize("name", ["mistral", "gemma3", "gemma2-eager", "gpt-oss-eager"])
def test_generate_in_a_ring_equals_eager_with_no_window_copy(name, mode):
    model = _model(name)
    ids = torch.randint(1, 128, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding: the first windows hold padding the mask hides
    with torch.no_grad():
        expected, eager_cache = _generate(model, ids, mask)
        report = Report()
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True,
                                      options={"sliding_window_cache": mode, "report": report})
        actual, cache = _generate(model, ids, mask)
    assert torch.equal(actual, expected)
    assert_caches_close(cache, eager_cache, rtol=1e-4, atol=1e-5)
    writes = [s for s in report.sites if s.kind == "kv_update"]
    assert writes and all(s.rewritten for s in writes), report.table()
    # the decode steps write the ring; the prefill writes eager's order, rotated once before the first ring step
    sliding = [s for s in writes if "roll(-1)" in s.pattern]
    assert sliding and all("ring buffer" in " ".join(s.notes) for s in sliding), report.table()
    assert not any("aten.roll" in code for code in report.code_after)
    assert report.recompiles == [] and report.graph_breaks == []
    windows = {tuple(layer.keys.shape) for layer in cache.layers if hasattr(layer, "cumulative_length_int")}
    decode = [gm for gm in report.graph_modules
              if any(n.target is torch.ops.npu_attn.scatter_update_.default and
                     tuple(n.meta["val"].shape) in windows and n.args[1].target is aten.remainder.Tensor
                     for n in gm.graph.nodes if n.op == "call_function")]
    assert decode, "no full-window decode graph"
    copies = [
        str(n.target) for gm in decode for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
        and tuple(n.meta["val"].shape) in windows and "scatter_update" not in str(n.target)]
    assert copies == [], copies
    if name == "gemma2-eager":
        # Softcapped attention stays unfused (no NPU op has a softcap); it reads the ring as it
        # is, with its additive mask permuted into ring order along the key axis.
        assert any("in ring order" in " ".join(s.notes) for s in sliding), report.table()
    else:
        assert all(s.rewritten for s in report.sites), report.table()


def test_several_tokens_into_a_full_window_and_back_to_decode():
    """A 3-token prompt (shorter than the window), decode steps that fill it exactly,
    then chunks of 3, 2 and 5 tokens into the full window: they read it in eager order
    (a gather, off the decode path) and write their last W tokens rotated into the ring."""
    model = _model("mistral")
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randint(1, 128, (1, n), generator=g) for n in (3, 1, 1, 1, 3, 1, 2, 1, 1, 5, 1, 1)]

    def run(forward):
        cache, position, logits = T.StaticCache(config=model.config, max_cache_len=32), 0, []
        for chunk in chunks:
            out = forward(input_ids=chunk, past_key_values=cache, use_cache=True,
                          cache_position=torch.arange(position, position + chunk.shape[1]))
            position += chunk.shape[1]
            logits.append(out.logits)
        return logits, cache

    with torch.no_grad():
        expected, eager_cache = run(model)
        report = Report()
        actual, cache = run(torch.compile(model, backend="npu_attn", fullgraph=True,
                                          options={**RING, "report": report}))
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_caches_close(cache, eager_cache, rtol=1e-4, atol=1e-5)
    assert all(s.rewritten for s in report.sites), report.table()


@pytest.mark.parametrize("mask_in_graph", [False, True])
def test_a_full_window_decode_step_in_a_ring_is_one_ge_graph(tmp_path, mask_in_graph):
    """TorchAir offline builds the step (the GE runtime that would run it is not here).
    dynamic=True makes the layer's token count a graph input from the first call (the
    cache tensors are marked static: the window is a fixed size). The 4-D mask is
    passed in, as generate() does, or built in the graph from the symbolic count:
    transformers' max(count - W + 1, 0) is a torch.sym_max, GE Maximum
    (converters/sym_max.py; TorchAir has no converter for it)."""
    model = _model("mistral")
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = T.StaticCache(config=model.config, max_cache_len=32)
        logits = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(9)).logits
        for layer in cache.layers:
            torch._dynamo.mark_static(layer.keys)
            torch._dynamo.mark_static(layer.values)
        result = to_ge_graph(model, logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True,
                             cache_position=torch.tensor([9]),
                             **({} if mask_in_graph else {"attention_mask": torch.ones(1, 1, 1, WINDOW,
                                                                                       dtype=torch.bool)}),
                             dynamic=True, options=None if mask_in_graph else RING, out_dir=tmp_path)
    assert result.single_graph, result.summary()  # (the mask built in the graph: under the default, "auto")
    sym_max = [n for gm in result.report.graph_modules for n in gm.graph.nodes if n.target is torch.sym_max]
    assert bool(sym_max) == mask_in_graph
    assert (result.op_type_counts.get("Maximum", 0) > 0) == mask_in_graph, result.summary()
    assert result.op_type_counts.get("IncreFlashAttention") == 2, result.summary()
    assert result.op_type_counts.get("Scatter", 0) == 4, result.summary()  # key and value per layer
    assert all(s.rewritten for s in result.report.sites), result.report.table()
    assert all("ring buffer" in " ".join(s.notes) for s in result.report.sites if s.kind == "kv_update")


def test_a_token_count_the_graph_does_not_hold_is_an_error():
    """A decode step compiled on its own: dynamo specializes the layer's token count
    on a first compile, so the graph cannot know the slot. Ring mode refuses to
    compile rather than leave that window in eager's order."""
    model = _model("mistral")
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = T.StaticCache(config=model.config, max_cache_len=32)
        logits = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(9)).logits
        step = torch.compile(model, backend="npu_attn", options=RING)
        with pytest.raises(Exception, match=r"cumulative_length_int.*sliding_window_cache='shift'"):
            step(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True,
                 cache_position=torch.tensor([9]))


def test_the_option_is_checked():
    from npu_attn_graph import NpuAttnBackend

    with pytest.raises(ValueError, match=r"'sliding_window_cache' must be one of \['auto', 'ring', 'shift'\], got 'rotate'"):
        NpuAttnBackend(sliding_window_cache="rotate")


def test_window_in_eager_order():
    seen, slots = 11, 4
    positions = torch.arange(seen)
    ring = torch.empty(slots)
    for p in positions[-slots:]:  # position p in slot p mod W
        ring[p % slots] = float(p)
    assert window_in_eager_order(ring, seen, dim=0).tolist() == [7.0, 8.0, 9.0, 10.0]
    filling = torch.tensor([0.0, 1.0, 2.0, 0.0])
    assert window_in_eager_order(filling, 3, dim=0) is filling  # not full: slot = position already
    with pytest.raises(ValueError, match="seen_tokens must be an int >= 0, got -1"):
        window_in_eager_order(ring, -1)
