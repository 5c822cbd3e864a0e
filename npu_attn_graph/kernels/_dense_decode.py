"""Fast path of the reference kernels for the common dense decode call.

A static-cache decode step (transformers' StaticCache, rewritten with the cache
position as actual_seq_lengths: passes/static_cache_lengths.py) calls
npu_incre_flash_attention / npu_fused_infer_attention_score once per layer with
one query token per sequence, the whole dense cache as K/V, the valid length of
every sequence, and nothing else. When every sequence has the same length L (a
batch of one; generate() without padding), the slots the op reads are exactly
the first L of each: SDPA on that slice of K/V -- a view, no copy, no mask --
computes the call, and the slots past L (whatever they hold, NaN included) are
never read, as on the NPU. The general path (_inference_kernel.run) walks the
chunked core over the whole cache with its per-batch key windows instead.

Taken only when the call is exactly that form: S == 1, dense K/V (no
block_table), equal lengths >= 1, no mask, pse, padding sizes, quantisation,
rope, shared prefix, sink or softmax_lse; float inputs of one dtype; key and
value head dims equal. Every other call goes the general way. run() validates
the call before trying this path. ``PATHS`` counts the dense decode calls each
way ("fast" / "general").
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from ._attention_core import as_dtype, compute_dtype
from ._inference import Geometry, InferenceCall, broadcast, plain_float_inputs
from ._layouts import from_bnsd, to_bnsd

PATHS: Counter = Counter()


def eligible(call: InferenceCall, g: Geometry) -> bool:
    """The call is a plain dense decode: S == 1 queries, dense float K/V, no other input."""
    return (
        call.block_table is None and g.q_seq == 1 and call.layout.inputs != "TND"
        and call.atten_mask is None
        and call.kv_padding_size is None and call.query_padding_size is None and call.q_lens is None
        and g.head_dim == g.value_dim and plain_float_inputs(call)
    )


def run(call: InferenceCall, g: Geometry) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(attention_out, softmax_lse placeholder) of an eligible, validated call; None where the
    general path must take it (lengths that differ, or a length of 0)."""
    if not isinstance(g.batch, int):
        return None
    lengths = broadcast(call.kv_lens, g.batch)
    if lengths is None:
        length = g.kv_seq
    else:
        length = lengths[0] if lengths else 0
        if any(n != length for n in lengths):
            return None
    if not isinstance(length, int) or length < 1:
        return None
    dtype = compute_dtype(call.query.dtype)
    layout = call.layout.inputs
    query = as_dtype(to_bnsd(call.query, layout, g.heads), dtype)
    key = as_dtype(to_bnsd(call.key, layout, g.kv_heads).narrow(2, 0, length), dtype)
    value = as_dtype(to_bnsd(call.value, layout, g.kv_heads).narrow(2, 0, length), dtype)
    out = F.scaled_dot_product_attention(query, key, value, scale=call.scale, enable_gqa=g.heads != g.kv_heads)
    PATHS["fast"] += 1
    return from_bnsd(as_dtype(out, g.out_dtype), call.layout.output), torch.zeros(1, dtype=torch.float32,
                                                                          device=call.query.device)

