"""npu_incre_flash_attention: incremental (decode) flash attention, query S == 1.

Schema: torch_npu 2.13.0's (namespace npu_attn), written once, in the ``define`` call below;
the drop-in function's docstring shows it.

out = softmax(scale_value * q K^T + pse_shift, masked) V with:
- actual_seq_lengths: the valid KV length of each batch (KV right padding), or
  with kv_padding_size the KV left padding [S - pad - len, S - pad);
- atten_mask (B, KV_S) / (B, 1, KV_S) / (B, 1, 1, KV_S), True/1 = masked out;
- paged KV: block_table (B, max_blocks) int32 + block_size, caches
  (blocknum, blocksize, H) or (blocknum, numKvHeads, blocksize, D) (BNSD query);
  the first ceil(actual_seq_lengths[b] / block_size) entries of row b must be
  in [0, blocknum) (checked by the reference kernel), later ones may hold
  anything (-1, 0);
- positions the NPU does not read (past a batch's length or outside its left
  padded range, unused paged slots and blocks) may hold anything, NaN and inf
  included: they never reach the output;
- int8 KV: antiquant_scale/antiquant_offset (2, ...) with key at index 0 and
  value at index 1, dequantised as (x + offset) * scale, per-channel
  ((2, N, 1, D) BNSD, (2, N, D) BSND, (2, H) BSH) or per-tensor (2,);
- int8 output via quant_scale2/quant_offset2. inner_precise is accepted; the
  reference always computes in fp32.
"""

from __future__ import annotations


import torch

from ._inference import Antiquant, InferenceCall
from ._inference_kernel import register_inference_op
from ._layouts import parse_layout
from ._dropin import dropin
from ._library import check, define

__all__ = ["npu_incre_flash_attention"]

OP = "npu_incre_flash_attention"
LAYOUTS = ("BSH", "BSND", "BNSD")

QUALNAME = define(
    OP,
    '(Tensor query, Tensor key, Tensor value, *, Tensor? padding_mask=None, Tensor? atten_mask=None, '
    'Tensor? pse_shift=None, SymInt[]? actual_seq_lengths=None, Tensor? antiquant_scale=None, '
    'Tensor? antiquant_offset=None, Tensor? block_table=None, Tensor? dequant_scale1=None, '
    'Tensor? quant_scale1=None, Tensor? dequant_scale2=None, Tensor? quant_scale2=None, '
    'Tensor? quant_offset2=None, Tensor? kv_padding_size=None, int num_heads=1, float scale_value=1.0, '
    'str input_layout="BSH", int num_key_value_heads=0, int block_size=0, int inner_precise=1) -> Tensor',
)


def split_combined_antiquant(
    op: str, scale: torch.Tensor | None, offset: torch.Tensor | None, mode: int
) -> tuple[Antiquant | None, Antiquant | None]:
    """antiquant_scale/offset carry key at index 0 and value at index 1."""
    if scale is None:
        check(offset is None, op, "antiquant_offset", "requires antiquant_scale", "a tensor")
        return None, None
    check(scale.dim() >= 1 and scale.shape[0] == 2, op, "antiquant_scale.shape[0]",
          "must be 2 (key scales, value scales)", tuple(scale.shape))
    if offset is not None:
        check(offset.shape == scale.shape, op, "antiquant_offset.shape",
              f"must equal antiquant_scale.shape {tuple(scale.shape)}", tuple(offset.shape))

    def part(i: int) -> Antiquant:
        s = scale[i] if scale.dim() > 1 else scale[i : i + 1]
        o = None if offset is None else (offset[i] if offset.dim() > 1 else offset[i : i + 1])
        return Antiquant(s, o, mode, "antiquant_scale")

    return part(0), part(1)


def _call(query, key, value, *, padding_mask=None, atten_mask=None, pse_shift=None, actual_seq_lengths=None,
          antiquant_scale=None, antiquant_offset=None, block_table=None, dequant_scale1=None, quant_scale1=None,
          dequant_scale2=None, quant_scale2=None, quant_offset2=None, kv_padding_size=None, num_heads=1,
          scale_value=1.0, input_layout="BSH", num_key_value_heads=0, block_size=0,
          inner_precise=1) -> InferenceCall:
    check(inner_precise in (0, 1), OP, "inner_precise", "must be 0 (high precision) or 1 (high performance)",
          inner_precise)
    key_aq, value_aq = split_combined_antiquant(OP, antiquant_scale, antiquant_offset, 0)
    return InferenceCall(
        op=OP, query=query, key=key, value=value, layout=parse_layout(OP, input_layout, LAYOUTS),
        num_heads=num_heads, num_key_value_heads=num_key_value_heads, scale=scale_value,
        atten_mask=atten_mask, pse_shift=pse_shift,
        kv_lens=actual_seq_lengths, kv_lens_name="actual_seq_lengths",
        block_table=block_table, block_size=block_size, kv_padding_size=kv_padding_size,
        key_antiquant=key_aq, value_antiquant=value_aq,
        dequant_scale1=dequant_scale1, quant_scale1=quant_scale1, dequant_scale2=dequant_scale2,
        quant_scale2=quant_scale2, quant_offset2=quant_offset2, incremental_only=True,
    )


def _npu(query, key, value, **kwargs):
    import torch_npu

    return torch_npu.npu_incre_flash_attention(query, key, value, **kwargs)


register_inference_op(QUALNAME, _call, _npu, returns_lse=False)


npu_incre_flash_attention = dropin(QUALNAME, __name__)
