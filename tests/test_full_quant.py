"""Full int8 quantisation (int8 query, key and value) of the prompt and fused ops.

Defined, as the torch_npu docs describe the three scales, as
    S   = (Q_int8 . K_int8^T) * dequant_scale1 * scale
    P8  = saturate_int8(round_half_even(softmax(S) * quant_scale1))
    out = (P8 . V_int8) * dequant_scale2          (float16 out)
and, with quant_scale2, the int8 output quantisation on top. The NPU computes
the softmax blockwise, so its rounding of P may differ from this normalised
form by one P unit; this reference is the documented formula.
"""

from __future__ import annotations

import torch

import npu_attn_graph.ops as npu


def _oracle(q, k, v, scale, deq1, qs1, deq2):
    b, n, sq, d = q.shape
    out = torch.zeros(b, n, sq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(n):
            s = (q[bi, h].double() @ k[bi, h].double().T) * deq1 * scale
            p = torch.softmax(s, dim=-1)
            p8 = torch.round(p * qs1).clamp(-128, 127)
            out[bi, h] = (p8 @ v[bi, h].double()) * deq2
    return out


def _inputs():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-20, 20, (2, 2, 5, 32), generator=g, dtype=torch.int8)
    k = torch.randint(-20, 20, (2, 2, 7, 32), generator=g, dtype=torch.int8)
    v = torch.randint(-20, 20, (2, 2, 7, 32), generator=g, dtype=torch.int8)
    return q, k, v


def test_prompt_flash_attention_full_int8():
    q, k, v = _inputs()
    deq1, qs1, deq2 = 0.01, 100.0, 0.002
    out = npu.npu_prompt_flash_attention(
        q, k, v, num_heads=2, input_layout="BNSD", scale_value=0.2, next_tokens=65535,
        deq_scale1=torch.tensor([deq1]), quant_scale1=torch.tensor([qs1]), deq_scale2=torch.tensor([deq2]))
    assert out.dtype == torch.float16
    expected = _oracle(q, k, v, 0.2, deq1, qs1, deq2)
    # float16 output: one half-precision ulp of the largest values.
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-3)


def test_fused_infer_full_int8_with_int8_output():
    q, k, v = _inputs()
    deq1, qs1, deq2, qs2 = 0.01, 100.0, 0.002, 20.0
    out, _ = npu.npu_fused_infer_attention_score(
        q, k, v, num_heads=2, input_layout="BNSD", scale=0.2, dequant_scale1=torch.tensor([deq1]),
        quant_scale1=torch.tensor([qs1]), dequant_scale2=torch.tensor([deq2]), quant_scale2=torch.tensor([qs2]))
    assert out.dtype == torch.int8
    expected = torch.round(_oracle(q, k, v, 0.2, deq1, qs1, deq2) * qs2).clamp(-128, 127)
    assert (out.double() - expected).abs().max() <= 1  # fp32 vs fp64 at rounding ties
