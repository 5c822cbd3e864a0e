"""The reference kernels' fast path for plain paged decode (kernels/_paged_decode.py):
one gather of every sequence's blocks, unread slots masked (scores) and zeroed (values), two
batched matmuls.

Checked against the independent fp64 oracle (tests/oracle.py) and against the general
path of the same kernel (the chunked core, forced by making the call ineligible), with
the path taken asserted through ``_paged_decode.PATHS``: caches of rank 3 and 4, GQA,
fp32/fp16/bf16, tables padded with -1, garbage or a real block (as the mini-vLLM engine
pads), lengths of 0, of a partial block and of whole blocks; NaN/inf in every unread
slot and block change nothing, bit for bit; calls the fast path does not take (a mask,
softmax_lse, S > 1, over the memory budget) go the general way; a bad used table entry
is still an error naming it.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from npu_attn_graph.kernels import _library, _paged_decode
from npu_attn_graph.kernels.fused_infer_attention_score import npu_fused_infer_attention_score as fia
from npu_attn_graph.kernels.incre_flash_attention import npu_incre_flash_attention as ifa
from npu_attn_graph.kernels._library import NpuAttnArgumentError

import fast_paths
from fast_paths import assert_matches
from oracle import fia_oracle, ifa_oracle

general = functools.partial(fast_paths.general, _paged_decode)
taken = functools.partial(fast_paths.taken, _paged_decode)

FP32, FP16, BF16 = fast_paths.FP32, fast_paths.FP16, fast_paths.BF16
I32 = torch.int32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(11)


def paged(lens, nkv, d, bs, rank, fill, dtype=FP32, poison=None, table_fill="-1"):
    """(key cache, value cache, table, dense K, dense V): each sequence's tokens in shuffled
    blocks; every other slot (the rest of a last block, blocks no table uses) holds
    `poison` (random values when None); table entries past a sequence's need hold -1,
    garbage ids, or the last block (an engine's scratch block)."""
    need = [math.ceil(n / bs) for n in lens]
    num_blocks = sum(need) + 3
    width = max(max(need), 1) + 1
    if table_fill == "-1":
        table = torch.full((len(lens), width), -1, dtype=I32)
    elif table_fill == "garbage":
        table = torch.randint(-7, 10**6, (len(lens), width), dtype=I32)
    else:
        table = torch.full((len(lens), width), num_blocks - 1, dtype=I32)
    ids = torch.randperm(num_blocks - 1).to(I32)
    used = 0
    for b, k in enumerate(need):
        table[b, :k] = ids[used:used + k]
        used += k
    longest = max(max(lens), 1)
    dense = [torch.randn(len(lens), nkv, longest, d).to(dtype) for _ in range(2)]
    caches = []
    for x in dense:
        cache = torch.randn(num_blocks, nkv, bs, d).to(dtype)
        if poison is not None:
            cache.fill_(poison)
        for b, n in enumerate(lens):
            for t in range(n):
                cache[int(table[b, t // bs]), :, t % bs] = x[b, :, t]
        if rank == 3:
            cache = cache.permute(0, 2, 1, 3).reshape(num_blocks, bs, nkv * d).contiguous()
        caches.append(cache)
    return caches[0], caches[1], table


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("table_fill", ["-1", "garbage", "block"])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("rank", [3, 4])
def test_ifa_fast_path_equals_oracle_and_general_path(rank, gqa, table_fill, dtype):
    n, d, bs = 8, 16, 16
    nkv = n // gqa
    lens = [17, 48, 0, 5, 32]  # partial, whole blocks, empty
    layout = "BNSD" if rank == 4 else "BSH"
    k, v, table = paged(lens, nkv, d, bs, rank, None, dtype, table_fill=table_fill)
    q = torch.randn(len(lens), n, 1, d).to(dtype)
    if layout == "BSH":
        q = q.reshape(len(lens), 1, n * d)
    kw = dict(num_heads=n, num_key_value_heads=nkv, input_layout=layout, scale_value=0.3,
              actual_seq_lengths=lens, block_table=table, block_size=bs)
    out = fast_paths.fast_equals_oracle_and_general(_paged_decode, ifa, ifa_oracle, q, k, v, **kw)
    assert not out.view(len(lens), -1)[2].any()  # length 0: zeros


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_BSND"])
def test_fia_fast_path_layouts(layout):
    b, n, nkv, d, bs = 3, 4, 2, 32, 16
    lens = [1, 31, 16]
    rank = 4 if layout.startswith("BNSD") else 3
    k, v, table = paged(lens, nkv, d, bs, rank, None, table_fill="block")
    base = layout.split("_")[0]
    q = torch.randn({"BSH": (b, 1, n * d), "BSND": (b, 1, n, d), "BNSD": (b, n, 1, d)}[base])
    kw = dict(num_heads=n, num_key_value_heads=nkv, input_layout=layout, scale=0.2, actual_seq_lengths_kv=lens,
              block_table=table, block_size=bs)
    (out, lse), path = taken(fia, q, k, v, **kw)
    assert path == "fast"
    expected, _ = fia_oracle(q, k, v, **kw)
    assert_matches(out, expected)
    assert lse.shape == (1,) and lse.item() == 0
    (slow, _), _ = taken(general, fia, q, k, v, **kw)
    torch.testing.assert_close(out, slow, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("table_fill", ["-1", "garbage", "block"])
@pytest.mark.parametrize("rank", [3, 4])
def test_unread_slots_and_blocks_change_nothing(rank, table_fill):
    n, nkv, d, bs = 4, 2, 16, 16
    lens = [3, 40, 0, 16]
    layout = "BNSD" if rank == 4 else "BSH"
    q = torch.randn(len(lens), n, 1, d)
    if layout == "BSH":
        q = q.reshape(len(lens), 1, n * d)
    outs = []
    for poison in (0.0, float("nan"), float("inf"), float("-inf")):
        torch.manual_seed(3)  # the same blocks and values each time; only the poison differs
        k, v, table = paged(lens, nkv, d, bs, rank, None, poison=poison, table_fill=table_fill)
        out, path = taken(ifa, q, k, v, num_heads=n, num_key_value_heads=nkv, input_layout=layout,
                          scale_value=0.25, actual_seq_lengths=lens, block_table=table, block_size=bs)
        assert path == "fast" and not out.isnan().any()
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_other_calls_take_the_general_path(monkeypatch):
    b, n, nkv, d, bs = 2, 4, 2, 16, 16
    lens = [9, 20]
    k, v, table = paged(lens, nkv, d, bs, 4, None, table_fill="block")
    q = torch.randn(b, n, 1, d)
    kw = dict(num_heads=n, num_key_value_heads=nkv, input_layout="BNSD", actual_seq_lengths_kv=lens,
              block_table=table, block_size=bs)
    for extra in (dict(softmax_lse_flag=True), dict(atten_mask=torch.zeros(b, 1, 1, table.shape[1] * bs,
                                                                            dtype=torch.bool))):
        (out, _), path = taken(fia, q, k, v, **kw, **extra)
        assert path == "general"
        assert_matches(out, fia_oracle(q, k, v, **kw, **extra)[0])
    q5 = torch.randn(b, n, 5, d)
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    (out, _), path = taken(fia, q5, k, v, **kw, atten_mask=mask, sparse_mode=3)
    assert path == "general"
    monkeypatch.setattr(_library, "SCORE_BLOCK_BYTES", 1024)  # the gathered K/V over the budget
    (out, _), path = taken(fia, q, k, v, **kw)
    assert path == "general"
    assert_matches(out, fia_oracle(q, k, v, **kw)[0])


def test_bad_used_block_id_is_still_named():
    n, nkv, d, bs = 4, 2, 16, 16
    lens = [20, 5]
    k, v, table = paged(lens, nkv, d, bs, 3, None, table_fill="-1")
    table[1, 0] = k.shape[0]  # a used entry past the cache
    with pytest.raises(NpuAttnArgumentError, match=r"block_table\[1\]\[0\] = " + str(k.shape[0])):
        ifa(torch.randn(2, 1, n * d), k, v, num_heads=n, num_key_value_heads=nkv, actual_seq_lengths=lens,
            block_table=table, block_size=bs)


def test_the_step_plan_is_shared_by_a_steps_calls_and_follows_table_writes():
    # (That the plan goes with its table: tests/test_backend_inductor.py, the engine under Inductor.)
    lens, n, nkv, d, bs = [5, 20], 4, 2, 16, 16
    k, v, table = paged(lens, nkv, d, bs, 3, None)
    q = torch.randn(len(lens), 1, n * d)
    kw = dict(num_heads=n, num_key_value_heads=nkv, input_layout="BSH", scale_value=0.3,
              actual_seq_lengths=lens, block_size=bs)
    first, _ = taken(ifa, q, k, v, block_table=table, **kw)
    memo = dict(_library._MEMO)
    second, _ = taken(ifa, q, k, v, block_table=table, **kw)  # another layer: the same plan
    assert _library._MEMO == memo and torch.equal(first, second)
    table[1, :2] = table[1, :2].flip(0)  # written in place: a new version, a new plan
    third, _ = taken(ifa, q, k, v, block_table=table, **kw)
    assert not torch.equal(first[1], third[1]) and torch.equal(first[0], third[0])
    assert_matches(third, ifa_oracle(q, k, v, block_table=table, **kw))


def test_validation_is_remembered_per_signature_and_a_failing_call_raises_every_time():
    """The reference kernels validate once per call signature (shapes, strides, dtypes,
    devices, host values but the lengths'): a decode step repeats one in every layer, and
    only its lengths change from step to step. The rules on the lengths' values run on
    every call."""
    from npu_attn_graph.kernels import _inference
    from npu_attn_graph.kernels.incre_flash_attention import _call

    q, cache, table = torch.randn(2, 2, 1, 16), torch.randn(4, 16, 16), torch.tensor([[0, 1], [2, 3]], dtype=I32)
    kw = dict(num_heads=2, input_layout="BNSD", num_key_value_heads=1, block_size=16)
    first = _inference.validated(_call(q, cache, cache, block_table=table, actual_seq_lengths=[5, 20], **kw))
    again = _inference.validated(_call(q.clone(), cache, cache.clone(), block_table=table.clone(),
                                       actual_seq_lengths=[5, 20], **kw))
    assert again is first  # equal signature: remembered
    # New lengths (the next decode step): remembered, their values checked on their own.
    assert _inference.validated(_call(q, cache, cache, block_table=table, actual_seq_lengths=[5, 32], **kw)) is first
    strided = torch.randn(4, 16, 32)[..., :16]  # another stride: validated again
    assert _inference.validated(_call(q, strided, strided, block_table=table, actual_seq_lengths=[5, 20],
                                      **kw)) is not first
    for _ in range(2):  # past the table's capacity (2 blocks of 16): raised, never remembered
        with pytest.raises(NpuAttnArgumentError, match="block_table.shape\\[1\\]"):
            _inference.validated(_call(q, cache, cache, block_table=table, actual_seq_lengths=[5, 33], **kw))
    with pytest.raises(NpuAttnArgumentError, match="block_table.dtype"):
        _inference.validated(_call(q, cache, cache, block_table=table.long(), actual_seq_lengths=[5, 20], **kw))
    with pytest.raises(NpuAttnArgumentError, match="entries must be >= 0"):
        _inference.validated(_call(q, cache, cache, block_table=table, actual_seq_lengths=[5, -1], **kw))
    other = _inference.validated(_call(q, cache, cache, block_table=table, actual_seq_lengths=[5, 20, 7], **kw))
    assert other is not first and other == first  # another count of lengths: validated again


def test_dense_lengths_are_checked_on_every_call_after_their_signature_is_remembered():
    """A dense decode call's lengths leave the signature, so a remembered signature must not
    let a length past the cache, or a negative one, through."""
    from npu_attn_graph.kernels import _inference
    from npu_attn_graph.kernels.incre_flash_attention import _call

    q, cache = torch.randn(2, 2, 1, 16), torch.randn(2, 1, 24, 16)
    kw = dict(num_heads=2, input_layout="BNSD", num_key_value_heads=1)
    first = _inference.validated(_call(q, cache, cache, actual_seq_lengths=[5, 20], **kw))
    assert _inference.validated(_call(q, cache, cache, actual_seq_lengths=[24, 1], **kw)) is first
    for lengths, rule in (([5, 25], "must be <= the key/value sequence length 24"), ([-2, 3], "must be >= 0"),
                          ([25], "must be <= the key/value sequence length 24")):
        with pytest.raises(NpuAttnArgumentError, match=rule):
            _inference.validated(_call(q, cache, cache, actual_seq_lengths=lengths, **kw))
