"""npu_fusion_attention's reference kernels: the call in canonical (B, N, S, D) form, the
chunked forward and backward, and the softmax statistics in the op's layouts.

The chunk walk, masks, bands, key windows, GQA folding and the softmax step come from the
shared attention core (_attention_core: RowChunks, Structure, fold_rows, exp_scores /
fused_softmax), the layouts from _layouts. What is the training op's own: pse, dropout,
reusable score buffers, its statistics (row max -inf and sum 0 for a row with nothing to
attend to) and the backward, which recomputes the probabilities from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ._attention_core import UNBOUNDED, RowChunks, Structure, compute_dtype, exp_scores, fold_rows, fused_softmax
from ._dropout import DropoutMask
from ._fusion_args import (SOFTMAX_LANES, FusionCall, Geometry, check_compressed_mask, first_participating,
                           last_participating)
from ._layouts import from_bnsd, pack_tnd, to_bnsd, unpack_tnd
from ._library import fail


def _bands(call: FusionCall, g: Geometry, q_lens: list[int], kv_lens: list[int]) -> list:
    """Per-batch (pre, next, shift) of the sparse mode, or None (no band)."""
    mode, batch = call.sparse_mode, len(q_lens)
    if call.atten_mask is None or mode == 1:
        return [None] * batch
    # (Structure clamps bounds past any sequence length to UNBOUNDED.)
    pre, nxt = call.pre_tockens, call.next_tockens
    causal_left = (UNBOUNDED, 0, 0)
    bands = []
    for b in range(batch):
        right_down = kv_lens[b] - q_lens[b]
        causal_right = (UNBOUNDED, 0, right_down)
        band_right = (pre, nxt, right_down)
        if mode == 0:
            # A band wider than the whole problem cuts nothing.
            reach = max(q_lens) + max(kv_lens)
            bands.append(None if pre >= reach and nxt >= reach else (pre, nxt, 0))
        elif mode == 2:
            bands.append(causal_left)
        elif mode in (3, 5, 6):
            bands.append(causal_right)
        elif mode == 4:
            bands.append(band_right)
        elif mode == 7:
            bands.append(band_right if b == last_participating(g) else causal_right)
        else:  # 8
            bands.append(band_right if b == first_participating(g) else causal_left)
    return bands


@dataclass
class Problem:
    """One call in canonical form: q (B, N, Sq, D), k (B, Nkv, Skv, D), v (B, Nkv, Skv, Dv),
    contiguous and in the compute dtype, walked chunk by chunk in the core's RowChunks (which
    holds the mask and the Structure); the rest is what the training op adds."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    rows: RowChunks
    pse: torch.Tensor | None  # (B|1, N, Sq|1, Skv), added before scaling
    dropout: DropoutMask | None
    keep_prob: float
    sink: torch.Tensor | None  # (N,)
    dtype: torch.dtype
    buffers: dict = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def buffer(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """A reusable work block: score-sized blocks are allocated once per call, not per
        chunk (fresh multi-MiB allocations cost page faults on every chunk)."""
        numel = 1
        for x in shape:
            numel *= x
        flat = self.buffers.get(name)
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, dtype=self.dtype, device=self.q.device)
            self.buffers[name] = flat
        return flat[:numel].view(*shape)

    def sink_column(self) -> torch.Tensor:
        return self.sink.to(self.dtype).view(1, -1, 1, 1)

    def folded(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, rows, X) -> (B*Nkv, G*rows, X), the core's GQA folding flattened for bmm."""
        return fold_rows(x, self.k.shape[1]).flatten(0, 1)

    def kv3(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        b, kv_heads, _, width = x.shape
        return x[:, :, lo:hi].reshape(b * kv_heads, hi - lo, width)

    def scores(self, r0: int, r1: int, lo: int, hi: int, q_scaled: torch.Tensor) -> torch.Tensor:
        """Masked scaled scores scale * (Q K^T + pse), (B, N, rows, keys), in the "scores" buffer."""
        b, n = self.q.shape[:2]
        rows, keys = r1 - r0, hi - lo
        s3 = self.buffer("scores", (b * self.k.shape[1], self.groups * rows, keys))
        torch.bmm(q_scaled, self.kv3(self.k, lo, hi).transpose(1, 2), out=s3)
        s = s3.view(b, n, rows, keys)
        if self.pse is not None:
            rows_slice = slice(r0, r1) if self.pse.shape[2] != 1 else slice(0, 1)
            s.add_(self.pse[:, :, rows_slice, lo:hi].to(self.dtype), alpha=self.scale)
        masked = self.rows.mask_of(r0, r1, lo, hi)
        if masked is not None:
            s.masked_fill_(masked, float("-inf"))
        return s


def build_problem(call: FusionCall, g: Geometry) -> Problem:
    """Validated call -> canonical problem (TND packed per batch, zero padded)."""
    layout, device = g.layout, call.query.device
    dtype = compute_dtype(call.query.dtype)
    if g.tnd:
        q = pack_tnd(call.query, g.q_segs)
        k = pack_tnd(call.key, g.kv_segs)
        v = pack_tnd(call.value, g.kv_segs)
        q_lens, kv_lens = list(g.q_lens), list(g.kv_lens)
    else:
        q = to_bnsd(call.query, layout, g.heads)
        k = to_bnsd(call.key, layout, g.kv_heads)
        v = to_bnsd(call.value, layout, g.kv_heads)
        q_lens, kv_lens = [g.q_seq] * g.batch, [g.kv_seq] * g.batch
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))

    mask = call.atten_mask
    if mask is not None and call.sparse_mode in (2, 3, 4, 6, 7, 8):
        check_compressed_mask(call)
        mask = None  # the pattern is applied structurally
    elif mask is not None:
        mask = mask if mask.dtype == torch.bool else mask != 0
        if g.tnd and bool(mask.all(dim=-1).any()):
            fail(call.op, "atten_mask", "must not mask a whole row for input_layout TND (varlen masks take no "
                 "padding)", "a fully masked row")
        if mask.dim() == 2:
            mask = mask[None, None]

    bands = _bands(call, g, q_lens, kv_lens)
    prefix = None
    if call.atten_mask is not None and call.sparse_mode in (5, 6):
        prefix = [int(p) for p in call.prefix]
    ragged = any(n != q.shape[2] for n in q_lens) or any(n != k.shape[2] for n in kv_lens)
    structure = None
    if ragged or any(band is not None for band in bands):
        structure = Structure([(0, n) for n in q_lens], [(0, n) for n in kv_lens], bands, device, prefix)

    dropout = None
    if call.keep_prob < 1:
        dropout = DropoutMask(call.keep_prob, call.seed, call.offset, q.shape[0], g.heads, k.shape[2], device)
    rows = RowChunks(q.shape[0], q.shape[1], q.shape[2], k.shape[2], structure, mask)
    return Problem(q=q, k=k, v=v, scale=call.scale, rows=rows, pse=call.pse, dropout=dropout,
                   keep_prob=call.keep_prob, sink=call.sink, dtype=dtype)


def forward(p: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, N, Sq, Dv), row max (B, N, Sq, 1) fp32, row sum (B, N, Sq, 1) fp32)."""
    b, n, q_len, _ = p.q.shape
    dv = p.v.shape[-1]
    device = p.q.device
    out = torch.zeros(b, n, q_len, dv, dtype=p.dtype, device=device)
    row_max = torch.full((b, n, q_len, 1), float("-inf"), dtype=torch.float32, device=device)
    row_sum = torch.zeros(b, n, q_len, 1, dtype=torch.float32, device=device)
    sink = p.sink_column() if p.sink is not None else None
    for r0, r1, lo, hi in p.rows:
        rows = r1 - r0
        if hi <= lo:
            if sink is not None:  # only the sink: P_sink = 1, output 0 (a -inf sink: nothing at all)
                row_max[:, :, r0:r1] = sink.float()
                row_sum[:, :, r0:r1] = torch.isneginf(sink).logical_not().float()
            continue
        s = p.scores(r0, r1, lo, hi, p.folded(p.q[:, :, r0:r1]) * p.scale)
        if sink is None:
            probs = p.buffer("probs", s.shape)
            m, l = fused_softmax(s, probs)
            empty = torch.isneginf(m)  # nothing to attend to
        else:
            # The sink joins the max and the sum. exp_scores gives m = 0 where it is infinite
            # (only with a -inf sink and no kept key): the op's statistics for such a row
            # are max -inf, sum 0 (l is 0 there), as without a sink.
            m, _, l, safe = exp_scores(s, sink, sink_in_max=True)
            probs = s.div_(safe)
            empty = l == 0
            m = torch.where(empty, float("-inf"), m)
        if p.dropout is not None:
            probs.mul_(p.dropout.chunk(r0, r1, lo, hi))
        o = torch.bmm(p.folded(probs), p.kv3(p.v, lo, hi)).view(b, n, rows, dv)
        if p.dropout is not None:
            o.mul_(1.0 / p.keep_prob)
        zero = torch.zeros((), dtype=o.dtype, device=device)
        out[:, :, r0:r1] = torch.where(empty, zero, o)
        row_max[:, :, r0:r1] = m.float()
        row_sum[:, :, r0:r1] = torch.where(empty, zero, l).float()
    return out, row_max, row_sum


def _flash_backward_applies(p: Problem, attention_in: torch.Tensor | None) -> bool:
    """torch's fused CPU flash-attention backward computes the same gradients when the
    row term comes from attention_in and there is no dropout, sink, pse or Dv != D."""
    return (p.q.device.type == "cpu" and attention_in is not None and p.dropout is None and p.sink is None
            and p.pse is None and p.v.shape[-1] == p.q.shape[-1])


def _flash_backward(p: Problem, dy: torch.Tensor, lse: torch.Tensor, attention_in: torch.Tensor):
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dy, out, lse = dy.to(p.dtype), attention_in.to(p.dtype), lse[..., 0].contiguous()
    if not p.rows.masked:
        # No per-row data to bound: the fused kernel is already O(S) in memory.
        return flash_backward(dy, p.q, p.k, p.v, out, lse, 0.0, False, scale=p.scale)
    dq, dk, dv = torch.zeros_like(p.q), torch.zeros_like(p.k), torch.zeros_like(p.v)
    for r0, r1, lo, hi in p.rows:
        if hi <= lo:
            continue
        masked = p.rows.mask_of(r0, r1, lo, hi)
        additive = torch.where(masked, torch.full((), float("-inf"), dtype=p.dtype, device=p.q.device),
                               torch.zeros((), dtype=p.dtype, device=p.q.device))
        dq_c, dk_c, dv_c = flash_backward(
            dy[:, :, r0:r1], p.q[:, :, r0:r1], p.k[:, :, lo:hi], p.v[:, :, lo:hi], out[:, :, r0:r1],
            lse[:, :, r0:r1], 0.0, False, attn_mask=additive, scale=p.scale)
        dq[:, :, r0:r1] = dq_c
        dk[:, :, lo:hi] += dk_c
        dv[:, :, lo:hi] += dv_c
    return dq, dk, dv


def backward(p: Problem, dy: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor,
             attention_in: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dpse, dsink) in the compute dtype, from dy (B, N, Sq, Dv) and
    the forward's row max/sum (B, N, Sq, 1); attention_in (the forward output, same form
    as dy) gives the softmax-backward row term D = rowsum(dy * out) when present."""
    b, n, q_len, d = p.q.shape
    dt = p.dtype
    # P = exp(S - lse) with lse = max + log(sum); rows without any key get lse = +inf (P = 0).
    lse = torch.where(row_sum > 0, row_max.to(dt) + torch.log(row_sum.to(dt)),
                      torch.full_like(row_sum, float("inf"), dtype=dt))
    if _flash_backward_applies(p, attention_in):
        dq, dk, dv = _flash_backward(p, dy, lse, attention_in)
        return dq, dk, dv, None, None

    kv_heads, kv_len, dv_dim = p.k.shape[1], p.k.shape[2], p.v.shape[-1]
    device = p.q.device
    dq = torch.zeros(b, n, q_len, d, dtype=dt, device=device)
    dk = torch.zeros(b, kv_heads, kv_len, d, dtype=dt, device=device)
    dv = torch.zeros(b, kv_heads, kv_len, dv_dim, dtype=dt, device=device)
    dpse = torch.zeros(p.pse.shape, dtype=dt, device=device) if p.pse is not None else None
    dsink = torch.zeros(n, dtype=dt, device=device) if p.sink is not None else None
    sink = p.sink_column() if p.sink is not None else None
    dy = dy.to(dt).contiguous()
    attention_in = attention_in.to(dt) if attention_in is not None else None
    for r0, r1, lo, hi in p.rows:
        if hi <= lo:
            continue  # such rows output 0, so every gradient term is 0
        rows, keys = r1 - r0, hi - lo
        q_scaled = p.folded(p.q[:, :, r0:r1]) * p.scale
        chunk_lse = lse[:, :, r0:r1]
        probs = p.scores(r0, r1, lo, hi, q_scaled).sub_(chunk_lse).exp_()
        probs3 = p.folded(probs)
        dy3 = p.folded(dy[:, :, r0:r1])
        keep = p.dropout.chunk(r0, r1, lo, hi) if p.dropout is not None else None
        dropped = probs * keep * (1.0 / p.keep_prob) if keep is not None else probs
        dv[:, :, lo:hi] += torch.bmm(p.folded(dropped).transpose(1, 2), dy3).view(
            b, kv_heads, keys, dv_dim)
        del dropped
        dprobs3 = p.buffer("dprobs", probs3.shape)
        torch.bmm(dy3, p.kv3(p.v, lo, hi).transpose(1, 2), out=dprobs3)
        dprobs = dprobs3.view(probs.shape)
        if keep is not None:
            dprobs.mul_(keep).mul_(1.0 / p.keep_prob)
        if attention_in is not None:
            row_term = (dy[:, :, r0:r1] * attention_in[:, :, r0:r1]).sum(dim=-1, keepdim=True)
        else:
            row_term = (probs * dprobs).sum(dim=-1, keepdim=True)
        if sink is not None:
            sink_prob = torch.exp(sink - chunk_lse)
            dsink -= (sink_prob * row_term).sum(dim=(0, 2, 3))
        dscores = dprobs.sub_(row_term).mul_(probs)  # dL/dS, S the scaled scores
        if dpse is not None:
            part = dscores * p.scale
            if dpse.shape[2] == 1:
                part = part.sum(dim=2, keepdim=True)
            if dpse.shape[0] == 1 and b != 1:
                part = part.sum(dim=0, keepdim=True)
            rows_slice = slice(r0, r1) if dpse.shape[2] != 1 else slice(0, 1)
            dpse[:, :, rows_slice, lo:hi] += part
        ds3 = dprobs3
        dq[:, :, r0:r1] = torch.bmm(ds3, p.kv3(p.k, lo, hi)).mul_(p.scale).view(b, n, rows, d)
        # q_scaled already carries the scale: dK = scale * dS^T Q.
        dk[:, :, lo:hi] += torch.bmm(ds3.transpose(1, 2), q_scaled).view(b, kv_heads, keys, d)
    return dq, dk, dv, dpse, dsink


# ----------------------------------------------------------------------------
# Softmax statistics <-> the op's (B, N, Sq, 8) / TND layouts
# ----------------------------------------------------------------------------


def stats_to_layout(stat: torch.Tensor, g: Geometry, softmax_layout: str, empty: float) -> torch.Tensor:
    """(B, N, Sq, 1) -> the op's softmax_max/softmax_sum tensor.

    TND: shape (T, N, 8); with softmax_layout "" the memory holds the NTD order (as the
    NPU writes it into its (T, N, 8) buffer), with "TND" the TND order. Tokens outside
    every segment hold `empty`."""
    if not g.tnd:
        return stat.expand(*stat.shape[:-1], SOFTMAX_LANES).contiguous()
    total = g.out_shape[0]
    per_token = torch.full((total, g.heads), empty, dtype=stat.dtype, device=stat.device)
    for b, (s, e) in enumerate(g.q_segs):
        per_token[s:e] = stat[b, :, : e - s, 0].transpose(0, 1)
    if softmax_layout == "TND":
        return per_token.unsqueeze(-1).expand(total, g.heads, SOFTMAX_LANES).contiguous()
    ntd = per_token.transpose(0, 1).unsqueeze(-1).expand(g.heads, total, SOFTMAX_LANES).contiguous()
    return ntd.view(total, g.heads, SOFTMAX_LANES)


def stats_from_layout(stat: torch.Tensor, g: Geometry, softmax_layout: str) -> torch.Tensor:
    """Inverse of stats_to_layout: the op's tensor -> (B, N, Sq, 1) fp32 (padding 0)."""
    stat = stat.float()
    if not g.tnd:
        return stat[..., :1]
    total = g.out_shape[0]
    if softmax_layout == "TND":
        per_token = stat[..., 0]
    else:
        per_token = stat.contiguous().view(g.heads, total, SOFTMAX_LANES)[..., 0].transpose(0, 1)
    return pack_tnd(per_token.unsqueeze(-1), g.q_segs)


def output_from_bnsd(x: torch.Tensor, g: Geometry, segs, total: int, dtype: torch.dtype) -> torch.Tensor:
    x = unpack_tnd(x, segs, total) if g.tnd else from_bnsd(x, g.layout)
    return x.to(dtype)


def output_to_bnsd(x: torch.Tensor, g: Geometry, heads: int) -> torch.Tensor:
    """A tensor shaped like attention_out -> (B, N, Sq, Dv)."""
    return pack_tnd(x, g.q_segs) if g.tnd else to_bnsd(x, g.layout, heads)
