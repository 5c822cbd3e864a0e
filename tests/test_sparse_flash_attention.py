"""npu_sparse_flash_attention: the reference kernel against an independent fp64
loop oracle over every documented mode, opcheck, fake-tensor shapes, and one
test per documented constraint (eager and, for shape rules, FakeTensorMode).

The oracle below is written from the torch_npu / ops-transformer docs and
their golden (gather the blocks named by sparse_indices, stop at the first -1,
read at most min(K, ceil(threshold / sparse_block_size)) entries, mask
positions >= threshold or >= kv_len, MLA score q.k + q_rope.k_rope, sinks in
the softmax max and denominator), one explicit loop per query row.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from npu_attn_graph.kernels import _library
from npu_attn_graph.kernels._library import NpuAttnArgumentError
from npu_attn_graph.kernels.sparse_flash_attention import npu_sparse_flash_attention

SFA = torch.ops.npu_attn.npu_sparse_flash_attention.default
F64 = torch.float64
I32 = torch.int32
D, DR = 512, 64
TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
              "test_aot_dispatch_dynamic")


# ----------------------------------------------------------------------------
# Independent oracle (float64, explicit loops; imports nothing from the package)
# ----------------------------------------------------------------------------


def oracle(query, key, value, sparse_indices, scale, *, query_rope, key_rope, q_lens, kv_lens, q_starts,
           kv_starts, layout_query, layout_kv, sparse_mode, sparse_block_size, block_table=None, sinks=None):
    """Returns (out in the query layout, softmax_max, softmax_sum in the lse layout), float64.

    q_lens/kv_lens are per-batch lengths; q_starts/kv_starts the first token
    of each batch in a TND tensor (unused for BSND / PA_BSND)."""
    n1 = query.shape[-2]
    n2 = key.shape[-2]
    g_size = n1 // n2
    v_src = key if value is None else value
    out = torch.zeros(query.shape, dtype=F64)
    if layout_query == "BSND":
        lse_shape = (query.shape[0], n2, query.shape[1], g_size)
    else:
        lse_shape = (n2, query.shape[0], g_size)
    smax = torch.zeros(lse_shape, dtype=F64)
    ssum = torch.zeros(lse_shape, dtype=F64)

    def kv_row(t, b, p, n):
        if layout_kv == "BSND":
            return t[b, p, n]
        if layout_kv == "TND":
            return t[kv_starts[b] + p, n]
        bs = key.shape[1]
        return t[int(block_table[b, p // bs]), p % bs, n]

    for b in range(len(q_lens)):
        q_len, kv_len = q_lens[b], kv_lens[b]
        for s in range(q_len):
            row = (b, s) if layout_query == "BSND" else (q_starts[b] + s,)
            for n in range(n2):
                threshold = kv_len if sparse_mode == 0 else kv_len - q_len + s + 1
                if threshold <= 0:
                    continue  # nothing computed: zeros everywhere
                entries = sparse_indices[(*row, n)].tolist()
                positions = []
                for x in entries[: min(len(entries), math.ceil(threshold / sparse_block_size))]:
                    if x == -1:
                        break
                    for p in range(x * sparse_block_size, (x + 1) * sparse_block_size):
                        if p < kv_len and p < threshold:
                            positions.append(p)
                for g in range(g_size):
                    h = n * g_size + g
                    lse_idx = (b, n, s, g) if layout_query == "BSND" else (n, q_starts[b] + s, g)
                    q = query[(*row, h)].to(F64)
                    qr = query_rope[(*row, h)].to(F64)
                    scores = [scale * (float(q @ kv_row(key, b, p, n).to(F64))
                                       + float(qr @ kv_row(key_rope, b, p, n).to(F64))) for p in positions]
                    candidates = scores + ([float(sinks[h])] if sinks is not None else [])
                    if not candidates:
                        continue
                    m = max(candidates)
                    weights = [math.exp(x - m) for x in scores]
                    total = sum(weights) + (math.exp(float(sinks[h]) - m) if sinks is not None else 0.0)
                    acc = torch.zeros(v_src.shape[-1], dtype=F64)
                    for w, p in zip(weights, positions):
                        acc += w * kv_row(v_src, b, p, n).to(F64)
                    out[(*row, h)] = acc / total
                    smax[lse_idx] = m
                    ssum[lse_idx] = total
    return out, smax, ssum


# ----------------------------------------------------------------------------
# Case builder
# ----------------------------------------------------------------------------


def build(*, layout_query="BSND", layout_kv="BSND", q_lens=(3, 2), q_seq=3, kv_lens=(20, 7), kv_seq=20, heads=4,
          sparse_size=6, sparse_block_size=1, sparse_mode=3, dtype=torch.float32, with_value=False,
          with_sinks=False, block_size=16, give_q_lens=True, give_kv_lens=True, seed=0, lse=True):
    """Random inputs plus (kwargs for the op, kwargs for the oracle)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    batch = len(q_lens)
    if layout_query == "BSND":
        query, query_rope = randn(batch, q_seq, heads, D), randn(batch, q_seq, heads, DR)
        q_starts = [0] * batch
        q_len_arg = torch.tensor(q_lens, dtype=I32) if give_q_lens else None
        if not give_q_lens:
            q_lens = [q_seq] * batch
    else:
        total = sum(q_lens)
        query, query_rope = randn(total, heads, D), randn(total, heads, DR)
        q_starts = [sum(q_lens[:b]) for b in range(batch)]
        q_len_arg = torch.tensor([sum(q_lens[: b + 1]) for b in range(batch)], dtype=I32)

    block_table = None
    kv_starts = [0] * batch
    if layout_kv == "BSND":
        key, key_rope = randn(batch, kv_seq, 1, D), randn(batch, kv_seq, 1, DR)
        kv_len_arg = torch.tensor(kv_lens, dtype=I32) if give_kv_lens else None
        if not give_kv_lens:
            kv_lens = [kv_seq] * batch
    elif layout_kv == "TND":
        total_kv = sum(kv_lens)
        key, key_rope = randn(total_kv, 1, D), randn(total_kv, 1, DR)
        kv_starts = [sum(kv_lens[:b]) for b in range(batch)]
        kv_len_arg = torch.tensor([sum(kv_lens[: b + 1]) for b in range(batch)], dtype=I32)
    else:
        width = max(math.ceil(x / block_size) for x in kv_lens) + 1
        num_blocks = batch * width + 2
        key, key_rope = randn(num_blocks, block_size, 1, D), randn(num_blocks, block_size, 1, DR)
        ids = torch.randperm(num_blocks, generator=g)
        block_table = torch.full((batch, width), -1, dtype=I32)
        for b in range(batch):
            needed = math.ceil(kv_lens[b] / block_size)
            block_table[b, :needed] = ids[b * width : b * width + needed].to(I32)
        kv_len_arg = torch.tensor(kv_lens, dtype=I32)
    value = randn(*key.shape) if with_value else None

    # Indices: mostly in-range blocks, some beyond the causal limit or kv_len,
    # duplicates possible, random -1 tails (and the occasional -1 mid-row).
    max_block = max(math.ceil(max(kv_lens) / sparse_block_size), 1) + 2
    idx_shape = (*query.shape[:-2], 1, sparse_size)
    sparse_indices = torch.randint(0, max_block, idx_shape, generator=g, dtype=I32)
    tails = torch.randint(1, sparse_size + 1, idx_shape[:-1], generator=g)
    sparse_indices[torch.arange(sparse_size) >= tails[..., None]] = -1
    sinks = (torch.randn(heads, generator=g) * 2).float() if with_sinks else None

    scale = 1.0 / math.sqrt(D + DR)
    kwargs = dict(block_table=block_table, actual_seq_lengths_query=q_len_arg, actual_seq_lengths_kv=kv_len_arg,
                  query_rope=query_rope, key_rope=key_rope, sparse_block_size=sparse_block_size,
                  layout_query=layout_query, layout_kv=layout_kv, sparse_mode=sparse_mode, attention_mode=2,
                  return_softmax_lse=lse, sinks=sinks)
    oracle_kwargs = dict(query_rope=query_rope, key_rope=key_rope, q_lens=list(q_lens), kv_lens=list(kv_lens),
                         q_starts=q_starts, kv_starts=kv_starts, layout_query=layout_query, layout_kv=layout_kv,
                         sparse_mode=sparse_mode, sparse_block_size=sparse_block_size, block_table=block_table,
                         sinks=sinks)
    return (query, key, value, sparse_indices, scale), kwargs, oracle_kwargs


def run_and_compare(args, kwargs, oracle_kwargs, rtol=1e-5, atol=1e-6):
    out, smax, ssum = npu_sparse_flash_attention(*args, **kwargs)
    ref_out, ref_max, ref_sum = oracle(*args, **oracle_kwargs)
    query = args[0]
    assert out.shape == query.shape and out.dtype == query.dtype
    torch.testing.assert_close(out.to(F64), ref_out, rtol=rtol, atol=atol)
    if kwargs["return_softmax_lse"]:
        assert smax.dtype == ssum.dtype == torch.float32
        assert smax.shape == ref_max.shape and ssum.shape == ref_sum.shape
        # softmax_max/sum are fp32 from fp32 accumulation even for 16-bit inputs.
        torch.testing.assert_close(smax.to(F64), ref_max, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ssum.to(F64), ref_sum, rtol=1e-5, atol=1e-5)
    else:
        assert smax.shape == ssum.shape == (0,)
    return out, smax, ssum


# ----------------------------------------------------------------------------
# Reference vs oracle
# ----------------------------------------------------------------------------

MODES = {
    # layout_query BSND, layout_kv BSND
    "bsnd_causal_lengths": dict(),
    "bsnd_all_no_lengths": dict(sparse_mode=0, give_q_lens=False, give_kv_lens=False, kv_lens=(20, 20)),
    "bsnd_causal_block4": dict(sparse_block_size=4, kv_lens=(19, 6), sparse_size=4),
    "bsnd_causal_q_longer_than_kv": dict(q_lens=(3, 3), kv_lens=(2, 1), kv_seq=4, q_seq=3),
    "bsnd_value_and_sinks": dict(with_value=True, with_sinks=True),
    "bsnd_8_heads_mode0": dict(heads=8, sparse_mode=0, sparse_block_size=2),
    "bsnd_single_head_no_lse": dict(heads=1, lse=False),
    # TND / TND
    "tnd_causal": dict(layout_query="TND", layout_kv="TND", q_lens=(2, 4, 1), kv_lens=(9, 5, 1)),
    "tnd_all_block2_sinks": dict(layout_query="TND", layout_kv="TND", q_lens=(3, 2), kv_lens=(11, 4),
                                 sparse_mode=0, sparse_block_size=2, with_sinks=True),
    "tnd_q_longer_than_kv": dict(layout_query="TND", layout_kv="TND", q_lens=(4, 2), kv_lens=(2, 0)),
    # paged KV (return_softmax_lse is not supported with PA_BSND)
    "tnd_paged_causal": dict(layout_query="TND", layout_kv="PA_BSND", q_lens=(2, 3), kv_lens=(40, 9), lse=False),
    "bsnd_paged_block8_value": dict(layout_kv="PA_BSND", kv_lens=(37, 16), sparse_block_size=8, sparse_size=5,
                                    with_value=True, lse=False, block_size=32),
    "bsnd_paged_mode0_sinks": dict(layout_kv="PA_BSND", kv_lens=(17, 0), sparse_mode=0, with_sinks=True,
                                   lse=False),
}


@pytest.mark.parametrize("name", list(MODES))
def test_reference_matches_oracle_fp32(name):
    run_and_compare(*build(**MODES[name]))


@pytest.mark.parametrize("name", ["bsnd_causal_lengths", "tnd_paged_causal", "tnd_all_block2_sinks"])
def test_reference_matches_oracle_fp64(name):
    run_and_compare(*build(dtype=F64, **MODES[name]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [
    # The reference computes in fp32 from the 16-bit inputs; the oracle in fp64
    # from the same inputs. They differ by the single rounding of the output to
    # the input dtype: 2^-8 relative for bf16, 2^-11 for fp16 (plus slack).
    (torch.bfloat16, 1e-2),
    (torch.float16, 2e-3),
])
@pytest.mark.parametrize("name", ["bsnd_value_and_sinks", "tnd_paged_causal"])
def test_reference_matches_oracle_half(name, dtype, tol):
    run_and_compare(*build(dtype=dtype, **MODES[name]), rtol=tol, atol=tol)


def test_chunking_does_not_change_the_result(monkeypatch):
    case = build(**MODES["tnd_all_block2_sinks"])
    whole = npu_sparse_flash_attention(*case[0], **case[1])
    monkeypatch.setattr(_library, "SCORE_BLOCK_BYTES", 1)  # one query row per chunk
    chunked = npu_sparse_flash_attention(*case[0], **case[1])
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tiny(sparse_mode=3, q_len=2, kv_len=6, indices=(), sinks=None, sparse_block_size=1, lse=True):
    """One batch, one head; hand-checkable selections."""
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, q_len, 1, D, generator=g, dtype=F64)
    query_rope = torch.randn(1, q_len, 1, DR, generator=g, dtype=F64)
    key = torch.randn(1, kv_len, 1, D, generator=g, dtype=F64)
    key_rope = torch.randn(1, kv_len, 1, DR, generator=g, dtype=F64)
    idx = torch.tensor(indices, dtype=I32).view(1, q_len, 1, -1)
    return npu_sparse_flash_attention(query, key, None, idx, 0.05, query_rope=query_rope, key_rope=key_rope,
                                      attention_mode=2, sparse_mode=sparse_mode, sparse_block_size=sparse_block_size,
                                      return_softmax_lse=lse, sinks=sinks), (query, query_rope, key, key_rope)


def _dense(q, qr, k, kr, positions, scale=0.05):
    scores = scale * (k[positions] @ q + kr[positions] @ qr)
    w = torch.softmax(scores, 0)
    return w @ k[positions], scores.max(), torch.exp(scores - scores.max()).sum()


def test_causal_limit_masks_selected_future_tokens():
    # kv_len 6, q_len 2: row 0 may see positions <= 4, row 1 positions <= 5.
    (out, smax, ssum), (q, qr, k, kr) = _tiny(indices=[[5, 1, 4, -1], [5, 1, -1, -1]])
    exp0, m0, s0 = _dense(q[0, 0, 0], qr[0, 0, 0], k[0, :, 0], kr[0, :, 0], [1, 4])
    exp1, m1, s1 = _dense(q[0, 1, 0], qr[0, 1, 0], k[0, :, 0], kr[0, :, 0], [5, 1])
    torch.testing.assert_close(out[0, 0, 0], exp0)
    torch.testing.assert_close(out[0, 1, 0], exp1)
    torch.testing.assert_close(smax[0, 0, :, 0].double(), torch.stack([m0, m1]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ssum[0, 0, :, 0].double(), torch.stack([s0, s1]), rtol=1e-6, atol=1e-6)


def test_first_minus_one_ends_the_list_and_mode0_has_no_causal_limit():
    (out, _, _), (q, qr, k, kr) = _tiny(sparse_mode=0, indices=[[5, -1, 2, 3], [0, 1, 2, 3]])
    torch.testing.assert_close(out[0, 0, 0], _dense(q[0, 0, 0], qr[0, 0, 0], k[0, :, 0], kr[0, :, 0], [5])[0])
    torch.testing.assert_close(out[0, 1, 0], _dense(q[0, 1, 0], qr[0, 1, 0], k[0, :, 0], kr[0, :, 0],
                                                    [0, 1, 2, 3])[0])


def test_only_the_first_ceil_threshold_entries_are_read():
    # q_len 4, kv_len 2: row 2 has threshold 1 -> one entry read; row 3 threshold 2.
    (out, smax, _), (q, qr, k, kr) = _tiny(q_len=4, kv_len=2, indices=[[0, 1], [0, 1], [1, 0], [1, 0]])
    assert out[0, :2].abs().max() == 0 and smax[0, 0, :2].abs().max() == 0  # rows before the diagonal
    assert out[0, 2].abs().max() == 0  # its single read entry (1) is beyond the limit
    torch.testing.assert_close(out[0, 3, 0], _dense(q[0, 3, 0], qr[0, 3, 0], k[0, :, 0], kr[0, :, 0], [1, 0])[0])


def test_empty_selection_with_sinks_gives_zero_output_and_sink_statistics():
    sinks = torch.tensor([0.7])
    (out, smax, ssum), _ = _tiny(indices=[[-1, -1], [-1, -1]], sinks=sinks)
    assert out.abs().max() == 0
    torch.testing.assert_close(smax, torch.full((1, 1, 2, 1), 0.7))
    torch.testing.assert_close(ssum, torch.ones(1, 1, 2, 1))


def test_sink_takes_probability_mass():
    sinks = torch.tensor([1.5])
    (out, smax, ssum), (q, qr, k, kr) = _tiny(sparse_mode=0, indices=[[0, 2], [0, 2]], sinks=sinks)
    scores = 0.05 * (k[0, [0, 2], 0] @ q[0, 0, 0] + kr[0, [0, 2], 0] @ qr[0, 0, 0])
    logits = torch.cat([scores, torch.tensor([1.5], dtype=F64)])
    p = torch.softmax(logits, 0)
    torch.testing.assert_close(out[0, 0, 0], p[:2] @ k[0, [0, 2], 0])
    torch.testing.assert_close(smax[0, 0, 0, 0].double(), logits.max(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Fake kernel / opcheck
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bsnd_causal_lengths", "tnd_causal", "tnd_paged_causal",
                                  "bsnd_single_head_no_lse"])
def test_fake_shapes_match_reference(name):
    args, kwargs, _ = build(**MODES[name])
    real = SFA(*args, **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        fake = SFA(*fake_args, **fake_kwargs)
    for r, f in zip(real, fake):
        assert tuple(r.shape) == tuple(f.shape) and r.dtype == f.dtype


def test_documented_output_shapes():
    args, kwargs, _ = build(layout_query="TND", layout_kv="TND", q_lens=(2, 3), kv_lens=(5, 5), heads=8)
    out, smax, ssum = SFA(*args, **kwargs)
    assert out.shape == (5, 8, D) and smax.shape == ssum.shape == (1, 5, 8)  # (N2, T, N1 / N2)
    args, kwargs, _ = build(heads=2)
    out, smax, ssum = SFA(*args, **kwargs)
    assert out.shape == (2, 3, 2, D) and smax.shape == ssum.shape == (2, 1, 3, 2)  # (B, N2, S1, N1 / N2)


@pytest.mark.parametrize("name", ["bsnd_causal_lengths", "bsnd_value_and_sinks", "tnd_paged_causal",
                                  "tnd_all_block2_sinks"])
def test_opcheck(name):
    args, kwargs, _ = build(**MODES[name])
    torch.library.opcheck(SFA, args, kwargs, test_utils=TEST_UTILS)


# ----------------------------------------------------------------------------
# Constraints
# ----------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


def base(**over):
    """A valid BSND call (B 2, S1 2, N1 2, S2 8, K 3), with overrides."""
    call = dict(query=_t(2, 2, 2, D), key=_t(2, 8, 1, D), value=None,
                sparse_indices=torch.zeros(2, 2, 1, 3, dtype=I32), scale_value=0.1,
                query_rope=_t(2, 2, 2, DR), key_rope=_t(2, 8, 1, DR), attention_mode=2)
    call.update(over)
    return call


def paged(**over):
    """A valid TND query / PA_BSND call (B 2, T 3, block_size 16)."""
    call = dict(query=_t(3, 2, D), key=_t(4, 16, 1, D), value=None,
                sparse_indices=torch.zeros(3, 1, 3, dtype=I32), scale_value=0.1,
                query_rope=_t(3, 2, DR), key_rope=_t(4, 16, 1, DR), attention_mode=2, layout_query="TND",
                layout_kv="PA_BSND", block_table=torch.tensor([[0, 1], [2, 3]], dtype=I32),
                actual_seq_lengths_query=torch.tensor([1, 3], dtype=I32),
                actual_seq_lengths_kv=torch.tensor([20, 5], dtype=I32))
    call.update(over)
    return call


def tnd(**over):
    call = dict(query=_t(3, 2, D), key=_t(5, 1, D), value=None, sparse_indices=torch.zeros(3, 1, 3, dtype=I32),
                scale_value=0.1, query_rope=_t(3, 2, DR), key_rope=_t(5, 1, DR), attention_mode=2,
                layout_query="TND", layout_kv="TND", actual_seq_lengths_query=torch.tensor([1, 3], dtype=I32),
                actual_seq_lengths_kv=torch.tensor([2, 5], dtype=I32))
    call.update(over)
    return call


# Shape/dtype-level rules: raised by the fake kernel too. id -> (call, argument named in the message).
SHAPE_RULES = {
    "layout_query": (base(layout_query="BNSD"), "layout_query"),
    "layout_kv_unknown": (base(layout_kv="BNSD"), "layout_kv"),
    "layout_kv_differs_from_query": (tnd(layout_kv="BSND", key=_t(2, 8, 1, D), key_rope=_t(2, 8, 1, DR)),
                                     "layout_kv"),
    # The schema default 0 is accepted (read as 2) only with both rope parts: alone it
    # is CANN's MHA/GQA mode, which SparseFlashAttention does not compute.
    "attention_mode_default_0_without_rope": (base(attention_mode=0, query_rope=None, key_rope=None),
                                              "attention_mode"),
    "attention_mode_default_0_without_key_rope": (base(attention_mode=0, key_rope=None), "attention_mode"),
    "attention_mode_1": (base(attention_mode=1), "attention_mode"),
    "sparse_mode_1": (base(sparse_mode=1), "sparse_mode"),
    "sparse_mode_4": (base(sparse_mode=4), "sparse_mode"),
    "pre_tokens": (base(pre_tokens=2048), "pre_tokens"),
    "next_tokens": (base(next_tokens=0), "next_tokens"),
    "sparse_block_size_not_power_of_two": (base(sparse_block_size=3), "sparse_block_size"),
    "sparse_block_size_zero": (base(sparse_block_size=0), "sparse_block_size"),
    "sparse_block_size_over_128": (base(sparse_block_size=256), "sparse_block_size"),
    "return_softmax_lse_with_paged_kv": (paged(return_softmax_lse=True), "return_softmax_lse"),
    "query_dtype": (base(query=_t(2, 2, 2, D, dtype=torch.int32)), "query.dtype"),
    "key_dtype": (base(key=_t(2, 8, 1, D, dtype=torch.float16)), "key.dtype"),
    "value_dtype": (base(value=_t(2, 8, 1, D, dtype=F64)), "value.dtype"),
    "sparse_indices_dtype": (base(sparse_indices=torch.zeros(2, 2, 1, 3, dtype=torch.int64)),
                             "sparse_indices.dtype"),
    "query_rope_missing": (base(query_rope=None), "query_rope"),
    "key_rope_missing": (base(key_rope=None), "key_rope"),
    "query_rope_dtype": (base(query_rope=_t(2, 2, 2, DR, dtype=F64)), "query_rope.dtype"),
    "key_rope_dtype": (base(key_rope=_t(2, 8, 1, DR, dtype=torch.float16)), "key_rope.dtype"),
    "actual_seq_lengths_query_dtype": (base(actual_seq_lengths_query=torch.tensor([2, 2])),
                                       "actual_seq_lengths_query.dtype"),
    "actual_seq_lengths_kv_dtype": (base(actual_seq_lengths_kv=torch.tensor([8, 8])), "actual_seq_lengths_kv.dtype"),
    "block_table_dtype": (paged(block_table=torch.tensor([[0, 1], [2, 3]])), "block_table.dtype"),
    "sinks_dtype": (base(sinks=_t(2, dtype=torch.float16)), "sinks.dtype"),
    "sinks_shape": (base(sinks=_t(1)), "sinks.shape"),
    "query_rank": (base(query=_t(4, 2, D)), "query.dim()"),
    "query_heads_not_power_of_two": (base(query=_t(2, 2, 3, D), query_rope=_t(2, 2, 3, DR)), "query head count N1"),
    "query_heads_over_128": (base(query=_t(1, 1, 256, D), query_rope=_t(1, 1, 256, DR), key=_t(1, 8, 1, D),
                                  key_rope=_t(1, 8, 1, DR), sparse_indices=torch.zeros(1, 1, 1, 3, dtype=I32)),
                             "query head count N1"),
    "query_head_dim_not_512": (base(query=_t(2, 2, 2, 128)), "query head dim D"),
    "tnd_without_query_lengths": (tnd(actual_seq_lengths_query=None), "actual_seq_lengths_query"),
    "query_lengths_count": (base(actual_seq_lengths_query=torch.tensor([2], dtype=I32)), "actual_seq_lengths_query"),
    "query_lengths_rank": (base(actual_seq_lengths_query=torch.tensor([[2, 2]], dtype=I32)),
                           "actual_seq_lengths_query.dim()"),
    "query_rope_dim_not_64": (base(query_rope=_t(2, 2, 2, 32)), "query_rope.shape"),
    "query_rope_heads": (base(query_rope=_t(2, 2, 1, DR)), "query_rope.shape"),
    "key_rank": (base(key=_t(16, 1, D)), "key.dim()"),
    "key_heads_not_1": (base(key=_t(2, 8, 2, D), key_rope=_t(2, 8, 2, DR)), "key head count N2"),
    "key_head_dim_not_512": (base(key=_t(2, 8, 1, 256)), "key head dim D"),
    "value_shape": (base(value=_t(2, 7, 1, D)), "value.shape"),
    "key_rope_dim_not_64": (base(key_rope=_t(2, 8, 1, 128)), "key_rope.shape"),
    "key_rope_seq": (base(key_rope=_t(2, 7, 1, DR)), "key_rope.shape"),
    "key_batch": (base(key=_t(3, 8, 1, D), key_rope=_t(3, 8, 1, DR)), "key.shape[0]"),
    "kv_lengths_count": (base(actual_seq_lengths_kv=torch.tensor([8, 8, 8], dtype=I32)), "actual_seq_lengths_kv"),
    "tnd_kv_without_lengths": (tnd(actual_seq_lengths_kv=None), "actual_seq_lengths_kv"),
    "block_table_without_paged_kv": (base(block_table=torch.zeros(2, 1, dtype=I32)), "block_table"),
    "paged_without_block_table": (paged(block_table=None), "block_table"),
    "paged_without_kv_lengths": (paged(actual_seq_lengths_kv=None), "actual_seq_lengths_kv"),
    "block_table_rank": (paged(block_table=torch.zeros(4, dtype=I32)), "block_table.dim()"),
    "block_table_batch": (paged(block_table=torch.zeros(3, 2, dtype=I32)), "block_table.shape[0]"),
    "block_size_not_multiple_of_16": (paged(key=_t(4, 24, 1, D), key_rope=_t(4, 24, 1, DR)), "block_size"),
    "block_size_over_1024": (paged(key=_t(1, 2048, 1, D), key_rope=_t(1, 2048, 1, DR)), "block_size"),
    "sparse_block_size_must_divide_block_size": (paged(sparse_block_size=32), "sparse_block_size"),
    "sparse_indices_rank": (base(sparse_indices=torch.zeros(2, 2, 3, dtype=I32)), "sparse_indices.dim()"),
    "sparse_indices_shape": (base(sparse_indices=torch.zeros(2, 3, 1, 3, dtype=I32)), "sparse_indices.shape"),
    "sparse_indices_kv_heads": (base(sparse_indices=torch.zeros(2, 2, 2, 3, dtype=I32)), "sparse_indices.shape"),
    "sparse_size_zero": (base(sparse_indices=torch.zeros(2, 2, 1, 0, dtype=I32)), "sparse_indices.shape[-1]"),
}

# Rules on the values of index/length tensors: the reference kernel only.
DATA_RULES = {
    "query_lengths_over_s1": (base(actual_seq_lengths_query=torch.tensor([3, 1], dtype=I32)),
                              "actual_seq_lengths_query"),
    "query_lengths_negative": (base(actual_seq_lengths_query=torch.tensor([-1, 1], dtype=I32)),
                               "actual_seq_lengths_query"),
    "tnd_query_lengths_not_cumulative": (tnd(actual_seq_lengths_query=torch.tensor([3, 1], dtype=I32)),
                                         "actual_seq_lengths_query"),
    "tnd_query_lengths_last_not_t": (tnd(actual_seq_lengths_query=torch.tensor([1, 2], dtype=I32)),
                                     "actual_seq_lengths_query"),
    "kv_lengths_over_s2": (base(actual_seq_lengths_kv=torch.tensor([9, 1], dtype=I32)), "actual_seq_lengths_kv"),
    "tnd_kv_lengths_last_not_t": (tnd(actual_seq_lengths_kv=torch.tensor([2, 4], dtype=I32)),
                                  "actual_seq_lengths_kv"),
    "paged_kv_lengths_over_table": (paged(actual_seq_lengths_kv=torch.tensor([33, 5], dtype=I32)),
                                    "actual_seq_lengths_kv"),
    "paged_block_id_out_of_range": (paged(block_table=torch.tensor([[0, 9], [2, 3]], dtype=I32)), "block_table"),
    "sparse_indices_below_minus_one": (base(sparse_indices=torch.full((2, 2, 1, 3), -2, dtype=I32)),
                                       "sparse_indices"),
}


def _call(call):
    call = dict(call)
    args = [call.pop(name) for name in ("query", "key", "value", "sparse_indices", "scale_value")]
    return SFA(*args, **call)


@pytest.mark.parametrize("name", list(SHAPE_RULES) + list(DATA_RULES))
def test_constraint_raises(name):
    call, argument = {**SHAPE_RULES, **DATA_RULES}[name]
    with pytest.raises(NpuAttnArgumentError, match=re.escape(argument)):
        _call(call)


@pytest.mark.parametrize("name", list(SHAPE_RULES))
def test_constraint_raises_under_fake_tensor_mode(name):
    call, argument = SHAPE_RULES[name]
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
        with pytest.raises(NpuAttnArgumentError, match=re.escape(argument)):
            _call(fake)


def test_valid_baselines_do_not_raise():
    for call in (base(), paged(), tnd()):
        out, smax, ssum = _call(call)
        assert out.shape == call["query"].shape and smax.shape == ssum.shape == (0,)


# ----------------------------------------------------------------------------
# attention_mode 0 (the torch_npu 2.13 schema's default)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bsnd_causal_lengths", "bsnd_value_and_sinks", "tnd_paged_causal",
                                  "tnd_all_block2_sinks"])
def test_default_attention_mode_0_with_rope_is_mla_absorb(name):
    """0 with query_rope and key_rope is read as 2: the same three outputs, and the
    2.13 form called without attention_mode at all (its default) works."""
    args, kwargs, _ = build(**MODES[name])
    mode2 = SFA(*args, **kwargs)
    mode0 = SFA(*args, **{**kwargs, "attention_mode": 0})
    kwargs.pop("attention_mode")
    default = npu_sparse_flash_attention(*args, **kwargs)
    for a, b, c in zip(mode2, mode0, default):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_attention_mode_0_is_the_schema_default():
    import inspect

    schema = {a.name: a for a in SFA._schema.arguments}
    assert schema["attention_mode"].default_value == 0
    assert inspect.signature(npu_sparse_flash_attention).parameters["attention_mode"].default == 0


@pytest.mark.parametrize("mode", [1, 3, -1])
def test_attention_modes_other_than_0_and_2_are_refused(mode):
    with pytest.raises(NpuAttnArgumentError, match=r"^npu_sparse_flash_attention: attention_mode must be 2"):
        _call(base(attention_mode=mode))


def test_attention_mode_0_without_rope_names_the_remedy():
    with pytest.raises(NpuAttnArgumentError) as info:
        _call(base(attention_mode=0, query_rope=None, key_rope=None))
    msg = str(info.value)
    assert msg.startswith("npu_sparse_flash_attention: attention_mode 0 without query_rope/key_rope is CANN's "
                          "MHA/GQA mode"), msg
    assert "pass query_rope and key_rope" in msg and msg.endswith("got 0"), msg


@pytest.mark.parametrize("ropes,handed", [(True, 2), (False, 0)])
def test_npu_kernel_hands_torch_npu_mode_2_for_the_default(monkeypatch, ropes, handed):
    """On an Ascend host the kernel calls torch_npu, whose CANN op refuses every mode but
    2: the default 0 with rope parts goes there as 2; without rope parts it goes as 0
    (and CANN refuses it, as the reference does)."""
    import sys
    import types

    from npu_attn_graph.kernels import sparse_flash_attention as module

    seen = {}
    fake = types.ModuleType("torch_npu")
    fake.npu_sparse_flash_attention = lambda *args, **kwargs: seen.update(kwargs) or "ran"
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    call = base(attention_mode=0) if ropes else base(attention_mode=0, query_rope=None, key_rope=None)
    args = [call.pop(name) for name in ("query", "key", "value", "sparse_indices", "scale_value")]
    assert module._npu(*args, **call) == "ran"
    assert seen["attention_mode"] == handed


# ----------------------------------------------------------------------------
# The seeds' form: custom.npu_sparse_flash_attention (seed 004)
# ----------------------------------------------------------------------------

SEED_004_PROTOTYPE = (
    "custom.npu_sparse_flash_attention(Tensor query, Tensor key, Tensor value, Tensor sparse_indices, "
    "float scale_value, int sparse_block_size, *, Tensor? block_table=None, Tensor? actual_seq_lengths_query=None, "
    "Tensor? actual_seq_lengths_kv=None, Tensor? query_rope=None, Tensor? key_rope=None, str layout_query='BSND', "
    "str layout_kv='BSND', int sparse_mode=3) -> Tensor")


def _custom():
    from npu_attn_graph import ops

    return ops.custom.npu_sparse_flash_attention


def test_seed_004_prototype_is_quoted_from_the_seed():
    from pathlib import Path

    seeds = sorted((Path(__file__).resolve().parents[1].parent / "shared" / "seeds").glob("004_*.txt"))
    if not seeds:
        pytest.skip("shared/seeds is not beside this checkout")
    assert SEED_004_PROTOTYPE in seeds[0].read_text()


def test_custom_form_has_the_seed_signature():
    """Names, order, positional/keyword-only split and defaults exactly as seed 004 lists them."""
    from test_schemas import assert_signature_matches

    schema = torch._C.parse_schema(SEED_004_PROTOTYPE.replace("custom.", "custom::", 1))
    assert len(schema.returns) == 1
    assert_signature_matches(_custom(), schema)


def _seed_example_inputs():
    """Seed 004's example (its "调用示例" links to cann-recipes-infer
    ops/ascendc/examples/test_npu_sparse_flash_attention.py, test_sfa_eager/test_sfa_graph):
    these shapes, dtypes, value ranges and arguments, drawn with torch instead of numpy."""
    g = torch.Generator().manual_seed(21)
    uniform = lambda low, high, *shape: torch.empty(shape, dtype=F64).uniform_(low, high, generator=g)  # noqa: E731
    query = uniform(-10, 10, 4, 1, 128, 512).to(torch.float16)
    key = uniform(-5, 10, 4, 8192, 1, 512).to(torch.float16)
    value = key.clone()
    sparse_indices = uniform(0, 16, 4, 1, 1, 2048).to(torch.int32)
    query_rope = uniform(-10, 10, 4, 1, 128, 64).to(torch.float16)
    key_rope = uniform(-10, 10, 4, 8192, 1, 64).to(torch.float16)
    act_seq_q = torch.tensor([1] * 4).to(torch.int32)
    act_seq_kv = torch.tensor([4096] * 4).to(torch.int32)
    return query, key, value, sparse_indices, query_rope, key_rope, act_seq_q, act_seq_kv


def _seed_example_golden(query, key, value, sparse_indices, scale_value, query_rope, key_rope):
    """The example's CPU golden for its inputs (one query token per batch, every index
    below the causal limit 4096, no -1): concatenate the rope parts, gather the
    indexed tokens (duplicates included), softmax(scale * q.k) @ v, in fp32."""
    out = torch.zeros(query.shape, dtype=torch.float32)
    for b in range(query.shape[0]):
        idx = sparse_indices[b, 0, 0].long()
        q = torch.cat([query[b, 0], query_rope[b, 0]], -1).float()  # (N1, 576)
        k = torch.cat([key[b, idx, 0], key_rope[b, idx, 0]], -1).float()  # (K, 576)
        out[b, 0] = torch.softmax(q @ k.T * scale_value, -1) @ value[b, idx, 0].float()
    return out


def _example_precision_holds(got, golden):
    # The example's own criterion: np.isclose(rtol=0.005, atol=0.0001) on > 99% of the values.
    return torch.isclose(got.float(), golden, rtol=0.005, atol=0.0001).float().mean().item() > 0.99


def test_seed_004_example_eager():
    query, key, value, sparse_indices, query_rope, key_rope, act_seq_q, act_seq_kv = _seed_example_inputs()
    scale_value = 0.041666666666666664
    sparse_block_size = 1
    npu_out = _custom()(
        query, key, value, sparse_indices, scale_value, sparse_block_size,
        actual_seq_lengths_query=act_seq_q, actual_seq_lengths_kv=act_seq_kv,
        query_rope=query_rope, key_rope=key_rope,
        layout_query='BSND', layout_kv='BSND', sparse_mode=3, block_table=None)
    assert isinstance(npu_out, torch.Tensor)
    assert npu_out.shape == query.shape and npu_out.dtype == torch.float16
    golden = _seed_example_golden(query, key, value, sparse_indices, scale_value, query_rope, key_rope)
    assert _example_precision_holds(npu_out, golden)
    # The same call in the 2.13 form: its first output, bit for bit.
    first, smax, ssum = npu_sparse_flash_attention(
        query, key, value, sparse_indices, scale_value, actual_seq_lengths_query=act_seq_q,
        actual_seq_lengths_kv=act_seq_kv, query_rope=query_rope, key_rope=key_rope,
        sparse_block_size=sparse_block_size, layout_query="BSND", layout_kv="BSND", sparse_mode=3)
    assert torch.equal(npu_out, first) and smax.shape == ssum.shape == (0,)


def test_seed_004_example_graph_fullgraph():
    """The example's graph test: a module whose forward makes the call, compiled with
    fullgraph=True (on CPU, aot_eager: the reference kernel runs), one op in the graph."""
    import torch.nn as nn

    query, key, value, sparse_indices, query_rope, key_rope, act_seq_q, act_seq_kv = _seed_example_inputs()
    custom = _custom()

    class Network(nn.Module):
        def forward(self, query, key, value, sparse_indices, scale_value, sparse_block_size,
                    actual_seq_lengths_query, actual_seq_lengths_kv,
                    query_rope, key_rope, layout_query, layout_kv,
                    sparse_mode, block_table):
            out1 = custom(query, key, value,
                          sparse_indices, scale_value, sparse_block_size,
                          actual_seq_lengths_query=actual_seq_lengths_query,
                          actual_seq_lengths_kv=actual_seq_lengths_kv,
                          query_rope=query_rope, key_rope=key_rope,
                          layout_query=layout_query, layout_kv=layout_kv, sparse_mode=sparse_mode,
                          block_table=block_table)
            return out1

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    torch._dynamo.reset()
    mod = torch.compile(Network(), backend=backend, fullgraph=True)
    npu_out = mod(query, key, value, sparse_indices, 0.041666666666666664, 1,
                  actual_seq_lengths_query=act_seq_q, actual_seq_lengths_kv=act_seq_kv,
                  query_rope=query_rope, key_rope=key_rope,
                  layout_query='BSND', layout_kv='BSND', sparse_mode=3, block_table=None)
    golden = _seed_example_golden(query, key, value, sparse_indices, 0.041666666666666664, query_rope, key_rope)
    assert _example_precision_holds(npu_out, golden)
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function"
             and "npu_sparse_flash_attention" in str(n.target)]
    assert len(calls) == 1, graphs[0].graph
    assert calls[0].kwargs.get("attention_mode") == 2


@pytest.mark.parametrize("name", ["bsnd_causal_lengths", "bsnd_all_no_lengths", "tnd_all_block2_sinks",
                                  "tnd_paged_causal", "bsnd_paged_block8_value"])
def test_custom_form_equals_the_2_13_forms_first_output(name):
    args, kwargs, _ = build(**{**MODES[name], "with_value": True, "with_sinks": False})
    query, key, value, sparse_indices, scale = args
    custom = _custom()(
        query, key, value, sparse_indices, scale, kwargs["sparse_block_size"], block_table=kwargs["block_table"],
        actual_seq_lengths_query=kwargs["actual_seq_lengths_query"],
        actual_seq_lengths_kv=kwargs["actual_seq_lengths_kv"], query_rope=kwargs["query_rope"],
        key_rope=kwargs["key_rope"], layout_query=kwargs["layout_query"], layout_kv=kwargs["layout_kv"],
        sparse_mode=kwargs["sparse_mode"])
    first = SFA(*args, **{**kwargs, "sinks": None})[0]
    assert isinstance(custom, torch.Tensor)
    torch.testing.assert_close(custom, first, rtol=0, atol=0)


@pytest.mark.parametrize("dynamic", [False, True])
def test_custom_form_under_torch_compile_fullgraph(dynamic):
    args, kwargs, _ = build(**{**MODES["tnd_paged_causal"], "with_value": True})
    query, key, value, sparse_indices, scale = args
    custom = _custom()

    def fn(query, key, value, sparse_indices, block_table, q_lens, kv_lens, query_rope, key_rope):
        return custom(query, key, value, sparse_indices, scale, 1, block_table=block_table,
                      actual_seq_lengths_query=q_lens, actual_seq_lengths_kv=kv_lens, query_rope=query_rope,
                      key_rope=key_rope, layout_query="TND", layout_kv="PA_BSND", sparse_mode=3)

    inputs = (query, key, value, sparse_indices, kwargs["block_table"], kwargs["actual_seq_lengths_query"],
              kwargs["actual_seq_lengths_kv"], kwargs["query_rope"], kwargs["key_rope"])
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=0, atol=0)


def _custom_call(**over):
    call = dict(query=_t(2, 2, 2, D), key=_t(2, 8, 1, D), value=_t(2, 8, 1, D),
                sparse_indices=torch.zeros(2, 2, 1, 3, dtype=I32), scale_value=0.1, sparse_block_size=1,
                query_rope=_t(2, 2, 2, DR), key_rope=_t(2, 8, 1, DR))
    call.update(over)
    args = [call.pop(name) for name in ("query", "key", "value", "sparse_indices", "scale_value",
                                        "sparse_block_size")]
    return args, call


# id -> (overrides, message start after the op name)
CUSTOM_RULES = {
    "query_not_a_tensor": (dict(query=[0.0]), "custom.npu_sparse_flash_attention: query must be a Tensor"),
    "value_none": (dict(value=None), "custom.npu_sparse_flash_attention: value is a required Tensor"),
    "sparse_block_size_float": (dict(sparse_block_size=1.0), "custom.npu_sparse_flash_attention: "
                                "sparse_block_size must be an int"),
    "sparse_block_size_bool": (dict(sparse_block_size=True), "custom.npu_sparse_flash_attention: "
                               "sparse_block_size must be an int"),
    "query_rope_missing": (dict(query_rope=None), "custom.npu_sparse_flash_attention: query_rope is required"),
    "key_rope_missing": (dict(key_rope=None), "custom.npu_sparse_flash_attention: key_rope is required"),
    # The op's own rules, raised by the kernel the form maps onto.
    "sparse_mode_1": (dict(sparse_mode=1), "npu_sparse_flash_attention: sparse_mode must be 0"),
    "sparse_block_size_3": (dict(sparse_block_size=3), "npu_sparse_flash_attention: sparse_block_size must be"),
    "layout_query": (dict(layout_query="BNSD"), "npu_sparse_flash_attention: layout_query must be one of"),
    "head_dim": (dict(query=_t(2, 2, 2, 128)), "npu_sparse_flash_attention: query head dim D must be 512"),
}


@pytest.mark.parametrize("name", list(CUSTOM_RULES))
@pytest.mark.parametrize("fake", [False, True])
def test_custom_form_constraints(name, fake):
    over, start = CUSTOM_RULES[name]
    args, kwargs = _custom_call(**over)
    if fake:
        mode = FakeTensorMode()
        to_fake = lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
        args, kwargs = [to_fake(a) for a in args], {k: to_fake(v) for k, v in kwargs.items()}
        with mode, pytest.raises(NpuAttnArgumentError) as info:
            _custom()(*args, **kwargs)
    else:
        with pytest.raises(NpuAttnArgumentError) as info:
            _custom()(*args, **kwargs)
    msg = str(info.value)
    assert msg.startswith(start), msg
    assert ", got " in msg, msg  # argument, rule and value
