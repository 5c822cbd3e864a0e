"""Reference kernels of the inference attention ops (prompt, incremental, fused-infer).

Each op module maps its arguments onto an InferenceCall (_inference.py, which validates it);
this module registers the op's fake, reference and NPU kernels, and runs the reference
computation: layouts to BNSD, paged caches, KV dequantisation, shared prefixes, masks and
bands, through the shared chunked attention core, then output quantisation.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from . import _dense_decode, _dense_prompt, _library, _paged_decode, _varlen_prefill
from ._attention_core import AttentionProblem, Band, attention, compute_dtype, holds_compressed_pattern, paged_block_ids
from ._inference import (Antiquant, Geometry, InferenceCall, broadcast, mask_uses_compressed_form, ordinary_mask, validate,
                         validated)
from ._layouts import from_bnsd, pack_tnd, segments, to_bnsd, unpack_tnd
from ._library import (COMPRESSED_MASK_EXPRESSION, INT64_MAX, LIB, check, fail, register_npu, register_reference)


def register_inference_op(qualname: str, build_call: Callable[..., InferenceCall], npu_kernel: Callable,
                          *, returns_lse: bool) -> None:
    """Register fake, reference and NPU kernels of an op whose arguments
    `build_call` maps onto an InferenceCall (same signature as the schema)."""

    def fake(*args, **kwargs):
        outputs = empty_outputs(build_call(*args, **kwargs))
        return outputs if returns_lse else outputs[0]

    def reference(*args, **kwargs):
        outputs = run(build_call(*args, **kwargs))
        return outputs if returns_lse else outputs[0]

    torch.library.register_fake(qualname, fake, lib=LIB)
    register_reference(qualname, reference)
    register_npu(qualname, npu_kernel)


def empty_outputs(call: InferenceCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake implementation: validated, correctly shaped empty outputs."""
    g = validate(call)
    q = call.query
    out = q.new_empty(g.out_shape, dtype=g.out_dtype)
    lse = q.new_empty(g.lse_shape, dtype=torch.float32)
    return out, lse


# ----------------------------------------------------------------------------
# Reference computation
# ----------------------------------------------------------------------------


def run(call: InferenceCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference kernel: (attention_out, softmax_lse) with the op's exact semantics."""
    g = validated(call)
    # The fast paths, each for one common call form, the same result in a few ops: a
    # serving engine's paged decode step and packed prefill, a static-cache decode step,
    # a dense prompt with at most an ordinary mask.
    fast_path = (_paged_decode if call.block_table is not None else
                 _varlen_prefill if call.layout.inputs == "TND" else
                 _dense_decode if g.q_seq == 1 else _dense_prompt)
    if fast_path is not None:
        fast = fast_path.run(call, g) if fast_path.eligible(call, g) else None
        if fast is not None:
            return fast
        fast_path.PATHS["general"] += 1
    layout, device = call.layout, call.query.device
    tnd = layout.inputs == "TND"

    # Query (B, N, Sq, D) and its valid rows.
    if tnd:
        q_segs = segments(call.q_lens)
        q = pack_tnd(call.query, q_segs)
        q_ranges = [(0, e - s) for s, e in q_segs]
    else:
        q = to_bnsd(call.query, layout.inputs, g.heads)
        # query_padding_size only applies to the prompt (S > 1) path.
        q_padding = call.query_padding_size if g.q_seq != 1 else None
        q_ranges = _left_padded_ranges(call.q_lens, q_padding, g.q_seq, g.batch)

    # Key/value (B, Nkv, Skv, D) and their valid positions.
    source = None
    if call.block_table is not None:
        kv_lens = broadcast(call.kv_lens, g.batch)
        table = paged_block_ids(call.op, call.block_table, kv_lens, call.block_size, call.key.shape[0],
                                call.kv_lens_name)
        source = PagedKeyValues(call, g, table)
        k = v = None
        kv_ranges = [(0, n) for n in kv_lens]
    elif tnd:
        kv_segs = segments(call.kv_lens)
        k = pack_tnd(call.key, kv_segs)
        v = pack_tnd(call.value, kv_segs)
        kv_ranges = [(0, e - s) for s, e in kv_segs]
    else:
        k = to_bnsd(call.key, layout.inputs, g.kv_heads)
        v = to_bnsd(call.value, layout.inputs, g.kv_heads)
        kv_ranges = _left_padded_ranges(call.kv_lens, call.kv_padding_size, g.kv_seq, g.batch)

    if source is None:
        k = _dequantise(call, call.key_antiquant, k)
        v = _dequantise(call, call.value_antiquant, v)
        if call.key_rope is not None:
            k = torch.cat([k, _rope_to_bnsd(call, call.key_rope, g, False)], -1)
    if call.query_rope is not None:
        rope_q = _rope_to_bnsd(call, call.query_rope, g, True)
        q = torch.cat([q.to(rope_q.dtype) if q.dtype == torch.int8 else q, rope_q], -1)

    mask = _normalise_mask(call, g)
    bias = call.pse_shift  # already (B or 1, N, Q_S, KV_S)
    if call.key_shared_prefix is not None:
        k, v, kv_ranges, mask, bias = _prepend_prefix(call, g, k, v, kv_ranges, mask, bias)

    scale = call.scale
    prob_quant = None
    if call.query.dtype == torch.int8:
        scale = scale * float(call.dequant_scale1.reshape(-1)[0])
        prob_quant = float(call.quant_scale1.reshape(-1)[0])

    band = _band(call, g)
    problem = AttentionProblem(
        query=q, key=k, value=v, scale=scale, mask=mask, bias=bias,
        q_ranges=q_ranges, kv_ranges=kv_ranges, band=band, prob_quant_scale=prob_quant, source=source,
        sink=call.learnable_sink,
    )
    out, lse = attention(problem, want_lse=call.softmax_lse)

    if call.query.dtype == torch.int8:
        out = out * float(call.dequant_scale2.reshape(-1)[0])
    out = _finish_output(call, g, out)

    if tnd:
        out = unpack_tnd(out, q_segs, call.query.shape[0])
        lse_out = unpack_tnd(lse, q_segs, call.query.shape[0]) if lse is not None else None
    else:
        out = from_bnsd(out, layout.output)
        lse_out = lse
    if lse_out is None:
        lse_out = torch.zeros(1, dtype=torch.float32, device=device)
    return out, lse_out


def _left_padded_ranges(
    lens: Sequence[int] | None, padding: torch.Tensor | None, seq: int, batch: int
) -> list[tuple[int, int]]:
    """Valid positions per batch: [0, len) (right padding) or, with a left
    padding size, [S - pad - len, S - pad); a range that starts or ends below 0
    is empty (the NPU returns zeros for that batch)."""
    per_batch = broadcast(lens, batch)
    if per_batch is None:
        return [(0, seq)] * batch
    if padding is None:
        return [(0, n) for n in per_batch]
    pad = max(0, int(padding.reshape(-1)[0]))
    ranges = []
    for n in per_batch:
        start, end = seq - pad - n, seq - pad
        ranges.append((start, end) if start >= 0 and end >= 0 else (0, 0))
    return ranges


class PagedKeyValues:
    """KeyValueSource over paged caches (see _attention_core.KeyValueSource).

    Blocks are gathered a few at a time into a small dense buffer (dequantised
    and with rope keys appended there), so no dense copy of the whole cache is
    made and each gathered chunk is still in cache when it is multiplied."""

    def __init__(self, call: InferenceCall, g: Geometry, table: torch.Tensor) -> None:
        self.call, self.table, self.block_size = call, table, call.block_size
        self.kv_heads, self.value_dim = g.kv_heads, g.value_dim
        self.length = table.shape[1] * call.block_size
        dim = max(g.head_dim, g.value_dim)
        chunk_bytes = table.shape[0] * g.kv_heads * call.block_size * dim * 4
        # A quarter of the score budget keeps each gathered chunk cache-resident
        # until its matmul reads it (measured faster than larger gathers).
        self.blocks_per_chunk = max(1, _library.SCORE_BLOCK_BYTES // 4 // chunk_bytes)

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """cache blocks (B, n) -> (B, Nkv, n * block_size, D), contiguous."""
        batch, n = blocks.shape
        picked = cache.index_select(0, blocks.reshape(-1))
        if cache.dim() == 3:  # (blocknum, blocksize, H)
            return picked.view(batch, n * self.block_size, self.kv_heads, -1).transpose(1, 2).contiguous()
        picked = picked.view(batch, n, self.kv_heads, self.block_size, -1)  # (blocknum, Nkv, blocksize, D)
        return picked.transpose(1, 2).reshape(batch, self.kv_heads, n * self.block_size, -1)

    def _chunks(self, cache: torch.Tensor, antiquant: Antiquant | None, rope: torch.Tensor | None,
                lo: int, hi: int, dtype: torch.dtype):
        bs = self.block_size
        last_block = math.ceil(hi / bs)
        for j0 in range(lo // bs, last_block, self.blocks_per_chunk):
            j1 = min(last_block, j0 + self.blocks_per_chunk)
            blocks = self.table[:, j0:j1]
            x = _dequantise(self.call, antiquant, self._gather(cache, blocks), j0 * bs, blocks).to(dtype)
            if rope is not None:
                x = torch.cat([x, self._gather(rope, blocks).to(dtype)], dim=-1)
            a, b = max(lo, j0 * bs), min(hi, j1 * bs)
            yield a, b, x[:, :, a - j0 * bs : b - j0 * bs]

    def key_chunks(self, lo: int, hi: int, dtype: torch.dtype):
        return self._chunks(self.call.key, self.call.key_antiquant, self.call.key_rope, lo, hi, dtype)

    def value_chunks(self, lo: int, hi: int, dtype: torch.dtype):
        return self._chunks(self.call.value, self.call.value_antiquant, None, lo, hi, dtype)


def _dequantise(call: InferenceCall, aq: Antiquant | None, x: torch.Tensor, start: int = 0,
                token_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """int8 (B, Nkv, S, D) holding positions [start, start + S) -> float:
    (x + offset) * scale, the scales broadcast per mode (paged modes 4/5 index
    the scales by the chunk's block ids)."""
    if aq is None or x.dtype != torch.int8:
        return x
    dtype = compute_dtype(call.query.dtype)
    b, n, s, d = x.shape

    def shaped(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        if aq.mode == 0:
            return t.reshape(()) if t.numel() == 1 else t.reshape(1, n, 1, d)
        if aq.mode == 1:  # (B, S), or (1, B, S) for the separate key/value scales
            t = t[0] if t.dim() == 3 else t
            return _expand_batch(t, b)[:, start : start + s].reshape(b, 1, s, 1)
        if aq.mode == 2:
            return t.reshape(1, n, 1, 1)
        if aq.mode == 3:
            return _expand_batch(t, b)[:, :, start : start + s].reshape(b, n, s, 1)
        if aq.mode == 4:  # (blocknum, blocksize) gathered like the cache
            return t[token_blocks].reshape(b, 1, s, 1)
        return t[token_blocks].permute(0, 2, 1, 3).reshape(b, n, s, 1)  # mode 5

    result = x.to(dtype)
    if aq.offset is not None:
        result = result + shaped(aq.offset)
    return result * shaped(aq.scale)


def _expand_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t


def _rope_to_bnsd(call: InferenceCall, rope: torch.Tensor, g: Geometry, is_query: bool) -> torch.Tensor:
    """Dense query/key rope -> BNSD (paged key rope is gathered by PagedKeyValues)."""
    layout = call.layout.inputs
    heads = g.heads if is_query else g.kv_heads
    if layout == "TND":  # query rope follows the query segments, key rope the key segments
        return pack_tnd(rope, segments(call.q_lens if is_query else call.kv_lens))
    return to_bnsd(rope, layout, heads)


def _normalise_mask(call: InferenceCall, g: Geometry) -> torch.Tensor | None:
    """User mask -> bool, broadcastable to (B, N, Sq, Skv); None for compressed masks."""
    mask = call.atten_mask
    if mask is None or mask_uses_compressed_form(call, g.q_seq):
        if mask is not None:
            _check_compressed_mask(call, mask)
        return None
    return ordinary_mask(mask, g.q_seq)


def _check_compressed_mask(call: InferenceCall, mask: torch.Tensor) -> None:
    """Modes 2/3/4 read the 2048x2048 mask as a pattern; it must be triu(1)."""
    if not holds_compressed_pattern(mask):
        fail(call.op, "atten_mask", f"must be {COMPRESSED_MASK_EXPRESSION} for sparse_mode {call.sparse_mode}",
             "a different pattern")


def _prepend_prefix(call: InferenceCall, g: Geometry, k, v, kv_ranges, mask, bias):
    """Shared prefix: the first actual_shared_prefix_len prefix tokens precede
    every batch's own keys; masks and pse index the concatenated sequence."""
    pk = to_bnsd(call.key_shared_prefix, call.layout.inputs, g.kv_heads)
    pv = to_bnsd(call.value_shared_prefix, call.layout.inputs, g.kv_heads)
    plen = pk.shape[2] if call.shared_prefix_len is None else int(call.shared_prefix_len[0])
    check(0 <= plen <= pk.shape[2], call.op, "actual_shared_prefix_len",
          f"must be within [0, {pk.shape[2]}]", plen)
    b = k.shape[0]
    k = torch.cat([pk[:, :, :plen].expand(b, -1, -1, -1).to(k.dtype), k], dim=2)
    v = torch.cat([pv[:, :, :plen].expand(b, -1, -1, -1).to(v.dtype), v], dim=2)
    # A batch's keys are prefix [0, plen) then its own valid range; a left-padded
    # range is not contiguous with the prefix, so shared prefixes require
    # right-padded KV (checked in validation: no kv_padding_size).
    kv_ranges = [(0, plen + e) if s == 0 else (0, 0) for s, e in kv_ranges]
    return k, v, kv_ranges, mask, bias


def _band(call: InferenceCall, g: Geometry) -> Band | None:
    """Sparse mode -> band. The S == 1 (incremental) path ignores sparse modes."""
    if g.q_seq == 1 or call.incremental_only:
        return None
    mode = call.sparse_mode
    if mode == 0:
        # No mask, or a mask with query/KV left padding: torch_npu ignores
        # pre_tokens/next_tokens (sets them to INT_MAX).
        if call.atten_mask is None or call.query_padding_size is not None or call.kv_padding_size is not None:
            return None
        return Band(call.pre_tokens, call.next_tokens, right_down=False)
    if mode == 1:
        return None
    if mode == 2:
        return Band(INT64_MAX, 0, right_down=False)
    if mode == 3:
        return Band(INT64_MAX, 0, right_down=True)
    return Band(call.pre_tokens, call.next_tokens, right_down=True)


def _finish_output(call: InferenceCall, g: Geometry, out: torch.Tensor) -> torch.Tensor:
    """fp32 (B, N, S, Dv) -> the op's output dtype, quantising to int8 if asked."""
    if call.quant_scale2 is None:
        return out.to(g.out_dtype)
    b, n, s, d = out.shape

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        t = t.to(out.dtype)
        return t.reshape(()) if t.numel() == 1 else t.reshape(1, n, 1, d)

    y = out * per_channel(call.quant_scale2)
    if call.quant_offset2 is not None:
        y = y + per_channel(call.quant_offset2)
    # Round half to even, then saturate, as the NPU's CAST_RINT int8 cast does.
    return torch.round(y).clamp_(-128, 127).to(torch.int8)
