"""Every documented argument constraint of the three inference attention ops raises
NpuAttnArgumentError naming the argument -- in eager mode and, with the same
message, from the fake kernel under FakeTensorMode."""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import npu_attn_graph.kernels  # noqa: F401
from npu_attn_graph.kernels._library import NpuAttnArgumentError

PFA = torch.ops.npu_attn.npu_prompt_flash_attention.default
IFA = torch.ops.npu_attn.npu_incre_flash_attention.default
FIA = torch.ops.npu_attn.npu_fused_infer_attention_score.default

F16, F32, I8 = torch.float16, torch.float32, torch.int8
MASK2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def r(*shape, dtype=F32):
    return torch.randn(*shape).to(dtype)


def i8(*shape):
    return torch.randint(-128, 128, shape, dtype=I8)


def bsh(b=2, s=6, skv=9, n=4, nkv=None, d=16, dtype=F32, kv_dtype=None):
    nkv = nkv or n
    kv_dtype = kv_dtype or dtype
    make_kv = (lambda *sh: i8(*sh)) if kv_dtype == I8 else (lambda *sh: r(*sh, dtype=kv_dtype))
    return r(b, s, n * d, dtype=dtype), make_kv(b, skv, nkv * d), make_kv(b, skv, nkv * d)


def bnsd(b=2, s=6, skv=9, n=4, nkv=None, d=16, dtype=F32):
    nkv = nkv or n
    return r(b, n, s, d, dtype=dtype), r(b, nkv, skv, d, dtype=dtype), r(b, nkv, skv, d, dtype=dtype)


def tnd(q_total=9, kv_total=12, n=4, d=16):
    return r(q_total, n, d), r(kv_total, n, d), r(kv_total, n, d)


def paged(rank=3, blocks=4, bs=16, nkv=4, d=16, dtype=F32):
    shape = (blocks, bs, nkv * d) if rank == 3 else (blocks, nkv, bs, d)
    make = (lambda: torch.randint(-128, 128, shape, dtype=I8)) if dtype == I8 else (lambda: r(*shape, dtype=dtype))
    return make(), make()


def table(b=2, width=2, dtype=torch.int32):
    return torch.arange(b * width).reshape(b, width).to(dtype)


# Each case: id -> (op, query/key/value, kwargs, argument name expected in the message).
CASES = {}


def case(name, op, qkv, match, **kwargs):
    assert name not in CASES, name
    CASES[name] = (op, qkv, kwargs, match)


# --- heads and head dim ---------------------------------------------------------
for op, extra in ((PFA, {}), (IFA, {}), (FIA, {})):
    s = 1 if op is IFA else 6
    tag = {PFA: "pfa", IFA: "ifa", FIA: "fia"}[op]
    case(f"{tag}-head_dim_not_multiple_of_16", op, bsh(s=s, d=24), "query head_dim (D) must be a multiple of 16",
         num_heads=4)
    case(f"{tag}-head_dim_over_512", op, bsh(s=s, n=1, d=528), "query head_dim (D) must be <= 512", num_heads=1)
    case(f"{tag}-heads_not_divisible", op, bsh(s=s, n=4, nkv=2, d=16), "num_heads must be divisible", num_heads=4,
         num_key_value_heads=3)
    case(f"{tag}-gqa_ratio_over_64", op, bsh(s=s, n=128, nkv=1), "num_heads / num_key_value_heads",
         num_heads=128, num_key_value_heads=1)
    case(f"{tag}-num_heads_over_256", op, bsh(s=2 if op is not IFA else 1, skv=2, n=272), "num_heads must be <= 256",
         num_heads=272)
    case(f"{tag}-num_heads_not_positive", op, bsh(s=s), "num_heads must be positive", num_heads=0)
    case(f"{tag}-bad_input_layout", op, bsh(s=s), "input_layout must be one of", num_heads=4, input_layout="SBH")
    case(f"{tag}-sparse_or_dequant_scale1_with_float_query", op, bsh(s=s),
         ("deq_scale1" if op is PFA else "dequant_scale1") + " must be None unless", num_heads=4,
         **{"deq_scale1" if op is PFA else "dequant_scale1": torch.tensor([1.0])})
    case(f"{tag}-quant_scale1_with_float_query", op, bsh(s=s), "quant_scale1 must be None unless query is int8", num_heads=4,
         quant_scale1=torch.tensor([1.0]))
    case(f"{tag}-quant_scale2_wrong_numel", op, bsh(s=s), "quant_scale2 must have 1 element (per-tensor) or N*D", num_heads=4,
         quant_scale2=torch.ones(7))
    case(f"{tag}-quant_offset2_without_scale2", op, bsh(s=s), "quant_offset2 requires quant_scale2", num_heads=4,
         quant_offset2=torch.ones(1))
    case(f"{tag}-pse_wrong_dtype", op, bsh(s=s), "pse_shift.dtype", num_heads=4,
         pse_shift=r(2, 4, s, 9, dtype=F16))
    case(f"{tag}-pse_wrong_rank", op, bsh(s=s), "pse_shift.dim()", num_heads=4, pse_shift=r(4, s, 9))
    case(f"{tag}-pse_wrong_heads", op, bsh(s=s), "pse_shift.shape[1]", num_heads=4, pse_shift=r(2, 3, s, 9))
    case(f"{tag}-pse_wrong_batch", op, bsh(s=s), "pse_shift.shape[0]", num_heads=4, pse_shift=r(3, 4, s, 9))
    case(f"{tag}-pse_too_few_keys", op, bsh(s=s), "pse_shift.shape[3]", num_heads=4, pse_shift=r(1, 4, s, 8))
    case(f"{tag}-mask_float", op, bsh(s=s), "atten_mask.dtype", num_heads=4, atten_mask=torch.zeros(2, s, 9))
    case(f"{tag}-query_rank_wrong", op, bnsd(s=s), "query.dim()", num_heads=4)

case("pfa-head_dim_not_multiple_of_32_for_int8", PFA,
     (i8(2, 6, 64), i8(2, 9, 64), i8(2, 9, 64)), "query head_dim (D) must be a multiple of 32", num_heads=4,
     deq_scale1=torch.tensor([1.0]), quant_scale1=torch.tensor([1.0]), deq_scale2=torch.tensor([1.0]))
case("ifa-head_dim_not_multiple_of_32_for_int8_kv", IFA, bsh(s=1, d=16, dtype=F16, kv_dtype=I8),
     "query head_dim (D) must be a multiple of 32", num_heads=4, antiquant_scale=torch.ones(2, 64, dtype=F16))
case("fia-head_dim_not_multiple_of_32_for_int8_kv", FIA, bsh(s=1, d=16, dtype=F16, kv_dtype=I8),
     "query head_dim (D) must be a multiple of 32", num_heads=4, antiquant_scale=torch.ones(2, 64, dtype=F16))
case("pfa-num_heads_not_query_heads", PFA, bnsd(), "num_heads must equal the query head count", num_heads=2, input_layout="BNSD")
case("pfa-num_kv_heads_not_key_heads", PFA, bnsd(nkv=2), "num_key_value_heads must equal the key head count", num_heads=4,
     num_key_value_heads=1, input_layout="BNSD")
case("pfa-num_kv_heads_negative", PFA, bsh(), "num_key_value_heads must be >= 0", num_heads=4, num_key_value_heads=-1)
case("pfa-hidden_not_divisible", PFA, (r(2, 6, 66), r(2, 9, 64), r(2, 9, 64)), "query hidden size H",
     num_heads=4)
case("pfa-key_batch_mismatch", PFA, (r(2, 6, 64), r(3, 9, 64), r(3, 9, 64)), "key batch must equal", num_heads=4)
case("pfa-key_head_dim_mismatch", PFA, (r(2, 4, 6, 16), r(2, 4, 9, 32), r(2, 4, 9, 32)), "key head dim", num_heads=4,
     input_layout="BNSD")
case("pfa-value_seq_mismatch", PFA, (r(2, 6, 64), r(2, 9, 64), r(2, 8, 64)), "value batch and sequence", num_heads=4)
case("ifa-value_head_dim_mismatch", IFA, (r(2, 4, 1, 16), r(2, 4, 9, 16), r(2, 4, 9, 32)), "value shape must equal",
     num_heads=4, input_layout="BNSD")
case("pfa-key_dtype_mismatch", PFA, (r(2, 6, 64), r(2, 9, 64, dtype=F16), r(2, 9, 64, dtype=F16)), "key.dtype",
     num_heads=4)
case("pfa-value_dtype_mismatch", PFA, (r(2, 6, 64), r(2, 9, 64), r(2, 9, 64, dtype=F16)), "value.dtype",
     num_heads=4)
case("ifa-int8_query", IFA, (i8(2, 1, 64), i8(2, 9, 64), i8(2, 9, 64)), "query.dtype", num_heads=4,
     dequant_scale1=torch.tensor([1.0]), quant_scale1=torch.tensor([1.0]), dequant_scale2=torch.tensor([1.0]))
case("pfa-int8_query_without_dequant_scales", PFA, (i8(2, 6, 64), i8(2, 9, 64), i8(2, 9, 64)), "deq_scale1 is required",
     num_heads=2)
case("pfa-int8_query_float_key", PFA, (i8(2, 6, 64), r(2, 9, 64), r(2, 9, 64)), "key.dtype", num_heads=2,
     deq_scale1=torch.tensor([1.0]), quant_scale1=torch.tensor([1.0]), deq_scale2=torch.tensor([1.0]))
case("pfa-dequant_scale_not_per_tensor", PFA, (i8(2, 6, 64), i8(2, 9, 64), i8(2, 9, 64)), "deq_scale1 must be per-tensor",
     num_heads=2, deq_scale1=torch.ones(2), quant_scale1=torch.tensor([1.0]), deq_scale2=torch.tensor([1.0]),
     quant_scale2=torch.tensor([1.0]))

# --- int8 KV / antiquant ---------------------------------------------------------
KV8 = dict(dtype=F16, kv_dtype=I8, d=32)
case("ifa-int8_kv_without_antiquant", IFA, bsh(s=1, **KV8), "antiquant_scale is required", num_heads=4)
case("fia-int8_kv_without_antiquant", FIA, bsh(s=1, **KV8), "antiquant_scale is required", num_heads=4)
case("ifa-antiquant_with_float_kv", IFA, bsh(s=1, dtype=F16), "antiquant_scale requires int8", num_heads=4,
     antiquant_scale=torch.ones(2, 64, dtype=F16))
case("ifa-antiquant_leading_dim_not_2", IFA, bsh(s=1, **KV8), "antiquant_scale.shape[0]", num_heads=4,
     antiquant_scale=torch.ones(3, 128, dtype=F16))
case("ifa-antiquant_offset_without_scale", IFA, bsh(s=1, **KV8), "antiquant_offset requires antiquant_scale", num_heads=4,
     antiquant_offset=torch.ones(2, 128, dtype=F16))
case("ifa-antiquant_offset_shape", IFA, bsh(s=1, **KV8), "antiquant_offset.shape", num_heads=4,
     antiquant_scale=torch.ones(2, 128, dtype=F16), antiquant_offset=torch.ones(2, 64, dtype=F16))
case("ifa-antiquant_per_channel_wrong_numel", IFA, bsh(s=1, **KV8), "antiquant_scale must have shape", num_heads=4,
     antiquant_scale=torch.ones(2, 96, dtype=F16))
case("fia-antiquant_mode_2", FIA, bsh(s=1, **KV8), "antiquant_mode must be 0 (per-channel) or 1", num_heads=4, antiquant_mode=2,
     antiquant_scale=torch.ones(2, 128, dtype=F16))
case("fia-antiquant_per_token_wrong_shape", FIA, bsh(s=1, **KV8), "antiquant_scale must have shape", num_heads=4,
     antiquant_mode=1, antiquant_scale=torch.ones(2, 2, 9, 1))
case("fia-key_antiquant_without_value", FIA, bsh(s=1, **KV8), "key_antiquant_scale/value_antiquant_scale",
     num_heads=4, key_antiquant_scale=torch.ones(128, dtype=F16))
case("fia-key_offset_without_key_scale", FIA, bsh(s=1, **KV8), "key_antiquant_offset requires key_antiquant_scale", num_heads=4,
     key_antiquant_offset=torch.ones(128, dtype=F16))
case("fia-antiquant_mode_6", FIA, bsh(s=1, **KV8), "key_antiquant_scale mode", num_heads=4,
     key_antiquant_scale=torch.ones(4), value_antiquant_scale=torch.ones(4), key_antiquant_mode=6,
     value_antiquant_mode=6)
case("fia-antiquant_mode_2_wrong_shape", FIA, bsh(s=1, **KV8), "key_antiquant_scale must have shape", num_heads=4,
     key_antiquant_scale=torch.ones(3, dtype=F16), value_antiquant_scale=torch.ones(3, dtype=F16),
     key_antiquant_mode=2, value_antiquant_mode=2)
case("fia-antiquant_mode_4_without_block_table", FIA, bsh(s=1, **KV8), "key_antiquant_scale mode 4",
     num_heads=4, key_antiquant_scale=torch.ones(4, 32), value_antiquant_scale=torch.ones(4, 32),
     key_antiquant_mode=4, value_antiquant_mode=4)
case("fia-key_antiquant_offset_shape", FIA, bsh(s=1, **KV8), "key_antiquant_offset.shape", num_heads=4,
     key_antiquant_scale=torch.ones(4, dtype=F16), value_antiquant_scale=torch.ones(4, dtype=F16),
     key_antiquant_offset=torch.ones(2, dtype=F16), key_antiquant_mode=2, value_antiquant_mode=2)

# --- incremental op / inner_precise ----------------------------------------------
case("ifa-query_seq_not_1", IFA, bsh(s=2), "query sequence length S must be 1", num_heads=4)
case("ifa-inner_precise_2", IFA, bsh(s=1), "inner_precise must be 0 (high precision) or 1", num_heads=4, inner_precise=2)
case("fia-inner_precise_4", FIA, bsh(s=1), "inner_precise must be 0, 1, 2 or 3", num_heads=4, inner_precise=4)
case("fia-key_rope_antiquant_scale", FIA, bsh(s=1), "key_rope_antiquant_scale", num_heads=4,
     key_rope_antiquant_scale=torch.ones(1))
case("ifa-tnd_layout", IFA, tnd(q_total=2), "input_layout must be one of", num_heads=4, input_layout="TND")
case("ifa-bnsd_bsnd_layout", IFA, bnsd(s=1), "input_layout must be one of", num_heads=4, input_layout="BNSD_BSND")

# --- sparse modes and masks --------------------------------------------------------
for op in (PFA, FIA):
    tag = "pfa" if op is PFA else "fia"
    case(f"{tag}-sparse_mode_5", op, bsh(), "sparse_mode must be one of 0, 1, 2, 3, 4", num_heads=4, sparse_mode=5, atten_mask=MASK2048)
    for mode in (1, 2, 3, 4):
        case(f"{tag}-mode{mode}_requires_mask", op, bsh(), "atten_mask is required", num_heads=4,
             sparse_mode=mode)
    case(f"{tag}-mode4_pre_next_both_negative", op, bsh(), "pre_tokens/next_tokens must not both be negative", num_heads=4,
         sparse_mode=4, atten_mask=MASK2048, pre_tokens=-1, next_tokens=-2)
    case(f"{tag}-mode4_pre_next_disjoint", op, bsh(), "pre_tokens/next_tokens must overlap", num_heads=4, sparse_mode=4,
         atten_mask=MASK2048, pre_tokens=-3, next_tokens=2)
    case(f"{tag}-compressed_mask_wrong_shape", op, bsh(), "atten_mask must have shape (2048, 2048)",
         num_heads=4, sparse_mode=2, atten_mask=torch.triu(torch.ones(1024, 1024, dtype=torch.bool), 1))
    case(f"{tag}-compressed_mask_batched", op, bsh(), "atten_mask must have shape (2048, 2048)", num_heads=4,
         sparse_mode=3, atten_mask=MASK2048.expand(2, 2048, 2048))
    case(f"{tag}-compressed_mask_wrong_pattern", op, bsh(), "atten_mask must be torch.triu", num_heads=4,
         sparse_mode=3, atten_mask=MASK2048.T.contiguous())
    case(f"{tag}-mask_rank_5", op, bsh(), "atten_mask.dim()", num_heads=4,
         atten_mask=torch.zeros(1, 1, 1, 6, 9, dtype=torch.bool))
    case(f"{tag}-mask_heads_dim", op, bsh(), "atten_mask.shape[1]", num_heads=4,
         atten_mask=torch.zeros(2, 4, 6, 9, dtype=torch.bool))
    case(f"{tag}-mask_batch", op, bsh(), "atten_mask batch dim", num_heads=4,
         atten_mask=torch.zeros(3, 6, 9, dtype=torch.bool))
    case(f"{tag}-mask_too_few_rows", op, bsh(), "atten_mask query dim", num_heads=4,
         atten_mask=torch.zeros(5, 9, dtype=torch.bool))
    case(f"{tag}-mask_too_few_keys", op, bsh(), "atten_mask key dim", num_heads=4,
         atten_mask=torch.zeros(6, 8, dtype=torch.bool))
    case(f"{tag}-pse_too_few_rows", op, bsh(), "pse_shift.shape[2]", num_heads=4, pse_shift=r(1, 4, 5, 9))
    case(f"{tag}-tnd_full_mask", op, tnd(), "atten_mask with input_layout TND", num_heads=4, input_layout="TND",
         actual_seq_lengths=[4, 9], actual_seq_lengths_kv=[5, 12], atten_mask=torch.zeros(9, 12, dtype=torch.bool))
    case(f"{tag}-tnd_pse", op, tnd(), "pse_shift is not supported with input_layout TND", num_heads=4, input_layout="TND", actual_seq_lengths=[4, 9],
         actual_seq_lengths_kv=[5, 12], pse_shift=r(2, 4, 5, 7))

    # --- TND lengths -------------------------------------------------------------
    case(f"{tag}-tnd_without_lengths", op, tnd(), "actual_seq_lengths is required", num_heads=4, input_layout="TND")
    case(f"{tag}-tnd_without_kv_lengths", op, tnd(), "actual_seq_lengths_kv is required", num_heads=4, input_layout="TND",
         actual_seq_lengths=[4, 9])
    case(f"{tag}-tnd_not_cumulative", op, tnd(), "actual_seq_lengths must be cumulative", num_heads=4, input_layout="TND",
         actual_seq_lengths=[5, 3, 9], actual_seq_lengths_kv=[4, 8, 12])
    case(f"{tag}-tnd_kv_not_cumulative", op, tnd(), "actual_seq_lengths_kv must be cumulative", num_heads=4, input_layout="TND",
         actual_seq_lengths=[4, 9], actual_seq_lengths_kv=[7, 5])
    case(f"{tag}-tnd_total_mismatch", op, tnd(), "actual_seq_lengths last entry", num_heads=4, input_layout="TND",
         actual_seq_lengths=[4, 8], actual_seq_lengths_kv=[5, 12])
    case(f"{tag}-tnd_kv_count_mismatch", op, tnd(), "actual_seq_lengths_kv must have one entry per batch", num_heads=4, input_layout="TND",
         actual_seq_lengths=[4, 9], actual_seq_lengths_kv=[12])

    # --- lengths ------------------------------------------------------------------
    case(f"{tag}-q_length_over_seq", op, bsh(), "actual_seq_lengths entries must be <=", num_heads=4, actual_seq_lengths=[6, 7])
    case(f"{tag}-kv_length_over_seq", op, bsh(), "actual_seq_lengths_kv entries must be <=", num_heads=4,
         actual_seq_lengths_kv=[10])
    case(f"{tag}-kv_length_negative", op, bsh(), "actual_seq_lengths_kv entries must be >= 0", num_heads=4,
         actual_seq_lengths_kv=[3, -1])
    case(f"{tag}-q_lengths_count", op, bsh(b=3), "actual_seq_lengths must have 1 or at least batch", num_heads=4, actual_seq_lengths=[6, 6])

    # --- output quantisation --------------------------------------------------------
    case(f"{tag}-quant_scale2_fp16", op, bsh(dtype=F16), "quant_scale2.dtype", num_heads=4,
         quant_scale2=torch.ones(1, dtype=F16))
    case(f"{tag}-quant_offset2_shape", op, bsh(), "quant_offset2.shape", num_heads=4,
         quant_scale2=torch.ones(64), quant_offset2=torch.ones(1))
    case(f"{tag}-quant_offset2_dtype", op, bsh(dtype=torch.bfloat16), "quant_offset2.dtype", num_heads=4,
         quant_scale2=torch.ones(1), quant_offset2=torch.ones(1, dtype=torch.bfloat16))

# --- paged attention (IFA and FIA) ------------------------------------------------------
for op, lens in ((IFA, "actual_seq_lengths"), (FIA, "actual_seq_lengths_kv")):
    tag = "ifa" if op is IFA else "fia"
    q1 = r(2, 1, 64)
    k3, v3 = paged(3)
    case(f"{tag}-block_table_too_narrow", op, (q1, k3, v3), "block_table.shape[1]", num_heads=4,
         block_table=table(2, 2), block_size=16, **{lens: [40, 3]})
    case(f"{tag}-block_table_int64", op, (q1, k3, v3), "block_table.dtype", num_heads=4,
         block_table=table(2, 2, torch.int64), block_size=16, **{lens: [20, 3]})
    case(f"{tag}-block_table_rank", op, (q1, k3, v3), "block_table.dim()", num_heads=4,
         block_table=torch.zeros(4, dtype=torch.int32), block_size=16, **{lens: [20, 3]})
    case(f"{tag}-block_table_batch", op, (q1, k3, v3), "block_table.shape[0]", num_heads=4,
         block_table=table(3, 2), block_size=16, **{lens: [20, 3]})
    case(f"{tag}-paged_without_lengths", op, (q1, k3, v3), lens + " is required with block_table", num_heads=4, block_table=table(2, 2),
         block_size=16)
    case(f"{tag}-block_size_zero", op, (q1, k3, v3), "block_size must be positive", num_heads=4, block_table=table(2, 2),
         block_size=0, **{lens: [20, 3]})
    k8, v8 = paged(3, bs=8)
    case(f"{tag}-block_size_not_multiple_of_16", op, (q1, k8, v8), "block_size must be a multiple of 16", num_heads=4,
         block_table=table(2, 2), block_size=8, **{lens: [10, 3]})
    k16i, v16i = paged(3, bs=16, d=32, dtype=I8)
    case(f"{tag}-int8_block_size_not_multiple_of_32", op, (r(2, 1, 128, dtype=F16), k16i, v16i), "block_size must be a multiple of 32",
         num_heads=4, block_table=table(2, 2), block_size=16, antiquant_scale=torch.ones(2, 128, dtype=F16),
         **{lens: [20, 3]})
    case(f"{tag}-cache_block_dim_mismatch", op, (q1, k3, v3), "key.shape[1]", num_heads=4,
         block_table=table(2, 4), block_size=32, **{lens: [20, 3]})
    case(f"{tag}-cache_hidden_mismatch", op, (q1, k3, v3), "key.shape[2] (H)", num_heads=4,
         num_key_value_heads=2, block_table=table(2, 2), block_size=16, **{lens: [20, 3]})
    k4, v4 = paged(4)
    case(f"{tag}-4d_cache_with_bsh_query", op, (q1, k4, v4), "input_layout must be one of ['BNSD'", num_heads=4,
         block_table=table(2, 2), block_size=16, **{lens: [20, 3]})
    case(f"{tag}-cache_rank_5", op, (r(2, 4, 1, 16), k4[None], v4[None]), "key.dim()", num_heads=4,
         input_layout="BNSD", block_table=table(2, 2), block_size=16, **{lens: [20, 3]})
    case(f"{tag}-value_cache_rank", op, (r(2, 4, 1, 16), k4, v3), "value.dim()", num_heads=4,
         input_layout="BNSD", block_table=table(2, 2), block_size=16, **{lens: [20, 3]})
    case(f"{tag}-kv_padding_with_block_table", op, (q1, k3, v3), "kv_padding_size is not supported with block_table", num_heads=4,
         block_table=table(2, 2), block_size=16, kv_padding_size=torch.tensor([1]), **{lens: [20, 3]})

    # --- left padding ----------------------------------------------------------------
    case(f"{tag}-kv_padding_without_lengths", op, bsh(s=1), lens + " is required with kv_padding_size", num_heads=4, kv_padding_size=torch.tensor([1]))
    case(f"{tag}-kv_padding_two_values", op, bsh(s=1), "kv_padding_size must hold one value", num_heads=4,
         kv_padding_size=torch.tensor([1, 2]), **{lens: [3]})
    case(f"{tag}-kv_padding_int32", op, bsh(s=1), "kv_padding_size.dtype", num_heads=4,
         kv_padding_size=torch.tensor([1], dtype=torch.int32), **{lens: [3]})

case("fia-query_padding_without_lengths", FIA, bsh(), "actual_seq_lengths is required with query_padding_size", num_heads=4,
     query_padding_size=torch.tensor([1]))
case("fia-kv_padding_with_tnd", FIA, tnd(), "kv_padding_size is not supported with input_layout TND", num_heads=4, input_layout="TND",
     actual_seq_lengths=[4, 9], actual_seq_lengths_kv=[5, 12], kv_padding_size=torch.tensor([1]))

# --- shared prefix and rope (FIA) ----------------------------------------------------
case("fia-prefix_key_only", FIA, bsh(), "key_shared_prefix/value_shared_prefix", num_heads=4,
     key_shared_prefix=r(1, 3, 64))
case("fia-prefix_batch_2", FIA, bsh(), "key_shared_prefix.shape[0]", num_heads=4,
     key_shared_prefix=r(2, 3, 64), value_shared_prefix=r(2, 3, 64))
case("fia-prefix_rank", FIA, bsh(), "key_shared_prefix.dim()", num_heads=4,
     key_shared_prefix=r(1, 3, 4, 16), value_shared_prefix=r(1, 3, 4, 16))
case("fia-prefix_len_too_long", FIA, bsh(), "actual_shared_prefix_len", num_heads=4,
     key_shared_prefix=r(1, 3, 64), value_shared_prefix=r(1, 3, 64), actual_shared_prefix_len=[4])
case("fia-prefix_mask_without_prefix_keys", FIA, bsh(), "atten_mask key dim", num_heads=4,
     key_shared_prefix=r(1, 3, 64), value_shared_prefix=r(1, 3, 64), atten_mask=torch.zeros(6, 9, dtype=torch.bool))
case("fia-prefix_pse_without_prefix_keys", FIA, bsh(), "pse_shift.shape[3]", num_heads=4,
     key_shared_prefix=r(1, 3, 64), value_shared_prefix=r(1, 3, 64), actual_shared_prefix_len=[2],
     pse_shift=r(1, 4, 6, 10))
case("fia-per_token_scale_too_short", FIA, bsh(s=1, **KV8), "antiquant_scale per-token scales must cover",
     num_heads=4, antiquant_mode=1, antiquant_scale=torch.ones(2, 2, 5))
case("fia-mode3_scale_too_short", FIA, bsh(s=1, **KV8), "key_antiquant_scale per-token scales must cover",
     num_heads=4, key_antiquant_scale=torch.ones(2, 4, 8), value_antiquant_scale=torch.ones(2, 4, 8),
     key_antiquant_mode=3, value_antiquant_mode=3)
case("fia-prefix_with_block_table", FIA, (r(2, 1, 64),) + paged(3), "key_shared_prefix is not supported with block_table", num_heads=4,
     block_table=table(2, 2), block_size=16, actual_seq_lengths_kv=[20, 3], key_shared_prefix=r(1, 3, 64),
     value_shared_prefix=r(1, 3, 64))
case("fia-prefix_with_kv_padding", FIA, bsh(), "key_shared_prefix is not supported with kv_padding_size", num_heads=4, actual_seq_lengths_kv=[5],
     kv_padding_size=torch.tensor([1]), key_shared_prefix=r(1, 3, 64), value_shared_prefix=r(1, 3, 64))
case("fia-prefix_with_rope", FIA, bnsd(s=1), "key_shared_prefix is not supported with query_rope", num_heads=4, input_layout="BNSD",
     key_shared_prefix=r(1, 4, 3, 16), value_shared_prefix=r(1, 4, 3, 16), query_rope=r(2, 4, 1, 16),
     key_rope=r(2, 4, 9, 16))
case("fia-query_rope_only", FIA, bnsd(s=1), "query_rope/key_rope", num_heads=4, input_layout="BNSD",
     query_rope=r(2, 4, 1, 16))
case("fia-query_rope_dtype", FIA, bnsd(s=1), "query_rope.dtype", num_heads=4, input_layout="BNSD",
     query_rope=r(2, 4, 1, 16, dtype=F16), key_rope=r(2, 4, 9, 16))
case("fia-query_rope_shape", FIA, bnsd(s=1), "query_rope.shape", num_heads=4, input_layout="BNSD",
     query_rope=r(2, 4, 2, 16), key_rope=r(2, 4, 9, 16))

# Checks that need tensor contents cannot run on fake tensors.
EAGER_ONLY = {name for name in CASES if name.endswith("compressed_mask_wrong_pattern")}


def _anchored(match: str) -> str:
    """Messages read "<op>: <argument> <rule>, got <value>": the expected text
    must start right at the argument, after the op's name."""
    return r"^npu_\w+: " + re.escape(match)


def _call(op, qkv, kwargs):
    return op(*qkv, **kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_constraint_raises(name):
    op, qkv, kwargs, match = CASES[name]
    with pytest.raises(NpuAttnArgumentError, match=_anchored(match)):
        _call(op, qkv, kwargs)


@pytest.mark.parametrize("name", sorted(set(CASES) - EAGER_ONLY))
def test_constraint_raises_in_fake_mode(name):
    op, qkv, kwargs, match = CASES[name]
    with FakeTensorMode() as mode:
        fake_qkv = [mode.from_tensor(t) for t in qkv]
        fake_kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with pytest.raises(NpuAttnArgumentError, match=_anchored(match)):
            _call(op, fake_qkv, fake_kwargs)


def test_error_message_names_op_argument_and_value():
    q, k, v = bsh(d=24)
    with pytest.raises(NpuAttnArgumentError) as info:
        PFA(q, k, v, num_heads=4)
    assert str(info.value) == "npu_prompt_flash_attention: query head_dim (D) must be a multiple of 16, got 24"


@pytest.mark.parametrize("mode", [1, 2, 3, 4])
def test_fia_incremental_accepts_sparse_modes_without_mask(mode):
    """Query S == 1 ignores sparse_mode and pre/next tokens: no mask needed, no band checks."""
    out, _ = FIA(*bsh(s=1), num_heads=4, sparse_mode=mode, pre_tokens=-1, next_tokens=-2)
    assert out.shape == (2, 1, 64)


# --- block_table values (every op with a paged cache) ----------------------------
# Value rules: only the reference kernels see the table's contents (a fake kernel
# cannot), so these run eagerly and the fake kernels accept the same calls.

def _sfa_paged(table):
    d, dr = 512, 64
    return (torch.ops.npu_attn.npu_sparse_flash_attention.default,
            (r(3, 2, d), r(4, 16, 1, d), None, torch.zeros(3, 1, 3, dtype=torch.int32), 0.1),
            dict(query_rope=r(3, 2, dr), key_rope=r(4, 16, 1, dr), attention_mode=2, layout_query="TND",
                 layout_kv="PA_BSND", block_table=table,
                 actual_seq_lengths_query=torch.tensor([1, 3], dtype=torch.int32),
                 actual_seq_lengths_kv=torch.tensor([20, 5], dtype=torch.int32)))


def _nsa(table):
    # 4 blocks of 16 compressed tokens; lens 20 and 5 use 2 and 1 blocks.
    return (torch.ops.npu_attn.npu_nsa_compress_attention_infer.default,
            (r(2, 4, 32), r(4, 16, 64), r(4, 16, 32), 0.3, 4, 2, 16, 1, 16, 16, 16),
            dict(block_table=table, actual_cmp_seq_kvlen=[20, 5]))


# Each builder: block_table (2, 2), 4 cache blocks, batch 0 uses 2 blocks (20 tokens), batch 1 one (5).
PAGED_OPS = {
    "ifa-3d": lambda t: (IFA, (r(2, 1, 64),) + paged(3), dict(num_heads=4, block_table=t, block_size=16,
                                                             actual_seq_lengths=[20, 5])),
    "ifa-4d": lambda t: (IFA, (r(2, 4, 1, 16),) + paged(4), dict(num_heads=4, input_layout="BNSD", block_table=t,
                                                                block_size=16, actual_seq_lengths=[20, 5])),
    "fia-3d": lambda t: (FIA, (r(2, 1, 64),) + paged(3), dict(num_heads=4, block_table=t, block_size=16,
                                                             actual_seq_lengths_kv=[20, 5])),
    "fia-tnd-4d": lambda t: (FIA, (r(3, 4, 16),) + paged(4), dict(num_heads=4, input_layout="TND", block_table=t,
                                                                 block_size=16, actual_seq_lengths=[1, 3],
                                                                 actual_seq_lengths_kv=[20, 5])),
    "nsa": _nsa,
    "sfa-pa_bsnd": _sfa_paged,
}


@pytest.mark.parametrize("bad", [4, 99, -1])
@pytest.mark.parametrize("name", sorted(PAGED_OPS))
def test_block_table_entry_out_of_range(name, bad):
    """A used entry outside [0, num_blocks): the message names block_table, the
    range and the entry (batch 0 uses both of its entries, so [0][1] is read)."""
    op, args, kwargs = PAGED_OPS[name](torch.tensor([[0, bad], [2, 3]], dtype=torch.int32))
    with pytest.raises(NpuAttnArgumentError) as info:
        op(*args, **kwargs)
    msg = str(info.value)
    assert re.match(r"^npu_\w+: block_table ", msg), msg
    assert "[0, num_blocks) = [0, 4)" in msg, msg
    assert msg.endswith(f"got block_table[0][1] = {bad}"), msg


@pytest.mark.parametrize("name", sorted(PAGED_OPS))
def test_block_table_entries_past_need_may_hold_anything(name):
    """Entries past what a batch needs (vLLM pads with -1 or 0) are never read."""
    for pad in (-1, 0, 99):
        op, args, kwargs = PAGED_OPS[name](torch.tensor([[0, 1], [2, pad]], dtype=torch.int32))
        op(*args, **kwargs)


@pytest.mark.parametrize("name", sorted(PAGED_OPS))
def test_block_table_values_are_not_seen_by_the_fake_kernel(name):
    op, args, kwargs = PAGED_OPS[name](torch.tensor([[0, 99], [2, 3]], dtype=torch.int32))
    with FakeTensorMode() as mode:
        fake = lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
        op(*[fake(a) for a in args], **{k: fake(v) for k, v in kwargs.items()})


def test_block_table_error_message():
    op, args, kwargs = PAGED_OPS["ifa-3d"](torch.tensor([[0, 99], [2, 3]], dtype=torch.int32))
    with pytest.raises(NpuAttnArgumentError) as info:
        op(*args, **kwargs)
    assert str(info.value) == (
        "npu_incre_flash_attention: block_table entries a batch uses (the first ceil(actual_seq_lengths[b] / "
        "block_size) of row b) must be block ids in [0, num_blocks) = [0, 4), got block_table[0][1] = 99")


@pytest.mark.parametrize("functional", [False, True])
def test_scatter_pa_kv_cache_slot_beyond_the_cache(functional):
    """slot_mapping entries >= num_blocks * block_size raise (naming the range and the
    entry); negative slots stay skipped."""
    name = "npu_scatter_pa_kv_cache_functional" if functional else "npu_scatter_pa_kv_cache"
    op = getattr(torch.ops.npu_attn, name)
    key, value = r(3, 2, 16, dtype=F16), r(3, 2, 16, dtype=F16)
    key_cache, value_cache = torch.zeros(2, 16, 2, 16, dtype=F16), torch.zeros(2, 16, 2, 16, dtype=F16)
    with pytest.raises(NpuAttnArgumentError) as info:
        op(key, value, key_cache, value_cache, torch.tensor([0, 32, -1], dtype=torch.int32), cache_mode="Norm")
    msg = str(info.value)
    assert msg.startswith(f"{name}: slot_mapping "), msg
    assert "[0, num_blocks * block_size) = [0, 32)" in msg and msg.endswith("got slot_mapping[1] = 32"), msg
    result = op(key, value, key_cache, value_cache, torch.tensor([0, -1, 31], dtype=torch.int32), cache_mode="Norm")
    written = result[0] if functional else key_cache
    assert torch.equal(written.view(-1, 2, 16)[[0, 31]], key[[0, 2]])
    assert written.view(-1, 2, 16)[1:31].abs().sum() == 0


# --- sparse_mode 2/3/4 without atten_mask: refused where torch_npu refuses, naming the mask --------
# torch_npu refuses these calls for the prompt path of both inference ops (CANN's
# PromptFlashAttention tiling: "attenMask should not be null when sparse_mode is %d";
# the FusedInferAttentionScore docs: "不传入attenMask ... 报错"), so we do too, and
# the message carries the exact mask to pass. npu_fusion_attention is not refused:
# CANN's FlashAttentionScore computes everything when atten_mask is None.

REMEDY = "torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)"
OP_NAMES = {PFA: "npu_prompt_flash_attention", FIA: "npu_fused_infer_attention_score"}


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("mode", [2, 3, 4])
@pytest.mark.parametrize("op", [PFA, FIA], ids=["pfa", "fia"])
def test_compressed_sparse_mode_without_mask_names_the_mask_to_pass(op, mode, fake):
    qkv = bsh()
    if fake:
        fake_mode = FakeTensorMode()
        qkv = [fake_mode.from_tensor(t) for t in qkv]
        with fake_mode, pytest.raises(NpuAttnArgumentError) as info:
            op(*qkv, num_heads=4, sparse_mode=mode)
    else:
        with pytest.raises(NpuAttnArgumentError) as info:
            op(*qkv, num_heads=4, sparse_mode=mode)
    msg = str(info.value)
    assert msg.startswith(f"{OP_NAMES[op]}: atten_mask is required for sparse_mode {mode}"), msg
    assert f"atten_mask={REMEDY}" in msg, msg
    assert msg.endswith("got None"), msg


@pytest.mark.parametrize("mode", [2, 3, 4])
@pytest.mark.parametrize("op", [PFA, FIA], ids=["pfa", "fia"])
def test_the_named_mask_is_the_remedy(op, mode):
    """The mask the message names, evaluated as written, makes the same call run."""
    qkv = bsh()
    with pytest.raises(NpuAttnArgumentError) as info:
        op(*qkv, num_heads=4, sparse_mode=mode)
    expression = str(info.value).split("atten_mask=", 1)[1].split(" (", 1)[0]
    assert expression == REMEDY
    out = op(*qkv, num_heads=4, sparse_mode=mode, atten_mask=eval(expression, {"torch": torch}))
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == qkv[0].shape and torch.isfinite(out).all()


def test_seed_002_prefill_call_names_the_mask():
    """Seed 002's prefill call (sparse_mode=3, pre_tokens=65535, next_tokens=0, no mask),
    with BNSD-shaped tensors for its input_layout="BNSD"; the mask it is told to pass
    gives causal attention."""
    import math

    q, k, v = (torch.randn(1, 8, 64, 128) for _ in range(3))
    kwargs = dict(num_heads=8, scale_value=1.0 / math.sqrt(128), input_layout="BNSD", sparse_mode=3,
                  pre_tokens=65535, next_tokens=0)
    with pytest.raises(NpuAttnArgumentError, match=re.escape(REMEDY)):
        PFA(q, k, v, **kwargs)
    out = PFA(q, k, v, atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1), **kwargs)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", [2, 3, 4])
def test_fusion_attention_without_mask_computes_everything(mode):
    """Not refused: FlashAttentionScore ignores sparse_mode (and pre/next tokens) when
    atten_mask is None ("当attenMaskOptional输入为None时，sparseMode、preTokens、nextTokens
    参数不生效，固定为全计算"), so the result equals sparse_mode 0's."""
    q, k, v = bnsd()
    fa = torch.ops.npu_attn.npu_fusion_attention.default
    got = fa(q, k, v, 4, "BNSD", scale=0.25, sparse_mode=mode, pre_tockens=0, next_tockens=0)[0]
    full = fa(q, k, v, 4, "BNSD", scale=0.25)[0]
    torch.testing.assert_close(got, full, rtol=0, atol=0)
