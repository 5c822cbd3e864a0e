"""``npu_scatter_pa_kv_cache`` (in place) and ``npu_scatter_pa_kv_cache_functional``.

Schemas: torch_npu 2.13.0's (namespace ``npu_attn``), each written once, in its ``define``
call below; the drop-in functions' docstrings show them.

Writes each new token's key/value into a paged KV cache. A slot is
``block_id * block_size + offset_in_block``; num_slots = num_blocks * block_size.

Plain modes (no compress_lens / compress_seq_offsets / seq_lens), key (T, N, Dk),
value (T, N, Dv), slot_mapping (T,):

* ``cache_mode="Norm"`` or ``None`` (ND layout): caches (num_blocks, block_size, N, Dk|Dv);
  ``key_cache.view(-1, N, Dk)[slot_mapping[t]] = key[t]`` (value alike).
* ``cache_mode="PA_NZ"`` (FRACTAL_NZ layout, the default): c0 = 32 // key.element_size()
  (16 for fp16/bf16, 32 for int8, 8 for fp32); Dk and Dv are multiples of c0; key_cache is
  (num_blocks, N*Dk//c0, block_size, c0), value_cache (num_blocks, N*Dv//c0, block_size, c0);
  token t goes to block b = slot // block_size, offset o = slot % block_size:
  ``key_cache[b, :, o, :] = key[t].reshape(N*Dk//c0, c0)``.
* Negative slots are skipped (as the NPU kernels do); slots >= num_slots raise
  (reference kernel). Duplicate slots give an unspecified result.

Compressed modes (any of compress_lens / compress_seq_offsets / seq_lens given). These
follow the CANN kernel source (ops-transformer ``scatter_pa_kv_cache_compress_alibi.h`` /
``scatter_pa_kv_cache_compress_rope.h`` for the 3-D packed key of Atlas A2/A3, and the
arch35 ``*_alibi_fully_load.h`` / ``*_rope_fully_load.h`` for the 4-D key), not a
torch_npu doc, and are version dependent. ``cache_mode`` is ignored there: the caches are
ND (num_blocks, block_size, 1, Dk|Dv), viewed as (num_slots, D). One slot run per
(batch, head) task i = b * N + h:

* key is either packed 3-D (T, N, Dk), the tokens of all batches concatenated with batch
  b at rows [cumsum(seq_lens)[b] - seq_lens[b], cumsum(seq_lens)[b]), or 4-D
  (B, S, N, Dk) with batch b's valid tokens at key[b, :seq_lens[b]]. Value alike.
* seq_lens (B,); slot_mapping, compress_lens, compress_seq_offsets (B*N,) or (B, N).
* "Alibi" (compress_lens + seq_lens, no compress_seq_offsets): w = compress_lens[i],
  L = seq_lens[b]; the last w tokens of batch b, head h go to slots slot_mapping[i] + k:
  ``cache[slot_mapping[i] + k] = key_b[L - w + k, h]`` for k in [0, w).
* "Rope" (compress_seq_offsets also given; fp16/bf16 only): off = compress_seq_offsets[i],
  w = compress_lens[i]; off == -1 or w == 0 means "no compression" (off := L, w := 0), and
  off == L also means w := 0. Part A: tokens [0, off) -> slots slot[i] + [0, off); part B
  (w > 0): the mean of tokens [off, off + w), summed in fp32, divided by w and rounded to
  nearest-even into the cache dtype -> slot slot[i] + off; part C: tokens [off + w, L) ->
  slots slot[i] + off + 1 + [0, L - off - w).

Choices made in the compressed modes (where the kernels and docs are silent or unsafe):
compress_lens and seq_lens are both required whenever any compressed argument is given;
Dk and Dv may differ (each head dim is used for its own tensor; the A2 kernels assume
Dk == Dv); the reference kernel raises, instead of writing out of bounds or silently
skipping, when seq_lens, compress_lens, compress_seq_offsets or a task's slot run
(slot_mapping[i] >= 0 and slot_mapping[i] + tokens_written <= num_slots) is out of range;
the doc rule "reduceSum(seq_lens[i] - compress_lens[i]) <= num_blocks * block_size" is
subsumed by the per-task slot-run check.

The NPU kernel also requires contiguous inputs; the reference kernels accept any strides.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._dropin import dropin
from ._library import check, define, fail, once_per_contents, register_fake, register_npu, register_reference

__all__ = ["npu_scatter_pa_kv_cache", "npu_scatter_pa_kv_cache_functional"]

# A2/A3 take fp16, bf16, int8; newer kernels more. float64 is for CPU tests.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.uint8, torch.int16, torch.int32,
           torch.float64)
_ROPE_DTYPES = (torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_CACHE_MODES = ("Norm", "PA_NZ")


class _Plan(NamedTuple):
    mode: str  # "Norm", "PA_NZ", "Alibi" or "Rope"
    block_size: int
    num_slots: int
    c0: int = 0  # PA_NZ only
    batch: int = 0  # compressed modes only
    heads: int = 0


def _validate(
    op: str,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    compress_lens: Optional[torch.Tensor],
    compress_seq_offsets: Optional[torch.Tensor],
    seq_lens: Optional[torch.Tensor],
    cache_mode: Optional[str],
) -> _Plan:
    """Shape/dtype rules shared by the fake and reference kernels (no data access)."""
    check(cache_mode is None or cache_mode in _CACHE_MODES, op, "cache_mode",
          f"must be None or one of {list(_CACHE_MODES)}", repr(cache_mode))
    check(key.dtype in _DTYPES, op, "key.dtype", f"must be one of {list(_DTYPES)}", key.dtype)
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        check(t.dtype == key.dtype, op, f"{name}.dtype", f"must equal key.dtype ({key.dtype})", t.dtype)
    check(slot_mapping.dtype in _INDEX_DTYPES, op, "slot_mapping.dtype", "must be int32 or int64",
          slot_mapping.dtype)
    optional = (("compress_lens", compress_lens), ("compress_seq_offsets", compress_seq_offsets),
                ("seq_lens", seq_lens))
    for name, t in optional:
        if t is not None:
            check(t.dtype == slot_mapping.dtype, op, f"{name}.dtype",
                  f"must equal slot_mapping.dtype ({slot_mapping.dtype})", t.dtype)
    check(key_cache.dim() == 4, op, "key_cache.dim()", "must be 4", key_cache.dim())
    check(value_cache.dim() == 4, op, "value_cache.dim()", "must be 4", value_cache.dim())

    if all(t is None for _, t in optional):
        return _validate_plain(op, key, value, key_cache, value_cache, slot_mapping, cache_mode or "Norm")
    return _validate_compressed(op, key, value, key_cache, value_cache, slot_mapping, compress_lens,
                                compress_seq_offsets, seq_lens)


def _validate_plain(op, key, value, key_cache, value_cache, slot_mapping, mode) -> _Plan:
    check(key.dim() == 3, op, "key.dim()",
          "must be 3 (T, N, Dk) without compress_lens/compress_seq_offsets/seq_lens", key.dim())
    check(value.dim() == 3, op, "value.dim()", "must be 3 (T, N, Dv)", value.dim())
    check(list(value.shape[:2]) == list(key.shape[:2]), op, "value.shape[:2]",
          f"must equal key.shape[:2] ({list(key.shape[:2])})", list(value.shape[:2]))
    tokens, heads, dk = key.shape
    dv = value.shape[2]
    check(slot_mapping.dim() == 1 and slot_mapping.shape[0] == tokens, op, "slot_mapping.shape",
          f"must be (T,) = ({tokens},)", list(slot_mapping.shape))
    if mode == "Norm":
        check(list(key_cache.shape[2:]) == [heads, dk], op, "key_cache.shape",
              f"must be (num_blocks, block_size, N, Dk) with N, Dk = {heads}, {dk} for cache_mode 'Norm'",
              list(key_cache.shape))
        check(list(value_cache.shape[2:]) == [heads, dv], op, "value_cache.shape",
              f"must be (num_blocks, block_size, N, Dv) with N, Dv = {heads}, {dv} for cache_mode 'Norm'",
              list(value_cache.shape))
        check(list(value_cache.shape[:2]) == list(key_cache.shape[:2]), op, "value_cache.shape[:2]",
              f"must equal key_cache.shape[:2] (num_blocks, block_size) = {list(key_cache.shape[:2])}",
              list(value_cache.shape[:2]))
        block_size = key_cache.shape[1]
        return _Plan("Norm", block_size, key_cache.shape[0] * block_size)

    c0 = 32 // key.element_size()
    check(dk % c0 == 0, op, "key.shape[2] (Dk)",
          f"must be a multiple of c0 = 32 // element_size = {c0} for cache_mode 'PA_NZ'", dk)
    check(dv % c0 == 0, op, "value.shape[2] (Dv)",
          f"must be a multiple of c0 = 32 // element_size = {c0} for cache_mode 'PA_NZ'", dv)
    check(key_cache.shape[1] == heads * dk // c0 and key_cache.shape[3] == c0, op, "key_cache.shape",
          f"must be (num_blocks, N*Dk//c0, block_size, c0) with N*Dk//c0 = {heads * dk // c0}, c0 = {c0} "
          "for cache_mode 'PA_NZ'", list(key_cache.shape))
    check(value_cache.shape[1] == heads * dv // c0 and value_cache.shape[3] == c0, op, "value_cache.shape",
          f"must be (num_blocks, N*Dv//c0, block_size, c0) with N*Dv//c0 = {heads * dv // c0}, c0 = {c0} "
          "for cache_mode 'PA_NZ'", list(value_cache.shape))
    check(value_cache.shape[0] == key_cache.shape[0] and value_cache.shape[2] == key_cache.shape[2], op,
          "value_cache.shape", f"must have key_cache's num_blocks (dim 0) {key_cache.shape[0]} and block_size "
          f"(dim 2) {key_cache.shape[2]}", list(value_cache.shape))
    block_size = key_cache.shape[2]
    return _Plan("PA_NZ", block_size, key_cache.shape[0] * block_size, c0=c0)


def _validate_compressed(op, key, value, key_cache, value_cache, slot_mapping, compress_lens,
                         compress_seq_offsets, seq_lens) -> _Plan:
    check(compress_lens is not None, op, "compress_lens",
          "is required when compress_seq_offsets or seq_lens is given", None)
    check(seq_lens is not None, op, "seq_lens",
          "is required when compress_lens or compress_seq_offsets is given", None)
    check(key.dim() in (3, 4), op, "key.dim()",
          "must be 3 (packed T, N, Dk) or 4 (B, S, N, Dk) with compress_lens/seq_lens", key.dim())
    check(value.dim() == key.dim(), op, "value.dim()", f"must equal key.dim() ({key.dim()})", value.dim())
    lead = key.dim() - 1
    check(list(value.shape[:lead]) == list(key.shape[:lead]), op, f"value.shape[:{lead}]",
          f"must equal key.shape[:{lead}] ({list(key.shape[:lead])})", list(value.shape[:lead]))
    heads, dk, dv = key.shape[-2], key.shape[-1], value.shape[-1]
    check(seq_lens.dim() == 1, op, "seq_lens.dim()", "must be 1 (B,)", seq_lens.dim())
    batch = seq_lens.shape[0]
    if key.dim() == 4:
        check(key.shape[0] == batch, op, "seq_lens.shape[0]", f"must equal key.shape[0] (B = {key.shape[0]})",
              batch)
    allowed = ([batch * heads], [batch, heads])
    for name, t in (("slot_mapping", slot_mapping), ("compress_lens", compress_lens),
                    ("compress_seq_offsets", compress_seq_offsets)):
        if t is not None:
            check(list(t.shape) in allowed, op, f"{name}.shape",
                  f"must be (B*N,) = ({batch * heads},) or (B, N) = ({batch}, {heads}) in the compressed modes",
                  list(t.shape))
    check(key_cache.shape[2] == 1 and key_cache.shape[3] == dk, op, "key_cache.shape",
          f"must be (num_blocks, block_size, 1, Dk) with Dk = {dk} in the compressed modes",
          list(key_cache.shape))
    check(value_cache.shape[2] == 1 and value_cache.shape[3] == dv, op, "value_cache.shape",
          f"must be (num_blocks, block_size, 1, Dv) with Dv = {dv} in the compressed modes",
          list(value_cache.shape))
    check(list(value_cache.shape[:2]) == list(key_cache.shape[:2]), op, "value_cache.shape[:2]",
          f"must equal key_cache.shape[:2] (num_blocks, block_size) = {list(key_cache.shape[:2])}",
          list(value_cache.shape[:2]))
    mode = "Alibi"
    if compress_seq_offsets is not None:
        mode = "Rope"
        check(key.dtype in _ROPE_DTYPES, op, "key.dtype",
              "must be float16 or bfloat16 with compress_seq_offsets (Rope compression)", key.dtype)
    block_size = key_cache.shape[1]
    return _Plan(mode, block_size, key_cache.shape[0] * block_size, batch=batch, heads=heads)


# ---------------------------------------------------------------------------- reference kernel


def _written_slots(op: str, plan: _Plan, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tokens, their slots) when some slots are negative (skipped), None when every token
    is written; raises for a slot past the cache."""
    slots = slot_mapping.to(torch.int64)
    low, high = (int(x) for x in torch.aminmax(slots))  # one host read: the range rule and the skip
    if high >= plan.num_slots:  # a value rule: the fake kernel cannot see slot_mapping's contents
        t = int((slots >= plan.num_slots).nonzero()[0, 0])
        fail(op, "slot_mapping", f"entries must be slots in [0, num_blocks * block_size) = [0, {plan.num_slots}) "
             "(negative slots are skipped)", f"slot_mapping[{t}] = {int(slots[t])}")
    if low >= 0:
        return None
    tokens = torch.nonzero(slots >= 0).squeeze(1)
    return tokens, slots[tokens]


def _write_plain(op: str, plan: _Plan, key, value, key_cache, value_cache, slot_mapping) -> None:
    if slot_mapping.numel() == 0:
        return
    # Every layer of a step writes through the same slot mapping: read it once.
    skipping = once_per_contents(slot_mapping, "scatter_pa_slots", (op, plan.num_slots),
                                 lambda: _written_slots(op, plan, slot_mapping))
    if skipping is None:
        slots = slot_mapping.to(torch.int64)
    else:
        tokens, slots = skipping
        key, value = key.index_select(0, tokens), value.index_select(0, tokens)
    if plan.mode == "Norm":
        for cache, new in ((key_cache, key), (value_cache, value)):
            if cache.is_contiguous():  # one row copy per token (slot = block * block_size + offset)
                cache.view(plan.num_slots, *cache.shape[2:]).index_copy_(0, slots, new)  # (dtypes checked equal)
            else:
                cache[slots // plan.block_size, slots % plan.block_size] = new
        return
    blocks, offsets = slots // plan.block_size, slots % plan.block_size
    # PA_NZ: (num_blocks, N*D//c0, block_size, c0) seen as (num_blocks, block_size, N*D//c0, c0).
    key_cache.transpose(1, 2)[blocks, offsets] = key.reshape(len(slots), -1, plan.c0)
    value_cache.transpose(1, 2)[blocks, offsets] = value.reshape(len(slots), -1, plan.c0)


def _expand(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(task id, position k) of every element of the runs of the given lengths."""
    tasks = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    k = torch.arange(len(tasks), device=lengths.device) - starts[tasks]
    return tasks, k


def _write_compressed(op: str, plan: _Plan, key, value, key_cache, value_cache, slot_mapping,
                      compress_lens, compress_seq_offsets, seq_lens) -> None:
    device, heads, batch = key.device, plan.heads, plan.batch
    lens = seq_lens.to(torch.int64)
    if bool((lens < 0).any()):
        fail(op, "seq_lens", "must be >= 0", lens.tolist())
    if key.dim() == 3:
        total = key.shape[0]
        if int(lens.sum()) > total:
            fail(op, "seq_lens", f"must sum to at most key.shape[0] (packed tokens, {total})", lens.tolist())
        base = torch.cumsum(lens, 0) - lens
    else:
        seq = key.shape[1]
        if bool((lens > seq).any()):
            fail(op, "seq_lens", f"must be <= key.shape[1] (S = {seq})", lens.tolist())
        base = torch.arange(batch, device=device) * seq
    key_rows = key.reshape(-1, heads, key.shape[-1])
    value_rows = value.reshape(-1, heads, value.shape[-1])

    task = torch.arange(batch * heads, device=device)
    head = task % heads
    length = lens[task // heads]
    start = base[task // heads]
    slot = slot_mapping.reshape(-1).to(torch.int64)
    wins = compress_lens.reshape(-1).to(torch.int64)
    bad = (wins < 0) | (wins > length)
    if bool(bad.any()):
        fail(op, "compress_lens", "must satisfy 0 <= compress_lens[b*N+h] <= seq_lens[b]", wins.tolist())

    # Runs (source row, destination slot, length) to copy verbatim; plus Rope means.
    runs = []
    if plan.mode == "Alibi":
        runs.append((start + length - wins, slot, wins))
        written = wins
        mean_tasks = None
    else:
        offs = compress_seq_offsets.reshape(-1).to(torch.int64)
        plain = (offs == -1) | (wins == 0)
        bad = ~plain & ((offs < 0) | (offs > length) | ((offs < length) & (offs + wins > length)))
        if bool(bad.any()):
            fail(op, "compress_seq_offsets",
                 "must be -1 or satisfy 0 <= offset <= seq_lens[b] and (offset == seq_lens[b] or "
                 "offset + compress_lens <= seq_lens[b])", offs.tolist())
        offs = torch.where(plain, length, offs)
        wins = torch.where(offs == length, torch.zeros_like(wins), wins)
        compressed = wins > 0
        runs.append((start, slot, offs))  # part A
        runs.append((start + offs + wins, slot + offs + 1, length - offs - wins))  # part C (empty if w == 0)
        written = length - wins + compressed.to(torch.int64)
        mean_tasks = torch.nonzero(compressed).squeeze(1)

    bad = (written > 0) & ((slot < 0) | (slot + written > plan.num_slots))
    if bool(bad.any()):
        fail(op, "slot_mapping",
             f"must start a run of written slots inside [0, num_blocks * block_size = {plan.num_slots}) "
             "in the compressed modes", slot.tolist())

    def put(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        cache[slots // plan.block_size, slots % plan.block_size, 0] = rows

    for src, dst, count in runs:
        tasks, k = _expand(count)
        put(key_cache, dst[tasks] + k, key_rows[src[tasks] + k, head[tasks]])
        put(value_cache, dst[tasks] + k, value_rows[src[tasks] + k, head[tasks]])

    if mean_tasks is not None and len(mean_tasks):
        w = wins[mean_tasks]
        tasks, k = _expand(w)
        src = (start + offs)[mean_tasks][tasks] + k
        h = head[mean_tasks][tasks]
        dst = (slot + offs)[mean_tasks]
        for rows, cache in ((key_rows, key_cache), (value_rows, value_cache)):
            sums = torch.zeros(len(mean_tasks), rows.shape[-1], dtype=torch.float32, device=device)
            sums.index_add_(0, tasks, rows[src, h].to(torch.float32))
            put(cache, dst, (sums / w[:, None].to(torch.float32)).to(cache.dtype))


def _write(op: str, key, value, key_cache, value_cache, slot_mapping, compress_lens, compress_seq_offsets,
           seq_lens, cache_mode) -> None:
    plan = _validate(op, key, value, key_cache, value_cache, slot_mapping, compress_lens, compress_seq_offsets,
                     seq_lens, cache_mode)
    if plan.mode in _CACHE_MODES:
        _write_plain(op, plan, key, value, key_cache, value_cache, slot_mapping)
    else:
        _write_compressed(op, plan, key, value, key_cache, value_cache, slot_mapping, compress_lens,
                          compress_seq_offsets, seq_lens)


# ---------------------------------------------------------------------------- in place

_KWARGS = ("*, Tensor? compress_lens=None, Tensor? compress_seq_offsets=None, Tensor? seq_lens=None, "
           "str? cache_mode='PA_NZ')")

NPU_SCATTER_PA_KV_CACHE = define(
    "npu_scatter_pa_kv_cache",
    "(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping, "
    + _KWARGS + " -> ()",
)


@register_fake(NPU_SCATTER_PA_KV_CACHE)
def _fake(key, value, key_cache, value_cache, slot_mapping, *, compress_lens, compress_seq_offsets,
          seq_lens, cache_mode):
    _validate("npu_scatter_pa_kv_cache", key, value, key_cache, value_cache, slot_mapping, compress_lens,
              compress_seq_offsets, seq_lens, cache_mode)
    return None


def _ref(key, value, key_cache, value_cache, slot_mapping, *, compress_lens, compress_seq_offsets,
         seq_lens, cache_mode):
    _write("npu_scatter_pa_kv_cache", key, value, key_cache, value_cache, slot_mapping, compress_lens,
           compress_seq_offsets, seq_lens, cache_mode)


register_reference(NPU_SCATTER_PA_KV_CACHE, _ref)
register_npu(NPU_SCATTER_PA_KV_CACHE)


npu_scatter_pa_kv_cache = dropin(NPU_SCATTER_PA_KV_CACHE, __name__, """\
Writes key/value tokens into ``key_cache`` / ``value_cache`` in place and returns None.
cache_mode "Norm"/None: ``key_cache.view(-1, N, Dk)[slot_mapping[t]] = key[t]``;
"PA_NZ": ``key_cache[slot // bs, :, slot % bs, :] = key[t].reshape(N*Dk//c0, c0)`` with
c0 = 32 // element_size. Negative slots are skipped. With compress_lens/seq_lens
(and compress_seq_offsets) the Alibi (and Rope) compression rules of the CANN kernels
apply; see the module docstring for the full rules and the choices made.""")


# ---------------------------------------------------------------------------- functional

NPU_SCATTER_PA_KV_CACHE_FUNCTIONAL = define(
    "npu_scatter_pa_kv_cache_functional",
    "(Tensor key, Tensor value, Tensor key_cache, Tensor value_cache, Tensor slot_mapping, "
    + _KWARGS + " -> (Tensor, Tensor)",
)


@register_fake(NPU_SCATTER_PA_KV_CACHE_FUNCTIONAL)
def _fake_functional(key, value, key_cache, value_cache, slot_mapping, *, compress_lens,
                     compress_seq_offsets, seq_lens, cache_mode):
    _validate("npu_scatter_pa_kv_cache_functional", key, value, key_cache, value_cache, slot_mapping,
              compress_lens, compress_seq_offsets, seq_lens, cache_mode)
    return torch.empty_like(key_cache), torch.empty_like(value_cache)


def _ref_functional(key, value, key_cache, value_cache, slot_mapping, *, compress_lens,
                    compress_seq_offsets, seq_lens, cache_mode):
    key_out, value_out = key_cache.clone(), value_cache.clone()
    _write("npu_scatter_pa_kv_cache_functional", key, value, key_out, value_out, slot_mapping, compress_lens,
           compress_seq_offsets, seq_lens, cache_mode)
    return key_out, value_out


register_reference(NPU_SCATTER_PA_KV_CACHE_FUNCTIONAL, _ref_functional)
register_npu(NPU_SCATTER_PA_KV_CACHE_FUNCTIONAL)


npu_scatter_pa_kv_cache_functional = dropin(NPU_SCATTER_PA_KV_CACHE_FUNCTIONAL, __name__, """\
Same rules as :func:`npu_scatter_pa_kv_cache`, but returns updated copies
(key_cache', value_cache') and leaves every input untouched.""")
