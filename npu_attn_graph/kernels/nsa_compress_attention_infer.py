"""npu_nsa_compress_attention_infer: Native Sparse Attention's compressed attention (decode).

Schema: torch_npu 2.13.0's (namespace npu_attn), written once, in the ``define`` call below;
the drop-in function's docstring shows it.

One decode query per sequence (query S == 1, layout TND: query (T = B, N, D)) attends
to that sequence's compressed keys/values, stored in a paged cache: key
(block_num, page_block_size, N_kv * D), value (block_num, page_block_size, N_kv * Dv),
block_table (B, max_blocks) int32; compressed token t of batch b lives at
``key[block_table[b, t // page_block_size], t % page_block_size]``. Batch b has
n_c = actual_cmp_seq_kvlen[b] compressed tokens. GQA: query head h uses KV head
h // G, G = head_num / key_value_head_num.

Outputs:

1. attention_out (T, N, Dv), query dtype::

       p_cmp = softmax(scale_value * q . K^T)      (over the n_c compressed keys)
       attention_out = p_cmp . V

2. topk_indices (T, N_kv, select_block_count) int32: per query and KV head, the
   selection blocks (of select_block_size = l' original tokens) with the highest
   importance score. With compress block size l and stride d (r = l'/d, q = l/d), the
   NSA paper's Eq. 9 maps compression-block scores onto selection blocks and sums the
   heads of a GQA group::

       p_slc[j]  = sum_{m=0}^{r-1} sum_{n=0}^{q-1} p_cmp[r * j - m - n]
       p_slc'    = sum over the G query heads of one KV head of p_slc
       topk_indices = indices of the select_block_count largest p_slc'

   The selection blocks of batch b are s = 0 .. n_s - 1 with
   n_s = ceil(NoCmpKvSeqlenCeil / l'), NoCmpKvSeqlenCeil = (n_c - 1) * d + l (the
   uncompressed length the compressed tokens cover).

Choices (the paper and the seed leave these open; all follow the CANN kernel
ops-transformer ``nsa_compress_attention_infer_kernel.h`` and torch_npu's own test
golden, so the reference agrees with the NPU):

* Index base of Eq. 9: selection block s (0-based) takes j = s + 1, i.e.
  ``p_slc[s] = sum_{m,n} p_cmp[r * (s + 1) - m - n]`` with 0-based compressed indices.
  Compressed indices outside [0, n_c) contribute nothing.
* Fixed blocks: as in the paper's setup ("1 initial block and 2 local blocks"), the
  scores of selection blocks 0, n_s - 2 and n_s - 1 are set to +inf (those that exist),
  so they are always selected when select_block_count allows.
* Order of the returned indices: descending score; ties (the +inf blocks, or exactly
  equal scores) go to the smaller block index first. The fixed blocks therefore come
  first, as [0, n_s - 2, n_s - 1] (the order of torch_npu's golden); the NPU's sort
  may order exactly tied finite scores differently.
* Unused slots: none. select_block_count <= NoCmpKvSeqlenCeil / l' (enforced for every
  batch) guarantees at least select_block_count real blocks, so every slot holds a
  valid block index in [0, n_s); no padding value is ever written.
* Precision: the reference computes scores, softmax, attention and importance in fp32
  (fp64 for fp64 inputs), so the top-k of near-tied blocks may differ from the NPU's.
* atten_mask, topk_mask, actual_seq_qlen and actual_sel_seq_kvlen are documented as
  "currently unsupported" for this op (on the NPU the mask only acts for query S > 1 and
  topk_mask is reserved): passing them raises instead of being silently ignored.
  block_table and actual_cmp_seq_kvlen are required (paged attention only). layout must
  be 'TND' (the only documented layout).

Enforced limits (seed): fp16/bf16 query/key/value of one dtype (off the NPU also fp32/fp64
for exact CPU checks); 3-D query/key/value, non-empty; query N == head_num, key/value
N == key_value_head_num, head_num a multiple of key_value_head_num, group G <= 128 with
128 % G == 0; query D == key D <= 192, value D <= 128, query D >= value D; key and value
share block_num and block size == page_block_size, which is <= 128 and a multiple of 16;
query S == 1 (T == B == block_table.shape[0] == len(actual_cmp_seq_kvlen)); block_table
2-D int32; compress_block_size, compress_stride and select_block_size each in
{16, 32, 64}, compress_block_size >= compress_stride, select_block_size >=
compress_block_size, select_block_size a multiple of compress_stride; each
actual_cmp_seq_kvlen in [1, 8192] and covered by the block table; per batch
NoCmpKvSeqlenCeil / select_block_size <= 4096 and select_block_count <= that ratio
(real division); select_block_count >= 1. The reference kernel also checks that the
block ids it reads (the first ceil(actual_cmp_seq_kvlen[b] / page_block_size) of row b)
lie in [0, block_num); later entries may hold anything (e.g. -1). Cache slots the op
does not read (past a batch's length, blocks it does not use) may hold anything too,
NaN included: they never reach the outputs. The NPU kernel requires contiguous inputs; the
reference kernel accepts any strides.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _library
from ._attention_core import compute_dtype, paged_block_ids
from ._inference import NPU_FLOAT_DTYPES, REFERENCE_FLOAT_DTYPES
from ._dropin import dropin
from ._library import check, define, npu_rules_apply, register_fake, register_npu, register_reference

__all__ = ["npu_nsa_compress_attention_infer"]

OP = "npu_nsa_compress_attention_infer"
BLOCK_SIZES = (16, 32, 64)  # allowed compress_block_size, compress_stride, select_block_size
MAX_GROUP = 128
MAX_QK_DIM = 192
MAX_V_DIM = 128
MAX_PAGE_BLOCK_SIZE = 128
PAGE_BLOCK_ALIGN = 16
MAX_CMP_KV_LEN = 8192
MAX_SELECT_BLOCKS = 4096
# Eq. 9 is evaluated with j = s + 1 for 0-based selection block s (CANN kernel, torch_npu golden).
SELECTION_INDEX_OFFSET = 1

QUALNAME = define(
    OP,
    "(Tensor query, Tensor key, Tensor value, float scale_value, int head_num, int key_value_head_num, "
    "int select_block_size, int select_block_count, int page_block_size, int compress_block_size, "
    "int compress_stride, *, str layout='TND', Tensor? atten_mask=None, Tensor? block_table=None, "
    "Tensor? topk_mask=None, int[]? actual_seq_qlen=None, int[]? actual_cmp_seq_kvlen=None, "
    "int[]? actual_sel_seq_kvlen=None) -> (Tensor, Tensor)",
)


class _Plan(NamedTuple):
    batch: int
    heads: int
    kv_heads: int
    group: int
    qk_dim: int
    v_dim: int
    cmp_lens: list[int]
    select_blocks: list[int]  # n_s per batch


def uncompressed_length(cmp_len: int, compress_block_size: int, compress_stride: int) -> int:
    """NoCmpKvSeqlenCeil: the original tokens n_c overlapping compression windows cover."""
    return (cmp_len - 1) * compress_stride + compress_block_size


def _validate(query, key, value, head_num, key_value_head_num, select_block_size, select_block_count,
              page_block_size, compress_block_size, compress_stride, layout, atten_mask, block_table, topk_mask,
              actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen) -> _Plan:
    """Shape/dtype/attribute rules shared by the fake and reference kernels (no tensor data access)."""
    check(layout == "TND", OP, "layout", "must be 'TND' (the only supported layout)", repr(layout))
    for name, arg in (("atten_mask", atten_mask), ("topk_mask", topk_mask), ("actual_seq_qlen", actual_seq_qlen),
                      ("actual_sel_seq_kvlen", actual_sel_seq_kvlen)):
        check(arg is None, OP, name, "is not supported by this op yet (must be None)",
              "a tensor" if isinstance(arg, torch.Tensor) else arg)
    check(block_table is not None, OP, "block_table", "is required (only paged attention is supported)", None)
    check(actual_cmp_seq_kvlen is not None, OP, "actual_cmp_seq_kvlen", "is required", None)

    floats = NPU_FLOAT_DTYPES if npu_rules_apply(query) else REFERENCE_FLOAT_DTYPES
    check(query.dtype in floats, OP, "query.dtype", f"must be one of {list(floats)}", query.dtype)
    check(key.dtype == query.dtype, OP, "key.dtype", f"must equal query.dtype ({query.dtype})", key.dtype)
    check(value.dtype == query.dtype, OP, "value.dtype", f"must equal query.dtype ({query.dtype})", value.dtype)
    check(block_table.dtype == torch.int32, OP, "block_table.dtype", "must be int32", block_table.dtype)
    for name, t in (("query", query), ("key", key), ("value", value)):
        check(t.dim() == 3, OP, f"{name}.dim()",
              "must be 3 (query (T, N, D); key/value (block_num, page_block_size, H))", t.dim())
        check(t.numel() > 0, OP, name, "must not be empty", list(t.shape))
    check(block_table.dim() == 2, OP, "block_table.dim()", "must be 2 (B, max_blocks_per_seq)", block_table.dim())
    check(block_table.numel() > 0, OP, "block_table", "must not be empty", list(block_table.shape))

    check(head_num > 0, OP, "head_num", "must be positive", head_num)
    check(key_value_head_num > 0, OP, "key_value_head_num", "must be positive", key_value_head_num)
    check(query.shape[1] == head_num, OP, "query.shape[1] (N)", f"must equal head_num ({head_num})", query.shape[1])
    check(head_num % key_value_head_num == 0, OP, "head_num",
          f"must be a multiple of key_value_head_num ({key_value_head_num})", head_num)
    group = head_num // key_value_head_num
    check(group <= MAX_GROUP and MAX_GROUP % group == 0, OP, "head_num / key_value_head_num (group)",
          f"must be <= {MAX_GROUP} and divide {MAX_GROUP}", group)
    qk_dim = query.shape[2]
    check(key.shape[2] == key_value_head_num * qk_dim, OP, "key.shape[2] (H)",
          f"must equal key_value_head_num * query D = {key_value_head_num * qk_dim}", key.shape[2])
    check(value.shape[2] % key_value_head_num == 0, OP, "value.shape[2] (H)",
          f"must be a multiple of key_value_head_num ({key_value_head_num})", value.shape[2])
    v_dim = value.shape[2] // key_value_head_num
    check(qk_dim <= MAX_QK_DIM, OP, "query.shape[2] (D)", f"must be <= {MAX_QK_DIM}", qk_dim)
    check(v_dim <= MAX_V_DIM, OP, "value D (value.shape[2] / key_value_head_num)", f"must be <= {MAX_V_DIM}", v_dim)
    check(qk_dim >= v_dim, OP, "query.shape[2] (D)", f"must be >= the value D ({v_dim})", qk_dim)

    check(value.shape[0] == key.shape[0], OP, "value.shape[0] (block_num)",
          f"must equal key.shape[0] ({key.shape[0]})", value.shape[0])
    check(page_block_size > 0 and page_block_size <= MAX_PAGE_BLOCK_SIZE and page_block_size % PAGE_BLOCK_ALIGN == 0,
          OP, "page_block_size", f"must be a multiple of {PAGE_BLOCK_ALIGN} in [16, {MAX_PAGE_BLOCK_SIZE}]",
          page_block_size)
    check(key.shape[1] == page_block_size, OP, "key.shape[1] (block_size)",
          f"must equal page_block_size ({page_block_size})", key.shape[1])
    check(value.shape[1] == page_block_size, OP, "value.shape[1] (block_size)",
          f"must equal page_block_size ({page_block_size})", value.shape[1])

    for name, size in (("compress_block_size", compress_block_size), ("compress_stride", compress_stride),
                       ("select_block_size", select_block_size)):
        check(size in BLOCK_SIZES, OP, name, f"must be one of {list(BLOCK_SIZES)}", size)
    check(compress_block_size >= compress_stride, OP, "compress_block_size",
          f"must be >= compress_stride ({compress_stride})", compress_block_size)
    check(select_block_size >= compress_block_size, OP, "select_block_size",
          f"must be >= compress_block_size ({compress_block_size})", select_block_size)
    check(select_block_size % compress_stride == 0, OP, "select_block_size",
          f"must be a multiple of compress_stride ({compress_stride})", select_block_size)
    check(select_block_count > 0, OP, "select_block_count", "must be positive", select_block_count)

    lens = [int(x) for x in actual_cmp_seq_kvlen]
    batch = len(lens)
    check(batch > 0, OP, "actual_cmp_seq_kvlen", "must not be empty", lens)
    check(query.shape[0] == batch, OP, "query.shape[0] (T)",
          f"must equal the batch size len(actual_cmp_seq_kvlen) = {batch} (query S must be 1)", query.shape[0])
    check(block_table.shape[0] == batch, OP, "block_table.shape[0]",
          f"must equal the batch size len(actual_cmp_seq_kvlen) = {batch}", block_table.shape[0])
    capacity = block_table.shape[1] * page_block_size
    select_blocks = []
    for n_c in lens:
        check(1 <= n_c <= MAX_CMP_KV_LEN, OP, "actual_cmp_seq_kvlen", f"entries must be in [1, {MAX_CMP_KV_LEN}]",
              lens)
        check(n_c <= capacity, OP, "actual_cmp_seq_kvlen",
              f"entries must be <= block_table.shape[1] * page_block_size = {capacity}", lens)
        covered = uncompressed_length(n_c, compress_block_size, compress_stride)
        check(covered <= MAX_SELECT_BLOCKS * select_block_size, OP, "actual_cmp_seq_kvlen",
              f"entries must give ((n - 1) * compress_stride + compress_block_size) / select_block_size <= "
              f"{MAX_SELECT_BLOCKS}", lens)
        check(select_block_count * select_block_size <= covered, OP, "select_block_count",
              f"must be <= ((n - 1) * compress_stride + compress_block_size) / select_block_size = "
              f"{covered} / {select_block_size} for every n in actual_cmp_seq_kvlen", select_block_count)
        select_blocks.append(math.ceil(covered / select_block_size))
    return _Plan(batch, head_num, key_value_head_num, group, qk_dim, v_dim, lens, select_blocks)


# ---------------------------------------------------------------------------- reference kernel


def _overlap_weights(select_block_size: int, compress_block_size: int, compress_stride: int) -> list[int]:
    """weights[k] = #{(m, n): m + n = k, 0 <= m < l'/d, 0 <= n < l/d} (Eq. 9's double sum)."""
    r, q = select_block_size // compress_stride, compress_block_size // compress_stride
    weights = [0] * (r + q - 1)
    for m in range(r):
        for n in range(q):
            weights[m + n] += 1
    return weights


def _importance(p: torch.Tensor, lens: torch.Tensor, n_select: torch.Tensor, max_select: int,
                weights: list[int], ratio: int) -> torch.Tensor:
    """Group-summed Eq. 9 scores (b, N_kv, max_select) from p_cmp (b, N_kv, G, L); fixed blocks
    are +inf, blocks past a batch's n_s are -inf."""
    length = p.shape[-1]
    s = torch.arange(max_select, device=p.device)
    k = torch.arange(len(weights), device=p.device)
    index = ratio * (s.unsqueeze(1) + SELECTION_INDEX_OFFSET) - k.unsqueeze(0)  # (S, K)
    in_range = (index >= 0) & (index < length)  # beyond a batch's n_c, p_cmp is already 0
    w = torch.tensor(weights, dtype=p.dtype, device=p.device) * in_range
    picked = p.sum(dim=2)[..., index.clamp(0, length - 1)]  # (b, N_kv, S, K): group sum first (linear)
    score = (picked * w).sum(-1)
    n_s = n_select.view(-1, 1, 1)
    fixed = (s == 0) | (s == n_s - 2) | (s == n_s - 1)
    score = torch.where(fixed, torch.full_like(score, math.inf), score)
    return torch.where(s >= n_s, torch.full_like(score, -math.inf), score)


def _reference(query, key, value, scale_value, head_num, key_value_head_num, select_block_size, select_block_count,
               page_block_size, compress_block_size, compress_stride, *, layout, atten_mask,
               block_table, topk_mask, actual_seq_qlen, actual_cmp_seq_kvlen,
               actual_sel_seq_kvlen):
    plan = _validate(query, key, value, head_num, key_value_head_num, select_block_size, select_block_count,
                     page_block_size, compress_block_size, compress_stride, layout, atten_mask, block_table,
                     topk_mask, actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen)
    # Raises on a used entry outside [0, block_num); unused entries (e.g. -1) become block 0.
    block_ids = paged_block_ids(OP, block_table, plan.cmp_lens, page_block_size, key.shape[0], "actual_cmp_seq_kvlen")
    device = query.device
    dtype = compute_dtype(query.dtype)
    kv, g, dk, dv = plan.kv_heads, plan.group, plan.qk_dim, plan.v_dim
    weights = _overlap_weights(select_block_size, compress_block_size, compress_stride)
    ratio = select_block_size // compress_stride
    out = query.new_empty((plan.batch, plan.heads, dv))
    topk = torch.empty((plan.batch, kv, select_block_count), dtype=torch.int32, device=device)

    # Batches in chunks so the gathered keys/values and scores stay within the score budget.
    longest = max(plan.cmp_lens)
    per_batch = 4 * (longest * (kv * (dk + dv) + 2 * plan.heads) + plan.heads * max(plan.select_blocks) * len(weights))
    chunk = max(1, _library.SCORE_BLOCK_BYTES // per_batch)
    for b0 in range(0, plan.batch, chunk):
        b1 = min(plan.batch, b0 + chunk)
        lens = torch.tensor(plan.cmp_lens[b0:b1], device=device)
        length = int(lens.max())
        n_blocks = math.ceil(length / page_block_size)
        table = block_ids[b0:b1, :n_blocks]
        nb = b1 - b0
        keys = key.index_select(0, table.reshape(-1)).reshape(nb, n_blocks * page_block_size, kv, dk)[:, :length]
        values = value.index_select(0, table.reshape(-1)).reshape(nb, n_blocks * page_block_size, kv, dv)[:, :length]
        valid = torch.arange(length, device=device) < lens.unsqueeze(1)  # (nb, L)
        if min(plan.cmp_lens[b0:b1]) < length:
            # Slots past a shorter batch's length (and the block-0 stand-ins for its
            # unused table entries) may hold garbage (NaN, inf): their scores are
            # masked, but p @ V would give 0 * NaN. index_select made a copy: zero in place.
            values.masked_fill_(~valid.view(nb, length, 1, 1), 0)
        q = query[b0:b1].to(dtype).reshape(nb, kv, g, dk)
        scores = torch.einsum("bkgd,blkd->bkgl", q, keys.to(dtype)) * scale_value
        scores = scores.masked_fill(~valid.view(nb, 1, 1, length), -math.inf)
        p = torch.softmax(scores, dim=-1)
        out[b0:b1] = torch.einsum("bkgl,blkd->bkgd", p, values.to(dtype)).reshape(nb, plan.heads, dv).to(out.dtype)

        n_select = torch.tensor(plan.select_blocks[b0:b1], device=device)
        score = _importance(p, lens, n_select, max(plan.select_blocks[b0:b1]), weights, ratio)
        # Stable descending sort: ties keep ascending block order.
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        topk[b0:b1] = order[..., :select_block_count].to(torch.int32)
    return out, topk


@register_fake(QUALNAME)
def _fake(query, key, value, scale_value, head_num, key_value_head_num, select_block_size, select_block_count,
          page_block_size, compress_block_size, compress_stride, *, layout, atten_mask, block_table,
          topk_mask, actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen):
    plan = _validate(query, key, value, head_num, key_value_head_num, select_block_size, select_block_count,
                     page_block_size, compress_block_size, compress_stride, layout, atten_mask, block_table,
                     topk_mask, actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen)
    out = query.new_empty((query.shape[0], plan.heads, plan.v_dim))
    topk = query.new_empty((query.shape[0], plan.kv_heads, select_block_count), dtype=torch.int32)
    return out, topk


register_reference(QUALNAME, _reference)
register_npu(QUALNAME)


npu_nsa_compress_attention_infer = dropin(QUALNAME, __name__, """\
NSA compressed attention for one decode token per sequence over a paged compressed KV
cache. Returns (attention_out (T, N, Dv) in the query dtype, topk_indices
(T, N_kv, select_block_count) int32): softmax(scale_value * q K^T) V, and the
selection blocks with the highest importance score (NSA Eq. 9 with j = s + 1, summed
over each GQA group; blocks 0, n_s - 2 and n_s - 1 always first). Length arguments
accept lists or 1-D tensors. See the module docstring for every rule and choice.""")
