"""Fast path of the reference kernels for the common dense prompt call.

A prefill without a cache (a padded batch, an encoder) calls npu_prompt_flash_attention
or npu_fused_infer_attention_score with dense Q/K/V, at most an ordinary attention
mask (sparse_mode 0 or 1, the mask as data), and nothing else: no lengths, padding
sizes, pse, quantisation, rope, shared prefix, sink or softmax_lse. Every key is then
valid, and the call is one torch SDPA on the whole problem with the mask inverted
(the NPU's True means "masked out", SDPA's "keep"); a query row with no key to attend
to outputs zeros, as the NPU's row-invalid correction gives (SDPA leaves it undefined).

The general path (_inference_kernel.run) computes the same through the chunked core:
for chunks of at least _attention_core.FUSED_MIN_ROWS rows the same SDPA call per
chunk, for fewer rows (a short prompt) a dozen explicit ops per chunk, after building
the row and key structure the general case needs. Measured side by side in one
process on the demo Llama's 2-prompt prefill (7 tokens, the padding mask kept), under
Inductor: the whole compiled call took 0.77x its time with the general path.

Taken only when the call is exactly that form, with float inputs of one dtype and
equal key and value head dims, a sparse_mode 0 band that cannot drop a key
(pre_tokens >= Sq - 1 and next_tokens >= KV_S - 1), and a mask whose float form (SDPA
adds it as one) fits the reference kernels' budget (_library.SCORE_BLOCK_BYTES). Every
other call goes the general way. run() validates the call before trying this path.
``PATHS`` counts the dense prompt calls each way ("fast" / "general").
"""

from __future__ import annotations

from collections import Counter

import torch

from . import _library
from ._attention_core import DenseKeyValues, as_dtype, compute_dtype, fused_chunk
from ._inference import Geometry, InferenceCall, mask_uses_compressed_form, ordinary_mask, plain_float_inputs
from ._layouts import from_bnsd, to_bnsd

PATHS: Counter = Counter()


def eligible(call: InferenceCall, g: Geometry) -> bool:
    """The call is a plain dense prompt: Sq > 1, dense float Q/K/V, at most an ordinary mask."""
    return (
        call.block_table is None and call.layout.inputs != "TND" and not call.incremental_only
        and call.sparse_mode in (0, 1) and not mask_uses_compressed_form(call, g.q_seq)
        and (call.sparse_mode == 1 or call.atten_mask is None or _band_keeps_every_key(call, g))
        and call.q_lens is None and call.kv_lens is None
        and call.query_padding_size is None and call.kv_padding_size is None
        and g.head_dim == g.value_dim and plain_float_inputs(call)
    )


def _band_keeps_every_key(call: InferenceCall, g: Geometry) -> bool:
    """sparse_mode 0's band (keep key j for query i iff -pre_tokens <= j - i <= next_tokens)
    drops nothing."""
    q_seq, kv_seq = g.q_seq, g.kv_seq
    return (isinstance(q_seq, int) and isinstance(kv_seq, int)
            and call.pre_tokens >= q_seq - 1 and call.next_tokens >= kv_seq - 1)


def run(call: InferenceCall, g: Geometry) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(attention_out, softmax_lse placeholder) of an eligible, validated call."""
    if not isinstance(g.q_seq, int) or not isinstance(g.kv_seq, int) or g.q_seq < 1 or g.kv_seq < 1:
        return None
    dtype = compute_dtype(call.query.dtype)
    layout = call.layout.inputs
    masked = None
    if call.atten_mask is not None:
        masked = ordinary_mask(call.atten_mask, g.q_seq)[..., : g.kv_seq]
        # SDPA adds the mask as a float tensor of the mask's shape: over the reference kernels'
        # budget, the general path's row chunks bound it.
        if masked.numel() * dtype.itemsize > _library.SCORE_BLOCK_BYTES:
            return None
    # The general path's own SDPA chunk (mask inverted, rows with no key 0), over the whole problem.
    keys = DenseKeyValues(to_bnsd(call.key, layout, g.kv_heads), to_bnsd(call.value, layout, g.kv_heads))
    out = fused_chunk(as_dtype(to_bnsd(call.query, layout, g.heads), dtype), keys, 0, g.kv_seq, dtype, call.scale,
                      None, masked, g.heads // g.kv_heads)
    PATHS["fast"] += 1
    return from_bnsd(as_dtype(out, g.out_dtype), call.layout.output), torch.zeros(1, dtype=torch.float32,
                                                                          device=call.query.device)
