"""npu_sparse_flash_attention: attention over the KV tokens chosen by an indexer (MLA-absorb).

Schema: torch_npu 2.13.0's (namespace npu_attn), written once, in the ``define`` call below;
the drop-in function's docstring shows it.

Returns (attention_out, softmax_max, softmax_sum).

The seeds' form (seed 004, CANN custom-op packages)::

    custom.npu_sparse_flash_attention(Tensor query, Tensor key, Tensor value, Tensor sparse_indices,
        float scale_value, int sparse_block_size, *, Tensor? block_table=None,
        Tensor? actual_seq_lengths_query=None, Tensor? actual_seq_lengths_kv=None,
        Tensor? query_rope=None, Tensor? key_rope=None, str layout_query='BSND',
        str layout_kv='BSND', int sparse_mode=3) -> Tensor

is :func:`custom_npu_sparse_flash_attention` here (``npu_attn_graph.ops.custom``):
``sparse_block_size`` positional, no attention_mode / pre_tokens / next_tokens /
return_softmax_lse / sinks, one Tensor returned. It is a Python wrapper over
this op (attention_mode=2, return_softmax_lse=False, output 0), not a second
torch.library op: the computation is the same kernel, so torch.compile, export
and the GE converter all see ``npu_attn::npu_sparse_flash_attention`` (whose
two softmax outputs are then empty (0,) placeholders that nothing reads), every
pass, report and converter written for that op covers the custom form, and no
second schema, fake, converter and ONNX translation can drift from the first.
A separate ``custom`` namespace op would also clash on an NPU host with the real
``torch.ops.custom`` library that CANN's custom-op package registers.

attention_mode (what the CANN sources say, and what we do with the default 0):

* torch_npu passes attention_mode unchanged to aclnnSparseFlashAttention(V2)
  (Ascend/op-plugin op_plugin/ops/opapi/SparseFlashAttentionKernelNpuOpApi.cpp).
* CANN's tiling check refuses every mode but 2 (hicann/ops-transformer
  attention/sparse_flash_attention/op_host/sparse_flash_attention_tiling.cpp,
  SFATilingCheck::CheckRopeExistence: "Attention_mode only supports 2"), and
  names what 0 would mean: "In MHA/GQA situation(attentionMode=0), query_rope
  and key_rope should be empty tensor". So 0 is MHA/GQA without rope parts
  (third-party callers annotate 0: GQA/MHA, 1: MLA-naive, 2: MLA-absorb),
  a mode no CANN build of SparseFlashAttention computes; the torch API doc
  (attention/sparse_flash_attention/docs/torchapi_sparse_flash_attention.md)
  says "仅支持传入 2 ... 默认值为 0". The older ops-transformer tree whose
  README is seed 004 (mirror repo-mirror-test/ops-transformer) has the same
  two checks. On the NPU the 2.13 schema's own default therefore fails.
* The seed's custom op (hicann/cann-recipes-infer
  ops/ascendc/src/sparse_flash_attention, op_host/sparse_flash_attention_def.cpp)
  has no attention_mode attribute and one output; its only kernel is the MLA
  one (op_kernel/sparse_flash_attention_kernel_mla.h) and its example (the
  seed's 调用示例, ops/ascendc/examples/test_npu_sparse_flash_attention.py)
  passes query_rope/key_rope and checks against an MLA-absorb golden: every
  seed-form call is MLA-absorb.

Decision: attention_mode=0 is accepted where the inputs make the mode
unambiguous, i.e. with query_rope and key_rope both given: only MLA-absorb
takes rope parts, so the call is read as attention_mode=2 -- by the reference
kernel, by the NPU kernel (which hands torch_npu attention_mode=2, so the call
runs there instead of failing) and by the GE converter (which writes the attr
as 2). attention_mode=0 without rope parts (the MHA/GQA mode CANN names but
does not compute) and any mode other than 0 and 2 raise NpuAttnArgumentError
naming attention_mode.

Semantics (torch_npu / ops-transformer SparseFlashAttention docs and the
ops-transformer golden; B batch, S1/S2 query/KV lengths, N1 query heads, N2 KV
heads, G = N1 / N2, D = 512, Dr = 64 rope dim, K = sparse_indices.shape[-1]):

* For query token i of batch b and KV head n, ``sparse_indices[.., i, n, :]``
  names K blocks of ``sparse_block_size`` consecutive KV tokens: entry x
  selects positions [x * sparse_block_size, (x + 1) * sparse_block_size).
  -1 is padding: the first -1 ends the row's list (the docs require valid
  entries first, padding last). Entries < -1 are an error.
* Causal limit: threshold = kv_len (sparse_mode 0) or
  kv_len - q_len + s + 1 (sparse_mode 3, rightDownCausal; s = the token's
  position in its batch, q_len/kv_len the batch's actual lengths). Selected
  positions >= threshold, and positions >= kv_len, are masked. As on the
  hardware (whose s2 loop covers min(threshold, K * sparse_block_size) tokens)
  only the first min(K, ceil(threshold / sparse_block_size)) entries are read;
  with distinct in-range indices listed first this never drops a valid block.
* MLA-absorb (attention_mode 2, the only documented mode):
  score = scale_value * (q . k + q_rope . k_rope) over the selected tokens,
  out = softmax(score) @ v, with v = value, or v = key when value is None
  (the absorbed latent cache serves as key and value: "key 与 value 共享同一份
  底层张量数据"). Duplicate selections are gathered (and weighted) twice.
* sinks (N1,) float32: one learnable logit per query head that joins the
  softmax max and denominator but has no value:
  max = max(max(score), sink); sum = sum(exp(score - max)) + exp(sink - max).
* softmax_max / softmax_sum (return_softmax_lse=True) are that max and sum
  (of the scaled scores, fp32): (B, N2, S1, G) for layout_query BSND,
  (N2, T, G) for TND; with return_softmax_lse=False both are empty (0,)
  float32 tensors (the torch_npu meta registration).
* Rows with nothing to compute output 0: query rows past
  actual_seq_lengths_query (BSND), and sparse_mode 3 rows with threshold <= 0
  (s < q_len - kv_len), also get softmax_max = softmax_sum = 0 (the kernel's
  zero-initialised output). A computed row whose selection is empty outputs 0
  with max = sum = 0, or with sinks max = sink and sum = 1 (as the golden).
* Layouts: layout_query BSND query (B, S1, N1, D) or TND (T, N1, D);
  layout_kv BSND key (B, S2, N2, D), TND (T2, N2, D) -- each only with the
  same layout_query -- or PA_BSND key (block_num, block_size, N2, D) with
  block_table (B, max_blocks): token p of batch b lives in block
  block_table[b, p // block_size] at offset p % block_size.
  sparse_indices is (B, S1, N2, K) for BSND and (T, N2, K) for TND;
  query_rope/key_rope are query/key with last dim 64.
* actual_seq_lengths_query / actual_seq_lengths_kv are int32 (B,) tensors of
  per-batch lengths (None = full S1/S2); for a TND tensor they are cumulative
  (required, non-decreasing, last entry = T, and B = their length).
  actual_seq_lengths_kv is required for PA_BSND (and TND).

Constraints (NpuAttnArgumentError naming the argument, from the fake and the
reference kernel alike): D = 512, Dr = 64, N2 = 1, N1 in {1, 2, 4, ..., 128},
attention_mode = 2 (or the default 0, read as 2) with query_rope and key_rope given, sparse_mode in {0, 3},
pre_tokens = next_tokens = 2**63 - 1, sparse_block_size a power of two in
[1, 128] that divides block_size, block_size a multiple of 16 up to 1024,
return_softmax_lse not with PA_BSND, dtypes fp16/bf16 (q, k, v, ropes alike),
int32 indices/lengths/block_table, float32 sinks.

Choices where the docs are silent or device-specific:
* D = 512, Dr = 64, N2 = 1 and MLA-absorb (attention_mode 2, or 0 with rope
  parts, as above) are enforced on every device: each product's docs list them identically (they define this
  MLA-absorb op, not one chip), and D = 512 tensors are cheap on a CPU. The
  only relaxation off the NPU is the dtype: float32/float64 are accepted too,
  so models can be checked exactly against eager.
* The A2/A3 rules of the torch_npu doc (N1 a power of two, sparse_block_size
  a power of two <= 128, no return_softmax_lse with PA_BSND) are enforced
  everywhere; sinks (Ascend 950 only in the CANN docs, but in the torch_npu
  2.13 schema) are accepted everywhere.
* The reference computes in fp32 (fp64 for fp64 inputs) without rounding the
  probabilities to the input dtype before P @ V (the hardware does).
* Data-dependent rules (length ranges, cumulative lengths, index values,
  block ids) are checked by the reference kernel only.
"""

from __future__ import annotations

import torch

from . import _library
from ._attention_core import compute_dtype, exp_scores, paged_block_ids
from ._layouts import check_cumulative
from ._dropin import dropin
from ._library import check, define, fail, register_fake, register_npu, register_reference
from ._sparse_flash_args import MLA_ABSORB, OP, SCHEMA_DEFAULT_MODE, Plan, validate

__all__ = ["custom_npu_sparse_flash_attention", "npu_sparse_flash_attention", "resolved_attention_mode"]

QUALNAME = define(
    OP,
    "(Tensor query, Tensor key, Tensor? value, Tensor sparse_indices, float scale_value, *, "
    "Tensor? block_table=None, Tensor? actual_seq_lengths_query=None, Tensor? actual_seq_lengths_kv=None, "
    "Tensor? query_rope=None, Tensor? key_rope=None, int sparse_block_size=1, str layout_query=\"BSND\", "
    "str layout_kv=\"BSND\", int sparse_mode=3, int pre_tokens=9223372036854775807, "
    "int next_tokens=9223372036854775807, int attention_mode=0, bool return_softmax_lse=False, "
    "Tensor? sinks=None) -> (Tensor, Tensor, Tensor)",
)


def _outputs_like(query: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = query.new_empty(plan.out_shape)
    lse = [query.new_empty(plan.lse_shape, dtype=torch.float32) for _ in range(2)]
    return out, lse[0], lse[1]


@register_fake(QUALNAME)
def _fake(query, key, value, sparse_indices, scale_value, **kwargs):
    return _outputs_like(query, validate(query, key, value, sparse_indices, **kwargs))


# ----------------------------------------------------------------------------
# Reference kernel
# ----------------------------------------------------------------------------


def _host_ints(t: torch.Tensor) -> list[int]:
    return [int(x) for x in t.tolist()]


def _segment_lengths(op_arg: str, cumulative: list[int], total: int, layout: str) -> tuple[list[int], list[int]]:
    """Cumulative lengths -> (starts, lengths), checking the documented rules."""
    check_cumulative(OP, op_arg, cumulative, total, f"layout {layout}")
    starts = [0, *cumulative[:-1]]
    return starts, [e - s for s, e in zip(starts, cumulative)]


def _per_batch_lengths(op_arg: str, values: torch.Tensor | None, batch: int, limit: int, what: str) -> list[int]:
    if values is None:
        return [limit] * batch
    lengths = _host_ints(values)
    for x in lengths:
        check(0 <= x <= limit, OP, op_arg, f"entries must be in [0, {what} {limit}]", lengths)
    return lengths


def _reference(query, key, value, sparse_indices, scale_value, *, block_table, actual_seq_lengths_query,
               actual_seq_lengths_kv, query_rope, key_rope, sparse_block_size, layout_query,
               layout_kv, sparse_mode, pre_tokens, next_tokens, attention_mode,
               return_softmax_lse, sinks):
    plan = validate(
        query, key, value, sparse_indices, block_table=block_table,
        actual_seq_lengths_query=actual_seq_lengths_query, actual_seq_lengths_kv=actual_seq_lengths_kv,
        query_rope=query_rope, key_rope=key_rope, sparse_block_size=sparse_block_size, layout_query=layout_query,
        layout_kv=layout_kv, sparse_mode=sparse_mode, pre_tokens=pre_tokens, next_tokens=next_tokens,
        attention_mode=attention_mode, return_softmax_lse=return_softmax_lse, sinks=sinks)
    device = query.device
    batch, tokens, heads, kv_heads = int(plan.batch), int(plan.q_tokens), plan.heads, plan.kv_heads
    group = heads // kv_heads
    dtype = compute_dtype(query.dtype)

    # --- per-batch lengths and token ranges (host side; data-dependent checks)
    if layout_query == "TND":
        q_starts, q_lens = _segment_lengths("actual_seq_lengths_query", _host_ints(actual_seq_lengths_query),
                                            tokens, "TND")
    else:
        s1 = int(plan.q_seq)
        q_lens = _per_batch_lengths("actual_seq_lengths_query", actual_seq_lengths_query, batch, s1,
                                    "the query sequence length")
        q_starts = [b * s1 for b in range(batch)]
    if layout_kv == "TND":
        kv_starts, kv_lens = _segment_lengths("actual_seq_lengths_kv", _host_ints(actual_seq_lengths_kv),
                                              int(plan.kv_seq), "TND")
    elif layout_kv == "BSND":
        kv_lens = _per_batch_lengths("actual_seq_lengths_kv", actual_seq_lengths_kv, batch, int(plan.kv_seq),
                                     "the key sequence length")
        kv_starts = [b * int(plan.kv_seq) for b in range(batch)]
    else:
        kv_lens = _per_batch_lengths("actual_seq_lengths_kv", actual_seq_lengths_kv, batch, int(plan.kv_seq),
                                     "block_table.shape[1] * block_size =")
        kv_starts = [0] * batch
        # Raises on a used entry outside [0, block_num); unused entries (e.g. -1) become block 0.
        block_table = paged_block_ids(OP, block_table, kv_lens, int(plan.page_block_size), key.shape[0],
                                      "actual_seq_lengths_kv")
    if bool((sparse_indices < -1).any()):
        fail(OP, "sparse_indices", "entries must be block indices >= 0 or -1 (padding)",
             sorted(set(sparse_indices[sparse_indices < -1].tolist()))[:8])

    # --- per-row tables: batch, position in batch, causal limit, entries read
    row_batch = torch.zeros(tokens, dtype=torch.long)
    row_pos = torch.zeros(tokens, dtype=torch.long)
    row_in_batch = torch.zeros(tokens, dtype=torch.bool)
    for b in range(batch):
        s, n = q_starts[b], q_lens[b]
        row_batch[s : s + n] = b
        row_pos[s : s + n] = torch.arange(n)
        row_in_batch[s : s + n] = True
    kv_len_t = torch.tensor(kv_lens, dtype=torch.long)[row_batch]
    if sparse_mode == 3:
        q_len_t = torch.tensor(q_lens, dtype=torch.long)[row_batch]
        threshold = kv_len_t - q_len_t + row_pos + 1
    else:
        threshold = kv_len_t
    live = row_in_batch & (threshold > 0)
    limit = torch.minimum(threshold, kv_len_t).clamp_min(0)  # positions must be < limit
    # The kernel walks at most min(K, ceil(threshold / sparse_block_size)) entries.
    entries = torch.clamp(-(-threshold.clamp_min(0) // sparse_block_size), max=sparse_indices.shape[-1])
    row_base = torch.tensor(kv_starts, dtype=torch.long)[row_batch]
    row_batch, limit, entries, live, row_base = (t.to(device) for t in (row_batch, limit, entries, live, row_base))

    # --- flattened operands: rows of the query, rows of the KV store
    q_rows = query.reshape(tokens, kv_heads, group, -1)
    qr_rows = query_rope.reshape(tokens, kv_heads, group, -1)
    idx_rows = sparse_indices.reshape(tokens, kv_heads, -1)
    key_rows = key.reshape(-1, kv_heads, key.shape[-1])
    key_rope_rows = key_rope.reshape(-1, kv_heads, key_rope.shape[-1])
    value_rows = None if value is None else value.reshape(-1, kv_heads, value.shape[-1])
    sink = None if sinks is None else sinks.to(dtype).view(1, kv_heads, group, 1)

    out = torch.zeros(tokens, kv_heads, group, query.shape[-1], dtype=dtype, device=device)
    softmax_max = torch.zeros(tokens, kv_heads, group, dtype=torch.float32, device=device)
    softmax_sum = torch.zeros_like(softmax_max)

    span = sparse_indices.shape[-1] * sparse_block_size  # gathered tokens per row and KV head
    elem = torch.finfo(dtype).bits // 8
    gathered = key.shape[-1] + key_rope.shape[-1] + (0 if value is None else value.shape[-1])
    per_row = kv_heads * span * elem * (gathered + 2 * group)
    chunk = max(1, _library.SCORE_BLOCK_BYTES // per_row)
    offsets = torch.arange(sparse_block_size, device=device)
    kv_head_index = torch.arange(kv_heads, device=device).view(1, kv_heads, 1)
    entry_index = torch.arange(sparse_indices.shape[-1], device=device)

    for r0 in range(0, tokens, chunk):
        r1 = min(tokens, r0 + chunk)
        rows = r1 - r0
        idx = idx_rows[r0:r1].to(torch.long)  # (rows, N2, K)
        # Entries read: before the first -1 and within the row's entry budget.
        read = ((idx == -1).cumsum(-1) == 0) & (entry_index < entries[r0:r1, None, None])
        pos = idx[..., None] * sparse_block_size + offsets  # (rows, N2, K, sbs)
        ok = read[..., None] & (pos >= 0) & (pos < limit[r0:r1, None, None, None]) & live[r0:r1, None, None, None]
        pos = torch.where(ok, pos, 0).view(rows, kv_heads, span)
        ok = ok.view(rows, kv_heads, span)
        if layout_kv == "PA_BSND":
            bs = int(plan.page_block_size)
            table = block_table[row_batch[r0:r1]]  # (rows, blocks used by the longest batch)
            blocks = torch.gather(table, 1, (pos // bs).view(rows, -1)).view_as(pos)
            flat = torch.where(ok, blocks * bs + pos % bs, 0)
        else:
            flat = torch.where(ok, row_base[r0:r1, None, None] + pos, 0)  # a batch may start past the end
        k = key_rows[flat, kv_head_index].to(dtype)  # (rows, N2, span, D)
        kr = key_rope_rows[flat, kv_head_index].to(dtype)
        v = k if value_rows is None else value_rows[flat, kv_head_index].to(dtype)
        if not bool(ok.all()):
            # Positions not read (-1 padding, past kv_len or the causal limit, unused
            # paged slots) were gathered from token 0 / block 0, which may hold
            # garbage (NaN, inf). Their scores are masked below, but P @ V would
            # still give 0 * NaN: zero the (freshly gathered) values in place.
            v.masked_fill_(~ok[..., None], 0)
        scores = torch.matmul(q_rows[r0:r1].to(dtype), k.transpose(-1, -2))
        scores += torch.matmul(qr_rows[r0:r1].to(dtype), kr.transpose(-1, -2))
        scores *= scale_value
        scores.masked_fill_(~ok[:, :, None, :], float("-inf"))  # (rows, N2, G, span)
        # The shared softmax step, the sink joining the max and the sum (the kernel's
        # softmax_max / softmax_sum); scores now hold exp(score - max).
        row_max, _, row_sum, safe_sum = exp_scores(scores, sink, sink_in_max=True)
        alive = live[r0:r1, None, None, None]
        out[r0:r1] = torch.where(alive, torch.matmul(scores, v) / safe_sum, 0.0)
        softmax_max[r0:r1] = torch.where(alive, row_max, 0.0)[..., 0].to(torch.float32)
        softmax_sum[r0:r1] = torch.where(alive, row_sum, 0.0)[..., 0].to(torch.float32)

    attention_out = out.view(plan.out_shape).to(query.dtype)
    if not return_softmax_lse:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return attention_out, empty, empty.clone()
    if layout_query == "BSND":
        s1 = int(plan.q_seq)
        to_layout = lambda t: t.view(batch, s1, kv_heads, group).transpose(1, 2).contiguous()  # noqa: E731
    else:
        to_layout = lambda t: t.transpose(0, 1).contiguous()  # noqa: E731
    return attention_out, to_layout(softmax_max), to_layout(softmax_sum)


def resolved_attention_mode(attention_mode: int) -> int:
    """The attention_mode handed to torch_npu / GE: the default 0 (accepted only
    with rope parts, see the module docstring) becomes 2, the one mode CANN runs."""
    return MLA_ABSORB if attention_mode == SCHEMA_DEFAULT_MODE else attention_mode


def _npu(query, key, value, sparse_indices, scale_value, **kwargs):
    import torch_npu

    # The default 0 with rope parts is MLA-absorb: hand torch_npu the 2 CANN requires.
    # (Without rope parts 0 goes through unchanged, and CANN refuses it, as we do.)
    if kwargs.get("query_rope") is not None and kwargs.get("key_rope") is not None:
        kwargs["attention_mode"] = resolved_attention_mode(kwargs.get("attention_mode", SCHEMA_DEFAULT_MODE))
    return torch_npu.npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, **kwargs)


register_reference(QUALNAME, _reference)
register_npu(QUALNAME, _npu)


npu_sparse_flash_attention = dropin(QUALNAME, __name__, """\
torch_npu.npu_sparse_flash_attention, runnable on any device (see module docstring).

Returns (attention_out, softmax_max, softmax_sum); the last two are empty
(0,) float32 tensors unless return_softmax_lse is True. The default
attention_mode=0 is read as 2 (MLA-absorb) when query_rope and key_rope are
given and refused otherwise.""")


CUSTOM_OP = "custom.npu_sparse_flash_attention"


def custom_npu_sparse_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sparse_indices: torch.Tensor,
    scale_value: float,
    sparse_block_size: int,
    *,
    block_table: torch.Tensor | None = None,
    actual_seq_lengths_query: torch.Tensor | None = None,
    actual_seq_lengths_kv: torch.Tensor | None = None,
    query_rope: torch.Tensor | None = None,
    key_rope: torch.Tensor | None = None,
    layout_query: str = "BSND",
    layout_kv: str = "BSND",
    sparse_mode: int = 3,
) -> torch.Tensor:
    """custom.npu_sparse_flash_attention as seed 004 documents it: one Tensor, the
    MLA-absorb attention output (the same kernel as the 2.13 form's first output;
    see the module docstring for why this is a wrapper and not a separate op).

    Beyond the op's own rules: value is a required Tensor (pass key itself for
    MLA's shared latent cache), sparse_block_size a positional int, and
    query_rope/key_rope are required (this form has no attention_mode: it always
    computes MLA-absorb).
    """
    # Checked in parameter order (so a traced call also reads its inputs in that order).
    for name, tensor in (("query", query), ("key", key)):
        check(isinstance(tensor, torch.Tensor), CUSTOM_OP, name, "must be a Tensor", type(tensor).__name__)
    check(value is not None, CUSTOM_OP, "value",
          "is a required Tensor in the custom form (pass key itself for MLA's shared latent cache)", None)
    check(isinstance(value, torch.Tensor), CUSTOM_OP, "value", "must be a Tensor", type(value).__name__)
    check(isinstance(sparse_indices, torch.Tensor), CUSTOM_OP, "sparse_indices", "must be a Tensor",
          type(sparse_indices).__name__)
    check(isinstance(sparse_block_size, int) and not isinstance(sparse_block_size, bool), CUSTOM_OP,
          "sparse_block_size", "must be an int (the sixth positional argument)", repr(sparse_block_size))
    for name, rope in (("query_rope", query_rope), ("key_rope", key_rope)):
        check(rope is not None, CUSTOM_OP, name,
              "is required (the custom form computes MLA-absorb: query/key hold the nope part, "
              "query_rope/key_rope the 64-wide rope part)", None)
    return torch.ops.npu_attn.npu_sparse_flash_attention(
        query, key, value, sparse_indices, scale_value, block_table=block_table,
        actual_seq_lengths_query=actual_seq_lengths_query, actual_seq_lengths_kv=actual_seq_lengths_kv,
        query_rope=query_rope, key_rope=key_rope, sparse_block_size=sparse_block_size, layout_query=layout_query,
        layout_kv=layout_kv, sparse_mode=sparse_mode, attention_mode=MLA_ABSORB, return_softmax_lse=False,
    )[0]
