"""Packed (varlen) inference prefill: the prompt / fused-infer op with a bool mask, TND at run time.

Not torch_npu ops (the rewrite of passes/packed_prefill_to_tnd.py); schemas each written
once, in its ``define`` call below; the drop-in functions' docstrings show them.

Definition: each is the wrapped op called with the same arguments, the mask and
``sparse_mode=1`` (mask only)::

    npu_prompt_flash_attention(q, k, v, atten_mask=M, num_heads=N, scale_value=s,
                               input_layout=L, num_key_value_heads=Nkv, sparse_mode=1)
    npu_fused_infer_attention_score(q, k, v, atten_mask=M, num_heads=N, scale=s,
                                    input_layout=L, num_key_value_heads=Nkv, sparse_mode=1)

for every mask M (True = masked out), so every constraint is the wrapped op's
for that call: the fake runs the wrapped op's own validation (the same
InferenceCall), under this op's name. Layouts BSH, BSND, BNSD, BNSD_BSND.

Why a wrapper: a serving engine packs a prefill batch's sequences into one
token axis and masks with ``same sequence id & key position <= query position``
(examples/mini_vllm/model.py). The NPU's form of that is TND with
``actual_seq_lengths`` = ``actual_seq_lengths_kv`` = the cumulative sequence
lengths and sparse_mode 3 (causal within each sequence): no (T, T) mask. Those
lengths are ``int[]`` host values that change every batch, as does their
number, so a compiled graph can hold them neither as constants nor as SymInts.
They are read where they are known, at run time, from the mask itself.

How it computes (the result never depends on it; only the cost does). With
S_q == S_kv and a bool/uint8 mask of shape (S, S), (B or 1, S, S) or
(B or 1, 1, S, S), it reads the mask per batch (packed_plan): every query row
must keep one contiguous range of keys [lo_i, hi_i] (at least one key), and the
rows fall into segments, a row starting a new one where lo_i == i and
otherwise continuing the previous row's (lo_i == lo_{i-1}). A segment is
*causal* when each of its rows keeps exactly lo..i, *full* when each keeps the
whole segment. Where every segment is one of the two (one host read: the
decision; one more: the segment starts), the op computes

- the causal segments in one TND call with their cumulative lengths as
  ``actual_seq_lengths`` and ``actual_seq_lengths_kv``, sparse_mode 3 and the
  compressed 2048x2048 causal mask;
- the full segments (if any) in one TND call with their cumulative lengths,
  sparse_mode 0 and no mask (each query attends its whole segment).

The full segments are for padding written at one position: tokens of one
sequence id all at position 0, which eager attends to one another (each sees
all of them); a full segment gives exactly that. (The mini-vLLM engine gives
its padding positions 0, 1, ... instead: causal segments, one call.) Any
other mask (a key outside the row's range, a row with no key, a hole, S_q !=
S_kv, a per-head mask) is computed by the masked call itself. A misdetected
site therefore still computes its mask exactly.

Observability: ``PATHS`` counts the decisions ("tnd" / "masked") and each
decision is logged at DEBUG on the ``npu_attn`` logger.

Kernels: the reference (every device) and the NPU kernel are the same function:
it calls npu_attn.npu_prompt_flash_attention / npu_fused_infer_attention_score,
whose own NPU kernels are torch_npu's. The GE converter
(converters/prompt_attention_packed.py) converts the definition (the masked
call, PromptFlashAttention / FusedInferAttentionScore with the mask and
sparse_mode 1); see there why the TND form is not in the GE graph.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging

import torch

from . import fused_infer_attention_score as _fia
from . import prompt_flash_attention as _pfa
from ._inference import validate
from ._inference_kernel import empty_outputs
from ._layouts import batch_and_seq, from_bnsd, parse_layout, to_bnsd
from ._dropin import dropin
from ._library import (COMPRESSED_MASK_SIZE, INT_MAX, call_op, define, once_per_contents, register_fake, register_npu,
                       register_reference)

__all__ = ["PATHS", "PackedPlan", "npu_fused_infer_attention_score_packed", "npu_prompt_flash_attention_packed",
           "packed_plan"]

log = logging.getLogger("npu_attn")

PROMPT_OP = "npu_prompt_flash_attention_packed"
FIA_OP = "npu_fused_infer_attention_score_packed"
LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND")

PROMPT_QUALNAME = define(
    PROMPT_OP,
    '(Tensor query, Tensor key, Tensor value, Tensor atten_mask, *, int num_heads=1, float scale_value=1.0, '
    'str input_layout="BSH", int num_key_value_heads=0) -> Tensor',
    tags=(torch.Tag.pt2_compliant_tag,))
FIA_QUALNAME = define(
    FIA_OP,
    '(Tensor query, Tensor key, Tensor value, Tensor atten_mask, *, int num_heads=1, float scale=1.0, '
    'str input_layout="BSH", int num_key_value_heads=0) -> (Tensor, Tensor)',
    tags=(torch.Tag.pt2_compliant_tag,))

# How many calls took each path since import (tests and benchmarks read it).
PATHS: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------
# The wrapped calls (the definition) and their validation
# ----------------------------------------------------------------------------


def _prompt_call(query, key, value, atten_mask, *, num_heads, scale_value, input_layout,
                 num_key_value_heads):
    parse_layout(PROMPT_OP, input_layout, LAYOUTS)
    call = _pfa._call(query, key, value, atten_mask=atten_mask, num_heads=num_heads, scale_value=scale_value,
                      input_layout=input_layout, num_key_value_heads=num_key_value_heads, sparse_mode=1)
    return dataclasses.replace(call, op=PROMPT_OP)


def _fia_call(query, key, value, atten_mask, *, num_heads, scale, input_layout, num_key_value_heads):
    parse_layout(FIA_OP, input_layout, LAYOUTS)
    call = _fia._call(query, key, value, atten_mask=atten_mask, num_heads=num_heads, scale=scale,
                      input_layout=input_layout, num_key_value_heads=num_key_value_heads, sparse_mode=1)
    return dataclasses.replace(call, op=FIA_OP)


@register_fake(PROMPT_QUALNAME)
def _prompt_fake(query, key, value, atten_mask, **kwargs):
    return empty_outputs(_prompt_call(query, key, value, atten_mask, **kwargs))[0]


@register_fake(FIA_QUALNAME)
def _fia_fake(query, key, value, atten_mask, **kwargs):
    return empty_outputs(_fia_call(query, key, value, atten_mask, **kwargs))


# ----------------------------------------------------------------------------
# The run-time decision
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedPlan:
    """Segments [start, end) over the B * S flattened tokens: causal ones and full ones."""

    causal: tuple[tuple[int, int], ...]
    full: tuple[tuple[int, int], ...]


def _mask_3d(mask: torch.Tensor, batch: int, q_seq: int, kv_seq: int) -> torch.Tensor | None:
    """The mask as (B or 1, S, S) bool (True = masked out), or None for a shape the plan does not read."""
    if mask.dtype not in (torch.bool, torch.uint8) or q_seq != kv_seq or tuple(mask.shape[-2:]) != (q_seq, kv_seq):
        return None
    if mask.dim() == 2:
        mask = mask[None]
    elif mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.dim() != 3:
        return None
    if mask.shape[0] not in (1, batch):
        return None
    return mask if mask.dtype == torch.bool else mask != 0


def packed_plan(atten_mask: torch.Tensor, batch: int, q_seq: int, kv_seq: int) -> PackedPlan | None:
    """The segments of a packed mask (see the module docstring), or None when the mask
    is not exactly causal and full segments in every batch."""
    mask = _mask_3d(atten_mask, batch, q_seq, kv_seq)
    if mask is None or q_seq == 0:
        return None
    seq = q_seq
    keep = mask.logical_not()  # (B', S, S)
    rows = torch.arange(seq, device=keep.device).expand(keep.shape[0], seq)
    count = keep.sum(-1)
    lo = keep.int().argmax(-1)  # first kept key (0 where none: caught by count)
    hi = seq - 1 - keep.flip(-1).int().argmax(-1)  # last kept key
    previous = torch.cat([lo.new_full((lo.shape[0], 1), -1), lo[:, :-1]], dim=1)
    new = lo == rows
    ok = (count > 0) & (count == hi - lo + 1) & (new | (lo == previous))
    # The last row of each row's segment: the first r' >= r whose next row starts a segment.
    last = torch.cat([new[:, 1:], new.new_ones(new.shape[0], 1)], dim=1)
    last_pos = torch.where(last, rows, torch.full_like(rows, seq))
    seg_last = last_pos.flip(-1).cummin(-1).values.flip(-1)
    start = lo.clamp(0, seq - 1)
    full_segment = (hi.gather(-1, start) == seg_last.gather(-1, start)) & (seg_last > start)
    ok &= torch.where(full_segment, hi == seg_last, hi == rows)
    if not bool(ok.all()):  # one host read: the decision
        return None
    starts = torch.nonzero(new.expand(batch, seq).reshape(-1)).flatten()
    kinds = full_segment.expand(batch, seq).reshape(-1)[starts]
    start_list, kind_list = torch.stack([starts, kinds.to(starts.dtype)]).tolist()  # the one read of the segments
    ends = start_list[1:] + [batch * seq]
    causal, full = [], []
    for s, e, k in zip(start_list, ends, kind_list):
        # A segment never crosses a batch boundary: every batch's row 0 starts one.
        (full if k else causal).append((s, e))
    return PackedPlan(tuple(causal), tuple(full))


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------

_CAUSAL: dict[torch.device, torch.Tensor] = {}


def _causal_mask(device: torch.device) -> torch.Tensor:
    mask = _CAUSAL.get(device)
    if mask is None:
        mask = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device).triu(1)
        _CAUSAL[device] = mask
    return mask


def _to_tnd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """Any input layout -> (B * S, N, D)."""
    x = to_bnsd(x, layout, heads)
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _tokens(x: torch.Tensor, segments: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The segments' tokens, in order: one slice per run of adjacent segments (a view when
    they are all adjacent, as when every segment is of one kind)."""
    runs: list[list[int]] = []
    for s, e in segments:
        if runs and runs[-1][1] == s:
            runs[-1][1] = e
        else:
            runs.append([s, e])
    if len(runs) == 1:
        return x[runs[0][0]:runs[0][1]]
    return torch.cat([x[s:e] for s, e in runs])


def _cumulative(segments: tuple[tuple[int, int], ...]) -> list[int]:
    out, total = [], 0
    for s, e in segments:
        total += e - s
        out.append(total)
    return out


def _packed(op: str, wrapped, scale_kwarg: str, query, key, value, atten_mask, *, num_heads, scale, input_layout,
            num_key_value_heads):
    """The wrapped op with the mask (sparse_mode 1), through TND where the mask is packed."""
    layout = parse_layout(op, input_layout, LAYOUTS)
    batch, q_seq = batch_and_seq(query.shape, layout.inputs)
    _, kv_seq = batch_and_seq(key.shape, layout.inputs)
    common = {"num_heads": num_heads, scale_kwarg: scale, "num_key_value_heads": num_key_value_heads}
    # The same mask reaches every layer's call (or an equal copy of it, under Inductor): read once.
    plan = once_per_contents(atten_mask, "packed_plan", (batch, q_seq, kv_seq),
                             lambda: packed_plan(atten_mask, batch, q_seq, kv_seq)) if batch > 0 else None
    if plan is None:
        PATHS["masked"] += 1
        log.debug("packed prefill: mask %s is not packed; the masked call", tuple(atten_mask.shape))
        return wrapped(query, key, value, atten_mask=atten_mask, input_layout=input_layout, sparse_mode=1,
                       **common)
    PATHS["tnd"] += 1
    log.debug("packed prefill: TND, causal segments %s, full segments %s", plan.causal, plan.full)
    kv_heads = num_key_value_heads or num_heads
    q, k, v = _to_tnd(query, layout.inputs, num_heads), _to_tnd(key, layout.inputs, kv_heads), \
        _to_tnd(value, layout.inputs, kv_heads)
    pieces = []
    for segments, extra in ((plan.causal, {"atten_mask": _causal_mask(query.device), "sparse_mode": 3}),
                            (plan.full, {"sparse_mode": 0, "pre_tokens": INT_MAX, "next_tokens": INT_MAX})):
        if not segments:
            continue
        lengths = _cumulative(segments)
        result = wrapped(_tokens(q, segments), _tokens(k, segments), _tokens(v, segments), input_layout="TND",
                         actual_seq_lengths=lengths, actual_seq_lengths_kv=lengths, **common, **extra)
        out = result[0] if isinstance(result, (tuple, list)) else result
        pieces.append((segments, out))
    if len(pieces) == 1:
        out = pieces[0][1]  # one kind of segment: the call covered every token, in order
    else:
        out = pieces[0][1].new_empty(batch * q_seq, *pieces[0][1].shape[1:])
        for segments, part in pieces:
            offset = 0
            for s, e in segments:
                out[s:e] = part[offset:offset + e - s]
                offset += e - s
    return from_bnsd(out.view(batch, q_seq, out.shape[1], out.shape[2]).transpose(1, 2), layout.output)


def _prompt_kernel(query, key, value, atten_mask, *, num_heads, scale_value, input_layout,
                   num_key_value_heads):
    _prompt_call(query, key, value, atten_mask, num_heads=num_heads, scale_value=scale_value,
                 input_layout=input_layout, num_key_value_heads=num_key_value_heads)  # the wrapped op's checks
    return _packed(PROMPT_OP, functools.partial(call_op, _pfa.QUALNAME), "scale_value", query, key, value,
                   atten_mask, num_heads=num_heads, scale=scale_value, input_layout=input_layout,
                   num_key_value_heads=num_key_value_heads)


def _fia_kernel(query, key, value, atten_mask, *, num_heads, scale, input_layout,
                num_key_value_heads):
    g = validate(_fia_call(query, key, value, atten_mask, num_heads=num_heads, scale=scale,
                           input_layout=input_layout, num_key_value_heads=num_key_value_heads))
    out = _packed(FIA_OP, functools.partial(call_op, _fia.QUALNAME), "scale", query, key, value,
                  atten_mask, num_heads=num_heads, scale=scale, input_layout=input_layout,
                  num_key_value_heads=num_key_value_heads)
    if isinstance(out, (tuple, list)):  # the masked call: (out, lse) already
        return out[0], out[1]
    # softmax_lse_flag is False: the wrapped op's lse is its (1,) placeholder of zeros.
    return out, torch.zeros(g.lse_shape, dtype=torch.float32, device=query.device)


register_reference(PROMPT_QUALNAME, _prompt_kernel)
register_npu(PROMPT_QUALNAME, _prompt_kernel)
register_reference(FIA_QUALNAME, _fia_kernel)
register_npu(FIA_QUALNAME, _fia_kernel)


npu_prompt_flash_attention_packed = dropin(PROMPT_QUALNAME, __name__, """\
npu_attn.npu_prompt_flash_attention_packed (see the module docstring).""")


npu_fused_infer_attention_score_packed = dropin(FIA_QUALNAME, __name__, """\
npu_attn.npu_fused_infer_attention_score_packed (see the module docstring).""")
