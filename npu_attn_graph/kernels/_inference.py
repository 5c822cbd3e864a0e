"""Shared argument model of the three inference attention ops.

npu_prompt_flash_attention, npu_incre_flash_attention and
npu_fused_infer_attention_score take overlapping argument sets under different
names. Each op module maps its arguments onto :class:`InferenceCall`; this
module validates it (the same checks for the fake and the reference kernel) and
derives the output shapes. The reference computation and the op registration
are in _inference_kernel.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import _library
from ._layouts import Layout, batch_and_seq, check_cumulative, heads_and_dim, output_shape
from ._library import COMPRESSED_MASK_EXPRESSION, COMPRESSED_MASK_SIZE, INT64_MAX, check, fail

MAX_HEAD_DIM = 512
MAX_HEADS = 256
MAX_GQA_RATIO = 64
MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)
NPU_FLOAT_DTYPES = (torch.float16, torch.bfloat16)
# Off the NPU the reference kernels also take fp32/fp64, so fp32 models can be
# checked exactly against eager.
REFERENCE_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Antiquant:
    """int8 KV dequantisation, (x + offset) * scale, for key or value.

    mode: 0 per-channel (or per-tensor when the scale has one element),
    1 per-token (B, S), 2 per-head (N,), 3 per-token-per-head (B, N, S),
    4 per-token in paged blocks (blocknum, blocksize),
    5 per-token-per-head in paged blocks (blocknum, N, blocksize).
    """

    scale: torch.Tensor
    offset: torch.Tensor | None
    mode: int
    name: str  # argument name for errors


@dataclass
class InferenceCall:
    op: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    layout: Layout
    num_heads: int
    num_key_value_heads: int
    scale: float
    atten_mask: torch.Tensor | None = None
    pse_shift: torch.Tensor | None = None
    # Per-batch lengths (or cumulative ones for TND), with the op's argument names.
    q_lens: Sequence[int] | None = None
    q_lens_name: str = "actual_seq_lengths"
    kv_lens: Sequence[int] | None = None
    kv_lens_name: str = "actual_seq_lengths_kv"
    sparse_mode: int = 0
    pre_tokens: int = INT64_MAX
    next_tokens: int = INT64_MAX
    block_table: torch.Tensor | None = None
    block_size: int = 0
    kv_padding_size: torch.Tensor | None = None
    query_padding_size: torch.Tensor | None = None
    key_antiquant: Antiquant | None = None
    value_antiquant: Antiquant | None = None
    dequant_scale1: torch.Tensor | None = None
    dequant_scale1_name: str = "dequant_scale1"
    quant_scale1: torch.Tensor | None = None
    dequant_scale2: torch.Tensor | None = None
    dequant_scale2_name: str = "dequant_scale2"
    quant_scale2: torch.Tensor | None = None
    quant_scale2_name: str = "quant_scale2"
    quant_offset2: torch.Tensor | None = None
    quant_offset2_name: str = "quant_offset2"
    num_heads_name: str = "num_heads"
    key_shared_prefix: torch.Tensor | None = None
    value_shared_prefix: torch.Tensor | None = None
    shared_prefix_len: Sequence[int] | None = None
    query_rope: torch.Tensor | None = None
    key_rope: torch.Tensor | None = None
    softmax_lse: bool = False
    # Per-query-head sink logits (N,) joining each row's softmax denominator
    # (see _attention_core.AttentionProblem.sink); the op's argument name.
    learnable_sink: torch.Tensor | None = None
    learnable_sink_name: str = "learnable_sink"
    # The incremental op takes S == 1 queries only and no sparse modes.
    incremental_only: bool = False


@dataclass(frozen=True)
class Geometry:
    """Shapes derived from a validated call (may hold SymInts under tracing)."""

    batch: object
    q_seq: object
    heads: int
    head_dim: object
    kv_heads: int
    kv_seq: object  # logical KV length (paged: block_table width * block_size)
    value_dim: object
    paged_cache_rank: int  # 0 when not paged
    out_shape: list
    out_dtype: torch.dtype
    lse_shape: list


# ----------------------------------------------------------------------------
# Validation and shape inference (shared by fake and reference kernels)
# ----------------------------------------------------------------------------


def validate(call: InferenceCall) -> Geometry:
    op, q, k, v, layout = call.op, call.query, call.key, call.value, call.layout
    heads_name = call.num_heads_name
    check(call.num_heads > 0, op, heads_name, "must be positive", call.num_heads)
    heads = call.num_heads
    kv_heads = call.num_key_value_heads or heads
    check(call.num_key_value_heads >= 0, op, "num_key_value_heads", "must be >= 0", call.num_key_value_heads)
    check(heads % kv_heads == 0, op, heads_name,
          f"must be divisible by num_key_value_heads={kv_heads}", heads)
    check(heads // kv_heads <= MAX_GQA_RATIO, op, f"{heads_name} / num_key_value_heads",
          f"must be <= {MAX_GQA_RATIO}", heads // kv_heads)
    check(heads <= MAX_HEADS, op, heads_name, f"must be <= {MAX_HEADS}", heads)

    q_n, head_dim = heads_and_dim(op, "query", q.shape, layout.inputs, heads)
    check(q_n == heads, op, heads_name, f"must equal the query head count {q_n}", heads)
    _check_dtypes(call)

    paged = call.block_table is not None
    if layout.inputs == "TND":
        check(call.q_lens is not None, op, call.q_lens_name,
              "is required (cumulative lengths) for input_layout TND", None)
        batch, q_seq = len(call.q_lens), None
    else:
        batch, q_seq = batch_and_seq(q.shape, layout.inputs)

    if paged:
        kv_seq, value_dim, cache_rank = _validate_paged(call, batch, kv_heads, head_dim)
    else:
        cache_rank = 0
        k_n, k_d = heads_and_dim(op, "key", k.shape, layout.inputs, kv_heads)
        v_n, value_dim = heads_and_dim(op, "value", v.shape, layout.inputs, kv_heads)
        check(k_n == kv_heads, op, "num_key_value_heads", f"must equal the key head count {k_n}", kv_heads)
        check(v_n == kv_heads, op, "value", f"head count must equal num_key_value_heads={kv_heads}", v_n)
        check(k_d == head_dim, op, "key", f"head dim must equal the query's {head_dim}", k_d)
        if layout.inputs == "TND":
            check(call.kv_lens is not None, op, call.kv_lens_name,
                  "is required (cumulative lengths) for input_layout TND", None)
            check(len(call.kv_lens) == batch, op, call.kv_lens_name,
                  f"must have one entry per batch ({batch})", len(call.kv_lens))
            kv_seq = None
        else:
            k_b, kv_seq = batch_and_seq(k.shape, layout.inputs)
            check(k_b == batch, op, "key", f"batch must equal the query batch {batch}", k_b)
            v_b, v_seq = batch_and_seq(v.shape, layout.inputs)
            check((v_b, v_seq) == (k_b, kv_seq), op, "value",
                  f"batch and sequence must equal key's {(k_b, kv_seq)}", (v_b, v_seq))
        if call.incremental_only:
            check(value_dim == head_dim, op, "value", "shape must equal key's shape", tuple(v.shape))

    check(head_dim <= MAX_HEAD_DIM, op, "query head_dim (D)", f"must be <= {MAX_HEAD_DIM}", head_dim)
    alignment = 32 if _int8_involved(call) else 16
    check(head_dim % alignment == 0, op, "query head_dim (D)",
          f"must be a multiple of {alignment}", head_dim)

    if call.incremental_only:
        check(q_seq == 1, op, "query", "sequence length S must be 1 for the incremental op", q_seq)

    _validate_lengths(call, batch, q_seq, kv_seq)
    _validate_sparse(call, q_seq)
    _validate_prefix_and_rope(call)
    # With a shared prefix, masks and pse index the prefix + key sequence.
    attended_kv = kv_seq
    if kv_seq is not None and call.key_shared_prefix is not None:
        attended_kv = kv_seq + _shared_prefix_length(call)
    _validate_mask(call, batch, q_seq, attended_kv)
    _validate_pse(call, batch, heads, q_seq, attended_kv)
    _validate_quant(call, heads, value_dim)
    for aq in (call.key_antiquant, call.value_antiquant):
        if aq is not None:
            _validate_antiquant(call, aq, batch, kv_heads, head_dim if aq is call.key_antiquant else value_dim, kv_seq)
    _validate_padding(call)
    _validate_sink(call, heads, value_dim)

    out_dtype = _output_dtype(call)
    out_shape = output_shape(q.shape, layout, heads, value_dim)
    if not call.softmax_lse:
        lse_shape = [1]
    elif layout.inputs == "TND":
        lse_shape = [q.shape[0], heads, 1]
    else:
        lse_shape = [batch, heads, q_seq, 1]
    return Geometry(batch, q_seq, heads, head_dim, kv_heads, kv_seq, value_dim, cache_rank,
                    out_shape, out_dtype, lse_shape)


def validated(call: InferenceCall) -> Geometry:
    """validate(call) for real tensors, remembered per call signature: the rules read the
    arguments' metadata (shapes, strides, dtypes, devices) and host values, and a decode
    step repeats one signature in every layer (about 40 µs a call). The lengths change at
    every step, so for a dense layout without KV antiquant, where only
    _check_length_values reads them, the signature holds their count and that function
    checks the values on every call. A call that fails is never remembered: it raises
    every time."""
    values_free = call.layout.inputs != "TND" and call.key_antiquant is None and call.value_antiquant is None
    key = _signature(call, values_free)
    geometry = _VALIDATED.get(key)
    if geometry is None:
        geometry = validate(call)
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[key] = geometry
    elif values_free:
        _check_length_values(call, geometry)
    return geometry


def _check_length_values(call: InferenceCall, g: Geometry) -> None:
    """The rules on the lengths' values of a dense-layout call without KV antiquant, in
    validate's order."""
    if call.block_table is not None:
        _check_block_count(call, g.batch)
    _validate_lengths(call, g.batch, g.q_seq, g.kv_seq)


_VALIDATED: dict[tuple, Geometry] = {}
_VALIDATED_MAX = 256


def _signature(call: InferenceCall, values_free: bool) -> tuple:
    values = vars(call)
    if values_free:  # the lengths' count only
        values = {**values, "q_lens": _count(call.q_lens), "kv_lens": _count(call.kv_lens)}
    return (on_npu_device(call.query), *(_field_signature(v) for v in values.values()))


def _count(lengths: Sequence[int] | None) -> int | None:
    return None if lengths is None else len(lengths)


def _field_signature(value: object) -> object:
    if value is None or isinstance(value, (int, float, str, bool, Layout)):
        return value
    if isinstance(value, torch.Tensor):
        return (value.shape, value.stride(), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        if all(type(v) is int for v in value):  # lengths: the common case, kept cheap
            return tuple(value)
        return tuple(_field_signature(v) for v in value)
    if isinstance(value, Antiquant):
        return tuple(_field_signature(v) for v in vars(value).values())
    return value


def _int8_involved(call: InferenceCall) -> bool:
    return torch.int8 in (call.query.dtype, call.key.dtype, call.value.dtype)


def _check_dtypes(call: InferenceCall) -> None:
    op, q, k, v = call.op, call.query, call.key, call.value
    on_npu = q.device.type == "npu"
    floats = NPU_FLOAT_DTYPES if on_npu else REFERENCE_FLOAT_DTYPES
    if q.dtype == torch.int8:
        check(not call.incremental_only, op, "query.dtype", "must be float16 or bfloat16", q.dtype)
        check(k.dtype == torch.int8 and v.dtype == torch.int8, op, "key.dtype",
              "must be int8 when the query is int8 (full quantisation)", k.dtype)
        for name, t in ((call.dequant_scale1_name, call.dequant_scale1), ("quant_scale1", call.quant_scale1),
                        (call.dequant_scale2_name, call.dequant_scale2)):
            check(t is not None, op, name, "is required when query is int8 (full quantisation)", None)
        return
    check(q.dtype in floats, op, "query.dtype", f"must be one of {list(floats)}", q.dtype)
    for name, t in (("key", k), ("value", v)):
        check(t.dtype in (q.dtype, torch.int8), op, f"{name}.dtype",
              f"must equal query.dtype ({q.dtype}) or be int8 with antiquant", t.dtype)
    check(k.dtype == v.dtype, op, "value.dtype", f"must equal key.dtype ({k.dtype})", v.dtype)
    if k.dtype == torch.int8:
        check(call.key_antiquant is not None and call.value_antiquant is not None, op, "antiquant_scale",
              "is required when key/value are int8 and the query is floating", None)
    for name, t in ((call.dequant_scale1_name, call.dequant_scale1), ("quant_scale1", call.quant_scale1),
                    (call.dequant_scale2_name, call.dequant_scale2)):
        check(t is None, op, name, "must be None unless query is int8 (full quantisation)", "a tensor")


def _per_batch(call: InferenceCall, values: Sequence[int] | None, name: str, batch: object) -> None:
    if values is None:
        return
    n = len(values)
    if not (n == 1 or n >= batch):
        fail(call.op, name, f"must have 1 or at least batch={batch} entries", n)
    if min(values, default=0) < 0:
        fail(call.op, name, "entries must be >= 0", list(values))


def _validate_lengths(call: InferenceCall, batch: object, q_seq: object, kv_seq: object) -> None:
    op = call.op
    if call.layout.inputs == "TND":
        total_q = call.query.shape[0]
        check_cumulative(op, call.q_lens_name, call.q_lens, total_q)
        if call.block_table is None:
            check_cumulative(op, call.kv_lens_name, call.kv_lens, call.key.shape[0])
        else:
            _per_batch(call, call.kv_lens, call.kv_lens_name, batch)
        return
    _per_batch(call, call.q_lens, call.q_lens_name, batch)
    _per_batch(call, call.kv_lens, call.kv_lens_name, batch)
    # Only the first `batch` entries are used (a single entry is broadcast).
    if call.q_lens is not None and max(_used_entries(call.q_lens, batch)) > q_seq:
        fail(op, call.q_lens_name, f"entries must be <= the query sequence length {q_seq}", list(call.q_lens))
    if call.kv_lens is not None and kv_seq is not None and max(_used_entries(call.kv_lens, batch)) > kv_seq:
        fail(op, call.kv_lens_name, f"entries must be <= the key/value sequence length {kv_seq}", list(call.kv_lens))


def _used_entries(values: Sequence[int], batch: object) -> list:
    """The per-batch entries the op reads: all of a one-entry list, else the first `batch`."""
    values = list(values)
    return values if len(values) == 1 else values[: int(batch)]


def _validate_paged(call: InferenceCall, batch: object, kv_heads: int, head_dim: object) -> tuple:
    op, table, k, v = call.op, call.block_table, call.key, call.value
    check(table.dtype == torch.int32, op, "block_table.dtype", "must be int32", table.dtype)
    check(table.dim() == 2, op, "block_table.dim()", "must be 2 (batch, max_blocks_per_seq)", table.dim())
    check(table.shape[0] == batch, op, "block_table.shape[0]", f"must equal the batch size {batch}", table.shape[0])
    check(call.kv_lens is not None, op, call.kv_lens_name, "is required with block_table (page attention)", None)
    check(call.block_size > 0, op, "block_size", "must be positive with block_table", call.block_size)
    alignment = 32 if k.dtype == torch.int8 else 16
    check(call.block_size % alignment == 0, op, "block_size",
          f"must be a multiple of {alignment} for {k.dtype} key/value caches", call.block_size)
    check(k.dim() in (3, 4), op, "key.dim()",
          "must be 3 (blocknum, blocksize, H) or 4 (blocknum, numKvHeads, blocksize, D) with block_table", k.dim())
    check(v.dim() == k.dim(), op, "value.dim()", f"must equal key.dim() ({k.dim()})", v.dim())
    if k.dim() == 3:
        check(k.shape[1] == call.block_size, op, "key.shape[1]", f"must equal block_size={call.block_size}", k.shape[1])
        check(k.shape[2] == kv_heads * head_dim, op, "key.shape[2] (H)",
              f"must equal num_key_value_heads*D={kv_heads * head_dim}", k.shape[2])
        check(v.shape[:2] == k.shape[:2], op, "value.shape", f"must match key.shape[:2] {tuple(k.shape[:2])}",
              tuple(v.shape))
        check(v.shape[2] % kv_heads == 0, op, "value.shape[2] (H)",
              f"must be divisible by num_key_value_heads={kv_heads}", v.shape[2])
        value_dim = v.shape[2] // kv_heads
    else:
        allowed = ("BNSD",) if call.incremental_only else ("BNSD", "TND")
        check(call.layout.inputs in allowed, op, "input_layout",
              f"must be one of {list(allowed)} with a (blocknum, numKvHeads, blocksize, D) cache",
              call.layout.inputs)
        check(k.shape[1] == kv_heads, op, "key.shape[1]", f"must equal num_key_value_heads={kv_heads}", k.shape[1])
        check(k.shape[2] == call.block_size, op, "key.shape[2]", f"must equal block_size={call.block_size}", k.shape[2])
        check(k.shape[3] == head_dim, op, "key.shape[3] (D)", f"must equal the query head dim {head_dim}", k.shape[3])
        check(v.shape[:3] == k.shape[:3], op, "value.shape", f"must match key.shape[:3] {tuple(k.shape[:3])}",
              tuple(v.shape))
        value_dim = v.shape[3]
    _check_block_count(call, batch)
    check(call.kv_padding_size is None, op, "kv_padding_size", "is not supported with block_table", "a tensor")
    return table.shape[1] * call.block_size, value_dim, k.dim()


def _check_block_count(call: InferenceCall, batch: object) -> None:
    """The block table is wide enough for the longest sequence (a rule on the lengths' values)."""
    max_blocks = call.block_table.shape[1]
    needed = max((math.ceil(x / call.block_size) for x in _used_entries(call.kv_lens, batch)), default=0)
    if needed > max_blocks:
        fail(call.op, "block_table.shape[1]", f"must be >= ceil(max({call.kv_lens_name}) / block_size) = {needed}",
             max_blocks)


def _validate_sparse(call: InferenceCall, q_seq: object) -> None:
    op, mode = call.op, call.sparse_mode
    check(mode in (0, 1, 2, 3, 4), op, "sparse_mode", "must be one of 0, 1, 2, 3, 4", mode)
    # torch_npu refuses these calls too: the CANN PromptFlashAttention tiling
    # ("attenMask should not be null when sparse_mode is %d", modes 1-4), which
    # also serves fused_infer_attention_score's S > 1 path, and the
    # FusedInferAttentionScore docs ("不传入attenMask ... 报错" for modes 2/3/4).
    # The message names the mask to pass.
    if mode == 1 and q_seq != 1:
        check(call.atten_mask is not None, op, "atten_mask",
              "is required for sparse_mode 1 (allMask: the full bool mask, True = masked out)", None)
    if mode in (2, 3, 4) and q_seq != 1:
        check(call.atten_mask is not None, op, "atten_mask",
              f"is required for sparse_mode {mode}: pass the compressed causal mask "
              f"atten_mask={COMPRESSED_MASK_EXPRESSION} (moved to the query's device)", None)
    if mode == 4 and q_seq != 1:  # query S == 1 ignores sparse_mode and pre/next tokens
        check(not (call.pre_tokens < 0 and call.next_tokens < 0), op, "pre_tokens/next_tokens",
              "must not both be negative for sparse_mode 4",
              (call.pre_tokens, call.next_tokens))
        check(-call.next_tokens <= call.pre_tokens, op, "pre_tokens/next_tokens",
              "must overlap (-next_tokens <= pre_tokens) for sparse_mode 4",
              (call.pre_tokens, call.next_tokens))


COMPRESSED_MASK_SHAPES = (
    (COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE),
    (1, COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE),
    (1, 1, COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE),
)


def mask_uses_compressed_form(call: InferenceCall, q_seq: object) -> bool:
    """Modes 2-4 read atten_mask as the compressed causal pattern. The S == 1
    path ignores sparse_mode, so there a mask is the compressed pattern only if
    it has that shape; any other mask is an ordinary (B, KV_S) mask."""
    if call.sparse_mode not in (2, 3, 4):
        return False
    if q_seq != 1:
        return True
    return call.atten_mask is not None and tuple(call.atten_mask.shape) in COMPRESSED_MASK_SHAPES


def plain_float_inputs(call: InferenceCall) -> bool:
    """Q, K and V float of one dtype, and no input beyond them, the mask, the lengths and the
    block table: no pse, softmax_lse, KV antiquant, rope, shared prefix, output quantisation
    or sink. (What every fast path of the reference kernels requires besides its own form.)"""
    return (
        call.pse_shift is None and not call.softmax_lse
        and call.key_antiquant is None and call.value_antiquant is None
        and call.query.dtype.is_floating_point and call.key.dtype == call.query.dtype
        and call.value.dtype == call.query.dtype
        and call.query_rope is None and call.key_rope is None and call.key_shared_prefix is None
        and call.quant_scale2 is None and call.learnable_sink is None
    )


def ordinary_mask(mask: torch.Tensor, q_seq: object) -> torch.Tensor:
    """A validated, non-compressed atten_mask as bool (True: masked out), 4-D and
    broadcastable to (B, N, Sq, KV_S'), its query rows cut to q_seq (its key columns
    may still reach past KV_S)."""
    if mask.dtype != torch.bool:
        mask = mask != 0
    if mask.dim() == 2 and q_seq == 1 and mask.shape[0] != 1:
        mask = mask[:, None, None, :]  # (B, KV_S)
    elif mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask[:, None]
    return mask[..., :q_seq, :]


def _validate_mask(call: InferenceCall, batch: object, q_seq: object, kv_seq: object) -> None:
    op, mask = call.op, call.atten_mask
    if mask is None:
        return
    check(mask.dtype in MASK_DTYPES, op, "atten_mask.dtype", "must be bool, int8 or uint8", mask.dtype)
    shape = tuple(mask.shape)
    if mask_uses_compressed_form(call, q_seq):
        check(shape in COMPRESSED_MASK_SHAPES, op, "atten_mask",
              f"must have shape (2048, 2048), (1, 2048, 2048) or (1, 1, 2048, 2048) for sparse_mode {call.sparse_mode}"
              f" (pass {COMPRESSED_MASK_EXPRESSION})", shape)
        return
    check(call.layout.inputs != "TND", op, "atten_mask",
          "with input_layout TND is only supported as the compressed mask of sparse_mode 3", shape)
    check(mask.dim() in (2, 3, 4), op, "atten_mask.dim()", "must be 2, 3 or 4", mask.dim())
    if mask.dim() == 2 and q_seq == 1 and mask.shape[0] != 1:
        mask_batch, mask_q, mask_kv = mask.shape[0], 1, mask.shape[1]  # (B, KV_S)
    elif mask.dim() == 2:
        mask_batch, mask_q, mask_kv = 1, mask.shape[0], mask.shape[1]
    elif mask.dim() == 3:
        mask_batch, mask_q, mask_kv = mask.shape
    else:
        check(mask.shape[1] == 1, op, "atten_mask.shape[1]", "must be 1 (the mask is shared by heads)", mask.shape[1])
        mask_batch, mask_q, mask_kv = mask.shape[0], mask.shape[2], mask.shape[3]
    check(mask_batch in (1, batch), op, "atten_mask batch dim", f"must be 1 or the batch size {batch}", mask_batch)
    check(mask_q >= q_seq, op, "atten_mask query dim", f"must be >= the query sequence length {q_seq}", mask_q)
    check(mask_kv >= kv_seq, op, "atten_mask key dim", f"must be >= the key/value sequence length {kv_seq}", mask_kv)


def _validate_pse(call: InferenceCall, batch: object, heads: int, q_seq: object, kv_seq: object) -> None:
    op, pse = call.op, call.pse_shift
    if pse is None:
        return
    check(call.layout.inputs != "TND", op, "pse_shift", "is not supported with input_layout TND", tuple(pse.shape))
    check(pse.dim() == 4, op, "pse_shift.dim()", "must be 4 (B or 1, N, Q_S, KV_S)", pse.dim())
    expected = torch.float16 if call.query.dtype == torch.int8 else call.query.dtype
    check(pse.dtype == expected, op, "pse_shift.dtype", f"must be {expected} to match the query", pse.dtype)
    check(pse.shape[0] in (1, batch), op, "pse_shift.shape[0]", f"must be 1 or the batch size {batch}", pse.shape[0])
    check(pse.shape[1] == heads, op, "pse_shift.shape[1]", f"must equal num_heads={heads}", pse.shape[1])
    check(pse.shape[2] >= q_seq, op, "pse_shift.shape[2]", f"must be >= the query sequence length {q_seq}",
          pse.shape[2])
    check(pse.shape[3] >= kv_seq, op, "pse_shift.shape[3]", f"must be >= the key/value sequence length {kv_seq}",
          pse.shape[3])


def _validate_quant(call: InferenceCall, heads: int, value_dim: object) -> None:
    op, scale2, offset2 = call.op, call.quant_scale2, call.quant_offset2
    scale_name, offset_name = call.quant_scale2_name, call.quant_offset2_name
    if scale2 is None:
        check(offset2 is None, op, offset_name, f"requires {scale_name}", "a tensor")
        return
    allowed = (torch.float32, torch.bfloat16) if call.query.dtype == torch.bfloat16 else (torch.float32,)
    if call.query.device.type != "npu" and call.query.dtype in (torch.float32, torch.float64):
        allowed = (torch.float32, call.query.dtype)
    check(scale2.dtype in allowed, op, f"{scale_name}.dtype", f"must be one of {list(allowed)}", scale2.dtype)
    channels = heads * value_dim
    check(scale2.numel() in (1, channels), op, scale_name,
          f"must have 1 element (per-tensor) or N*D={channels} elements (per-channel)", tuple(scale2.shape))
    if offset2 is not None:
        check(offset2.shape == scale2.shape, op, f"{offset_name}.shape",
              f"must equal {scale_name}.shape {tuple(scale2.shape)}", tuple(offset2.shape))
        check(offset2.dtype == scale2.dtype, op, f"{offset_name}.dtype",
              f"must equal {scale_name}.dtype {scale2.dtype}", offset2.dtype)
    for name, t in ((call.dequant_scale1_name, call.dequant_scale1), (call.dequant_scale2_name, call.dequant_scale2)):
        if t is not None:
            check(t.numel() == 1, op, name, "must be per-tensor (one element)", tuple(t.shape))
            check(t.dtype == torch.float32, op, f"{name}.dtype",
                  "must be float32 (uint64-packed scales are not supported off the NPU)", t.dtype)


ANTIQUANT_SHAPES = {
    0: "per-channel (N, 1, D) / (N, D) / (H), optionally with a leading 1, or per-tensor (1,)",
    1: "per-token (B, S) or (1, B, S), float32",
    2: "per-head (N,)",
    3: "per-token-per-head (B, N, S), float32",
    4: "per-token in pages (blocknum, blocksize), float32",
    5: "per-token-per-head in pages (blocknum, N, blocksize), float32",
}


def _validate_antiquant(call: InferenceCall, aq: Antiquant, batch: object, kv_heads: int, dim: object,
                        kv_seq: object) -> None:
    op, scale = call.op, aq.scale
    check(aq.mode in ANTIQUANT_SHAPES, op, f"{aq.name} mode", f"must be one of {sorted(ANTIQUANT_SHAPES)}", aq.mode)
    check(call.key.dtype == torch.int8, op, aq.name, "requires int8 key/value", call.key.dtype)
    if aq.offset is not None:
        check(aq.offset.shape == scale.shape, op, aq.name.replace("scale", "offset") + ".shape",
              f"must equal {aq.name}.shape {tuple(scale.shape)}", tuple(aq.offset.shape))
    if aq.mode in (4, 5):
        check(call.block_table is not None, op, f"{aq.name} mode {aq.mode}", "requires block_table", None)
    shape = tuple(scale.shape)
    numel = scale.numel()
    ok = {
        0: numel == 1 or _without_leading_ones(shape) in ((kv_heads, 1, dim), (kv_heads, dim), (kv_heads * dim,)),
        1: (scale.dim() == 2 and scale.shape[0] in (1, batch))
        or (scale.dim() == 3 and scale.shape[0] == 1 and scale.shape[1] in (1, batch)),
        2: shape == (kv_heads,),
        3: scale.dim() == 3 and scale.shape[0] in (1, batch) and scale.shape[1] == kv_heads,
        4: scale.dim() == 2 and call.key.dim() > 0 and scale.shape[0] == call.key.shape[0],
        5: scale.dim() == 3 and scale.shape[0] == call.key.shape[0] and scale.shape[1] == kv_heads,
    }[aq.mode]
    check(ok, op, aq.name, f"must have shape {ANTIQUANT_SHAPES[aq.mode]} for mode {aq.mode}", shape)
    if aq.mode in (1, 3) and kv_seq is not None:
        covered = kv_seq
        if call.block_table is not None:  # the gathered positions: whole blocks of the longest sequence
            longest = max(broadcast(call.kv_lens, batch), default=0)
            covered = math.ceil(longest / call.block_size) * call.block_size
        check(scale.shape[-1] >= covered, op, aq.name,
              f"per-token scales must cover the key/value sequence length {covered}", shape)


def _shared_prefix_length(call: InferenceCall) -> object:
    """actual_shared_prefix_len, or the prefix's sequence length."""
    if call.shared_prefix_len is not None:
        return call.shared_prefix_len[0]
    return batch_and_seq(call.key_shared_prefix.shape, call.layout.inputs)[1]


def _without_leading_ones(shape: tuple) -> tuple:
    """(1, N, 1, D) -> (N, 1, D), (1, H) -> (H,): the documented per-channel
    shapes of the separate key/value scales carry an optional leading 1."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _validate_padding(call: InferenceCall) -> None:
    op = call.op
    for name, pad, lens, lens_name in (
        ("kv_padding_size", call.kv_padding_size, call.kv_lens, call.kv_lens_name),
        ("query_padding_size", call.query_padding_size, call.q_lens, call.q_lens_name),
    ):
        if pad is None:
            continue
        check(pad.numel() == 1, op, name, "must hold one value", tuple(pad.shape))
        check(pad.dtype == torch.int64, op, f"{name}.dtype", "must be int64", pad.dtype)
        check(lens is not None, op, lens_name, f"is required with {name} (left padding)", None)
        check(call.layout.inputs != "TND", op, name, "is not supported with input_layout TND", call.layout.inputs)


def _validate_prefix_and_rope(call: InferenceCall) -> None:
    op = call.op
    if (call.key_shared_prefix is None) != (call.value_shared_prefix is None):
        fail(op, "key_shared_prefix/value_shared_prefix", "must be given together", "only one")
    if call.key_shared_prefix is not None:
        check(call.block_table is None, op, "key_shared_prefix", "is not supported with block_table", "a tensor")
        check(call.kv_padding_size is None, op, "key_shared_prefix", "is not supported with kv_padding_size",
              "a tensor")
        check(call.layout.inputs != "TND", op, "key_shared_prefix", "is not supported with input_layout TND",
              call.layout.inputs)
        check(call.query_rope is None and call.key_rope is None, op, "key_shared_prefix",
              "is not supported with query_rope/key_rope (MLA)", "a tensor")
        for name, t in (("key_shared_prefix", call.key_shared_prefix), ("value_shared_prefix", call.value_shared_prefix)):
            check(t.dim() == call.key.dim(), op, f"{name}.dim()", f"must equal key.dim() ({call.key.dim()})", t.dim())
            check(t.shape[0] == 1, op, f"{name}.shape[0]", "must be 1 (one prefix shared by all batches)", t.shape[0])
        if call.shared_prefix_len is not None:  # checked here too so that the fake kernel raises it
            prefix_seq = batch_and_seq(call.key_shared_prefix.shape, call.layout.inputs)[1]
            plen = call.shared_prefix_len[0] if len(call.shared_prefix_len) else -1
            check(len(call.shared_prefix_len) == 1 and 0 <= plen <= prefix_seq, op, "actual_shared_prefix_len",
                  f"must hold one value within [0, {prefix_seq}]", list(call.shared_prefix_len))
    if (call.query_rope is None) != (call.key_rope is None):
        fail(op, "query_rope/key_rope", "must be given together", "only one")
    if call.query_rope is not None:
        check(call.query_rope.dtype == call.query.dtype or call.query.dtype == torch.int8, op, "query_rope.dtype",
              f"must equal query.dtype {call.query.dtype}", call.query_rope.dtype)
        check(call.query_rope.shape[:-1] == call.query.shape[:-1] or call.layout.inputs == "BSH", op,
              "query_rope.shape", f"must match query.shape except the last dim {tuple(call.query.shape)}",
              tuple(call.query_rope.shape))


def on_npu_device(t: torch.Tensor) -> bool:
    """True where the NPU-only rules apply: a tensor on the Ascend device, or a
    graph being built for it (_library.npu_rules)."""
    return _library.npu_rules_apply(t)


# learnable_sink on the NPU (CANN ops-transformer FusedInferAttentionScore:
# op_host/fused_infer_attention_score_def.cpp declares it DT_BF16 only; the
# tiling refuses it unless input_layout is TND/NTD_TND and the value head dim
# is 64 or 128).
SINK_NPU_LAYOUTS = ("TND",)
SINK_NPU_VALUE_DIMS = (64, 128)


def _validate_sink(call: InferenceCall, heads: int, value_dim: object) -> None:
    sink, op, name = call.learnable_sink, call.op, call.learnable_sink_name
    if sink is None:
        return
    check(tuple(sink.shape) == (heads,), op, f"{name}.shape", f"must be (num_query_heads,) = ({heads},)",
          tuple(sink.shape))
    if on_npu_device(call.query):
        check(sink.dtype == torch.bfloat16, op, f"{name}.dtype", "must be torch.bfloat16 on the NPU", sink.dtype)
        layout = call.layout.inputs if call.layout.inputs == call.layout.output else \
            f"{call.layout.inputs}_{call.layout.output}"
        check(layout in SINK_NPU_LAYOUTS, op, name,
              f"is only supported with input_layout {' or '.join(SINK_NPU_LAYOUTS)} on the NPU", layout)
        check(value_dim in SINK_NPU_VALUE_DIMS, op, name,
              f"requires a value head dim in {list(SINK_NPU_VALUE_DIMS)} on the NPU", value_dim)
    else:
        check(sink.dtype in REFERENCE_FLOAT_DTYPES, op, f"{name}.dtype",
              f"must be one of {list(REFERENCE_FLOAT_DTYPES)}", sink.dtype)


def _output_dtype(call: InferenceCall) -> torch.dtype:
    if call.quant_scale2 is not None:
        return torch.int8
    if call.query.dtype == torch.int8:
        return call.query_rope.dtype if call.query_rope is not None else torch.float16
    return call.query.dtype


def broadcast(values: Sequence[int] | None, batch: int) -> list[int] | None:
    if values is None:
        return None
    return [int(values[0])] * batch if len(values) == 1 else [int(x) for x in values[:batch]]
