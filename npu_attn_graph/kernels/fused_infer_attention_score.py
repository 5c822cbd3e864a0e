"""npu_fused_infer_attention_score: the unified inference attention op.

Schema: torch_npu 2.13.0's (namespace npu_attn), written once, in the ``define`` call below;
the drop-in function's docstring shows it.

Query S == 1 takes the incremental path (sparse_mode, pre/next tokens ignored;
masks (B, KV_S)-shaped), S > 1 the prompt path (sparse modes 0-4 as in
npu_prompt_flash_attention). Beyond those two ops it adds:
- layouts TND (actual_seq_lengths / actual_seq_lengths_kv cumulative; with
  block_table actual_seq_lengths_kv is per batch) and BNSD_BSND;
- softmax_lse (B, N, Q_S, 1) float32 ((T, N, 1) for TND) when
  softmax_lse_flag, else a one-element zero tensor; +inf marks empty rows;
- antiquant_mode 0 per-channel / 1 per-token (2, B, S) float32, and separate
  key_/value_antiquant_* with modes 0-5 (see _inference.Antiquant);
- query_padding_size (query left padding), kv_padding_size (KV left padding);
- shared prefix (key/value_shared_prefix, actual_shared_prefix_len) placed
  before every batch's keys; query_rope/key_rope concatenated to the head dim.
inner_precise 0-3 is accepted; the reference computes in fp32 and always
zeroes rows with nothing to attend to (the NPU's row-invalid correction).
block_table entries and unread positions follow npu_incre_flash_attention:
used entries must be in [0, blocknum), and K/V (or per-token antiquant
scales, rope keys, shared prefix positions) the NPU does not read may hold
NaN/inf without reaching the outputs.
"""

from __future__ import annotations



from ._inference import Antiquant, InferenceCall
from ._inference_kernel import register_inference_op
from ._layouts import parse_layout
from ._dropin import dropin
from ._library import check, define
from .incre_flash_attention import split_combined_antiquant

__all__ = ["npu_fused_infer_attention_score"]

OP = "npu_fused_infer_attention_score"
LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")

QUALNAME = define(
    OP,
    '(Tensor query, Tensor key, Tensor value, *, Tensor? pse_shift=None, Tensor? atten_mask=None, '
    'SymInt[]? actual_seq_lengths=None, SymInt[]? actual_seq_lengths_kv=None, Tensor? dequant_scale1=None, '
    'Tensor? quant_scale1=None, Tensor? dequant_scale2=None, Tensor? quant_scale2=None, '
    'Tensor? quant_offset2=None, Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, '
    'Tensor? key_antiquant_scale=None, Tensor? key_antiquant_offset=None, '
    'Tensor? value_antiquant_scale=None, Tensor? value_antiquant_offset=None, Tensor? block_table=None, '
    'Tensor? query_padding_size=None, Tensor? kv_padding_size=None, Tensor? key_shared_prefix=None, '
    'Tensor? value_shared_prefix=None, SymInt[]? actual_shared_prefix_len=None, Tensor? query_rope=None, '
    'Tensor? key_rope=None, Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, '
    'int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout="BSH", '
    'int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0, '
    'int antiquant_mode=0, int key_antiquant_mode=0, int value_antiquant_mode=0, '
    'bool softmax_lse_flag=False) -> (Tensor, Tensor)',
)


def _separate_antiquant(name: str, scale, offset, mode: int) -> Antiquant | None:
    if scale is None:
        check(offset is None, OP, f"{name}_antiquant_offset", f"requires {name}_antiquant_scale", "a tensor")
        return None
    return Antiquant(scale, offset, mode, f"{name}_antiquant_scale")


def _call(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
          actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
          quant_scale2=None, quant_offset2=None, antiquant_scale=None, antiquant_offset=None,
          key_antiquant_scale=None, key_antiquant_offset=None, value_antiquant_scale=None,
          value_antiquant_offset=None, block_table=None, query_padding_size=None, kv_padding_size=None,
          key_shared_prefix=None, value_shared_prefix=None, actual_shared_prefix_len=None, query_rope=None,
          key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0, pre_tokens=2147483647,
          next_tokens=2147483647, input_layout="BSH", num_key_value_heads=0, sparse_mode=0, inner_precise=0,
          block_size=0, antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0,
          softmax_lse_flag=False) -> InferenceCall:
    check(inner_precise in (0, 1, 2, 3), OP, "inner_precise", "must be 0, 1, 2 or 3", inner_precise)
    check(antiquant_mode in (0, 1), OP, "antiquant_mode", "must be 0 (per-channel) or 1 (per-token)", antiquant_mode)
    check(key_rope_antiquant_scale is None, OP, "key_rope_antiquant_scale",
          "is not supported by the reference kernel (int8 rope keys)", "a tensor")
    key_aq, value_aq = split_combined_antiquant(OP, antiquant_scale, antiquant_offset, antiquant_mode)
    # Separate key/value parameters take precedence over the combined ones.
    separate_key = _separate_antiquant("key", key_antiquant_scale, key_antiquant_offset, key_antiquant_mode)
    separate_value = _separate_antiquant("value", value_antiquant_scale, value_antiquant_offset,
                                         value_antiquant_mode)
    check((separate_key is None) == (separate_value is None), OP, "key_antiquant_scale/value_antiquant_scale",
          "must be given together", "only one")
    if separate_key is not None:
        key_aq, value_aq = separate_key, separate_value
    return InferenceCall(
        op=OP, query=query, key=key, value=value, layout=parse_layout(OP, input_layout, LAYOUTS),
        num_heads=num_heads, num_key_value_heads=num_key_value_heads, scale=scale,
        atten_mask=atten_mask, pse_shift=pse_shift,
        q_lens=actual_seq_lengths, q_lens_name="actual_seq_lengths",
        kv_lens=actual_seq_lengths_kv, kv_lens_name="actual_seq_lengths_kv",
        sparse_mode=sparse_mode, pre_tokens=pre_tokens, next_tokens=next_tokens,
        block_table=block_table, block_size=block_size,
        kv_padding_size=kv_padding_size, query_padding_size=query_padding_size,
        key_antiquant=key_aq, value_antiquant=value_aq,
        dequant_scale1=dequant_scale1, quant_scale1=quant_scale1, dequant_scale2=dequant_scale2,
        quant_scale2=quant_scale2, quant_offset2=quant_offset2,
        key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
        shared_prefix_len=actual_shared_prefix_len, query_rope=query_rope, key_rope=key_rope,
        softmax_lse=softmax_lse_flag,
    )


def _npu(query, key, value, **kwargs):
    import torch_npu

    return torch_npu.npu_fused_infer_attention_score(query, key, value, **kwargs)


register_inference_op(QUALNAME, _call, _npu, returns_lse=True)


npu_fused_infer_attention_score = dropin(QUALNAME, __name__)
