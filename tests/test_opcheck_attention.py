"""torch.library.opcheck for the three inference attention ops: schema, autograd
registration, fake tensor (shape/dtype agreement with the reference kernel) and
AOT dispatch (static and dynamic shapes) over representative argument sets."""

from __future__ import annotations

import pytest
import torch

import npu_attn_graph.kernels  # noqa: F401  (registers torch.ops.npu_attn)

TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
              "test_aot_dispatch_dynamic")

PFA = torch.ops.npu_attn.npu_prompt_flash_attention.default
IFA = torch.ops.npu_attn.npu_incre_flash_attention.default
FIA = torch.ops.npu_attn.npu_fused_infer_attention_score.default


def _paged(b, nkv, d, bs, lens, rank, dtype=torch.float32):
    width = 3
    blocks = b * width + 1
    table = torch.randperm(blocks)[: b * width].reshape(b, width).to(torch.int32)
    if dtype == torch.int8:
        make = lambda shape: torch.randint(-128, 128, shape, dtype=torch.int8)  # noqa: E731
    else:
        make = lambda shape: torch.randn(shape, dtype=dtype)  # noqa: E731
    shape = (blocks, bs, nkv * d) if rank == 3 else (blocks, nkv, bs, d)
    return make(shape), make(shape), table


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    mask2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)

    # --- npu_prompt_flash_attention
    yield "pfa_dense_mask", PFA, (r(2, 6, 64), r(2, 9, 32), r(2, 9, 32)), dict(
        atten_mask=torch.rand(6, 9, generator=g) < 0.3, actual_seq_lengths=[6, 4],
        actual_seq_lengths_kv=[9, 5], num_heads=4, num_key_value_heads=2, scale_value=0.25, next_tokens=2)
    yield "pfa_tnd_causal", PFA, (r(9, 4, 16), r(12, 2, 16), r(12, 2, 16)), dict(
        atten_mask=mask2048, sparse_mode=3, actual_seq_lengths=[4, 9], actual_seq_lengths_kv=[5, 12],
        num_heads=4, num_key_value_heads=2, scale_value=0.25, input_layout="TND")
    yield "pfa_quant_fp16", PFA, (r(2, 4, 6, 16, dtype=torch.float16), r(2, 4, 8, 16, dtype=torch.float16),
                                  r(2, 4, 8, 16, dtype=torch.float16)), dict(
        quant_scale2=torch.rand(1, 4, 1, 16, generator=g) * 50, quant_offset2=r(1, 4, 1, 16),
        num_heads=4, scale_value=0.25, input_layout="BNSD_BSND", next_tokens=100)

    # --- npu_incre_flash_attention
    k, v, table = _paged(2, 2, 16, 16, [20, 9], 4)
    yield "ifa_paged", IFA, (r(2, 4, 1, 16), k, v), dict(
        block_table=table, block_size=16, actual_seq_lengths=[20, 9], num_heads=4, num_key_value_heads=2,
        scale_value=0.25, input_layout="BNSD")
    yield "ifa_antiquant_pse", IFA, (r(2, 1, 64, dtype=torch.float16),
                                     torch.randint(-128, 128, (2, 7, 64), dtype=torch.int8),
                                     torch.randint(-128, 128, (2, 7, 64), dtype=torch.int8)), dict(
        antiquant_scale=(torch.rand(2, 64, generator=g) * 0.02).half(), antiquant_offset=r(2, 64).half(),
        pse_shift=r(1, 2, 1, 7, dtype=torch.float16), actual_seq_lengths=[7, 3], num_heads=2, scale_value=0.2)
    yield "ifa_kv_padding_quant", IFA, (r(3, 1, 32), r(3, 10, 32), r(3, 10, 32)), dict(
        kv_padding_size=torch.tensor([2]), actual_seq_lengths=[4, 8, 9], quant_scale2=torch.tensor([20.0]),
        atten_mask=torch.rand(3, 10, generator=g) < 0.2, num_heads=2, scale_value=0.25)

    # --- npu_fused_infer_attention_score
    yield "fia_dense_lse", FIA, (r(2, 4, 6, 16), r(2, 2, 9, 16), r(2, 2, 9, 16)), dict(
        atten_mask=torch.rand(2, 1, 6, 9, generator=g) < 0.2, actual_seq_lengths=[6, 3],
        actual_seq_lengths_kv=[9, 7], num_heads=4, num_key_value_heads=2, scale=0.25, input_layout="BNSD",
        softmax_lse_flag=True)
    yield "fia_tnd_lse", FIA, (r(9, 4, 16), r(12, 4, 16), r(12, 4, 16)), dict(
        actual_seq_lengths=[4, 9], actual_seq_lengths_kv=[5, 12], num_heads=4, scale=0.25,
        input_layout="TND", softmax_lse_flag=True)
    k, v, table = _paged(2, 2, 16, 16, [30, 5], 3)
    yield "fia_paged_bsh", FIA, (r(2, 1, 64), k, v), dict(
        block_table=table, block_size=16, actual_seq_lengths_kv=[30, 5], num_heads=4, num_key_value_heads=2,
        scale=0.25, softmax_lse_flag=True)
    k, v, table = _paged(2, 2, 32, 32, [40, 13], 4, torch.int8)
    yield "fia_paged_antiquant_mode5", FIA, (r(2, 4, 1, 32, dtype=torch.float16), k, v), dict(
        block_table=table, block_size=32, actual_seq_lengths_kv=[40, 13], num_heads=4, num_key_value_heads=2,
        key_antiquant_scale=torch.rand(k.shape[0], 2, 32, generator=g),
        value_antiquant_scale=torch.rand(k.shape[0], 2, 32, generator=g),
        key_antiquant_mode=5, value_antiquant_mode=5, scale=0.2, input_layout="BNSD")
    yield "fia_quant_per_channel", FIA, (r(2, 5, 4, 16), r(2, 7, 4, 16), r(2, 7, 4, 16)), dict(
        quant_scale2=torch.rand(4, 16, generator=g) * 40, quant_offset2=r(4, 16), num_heads=4, scale=0.25,
        input_layout="BSND")
    yield "fia_prefix", FIA, (r(2, 4, 3, 32), r(2, 2, 6, 32), r(2, 2, 6, 32)), dict(
        key_shared_prefix=r(1, 2, 4, 32), value_shared_prefix=r(1, 2, 4, 32), actual_shared_prefix_len=[3],
        actual_seq_lengths_kv=[6, 2], num_heads=4, num_key_value_heads=2, scale=0.2, input_layout="BNSD",
        softmax_lse_flag=True)
    yield "fia_rope", FIA, (r(2, 4, 1, 32), r(2, 2, 6, 32), r(2, 2, 6, 32)), dict(
        query_rope=r(2, 4, 1, 16), key_rope=r(2, 2, 6, 16), actual_seq_lengths_kv=[6, 2], num_heads=4,
        num_key_value_heads=2, scale=0.2, input_layout="BNSD")


CASES = list(_cases())


@pytest.mark.parametrize("name,op,args,kwargs", CASES, ids=[c[0] for c in CASES])
def test_opcheck(name, op, args, kwargs):
    torch.library.opcheck(op, args, kwargs, test_utils=TEST_UTILS)


@pytest.mark.parametrize("name,op,args,kwargs", CASES, ids=[c[0] for c in CASES])
def test_fake_matches_reference_metadata(name, op, args, kwargs):
    """Output shapes/dtypes of the fake kernel under FakeTensorMode equal the eager ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    eager = op(*args, **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) for a in args]
        fake_kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        fake = op(*fake_args, **fake_kwargs)
    eager = eager if isinstance(eager, tuple) else (eager,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for e, f in zip(eager, fake, strict=True):
        assert tuple(e.shape) == tuple(f.shape) and e.dtype == f.dtype, (name, e.shape, f.shape, e.dtype, f.dtype)
