"""npu_fusion_attention_packed (+ _grad): npu_fusion_attention over a packed batch, TND at run time.

Not a torch_npu op: the training pass ``training_packed_to_tnd`` puts it where a training
site's mask comes from packed-sequence ids (transformers' DataCollatorWithFlattening
batches), because TND's cumulative lengths are ``int[]`` host values that a compiled graph
cannot hold (they, and their number, change every batch). Schemas (namespace npu_attn): each
written once, in its ``define`` call below; the drop-in functions' docstrings show them.

Definition: npu_fusion_attention_packed(q, k, v, M, N, s) is
``npu_fusion_attention(q, k, v, N, "BNSD", atten_mask=M, scale=s, sparse_mode=1)[:3]``
(attention_out, softmax_max, softmax_sum; BNSD, statistics (B, N, S, 8)) for every
mask M, and its grad op is that call's npu_fusion_attention_grad (dq, dk, dv). So
every constraint is npu_fusion_attention's for that call (BNSD q/k/v, GQA,
bool/uint8 mask of shape (S, S), (1, 1, S, S), (B, 1, S, S) or (B, N, S, S), ...),
checked by its own validation under this op's name; the grad op also requires dy
and attention_in of the output's shape and dtype and float32 statistics of the
forward's shape.

How it computes (the result never depends on it): where S_q == S_kv and M is exactly
block-diagonal causal in every batch (row i keeps exactly keys start[i]..i, start[i]
being i or start[i - 1]; packed_segments), through TND with ``actual_seq_qlen`` =
``actual_seq_kvlen`` = the cumulative sequence lengths over the B * S flattened
tokens, read from M (two small host reads: the decision and the sequence starts),
sparse_mode 3 with the compressed causal mask and softmax_layout "TND"; for any other
mask, the BNSD call itself. The grad op decides the same way from the same mask.

Kernels: the reference (every device) and the NPU kernel are the same function: it
calls npu_attn.npu_fusion_attention(_grad), whose own NPU kernel is torch_npu's.
Autograd: backward is npu_fusion_attention_packed_grad (no gradient to the mask).
Not GE-convertible yet: GE's FlashAttentionScore takes the lengths as a host tensor
input, which this project's converters do not wire.
"""

from __future__ import annotations

import dataclasses

import torch

from ._dropin import dropin
from ._library import COMPRESSED_MASK_SIZE, LIB, check, define, register_fake, register_npu, register_reference
from ._fusion_args import Geometry, forward_call, validate

OP = "npu_fusion_attention_packed"
GRAD_OP = "npu_fusion_attention_packed_grad"

QUALNAME = define(OP, "(Tensor query, Tensor key, Tensor value, Tensor atten_mask, SymInt head_num, float scale) "
                      "-> (Tensor, Tensor, Tensor)", tags=(torch.Tag.pt2_compliant_tag,))
GRAD_QUALNAME = define(GRAD_OP, "(Tensor query, Tensor key, Tensor value, Tensor dy, Tensor atten_mask, "
                                "Tensor attention_in, Tensor softmax_max, Tensor softmax_sum, SymInt head_num, "
                                "float scale) -> (Tensor, Tensor, Tensor)", tags=(torch.Tag.pt2_compliant_tag,))


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------


def _validate(op: str, query, key, value, atten_mask, head_num, scale) -> Geometry:
    """npu_fusion_attention's own checks of the BNSD call the op is defined as, named `op`."""
    call = forward_call(query, key, value, head_num, "BNSD", atten_mask=atten_mask, scale=scale, sparse_mode=1)
    check(isinstance(atten_mask, torch.Tensor), op, "atten_mask", "must be a tensor (True = masked out)",
          type(atten_mask).__name__)
    return validate(dataclasses.replace(call, op=op))


def _validate_grad(query, key, value, dy, atten_mask, attention_in, softmax_max, softmax_sum, head_num,
                   scale) -> Geometry:
    g = _validate(GRAD_OP, query, key, value, atten_mask, head_num, scale)
    for name, t in (("dy", dy), ("attention_in", attention_in)):
        check(list(t.shape) == list(g.out_shape), GRAD_OP, f"{name}.shape",
              f"must be the attention output's shape {tuple(g.out_shape)}", tuple(t.shape))
        check(t.dtype == query.dtype, GRAD_OP, f"{name}.dtype", f"must equal query.dtype ({query.dtype})", t.dtype)
    for name, t in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        check(list(t.shape) == list(g.softmax_shape), GRAD_OP, f"{name}.shape",
              f"must be the forward's (B, N, S, 8) = {tuple(g.softmax_shape)}", tuple(t.shape))
        check(t.dtype == torch.float32, GRAD_OP, f"{name}.dtype", "must be torch.float32", t.dtype)
    return g


# ----------------------------------------------------------------------------
# The run-time decision
# ----------------------------------------------------------------------------


def packed_segments(atten_mask: torch.Tensor, batch: int, seq: int) -> list[int] | None:
    """The cumulative lengths of the sequences over the B * S flattened tokens when
    atten_mask ((B or 1, 1, S, S), True = masked out) is block-diagonal causal in
    every batch, else None.

    Row i keeps exactly keys start[i]..i, and start[i] is i (a new sequence) or
    start[i - 1] (the same one): that is block-diagonal causal, with sequences
    starting at the rows with start[i] == i."""
    if atten_mask.dim() != 4 or atten_mask.shape[1] != 1 or tuple(atten_mask.shape[2:]) != (seq, seq) \
            or atten_mask.shape[0] not in (1, batch) or atten_mask.dtype not in (torch.bool, torch.uint8):
        return None
    keep = atten_mask[:, 0].logical_not()  # (B', S, S)
    rows = torch.arange(seq, device=keep.device)
    count = keep.sum(-1)  # (B', S)
    start = keep.int().argmax(-1)  # first kept key (0 where none: caught by the count)
    later = rows.view(1, 1, seq) > rows.view(1, seq, 1)
    previous = torch.cat([start.new_zeros(start.shape[0], 1), start[:, :-1]], dim=1)
    ok = ~(keep & later).any() & (count == rows - start + 1).all() & (count > 0).all() & \
        ((start == rows) | (start == previous)).all()
    if not bool(ok):  # one host read: the decision
        return None
    starts = (start == rows).expand(batch, seq).reshape(-1)  # over the flattened B * S tokens
    boundaries = torch.nonzero(starts).flatten()[1:].tolist() + [batch * seq]  # the one host read of lengths
    return boundaries


def _causal_mask(device: torch.device) -> torch.Tensor:
    return torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device).triu(1)


def _to_tnd(x: torch.Tensor) -> torch.Tensor:
    """(B, N, S, D) -> (B * S, N, D)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _from_tnd(x: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """(B * S, N, D) -> (B, N, S, D), contiguous."""
    return x.reshape(batch, seq, x.shape[1], x.shape[2]).transpose(1, 2).contiguous()


def _lengths(query: torch.Tensor, key: torch.Tensor, atten_mask: torch.Tensor) -> list[int] | None:
    batch, _, seq, _ = query.shape
    return packed_segments(atten_mask, batch, seq) if key.shape[2] == seq else None


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


def _packed(query, key, value, atten_mask, head_num, scale):
    """npu_fusion_attention(query, key, value, head_num, "BNSD", atten_mask=atten_mask,
    scale=scale, sparse_mode=1)[:3], through TND with the sequence lengths where the
    mask is block-diagonal causal. Returns (attention_out, softmax_max, softmax_sum)
    in BNSD form ((B, N, S, 8) statistics)."""
    _validate(OP, query, key, value, atten_mask, head_num, scale)
    batch, _, seq, _ = query.shape
    lengths = _lengths(query, key, atten_mask)
    if lengths is None:
        out, row_max, row_sum = torch.ops.npu_attn.npu_fusion_attention(
            query, key, value, head_num, "BNSD", atten_mask=atten_mask, scale=scale, sparse_mode=1)[:3]
        return out, row_max, row_sum
    out, row_max, row_sum = torch.ops.npu_attn.npu_fusion_attention(
        _to_tnd(query), _to_tnd(key), _to_tnd(value), head_num, "TND", atten_mask=_causal_mask(query.device),
        scale=scale, sparse_mode=3, actual_seq_qlen=lengths, actual_seq_kvlen=lengths, softmax_layout="TND")[:3]
    # softmax_layout "TND": the statistics in token order, (T, N, 8), as the BNSD ones are laid out per token.
    return _from_tnd(out, batch, seq), _from_tnd(row_max, batch, seq), _from_tnd(row_sum, batch, seq)


def _packed_grad(query, key, value, dy, atten_mask, attention_in, softmax_max, softmax_sum, head_num, scale):
    """npu_fusion_attention_grad for npu_fusion_attention_packed: the same decision
    from the same mask, TND with the same lengths or BNSD. Returns (dq, dk, dv)."""
    _validate_grad(query, key, value, dy, atten_mask, attention_in, softmax_max, softmax_sum, head_num, scale)
    batch, _, seq, _ = query.shape
    lengths = _lengths(query, key, atten_mask)
    if lengths is None:
        dq, dk, dv = torch.ops.npu_attn.npu_fusion_attention_grad(
            query, key, value, dy, head_num, "BNSD", atten_mask=atten_mask, softmax_max=softmax_max,
            softmax_sum=softmax_sum, attention_in=attention_in, scale_value=scale, sparse_mode=1)[:3]
        return dq, dk, dv
    dq, dk, dv = torch.ops.npu_attn.npu_fusion_attention_grad(
        _to_tnd(query), _to_tnd(key), _to_tnd(value), _to_tnd(dy), head_num, "TND",
        atten_mask=_causal_mask(query.device), softmax_max=_to_tnd(softmax_max), softmax_sum=_to_tnd(softmax_sum),
        attention_in=_to_tnd(attention_in), scale_value=scale, sparse_mode=3, actual_seq_qlen=lengths,
        actual_seq_kvlen=lengths, softmax_layout="TND")[:3]
    return _from_tnd(dq, batch, seq), _from_tnd(dk, batch, seq), _from_tnd(dv, batch, seq)


@register_fake(QUALNAME)
def _packed_fake(query, key, value, atten_mask, head_num, scale):
    g = _validate(OP, query, key, value, atten_mask, head_num, scale)
    stats = query.new_empty(g.softmax_shape, dtype=torch.float32)
    return query.new_empty(g.out_shape), stats, torch.empty_like(stats)


@register_fake(GRAD_QUALNAME)
def _packed_grad_fake(query, key, value, dy, atten_mask, attention_in, softmax_max, softmax_sum, head_num, scale):
    _validate_grad(query, key, value, dy, atten_mask, attention_in, softmax_max, softmax_sum, head_num, scale)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


register_reference(QUALNAME, _packed)
register_npu(QUALNAME, _packed)
register_reference(GRAD_QUALNAME, _packed_grad)
register_npu(GRAD_QUALNAME, _packed_grad)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, atten_mask, head_num, scale = inputs
    ctx.save_for_backward(query, key, value, atten_mask, *output)
    ctx.head_num, ctx.scale = head_num, scale


def _backward(ctx, grad_out, _grad_max, _grad_sum):
    query, key, value, atten_mask, out, row_max, row_sum = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.npu_attn.npu_fusion_attention_packed_grad(
        query, key, value, grad_out.contiguous(), atten_mask, out, row_max, row_sum, ctx.head_num, ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context, lib=LIB)


npu_fusion_attention_packed = dropin(QUALNAME, __name__, """\
npu_attn.npu_fusion_attention_packed (see the module docstring).""")


npu_fusion_attention_packed_grad = dropin(GRAD_QUALNAME, __name__, """\
npu_attn.npu_fusion_attention_packed_grad (see the module docstring).""")
