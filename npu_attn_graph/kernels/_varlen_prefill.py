"""Fast path of the reference kernels for the common varlen (TND) prefill call.

A serving engine's prefill packs its sequences into one token axis and calls
npu_prompt_flash_attention / npu_fused_infer_attention_score with input_layout
TND, the cumulative lengths as actual_seq_lengths and actual_seq_lengths_kv
(the same list: each sequence attends to its own tokens), and either causal
masking (sparse_mode 2 or 3 with the compressed mask) or none (sparse_mode 0, no
mask). The general path (_inference_kernel.run) pads the sequences one copy at a
time and walks the chunked core with per-sequence key windows. Here:

1. every segment's tokens are scattered into a zero-padded (segments, max_len)
   buffer with one index_copy_ per tensor (right padding);
2. one torch SDPA call computes every segment: ``is_causal`` for the causal
   modes (a valid query row i sees keys 0..i, all valid, so the padding is never
   read by a row that is kept) or a key-length mask for the full mode;
3. one index_select gathers the rows back into the token axis (validation has
   checked that the last cumulative length is the token count).

Taken only when the call is exactly that form: no block_table, pse, softmax_lse,
quantisation, rope, shared prefix or sink; float inputs of one dtype; query and
key lengths the same list; key and value head dims equal; the padded buffers
within the reference kernels' memory budget (_library.SCORE_BLOCK_BYTES). Every
other call goes the general way. run() validates the call before trying this
path. ``PATHS`` counts the TND prefill calls each way ("fast" / "general").
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from . import _library
from ._attention_core import compute_dtype, holds_compressed_pattern
from ._inference import Geometry, InferenceCall, plain_float_inputs
from ._layouts import segments

PATHS: Counter = Counter()


def eligible(call: InferenceCall, g: Geometry) -> bool:
    """The call is a plain TND prefill: same query and key segments, causal or full, no other input."""
    return (
        call.layout.inputs == "TND" and call.block_table is None and call.q_lens is not None
        and call.kv_lens is not None and list(call.q_lens) == list(call.kv_lens)
        and _is_causal(call) is not None
        and g.head_dim == g.value_dim and plain_float_inputs(call)
    )


def _is_causal(call: InferenceCall) -> bool | None:
    """True: causal within each segment (sparse_mode 2/3, the compressed mask; with equal
    query and key lengths top-left and bottom-right alignment agree); False: each
    segment attends to all of itself (sparse_mode 0, no mask); None: anything else."""
    if call.sparse_mode in (2, 3) and call.atten_mask is not None and holds_compressed_pattern(call.atten_mask):
        return True  # (another mask: the general path names it in its error)
    if call.sparse_mode == 0 and call.atten_mask is None:
        return False
    return None


def run(call: InferenceCall, g: Geometry) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(attention_out, softmax_lse placeholder) of an eligible, validated call; None where the
    general path must take it (no tokens, or over the memory budget)."""
    assert call.q_lens is not None  # eligible() checked it
    segs = segments(call.q_lens)
    lengths = [e - s for s, e in segs]
    width = max(lengths, default=0)
    total = call.query.shape[0]  # == segs[-1][1], checked by validation
    if width == 0:
        return None
    dtype = compute_dtype(call.query.dtype)
    # (the query's (T, N, D): eligible() checked head_dim == value_dim)
    if len(segs) * width * g.heads * call.query.shape[-1] * dtype.itemsize > _library.SCORE_BLOCK_BYTES:
        return None
    device = call.query.device
    # Row of each token in the padded (segments * width) buffer.
    count = torch.tensor(lengths, dtype=torch.int64, device=device)
    seg_of_token = torch.repeat_interleave(torch.arange(len(segs), device=device), count)
    starts = torch.tensor([s for s, _ in segs], dtype=torch.int64, device=device)
    rows = seg_of_token * width + torch.arange(total, device=device) - starts[seg_of_token]

    def padded(x: torch.Tensor) -> torch.Tensor:  # (T, N, D) -> (segments, N, width, D)
        buf = x.new_zeros(len(segs) * width, x.shape[1], x.shape[2], dtype=dtype)
        buf.index_copy_(0, rows, x.to(dtype))
        return buf.view(len(segs), width, x.shape[1], x.shape[2]).transpose(1, 2)

    causal = bool(_is_causal(call))
    key_mask = None
    if not causal and min(lengths) < width:
        key_mask = (torch.arange(width, device=device).view(1, -1) < count.view(-1, 1)).view(len(segs), 1, 1, width)
    out = F.scaled_dot_product_attention(padded(call.query), padded(call.key), padded(call.value),
                                         attn_mask=key_mask, is_causal=causal, scale=call.scale,
                                         enable_gqa=g.heads != g.kv_heads)
    out = out.transpose(1, 2).reshape(len(segs) * width, g.heads, -1).index_select(0, rows).to(g.out_dtype)
    PATHS["fast"] += 1
    return out, torch.zeros(1, dtype=torch.float32, device=device)
