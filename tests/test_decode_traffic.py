"""Structure checks of a decode step (issue 15, goals 3 and 5): never timed.

- npu_attn_graph.traffic counts, on a hand-made graph, the bytes computed by hand below;
- a float16 tiny Llama decode step, as handed to TorchAir and as GE graph, moves no
  whole KV cache besides the attention ops' own reads (no cast, copy, repeat_kv); the
  same model in float32 does (its cache is cast for the float16 fused op), and the
  counter says so: the check can fail;
- the Inductor executor's output code calls our fused ops.
"""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from npu_attn_graph.traffic import fx_traffic

ops = torch.ops.npu_attn
F16 = 2  # bytes per float16 element


def _step(w, x, q, k_cache, v_cache, k_new, v_new, index):
    """A decode step by hand: a projection, two in-place cache writes, attention over 5 of 8 slots,
    and a float32 copy of the whole key cache (the thing the report must flag)."""
    y = torch.mm(x, w)
    k = ops.scatter_update_(k_cache, index, k_new, -2)
    v = ops.scatter_update_(v_cache, index, v_new, -2)
    out = ops.npu_incre_flash_attention(q, k, v, num_heads=2, input_layout="BNSD", actual_seq_lengths=[5, 5])
    return y, out, k.float()


def test_traffic_of_a_hand_made_graph_equals_the_hand_count():
    B, N, S, D = 2, 2, 8, 16
    inputs = (torch.randn(64, 64, dtype=torch.half), torch.randn(2, 64, dtype=torch.half),
              torch.randn(B, N, 1, D, dtype=torch.half), torch.zeros(B, N, S, D, dtype=torch.half),
              torch.zeros(B, N, S, D, dtype=torch.half), torch.randn(B, N, 1, D, dtype=torch.half),
              torch.randn(B, N, 1, D, dtype=torch.half), torch.tensor([3, 3]))
    gm = make_fx(_step, tracing_mode="fake")(*inputs)
    t = fx_traffic(gm, valid_kv=5)
    cache, row, query = B * N * S * D * F16, B * N * 1 * D * F16, B * N * 1 * D * F16  # 1024, 128, 128
    mm = (2 * 64 + 64 * 64 + 2 * 64) * F16  # x and w read, y written
    write = 2 * 8 + row + row  # indices (int64) and the new row read, the row written: in place
    attention = query + 2 * cache * 5 // 8 + query  # q, the 5 valid of 8 slots of K and V, the output
    cast = cache + cache * 2  # the whole key cache read, written as float32
    by_op = {o.op: o.total for o in t.ops}
    assert by_op["mm"] == mm and by_op["npu_attn.npu_incre_flash_attention"] == attention
    assert by_op["npu_attn.scatter_update_"] == write and by_op["_to_copy"] == cast
    assert t.total == mm + 2 * write + attention + cast
    # Ideal: the floating inputs other than the caches once, the valid K/V once, the new rows once.
    weights = (64 * 64 + 2 * 64) * F16 + query + 2 * row
    assert (t.ideal.weights, t.ideal.kv_read, t.ideal.kv_written) == (weights, 2 * cache * 5 // 8, 2 * row)
    assert t.ratio == pytest.approx(t.total / (weights + 2 * cache * 5 // 8 + 2 * row))
    (flagged,) = t.whole_cache()
    assert flagged.op == "_to_copy" and flagged.whole_cache == "cast" and flagged.total == cast
    assert "float16 -> float32" in flagged.note
    assert any("_to_copy" in line and "remedy" in line for line in t.lines())


def _decode_ge(dtype, tmp_path):
    pytest.importorskip("transformers")
    from models import build, static_decode_to_ge

    model = build("llama", "sdpa").to(dtype)
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    result = static_decode_to_ge(model, ids, tmp_path)
    assert result.single_graph, result.summary()
    fx, ge = result.report.traffic(result.graphs)
    return result, fx, ge


def test_float16_llama_decode_moves_no_whole_cache_but_float32_casts_it(tmp_path):
    result, fx, ge = _decode_ge(torch.float16, tmp_path / "f16")
    assert all(s.rewritten for s in result.report.sites), result.report.table()
    assert not fx.whole_cache() and not ge.whole_cache(), "\n".join(fx.lines() + ge.lines())
    # The decode attention reads its KV lengths (static_cache_lengths: the mask is j <= cache_position).
    attention = [o for o in fx.ops if o.op == "npu_attn.npu_incre_flash_attention_paged"]
    assert all("lengths tensor" in o.note for o in attention), "\n".join(fx.lines())
    writes = [o for o in fx.ops if o.op == "npu_attn.scatter_update"]
    assert len(attention) == 2 and len(writes) == 4 and all("in place" in o.note for o in writes)
    # K/V once each, un-repeated (gqa_repeat_kv): 2 layers x 2 caches x (2, 2 KV heads, 32, 16) float16.
    assert fx.ideal.kv_read == 2 * 2 * (2 * 2 * 32 * 16) * 2
    assert sum(o.read for o in attention) >= fx.ideal.kv_read

    _, fx32, ge32 = _decode_ge(torch.float32, tmp_path / "f32")
    casts = [o for o in fx32.whole_cache() if o.whole_cache == "cast"]
    assert len(casts) == 4, "\n".join(fx32.lines())  # K and V of 2 layers, float32 -> float16
    assert all("float32 -> float16" in o.note for o in casts)
    assert [o for o in ge32.whole_cache() if o.op == "Cast"], "\n".join(ge32.lines())
    assert fx32.ratio > fx.ratio


def test_inductor_output_code_calls_the_fused_ops():
    from torch._inductor.utils import run_and_get_code

    from npu_attn_graph.backend import NpuAttnBackend

    def step(k_cache, v_cache, position, k, v, q):
        k_cache.index_copy_(2, position, k)
        v_cache.index_copy_(2, position, v)
        return torch.softmax(q @ k_cache.transpose(-1, -2) * 0.25, dim=-1) @ v_cache

    caches = [torch.zeros(1, 2, 8, 16) for _ in range(2)]
    k, v, q = (torch.randn(1, 2, 1, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=NpuAttnBackend(executor="inductor"))
    _, code = run_and_get_code(compiled, *caches, torch.tensor([0]), k, v, q)
    text = "\n".join(code)
    assert "torch.ops.npu_attn.npu_incre_flash_attention.default(" in text, text
    assert text.count("torch.ops.npu_attn.scatter_update_into.default(") == 2, text  # in place
    assert "aten.index_copy" not in text and "softmax" not in text.replace("npu_", "")


def test_explain_prints_the_ratio_and_the_float32_cast_it_would_cost_on_ge(capsys):
    pytest.importorskip("transformers")
    from npu_attn_graph.cli import main

    assert main(["explain", "demo:llama"]) == 0  # a float32 Llama decode step
    out = capsys.readouterr().out
    assert "memory traffic per call" in out and "x ideal" in out and "top: " in out
    assert "float32 attention over KV caches: bound for GE" in out and "deploy the model in float16/bfloat16" in out
