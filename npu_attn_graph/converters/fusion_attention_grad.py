"""GE converter for npu_attn::npu_fusion_attention_grad -> GE ``FlashAttentionScoreGrad``."""

from __future__ import annotations

import torch

from ._fusion import unsupported_fusion_arguments
from ._ge import INT_MAX, DataType, Tensor, ge, int_list_input, register_fx_node_ge_converter


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_fusion_attention_grad.default)
def convert_fusion_attention_grad(
    query: Tensor, key: Tensor, value: Tensor, dy: Tensor, head_num: int, input_layout: str, *,
    pse: Tensor | None = None, padding_mask: Tensor | None = None, atten_mask: Tensor | None = None,
    softmax_max: Tensor | None = None, softmax_sum: Tensor | None = None, softmax_in: Tensor | None = None,
    attention_in: Tensor | None = None, scale_value: float = 1.0, keep_prob: float = 1.0,
    pre_tockens: int = INT_MAX, next_tockens: int = INT_MAX, inner_precise: int = 0, seed: int = 0,
    offset: int = 0, numels: int = 0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
    sparse_mode: int = 0, gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "",
    sink: Tensor | None = None, meta_outputs=None,
):
    """npu_attn::npu_fusion_attention_grad(Tensor query, Tensor key, Tensor value, Tensor dy, int head_num,
    str input_layout, *, Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None,
    Tensor? softmax_max=None, Tensor? softmax_sum=None, Tensor? softmax_in=None, Tensor? attention_in=None,
    float scale_value=1., float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647,
    int inner_precise=0, int seed=0, int offset=0, int numels=0, int[]? prefix=None,
    int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True,
    bool sync=False, str softmax_layout="", Tensor? sink=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)

    GE op type: FlashAttentionScoreGrad (outputs dq, dk, dv, dpse). pse feeds
    pse_shift. The fifth output (dsink) is a float32 zero scalar, as in the
    reference without a sink. Dropout converts only with keep_prob == 1: the grad
    would need the forward's generated mask.
    """
    unsupported_fusion_arguments("npu_fusion_attention_grad", softmax_layout, sink)
    if keep_prob < 1.0:
        raise NotImplementedError(f"npu_fusion_attention_grad: keep_prob={keep_prob} needs the NPU's dropout "
                                  "mask for (seed, offset), which this converter does not build")
    dq, dk, dv, dpse = ge.FlashAttentionScoreGrad(
        query, key, value, dy, pse_shift=pse, drop_mask=None, padding_mask=padding_mask, atten_mask=atten_mask,
        softmax_max=softmax_max, softmax_sum=softmax_sum, softmax_in=softmax_in, attention_in=attention_in,
        prefix=int_list_input(prefix), actual_seq_qlen=int_list_input(actual_seq_qlen),
        actual_seq_kvlen=int_list_input(actual_seq_kvlen), q_start_idx=None, kv_start_idx=None,
        head_num=head_num, input_layout=input_layout, scale_value=scale_value, keep_prob=keep_prob,
        pre_tockens=pre_tockens, next_tockens=next_tockens, inner_precise=inner_precise, sparse_mode=sparse_mode)
    return dq, dk, dv, dpse, ge.Const(0.0, dtype=DataType.DT_FLOAT)
