"""npu_sparse_flash_attention's argument rules (shapes and dtypes only), shared by the fake and
the reference kernel; see the module docstring of sparse_flash_attention.py for where each
rule comes from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _library
from ._library import INT64_MAX, check

OP = "npu_sparse_flash_attention"
HEAD_DIM = 512
ROPE_DIM = 64
KV_HEADS = 1
QUERY_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_SPARSE_BLOCK_SIZE = 128
MAX_PAGE_BLOCK_SIZE = 1024
PAGE_BLOCK_ALIGNMENT = 16
MLA_ABSORB = 2
# The 2.13 schema's default; CANN names it MHA/GQA (no rope parts) but computes only MLA_ABSORB.
SCHEMA_DEFAULT_MODE = 0
SPARSE_MODES = (0, 3)
QUERY_LAYOUTS = ("BSND", "TND")
KV_LAYOUTS = ("BSND", "TND", "PA_BSND")
NPU_DTYPES = (torch.float16, torch.bfloat16)
# Off the NPU the reference also takes fp32/fp64 (exact checks against eager).
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Plan(NamedTuple):
    """Shapes derived from validated arguments (SymInts under tracing)."""

    batch: object
    q_tokens: object  # rows of the flattened query: B * S1 (BSND) or T (TND)
    q_seq: object  # S1 (BSND) or None (TND)
    heads: int  # N1
    kv_heads: int  # N2
    kv_seq: object  # S2 (BSND), T2 (TND) or max_blocks * block_size (PA_BSND)
    page_block_size: object  # PA_BSND block_size, else None
    out_shape: list
    lse_shape: list


# ----------------------------------------------------------------------------
# Validation (shared by the fake and the reference kernel; shapes only)
# ----------------------------------------------------------------------------


def validate(query, key, value, sparse_indices, *, block_table, actual_seq_lengths_query,
              actual_seq_lengths_kv, query_rope, key_rope, sparse_block_size, layout_query,
              layout_kv, sparse_mode, pre_tokens, next_tokens, attention_mode,
              return_softmax_lse, sinks) -> Plan:
    """Check every shape/dtype rule (no data access). Takes every argument: the kernels
    get them all, schema defaults filled in (_library.with_schema_defaults)."""
    check(layout_query in QUERY_LAYOUTS, OP, "layout_query", f"must be one of {list(QUERY_LAYOUTS)}",
          repr(layout_query))
    check(layout_kv in KV_LAYOUTS, OP, "layout_kv", f"must be one of {list(KV_LAYOUTS)}", repr(layout_kv))
    check(layout_kv in ("PA_BSND", layout_query), OP, "layout_kv",
          f"must equal layout_query ({layout_query}) unless it is PA_BSND", repr(layout_kv))
    check(attention_mode in (SCHEMA_DEFAULT_MODE, MLA_ABSORB), OP, "attention_mode",
          "must be 2 (MLA-absorb, the only mode CANN's SparseFlashAttention computes) or the schema default 0 "
          "with query_rope and key_rope given (read as 2)", attention_mode)
    if attention_mode == SCHEMA_DEFAULT_MODE:
        check(query_rope is not None and key_rope is not None, OP, "attention_mode",
              "0 without query_rope/key_rope is CANN's MHA/GQA mode, which SparseFlashAttention does not compute "
              "(CANN refuses every attention_mode but 2); pass query_rope and key_rope for MLA-absorb "
              "(attention_mode 0 is then read as 2)", attention_mode)
    check(sparse_mode in SPARSE_MODES, OP, "sparse_mode", "must be 0 (all) or 3 (rightDownCausal)", sparse_mode)
    check(pre_tokens == INT64_MAX, OP, "pre_tokens", f"only supports the default {INT64_MAX}", pre_tokens)
    check(next_tokens == INT64_MAX, OP, "next_tokens", f"only supports the default {INT64_MAX}", next_tokens)
    check(1 <= sparse_block_size <= MAX_SPARSE_BLOCK_SIZE and sparse_block_size & (sparse_block_size - 1) == 0,
          OP, "sparse_block_size", f"must be a power of two in [1, {MAX_SPARSE_BLOCK_SIZE}]", sparse_block_size)
    paged = layout_kv == "PA_BSND"
    check(not (return_softmax_lse and paged), OP, "return_softmax_lse",
          "is not supported with layout_kv PA_BSND", return_softmax_lse)

    # --- dtypes
    # The NPU's dtype rule applies on the device and wherever a graph is built for it (npu_rules).
    on_npu = _library.npu_rules_apply(query)
    floats = NPU_DTYPES if on_npu else REFERENCE_DTYPES
    check(query.dtype in floats, OP, "query.dtype", f"must be one of {list(floats)}", query.dtype)
    check(key.dtype == query.dtype, OP, "key.dtype", f"must equal query.dtype ({query.dtype})", key.dtype)
    if value is not None:
        check(value.dtype == query.dtype, OP, "value.dtype", f"must equal query.dtype ({query.dtype})", value.dtype)
    check(sparse_indices.dtype == torch.int32, OP, "sparse_indices.dtype", "must be int32", sparse_indices.dtype)
    check(query_rope is not None, OP, "query_rope", "is required (attention_mode 2 takes query_rope and key_rope)",
          None)
    check(key_rope is not None, OP, "key_rope", "is required (attention_mode 2 takes query_rope and key_rope)", None)
    check(query_rope.dtype == query.dtype, OP, "query_rope.dtype", f"must equal query.dtype ({query.dtype})",
          query_rope.dtype)
    check(key_rope.dtype == query.dtype, OP, "key_rope.dtype", f"must equal query.dtype ({query.dtype})",
          key_rope.dtype)
    for name, t in (("actual_seq_lengths_query", actual_seq_lengths_query),
                    ("actual_seq_lengths_kv", actual_seq_lengths_kv), ("block_table", block_table)):
        if t is not None:
            check(t.dtype == torch.int32, OP, f"{name}.dtype", "must be int32", t.dtype)
    if sinks is not None:
        check(sinks.dtype == torch.float32, OP, "sinks.dtype", "must be float32", sinks.dtype)

    # --- query
    q_rank = 4 if layout_query == "BSND" else 3
    check(query.dim() == q_rank, OP, "query.dim()", f"must be {q_rank} for layout_query {layout_query}",
          query.dim())
    heads, head_dim = query.shape[-2], query.shape[-1]
    check(heads in QUERY_HEADS, OP, "query head count N1", f"must be one of {list(QUERY_HEADS)}", heads)
    check(head_dim == HEAD_DIM, OP, "query head dim D", f"must be {HEAD_DIM}", head_dim)
    for name, t in (("actual_seq_lengths_query", actual_seq_lengths_query),
                    ("actual_seq_lengths_kv", actual_seq_lengths_kv)):
        if t is not None:
            check(t.dim() == 1, OP, f"{name}.dim()", "must be 1 (one entry per batch)", t.dim())
    if layout_query == "TND":
        check(actual_seq_lengths_query is not None, OP, "actual_seq_lengths_query",
              "is required (cumulative lengths) for layout_query TND", None)
        batch, q_seq, q_tokens = actual_seq_lengths_query.shape[0], None, query.shape[0]
        check(batch > 0, OP, "actual_seq_lengths_query", "must not be empty for layout_query TND",
              tuple(actual_seq_lengths_query.shape))
    else:
        batch, q_seq = query.shape[0], query.shape[1]
        q_tokens = batch * q_seq
        if actual_seq_lengths_query is not None:
            check(actual_seq_lengths_query.shape[0] == batch, OP, "actual_seq_lengths_query",
                  f"must have one entry per batch ({batch})", tuple(actual_seq_lengths_query.shape))
    check(tuple(query_rope.shape) == (*query.shape[:-1], ROPE_DIM), OP, "query_rope.shape",
          f"must be query.shape with a last dim of {ROPE_DIM} {(*query.shape[:-1], ROPE_DIM)}",
          tuple(query_rope.shape))

    # --- key / value / key_rope
    k_rank = 3 if layout_kv == "TND" else 4
    check(key.dim() == k_rank, OP, "key.dim()", f"must be {k_rank} for layout_kv {layout_kv}", key.dim())
    kv_heads, key_dim = key.shape[-2], key.shape[-1]
    check(kv_heads == KV_HEADS, OP, "key head count N2", f"must be {KV_HEADS}", kv_heads)
    check(key_dim == HEAD_DIM, OP, "key head dim D", f"must be {HEAD_DIM}", key_dim)
    check(heads % kv_heads == 0, OP, "query head count N1", f"must be divisible by the key head count {kv_heads}",
          heads)
    if value is not None:
        check(tuple(value.shape) == tuple(key.shape), OP, "value.shape", f"must equal key.shape {tuple(key.shape)}",
              tuple(value.shape))
    check(tuple(key_rope.shape) == (*key.shape[:-1], ROPE_DIM), OP, "key_rope.shape",
          f"must be key.shape with a last dim of {ROPE_DIM} {(*key.shape[:-1], ROPE_DIM)}", tuple(key_rope.shape))

    page_block_size = None
    if paged:
        check(block_table is not None, OP, "block_table", "is required for layout_kv PA_BSND", None)
        check(actual_seq_lengths_kv is not None, OP, "actual_seq_lengths_kv", "is required for layout_kv PA_BSND",
              None)
        check(block_table.dim() == 2, OP, "block_table.dim()", "must be 2 (batch, max_blocks)", block_table.dim())
        check(block_table.shape[0] == batch, OP, "block_table.shape[0]", f"must equal the batch size {batch}",
              block_table.shape[0])
        check(block_table.shape[1] > 0, OP, "block_table.shape[1]", "must be positive", block_table.shape[1])
        page_block_size = key.shape[1]
        check(0 < page_block_size <= MAX_PAGE_BLOCK_SIZE and page_block_size % PAGE_BLOCK_ALIGNMENT == 0, OP,
              "block_size (key.shape[1])",
              f"must be a multiple of {PAGE_BLOCK_ALIGNMENT} in [{PAGE_BLOCK_ALIGNMENT}, {MAX_PAGE_BLOCK_SIZE}]",
              page_block_size)
        check(page_block_size % sparse_block_size == 0, OP, "sparse_block_size",
              f"must divide block_size ({page_block_size})", sparse_block_size)
        check(key.shape[0] > 0, OP, "key.shape[0] (block_num)", "must be positive", key.shape[0])
        kv_seq = block_table.shape[1] * page_block_size
    else:
        check(block_table is None, OP, "block_table", f"must be None for layout_kv {layout_kv}", "a tensor")
        if layout_kv == "TND":
            check(actual_seq_lengths_kv is not None, OP, "actual_seq_lengths_kv",
                  "is required (cumulative lengths) for layout_kv TND", None)
            kv_seq = key.shape[0]
        else:
            check(key.shape[0] == batch, OP, "key.shape[0]", f"must equal the query batch size {batch}",
                  key.shape[0])
            kv_seq = key.shape[1]
    if actual_seq_lengths_kv is not None:
        check(actual_seq_lengths_kv.shape[0] == batch, OP, "actual_seq_lengths_kv",
              f"must have one entry per batch ({batch})", tuple(actual_seq_lengths_kv.shape))

    # --- sparse_indices
    idx_shape = (batch, q_seq, kv_heads) if layout_query == "BSND" else (q_tokens, kv_heads)
    check(sparse_indices.dim() == len(idx_shape) + 1, OP, "sparse_indices.dim()",
          f"must be {len(idx_shape) + 1} for layout_query {layout_query}", sparse_indices.dim())
    check(tuple(sparse_indices.shape[:-1]) == idx_shape, OP, "sparse_indices.shape",
          f"must be {(*idx_shape, 'sparse_size')}", tuple(sparse_indices.shape))
    check(sparse_indices.shape[-1] > 0, OP, "sparse_indices.shape[-1] (sparse_size)", "must be positive",
          sparse_indices.shape[-1])

    if sinks is not None:
        check(tuple(sinks.shape) == (heads,), OP, "sinks.shape", f"must be (N1,) = ({heads},)", tuple(sinks.shape))

    group = heads // kv_heads
    if not return_softmax_lse:
        lse_shape = [0]
    elif layout_query == "BSND":
        lse_shape = [batch, kv_heads, q_seq, group]
    else:
        lse_shape = [kv_heads, q_tokens, group]
    return Plan(batch, q_tokens, q_seq, heads, kv_heads, kv_seq, page_block_size, list(query.shape), lse_shape)
