"""npu_fusion_attention_grad: the training flash-attention backward (FlashAttentionScoreGrad).

Schema: torch_npu 2.13.0's (namespace npu_attn), written once, in the ``define`` call below;
the drop-in function's docstring shows it.

Gradients of npu_fusion_attention (same arguments and semantics, see fusion_attention.py)
with respect to query, key, value, pse and sink, given dy = dL/d attention_out. As on the
NPU, the probabilities are recomputed from the forward's softmax_max and softmax_sum
(required), P = exp(S - softmax_max) / softmax_sum, and the dropout mask is regenerated
from seed/offset (numels is informational here: the mask is a function of seed, offset
and the shapes). The softmax-backward row term is D = rowsum(dy * attention_in) when
attention_in (the forward's attention_out) is given, as the NPU computes it, else
rowsum(P * dP) (identical for the true forward output).

Outputs: dq, dk, dv (the shapes of query, key and value, in the query dtype); dpse (pse's
shape, or an empty (0,) tensor without pse); dsink (sink's shape and dtype, or a 0-d
float32 zero without sink). softmax_in is reserved and ignored; padding_mask is ignored.

The reference processes the query in row chunks (O(chunk x Skv) extra memory per head).
"""

from __future__ import annotations


import torch

from ._fusion_args import FusionCall, Geometry, validate
from ._fusion_kernel import backward, build_problem, output_from_bnsd, output_to_bnsd, stats_from_layout
from ._dropin import dropin
from ._library import INT_MAX, LIB, check, define, register_npu, register_reference

__all__ = ["npu_fusion_attention_grad"]

OP = "npu_fusion_attention_grad"

QUALNAME = define(
    OP,
    '(Tensor query, Tensor key, Tensor value, Tensor dy, int head_num, str input_layout, *, Tensor? pse=None, '
    'Tensor? padding_mask=None, Tensor? atten_mask=None, Tensor? softmax_max=None, Tensor? softmax_sum=None, '
    'Tensor? softmax_in=None, Tensor? attention_in=None, float scale_value=1., float keep_prob=1., '
    'int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int seed=0, int offset=0, '
    'int numels=0, int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, '
    'int sparse_mode=0, bool gen_mask_parallel=True, bool sync=False, str softmax_layout="", '
    'Tensor? sink=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)',
)


class _GradCall:
    """The grad op's arguments: the shared FusionCall plus the backward-only tensors."""

    def __init__(self, query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                 atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None, attention_in=None,
                 scale_value=1.0, keep_prob=1.0, pre_tockens=INT_MAX, next_tockens=INT_MAX, inner_precise=0,
                 seed=0, offset=0, numels=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                 sparse_mode=0, gen_mask_parallel=True, sync=False, softmax_layout="", sink=None) -> None:
        # padding_mask and softmax_in are reserved by torch_npu; numels is implied by the shapes.
        self.call = FusionCall(
            op=OP, query=query, key=key, value=value, head_num=head_num, input_layout=input_layout, pse=pse,
            atten_mask=atten_mask, scale=scale_value, keep_prob=keep_prob, pre_tockens=pre_tockens,
            next_tockens=next_tockens, inner_precise=inner_precise, prefix=prefix,
            actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode,
            softmax_layout=softmax_layout, sink=sink, seed=seed, offset=offset,
        )
        self.dy, self.softmax_max, self.softmax_sum, self.attention_in = dy, softmax_max, softmax_sum, attention_in


def _validate(grad: _GradCall) -> Geometry:
    call = grad.call
    g = validate(call)
    op, q = call.op, call.query
    check(list(grad.dy.shape) == list(g.out_shape), op, "dy", f"must have the attention_out shape {g.out_shape}",
          list(grad.dy.shape))
    check(grad.dy.dtype == q.dtype, op, "dy.dtype", f"must equal query.dtype ({q.dtype})", grad.dy.dtype)
    for name, stat in (("softmax_max", grad.softmax_max), ("softmax_sum", grad.softmax_sum)):
        check(stat is not None, op, name, "is required (the forward's output)", None)
        check(list(stat.shape) == list(g.softmax_shape), op, name, f"must have shape {g.softmax_shape}",
              list(stat.shape))
        check(stat.dtype == torch.float32, op, f"{name}.dtype", "must be float32", stat.dtype)
    if grad.attention_in is not None:
        check(list(grad.attention_in.shape) == list(g.out_shape), op, "attention_in",
              f"must have the attention_out shape {g.out_shape}", list(grad.attention_in.shape))
    return g


def _fake(*args, **kwargs):
    grad = _GradCall(*args, **kwargs)
    _validate(grad)
    call, q = grad.call, grad.call.query
    dpse = q.new_empty(call.pse.shape) if call.pse is not None else q.new_empty((0,))
    dsink = (q.new_empty(call.sink.shape, dtype=call.sink.dtype) if call.sink is not None
             else q.new_empty((), dtype=torch.float32))
    return q.new_empty(q.shape), q.new_empty(call.key.shape), q.new_empty(call.value.shape), dpse, dsink


def _reference(*args, **kwargs):
    grad = _GradCall(*args, **kwargs)
    g = _validate(grad)
    call, q = grad.call, grad.call.query
    problem = build_problem(call, g)
    dy = output_to_bnsd(grad.dy, g, g.heads)
    attention_in = output_to_bnsd(grad.attention_in, g, g.heads) if grad.attention_in is not None else None
    row_max = stats_from_layout(grad.softmax_max, g, call.softmax_layout)
    row_sum = stats_from_layout(grad.softmax_sum, g, call.softmax_layout)
    dq, dk, dv, dpse, dsink = backward(problem, dy, row_max, row_sum, attention_in)
    dq = output_from_bnsd(dq, g, g.q_segs, q.shape[0], q.dtype)
    dk = output_from_bnsd(dk, g, g.kv_segs, call.key.shape[0], q.dtype)
    dv = output_from_bnsd(dv, g, g.kv_segs, call.value.shape[0], q.dtype)
    dpse = dpse.to(q.dtype) if dpse is not None else q.new_empty((0,))
    dsink = dsink.to(call.sink.dtype) if dsink is not None else q.new_zeros((), dtype=torch.float32)
    return dq, dk, dv, dpse, dsink


def _npu(*args, **kwargs):
    import torch_npu

    return torch_npu.npu_fusion_attention_grad(*args, **kwargs)


torch.library.register_fake(QUALNAME, _fake, lib=LIB)
register_reference(QUALNAME, _reference)
register_npu(QUALNAME, _npu)


npu_fusion_attention_grad = dropin(QUALNAME, __name__)
