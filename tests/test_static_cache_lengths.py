"""A StaticCache decode step's fused attention reads only the valid K/V: the mask's
"key j <= cache_position" term becomes actual_seq_lengths (a tensor, through the
lengths wrappers of kernels/paged_attention.py), the mask kept where it says more
(passes/static_cache_lengths.py). Real transformers generate(), hand-built steps
for the cases that must keep the whole cache, and the GE graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import build

from npu_attn_graph import Report

transformers = pytest.importorskip("transformers")

npu = torch.ops.npu_attn
WRAPPER = npu.npu_incre_flash_attention_paged.default
PLAIN = npu.npu_incre_flash_attention.default


def _generate(model, ids, mask):
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, past_key_values=cache,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def _nodes(report: Report, target) -> list[torch.fx.Node]:
    return [n for gm in report.graph_modules for n in gm.graph.find_nodes(op="call_function", target=target)]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_with_left_padding_reads_only_the_valid_kv(kind):
    """generate() builds its 4-D mask before the compiled forward (data to the graph: no
    lengths, checked below); with create_masks_for_generate passing the 2-D mask through,
    the forward builds it from the cache position and the padding, and the decode op gets
    actual_seq_lengths = cache_position + 1 beside the padding mask."""
    model = build(kind, "sdpa")
    ids = torch.randint(1, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    with torch.no_grad():
        expected = _generate(model, ids, mask)
        report = Report()
        model.create_masks_for_generate = lambda **kw: kw["attention_mask"]
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True,
                                      options={"report": report})
        actual = _generate(model, ids, mask)
    assert torch.equal(actual.sequences, expected.sequences)
    for mine, theirs in zip(actual.logits, expected.logits):  # float32: reordered sums only
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert report.graphs == 2 and report.recompiles == []
    decode = report.graph_modules[1].graph.find_nodes(op="call_function", target=WRAPPER)
    assert len(decode) == model.config.num_hidden_layers
    assert not report.graph_modules[1].graph.find_nodes(op="call_function", target=PLAIN)
    for node in decode:
        assert node.kwargs.get("block_table") is None and node.kwargs["atten_mask"] is not None
        assert isinstance(node.kwargs["actual_seq_lengths"], torch.fx.Node)
    rows = [s for s in report.sites if s.fused_op == WRAPPER._opname]
    assert len(rows) == model.config.num_hidden_layers
    assert all("keeps the mask, which says more" in s.notes[0] and "index" in s.notes[0] for s in rows)


def test_decode_step_without_padding_drops_the_mask_and_generate_keeps_it():
    """Called with the cache position and no attention_mask, the mask is exactly j <= pos:
    lengths and no mask. generate()'s own 4-D mask is a graph input: the op keeps it and
    reads the whole cache, and the row says why."""
    model = build("llama", "sdpa")
    ids = torch.randint(1, 128, (2, 7))
    with torch.no_grad():
        logits = []
        for compiled in (False, True):
            report = Report()
            forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True,
                                    options={"report": report}) if compiled else model.forward
            cache = transformers.StaticCache(config=model.config, max_cache_len=32)
            model(ids, past_key_values=cache, cache_position=torch.arange(7))
            logits.append(forward(ids[:, -1:], past_key_values=cache, cache_position=torch.tensor([7])).logits)
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
        nodes = _nodes(report, WRAPPER)
        assert len(nodes) == 2 and all(n.kwargs.get("atten_mask") is None for n in nodes)
        assert all("the mask is exactly key j <" in s.notes[0] for s in report.sites if s.kind == "attention")

        report = Report()
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True,
                                      options={"report": report})
        _generate(model, ids[:, :4], torch.ones(2, 4, dtype=torch.long))
    assert not _nodes(report, WRAPPER) and len(report.graph_modules[1].graph.find_nodes(
        op="call_function", target=PLAIN)) == 2
    decode = [s for s in report.sites if s.fused_op == "npu_incre_flash_attention"]
    assert decode and all(any(n.startswith("KV lengths not passed") and "a graph input" in n for n in s.notes)
                          for s in decode)


S_KV, B, N, D = 16, 2, 2, 16


def _compile(fn, *args):
    report = Report()
    out = torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})(*args)
    return out, report


def _step_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, 1, D, generator=g)
    k, v = (torch.randn(B, N, S_KV, D, generator=g) for _ in range(2))
    return q, k, v


def test_per_batch_lengths_read_nothing_past_them():
    """keep = j < lens[b]: lengths per row, no mask. The slots past each row's length hold
    NaN for the compiled call (zeros for eager, whose masked SDPA would spread the NaN):
    the reference kernel does not read them."""
    def step(q, k, v, lens):
        keep = torch.arange(S_KV)[None, :] < lens[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])

    q, k, v = _step_inputs()
    lens = torch.tensor([5, 11])
    dirty_k, dirty_v = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        k[b, :, n:] = 0
        v[b, :, n:] = 0
        dirty_k[b, :, n:] = float("nan")
        dirty_v[b, :, n:] = float("nan")
    expected = step(q, k, v, lens)
    actual, report = _compile(step, q, dirty_k, dirty_v, lens)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    (node,) = _nodes(report, WRAPPER)
    assert node.kwargs.get("atten_mask") is None
    assert report.sites[0].fused_op == WRAPPER._opname


@pytest.mark.parametrize("form", ["scaled_key", "window_only", "cache_position_and_window", "twice_position"])
def test_masks_that_are_not_the_lengths(form):
    """"2 * j <= pos" (not read as an affine bound) and "j > pos - 4" are not key bounds
    j < L + c: the op keeps the mask and reads the whole cache, and the row says so.
    "j <= pos & j > pos - 4" (a window) has the bound as one term: lengths, and the mask
    kept for the window's lower edge. "j <= 2 * pos" is one (L = 2 * pos): lengths only."""
    def step(q, k, v, pos):
        j = torch.arange(S_KV)
        keep = {"scaled_key": j * 2 <= pos, "window_only": j > pos - 4, "twice_position": j <= 2 * pos,
                "cache_position_and_window": (j <= pos) & (j > pos - 4)}[form]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None, None, :])

    q, k, v = _step_inputs(1)
    pos = torch.tensor(6)
    actual, report = _compile(step, q, k, v, pos)
    torch.testing.assert_close(actual, step(q, k, v, pos), rtol=1e-5, atol=1e-6)
    (site,) = report.sites
    if form == "cache_position_and_window":
        (node,) = _nodes(report, WRAPPER)
        assert node.kwargs["atten_mask"] is not None
        assert "keeps the mask, which says more" in site.notes[0]
        return
    if form == "twice_position":
        (node,) = _nodes(report, WRAPPER)
        assert node.kwargs.get("atten_mask") is None and "the mask is exactly key j <" in site.notes[0]
        return
    assert not _nodes(report, WRAPPER)
    (node,) = _nodes(report, PLAIN)
    assert node.kwargs["atten_mask"] is not None and node.kwargs.get("actual_seq_lengths") is None
    assert site.fused_op == "npu_incre_flash_attention"
    note = next(n for n in site.notes if n.startswith("KV lengths not passed"))
    assert f"reads all {S_KV} K/V positions" in note and "no term of the mask is a key bound" in note


def test_ge_decode_step_feeds_the_lengths_to_incre_flash_attention(tmp_path):
    """The GE graph of a StaticCache decode step: each IncreFlashAttention takes its
    actual_seq_lengths input from the graph's cache position (no mask input)."""
    from models import LAYERS, build, static_decode_to_ge

    model = build("llama", "sdpa").half()
    result = static_decode_to_ge(model, torch.randint(1, 128, (2, 7)), tmp_path)
    assert result.single_graph, result.summary()
    graph_def = result.graphs[0].graph_def
    ops = {op.name: op for op in graph_def.op}
    attentions = [op for op in graph_def.op if op.type == "IncreFlashAttention"]
    assert len(attentions) == LAYERS
    for op in attentions:
        # IncreFlashAttention inputs: query, key, value, pse_shift, atten_mask, actual_seq_lengths, ...
        assert len(op.input) > 5 and op.input[5] and not op.input[4]
        seen, frontier = set(), [op.input[5].split(":")[0]]
        while frontier:  # the lengths come from a Data input (the cache position), through arithmetic
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            frontier += [i.split(":")[0] for i in ops[name].input if i and not i.startswith("^")]
        assert any(ops[name].type == "Data" for name in seen)
