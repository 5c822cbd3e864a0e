"""npu_fused_infer_attention_score_v2: the unified inference attention op, v2 argument set.

Schema: torch_npu 2.13.0's (namespace npu_attn; read from the wheel's
torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml), written once, in the ``define``
call below; the drop-in function's docstring shows it.

The same computation as npu_fused_infer_attention_score (see that module and
_inference.InferenceCall), under new argument names, without shared prefix,
left padding or the combined (2, ...) antiquant parameters (the torch_npu doc:
"当不涉及system prefix、左padding、kv量化参数合一、pertensor全量化的场景，推荐使用本接口"),
plus learnable_sink. Mapping onto the shared InferenceCall (and onto the v1
op's arguments, as TorchAir's converter wires both to GE FusedInferAttentionScore):

    num_query_heads -> num_heads           softmax_scale -> scale
    actual_seq_qlen -> actual_seq_lengths  actual_seq_kvlen -> actual_seq_lengths_kv
    dequant_scale_key / dequant_offset_key / key_quant_mode
        -> key_antiquant_scale / key_antiquant_offset / key_antiquant_mode (int8 KV, modes 0-5)
    dequant_scale_value / dequant_offset_value / value_quant_mode -> the value_* ones
    quant_scale_out / quant_offset_out -> quant_scale2 / quant_offset2 (int8 output)
    return_softmax_lse -> softmax_lse_flag
    learnable_sink -> InferenceCall.learnable_sink (GE input learnable_sink)

learnable_sink (torch_npu doc of npu_fused_infer_attention_score_v2, Ascend/op-plugin
docs/context; CANN ops-transformer attention/fused_infer_attention_score and
prompt_flash_attention sources):
- shape (Q_N,) = (num_query_heads,), one logit per query head; dtype bfloat16
  (the doc; the GE op def declares DT_BF16 only). On the NPU it is only taken
  with input_layout TND/NTD_TND and value head dim 64 or 128 (doc "仅支持TND、
  NTD_TND; 仅支持value的d小于等于128"; the FusedInferAttentionScore tiling
  refuses anything but TND/NTD_TND with D 64/128). These three rules are
  enforced for tensors on the NPU; off the NPU the reference takes any layout
  and head dim, and a floating sink of any reference dtype, so the sink can be
  checked in every mode.
- semantics: a softmax column with logit sink[h] and no value, dropped after
  the softmax (torch_npu's own golden for the op concatenates the sink to the
  scores, softmaxes, and drops the column): out = sum_j e^(s_j - m) v_j /
  (sum_j e^(s_j - m) + e^(sink_h - m)). The PFA kernel adds e^(sink - max) to
  the row sum just before dividing the P @ V result. A row with no attended key
  outputs 0.
- softmax_lse does NOT include the sink: the kernel writes softmax_lse =
  log(sum) + max in its softmax stage, before the stage that adds the sink term
  (prompt_flash_attention_s1s2_bns1_mla_baseapi.h: SoftMaxCompute writes the
  lse, Bmm2ResultDiv adds the sink). So lse is the log-sum-exp of the attended
  scores alone, +inf for a row with none, as without a sink.

softmax_lse with return_softmax_lse=False is a one-element zero tensor, as the
doc says ("输出shape为[1]的值为0的Tensor") and as npu_fused_infer_attention_score
does here (torch_npu 2.13's meta function returns an empty (0,) tensor).

Arguments without reference semantics are refused (NpuAttnArgumentError)
unless at their defaults: dequant_scale_query / query_quant_mode and int8
queries (full quantisation, per-token-per-head query scales), quant_scale_p,
dequant_scale_key_rope (reserved in the doc), the *_dtype overrides and
out_dtype (fp8 / hifloat8 / fp4 reinterpretations). The input layouts with
NTD or NBSD parts (documented for torch_npu) are refused by the reference too.
Documented rules enforced here besides the shared ones: dequant_scale_key and
dequant_scale_value (and the offsets) come together; key_quant_mode equals
value_quant_mode except key 0 with value 1; inner_precise is 0-3 and 0/1 when
Q_S is 1; int8 key/value need dequant_scale_key.
"""

from __future__ import annotations


import torch

from ._inference import Antiquant, InferenceCall
from ._inference_kernel import register_inference_op
from ._layouts import batch_and_seq, layout_rank, parse_layout
from ._dropin import dropin
from ._library import check, define

__all__ = ["npu_fused_infer_attention_score_v2"]

OP = "npu_fused_infer_attention_score_v2"
LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")
# torch_npu's further layouts (op-plugin's layout map): valid names the reference does not implement.
UNSUPPORTED_LAYOUTS = ("NTD", "NTD_TND", "TND_NTD", "BSH_NBSD", "BSND_NBSD", "BNSD_NBSD", "BSH_BNSD", "BSND_BNSD",
                       "NSD")
DTYPE_ARGUMENTS = ("query_dtype", "key_dtype", "value_dtype", "query_rope_dtype", "key_rope_dtype",
                   "key_shared_prefix_dtype", "value_shared_prefix_dtype", "dequant_scale_query_dtype",
                   "dequant_scale_key_dtype", "dequant_scale_value_dtype", "dequant_scale_key_rope_dtype",
                   "out_dtype")

QUALNAME = define(
    OP,
    '(Tensor query, Tensor key, Tensor value, *, Tensor? query_rope=None, Tensor? key_rope=None, '
    'Tensor? pse_shift=None, Tensor? atten_mask=None, SymInt[]? actual_seq_qlen=None, '
    'SymInt[]? actual_seq_kvlen=None, Tensor? block_table=None, Tensor? dequant_scale_query=None, '
    'Tensor? dequant_scale_key=None, Tensor? dequant_offset_key=None, Tensor? dequant_scale_value=None, '
    'Tensor? dequant_offset_value=None, Tensor? dequant_scale_key_rope=None, Tensor? quant_scale_out=None, '
    'Tensor? quant_offset_out=None, Tensor? quant_scale_p=None, Tensor? learnable_sink=None, '
    'int num_query_heads=1, int num_key_value_heads=0, float softmax_scale=1.0, int pre_tokens=2147483647, '
    'int next_tokens=2147483647, str input_layout="BSH", int sparse_mode=0, int block_size=0, '
    'int query_quant_mode=0, int key_quant_mode=0, int value_quant_mode=0, int inner_precise=0, '
    'bool return_softmax_lse=False, int? query_dtype=None, int? key_dtype=None, int? value_dtype=None, '
    'int? query_rope_dtype=None, int? key_rope_dtype=None, int? key_shared_prefix_dtype=None, '
    'int? value_shared_prefix_dtype=None, int? dequant_scale_query_dtype=None, '
    'int? dequant_scale_key_dtype=None, int? dequant_scale_value_dtype=None, '
    'int? dequant_scale_key_rope_dtype=None, int? out_dtype=None) -> (Tensor, Tensor)',
)

NOT_IN_REFERENCE = "is not supported by the reference kernel"


def _antiquant(key, dequant_scale_key, dequant_offset_key, dequant_scale_value, dequant_offset_value,
               key_quant_mode, value_quant_mode, q_seq) -> tuple[Antiquant | None, Antiquant | None]:
    check((dequant_scale_key is None) == (dequant_scale_value is None), OP, "dequant_scale_key/dequant_scale_value",
          "must be given together", "only one")
    check((dequant_offset_key is None) == (dequant_offset_value is None), OP,
          "dequant_offset_key/dequant_offset_value", "must be given together", "only one")
    if dequant_scale_key is None:
        check(dequant_offset_key is None, OP, "dequant_offset_key", "requires dequant_scale_key", "a tensor")
        check(key.dtype != torch.int8, OP, "dequant_scale_key",
              "is required when key/value are int8 and the query is floating", None)
        return None, None
    modes = (0, 1) if q_seq is None or q_seq > 1 else (0, 1, 2, 3, 4, 5)
    for name, mode in (("key_quant_mode", key_quant_mode), ("value_quant_mode", value_quant_mode)):
        check(mode in modes, OP, name, f"must be one of {list(modes)} when the query length Q_S is "
              f"{'1' if len(modes) == 6 else '> 1 (or the layout is TND)'}", mode)
    check(key_quant_mode == value_quant_mode or (key_quant_mode, value_quant_mode) == (0, 1), OP,
          "key_quant_mode/value_quant_mode", "must be equal, or 0 and 1", (key_quant_mode, value_quant_mode))
    return (Antiquant(dequant_scale_key, dequant_offset_key, key_quant_mode, "dequant_scale_key"),
            Antiquant(dequant_scale_value, dequant_offset_value, value_quant_mode, "dequant_scale_value"))


def _call(query, key, value, *, query_rope=None, key_rope=None, pse_shift=None, atten_mask=None,
          actual_seq_qlen=None, actual_seq_kvlen=None, block_table=None, dequant_scale_query=None,
          dequant_scale_key=None, dequant_offset_key=None, dequant_scale_value=None, dequant_offset_value=None,
          dequant_scale_key_rope=None, quant_scale_out=None, quant_offset_out=None, quant_scale_p=None,
          learnable_sink=None, num_query_heads=1, num_key_value_heads=0, softmax_scale=1.0,
          pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH", sparse_mode=0, block_size=0,
          query_quant_mode=0, key_quant_mode=0, value_quant_mode=0, inner_precise=0, return_softmax_lse=False,
          **dtypes) -> InferenceCall:
    for name in DTYPE_ARGUMENTS:
        check(dtypes.get(name) is None, OP, name,
              f"must be None: the dtype overrides (fp8/hifloat8/fp4 reinterpretation) {NOT_IN_REFERENCE}",
              dtypes.get(name))
    check(input_layout not in UNSUPPORTED_LAYOUTS, OP, "input_layout",
          f"{input_layout!r} {NOT_IN_REFERENCE}; use one of {list(LAYOUTS)}", repr(input_layout))
    layout = parse_layout(OP, input_layout, LAYOUTS)
    check(query.dtype != torch.int8, OP, "query.dtype",
          f"must be floating: int8 queries (full quantisation with dequant_scale_query) {NOT_IN_REFERENCE}",
          query.dtype)
    check(dequant_scale_query is None, OP, "dequant_scale_query",
          f"must be None: query quantisation (per-token-per-head) {NOT_IN_REFERENCE}", "a tensor")
    check(query_quant_mode == 0, OP, "query_quant_mode",
          f"must be 0: query quantisation (mode 3, with dequant_scale_query) {NOT_IN_REFERENCE}", query_quant_mode)
    check(quant_scale_p is None, OP, "quant_scale_p",
          f"must be None: softmax probability quantisation (full quantisation) {NOT_IN_REFERENCE}", "a tensor")
    check(dequant_scale_key_rope is None, OP, "dequant_scale_key_rope",
          "must be None (a reserved argument in the torch_npu docs)", "a tensor")
    check(inner_precise in (0, 1, 2, 3), OP, "inner_precise", "must be 0, 1, 2 or 3", inner_precise)
    q_seq = None  # Q_S; None for TND (or a query of the wrong rank, which validation reports)
    if layout.inputs != "TND" and query.dim() == layout_rank(layout.inputs):
        q_seq = batch_and_seq(query.shape, layout.inputs)[1]
    if q_seq == 1:
        check(inner_precise in (0, 1), OP, "inner_precise", "must be 0 or 1 when the query length Q_S is 1",
              inner_precise)
    key_aq, value_aq = _antiquant(key, dequant_scale_key, dequant_offset_key, dequant_scale_value,
                                  dequant_offset_value, key_quant_mode, value_quant_mode, q_seq)
    return InferenceCall(
        op=OP, query=query, key=key, value=value, layout=layout,
        num_heads=num_query_heads, num_heads_name="num_query_heads", num_key_value_heads=num_key_value_heads,
        scale=softmax_scale, atten_mask=atten_mask, pse_shift=pse_shift,
        q_lens=actual_seq_qlen, q_lens_name="actual_seq_qlen",
        kv_lens=actual_seq_kvlen, kv_lens_name="actual_seq_kvlen",
        sparse_mode=sparse_mode, pre_tokens=pre_tokens, next_tokens=next_tokens,
        block_table=block_table, block_size=block_size,
        key_antiquant=key_aq, value_antiquant=value_aq,
        quant_scale2=quant_scale_out, quant_scale2_name="quant_scale_out",
        quant_offset2=quant_offset_out, quant_offset2_name="quant_offset_out",
        query_rope=query_rope, key_rope=key_rope,
        softmax_lse=return_softmax_lse, learnable_sink=learnable_sink,
    )


def _npu(query, key, value, **kwargs):
    import torch_npu

    return torch_npu.npu_fused_infer_attention_score_v2(query, key, value, **kwargs)


register_inference_op(QUALNAME, _call, _npu, returns_lse=True)


npu_fused_infer_attention_score_v2 = dropin(QUALNAME, __name__)
