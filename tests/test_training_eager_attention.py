"""Training graphs: hand-written (eager) attention -> npu_fusion_attention before AOT,
npu_fusion_attention_grad in the backward graph; loss and every gradient equal eager
(float32: rtol 1e-5, atol 1e-6; whole-model parameter gradients atol 2e-6, see GRAD_ATOL)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import build_matrix_model
from npu_attn_graph import Report

RTOL, ATOL = 1e-5, 1e-6
# Whole-model parameter gradients (checked against eager's) sum over every token: the
# embedding's is an index_put accumulate of all positions' gradients, reached through
# another attention backward (another summation order), so they carry about twice the
# attention outputs' absolute error (measured: 1.54e-6 on one of 8192 entries, ~0.05).
GRAD_ATOL = 2e-6
FUSION = torch.ops.npu_attn.npu_fusion_attention.default
FUSION_GRAD = torch.ops.npu_attn.npu_fusion_attention_grad.default


def _targets(report: Report) -> list:
    return [n.target for gm in report.graph_modules for n in gm.graph.nodes]


def _attention_sites(report: Report):
    return [s for s in report.sites if s.kind == "attention"]


def _compile(fn, report: Report):
    torch._dynamo.reset()
    return torch.compile(fn, backend="npu_attn", fullgraph=True, options={"report": report})


# ----------------------------------------------------------------------------
# Real transformers models in eager attention, one training step
# ----------------------------------------------------------------------------


def _loss(family: str, model, ids: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    if family == "bert":  # an encoder: regress the hidden states onto a fixed random target
        return F.mse_loss(model(ids).last_hidden_state, probe)
    logits = model(ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_transformers_eager_attention_training_step(family):
    model = build_matrix_model(family, "eager").train()
    for module in model.modules():  # dropout draws random masks in training: compare without it
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    probe = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4))
    expected = _loss(family, model, ids, probe)
    expected.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    report = Report()
    compiled = _compile(model, report)
    loss = _loss(family, compiled, ids, probe)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    assert grads, "the eager step produced gradients"
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=RTOL, atol=GRAD_ATOL, msg=lambda m: f"{name}: {m}")
    sites = _attention_sites(report)
    assert len(sites) == 2 and all(s.fused_op == "npu_fusion_attention" and s.graph == "training"
                                   for s in sites), report.table()
    targets = _targets(report)
    assert targets.count(FUSION) == 2 and targets.count(FUSION_GRAD) == 2
    backward = [gm for gm in report.graph_modules
                if any(n.op == "placeholder" and n.name.startswith("tangents") for n in gm.graph.nodes)]
    assert backward and sum(n.target is FUSION_GRAD for n in backward[0].graph.nodes) == 2
    # No hand-written attention is left in the forward graph.
    assert not any(n.target in (torch.ops.aten._softmax.default, torch.ops.aten.softmax.int) for n in
                   report.graph_modules[0].graph.nodes)


def test_transformers_attention_dropout_is_left_alone_with_its_reason():
    model = build_matrix_model("llama", "eager").train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    report = Report()
    _compile(model, report)(ids, use_cache=False).logits.square().mean().backward()
    sites = _attention_sites(report)
    assert len(sites) == 2, report.table()
    for s in sites:
        assert not s.rewritten and "dropout p=0.1" in s.reason and "RNG" in s.reason
    assert FUSION_GRAD not in _targets(report)


# ----------------------------------------------------------------------------
# Hand-written attention in several spellings
# ----------------------------------------------------------------------------

B, N, S, D = 2, 4, 6, 8


def matmul_scaled(q, k, v, extra):
    return torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5, dim=-1) @ v


def divided_no_grad_mask(q, k, v, extra):
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
    return F.softmax(scores, dim=-1).matmul(v)


def bmm_reshaped(q, k, v, extra):
    q3, k3, v3 = (t.reshape(B * N, S, D) for t in (q, k, v))
    probs = torch.bmm(q3, k3.transpose(1, 2)).mul(0.3).softmax(-1)
    return torch.bmm(probs, v3).view(B, N, S, D)


def einsum_spelling(q, k, v, extra):
    probs = torch.einsum("bnqd,bnkd->bnqk", q, k).mul(0.25).softmax(dim=-1)
    return torch.einsum("bnqk,bnkd->bnqd", probs, v)


def min_mask(q, k, v, keep):  # transformers' eager form: an added finfo.min mask, float32 softmax
    mask = torch.where(keep, 0.0, torch.finfo(q.dtype).min)
    probs = F.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


def min_fill(q, k, v, keep):
    scores = (q @ k.transpose(-1, -2)) * 0.25
    return scores.masked_fill(keep.logical_not(), torch.finfo(q.dtype).min).softmax(-1) @ v


def neg_inf_fill(q, k, v, keep):
    scores = (q @ k.transpose(-1, -2)) * 0.25
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def neg_inf_added(q, k, v, keep):
    return ((q @ k.transpose(-1, -2)) * 0.25 + torch.where(keep, 0.0, float("-inf"))).softmax(-1) @ v


def bias_and_min_mask(q, k, v, extra):  # a learned bias with a mask: pse, the scale folded into q
    keep, bias = extra
    return ((q @ k.transpose(-1, -2)) * 0.25 + bias + torch.where(keep, 0.0, -1e30)).softmax(-1) @ v


def gqa_repeat_interleave(q, k, v, extra):
    k2, v2 = (t[:, :2].repeat_interleave(2, dim=1) for t in (k, v))
    return (q @ k2.transpose(-1, -2) * 0.25).softmax(-1) @ v2


def _keep(fully_masked_rows: bool) -> torch.Tensor:
    keep = torch.ones(S, S, dtype=torch.bool).tril().expand(B, 1, S, S).clone()
    keep[1, :, :, 4:] = False  # batch 1: two padded keys
    if fully_masked_rows:
        keep[1, :, :2, :] = False  # ... and two queries that see nothing (left padding)
    return keep


def _leaves(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, S, D, generator=g).requires_grad_() for _ in range(3)]


SPELLINGS = [
    (matmul_scaled, None),
    (divided_no_grad_mask, None),
    (bmm_reshaped, None),
    (einsum_spelling, None),
    (min_mask, "keep"),
    (min_mask, "keep-empty-rows"),
    (min_fill, "keep-empty-rows"),
    (neg_inf_fill, "keep"),
    (neg_inf_fill, "keep-empty-rows"),
    (neg_inf_added, "keep-empty-rows"),
    (bias_and_min_mask, "keep+bias"),
    (gqa_repeat_interleave, None),
]


@pytest.mark.parametrize("fn,extra", SPELLINGS, ids=[f"{fn.__name__}-{extra}" for fn, extra in SPELLINGS])
def test_hand_written_spellings_train_like_eager(fn, extra):
    if extra is None:
        arg = None
    elif extra == "keep+bias":
        arg = (_keep(False), torch.randn(1, N, S, S, generator=torch.Generator().manual_seed(9)).requires_grad_())
    else:
        arg = _keep(extra.endswith("empty-rows"))
    leaves = _leaves()
    weight = torch.randn(B, N, S, D, generator=torch.Generator().manual_seed(5))
    wrt = leaves + ([arg[1]] if extra == "keep+bias" else [])
    # Only rows that see some key in the loss: eager's NaN rows (-inf mask) would make every gradient NaN.
    rows = torch.ones(B, N, S, 1)
    if extra and extra.endswith("empty-rows"):
        rows[1, :, :2] = 0

    def loss_of(out):
        return (torch.nan_to_num(out, nan=0.0) * weight * rows).sum()

    expected = fn(*leaves, arg)
    expected_grads = torch.autograd.grad(loss_of(expected), wrt)
    report = Report()
    out = _compile(fn, report)(*leaves, arg)
    grads = torch.autograd.grad(loss_of(out), wrt)

    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL, equal_nan=True)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)
    (site,) = _attention_sites(report)
    assert site.fused_op == "npu_fusion_attention" and site.graph == "training", report.table()
    targets = _targets(report)
    assert targets.count(FUSION) == 1 and targets.count(FUSION_GRAD) == 1


@pytest.mark.parametrize("fn,reaches_q", [(min_mask, True), (min_fill, False)])
def test_fully_masked_rows_get_eagers_gradients(fn, reaches_q):
    """The uniform rows of an added finfo.min mask pass gradient to q and k in eager
    (the softmax Jacobian at equal scores); a masked_fill zeroes it. The fix-up must
    reproduce both, not the fused op's zero row."""
    keep = _keep(True)
    leaves = _leaves(1)
    weight = torch.randn(B, N, S, D, generator=torch.Generator().manual_seed(6))
    expected_grads = torch.autograd.grad((fn(*leaves, keep) * weight).sum(), leaves)
    report = Report()
    grads = torch.autograd.grad((_compile(fn, report)(*leaves, keep) * weight).sum(), leaves)
    empty_rows_q_grad = expected_grads[0][1, :, :2].abs().max()
    assert (empty_rows_q_grad > 1e-3) if reaches_q else (empty_rows_q_grad == 0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert "fully-masked-row fix-up" in " ".join(_attention_sites(report)[0].notes)


@pytest.mark.parametrize("fn,nan_in_q_and_k", [(neg_inf_fill, False), (neg_inf_added, True)])
def test_nan_rows_spread_nan_gradients_as_eager(fn, nan_in_q_and_k):
    """A -inf mask that empties a row: eager's output row is NaN and so are the
    gradients of its batch's values, even where the loss ignores the row; an added
    mask passes the NaN on to the row's query and its batch's keys too."""
    keep = _keep(True)
    leaves = _leaves(2)
    rows = torch.ones(B, N, S, 1)
    rows[1, :, :2] = 0

    def loss_of(out):
        return (torch.nan_to_num(out, nan=0.0) * rows).sum()

    expected_grads = torch.autograd.grad(loss_of(fn(*leaves, keep)), leaves)
    grads = torch.autograd.grad(loss_of(_compile(fn, Report())(*leaves, keep)), leaves)
    assert expected_grads[2][1].isnan().all() and not expected_grads[2][0].isnan().any()
    assert expected_grads[1][1].isnan().all() == nan_in_q_and_k
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)


def test_added_and_filled_masks_that_may_empty_a_row_are_left_alone():
    def both(q, k, v, keep):
        scores = (q @ k.transpose(-1, -2)) * 0.25 + torch.where(keep, 0.0, float("-inf"))
        return scores.masked_fill(~keep.transpose(-1, -2), float("-inf")).softmax(-1) @ v

    report = Report()
    leaves = _leaves()
    _compile(both, report)(*leaves, _keep(False)).sum().backward()
    (site,) = _attention_sites(report)
    assert not site.rewritten and "both added and filled" in site.reason, report.table()


def test_hand_written_dropout_is_left_alone_and_eval_dropout_is_fused():
    def dropped(q, k, v, train):
        return F.dropout((q @ k.transpose(-1, -2) * 0.25).softmax(-1), p=0.2, training=train) @ v

    leaves = _leaves()
    report = Report()
    _compile(dropped, report)(*leaves, True).sum().backward()
    (site,) = _attention_sites(report)
    assert not site.rewritten and "dropout p=0.2" in site.reason, report.table()

    report = Report()
    out = _compile(dropped, report)(*leaves, False)
    torch.testing.assert_close(out, dropped(*leaves, False), rtol=RTOL, atol=ATOL)
    (site,) = _attention_sites(report)
    assert site.fused_op == "npu_fusion_attention", report.table()


def test_returned_attention_weights_are_left_alone():
    def with_weights(q, k, v):
        probs = (q @ k.transpose(-1, -2) * 0.25).softmax(-1)
        return probs @ v, probs

    leaves = _leaves()
    report = Report()
    out, probs = _compile(with_weights, report)(*leaves)
    (out + 0).sum().backward()
    training = [s for s in _attention_sites(report) if s.graph == "training"]
    assert len(training) == 1 and not training[0].rewritten and "also used" in training[0].reason
    assert FUSION not in _targets(report)


# ----------------------------------------------------------------------------
# Packed variable-length batches (DataCollatorWithFlattening) -> TND
# ----------------------------------------------------------------------------

PACKED = torch.ops.npu_attn.npu_fusion_attention_packed.default
PACKED_GRAD = torch.ops.npu_attn.npu_fusion_attention_packed_grad.default
LENGTHS = [3, 5, 4]


def _packed_batch():
    """What DataCollatorWithFlattening makes of three sequences: one row of all their
    tokens, position_ids restarting at 0, labels -100 at each sequence's first token."""
    ids = torch.randint(1, 128, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    labels = ids.clone()
    labels[0, torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0)[:-1].tolist()])] = -100
    return ids, position_ids, labels


@pytest.fixture
def tnd_lengths(monkeypatch):
    """Every cumulative-lengths list the packed ops computed through TND (None: BNSD)."""
    import sys

    module = sys.modules["npu_attn_graph.kernels.fusion_attention_packed"]
    seen = []
    original = module.packed_segments

    def spy(*args):
        result = original(*args)
        seen.append(result)
        return result

    monkeypatch.setattr(module, "packed_segments", spy)
    return seen


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_llama_batch_becomes_tnd_with_eagers_loss_and_gradients(attn, tnd_lengths):
    model = build_matrix_model("llama", attn).train()
    ids, position_ids, labels = _packed_batch()

    def loss_of(m):
        logits = m(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)

    expected = loss_of(model)
    expected.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    report = Report()
    loss = loss_of(_compile(model, report))
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=RTOL, atol=GRAD_ATOL, msg=lambda m: f"{name}: {m}")
    sites = _attention_sites(report)
    assert len(sites) == 2 and all(s.fused_op == "npu_fusion_attention" and s.layout == "TND" and
                                   s.sparse_mode == 3 for s in sites), report.table()
    targets = _targets(report)
    assert targets.count(PACKED) == 2 and targets.count(PACKED_GRAD) == 2 and FUSION not in targets
    # Two layers, forward and backward: every call went through TND with the three sequences.
    assert tnd_lengths == [[3, 8, 12]] * 4


def _packed_mask(batch_segments: list[list[int]], seq: int) -> torch.Tensor:
    """(B, 1, S, S), True = masked out: block-diagonal causal over each batch's segments."""
    masks = []
    for segments in batch_segments:
        ids = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(segments))
        keep = (ids[:, None] == ids[None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
        masks.append(~keep)
    return torch.stack(masks).unsqueeze(1)


def _band_mask(seq: int) -> torch.Tensor:
    keep = torch.ones(seq, seq, dtype=torch.bool).tril() & ~torch.ones(seq, seq, dtype=torch.bool).tril(-3)
    return (~keep).expand(2, 1, seq, seq)


def _holed_mask(seq: int) -> torch.Tensor:
    mask = _packed_mask([[3, 5], [8]], seq)
    mask[0, 0, 6, 4] = True  # a hole inside a sequence: not block-diagonal causal
    return mask


@pytest.mark.parametrize("mask,lengths", [
    (_packed_mask([[3, 5], [8]], 8), [3, 8, 16]),
    (_packed_mask([[2, 2, 4]], 8).expand(2, 1, 8, 8), [2, 4, 8, 10, 12, 16]),
    (_band_mask(8), None),
    (_holed_mask(8), None),
], ids=["two-batches", "shared-mask", "band", "hole"])
def test_packed_op_equals_the_bnsd_call_with_its_mask(mask, lengths, tnd_lengths):
    """npu_fusion_attention_packed is npu_fusion_attention BNSD with the mask
    (sparse_mode 1), values and gradients, whichever way it computes it; TND
    exactly where the mask is block-diagonal causal."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 8, 16, generator=g).requires_grad_()
    k, v = (torch.randn(2, 2, 8, 16, generator=g).requires_grad_() for _ in range(2))
    dy = torch.randn(2, 4, 8, 16, generator=g)
    out = PACKED(q, k, v, mask, 4, 0.25)
    grads = torch.autograd.grad(out[0], (q, k, v), dy)
    ref = FUSION(q, k, v, 4, "BNSD", atten_mask=mask, scale=0.25, sparse_mode=1)
    ref_grads = torch.autograd.grad(ref[0], (q, k, v), dy)
    for got, want in zip([*out, *grads], [*ref[:3], *ref_grads]):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert tnd_lengths == [lengths, lengths]  # forward and backward decide alike
    torch.library.opcheck(PACKED, (q, k, v, mask, 4, 0.25))


# ----------------------------------------------------------------------------
# Where the fused op would not compute what the program computes
# ----------------------------------------------------------------------------


def test_autocast_regions_are_left_alone_with_the_dtype_the_program_gives():
    """Under torch.autocast the matmuls (and SDPA) run in bfloat16; npu_fusion_attention
    is a custom op autocast does not cast, so a rewrite would return float32."""
    def hand_written(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ((q @ k.transpose(-1, -2)) * 0.25).softmax(-1) @ v

    def sdpa(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    for fn in (hand_written, sdpa):
        leaves = _leaves()
        report = Report()
        out = _compile(fn, report)(*leaves)
        out.float().sum().backward()
        assert out.dtype == fn(*leaves).dtype == torch.bfloat16
        (site,) = [s for s in _attention_sites(report) if s.graph == "training"]
        assert not site.rewritten and "torch.autocast" in site.reason, report.table()
        assert FUSION not in _targets(report)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_dynamic_shapes_list_each_site_once_per_compiled_graph(attention):
    """dynamic=True: loss and gradients equal eager for two sequence lengths, and each compiled
    graph lists each site once: the compile that dynamo restarts (AOT specializes the dropout
    probability, a float input under dynamic=True) leaves no rows behind. Hand-written
    attention's Python float scale becomes a graph input: it is folded into the query
    (softmax(s * q k^T) = softmax((s q) k^T)) and stays an input through the restart."""
    from npu_attn_graph.backend import traced_afresh

    model = build_matrix_model("llama", attention).train()
    report = Report()
    compiled = torch.compile(model, backend="npu_attn", fullgraph=True, dynamic=True, options={"report": report})
    with traced_afresh(report):
        _dynamic_steps(model, compiled)
    sites = _attention_sites(report)
    assert len(sites) == 2 * (1 + len(report.recompiles)), report.table()
    assert all(s.fused_op == "npu_fusion_attention" and s.graph == "training" for s in sites), report.table()
    if attention == "eager":
        assert all("runtime scale" in " ".join(s.notes) for s in sites), report.table()


def _dynamic_steps(model, compiled) -> None:
    """Two sequence lengths; loss and gradients equal eager's."""
    for length in (9, 12):
        ids = torch.randint(1, 128, (2, length), generator=torch.Generator().manual_seed(length))
        model.zero_grad()
        _loss("llama", model, ids, None).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        loss = _loss("llama", compiled, ids, None)
        loss.backward()
        torch.testing.assert_close(loss, _loss("llama", model, ids, None), rtol=RTOL, atol=ATOL)
        for name, p in model.named_parameters():
            if name in grads:
                torch.testing.assert_close(p.grad, grads[name], rtol=RTOL, atol=GRAD_ATOL, msg=lambda m: f"{name}: {m}")


def sliding_window_from_positions(q, k, v):
    positions = torch.arange(q.shape[2])
    i, j = positions.view(-1, 1), positions.view(1, -1)
    keep = (j <= i) & (i - j < 3)
    return ((q @ k.transpose(-1, -2)) * 0.25).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def causal_min_from_positions(q, k, v):
    positions = torch.arange(q.shape[2])
    mask = torch.where(positions.view(1, -1) <= positions.view(-1, 1), 0.0, torch.finfo(q.dtype).min)
    return ((q @ k.transpose(-1, -2)) * 0.25 + mask).softmax(-1) @ v


@pytest.mark.parametrize("fn,sparse_mode", [(sliding_window_from_positions, 4), (causal_min_from_positions, 3)])
def test_masks_built_from_positions_become_sparse_modes(fn, sparse_mode):
    """A mask the graph builds from positions and that is provably a band (the shared
    mask planning decides) becomes the op's sparse mode with the compressed mask."""
    leaves = _leaves(3)
    weight = torch.randn(B, N, S, D, generator=torch.Generator().manual_seed(8))
    expected = fn(*leaves)
    expected_grads = torch.autograd.grad((expected * weight).sum(), leaves)
    report = Report()
    out = _compile(fn, report)(*leaves)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    (site,) = _attention_sites(report)
    assert site.fused_op == "npu_fusion_attention" and site.sparse_mode == sparse_mode, report.table()
    assert FUSION_GRAD in _targets(report)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_eager_training_step_reaches_ge_as_flash_attention_score(family, tmp_path):
    """Through TorchAir (offline): the forward graph holds FlashAttentionScore, the
    backward FlashAttentionScoreGrad, and no softmax is left in either; both graphs
    are complete (Llama's backward: silu_backward as SwishGrad, converters/silu_backward.py)."""
    from npu_attn_graph import to_ge_graph

    model = build_matrix_model(family, "eager").train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    result = to_ge_graph(model, ids, out_dir=tmp_path, **({} if family == "bert" else {"use_cache": False}))
    forward, backward = (g.op_types for g in result.graphs)
    assert forward["FlashAttentionScore"] == 2 and "SoftmaxV2" not in forward, result.summary()
    assert backward["FlashAttentionScoreGrad"] == 2 and "SoftmaxGrad" not in backward, result.summary()
    assert all(g.complete for g in result.graphs) and not result.unconverted, result.summary()
    assert backward["SwishGrad"] == (2 if family == "llama" else 0), result.summary()
    assert {s.graph for s in _attention_sites(result.report)} == {"training"}


def test_silu_backward_becomes_swish_grad_in_ge(tmp_path):
    """aten.silu_backward(grad, x) -> GE SwishGrad(grad, x, Swish(x)), scale 1 on both
    (TorchAir 2.13's own converter raises NotImplementedError): inputs and attributes
    read back from the GE protobuf of the backward graph."""
    from npu_attn_graph import to_ge_graph

    def fn(x, w):
        return F.silu(x * w)

    x, w = (torch.randn(4, 8, generator=torch.Generator().manual_seed(i)).requires_grad_() for i in range(2))
    result = to_ge_graph(fn, x, w, out_dir=tmp_path)
    assert len(result.graphs) == 2 and all(g.complete for g in result.graphs), result.summary()
    backward = result.graphs[1].graph_def
    ops = {op.name: op for op in backward.op}
    (grad,) = [op for op in backward.op if op.type == "SwishGrad"]
    (swish,) = [op for op in backward.op if op.type == "Swish"]
    assert [d.name for d in grad.input_desc] == ["grad", "x", "y"]
    dy, saved, y = (ops[name.split(":")[0]] for name in grad.input)
    # grad <- the incoming gradient; x <- the activation AOT saved (x * w); y <- Swish of that same x.
    assert dy.type == "Data" and dy.name.startswith("tangents")
    assert saved.type == "Data" and not saved.name.startswith(("tangents", "primals"))
    assert y is swish and list(swish.input) == [f"{saved.name}:0"] and grad.input[2] == f"{swish.name}:0"
    assert grad.attr["scale"].f == 1.0 and swish.attr["scale"].f == 1.0
    # Both gradients read SwishGrad's output.
    assert sum(f"{grad.name}:0" in op.input for op in backward.op) == 2
    # SwishGrad (scale 1, y = x * sigmoid(x)) is silu's derivative: grad * (s + x * s * (1 - s)).
    t, g = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    s = torch.sigmoid(t)
    torch.testing.assert_close(g * (s + t * s * (1 - s)), torch.ops.aten.silu_backward(g, t))
