"""npu_fusion_attention: the training flash-attention forward (FlashAttentionScore).

Schema: torch_npu 2.13.0's (namespace npu_attn), written once, in the ``define`` call below;
the drop-in function's docstring shows it.

Computation, per batch b and query head n (GQA: head n reads key/value head n // (Nq/Nkv))::

    S   = scale * (Q K^T + pse)                  # pse is added BEFORE scaling (pse_type 1)
    S   = masked(S)                              # masked positions -> -inf
    m   = max(rowmax(S), sink[n])                # sink: one extra logit per head, no value
    l   = sum_j exp(S_j - m) + exp(sink[n] - m)
    P   = exp(S - m) / l
    out = (P * dropmask / keep_prob) V           # dropmask kept with probability keep_prob

Outputs (7): attention_out (query's layout and dtype, value's head dim); softmax_max and
softmax_sum (float32, m and l above repeated over a last axis of 8: (B, N, Sq, 8), or
(T, N, 8) for TND -- see softmax_layout); softmax_out (reserved: an empty tensor of the
query dtype); seed, offset (those used for the dropout mask) and numels (the dropout mask
length: B*N*Sq*Skv, or N * sum_b(Sq_b * Skv_b) for TND).

Layouts: BSH, SBH (H = N*D), BSND, BNSD, and TND (varlen: actual_seq_qlen / actual_seq_kvlen
are CUMULATIVE lengths, e.g. real lengths 2,2,2 -> [2, 4, 6]; trailing zeros, e.g.
[2, 5, 9, 0, 0], mark batches that are not computed, whose rows output 0).

Masking (atten_mask True/1 = masked out). When atten_mask is None, sparse_mode,
pre_tockens, next_tockens and prefix have no effect: everything is computed (documented).
With a mask, key j is kept for query row i (local to its batch, Sq/Skv its lengths) iff:

- 0 defaultMask: not mask[i, j] and -pre_tockens <= j - i <= next_tockens;
- 1 allMask: not mask[i, j];
- 2 leftUpCausal: j <= i;                                     (mask = triu(ones(2048, 2048), 1))
- 3 rightDownCausal: j <= i + (Skv - Sq);                      (same compressed mask)
- 4 band, anchored bottom-right: -pre <= j - i - (Skv - Sq) <= next;  (same compressed mask)
- 5 prefix, full mask: not mask[i, j] and (j <= i + Skv - Sq or j < prefix[b]);
- 6 prefix, compressed 3072x2048 mask: j <= i + Skv - Sq or j < prefix[b];
- 7 varlen (TND) outer cut of mode 3: mode 3 for every batch but the LAST participating
  one, which is a band anchored bottom-right (pre_tockens >= its Skv, next_tockens <= 0);
- 8 varlen (TND) outer cut of mode 2: mode 2 for every batch but the FIRST participating
  one, which is a band anchored bottom-right (pre_tockens >= its Skv).

Compressed masks (modes 2, 3, 4, 6, 7, 8) are a pattern the reference checks, not data.
atten_mask is bool or uint8: modes 0/1 take (Sq, Skv), (1, 1, Sq, Skv), (B, 1, Sq, Skv)
or (B, N, Sq, Skv) (TND: (maxSq, maxSkv) only, read in each batch's local coordinates,
with no fully masked row); mode 5 takes (B, N|1, Sq, Skv); the compressed masks are
(2048, 2048), or (3072, 2048) for mode 6 (leading dims of 1 allowed). prefix (modes 5/6
with a mask): one entry per batch, B <= 32, in [0, Skv] if Sq > Skv else [Skv - Sq, Skv].
A row with nothing to attend to (and no sink) outputs 0, with softmax_max -inf and
softmax_sum 0 (the NPU's invalid-row handling, inner_precise 2).

pse: (B, N, Sq, Skv), (1, N, Sq, Skv) or (B, N, 1, Skv), the query's dtype. For TND the
reference takes the same shapes over the padded per-batch grid (maxSq, maxSkv) (a choice;
the NPU documents only the alibi-compressed form there, which is not supported here, nor
is the dense alibi-compressed (.., 1024, Skv) form).

sink: (N,) float tensor, one logit per query head (as learnable sinks in the NPU's
inference ops: an extra softmax column with no value vector; it is not scaled).

Dropout (keep_prob < 1): the mask is a deterministic function of (seed, offset) and the
problem's shape, independent of chunking and device: query rows are cut into tiles of
DROPOUT_TILE_ROWS rows over the padded (B, N, Sq, Skv) grid, and each tile's keep mask
is ``torch.rand((B, N, tile, Skv), generator=g) < keep_prob`` with a CPU generator seeded
from (seed, offset, tile index), then moved to the device. The backward op
regenerates exactly the same mask from the same seed/offset. (The NPU draws Philox
numbers instead, so masks differ from hardware; vary seed/offset between steps.) An
external dropout_mask is not supported with keep_prob < 1 (the grad op cannot receive
it); with keep_prob == 1 it is ignored, as on the NPU.

padding_mask is reserved by torch_npu and ignored; gen_mask_parallel/sync only schedule
the NPU's mask generation; inner_precise (0, 1, 2) does not change the reference.

Autograd: backward calls npu_fusion_attention_grad (see fusion_attention_grad.py), which
recomputes the probabilities from softmax_max/softmax_sum; gradients flow to query, key,
value, pse and sink (not to softmax_max/softmax_sum, as on the NPU).

The reference works in (B, N, S, D) form (TND is packed per batch, zero padded) and
processes the query in row chunks, so extra memory is O(chunk x Skv) per head in the
forward and the backward. On the CPU, a backward without dropout, sink, pse and with
Dv == D runs torch's fused flash-attention backward kernel (whole problem when nothing
is masked, else per query chunk with the chunk's additive mask); everything else takes
the explicit chunked path. Both compute the same gradients.

Where the pieces live: _fusion_args.py (argument model and validation, shared with the grad
op), _dropout.py (the keep mask), _fusion_kernel.py (canonical problem, forward and backward
kernels; the chunk walk, masks, bands, key windows, GQA folding and the softmax step from
_attention_core, layouts from _layouts.py); this module holds the schema, the registrations and the autograd formula.
"""

from __future__ import annotations


import torch

from . import fusion_attention_grad  # noqa: F401  (the autograd formula calls the grad op)
from ._fusion_args import FORWARD_OP, forward_call, validate
from ._fusion_kernel import build_problem, forward, output_from_bnsd, stats_to_layout
from ._dropin import dropin
from ._library import LIB, define, register_npu, register_reference, schema_of

__all__ = ["npu_fusion_attention"]

OP = FORWARD_OP

QUALNAME = define(
    OP,
    '(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, Tensor? pse=None, '
    'Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., float keep_prob=1., '
    'int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int[]? prefix=None, '
    'int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, '
    'bool gen_mask_parallel=True, bool sync=False, str softmax_layout="", Tensor? sink=None, '
    'Tensor? dropout_mask=None, int seed=0, int offset=0) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)',
)


# ----------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------


@torch.library.register_fake(QUALNAME, lib=LIB)
def _fake(*args, **kwargs):
    call = forward_call(*args, **kwargs)
    g = validate(call)
    q = call.query
    out = q.new_empty(g.out_shape)
    softmax_max = q.new_empty(g.softmax_shape, dtype=torch.float32)
    softmax_sum = q.new_empty(g.softmax_shape, dtype=torch.float32)
    return out, softmax_max, softmax_sum, q.new_empty((0,)), call.seed, call.offset, g.numels


def _reference(*args, **kwargs):
    call = forward_call(*args, **kwargs)
    g = validate(call)
    problem = build_problem(call, g)
    out, row_max, row_sum = forward(problem)
    q = call.query
    attention_out = output_from_bnsd(out, g, g.q_segs, q.shape[0], q.dtype)
    softmax_max = stats_to_layout(row_max, g, call.softmax_layout, float("-inf"))
    softmax_sum = stats_to_layout(row_sum, g, call.softmax_layout, 0.0)
    return attention_out, softmax_max, softmax_sum, q.new_empty((0,)), call.seed, call.offset, int(g.numels)


def _npu(*args, **kwargs):
    import torch_npu

    return torch_npu.npu_fusion_attention(*args, **kwargs)


register_reference(QUALNAME, _reference)
register_npu(QUALNAME, _npu)

# Argument positions in the schema, for the autograd formula.
_ARG_NAMES = tuple(a.name for a in schema_of(QUALNAME).arguments)


def _setup_context(ctx, inputs, output) -> None:
    args = dict(zip(_ARG_NAMES, inputs))
    out, softmax_max, softmax_sum = output[0], output[1], output[2]
    ctx.save_for_backward(args["query"], args["key"], args["value"], args["pse"], args["padding_mask"],
                          args["atten_mask"], args["sink"], out, softmax_max, softmax_sum)
    ctx.options = {name: args[name] for name in (
        "head_num", "input_layout", "scale", "keep_prob", "pre_tockens", "next_tockens", "inner_precise",
        "prefix", "actual_seq_qlen", "actual_seq_kvlen", "sparse_mode", "gen_mask_parallel", "sync",
        "softmax_layout", "seed", "offset")}
    ctx.numels = output[6]


def _backward(ctx, grad_out, _grad_max, _grad_sum, _grad_softmax_out, _seed, _offset, _numels):
    query, key, value, pse, padding_mask, atten_mask, sink, out, softmax_max, softmax_sum = ctx.saved_tensors
    o = ctx.options
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dpse, dsink = torch.ops.npu_attn.npu_fusion_attention_grad(
        query, key, value, grad_out, o["head_num"], o["input_layout"], pse=pse, padding_mask=padding_mask,
        atten_mask=atten_mask, softmax_max=softmax_max, softmax_sum=softmax_sum, attention_in=out,
        scale_value=o["scale"], keep_prob=o["keep_prob"], pre_tockens=o["pre_tockens"],
        next_tockens=o["next_tockens"], inner_precise=o["inner_precise"], seed=o["seed"], offset=o["offset"],
        numels=ctx.numels, prefix=o["prefix"], actual_seq_qlen=o["actual_seq_qlen"],
        actual_seq_kvlen=o["actual_seq_kvlen"], sparse_mode=o["sparse_mode"],
        gen_mask_parallel=o["gen_mask_parallel"], sync=o["sync"], softmax_layout=o["softmax_layout"], sink=sink)
    grads = dict.fromkeys(_ARG_NAMES)
    grads.update(query=dq, key=dk, value=dv, pse=dpse if pse is not None else None,
                 sink=dsink if sink is not None else None)
    return tuple(grads[name] for name in _ARG_NAMES)


torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context, lib=LIB)


npu_fusion_attention = dropin(QUALNAME, __name__)
