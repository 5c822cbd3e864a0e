"""GE converter for npu_attn::npu_fusion_attention -> GE ``FlashAttentionScore``."""

from __future__ import annotations

import torch

from ._fusion import unsupported_fusion_arguments
from ._ge import INT_MAX, Tensor, ge, int_list_input, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_fusion_attention.default)
def convert_fusion_attention(
    query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str, pse: Tensor | None = None,
    padding_mask: Tensor | None = None, atten_mask: Tensor | None = None, scale: float = 1.0,
    keep_prob: float = 1.0, pre_tockens: int = INT_MAX, next_tockens: int = INT_MAX, inner_precise: int = 0,
    prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode: int = 0,
    gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "", sink: Tensor | None = None,
    dropout_mask: Tensor | None = None, seed: int = 0, offset: int = 0, meta_outputs=None,
):
    """npu_attn::npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout,
    Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., float keep_prob=1.,
    int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int[]? prefix=None,
    int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True,
    bool sync=False, str softmax_layout="", Tensor? sink=None, Tensor? dropout_mask=None, int seed=0,
    int offset=0) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)

    GE op type: FlashAttentionScore, whose outputs are (softmax_max, softmax_sum,
    softmax_out, attention_out); the op returns attention_out first. pse feeds GE's
    real_shift. Dropout (keep_prob < 1) does not convert: on the NPU the mask comes
    from (seed, offset) through a separate generator op, bit-packed, which this
    converter does not build (and the op takes no dropout_mask with keep_prob < 1).
    seed and offset are echoed as in the reference; numels is the op's own value.
    """
    unsupported_fusion_arguments("npu_fusion_attention", softmax_layout, sink)
    if keep_prob < 1.0:
        raise NotImplementedError(f"npu_fusion_attention: keep_prob={keep_prob} needs the NPU's dropout-mask "
                                  "generator (from seed and offset), which this converter does not build")
    softmax_max, softmax_sum, softmax_out, attention_out = ge.FlashAttentionScore(
        query, key, value, real_shift=pse, drop_mask=None,
        padding_mask=padding_mask, atten_mask=atten_mask, prefix=int_list_input(prefix),
        actual_seq_qlen=int_list_input(actual_seq_qlen), actual_seq_kvlen=int_list_input(actual_seq_kvlen),
        q_start_idx=None, kv_start_idx=None, head_num=head_num, input_layout=input_layout, scale_value=scale,
        keep_prob=keep_prob, pre_tockens=pre_tockens, next_tockens=next_tockens, inner_precise=inner_precise,
        sparse_mode=sparse_mode)
    # TorchAir hands meta outputs over wrapped (TensorSpec); numels is the traced int.
    numels = getattr(meta_outputs[6], "_meta", meta_outputs[6]) if meta_outputs is not None else 0
    return attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels
