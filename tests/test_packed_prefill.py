"""Packed (varlen) inference prefill -> npu_prompt_flash_attention_packed (TND with actual lengths at run time).

The engine-style prefill packs sequences into one token axis and masks with
``(seq_ids[:, None] == seq_ids[None, :]) & (positions[None, :] <= positions[:, None])``;
passes/packed_prefill_to_tnd.py proves that construction and retargets the fused call to
the wrapper op (kernels/prompt_attention_packed.py), which decides from the mask at run
time between TND (lengths read from it) and the masked call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import npu_attn_graph
from npu_attn_graph import Report
from npu_attn_graph.kernels import prompt_attention_packed as packed
from npu_attn_graph.kernels.prompt_attention_packed import PackedPlan, packed_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ops = torch.ops.npu_attn
H, HKV, D = 4, 2, 16
WRAPPERS = (ops.npu_prompt_flash_attention_packed.default, ops.npu_fused_infer_attention_score_packed.default)
PLAIN = (ops.npu_prompt_flash_attention.default, ops.npu_fused_infer_attention_score.default)


def packed_batch(lengths, pad, pad_positions="zeros"):
    """seq_ids / positions of sequences one after another, then `pad` padding tokens (id -1)."""
    seq, pos = [], []
    for i, n in enumerate(lengths):
        seq += [i] * n
        pos += range(n)
    seq += [-1] * pad
    pos += [0] * pad if pad_positions == "zeros" else range(pad)
    return torch.tensor(seq), torch.tensor(pos)


def keep_mask(seq_ids, positions):
    return (seq_ids[:, None] == seq_ids[None, :]) & (positions[None, :] <= positions[:, None])


class SdpaPrefill(torch.nn.Module):
    """The engine's prefill attention: x (T, hidden) -> packed GQA attention with SDPA."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.Linear(32, H * D)
        self.k = torch.nn.Linear(32, HKV * D)
        self.v = torch.nn.Linear(32, HKV * D)

    def forward(self, x, seq_ids, positions):
        t = x.shape[0]
        mask = (seq_ids[:, None] == seq_ids[None, :]) & (positions[None, :] <= positions[:, None])
        q = self.q(x).view(t, H, D).transpose(0, 1).unsqueeze(0)
        k = self.k(x).view(t, HKV, D).transpose(0, 1).unsqueeze(0)
        v = self.v(x).view(t, HKV, D).transpose(0, 1).unsqueeze(0)
        k = k[:, :, None].expand(1, HKV, H // HKV, t, D).reshape(1, H, t, D)
        v = v[:, :, None].expand(1, HKV, H // HKV, t, D).reshape(1, H, t, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])
        return out.squeeze(0).transpose(0, 1).reshape(t, H * D)


class HandWrittenPrefill(torch.nn.Module):
    """The same, hand-written: the masked-out form (De Morgan) and masked_fill(-inf)."""

    def forward(self, q, k, v, seq_ids, positions):
        masked = (seq_ids.view(-1, 1) != seq_ids.view(1, -1)) | (positions[None, :] > positions[:, None])
        scores = q @ k.transpose(-1, -2) / D ** 0.5
        return scores.masked_fill(masked, float("-inf")).softmax(-1) @ v


def compile_and_run(module, *args, dynamic=False):
    torch._dynamo.reset()
    report = Report()
    fn = torch.compile(module, backend="npu_attn", dynamic=dynamic,
                       options={"executor": "eager", "report": report})
    with torch.no_grad():
        before = dict(packed.PATHS)
        out = fn(*args)
        taken = {k: packed.PATHS[k] - before.get(k, 0) for k in ("tnd", "masked")}
    return fn, report, out, taken


def _targets(report):
    return [n.target for gm in report.graph_modules for n in gm.graph.nodes if n.op == "call_function"]


def _assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- the rewrite ------------------------------------------------------------------------------------


def test_sdpa_prefill_becomes_the_packed_wrapper_and_takes_tnd():
    torch.manual_seed(1)
    seq_ids, positions = packed_batch([5, 9, 3], pad=7)
    x = torch.randn(len(seq_ids), 32)
    module = SdpaPrefill().eval()
    _, report, out, taken = compile_and_run(module, x, seq_ids, positions)
    with torch.no_grad():
        expected = module(x, seq_ids, positions)
    _assert_close(out, expected)
    targets = _targets(report)
    assert targets.count(ops.npu_prompt_flash_attention_packed.default) == 1
    assert not set(PLAIN) & set(targets)
    assert taken == {"tnd": 1, "masked": 0}
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert site.pattern == "packed:varlen-prefill" and site.fused_op == "npu_prompt_flash_attention_packed"
    assert (site.layout, site.sparse_mode, site.gqa_ratio) == ("TND", 3, 2), report.table()
    assert site.notes[0].startswith("read by sdpa:") and "actual_seq_lengths" in site.notes[0], site.notes
    assert "block-diagonal causal" in site.notes[0] and "the masked call" in site.notes[0]
    assert not any(n.startswith("full mask computed from positions") for n in site.notes)


def test_padding_tokens_equal_eager_and_a_non_packed_mask_takes_the_masked_call():
    """One compiled graph, three batches: padding at position 0 (a full segment), padding with
    positions 0..p-1 (causal segments only), and interleaved sequence ids (not block-diagonal:
    the masked call). Every row, padding rows included, equals eager."""
    torch.manual_seed(2)
    module = SdpaPrefill().eval()
    seq_ids, positions = packed_batch([6, 4], pad=6)
    x = torch.randn(16, 32)
    fn, _, out, taken = compile_and_run(module, x, seq_ids, positions)
    with torch.no_grad():
        expected = module(x, seq_ids, positions)
    _assert_close(out, expected)
    _assert_close(out[10:], expected[10:])  # the padding rows: each the mean over the padding tokens' values
    assert taken == {"tnd": 1, "masked": 0}
    cases = [packed_batch([6, 4], pad=6, pad_positions="range"),
             (torch.tensor([0, 1] * 8), torch.tensor([i // 2 for i in range(16)]))]
    for (s, p), path in zip(cases, ("tnd", "masked")):
        with torch.no_grad():
            before = packed.PATHS[path]
            got = fn(x, s, p)
            assert packed.PATHS[path] == before + 1, path
            _assert_close(got, module(x, s, p))


def test_hand_written_masked_out_form_is_rewritten():
    torch.manual_seed(3)
    seq_ids, positions = packed_batch([3, 8, 1], pad=4)
    t = len(seq_ids)
    q, k, v = (torch.randn(1, H, t, D) for _ in range(3))
    module = HandWrittenPrefill()
    _, report, out, taken = compile_and_run(module, q, k, v, seq_ids, positions)
    _assert_close(out, module(q, k, v, seq_ids, positions))
    assert ops.npu_prompt_flash_attention_packed.default in _targets(report), report.table()
    assert taken["tnd"] == 1
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert site.pattern == "packed:varlen-prefill" and site.notes[0].startswith("read by eager:"), report.table()


def test_symbolic_length_wraps_fused_infer_attention_score():
    torch.manual_seed(4)
    module = SdpaPrefill().eval()
    fn = None
    for lengths, pad in (([5, 3], 4), ([7, 2, 4], 3)):
        seq_ids, positions = packed_batch(lengths, pad)
        x = torch.randn(len(seq_ids), 32)
        if fn is None:
            fn, report, out, taken = compile_and_run(module, x, seq_ids, positions, dynamic=True)
        else:
            with torch.no_grad():
                out = fn(x, seq_ids, positions)
        with torch.no_grad():
            _assert_close(out, module(x, seq_ids, positions))
    assert ops.npu_fused_infer_attention_score_packed.default in _targets(report), report.table()
    assert len(report.graph_modules) == 1


@pytest.mark.parametrize("spelling", ["arange_causal", "strict", "reversed", "positions_only", "float_ids"])
def test_other_masks_are_not_this_site(spelling):
    """Masks that are not (same id & key position <= query position) keep their row."""
    def fn(q, k, v, seq_ids, positions):
        t = q.shape[2]
        same = seq_ids[:, None] == seq_ids[None, :]
        if spelling == "arange_causal":
            keep = same & (torch.arange(t)[None, :] <= torch.arange(t)[:, None])
        elif spelling == "strict":
            keep = same & (positions[None, :] < positions[:, None])
            keep = keep | torch.eye(t, dtype=torch.bool)
        elif spelling == "reversed":
            keep = same & (positions[:, None] <= positions[None, :])
        elif spelling == "positions_only":
            keep = positions[None, :] <= positions[:, None]
        else:
            f = seq_ids.float()
            keep = (f[:, None] == f[None, :]) & (positions[None, :] <= positions[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None])

    seq_ids, positions = packed_batch([4, 4], pad=0)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    report = npu_attn_graph.explain(fn, q, k, v, seq_ids, positions, options={"executor": "eager"})
    (site,) = report.sites
    assert site.pattern != "packed:varlen-prefill" and site.fused_op not in (
        "npu_prompt_flash_attention_packed", "npu_fused_infer_attention_score_packed"), report.table()


def test_a_proved_mask_on_a_call_the_wrapper_cannot_take_says_why():
    """A bias besides the packed mask goes in as pse_shift, which TND does not take: the row keeps
    the masked op and says why."""
    def fn(q, k, v, bias, seq_ids, positions):
        masked = (seq_ids[:, None] != seq_ids[None, :]) | (positions[None, :] > positions[:, None])
        scores = q @ k.transpose(-1, -2) * 0.25 + bias
        return scores.masked_fill(masked, float("-inf")).softmax(-1) @ v

    seq_ids, positions = packed_batch([4, 4], pad=0)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    bias = torch.randn(1, 2, 8, 8)
    report = npu_attn_graph.explain(fn, q, k, v, bias, seq_ids, positions, options={"executor": "eager"})
    (site,) = report.sites
    assert site.fused_op == "npu_prompt_flash_attention" and site.pattern.startswith("eager:"), report.table()
    assert any("packed prefill mask proved" in n and "pse_shift is set" in n for n in site.notes), site.notes


# -- the wrapper op ---------------------------------------------------------------------------------


def _mask(seq_ids, positions):
    return ~keep_mask(seq_ids, positions)


def test_packed_plan_reads_segments():
    m = _mask(*packed_batch([2, 3], pad=3))
    assert packed_plan(m, 1, 8, 8) == PackedPlan(causal=((0, 2), (2, 5)), full=((5, 8),))
    assert packed_plan(m[None, None], 2, 8, 8) == PackedPlan(causal=((0, 2), (2, 5), (8, 10), (10, 13)),
                                                           full=((5, 8), (13, 16)))
    per_batch = torch.stack([m, _mask(*packed_batch([8], pad=0))])[:, None]
    assert packed_plan(per_batch, 2, 8, 8) == PackedPlan(causal=((0, 2), (2, 5), (8, 16)), full=((5, 8),))
    # A full segment between causal ones.
    mid = _mask(torch.tensor([0, 0, -1, -1, 1, 1]), torch.tensor([0, 1, 0, 0, 0, 1]))
    assert packed_plan(mid, 1, 6, 6) == PackedPlan(causal=((0, 2), (4, 6)), full=((2, 4),))
    hole = m.clone()
    hole[4, 3] = True  # row 4 keeps 2 and 4, not 3
    empty = m.clone()
    empty[1] = True  # row 1 keeps nothing
    future = m.clone()
    future[2, 3] = False  # row 2 sees the next key of its sequence, row 4 does not (neither causal nor full)
    for bad in (hole, empty, future):
        assert packed_plan(bad, 1, 8, 8) is None
    assert packed_plan(m[:, :7], 1, 8, 7) is None  # S_q != S_kv
    # Rows 0-1 both keeping keys 0-1 is a full segment (what padding at one position gives), not a misread.
    two = m.clone()
    two[0, 1] = False
    assert packed_plan(two, 1, 8, 8) == PackedPlan(causal=((2, 5),), full=((0, 2), (5, 8)))
    assert packed_plan(m.float(), 1, 8, 8) is None


@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH", "BNSD_BSND"])
@pytest.mark.parametrize("op", ["prompt", "fia"])
def test_wrapper_equals_the_masked_call(layout, op):
    torch.manual_seed(5)
    seq_ids, positions = packed_batch([3, 6, 2], pad=5)
    t = len(seq_ids)
    m = _mask(seq_ids, positions)
    bad = m.clone()
    bad[7, 2] = False  # not packed: the masked call

    def as_layout(x):
        if layout.startswith("BNSD"):
            return x
        x = x.transpose(1, 2).contiguous()
        return x if layout == "BSND" else x.flatten(2)

    q, k, v = as_layout(torch.randn(2, H, t, D)), as_layout(torch.randn(2, HKV, t, D)), \
        as_layout(torch.randn(2, HKV, t, D))
    for mask, path in ((m, "tnd"), (m[None, None], "tnd"), (bad, "masked")):
        before = packed.PATHS[path]
        if op == "prompt":
            want = ops.npu_prompt_flash_attention(q, k, v, atten_mask=mask, num_heads=H, scale_value=0.25,
                                                  input_layout=layout, num_key_value_heads=HKV, sparse_mode=1)
            got = ops.npu_prompt_flash_attention_packed(q, k, v, mask, num_heads=H, scale_value=0.25,
                                                        input_layout=layout, num_key_value_heads=HKV)
        else:
            want = ops.npu_fused_infer_attention_score(q, k, v, atten_mask=mask, num_heads=H, scale=0.25,
                                                       input_layout=layout, num_key_value_heads=HKV,
                                                       sparse_mode=1)
            got = ops.npu_fused_infer_attention_score_packed(q, k, v, mask, num_heads=H, scale=0.25,
                                                             input_layout=layout, num_key_value_heads=HKV)
            assert got[1].shape == want[1].shape
            want, got = want[0], got[0]
        assert packed.PATHS[path] == before + 1
        assert got.shape == want.shape and got.stride() == want.stride()
        _assert_close(got, want)


def test_wrapper_fake_is_the_wrapped_ops_validation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from npu_attn_graph import NpuAttnArgumentError

    with FakeTensorMode():
        q, k, v = torch.empty(1, H, 8, 24), torch.empty(1, HKV, 8, 24), torch.empty(1, HKV, 8, 24)
        with pytest.raises(NpuAttnArgumentError, match="npu_prompt_flash_attention_packed: query head_dim"):
            ops.npu_prompt_flash_attention_packed(q, k, v, torch.empty(8, 8, dtype=torch.bool), num_heads=H,
                                                  input_layout="BNSD", num_key_value_heads=HKV)
        with pytest.raises(NpuAttnArgumentError, match="npu_fused_infer_attention_score_packed: input_layout"):
            ops.npu_fused_infer_attention_score_packed(q, k, v, torch.empty(8, 8, dtype=torch.bool), num_heads=H,
                                                       input_layout="TND", num_key_value_heads=HKV)


# -- the mini-vLLM model ----------------------------------------------------------------------------


def test_mini_vllm_prefill_is_packed_tnd_and_equals_eager():
    transformers = pytest.importorskip("transformers")
    from examples.mini_vllm import PagedCausalLM

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = PagedCausalLM.from_hf(transformers.LlamaForCausalLM(config).eval())
    blocks, block_size = 6, 16
    caches = [torch.zeros(blocks, block_size, 2, 16) for _ in range(4)]
    seq_ids, positions = packed_batch([7, 12, 3], pad=10)
    t = len(seq_ids)
    ids = torch.randint(0, 96, (t,))
    slots = torch.cat([torch.arange(7), 16 + torch.arange(12), 48 + torch.arange(3), torch.full((10,), -1)])
    eager_caches = [c.clone() for c in caches]
    with torch.no_grad():
        expected = model.prefill(ids, positions, seq_ids, slots, eager_caches)
    _, report, out, taken = compile_and_run(model.prefill, ids, positions, seq_ids, slots, caches)
    _assert_close(out, expected)
    for a, b in zip(caches, eager_caches):
        _assert_close(a[:5], b[:5])  # the real tokens' blocks (the scratch block takes the padding writes)
    targets = _targets(report)
    assert targets.count(ops.npu_prompt_flash_attention_packed.default) == 2
    assert not set(PLAIN) & set(targets)
    assert taken == {"tnd": 2, "masked": 0}
    sites = [s for s in report.sites if s.kind == "attention"]
    assert len(sites) == 2 and all(s.pattern == "packed:varlen-prefill" and s.gqa_ratio == 2 for s in sites), \
        report.table()


# -- GE ---------------------------------------------------------------------------------------------


def test_ge_graph_is_the_masked_call(tmp_path):
    """The GE converter converts the definition: PromptFlashAttention with the mask, sparse_mode 1."""
    pytest.importorskip("google.protobuf")
    from test_ge_converters import producer

    torch.manual_seed(6)
    seq_ids, positions = packed_batch([5, 6], pad=5)
    q, k, v = (torch.randn(1, H, 16, D, dtype=torch.float16) for _ in range(3))

    def fn(q, k, v, seq_ids, positions):
        keep = (seq_ids[:, None] == seq_ids[None, :]) & (positions[None, :] <= positions[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None])

    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(fn, q, k, v, seq_ids, positions, out_dir=tmp_path)
    assert result.single_graph, result.summary()
    assert any(s.pattern == "packed:varlen-prefill" for s in result.report.sites), result.report.table()
    graph = result.graphs[0].graph_def
    [pfa] = [op for op in graph.op if op.type == "PromptFlashAttention"]
    assert producer(graph, pfa, "atten_mask") is not None
    assert pfa.attr["sparse_mode"].i == 1 and pfa.attr["num_heads"].i == H
