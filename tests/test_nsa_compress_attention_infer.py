"""npu_nsa_compress_attention_infer: reference kernel against an explicit-loop float64
oracle (paged gather, softmax attention, NSA Eq. 9 importance score, group sum, top-k),
opcheck, and one test per documented constraint (eagerly and under FakeTensorMode)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from npu_attn_graph.kernels import _library
from npu_attn_graph.kernels._library import NpuAttnArgumentError
from npu_attn_graph.kernels.nsa_compress_attention_infer import npu_nsa_compress_attention_infer

OP = torch.ops.npu_attn.npu_nsa_compress_attention_infer.default
TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
              "test_aot_dispatch_dynamic")


# ============================================================================ oracle


def oracle(query, key, value, scale, heads, kv_heads, select_size, count, page, cmp_size, stride, table, lens):
    """Explicit loops in float64. Returns (attention (B, N, Dv) float64, topk (B, N_kv, count) list,
    scores[b][kv] = the importance score of every selection block)."""
    batch, group = len(lens), heads // kv_heads
    dk, dv = query.shape[2], value.shape[2] // kv_heads
    out = torch.zeros(batch, heads, dv, dtype=torch.float64)
    topk, all_scores = [], []
    r, q = select_size // stride, cmp_size // stride
    for b in range(batch):
        n = lens[b]
        keys, values = [], []
        for t in range(n):  # compressed token t sits in block table[b, t // page] at row t % page
            block, row = int(table[b, t // page]), t % page
            keys.append(key[block, row].double().reshape(kv_heads, dk))
            values.append(value[block, row].double().reshape(kv_heads, dv))
        keys, values = torch.stack(keys), torch.stack(values)
        probs = []
        for h in range(heads):
            logits = [scale * float(torch.dot(query[b, h].double(), keys[t, h // group])) for t in range(n)]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            total = sum(weights)
            p = [w / total for w in weights]
            probs.append(p)
            for t in range(n):
                out[b, h] += p[t] * values[t, h // group]
        covered = (n - 1) * stride + cmp_size
        n_select = -(-covered // select_size)
        per_kv, per_kv_scores = [], []
        for kv in range(kv_heads):
            scores = []
            for s in range(n_select):
                if s in (0, n_select - 2, n_select - 1):  # 1 initial + 2 local blocks are always kept
                    scores.append(math.inf)
                    continue
                acc = 0.0
                for h in range(kv * group, (kv + 1) * group):
                    for m in range(r):
                        for nn in range(q):
                            idx = r * (s + 1) - m - nn  # Eq. 9 with j = s + 1
                            if 0 <= idx < n:
                                acc += probs[h][idx]
                scores.append(acc)
            per_kv.append(sorted(range(n_select), key=lambda s: (-scores[s], s))[:count])
            per_kv_scores.append(scores)
        topk.append(per_kv)
        all_scores.append(per_kv_scores)
    return out, topk, all_scores


# ============================================================================ inputs


def make_case(dtype=torch.float32, heads=8, kv_heads=2, dk=32, dv=16, page=16, cmp_size=32, stride=16,
              select_size=64, lens=(20, 33, 12), count=None, scale=0.3, seed=0, garbage=-1):
    g = torch.Generator().manual_seed(seed)
    lens = list(lens)
    need = [math.ceil(n / page) for n in lens]
    width = max(need) + 1
    num_blocks = sum(need) + 2
    ids = torch.randperm(num_blocks, generator=g)
    table = torch.full((len(lens), width), garbage, dtype=torch.int32)
    used = 0
    for b, k in enumerate(need):
        table[b, :k] = ids[used:used + k].to(torch.int32)
        used += k
    if count is None:
        count = min(((n - 1) * stride + cmp_size) // select_size for n in lens)
    query = (torch.randn(len(lens), heads, dk, generator=g) * 1.5).to(dtype)
    key = torch.randn(num_blocks, page, kv_heads * dk, generator=g).to(dtype)
    value = torch.randn(num_blocks, page, kv_heads * dv, generator=g).to(dtype)
    args = (query, key, value, scale, heads, kv_heads, select_size, count, page, cmp_size, stride)
    kwargs = dict(block_table=table, actual_cmp_seq_kvlen=lens)
    return args, kwargs


def check_against_oracle(args, kwargs, atol, rtol, exact_topk):
    query, key, value, scale, heads, kv_heads, select_size, count, page, cmp_size, stride = args
    out, topk = npu_nsa_compress_attention_infer(*args, **kwargs)
    want, want_topk, scores = oracle(query, key, value, scale, heads, kv_heads, select_size, count, page, cmp_size,
                                     stride, kwargs["block_table"], list(kwargs["actual_cmp_seq_kvlen"]))
    assert out.dtype == query.dtype and out.shape == want.shape
    assert topk.dtype == torch.int32 and list(topk.shape) == [len(want_topk), kv_heads, count]
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    if exact_topk:
        assert topk.tolist() == want_topk
        return
    # Rounding may swap near-tied blocks: the chosen blocks must carry the top scores.
    for b, per_kv in enumerate(topk.tolist()):
        for kv, chosen in enumerate(per_kv):
            got = [scores[b][kv][s] for s in chosen]
            best = [scores[b][kv][s] for s in want_topk[b][kv]]
            assert len(set(chosen)) == len(chosen)
            for x, y in zip(got, best):
                assert x == y or abs(x - y) <= 1e-4 * max(1.0, abs(y)), (got, best)


# (compress_block_size l, compress_stride d, select_block_size l')
BLOCK_CONFIGS = [(16, 16, 16), (32, 16, 64), (64, 32, 64), (32, 32, 32), (64, 16, 64), (32, 16, 32), (64, 64, 64),
                 (16, 16, 64)]


@pytest.mark.parametrize("cmp_size,stride,select_size", BLOCK_CONFIGS, ids=[f"l{c}_d{s}_sel{x}" for c, s, x in
                                                                           BLOCK_CONFIGS])
def test_matches_oracle_float64_block_configs(cmp_size, stride, select_size):
    args, kwargs = make_case(torch.float64, cmp_size=cmp_size, stride=stride, select_size=select_size,
                             lens=(40, 17, 71), seed=cmp_size + stride + select_size)
    check_against_oracle(args, kwargs, atol=1e-10, rtol=1e-10, exact_topk=True)


@pytest.mark.parametrize("heads,kv_heads,page", [(4, 4, 16), (2, 1, 32), (16, 2, 48), (8, 1, 128)],
                         ids=["mha", "g2_page32", "g8_page48", "g8_page128"])
def test_matches_oracle_float64_gqa_and_pages(heads, kv_heads, page):
    args, kwargs = make_case(torch.float64, heads=heads, kv_heads=kv_heads, page=page, lens=(50, 9 + page, 30, 13),
                             seed=heads * 7 + page)
    check_against_oracle(args, kwargs, atol=1e-10, rtol=1e-10, exact_topk=True)


def test_matches_oracle_float32():
    args, kwargs = make_case(torch.float32, lens=(60, 25, 44), seed=3)
    check_against_oracle(args, kwargs, atol=1e-6, rtol=1e-5, exact_topk=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_oracle_half_precision(dtype):
    # The oracle reads the same rounded inputs in float64; the only extra error is the final
    # cast of the fp32 result to fp16 (~5e-4 relative) or bf16 (~4e-3 relative).
    args, kwargs = make_case(dtype, dk=64, dv=32, lens=(48, 21), seed=11)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    check_against_oracle(args, kwargs, atol=tol, rtol=tol, exact_topk=False)


def test_few_selection_blocks_and_exact_count():
    # n_c = 1 -> n_s = 1; n_c = 2 -> n_s = 2 (l = d = l' = 16): only fixed blocks exist.
    args, kwargs = make_case(torch.float64, cmp_size=16, stride=16, select_size=16, lens=(1, 2, 2), count=1)
    out, topk = npu_nsa_compress_attention_infer(*args, **kwargs)
    assert topk[:, :, 0].tolist() == [[0, 0]] * 3
    args, kwargs = make_case(torch.float64, cmp_size=16, stride=16, select_size=16, lens=(2, 3), count=2)
    _, topk = npu_nsa_compress_attention_infer(*args, **kwargs)
    assert topk.tolist() == [[[0, 1]] * 2, [[0, 1]] * 2]
    check_against_oracle(args, kwargs, atol=1e-10, rtol=1e-10, exact_topk=True)


def test_fixed_blocks_come_first_in_golden_order():
    args, kwargs = make_case(torch.float64, lens=(90, 64), count=6, seed=5)
    _, topk = npu_nsa_compress_attention_infer(*args, **kwargs)
    for b, n in enumerate((90, 64)):
        n_select = math.ceil(((n - 1) * 16 + 32) / 64)
        for kv in range(2):
            assert topk[b, kv, :3].tolist() == [0, n_select - 2, n_select - 1]
            assert all(0 < s < n_select - 2 for s in topk[b, kv, 3:].tolist())


def test_importance_follows_eq9_with_j_equal_s_plus_1():
    """All attention mass on one compressed token c: the best non-fixed selection block is
    the s whose window r(s+1) - (m+n) hits c with the largest multiplicity."""
    cmp_size, stride, select_size = 32, 16, 64  # r = 4, q = 2: weights [1, 2, 2, 2, 1]
    args, kwargs = make_case(torch.float64, heads=1, kv_heads=1, cmp_size=cmp_size, stride=stride,
                             select_size=select_size, lens=(60,), count=4)
    query, key, value = args[:3]
    table = kwargs["block_table"]
    target = 21  # compressed token
    key.zero_()
    query.fill_(1.0)
    key[int(table[0, target // 16]), target % 16] = 10.0  # dominant score for token 21
    _, topk = npu_nsa_compress_attention_infer(*args, **kwargs)
    # Only s = 5 reaches c = 21: 4 * (5 + 1) - 21 = 3 is in [0, 4] (weight 2); s = 4 and 6 give -1 and 7.
    # (Geometrically right too: token 21 covers original tokens [336, 368), inside block 5 = [320, 384).)
    # Fixed blocks 0, 14, 15 (n_s = 16) come first.
    assert topk[0, 0, 3].item() == 5


def test_chunked_batches_match_unchunked(monkeypatch):
    args, kwargs = make_case(torch.float32, lens=(30, 47, 19, 64, 8 + 33), seed=21)
    out, topk = npu_nsa_compress_attention_infer(*args, **kwargs)
    monkeypatch.setattr(_library, "SCORE_BLOCK_BYTES", 1)  # one batch per chunk
    out1, topk1 = npu_nsa_compress_attention_infer(*args, **kwargs)
    torch.testing.assert_close(out1, out, atol=1e-6, rtol=1e-5)
    assert torch.equal(topk1, topk)


def test_lengths_as_tensor_and_seed_example_shapes():
    args, kwargs = make_case(torch.bfloat16, heads=8, kv_heads=2, dk=192, dv=128, page=128, lens=[1024, 700],
                             count=16)
    kwargs["actual_cmp_seq_kvlen"] = torch.tensor(kwargs["actual_cmp_seq_kvlen"])
    out, topk = npu_nsa_compress_attention_infer(*args, **kwargs)
    assert out.shape == (2, 8, 128) and out.dtype == torch.bfloat16
    assert topk.shape == (2, 2, 16) and topk.dtype == torch.int32
    assert topk[0, 0, :3].tolist() == [0, 255, 256]  # n_s = ceil((1023 * 16 + 32) / 64) = 257


# ============================================================================ opcheck, fake, signature


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype):
    args, kwargs = make_case(dtype, lens=(20, 9, 40), seed=1)
    torch.library.opcheck(OP, args, kwargs, test_utils=TEST_UTILS)


def test_opcheck_mha_small_pages():
    args, kwargs = make_case(torch.float32, heads=2, kv_heads=2, cmp_size=16, stride=16, select_size=32,
                             lens=(5, 12), seed=2)
    torch.library.opcheck(OP, args, kwargs, test_utils=TEST_UTILS)


def test_fake_output_shapes():
    args, kwargs = make_case(torch.float16, lens=(20, 9, 40))
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        kw = dict(kwargs, block_table=mode.from_tensor(kwargs["block_table"]))
        out, topk = OP(*fake_args, **kw)
    assert out.shape == (3, 8, 16) and out.dtype == torch.float16
    assert topk.shape == (3, 2, args[7]) and topk.dtype == torch.int32


def test_compile_matches_eager():
    args, kwargs = make_case(torch.float32, lens=(20, 33), seed=8)

    def fn(q, k, v, table):
        out, topk = npu_nsa_compress_attention_infer(q, k, v, *args[3:], block_table=table,
                                                     actual_cmp_seq_kvlen=kwargs["actual_cmp_seq_kvlen"])
        return out * 2, topk

    eager = fn(*args[:3], kwargs["block_table"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args[:3], kwargs["block_table"])
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1])


def test_public_signature_matches_schema():
    params = inspect.signature(npu_nsa_compress_attention_infer).parameters
    schema = OP._schema
    assert list(params) == [a.name for a in schema.arguments]
    for p, a in zip(params.values(), schema.arguments):
        assert (p.kind == inspect.Parameter.KEYWORD_ONLY) == a.kwarg_only, p.name
        if a.has_default_value():
            assert p.default == a.default_value, p.name
        else:
            assert p.default is inspect.Parameter.empty, p.name


# ============================================================================ constraint errors

NAMES = ["query", "key", "value", "scale_value", "head_num", "key_value_head_num", "select_block_size",
         "select_block_count", "page_block_size", "compress_block_size", "compress_stride"]


def _kw(dtype=torch.float16, **over):
    args, kwargs = make_case(dtype, lens=(20, 33, 12))
    full = dict(zip(NAMES, args), **kwargs)
    full.update(over)
    return full


def r(*shape, dtype=torch.float16):
    return torch.zeros(shape, dtype=dtype)


# key (8, 16, 64), value (8, 16, 32), query (3, 8, 32), table (3, 4) int32, lens (20, 33, 12): n_s >= 4,
# count = min(floor(((n - 1) * 16 + 32) / 64)) = 3.
ERRORS = [
    ("layout", lambda: _kw(layout="BSND"), "layout", True),
    ("atten_mask", lambda: _kw(atten_mask=r(3, 40, dtype=torch.bool)), "atten_mask", True),
    ("topk_mask", lambda: _kw(topk_mask=r(3, 10, dtype=torch.bool)), "topk_mask", True),
    ("actual_seq_qlen", lambda: _kw(actual_seq_qlen=[1, 2, 3]), "actual_seq_qlen", True),
    ("actual_sel_seq_kvlen", lambda: _kw(actual_sel_seq_kvlen=[336, 544, 208]), "actual_sel_seq_kvlen", True),
    ("block_table_required", lambda: _kw(block_table=None), "block_table", True),
    ("lens_required", lambda: _kw(actual_cmp_seq_kvlen=None), "actual_cmp_seq_kvlen", True),
    ("query_dtype", lambda: _kw(query=r(3, 8, 32, dtype=torch.int32)), "query.dtype", True),
    ("key_dtype", lambda: _kw(key=r(8, 16, 64, dtype=torch.bfloat16)), "key.dtype", True),
    ("value_dtype", lambda: _kw(value=r(8, 16, 32, dtype=torch.float32)), "value.dtype", True),
    ("block_table_dtype", lambda: _kw(block_table=r(3, 4, dtype=torch.int64)), "block_table.dtype", True),
    ("query_rank", lambda: _kw(query=r(3, 1, 8, 32)), "query.dim()", True),
    ("key_rank", lambda: _kw(key=r(8, 16, 2, 32)), "key.dim()", True),
    ("value_rank", lambda: _kw(value=r(8, 16, 2, 16)), "value.dim()", True),
    ("value_empty", lambda: _kw(value=r(8, 16, 0)), "value", True),
    ("block_table_rank", lambda: _kw(block_table=r(12, dtype=torch.int32)), "block_table.dim()", True),
    ("block_table_empty", lambda: _kw(block_table=r(3, 0, dtype=torch.int32)), "block_table", True),
    ("head_num_positive", lambda: _kw(head_num=0), "head_num", True),
    ("kv_heads_positive", lambda: _kw(key_value_head_num=0), "key_value_head_num", True),
    ("query_heads", lambda: _kw(head_num=4), "query.shape[1] (N)", True),
    ("head_multiple", lambda: _kw(query=r(3, 6, 32), head_num=6, key_value_head_num=4, key=r(8, 16, 128),
                                  value=r(8, 16, 64)), "head_num", True),
    ("group_not_divisor_of_128", lambda: _kw(query=r(3, 6, 32), head_num=6, key_value_head_num=1, key=r(8, 16, 32),
                                             value=r(8, 16, 16)), "head_num / key_value_head_num (group)", True),
    ("group_too_large", lambda: _kw(query=r(3, 256, 16), head_num=256, key_value_head_num=1, key=r(8, 16, 16),
                                    value=r(8, 16, 16)), "head_num / key_value_head_num (group)", True),
    ("key_hidden", lambda: _kw(key=r(8, 16, 48)), "key.shape[2] (H)", True),
    ("value_hidden", lambda: _kw(value=r(8, 16, 33)), "value.shape[2] (H)", True),
    ("qk_dim_limit", lambda: _kw(query=r(3, 8, 208), key=r(8, 16, 416)), "query.shape[2] (D)", True),
    ("v_dim_limit", lambda: _kw(query=r(3, 8, 192), key=r(8, 16, 384), value=r(8, 16, 288)),
     "value D (value.shape[2] / key_value_head_num)", True),
    ("qk_below_v", lambda: _kw(value=r(8, 16, 96)), "query.shape[2] (D)", True),
    ("block_num", lambda: _kw(value=r(7, 16, 32)), "value.shape[0] (block_num)", True),
    ("page_multiple", lambda: _kw(page_block_size=24, key=r(8, 24, 64), value=r(8, 24, 32)), "page_block_size", True),
    ("page_limit", lambda: _kw(page_block_size=144, key=r(8, 144, 64), value=r(8, 144, 32)), "page_block_size", True),
    ("key_page", lambda: _kw(key=r(8, 32, 64)), "key.shape[1] (block_size)", True),
    ("value_page", lambda: _kw(value=r(8, 32, 32)), "value.shape[1] (block_size)", True),
    ("cmp_size_set", lambda: _kw(compress_block_size=48), "compress_block_size", True),
    ("stride_set", lambda: _kw(compress_stride=8), "compress_stride", True),
    ("select_size_set", lambda: _kw(select_block_size=128), "select_block_size", True),
    ("cmp_below_stride", lambda: _kw(compress_block_size=16, compress_stride=32, select_block_size=64),
     "compress_block_size", True),
    ("select_below_cmp", lambda: _kw(compress_block_size=64, select_block_size=32), "select_block_size", True),
    ("count_positive", lambda: _kw(select_block_count=0), "select_block_count", True),
    ("lens_empty", lambda: _kw(actual_cmp_seq_kvlen=[]), "actual_cmp_seq_kvlen", True),
    ("query_not_single_token", lambda: _kw(query=r(4, 8, 32)), "query.shape[0] (T)", True),
    ("block_table_batch", lambda: _kw(block_table=r(2, 4, dtype=torch.int32)), "block_table.shape[0]", True),
    ("lens_zero", lambda: _kw(actual_cmp_seq_kvlen=[20, 0, 12]), "actual_cmp_seq_kvlen", True),
    ("lens_8192", lambda: _kw(actual_cmp_seq_kvlen=[20, 8193, 12], block_table=r(3, 600, dtype=torch.int32)),
     "actual_cmp_seq_kvlen", True),
    ("lens_beyond_table", lambda: _kw(actual_cmp_seq_kvlen=[20, 65, 12]), "actual_cmp_seq_kvlen", True),
    ("select_blocks_4096", lambda: _kw(actual_cmp_seq_kvlen=[20, 8192, 12], block_table=r(3, 512, dtype=torch.int32),
                                       compress_block_size=64, compress_stride=64, select_block_size=64),
     "actual_cmp_seq_kvlen", True),
    ("count_too_large", lambda: _kw(select_block_count=4), "select_block_count", True),
    # data rule: reference kernel only
    ("block_id_range", lambda: _kw(block_table=torch.tensor([[0, 1, -1, -1], [2, 3, 9, -1], [4, -1, -1, -1]],
                                                            dtype=torch.int32)), "block_table", False),
    ("block_id_negative", lambda: _kw(block_table=torch.tensor([[0, -3, 7, 7], [2, 3, 5, -1], [4, -1, -1, -1]],
                                                               dtype=torch.int32)), "block_table", False),
]


def _raises(kwargs, argument):
    with pytest.raises(NpuAttnArgumentError, match=r"^npu_nsa_compress_attention_infer: ") as info:
        npu_nsa_compress_attention_infer(**kwargs)
    assert str(info.value).split(": ", 1)[1].startswith(argument + " "), str(info.value)


@pytest.mark.parametrize("name,build,argument,shape_rule", ERRORS, ids=[e[0] for e in ERRORS])
def test_constraint_errors(name, build, argument, shape_rule):
    kwargs = build()
    _raises(kwargs, argument)
    if shape_rule:
        with FakeTensorMode() as mode:
            fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            _raises(fake, argument)


def test_unused_block_table_entries_may_be_garbage():
    args, kwargs = make_case(torch.float64, lens=(20, 33, 12), garbage=-7)
    check_against_oracle(args, kwargs, atol=1e-10, rtol=1e-10, exact_topk=True)

