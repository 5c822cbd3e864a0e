"""Masks built from positions become sparse modes (passes/_mask_bands.py).

Two levels:
- keep_band alone, on masks traced with make_fx: whenever it returns a band,
  that band is exactly the mask's values (checked by evaluating the mask), and
  it returns None for masks that are data or not bands;
- the backend: hand-written and transformers attention whose mask is a band
  is fused with sparse_mode 2/3/4 and the compressed mask, equal to eager
  (fp32, rtol 1e-5 / atol 1e-6), also with symbolic sizes (dynamic=True);
  masks that are not provably bands keep the full mask.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from npu_attn_graph import Report
from npu_attn_graph.kernels._library import INT_MAX
from npu_attn_graph.passes._mask_bands import Band, band_mode, keep_band

from models import build_matrix_model


def _masked_node(fn, *args) -> tuple[torch.fx.Node, torch.Tensor]:
    gm = make_fx(fn, tracing_mode="fake")(*args)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out, fn(*args)


def _band_values(band: Band, sq: int, skv: int) -> torch.Tensor:
    d = torch.arange(skv)[None, :] - torch.arange(sq)[:, None]
    keep = torch.ones(sq, skv, dtype=torch.bool)
    if band.lo is not None:
        keep &= d >= band.lo
    if band.hi is not None:
        keep &= d <= band.hi
    return keep


def window_causal(sq, skv, window, q_offset):
    """transformers' form: q positions from an arange, kv positions from another."""
    q_pos = (torch.arange(sq) + q_offset)[None, None, :, None]
    kv_pos = torch.arange(skv)[None, None, None, :]
    keep = torch.ones((), dtype=torch.bool) & (kv_pos > q_pos - window) & (kv_pos <= q_pos)
    return ~keep.expand(2, -1, sq, skv)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(sq=st.integers(1, 9), extra=st.integers(0, 6), window=st.integers(1, 12), q_offset=st.integers(-3, 8),
       spelling=st.sampled_from(["window", "causal_le", "causal_lt_neg", "upper_only", "triu_like"]))
def test_a_returned_band_is_exactly_the_mask(sq, extra, window, q_offset, spelling):
    skv = sq + extra

    def fn(dummy):
        q_pos = (torch.arange(sq) + q_offset)[:, None]
        kv_pos = torch.arange(skv)[None, :]
        if spelling == "window":
            keep = (kv_pos > q_pos - window) & (kv_pos <= q_pos)
        elif spelling == "causal_le":
            keep = kv_pos.le(q_pos)
        elif spelling == "causal_lt_neg":
            return (kv_pos > q_pos)[None, None]  # the masked form itself: True = masked out
        elif spelling == "upper_only":
            keep = (q_pos - kv_pos) < window
        else:
            keep = torch.ones(sq, skv, dtype=torch.bool) & (kv_pos - q_pos <= window - 5)
        return torch.logical_not(keep)[None, None]

    node, masked = _masked_node(fn, torch.zeros(1))
    band = keep_band(node, sq, skv)
    if band is None:
        # With a single query or key, a bound that is false everywhere is no band at all.
        assert (sq == 1 or skv == 1) and masked.all(), spelling
        return
    torch.testing.assert_close(_band_values(band, sq, skv), ~masked[0, 0])


@pytest.mark.parametrize("name", ["data", "or", "parity", "batch_dependent", "gathered"])
def test_masks_that_are_not_provable_bands_are_refused(name):
    sq, skv = 5, 7

    def fn(positions):
        kv_pos = torch.arange(skv)[None, :]
        if name == "data":  # cache_position passed in: values unknown at compile time
            keep = kv_pos <= positions[:, None]
        elif name == "or":
            keep = (kv_pos <= torch.arange(sq)[:, None]) | (kv_pos > 5)
        elif name == "parity":
            keep = (kv_pos % 2) == 0
        elif name == "batch_dependent":
            keep = kv_pos[None] <= (torch.arange(sq)[None, :, None] + torch.arange(2)[:, None, None])
            return torch.logical_not(keep)[:, None]
        else:
            keep = (kv_pos <= torch.arange(sq)[:, None])[positions.long() % sq]
        return torch.logical_not(keep)[None, None]

    node, _ = _masked_node(fn, torch.arange(sq))
    assert keep_band(node, sq, skv) is None


@pytest.mark.parametrize("band, sq, skv, expected", [
    (Band(None, 0), 6, 6, (3, INT_MAX, INT_MAX)),  # causal, square: rightDownCausal
    (Band(None, 0), 4, 6, (2, INT_MAX, INT_MAX)),  # causal from the top-left: leftUpCausal
    (Band(None, 2), 4, 6, (3, INT_MAX, INT_MAX)),  # diagonal at the bottom-right
    (Band(-3, 0), 6, 6, (4, 3, 0)),  # a window of 4
    (Band(-3, 0), 4, 6, (4, 5, -2)),  # the same band, anchored at the bottom-right corner
    (Band(None, 0), 6, 4, (2, INT_MAX, INT_MAX)),  # more queries than keys, each keeps key 0
    (Band(2, 4), 4, 6, (4, 0, 2)),  # every row keeps a key right of the diagonal
    (Band(1, None), 6, 6, None),  # the last row would keep no key
    (Band(None, -1), 6, 6, None),  # the first row would keep no key
    (Band(2, 1), 6, 9, None),  # empty band
    (Band(None, 0), 1, 6, None),  # one query token ignores sparse modes
])
def test_band_modes(band, sq, skv, expected):
    mode = band_mode(band, sq, skv, INT_MAX)
    assert (mode and (mode.sparse_mode, mode.pre_tokens, mode.next_tokens)) == expected


def _run(fn, *args, dynamic=False):
    report = Report()
    out = torch.compile(fn, backend="npu_attn", fullgraph=True, dynamic=dynamic,
                        options={"report": report})(*args)
    return out, report


def _qkv(sq, skv, n=4, d=16, b=2):
    g = torch.Generator().manual_seed(sq * 31 + skv)
    return (torch.randn(b, n, sq, d, generator=g), torch.randn(b, n, skv, d, generator=g),
            torch.randn(b, n, skv, d, generator=g))


def windowed_attention(q, k, v, window: int = 3):
    sq, skv = q.shape[2], k.shape[2]
    q_pos = (torch.arange(sq) + (skv - sq))[:, None]  # the queries are the last sq positions
    kv_pos = torch.arange(skv)[None, :]
    keep = (kv_pos <= q_pos) & (kv_pos > q_pos - window)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v


def causal_min_mask(q, k, v):
    sq = q.shape[2]
    pos = torch.arange(sq)
    bias = torch.where(pos[None, :] <= pos[:, None], 0.0, torch.finfo(q.dtype).min)
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + bias, dim=-1) @ v


@pytest.mark.parametrize("fn, sq, skv, mode", [
    (windowed_attention, 8, 8, 4), (windowed_attention, 5, 9, 4), (windowed_attention, 5, 6, 4), (causal_min_mask, 7, 7, 3)])
def test_band_masks_are_fused_as_sparse_modes(fn, sq, skv, mode):
    q, k, v = _qkv(sq, skv)
    out, report = _run(fn, q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-5, atol=1e-6)
    (site,) = report.sites
    assert site.rewritten and site.sparse_mode == mode, (site.reason, site.notes)
    assert any("with the compressed mask, no (S_q, S_kv) mask" in note for note in site.notes)
    # no (S_q, S_kv) mask reaches the op
    (op,) = [n for n in report.graph_modules[0].graph.nodes if n.target is site_op(site)]
    assert tuple(op.kwargs["atten_mask"].meta["val"].shape) == (2048, 2048)


def site_op(site):
    return getattr(torch.ops.npu_attn, site.fused_op).default


def test_a_band_without_its_diagonal_keeps_the_full_mask():
    """kv < q leaves row 0 without a key: eager gives NaN there (aten softmax over
    -inf); the full mask stays, with the empty-row fix-up."""
    def strictly_before(q, k, v):
        pos = torch.arange(q.shape[2])
        scores = (q @ k.transpose(-1, -2)).masked_fill(pos[None, :] >= pos[:, None], float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    q, k, v = _qkv(6, 6)
    out, report = _run(strictly_before, q, k, v)
    torch.testing.assert_close(out, strictly_before(q, k, v), rtol=1e-5, atol=1e-6, equal_nan=True)
    (site,) = report.sites
    assert site.rewritten and site.sparse_mode == 1, site.notes


@pytest.mark.parametrize("family, attn, mode", [("llama", "eager", 3), ("mistral", "eager", 4),
                                                ("mistral", "sdpa", 4), ("gemma3", "eager", None)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_transformers_prefill_masks_become_sparse_modes(family, attn, mode, dynamic):
    """Prefill without a padding mask (longer than the window of 4): transformers'
    causal and sliding-window masks are built from aranges in the graph. They
    become sparse modes, for static and symbolic lengths; equal to eager
    (fp32 logits, rtol 1e-4 / atol 1e-5, the model matrix's tolerance)."""
    model = build_matrix_model(family, attn)
    report = Report()
    compiled = torch.compile(model.forward, backend="npu_attn", fullgraph=True, dynamic=dynamic,
                             options={"report": report})
    with torch.no_grad():
        for length in (7, 10):
            ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(length))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    modes = {s.sparse_mode for s in report.sites}
    assert all(s.rewritten for s in report.sites), [s.reason for s in report.sites]
    if mode is not None:
        assert modes == {mode}, [s.notes for s in report.sites]
    else:  # Gemma3: one sliding (band) and one full-attention (causal) layer
        assert modes == {3, 4}, [s.notes for s in report.sites]
    assert all(s.gqa_ratio == 2 for s in report.sites)  # repeat_kv removed, symbolic shapes too


@pytest.mark.parametrize("dynamic", [False, True])
def test_sliding_window_prefill_is_one_ge_graph_with_the_band_as_attributes(dynamic, tmp_path):
    """Mistral's window of 4, prefill of 7 tokens without a padding mask: the GE
    attention op gets sparse_mode 4 with pre_tokens 3 / next_tokens 0 and the
    2048x2048 compressed mask, and no (S_q, S_kv) mask is built in the graph."""
    from npu_attn_graph import to_ge_graph

    model = build_matrix_model("mistral", "eager")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        result = to_ge_graph(model, ids, dynamic=dynamic, out_dir=tmp_path)
    assert result.single_graph, result.summary()
    graph_def = result.graphs[0].graph_def
    attention = [op for op in graph_def.op if op.type in ("PromptFlashAttention", "FusedInferAttentionScore")]
    assert len(attention) == 2
    for op in attention:
        assert (op.attr["sparse_mode"].i, op.attr["pre_tokens"].i, op.attr["next_tokens"].i) == (4, 3, 0)
    assert all(s.sparse_mode == 4 for s in result.report.sites if s.kind == "attention"), result.report.table()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_t5_decoder_self_attention_is_position_bias_plus_causal_sparse_mode(attn, tmp_path):
    """T5 adds its causal mask to the relative position bias (eager: bias + mask;
    sdpa: where(causal, bias, min)) and the sum to unscaled scores: the decoder's
    self-attention becomes pse_shift = the bias, scale 1.0 and sparse_mode 3; equal
    to eager (rtol 1e-4 / atol 1e-5) and one complete GE graph."""
    from npu_attn_graph import to_ge_graph

    from models import prefill_call

    model = build_matrix_model("t5", attn)
    args, kwargs = prefill_call("t5", model)
    report = Report()
    with torch.no_grad():
        expected = model(*args, **kwargs).logits
        actual = torch.compile(model, backend="npu_attn", options={"report": report})(*args, **kwargs).logits
        ge = to_ge_graph(model, *args, out_dir=tmp_path, **kwargs)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    decoder_self = [s for s in report.sites if "decoder" in s.layer and "SelfAttention" in s.layer]
    assert len(decoder_self) == 2
    assert all(s.rewritten and s.sparse_mode == 3 and "additive term as pse_shift" in s.notes for s in decoder_self)
    (op,) = [n for n in report.graph_modules[0].graph.nodes
             if n.target is site_op(decoder_self[0]) and n.kwargs.get("sparse_mode") == 3][:1]
    assert op.kwargs["scale_value"] == 1.0 and op.kwargs["pse_shift"] is not None
    assert ge.single_graph, ge.summary()
