"""KV-cache writer ops: scatter_update(_), npu_scatter_nd_update(_), npu_scatter_pa_kv_cache(_functional).

Every reference kernel is compared with an obviously-correct loop implementation
written here; every documented constraint has an error test.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import npu_attn_graph.kernels.scatter_nd_update as snd
import npu_attn_graph.kernels.scatter_pa_kv_cache as spa
import npu_attn_graph.kernels.scatter_update as su
from npu_attn_graph.kernels._library import NpuAttnArgumentError

INDEX_DTYPES = [torch.int32, torch.int64]


def _rand(shape, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(-100, 100, shape, generator=gen).to(dtype)


# ============================================================================ loop implementations


def loop_scatter_update(data, indices, updates, axis):
    out = data.clone()
    ax = axis % data.dim()
    for i in range(indices.shape[0]):
        if indices.dim() == 1:
            row, start = i, int(indices[i])
        else:
            row, start = int(indices[i, 0]), int(indices[i, 1])
        for k in range(updates.shape[ax]):
            # out[row, ..., start + k (at axis), ...] = updates[i, ..., k (at axis), ...]
            out[row].select(ax - 1, start + k).copy_(updates[i].select(ax - 1, k))
    return out


def loop_scatter_nd(data, indices, updates):
    out = data.clone()
    for p in itertools.product(*[range(s) for s in indices.shape[:-1]]):
        target = tuple(int(v) for v in indices[p])
        out[target] = updates[p]
    return out


def loop_pa_norm(key, value, key_cache, value_cache, slots):
    kc, vc = key_cache.clone(), value_cache.clone()
    bs = kc.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        kc[s // bs, s % bs] = key[t]
        vc[s // bs, s % bs] = value[t]
    return kc, vc


def loop_pa_nz(key, value, key_cache, value_cache, slots):
    # The CANN unit-test golden (gen_data.py do_golden), written out.
    kc, vc = key_cache.clone(), value_cache.clone()
    bs = kc.shape[2]
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        b, o = s // bs, s % bs
        for src, cache in ((key, kc), (value, vc)):
            c0 = cache.shape[3]
            flat = src[t].reshape(-1)
            for j in range(cache.shape[1]):
                cache[b, j, o, :] = flat[j * c0:(j + 1) * c0]
    return kc, vc


def _batch_rows(key, b, seq_lens):
    """key rows (L_b, N, D) of batch b: packed 3-D or padded 4-D."""
    lens = [int(x) for x in seq_lens]
    if key.dim() == 3:
        start = sum(lens[:b])
        return key[start:start + lens[b]]
    return key[b, :lens[b]]


def loop_alibi(key, value, key_cache, value_cache, slots, compress_lens, seq_lens):
    kc, vc = key_cache.clone(), value_cache.clone()
    bs, heads = kc.shape[1], key.shape[-2]
    slots, wins = slots.reshape(-1).tolist(), compress_lens.reshape(-1).tolist()
    for b in range(len(seq_lens)):
        for h in range(heads):
            i = b * heads + h
            for src, cache in ((key, kc), (value, vc)):
                rows = _batch_rows(src, b, seq_lens)
                L = rows.shape[0]
                for k in range(wins[i]):
                    s = slots[i] + k
                    cache[s // bs, s % bs, 0] = rows[L - wins[i] + k, h]
    return kc, vc


def loop_rope(key, value, key_cache, value_cache, slots, compress_lens, offsets, seq_lens):
    kc, vc = key_cache.clone(), value_cache.clone()
    bs, heads = kc.shape[1], key.shape[-2]
    slots, wins, offs = (t.reshape(-1).tolist() for t in (slots, compress_lens, offsets))
    for b in range(len(seq_lens)):
        for h in range(heads):
            i = b * heads + h
            for src, cache in ((key, kc), (value, vc)):
                rows = _batch_rows(src, b, seq_lens)
                L = rows.shape[0]
                w, off = wins[i], offs[i]
                if off == -1 or w == 0:
                    off, w = L, 0
                if off == L:
                    w = 0

                def put(s, row):
                    cache[s // bs, s % bs, 0] = row

                for k in range(off):  # part A
                    put(slots[i] + k, rows[k, h])
                if w > 0:  # part B: fp32 mean
                    acc = torch.zeros(rows.shape[-1], dtype=torch.float32)
                    for k in range(off, off + w):
                        acc += rows[k, h].float()
                    put(slots[i] + off, (acc / w).to(cache.dtype))
                    for k in range(off + w, L):  # part C
                        put(slots[i] + off + 1 + (k - off - w), rows[k, h])
    return kc, vc


# ============================================================================ scatter_update


def _su_case(index_kind, index_dtype, axis, width, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    data = _rand((5, 3, 9, 7), dtype, gen)
    ax = axis % 4
    n = 3 if index_kind == "2d" else 4
    upd_shape = [n, 3, 9, 7]
    upd_shape[ax] = width
    updates = _rand(upd_shape, dtype, gen)
    extent = data.shape[ax]
    starts = torch.randint(0, extent - width + 1, (n,), generator=gen)
    if index_kind == "1d_same":  # every row at one offset (a decode step): the kernel's one-slice path
        starts = starts[:1].expand(n)
    if index_kind in ("1d", "1d_same"):
        indices = starts
    else:
        rows = torch.randperm(5, generator=gen)[:n]  # shuffled, unique batch rows
        indices = torch.stack([rows, starts], dim=1)
    return data, indices.to(index_dtype), updates


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("index_kind", ["1d", "1d_same", "2d"])
@pytest.mark.parametrize("axis", [-2, -1, 1, 2])
@pytest.mark.parametrize("width", [1, 3])
def test_scatter_update_matches_loop(index_dtype, index_kind, axis, width):
    data, indices, updates = _su_case(index_kind, index_dtype, axis, width, torch.float32)
    before = data.clone()
    out = su.scatter_update(data, indices, updates, axis)
    torch.testing.assert_close(out, loop_scatter_update(data, indices, updates, axis), rtol=0, atol=0)
    assert torch.equal(data, before)  # functional: input untouched
    assert out.data_ptr() != data.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8, torch.int32, torch.float64])
def test_scatter_update_dtypes(dtype):
    data, indices, updates = _su_case("1d", torch.int64, -2, 2, dtype, seed=1)
    out = su.scatter_update(data, indices, updates, -2)
    assert out.dtype == dtype
    assert torch.equal(out, loop_scatter_update(data, indices, updates, -2))


def test_scatter_update_doc_example():
    data = torch.zeros(1, 1, 2, 8)
    updates = torch.arange(8.0).reshape(1, 1, 1, 8)
    out = su.scatter_update(data, torch.tensor([1]), updates, -2)
    assert torch.equal(out[0, 0, 1], updates[0, 0, 0]) and torch.equal(out[0, 0, 0], torch.zeros(8))


def test_scatter_update_3d_and_positive_last_axis():
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(4, 6, 5, generator=gen)
    updates = torch.randn(2, 6, 2, generator=gen)
    indices = torch.tensor([[3, 1], [0, 3]], dtype=torch.int32)
    for axis in (2, -1):
        assert torch.equal(su.scatter_update(data, indices, updates, axis),
                           loop_scatter_update(data, indices, updates, axis))


@pytest.mark.parametrize("index_kind", ["1d", "1d_same", "2d"])
def test_scatter_update_inplace(index_kind):
    data, indices, updates = _su_case(index_kind, torch.int32, -2, 2, torch.float16, seed=2)
    expected = loop_scatter_update(data, indices, updates, -2)
    ptr = data.data_ptr()
    ret = su.scatter_update_(data, indices, updates, -2)
    assert ret is data
    assert data.data_ptr() == ptr
    assert torch.equal(data, expected)


def test_scatter_update_inplace_noncontiguous_self():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(3, 8, 2, 4, generator=gen)
    data = base.transpose(1, 2)  # (3, 2, 8, 4), non-contiguous view
    updates = torch.randn(3, 2, 1, 4, generator=gen)
    indices = torch.tensor([7, 0, 3])
    expected = loop_scatter_update(data, indices, updates, -2)
    su.scatter_update_(data, indices, updates, -2)
    assert torch.equal(data, expected)
    assert torch.equal(base.transpose(1, 2), expected)


# ============================================================================ scatter_nd_update


def _snd_case(a, index_dtype, dtype=torch.float32, prefix=(2, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    data = _rand((4, 5, 6), dtype, gen)
    n = 1
    for p in prefix:
        n *= p
    flat = torch.randperm(4 * 5 * 6 // (1 if a == 3 else (6 if a == 2 else 30)), generator=gen)[:n]
    # unravel unique flat positions into a coordinates of data.shape[:a]
    coords = []
    for size in reversed(data.shape[:a]):
        coords.append(flat % size)
        flat = flat // size
    indices = torch.stack(list(reversed(coords)), dim=-1).reshape(*prefix, a).to(index_dtype)
    updates = _rand(tuple(prefix) + tuple(data.shape[a:]), dtype, gen)
    return data, indices, updates


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("a", [1, 2, 3])
@pytest.mark.parametrize("prefix", [(3,), (2, 2)])
def test_scatter_nd_update_matches_loop(index_dtype, a, prefix):
    data, indices, updates = _snd_case(a, index_dtype, prefix=prefix)
    before = data.clone()
    out = snd.npu_scatter_nd_update(data, indices, updates)
    assert torch.equal(out, loop_scatter_nd(data, indices, updates))
    assert torch.equal(data, before)


def test_scatter_nd_update_doc_shapes():
    data = torch.zeros(4, 5, 6)
    indices = torch.tensor([[0, 1], [3, 4], [2, 0]])
    updates = torch.randn(3, 6)
    out = snd.npu_scatter_nd_update(data, indices, updates)
    assert torch.equal(out[3, 4], updates[1]) and torch.equal(out, loop_scatter_nd(data, indices, updates))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.bool, torch.int64, torch.int8])
def test_scatter_nd_update_dtypes(dtype):
    data, indices, updates = _snd_case(2, torch.int32, dtype=dtype, seed=5)
    assert torch.equal(snd.npu_scatter_nd_update(data, indices, updates), loop_scatter_nd(data, indices, updates))


def test_scatter_nd_update_inplace():
    data, indices, updates = _snd_case(2, torch.int64, seed=6)
    expected = loop_scatter_nd(data, indices, updates)
    ptr = data.data_ptr()
    ret = snd.npu_scatter_nd_update_(data, indices, updates)
    assert ret is data and data.data_ptr() == ptr
    assert torch.equal(data, expected)


# ============================================================================ scatter_pa_kv_cache


def _pa_case(mode, dtype, slot_dtype, tokens=10, heads=2, dk=16, dv=32, blocks=4, block_size=8, seed=0,
             negative=True):
    gen = torch.Generator().manual_seed(seed)
    key = _rand((tokens, heads, dk), dtype, gen)
    value = _rand((tokens, heads, dv), dtype, gen)
    if mode == "PA_NZ":
        c0 = 32 // key.element_size()
        key_cache = _rand((blocks, heads * dk // c0, block_size, c0), dtype, gen)
        value_cache = _rand((blocks, heads * dv // c0, block_size, c0), dtype, gen)
    else:
        key_cache = _rand((blocks, block_size, heads, dk), dtype, gen)
        value_cache = _rand((blocks, block_size, heads, dv), dtype, gen)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]  # shuffled, unique
    if negative:
        slots[3] = -1  # padding token: skipped
    return key, value, key_cache, value_cache, slots.to(slot_dtype)


@pytest.mark.parametrize("slot_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["Norm", "PA_NZ", None])
def test_pa_kv_cache_matches_loop(mode, dtype, slot_dtype):
    key, value, kc, vc, slots = _pa_case(mode, dtype, slot_dtype)
    loop = loop_pa_nz if mode == "PA_NZ" else loop_pa_norm
    exp_k, exp_v = loop(key, value, kc, vc, slots)
    inputs = [t.clone() for t in (key, value, kc, vc, slots)]

    out_k, out_v = spa.npu_scatter_pa_kv_cache_functional(key, value, kc, vc, slots, cache_mode=mode)
    assert torch.equal(out_k, exp_k) and torch.equal(out_v, exp_v)
    for before, after in zip(inputs, (key, value, kc, vc, slots)):
        assert torch.equal(before, after)  # functional: nothing mutated

    kptr, vptr = kc.data_ptr(), vc.data_ptr()
    ret = spa.npu_scatter_pa_kv_cache(key, value, kc, vc, slots, cache_mode=mode)
    assert ret is None
    assert kc.data_ptr() == kptr and vc.data_ptr() == vptr
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v)


def test_pa_kv_cache_default_mode_is_pa_nz_and_int8():
    key, value, kc, vc, slots = _pa_case("PA_NZ", torch.int8, torch.int32, dk=32, dv=64, seed=7)
    assert kc.shape[-1] == 32  # c0 = 32 for int8
    exp_k, exp_v = loop_pa_nz(key, value, kc, vc, slots)
    out_k, out_v = spa.npu_scatter_pa_kv_cache_functional(key, value, kc, vc, slots)
    assert torch.equal(out_k, exp_k) and torch.equal(out_v, exp_v)


def test_pa_kv_cache_norm_noncontiguous_cache_view():
    key, value, kc, vc, slots = _pa_case("Norm", torch.float32, torch.int64, seed=8)
    exp_k, exp_v = loop_pa_norm(key, value, kc, vc, slots)
    kbase = kc.transpose(0, 1).contiguous()  # (bs, nb, N, D) storage
    kview = kbase.transpose(0, 1)  # logical (nb, bs, N, D), non-contiguous
    spa.npu_scatter_pa_kv_cache(key, value, kview, vc, slots, cache_mode="Norm")
    assert torch.equal(kview, exp_k) and torch.equal(kbase.transpose(0, 1), exp_k) and torch.equal(vc, exp_v)


def _compressed_case(packed, dtype, slot_dtype, rope, seed=0):
    gen = torch.Generator().manual_seed(seed)
    heads, dk, dv, blocks, block_size = 2, 8, 16, 6, 8
    seq_lens = torch.tensor([5, 7, 3])
    batch = len(seq_lens)
    wins = torch.tensor([[2, 5], [7, 0], [3, 1]])  # <= seq_lens per batch
    if packed:
        total = int(seq_lens.sum())
        key = _rand((total, heads, dk), dtype, gen)
        value = _rand((total, heads, dv), dtype, gen)
    else:
        key = _rand((batch, 8, heads, dk), dtype, gen)
        value = _rand((batch, 8, heads, dv), dtype, gen)
    key_cache = _rand((blocks, block_size, 1, dk), dtype, gen)
    value_cache = _rand((blocks, block_size, 1, dv), dtype, gen)
    # disjoint, shuffled slot runs of 8 slots per task (room for the longest run, 7)
    slots = (torch.randperm(blocks, generator=gen) * block_size)[:batch * heads].reshape(batch, heads)
    offsets = None
    if rope:
        # -1: no compression; offset == L: no compression; w == 0: no compression
        offsets = torch.tensor([[1, 0], [-1, 3], [3, 0]]).reshape(-1)
    cast = lambda t: None if t is None else t.to(slot_dtype)  # noqa: E731
    return key, value, key_cache, value_cache, cast(slots), cast(wins), cast(offsets), cast(seq_lens)


@pytest.mark.parametrize("slot_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("flat", [True, False])
def test_pa_kv_cache_alibi(slot_dtype, packed, flat):
    key, value, kc, vc, slots, wins, _, seq_lens = _compressed_case(packed, torch.float32, slot_dtype, False)
    if flat:
        slots, wins = slots.reshape(-1), wins.reshape(-1)
    exp_k, exp_v = loop_alibi(key, value, kc, vc, slots, wins, seq_lens)
    assert not torch.equal(exp_k, kc)
    out_k, out_v = spa.npu_scatter_pa_kv_cache_functional(key, value, kc, vc, slots, compress_lens=wins,
                                                          seq_lens=seq_lens, cache_mode="PA_NZ")
    assert torch.equal(out_k, exp_k) and torch.equal(out_v, exp_v)
    spa.npu_scatter_pa_kv_cache(key, value, kc, vc, slots, compress_lens=wins, seq_lens=seq_lens, cache_mode="Norm")
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
def test_pa_kv_cache_rope(dtype, packed):
    key, value, kc, vc, slots, wins, offs, seq_lens = _compressed_case(packed, dtype, torch.int32, True, seed=1)
    exp_k, exp_v = loop_rope(key, value, kc, vc, slots, wins, offs, seq_lens)
    out_k, out_v = spa.npu_scatter_pa_kv_cache_functional(key, value, kc, vc, slots, compress_lens=wins,
                                                          compress_seq_offsets=offs, seq_lens=seq_lens)
    # the fp32 sums may be accumulated in another order: allow one rounding step
    torch.testing.assert_close(out_k, exp_k)
    torch.testing.assert_close(out_v, exp_v)
    spa.npu_scatter_pa_kv_cache(key, value, kc, vc, slots, compress_lens=wins, compress_seq_offsets=offs,
                                seq_lens=seq_lens)
    torch.testing.assert_close(kc, exp_k)
    torch.testing.assert_close(vc, exp_v)


# ============================================================================ opcheck and torch.compile

FULL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
        "test_aot_dispatch_dynamic")
SCHEMA_FAKE = ("test_schema", "test_faketensor")


def test_opcheck_scatter_update():
    for kind in ("1d", "2d"):
        data, indices, updates = _su_case(kind, torch.int64, -2, 2, torch.float32)
        torch.library.opcheck(torch.ops.npu_attn.scatter_update.default, (data, indices, updates, -2),
                              test_utils=FULL)


def test_opcheck_scatter_update_inplace():
    data, indices, updates = _su_case("2d", torch.int32, -1, 2, torch.float32)
    torch.library.opcheck(torch.ops.npu_attn.scatter_update_.default, (data, indices, updates, -1),
                          test_utils=SCHEMA_FAKE)


def test_opcheck_scatter_nd_update():
    data, indices, updates = _snd_case(2, torch.int64)
    torch.library.opcheck(torch.ops.npu_attn.npu_scatter_nd_update.default, (data, indices, updates),
                          test_utils=FULL)


def test_opcheck_scatter_nd_update_inplace():
    data, indices, updates = _snd_case(1, torch.int32, prefix=(3,))
    torch.library.opcheck(torch.ops.npu_attn.npu_scatter_nd_update_.default, (data, indices, updates),
                          test_utils=SCHEMA_FAKE)


@pytest.mark.parametrize("mode", ["Norm", "PA_NZ"])
def test_opcheck_pa_kv_cache(mode):
    key, value, kc, vc, slots = _pa_case(mode, torch.float32, torch.int32)
    torch.library.opcheck(torch.ops.npu_attn.npu_scatter_pa_kv_cache.default, (key, value, kc, vc, slots),
                          {"cache_mode": mode}, test_utils=FULL)
    torch.library.opcheck(torch.ops.npu_attn.npu_scatter_pa_kv_cache_functional.default,
                          (key, value, kc, vc, slots), {"cache_mode": mode}, test_utils=FULL)


def test_opcheck_pa_kv_cache_alibi():
    key, value, kc, vc, slots, wins, _, seq_lens = _compressed_case(True, torch.float32, torch.int64, False)
    torch.library.opcheck(torch.ops.npu_attn.npu_scatter_pa_kv_cache_functional.default,
                          (key, value, kc, vc, slots), {"compress_lens": wins, "seq_lens": seq_lens},
                          test_utils=FULL)


def test_compile_functional_scatter_update_with_copy():
    def step(cache, indices, updates):
        new = su.scatter_update(cache, indices, updates, -2)
        cache.copy_(new)
        return new * 2

    data, indices, updates = _su_case("1d", torch.int32, -2, 1, torch.float32, seed=9)
    eager_cache = data.clone()
    eager_out = step(eager_cache, indices, updates)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    cache = data.clone()
    out = compiled(cache, indices, updates)
    assert torch.equal(out, eager_out)
    assert torch.equal(cache, eager_cache)
    assert torch.equal(cache, loop_scatter_update(data, indices, updates, -2))


def test_compile_inplace_pa_kv_cache():
    def step(key, value, kc, vc, slots):
        spa.npu_scatter_pa_kv_cache(key, value, kc, vc, slots, cache_mode="Norm")
        return kc.sum() + vc.sum()

    key, value, kc, vc, slots = _pa_case("Norm", torch.float32, torch.int64, seed=10)
    exp_k, exp_v = loop_pa_norm(key, value, kc, vc, slots)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(key, value, kc, vc, slots)
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v)
    torch.testing.assert_close(out, exp_k.sum() + exp_v.sum())


# ============================================================================ constraint errors


def _raises(fn, op, argument):
    with pytest.raises(NpuAttnArgumentError) as info:
        fn()
    msg = str(info.value)
    assert msg.startswith(op + ":"), msg
    assert argument in msg, msg


def _su_args(**over):
    data, indices, updates = _su_case("1d", torch.int64, -2, 2, torch.float32)
    args = dict(self=data, indices=indices, updates=updates, axis=-2)
    args.update(over)
    return args


# (name, overrides builder, argument named in the message, shape rule: also checked by the fake)
SU_ERRORS = [
    ("self_rank", lambda: _su_args(self=torch.zeros(5), updates=torch.zeros(4), axis=0), "self.dim()", True),
    ("self_dtype", lambda: _su_args(self=torch.zeros(5, 3, 9, 7, dtype=torch.int64),
                                    updates=torch.zeros(4, 3, 2, 7, dtype=torch.int64)), "self.dtype", True),
    ("updates_dtype", lambda: _su_args(updates=torch.zeros(4, 3, 2, 7, dtype=torch.float16)), "updates.dtype",
     True),
    ("indices_dtype", lambda: _su_args(indices=torch.zeros(4)), "indices.dtype", True),
    ("indices_rank", lambda: _su_args(indices=torch.zeros(4, 2, 1, dtype=torch.int64)), "indices.dim()", True),
    ("indices_cols", lambda: _su_args(indices=torch.zeros(4, 3, dtype=torch.int64)), "indices.shape[1]", True),
    ("axis_range", lambda: _su_args(axis=4), "axis", True),
    ("axis_batch", lambda: _su_args(axis=-4), "axis", True),
    ("updates_rank", lambda: _su_args(updates=torch.zeros(4, 3, 2)), "updates.dim()", True),
    ("updates_rows", lambda: _su_args(updates=torch.zeros(3, 3, 2, 7)), "updates.shape[0]", True),
    ("too_many_rows", lambda: _su_args(indices=torch.zeros(6, dtype=torch.int64),
                                       updates=torch.zeros(6, 3, 2, 7)), "indices.shape[0]", True),
    ("other_dim", lambda: _su_args(updates=torch.zeros(4, 3, 2, 6)), "updates.shape[3]", True),
    ("axis_dim_too_big", lambda: _su_args(updates=torch.zeros(4, 3, 10, 7)), "updates.shape[2] (axis)", True),
    ("start_overflow", lambda: _su_args(indices=torch.tensor([0, 0, 8, 0])), "indices (start offsets)", False),
    ("start_negative", lambda: _su_args(indices=torch.tensor([0, -1, 0, 0])), "indices (start offsets)", False),
    ("same_start_overflow", lambda: _su_args(indices=torch.tensor([8, 8, 8, 8])), "indices (start offsets)", False),
    ("same_start_negative", lambda: _su_args(indices=torch.tensor([-1, -1, -1, -1])), "indices (start offsets)",
     False),
    ("row_range", lambda: _su_args(indices=torch.tensor([[0, 0], [5, 0], [1, 0], [2, 0]])), "indices[:, 0]", False),
]


def _to_meta(args):
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("name,build,argument,shape_rule", SU_ERRORS, ids=[e[0] for e in SU_ERRORS])
def test_scatter_update_errors(name, build, argument, shape_rule):
    args = build()
    for op, fn in (("scatter_update", su.scatter_update), ("scatter_update_", su.scatter_update_)):
        _raises(lambda: fn(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}),
                op, argument)
        if shape_rule:  # the fake kernel raises too
            _raises(lambda: fn(**_to_meta(args)), op, argument)


def _snd_args(**over):
    data, indices, updates = _snd_case(2, torch.int64)
    args = dict(self=data, indices=indices, updates=updates)
    args.update(over)
    return args


SND_ERRORS = [
    ("self_rank", lambda: _snd_args(self=torch.tensor(1.0)), "self.dim()", True),
    ("self_dtype", lambda: _snd_args(self=torch.zeros(4, 5, 6, dtype=torch.int16),
                                     updates=torch.zeros(2, 3, 6, dtype=torch.int16)), "self.dtype", True),
    ("updates_dtype", lambda: _snd_args(updates=torch.zeros(2, 3, 6, dtype=torch.float16)), "updates.dtype", True),
    ("indices_dtype", lambda: _snd_args(indices=torch.zeros(2, 3, 2)), "indices.dtype", True),
    ("indices_rank", lambda: _snd_args(indices=torch.zeros(2, dtype=torch.int64)), "indices.dim()", True),
    ("indices_last", lambda: _snd_args(indices=torch.zeros(2, 3, 4, dtype=torch.int64)), "indices.shape[-1]",
     True),
    ("updates_shape", lambda: _snd_args(updates=torch.zeros(2, 3, 5)), "updates.shape", True),
    ("index_range", lambda: _snd_args(indices=torch.tensor([[[0, 0], [4, 0], [1, 1]]] * 2)), "indices", False),
    ("index_negative", lambda: _snd_args(indices=torch.tensor([[[0, -1], [3, 0], [1, 1]]] * 2)), "indices", False),
]


@pytest.mark.parametrize("name,build,argument,shape_rule", SND_ERRORS, ids=[e[0] for e in SND_ERRORS])
def test_scatter_nd_update_errors(name, build, argument, shape_rule):
    args = build()
    for op, fn in (("npu_scatter_nd_update", snd.npu_scatter_nd_update),
                   ("npu_scatter_nd_update_", snd.npu_scatter_nd_update_)):
        _raises(lambda: fn(**{k: v.clone() for k, v in args.items()}), op, argument)
        if shape_rule:
            _raises(lambda: fn(**_to_meta(args)), op, argument)


def _pa_args(mode="Norm", **over):
    key, value, kc, vc, slots = _pa_case(mode, torch.float16, torch.int32)
    args = dict(key=key, value=value, key_cache=kc, value_cache=vc, slot_mapping=slots, cache_mode=mode)
    args.update(over)
    return args


def _cp_args(rope=False, packed=True, dtype=torch.float16, **over):
    key, value, kc, vc, slots, wins, offs, seq_lens = _compressed_case(packed, dtype, torch.int32, rope)
    args = dict(key=key, value=value, key_cache=kc, value_cache=vc, slot_mapping=slots, compress_lens=wins,
                seq_lens=seq_lens)
    if rope:
        args["compress_seq_offsets"] = offs
    args.update(over)
    return args


i32 = torch.int32
PA_ERRORS = [
    # common
    ("cache_mode", lambda: _pa_args(cache_mode="ND"), "cache_mode", True),
    ("key_dtype", lambda: _pa_args(key=torch.zeros(10, 2, 16, dtype=torch.bool)), "key.dtype", True),
    ("value_dtype", lambda: _pa_args(value=torch.zeros(10, 2, 32)), "value.dtype", True),
    ("key_cache_dtype", lambda: _pa_args(key_cache=torch.zeros(4, 8, 2, 16)), "key_cache.dtype", True),
    ("value_cache_dtype", lambda: _pa_args(value_cache=torch.zeros(4, 8, 2, 32)), "value_cache.dtype", True),
    ("slot_dtype", lambda: _pa_args(slot_mapping=torch.zeros(10)), "slot_mapping.dtype", True),
    ("compress_dtype", lambda: _cp_args(compress_lens=torch.zeros(6, dtype=torch.int64)), "compress_lens.dtype",
     True),
    ("key_cache_rank", lambda: _pa_args(key_cache=torch.zeros(32, 2, 16, dtype=torch.float16)), "key_cache.dim()",
     True),
    ("value_cache_rank", lambda: _pa_args(value_cache=torch.zeros(32, 2, 32, dtype=torch.float16)),
     "value_cache.dim()", True),
    # plain modes
    ("key_rank", lambda: _pa_args(key=torch.zeros(1, 10, 2, 16, dtype=torch.float16)), "key.dim()", True),
    ("value_rank", lambda: _pa_args(value=torch.zeros(10, 64, dtype=torch.float16)), "value.dim()", True),
    ("value_lead", lambda: _pa_args(value=torch.zeros(10, 3, 32, dtype=torch.float16)), "value.shape[:2]", True),
    ("slot_shape", lambda: _pa_args(slot_mapping=torch.zeros(9, dtype=i32)), "slot_mapping.shape", True),
    ("norm_key_cache", lambda: _pa_args(key_cache=torch.zeros(4, 8, 2, 8, dtype=torch.float16)), "key_cache.shape",
     True),
    ("norm_value_cache", lambda: _pa_args(value_cache=torch.zeros(4, 8, 1, 32, dtype=torch.float16)),
     "value_cache.shape", True),
    ("norm_value_blocks", lambda: _pa_args(value_cache=torch.zeros(4, 4, 2, 32, dtype=torch.float16)),
     "value_cache.shape[:2]", True),
    ("nz_dk", lambda: _pa_args("PA_NZ", key=torch.zeros(10, 2, 8, dtype=torch.float16),
                               key_cache=torch.zeros(4, 1, 8, 16, dtype=torch.float16)), "key.shape[2] (Dk)", True),
    ("nz_dv", lambda: _pa_args("PA_NZ", value=torch.zeros(10, 2, 24, dtype=torch.float16),
                               value_cache=torch.zeros(4, 3, 8, 16, dtype=torch.float16)), "value.shape[2] (Dv)",
     True),
    ("nz_key_cache", lambda: _pa_args("PA_NZ", key_cache=torch.zeros(4, 8, 2, 16, dtype=torch.float16)),
     "key_cache.shape", True),
    ("nz_value_cache", lambda: _pa_args("PA_NZ", value_cache=torch.zeros(4, 4, 8, 8, dtype=torch.float16)),
     "value_cache.shape", True),
    ("nz_value_blocks", lambda: _pa_args("PA_NZ", value_cache=torch.zeros(3, 4, 8, 16, dtype=torch.float16)),
     "value_cache.shape", True),
    ("slot_too_big", lambda: _pa_args(slot_mapping=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 32], dtype=i32)),
     "slot_mapping", False),
    # compressed modes
    ("need_compress_lens", lambda: _cp_args(compress_lens=None), "compress_lens", True),
    ("need_seq_lens", lambda: _cp_args(seq_lens=None), "seq_lens", True),
    ("cp_key_rank", lambda: _cp_args(key=torch.zeros(15, 16, dtype=torch.float16)), "key.dim()", True),
    ("cp_value_rank", lambda: _cp_args(value=torch.zeros(1, 15, 2, 16, dtype=torch.float16)), "value.dim()", True),
    ("cp_value_lead", lambda: _cp_args(value=torch.zeros(15, 3, 16, dtype=torch.float16)), "value.shape[:2]",
     True),
    ("cp_seq_lens_rank", lambda: _cp_args(seq_lens=torch.zeros(3, 1, dtype=i32)), "seq_lens.dim()", True),
    ("cp_seq_lens_batch", lambda: _cp_args(packed=False, seq_lens=torch.tensor([1, 1], dtype=i32)),
     "seq_lens.shape[0]", True),
    ("cp_slot_shape", lambda: _cp_args(slot_mapping=torch.zeros(5, dtype=i32)), "slot_mapping.shape", True),
    ("cp_lens_shape", lambda: _cp_args(compress_lens=torch.zeros(2, 3, dtype=i32)), "compress_lens.shape", True),
    ("cp_offsets_shape", lambda: _cp_args(rope=True, compress_seq_offsets=torch.zeros(7, dtype=i32)),
     "compress_seq_offsets.shape", True),
    ("cp_key_cache", lambda: _cp_args(key_cache=torch.zeros(6, 8, 2, 8, dtype=torch.float16)), "key_cache.shape",
     True),
    ("cp_value_cache", lambda: _cp_args(value_cache=torch.zeros(6, 8, 1, 8, dtype=torch.float16)),
     "value_cache.shape", True),
    ("cp_value_blocks", lambda: _cp_args(value_cache=torch.zeros(6, 4, 1, 16, dtype=torch.float16)),
     "value_cache.shape[:2]", True),
    ("rope_dtype", lambda: _cp_args(rope=True, dtype=torch.float32), "key.dtype", True),
    ("cp_seq_lens_negative", lambda: _cp_args(seq_lens=torch.tensor([5, -1, 3], dtype=i32)), "seq_lens", False),
    ("cp_seq_lens_sum", lambda: _cp_args(seq_lens=torch.tensor([5, 7, 4], dtype=i32)), "seq_lens", False),
    ("cp_seq_lens_padded", lambda: _cp_args(packed=False, seq_lens=torch.tensor([5, 9, 3], dtype=i32)), "seq_lens",
     False),
    ("cp_lens_range", lambda: _cp_args(compress_lens=torch.tensor([2, 6, 0, 0, 0, 0], dtype=i32)), "compress_lens",
     False),
    ("cp_offsets_range", lambda: _cp_args(rope=True, compress_seq_offsets=torch.tensor([4, 0, -1, 3, 3, 0],
                                                                                       dtype=i32)),
     "compress_seq_offsets", False),
    ("cp_slot_run", lambda: _cp_args(slot_mapping=torch.tensor([0, 8, 16, 24, 46, 40], dtype=i32)), "slot_mapping",
     False),
    ("cp_slot_negative", lambda: _cp_args(slot_mapping=torch.tensor([0, 8, 16, 24, 32, -8], dtype=i32)),
     "slot_mapping", False),
]


@pytest.mark.parametrize("name,build,argument,shape_rule", PA_ERRORS, ids=[e[0] for e in PA_ERRORS])
def test_pa_kv_cache_errors(name, build, argument, shape_rule):
    args = build()
    for op, fn in (("npu_scatter_pa_kv_cache", spa.npu_scatter_pa_kv_cache),
                   ("npu_scatter_pa_kv_cache_functional", spa.npu_scatter_pa_kv_cache_functional)):
        _raises(lambda: fn(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}),
                op, argument)
        if shape_rule:
            _raises(lambda: fn(**_to_meta(args)), op, argument)


def test_public_signatures_match_schema_defaults():
    import inspect

    for fn in (spa.npu_scatter_pa_kv_cache, spa.npu_scatter_pa_kv_cache_functional):
        params = inspect.signature(fn).parameters
        assert [p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY] == [
            "compress_lens", "compress_seq_offsets", "seq_lens", "cache_mode"]
        assert params["cache_mode"].default == "PA_NZ" and params["compress_lens"].default is None
    assert list(inspect.signature(su.scatter_update).parameters) == ["self", "indices", "updates", "axis"]
    assert list(inspect.signature(snd.npu_scatter_nd_update_).parameters) == ["self", "indices", "updates"]
    for mod in (su, snd, spa):
        for name in mod.__all__:
            assert getattr(mod, name).__doc__


@pytest.mark.parametrize("op,args", [
    (torch.ops.npu_attn.scatter_update_.default,
     lambda: (torch.zeros(2, 3, 8, 4), torch.tensor([5, 1]), torch.randn(2, 3, 1, 4), 2)),
    (torch.ops.npu_attn.npu_scatter_nd_update_.default,
     lambda: (torch.zeros(4, 5, 6), torch.tensor([[0, 1], [3, 4], [2, 0]]), torch.randn(3, 6))),
])
def test_in_place_writers_pass_opcheck(op, args):
    """Tagged inplace, the alias-returning writers functionalize (AOT dispatch included)."""
    torch.library.opcheck(op, args())


def test_scatter_update_remembers_its_shape_rules_but_checks_offsets_on_every_call():
    """The reference kernel validates shapes once per call form (a decode step repeats one
    in every layer); the start offsets are data, checked on every call, and a call that
    breaks a shape rule raises every time, even right after a good call."""
    args = _su_args()
    good = su.scatter_update(**args)
    assert torch.equal(su.scatter_update(**args), good)
    for _ in range(2):
        _raises(lambda: su.scatter_update(**{**args, "indices": torch.tensor([0, 0, 8, 0])}), "scatter_update",
                "indices (start offsets)")
        _raises(lambda: su.scatter_update(**{**args, "updates": torch.zeros(4, 3, 2, 6)}), "scatter_update",
                "updates.shape[3]")
    assert torch.equal(su.scatter_update(**args), good)


def test_remembered_per_metadata_keys_on_shape_dtype_and_device_and_skips_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from npu_attn_graph.kernels._library import remembered_per_metadata

    calls = []

    def rule(x: torch.Tensor, n: int) -> int:
        calls.append(n)
        if n < 0:
            raise NpuAttnArgumentError(f"n must be >= 0, got {n}")
        return x.shape[0] + n

    checked = remembered_per_metadata(rule)
    assert checked(torch.zeros(3), 1) == 4 and checked(torch.ones(3), 1) == 4 and calls == [1]
    assert checked(torch.zeros(3, dtype=torch.int64), 1) == 4 and checked(torch.zeros(5), 1) == 6
    assert checked(torch.zeros(3), 2) == 5 and calls == [1, 1, 1, 2]
    for _ in range(2):
        with pytest.raises(NpuAttnArgumentError):
            checked(torch.zeros(3), -1)
    assert calls[-2:] == [-1, -1]  # a failing call is never remembered
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.zeros(3))
        checked(fake, 1), checked(fake, 1)
    assert calls[-2:] == [1, 1]  # fake tensors: validated every time
