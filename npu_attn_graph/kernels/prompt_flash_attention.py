"""npu_prompt_flash_attention: full (prefill) flash attention.

Schema: torch_npu 2.13.0's (namespace npu_attn), written once, in the ``define`` call below;
the drop-in function's docstring shows it.

out = softmax(scale_value * Q K^T + pse_shift, masked) V per head, with:
- atten_mask True/1 = masked out; sparse_mode 0 (mask + pre/next band anchored
  top-left, no band without a mask), 1 (mask only), 2 (leftUpCausal), 3
  (rightDownCausal), 4 (band anchored bottom-right), modes 2-4 taking the
  compressed triu(2048x2048) mask;
- actual_seq_lengths / actual_seq_lengths_kv per batch (cumulative for TND);
  the bottom-right anchor follows the actual lengths;
- GQA through num_key_value_heads; int8 output via quant_scale2/quant_offset2;
  full int8 inputs via deq_scale1/quant_scale1/deq_scale2.
Rows past a batch's actual length, and rows with nothing to attend to, are 0.
"""

from __future__ import annotations



from ._inference import InferenceCall
from ._inference_kernel import register_inference_op
from ._layouts import parse_layout
from ._dropin import dropin
from ._library import define

__all__ = ["npu_prompt_flash_attention"]

OP = "npu_prompt_flash_attention"
LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")

QUALNAME = define(
    OP,
    '(Tensor query, Tensor key, Tensor value, *, Tensor? padding_mask=None, Tensor? atten_mask=None, '
    'Tensor? pse_shift=None, int[]? actual_seq_lengths=None, Tensor? deq_scale1=None, '
    'Tensor? quant_scale1=None, Tensor? deq_scale2=None, Tensor? quant_scale2=None, '
    'Tensor? quant_offset2=None, int num_heads=1, float scale_value=1.0, int pre_tokens=2147483647, '
    'int next_tokens=0, str input_layout="BSH", int num_key_value_heads=0, '
    'int[]? actual_seq_lengths_kv=None, int sparse_mode=0) -> Tensor',
)


def _call(query, key, value, *, padding_mask=None, atten_mask=None, pse_shift=None, actual_seq_lengths=None,
          deq_scale1=None, quant_scale1=None, deq_scale2=None, quant_scale2=None, quant_offset2=None,
          num_heads=1, scale_value=1.0, pre_tokens=2147483647, next_tokens=0, input_layout="BSH",
          num_key_value_heads=0, actual_seq_lengths_kv=None, sparse_mode=0) -> InferenceCall:
    # padding_mask is reserved by torch_npu and unused.
    return InferenceCall(
        op=OP, query=query, key=key, value=value, layout=parse_layout(OP, input_layout, LAYOUTS),
        num_heads=num_heads, num_key_value_heads=num_key_value_heads, scale=scale_value,
        atten_mask=atten_mask, pse_shift=pse_shift,
        q_lens=actual_seq_lengths, q_lens_name="actual_seq_lengths",
        kv_lens=actual_seq_lengths_kv, kv_lens_name="actual_seq_lengths_kv",
        sparse_mode=sparse_mode, pre_tokens=pre_tokens, next_tokens=next_tokens,
        dequant_scale1=deq_scale1, dequant_scale1_name="deq_scale1", quant_scale1=quant_scale1,
        dequant_scale2=deq_scale2, dequant_scale2_name="deq_scale2",
        quant_scale2=quant_scale2, quant_offset2=quant_offset2,
    )


def _npu(query, key, value, **kwargs):
    import torch_npu

    return torch_npu.npu_prompt_flash_attention(query, key, value, **kwargs)


register_inference_op(QUALNAME, _call, _npu, returns_lse=False)


npu_prompt_flash_attention = dropin(QUALNAME, __name__)

