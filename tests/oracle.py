"""Independent fp64 oracle for the npu_attn inference attention ops.

Written from the torch_npu documentation (see notes/research_*.md), NOT from
the package code: nothing here imports npu_attn_graph. Everything is computed
in float64 with explicit loops over batch, head and query row, so that each
rule of the spec is one readable line.

Semantics implemented (per batch b, query head h, kv head g = h // (N // Nkv)):

* scores[i, j] = scale * q_i . k_j  (+ pse[b or 0, h, i, j])
* (i, j) is KEPT iff all of
    - i lies in the batch's valid query rows [q_start, q_end)
    - j lies in the batch's valid key range [kv_start, kv_end)
    - the user mask (modes 0/1 only) is 0 at (i, j)  (True/1 = masked out)
    - the band, with r = (j - kv_start) - (i - q_start), q_len/kv_len the
      batch's actual lengths:
        mode 0 with a mask: -pre <= r <= next   (ignored with left padding,
                            where torch_npu forces pre/next to INT_MAX)
        mode 0 w/o mask, 1: no band
        mode 2:             r <= 0
        mode 3:             r <= kv_len - q_len
        mode 4:             -pre <= r - (kv_len - q_len) <= next
      (query S == 1 -- the incremental path -- ignores sparse_mode/pre/next)
* out_i = softmax over kept j of scores[i, j], times v_j; lse_i = logsumexp
  over kept scores; rows with nothing kept output 0 and lse +inf.
* learnable_sink (N,): the row's softmax runs over [kept scores..., sink[h]]
  and the sink column is dropped before P @ V (torch_npu's own v2 golden does
  exactly this); a row with nothing kept still outputs 0. lse stays the
  logsumexp of the kept scores alone: the CANN kernel writes softmax_lse
  before it adds the sink term.
* int8 output: round_half_even(out * scale2 + offset2) clamped to [-128, 127].
* int8 KV antiquant: (x + offset) * scale.
* Paged KV: token t of batch b lives in block block_table[b, t // bs] at
  offset t % bs of a (blocknum, bs, Nkv*D) or (blocknum, Nkv, bs, D) cache.
* KV left padding p with length L: keys [S - p - L, S - p) (start < 0: empty).
* TND: per-batch segments given by cumulative lengths.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64
INT_MAX = 2147483647


# ----------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------


def split_layout(input_layout: str) -> tuple[str, str]:
    if "_" in input_layout:
        a, b = input_layout.split("_")
        return a, b
    return input_layout, input_layout


def bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """(B, S, H) / (B, S, N, D) / (B, N, S, D) -> (B, N, S, D), keeps dtype."""
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, heads, h // heads).permute(0, 2, 1, 3)
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    assert layout == "BNSD", layout
    return x


def from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.permute(0, 2, 1, 3).reshape(b, s, n * d)
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    assert layout == "BNSD", layout
    return x


def segments(cumulative) -> list[tuple[int, int]]:
    out, prev = [], 0
    for c in cumulative:
        out.append((prev, int(c)))
        prev = int(c)
    return out


def per_batch(values, batch: int) -> list[int] | None:
    if values is None:
        return None
    values = [int(x) for x in values]
    return values * batch if len(values) == 1 else values[:batch]


def left_padded_range(seq: int, length: int, pad) -> tuple[int, int]:
    p = max(0, int(pad.reshape(-1)[0]))
    start, end = seq - p - length, seq - p
    if start < 0 or end < 0:
        return (0, 0)
    return (start, end)


# ----------------------------------------------------------------------------
# Antiquant: scale/offset value for one (batch, kv head, token)
# ----------------------------------------------------------------------------


def antiquant_param(t: torch.Tensor, mode: int, b: int, n: int, tok: int, block: int, offset_in_block: int,
                    kv_heads: int, dim: int) -> torch.Tensor:
    """The scale (or offset) for token `tok` of batch b, kv head n: a scalar or (dim,) fp64."""
    t = t.to(F64)
    if mode == 0:
        if t.numel() == 1:
            return t.reshape(())
        return t.reshape(kv_heads, dim)[n]
    if mode == 1:  # per-token (B, S) or documented (1, B, S)
        if t.dim() == 3:
            t = t[0]
        return t[b if t.shape[0] > 1 else 0, tok]
    if mode == 2:  # per-head (N,)
        return t[n]
    if mode == 3:  # (B, N, S)
        return t[b if t.shape[0] > 1 else 0, n, tok]
    if mode == 4:  # (blocknum, blocksize)
        return t[block, offset_in_block]
    if mode == 5:  # (blocknum, N, blocksize)
        return t[block, n, offset_in_block]
    raise AssertionError(mode)


def dequantise(x: torch.Tensor, scale, offset, mode: int, b: int, blocks: list[tuple[int, int]] | None,
               kv_heads: int) -> torch.Tensor:
    """x: (Nkv, S, D) int8 of batch b -> fp64 (x + offset) * scale, token by token."""
    if x.dtype != torch.int8:
        return x.to(F64)
    n_heads, s, d = x.shape
    out = torch.empty(n_heads, s, d, dtype=F64)
    for n in range(n_heads):
        for t in range(s):
            blk, off = blocks[t] if blocks is not None else (-1, -1)
            val = x[n, t].to(F64)
            if offset is not None:
                val = val + antiquant_param(offset, mode, b, n, t, blk, off, kv_heads, d)
            out[n, t] = val * antiquant_param(scale, mode, b, n, t, blk, off, kv_heads, d)
    return out


# ----------------------------------------------------------------------------
# Paged caches
# ----------------------------------------------------------------------------


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, b: int, length: int, block_size: int,
                 kv_heads: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Tokens [0, length) of batch b -> (Nkv, length, D) (cache dtype) and their (block, offset)."""
    tokens, where = [], []
    for t in range(length):
        blk = int(block_table[b, t // block_size])
        off = t % block_size
        if cache.dim() == 3:  # (blocknum, blocksize, Nkv*D)
            tokens.append(cache[blk, off].reshape(kv_heads, -1))
        else:  # (blocknum, Nkv, blocksize, D)
            tokens.append(cache[blk, :, off, :])
        where.append((blk, off))
    if not tokens:
        d = cache.shape[-1] // kv_heads if cache.dim() == 3 else cache.shape[-1]
        return cache.new_zeros(kv_heads, 0, d), where
    return torch.stack(tokens, dim=1), where


# ----------------------------------------------------------------------------
# The attention of one batch
# ----------------------------------------------------------------------------


def kept_positions(sq: int, skv: int, q_range, kv_range, mask_b, sparse_mode: int, pre: int, nxt: int,
                   incremental: bool, band_for_mode0: bool) -> torch.Tensor:
    """(sq, skv) bool: True where query row i may attend to key j."""
    qs, qe = q_range
    ks, ke = kv_range
    q_len, kv_len = qe - qs, ke - ks
    masked = None if mask_b is None else (mask_b != 0).tolist()
    keep = torch.zeros(sq, skv, dtype=torch.bool)
    for i in range(sq):
        for j in range(skv):
            if not (qs <= i < qe and ks <= j < ke):
                continue
            if masked is not None and masked[i][j]:
                continue
            r = (j - ks) - (i - qs)
            if not incremental:
                if sparse_mode == 0 and band_for_mode0 and not (-pre <= r <= nxt):
                    continue
                if sparse_mode == 2 and not r <= 0:
                    continue
                if sparse_mode == 3 and not r <= kv_len - q_len:
                    continue
                if sparse_mode == 4 and not (-pre <= r - (kv_len - q_len) <= nxt):
                    continue
            keep[i, j] = True
    return keep


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
           pse_b: torch.Tensor | None, sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, Sq, D), k (Nkv, Skv, D), v (Nkv, Skv, Dv) fp64 -> out (N, Sq, Dv), lse (N, Sq)."""
    heads, sq, _ = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    out = torch.zeros(heads, sq, v.shape[-1], dtype=F64)
    lse = torch.full((heads, sq), math.inf, dtype=F64)
    for h in range(heads):
        g = h // group
        scores = scale * (q[h] @ k[g].T)
        if pse_b is not None:
            scores = scores + pse_b[h, :sq, : k.shape[1]].to(F64)
        for i in range(sq):
            idx = keep[i].nonzero().flatten()
            s = scores[i, idx]
            if sink is not None:
                # Concatenate the sink column, softmax, drop it.
                p = torch.softmax(torch.cat([s, sink[h].to(F64).reshape(1)]), dim=0)[:-1]
                out[h, i] = p @ v[g, idx]
            if idx.numel() == 0:
                continue
            if sink is None:
                out[h, i] = torch.softmax(s, dim=0) @ v[g, idx]
            lse[h, i] = torch.logsumexp(s, dim=0)
    return out, lse


def quantise_int8(out: torch.Tensor, scale2, offset2, heads: int) -> torch.Tensor:
    """out (N, S, Dv) fp64 -> int8 round-half-even(out * scale2 + offset2), saturated."""
    dv = out.shape[-1]

    def channel(t):
        t = t.to(F64)
        return t.reshape(()) if t.numel() == 1 else t.reshape(heads, 1, dv)

    y = out * channel(scale2)
    if offset2 is not None:
        y = y + channel(offset2)
    return torch.round(y).clamp(-128, 127).to(torch.int8)


# ----------------------------------------------------------------------------
# The op-level oracle (FIA argument names; PFA/IFA map onto it)
# ----------------------------------------------------------------------------


def fia_oracle(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
               actual_seq_lengths_kv=None, quant_scale2=None, quant_offset2=None, antiquant_scale=None,
               antiquant_offset=None, key_antiquant_scale=None, key_antiquant_offset=None,
               value_antiquant_scale=None, value_antiquant_offset=None, block_table=None,
               query_padding_size=None, kv_padding_size=None, key_shared_prefix=None, value_shared_prefix=None,
               actual_shared_prefix_len=None, query_rope=None, key_rope=None, num_heads=1, scale=1.0,
               pre_tokens=INT_MAX, next_tokens=INT_MAX, input_layout="BSH", num_key_value_heads=0,
               sparse_mode=0, block_size=0, antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0,
               softmax_lse_flag=False, learnable_sink=None, **ignored):
    """Returns (attention_out, softmax_lse): out fp64 (int8 with quant_scale2) in the output layout;
    lse fp64 (B, N, Sq, 1) / (T, N, 1), or zeros [1] when softmax_lse_flag is False."""
    in_layout, out_layout = split_layout(input_layout)
    heads = num_heads
    kv_heads = num_key_value_heads or num_heads
    tnd = in_layout == "TND"
    paged = block_table is not None

    # --- antiquant parameters (separate ones win over the combined (2, ...) ones)
    k_aq = v_aq = None
    if antiquant_scale is not None:
        def part(t, i):
            if t is None:
                return None
            return t[i] if t.dim() > 1 else t[i : i + 1]
        k_aq = (part(antiquant_scale, 0), part(antiquant_offset, 0), antiquant_mode)
        v_aq = (part(antiquant_scale, 1), part(antiquant_offset, 1), antiquant_mode)
    if key_antiquant_scale is not None:
        k_aq = (key_antiquant_scale, key_antiquant_offset, key_antiquant_mode)
        v_aq = (value_antiquant_scale, value_antiquant_offset, value_antiquant_mode)

    # --- queries: per batch (N, Sq_b, D) and valid row range
    if tnd:
        q_segs = segments(actual_seq_lengths)
        batch = len(q_segs)
        q_list = [query[s:e].permute(1, 0, 2).to(F64) for s, e in q_segs]
        q_ranges = [(0, e - s) for s, e in q_segs]
        qr_list = None
        if query_rope is not None:
            qr_list = [query_rope[s:e].permute(1, 0, 2).to(F64) for s, e in q_segs]
    else:
        q4 = bnsd(query, in_layout, heads).to(F64)
        batch, sq = q4.shape[0], q4.shape[2]
        q_list = [q4[b] for b in range(batch)]
        qr_list = None
        if query_rope is not None:
            qr4 = bnsd(query_rope, in_layout, heads).to(F64)
            qr_list = [qr4[b] for b in range(batch)]
        q_lens = per_batch(actual_seq_lengths, batch)
        if q_lens is None:
            q_ranges = [(0, sq)] * batch
        elif query_padding_size is not None:
            q_ranges = [left_padded_range(sq, n, query_padding_size) for n in q_lens]
        else:
            q_ranges = [(0, n) for n in q_lens]

    # --- keys/values: per batch (Nkv, Skv_b, D) in the cache dtype, valid range, block positions
    k_list, v_list, kr_list, kv_ranges, blocks_list = [], [], [], [], []
    if paged:
        kv_lens = per_batch(actual_seq_lengths_kv, batch)
        for b in range(batch):
            kb, where = gather_paged(key, block_table, b, kv_lens[b], block_size, kv_heads)
            vb, _ = gather_paged(value, block_table, b, kv_lens[b], block_size, kv_heads)
            k_list.append(kb)
            v_list.append(vb)
            if key_rope is not None:
                kr_list.append(gather_paged(key_rope, block_table, b, kv_lens[b], block_size, kv_heads)[0])
            kv_ranges.append((0, kv_lens[b]))
            blocks_list.append(where)
    elif tnd:
        for s, e in segments(actual_seq_lengths_kv):
            k_list.append(key[s:e].permute(1, 0, 2))
            v_list.append(value[s:e].permute(1, 0, 2))
            if key_rope is not None:
                kr_list.append(key_rope[s:e].permute(1, 0, 2))
            kv_ranges.append((0, e - s))
            blocks_list.append(None)
    else:
        k4 = bnsd(key, in_layout, kv_heads)
        v4 = bnsd(value, in_layout, kv_heads)
        skv = k4.shape[2]
        kv_lens = per_batch(actual_seq_lengths_kv, batch)
        for b in range(batch):
            k_list.append(k4[b])
            v_list.append(v4[b])
            if key_rope is not None:
                kr_list.append(bnsd(key_rope, in_layout, kv_heads)[b])
            if kv_lens is None:
                kv_ranges.append((0, skv))
            elif kv_padding_size is not None:
                kv_ranges.append(left_padded_range(skv, kv_lens[b], kv_padding_size))
            else:
                kv_ranges.append((0, kv_lens[b]))
            blocks_list.append(None)

    # --- dequantise (int8 KV), rope, shared prefix
    for b in range(batch):
        if k_aq is not None:
            k_list[b] = dequantise(k_list[b], k_aq[0], k_aq[1], k_aq[2], b, blocks_list[b], kv_heads)
            v_list[b] = dequantise(v_list[b], v_aq[0], v_aq[1], v_aq[2], b, blocks_list[b], kv_heads)
        k_list[b] = k_list[b].to(F64)
        v_list[b] = v_list[b].to(F64)
        if query_rope is not None:
            q_list[b] = torch.cat([q_list[b], qr_list[b]], dim=-1)
            k_list[b] = torch.cat([k_list[b], kr_list[b].to(F64)], dim=-1)
    if key_shared_prefix is not None:
        pk = bnsd(key_shared_prefix, in_layout, kv_heads)[0].to(F64)
        pv = bnsd(value_shared_prefix, in_layout, kv_heads)[0].to(F64)
        plen = pk.shape[1] if actual_shared_prefix_len is None else int(actual_shared_prefix_len[0])
        for b in range(batch):
            # The prefix precedes the batch's own keys (right padded): positions
            # [0, plen) prefix, [plen, plen + L) own keys; masks/pse index that.
            k_list[b] = torch.cat([pk[:, :plen], k_list[b]], dim=1)
            v_list[b] = torch.cat([pv[:, :plen], v_list[b]], dim=1)
            ks, ke = kv_ranges[b]
            assert ks == 0
            kv_ranges[b] = (0, plen + ke)

    # --- mask (B or 1, Sq, Skv) bool for modes 0/1; modes 2-4 use only the band
    incremental = (not tnd) and q_list[0].shape[1] == 1
    mask3 = None
    if atten_mask is not None and (incremental or sparse_mode in (0, 1)):
        m = atten_mask != 0
        if m.dim() == 2:
            m = m[:, None, :] if incremental else m[None]
        elif m.dim() == 4:
            m = m[:, 0]
        mask3 = m
    left_padding = query_padding_size is not None or kv_padding_size is not None
    band_for_mode0 = atten_mask is not None and not left_padding

    outs, lses = [], []
    for b in range(batch):
        q, k, v = q_list[b], k_list[b], v_list[b]
        mask_b = None if mask3 is None else mask3[b if mask3.shape[0] > 1 else 0]
        keep = kept_positions(q.shape[1], k.shape[1], q_ranges[b], kv_ranges[b], mask_b, sparse_mode,
                              pre_tokens, next_tokens, incremental, band_for_mode0)
        pse_b = None if pse_shift is None else pse_shift[b if pse_shift.shape[0] > 1 else 0]
        out, lse = attend(q, k, v, keep, scale, pse_b, learnable_sink)
        if quant_scale2 is not None:
            out = quantise_int8(out, quant_scale2, quant_offset2, heads)
        outs.append(out)
        lses.append(lse)

    if tnd:
        out = torch.cat([o.permute(1, 0, 2) for o in outs], dim=0)  # (T, N, Dv)
        lse = torch.cat([l.T for l in lses], dim=0)[..., None]  # (T, N, 1)
    else:
        out = from_bnsd(torch.stack(outs), out_layout)
        lse = torch.stack(lses)[..., None]  # (B, N, Sq, 1)
    if not softmax_lse_flag:
        lse = torch.zeros(1, dtype=F64)
    return out.contiguous(), lse


def pfa_oracle(query, key, value, *, atten_mask=None, pse_shift=None, actual_seq_lengths=None,
               quant_scale2=None, quant_offset2=None, num_heads=1, scale_value=1.0, pre_tokens=INT_MAX,
               next_tokens=0, input_layout="BSH", num_key_value_heads=0, actual_seq_lengths_kv=None,
               sparse_mode=0, **ignored):
    """npu_prompt_flash_attention: note its default next_tokens is 0."""
    out, _ = fia_oracle(query, key, value, atten_mask=atten_mask, pse_shift=pse_shift,
                        actual_seq_lengths=actual_seq_lengths, actual_seq_lengths_kv=actual_seq_lengths_kv,
                        quant_scale2=quant_scale2, quant_offset2=quant_offset2, num_heads=num_heads,
                        scale=scale_value, pre_tokens=pre_tokens, next_tokens=next_tokens,
                        input_layout=input_layout, num_key_value_heads=num_key_value_heads,
                        sparse_mode=sparse_mode)
    return out


def ifa_oracle(query, key, value, *, atten_mask=None, pse_shift=None, actual_seq_lengths=None,
               antiquant_scale=None, antiquant_offset=None, block_table=None, quant_scale2=None,
               quant_offset2=None, kv_padding_size=None, num_heads=1, scale_value=1.0, input_layout="BSH",
               num_key_value_heads=0, block_size=0, **ignored):
    """npu_incre_flash_attention: actual_seq_lengths are the KV lengths; S == 1."""
    out, _ = fia_oracle(query, key, value, atten_mask=atten_mask, pse_shift=pse_shift,
                        actual_seq_lengths_kv=actual_seq_lengths, antiquant_scale=antiquant_scale,
                        antiquant_offset=antiquant_offset, block_table=block_table, quant_scale2=quant_scale2,
                        quant_offset2=quant_offset2, kv_padding_size=kv_padding_size, num_heads=num_heads,
                        scale=scale_value, input_layout=input_layout, num_key_value_heads=num_key_value_heads,
                        block_size=block_size)
    return out


def fia_v2_oracle(query, key, value, *, query_rope=None, key_rope=None, pse_shift=None, atten_mask=None,
                  actual_seq_qlen=None, actual_seq_kvlen=None, block_table=None, dequant_scale_key=None,
                  dequant_offset_key=None, dequant_scale_value=None, dequant_offset_value=None,
                  quant_scale_out=None, quant_offset_out=None, learnable_sink=None, num_query_heads=1,
                  num_key_value_heads=0, softmax_scale=1.0, pre_tokens=INT_MAX, next_tokens=INT_MAX,
                  input_layout="BSH", sparse_mode=0, block_size=0, key_quant_mode=0, value_quant_mode=0,
                  return_softmax_lse=False, **ignored):
    """npu_fused_infer_attention_score_v2: the v1 computation under the v2 names (the
    mapping TorchAir's converter uses to feed GE FusedInferAttentionScore), plus the sink."""
    return fia_oracle(query, key, value, query_rope=query_rope, key_rope=key_rope, pse_shift=pse_shift,
                      atten_mask=atten_mask, actual_seq_lengths=actual_seq_qlen,
                      actual_seq_lengths_kv=actual_seq_kvlen, block_table=block_table,
                      key_antiquant_scale=dequant_scale_key, key_antiquant_offset=dequant_offset_key,
                      value_antiquant_scale=dequant_scale_value, value_antiquant_offset=dequant_offset_value,
                      quant_scale2=quant_scale_out, quant_offset2=quant_offset_out, num_heads=num_query_heads,
                      scale=softmax_scale, pre_tokens=pre_tokens, next_tokens=next_tokens,
                      input_layout=input_layout, num_key_value_heads=num_key_value_heads,
                      sparse_mode=sparse_mode, block_size=block_size, key_antiquant_mode=key_quant_mode,
                      value_antiquant_mode=value_quant_mode, softmax_lse_flag=return_softmax_lse,
                      learnable_sink=learnable_sink)
