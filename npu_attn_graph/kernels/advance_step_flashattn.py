"""npu_advance_step_flashattn: vLLM's multi-step decode bookkeeping, in place.

Schema: torch_npu 2.13.0's (namespace npu_attn), written once, in the ``define`` call below;
the drop-in function's docstring shows it.

Updates ``input_tokens``, ``input_positions``, ``seq_lens`` and ``slot_mapping`` in
place for the next decode step and returns nothing. Every tensor is int64.
``block_tables`` is (num_seqs, W): row i lists the physical KV blocks of sequence i,
so the cache slot of position p of sequence i is
``block_tables[i, p // block_size] * block_size + p % block_size``. (The seed's
``(blockTables[i] + stride * i) * blockSize + ...`` formula is pointer shorthand for
exactly this row lookup.)

Non-speculative form (spec_token and accepted_num None), vLLM's
``advance_step_flashattn`` CUDA kernel (csrc/prepare_inputs/advance_step.cu), which
CANN's AdvanceStep kernel reproduces:

* rows i < num_queries (the live sequences), with p = the OLD seq_lens[i]::

      input_tokens[i]    = sampled_token_ids[i, 0]
      input_positions[i] = p
      seq_lens[i]        = p + 1
      slot_mapping[i]    = block_tables[i, p // block_size] * block_size + p % block_size

* rows num_queries <= i < num_seqs are CUDA-graph padding: ``input_tokens[i] = 0``,
  ``input_positions[i] = 0``, ``slot_mapping[i] = -1`` (PAD_SLOT_ID, which the KV-cache
  writers skip); ``seq_lens[i]`` is left untouched. (vLLM's kernel and torch_npu's own
  golden both zero tokens and positions, not only the slot.)
* Shapes: input_tokens, input_positions, seq_lens, slot_mapping are (num_seqs,) (vLLM)
  or (num_seqs, 1) (the torch_npu doc's [.., 1] wording); sampled_token_ids is
  (num_queries, 1); block_tables is (num_seqs, W). num_seqs must be strictly greater
  than num_queries (documented, and checked by CANN's host tiling), so at least one
  padding row always exists.

Speculative form (spec_token and accepted_num given; CANN's AdvanceStepV2 kernel, the
torch_npu test golden and ops-nn ``advance_step_spec.h``). With T = 1 + spec_num tokens
per request, spec_token (num_seqs, spec_num), accepted_num (num_seqs,),
sampled_token_ids (num_seqs, T), num_queries == num_seqs, and input_tokens,
input_positions, seq_lens, slot_mapping each either flat (num_seqs * T,) (CANN's host
check) or (num_seqs, T) (torch_npu doc), row i holding request i's T tokens::

    input_positions[i, j] += accepted_num[i] + 1
    seq_lens[i, j]         = input_positions[i, j] + 1        (the old seq_lens are ignored)
    slot_mapping[i, j]     = block_tables[i, pos // block_size] * block_size + pos % block_size
    input_tokens[i, 0]     = last valid token of sampled_token_ids[i]
    input_tokens[i, 1:]    = spec_token[i]

The "last valid token" of a row is the entry just before its first -1 (rejected-token
placeholder), or the last entry when the row holds no -1; a row that starts with -1 gives
-1 (as the CANN kernel does). Entries below -1 are rejected (the kernel finds the -1 by a
minimum search, which only agrees with "first -1" when no entry is smaller).

Choices where the docs are silent or contradict each other:

* spec_token and accepted_num must be given together (CANN silently falls back to the
  non-speculative path when only one is given; we raise instead).
* The doc example's speculative call with (num_seqs,) positions/seq_lens/slot_mapping
  contradicts both its parameter table and the kernel; only the shapes above are accepted.
* The blanket "values are positive integers" statements are not enforced (accepted_num
  is legitimately 0, padding slots are -1); only what indexing needs is checked by the
  reference kernel: the documented ``block_tables.shape[1] > max(seq_lens) // block_size``
  (all num_seqs rows, values before the update), seq_lens[:num_queries] >= 0, and in the
  speculative form accepted_num >= 0, sampled_token_ids >= -1, and every updated
  position p satisfying 0 <= p < block_tables.shape[1] * block_size. Block ids
  themselves are not range-checked (there is no cache here to check them against).
* num_seqs < 200000000 (CANN host limit) is enforced.

The NPU kernel requires contiguous tensors; the reference kernel accepts any strides.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._dropin import dropin
from ._library import check, define, fail, register_fake, register_npu, register_reference

__all__ = ["npu_advance_step_flashattn"]

OP = "npu_advance_step_flashattn"
MAX_NUM_SEQS = 200_000_000  # CANN AdvanceStep host tiling: num_seqs must be below this
PAD_SLOT_ID = -1
REJECTED_TOKEN = -1

QUALNAME = define(
    OP,
    "(Tensor(a!) input_tokens, Tensor sampled_token_ids, Tensor(b!) input_positions, Tensor(c!) seq_lens, "
    "Tensor(d!) slot_mapping, Tensor block_tables, int num_seqs, int num_queries, int block_size, *, "
    "Tensor? spec_token=None, Tensor? accepted_num=None) -> ()",
)

_UPDATED = ("input_tokens", "input_positions", "seq_lens", "slot_mapping")


class _Plan(NamedTuple):
    tokens_per_request: int  # 1 without speculation, 1 + spec_num with it
    speculative: bool


def _validate(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
              num_seqs, num_queries, block_size, spec_token, accepted_num) -> _Plan:
    """Shape/dtype/attribute rules shared by the fake and reference kernels (no data access)."""
    check(num_seqs > 0, OP, "num_seqs", "must be a positive integer", num_seqs)
    check(num_seqs < MAX_NUM_SEQS, OP, "num_seqs", f"must be < {MAX_NUM_SEQS}", num_seqs)
    check(num_queries > 0, OP, "num_queries", "must be a positive integer", num_queries)
    check(block_size > 0, OP, "block_size", "must be a positive integer", block_size)
    tensors = {"input_tokens": input_tokens, "sampled_token_ids": sampled_token_ids,
               "input_positions": input_positions, "seq_lens": seq_lens, "slot_mapping": slot_mapping,
               "block_tables": block_tables, "spec_token": spec_token, "accepted_num": accepted_num}
    for name, t in tensors.items():
        if t is not None:
            check(t.dtype == torch.int64, OP, f"{name}.dtype", "must be int64", t.dtype)
    if (spec_token is None) != (accepted_num is None):
        missing = "accepted_num" if accepted_num is None else "spec_token"
        fail(OP, missing, "is required when the other speculative argument (spec_token/accepted_num) is given",
             None)
    check(block_tables.dim() == 2, OP, "block_tables.dim()", "must be 2 (num_seqs, max_blocks_per_seq)",
          block_tables.dim())
    check(block_tables.shape[0] == num_seqs, OP, "block_tables.shape[0]", f"must equal num_seqs ({num_seqs})",
          block_tables.shape[0])
    check(block_tables.shape[1] > 0, OP, "block_tables.shape[1]", "must be > 0 (no empty tensors)",
          block_tables.shape[1])

    if spec_token is None:
        check(num_seqs > num_queries, OP, "num_seqs",
              f"must be greater than num_queries ({num_queries}) without speculation", num_seqs)
        check(list(sampled_token_ids.shape) == [num_queries, 1], OP, "sampled_token_ids.shape",
              f"must be (num_queries, 1) = ({num_queries}, 1)", list(sampled_token_ids.shape))
        for name in _UPDATED:
            shape = list(tensors[name].shape)
            check(shape in ([num_seqs], [num_seqs, 1]), OP, f"{name}.shape",
                  f"must be (num_seqs,) = ({num_seqs},) or (num_seqs, 1)", shape)
        return _Plan(1, False)

    check(num_queries == num_seqs, OP, "num_queries", f"must equal num_seqs ({num_seqs}) with speculation",
          num_queries)
    check(spec_token.dim() == 2 and spec_token.shape[0] == num_seqs, OP, "spec_token.shape",
          f"must be (num_seqs, spec_num) with num_seqs = {num_seqs}", list(spec_token.shape))
    spec_num = spec_token.shape[1]
    check(spec_num > 0, OP, "spec_token.shape[1] (spec_num)", "must be > 0 (no empty tensors)", spec_num)
    per_request = 1 + spec_num
    check(list(accepted_num.shape) == [num_seqs], OP, "accepted_num.shape", f"must be (num_seqs,) = ({num_seqs},)",
          list(accepted_num.shape))
    check(list(sampled_token_ids.shape) == [num_seqs, per_request], OP, "sampled_token_ids.shape",
          f"must be (num_seqs, 1 + spec_num) = ({num_seqs}, {per_request})", list(sampled_token_ids.shape))
    for name in _UPDATED:
        shape = list(tensors[name].shape)
        check(shape in ([num_seqs * per_request], [num_seqs, per_request]), OP, f"{name}.shape",
              f"must be (num_seqs * (1 + spec_num),) = ({num_seqs * per_request},) or "
              f"(num_seqs, 1 + spec_num) = ({num_seqs}, {per_request})", shape)
    return _Plan(per_request, True)


def _rows(t: torch.Tensor, num_seqs: int, per_request: int) -> torch.Tensor:
    """A (num_seqs, per_request) view of a flat or 2-D updated tensor; writes reach `t`."""
    return t.view(num_seqs, per_request) if t.dim() == 1 else t


def _check_block_table_width(longest: int, block_tables: torch.Tensor, block_size: int) -> None:
    """Documented: block_tables.shape[1] > max(seq_lens) // block_size (before the update);
    `longest` is that max, read by the caller."""
    need = longest // block_size
    check(block_tables.shape[1] > need, OP, "block_tables.shape[1]",
          f"must be > max(seq_lens) // block_size = {need}", block_tables.shape[1])


def _slots(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position (n, k) of sequence row n of block_tables: the row's block
    holding the position, at offset position % block_size."""
    blocks = block_tables.gather(1, positions.div(block_size, rounding_mode="floor"))
    return blocks * block_size + positions.remainder(block_size)


def _advance(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables, num_seqs,
             num_queries, block_size, plan: _Plan) -> None:
    tokens, positions, lens, slots = (_rows(t, num_seqs, 1)[:, 0] for t in
                                      (input_tokens, input_positions, seq_lens, slot_mapping))
    live, padding = num_queries, num_seqs - num_queries
    old = lens.narrow(0, 0, live)
    # One host read for both value rules (a decode step's state is small; each read is a sync on a device).
    longest, shortest_live = torch.stack((lens.max(), old.min())).tolist()
    _check_block_table_width(longest, block_tables, block_size)
    if shortest_live < 0:
        fail(OP, "seq_lens", f"entries of the first num_queries ({live}) rows must be >= 0", old.tolist())
    slots.narrow(0, 0, live).copy_(_slots(block_tables.narrow(0, 0, live), old.unsqueeze(1), block_size).squeeze(1))
    tokens.narrow(0, 0, live).copy_(sampled_token_ids[:, 0])
    positions.narrow(0, 0, live).copy_(old)
    old.add_(1)  # seq_lens of the live rows, after their positions took the old values
    # CUDA-graph padding rows: vLLM zeroes their token and position and sets PAD_SLOT_ID.
    tokens.narrow(0, live, padding).zero_()
    positions.narrow(0, live, padding).zero_()
    slots.narrow(0, live, padding).fill_(PAD_SLOT_ID)


def _last_valid_tokens(sampled: torch.Tensor) -> torch.Tensor:
    """Per row: the entry before the first -1 (the last entry if none); -1 if the row starts with -1."""
    per_request = sampled.shape[1]
    rejected = sampled == REJECTED_TOKEN
    columns = torch.arange(per_request, device=sampled.device).expand_as(sampled)
    first_rejected = torch.where(rejected, columns, torch.full_like(columns, per_request)).amin(dim=1)
    picked = sampled.gather(1, (first_rejected - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(first_rejected == 0, torch.full_like(picked, REJECTED_TOKEN), picked)


def _advance_speculative(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
                         num_seqs, block_size, spec_token, accepted_num, plan: _Plan) -> None:
    _check_block_table_width(int(seq_lens.max()), block_tables, block_size)
    if bool((accepted_num < 0).any()):
        fail(OP, "accepted_num", "entries must be >= 0", accepted_num.tolist())
    if bool((sampled_token_ids < REJECTED_TOKEN).any()):
        fail(OP, "sampled_token_ids", "entries must be token ids >= 0 or the rejected-token placeholder -1",
             sampled_token_ids.tolist())
    k = plan.tokens_per_request
    tokens, positions, lens, slots = (_rows(t, num_seqs, k) for t in
                                      (input_tokens, input_positions, seq_lens, slot_mapping))
    new_positions = positions + accepted_num.unsqueeze(1) + 1
    limit = block_tables.shape[1] * block_size
    bad = (new_positions < 0) | (new_positions >= limit)
    if bool(bad.any()):
        fail(OP, "input_positions", "after the update must satisfy 0 <= position < block_tables.shape[1] * "
             f"block_size = {limit}", new_positions.tolist())
    last_tokens = _last_valid_tokens(sampled_token_ids)
    new_slots = _slots(block_tables, new_positions, block_size)
    positions.copy_(new_positions)
    lens.copy_(new_positions + 1)
    slots.copy_(new_slots)
    tokens[:, 0] = last_tokens
    tokens[:, 1:] = spec_token


@register_fake(QUALNAME)
def _fake(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables, num_seqs,
          num_queries, block_size, *, spec_token, accepted_num):
    _validate(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables, num_seqs,
              num_queries, block_size, spec_token, accepted_num)
    return None


def _reference(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables, num_seqs,
               num_queries, block_size, *, spec_token, accepted_num):
    plan = _validate(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
                     num_seqs, num_queries, block_size, spec_token, accepted_num)
    if plan.speculative:
        _advance_speculative(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
                             num_seqs, block_size, spec_token, accepted_num, plan)
    else:
        _advance(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables, num_seqs,
                 num_queries, block_size, plan)


register_reference(QUALNAME, _reference)
register_npu(QUALNAME)


npu_advance_step_flashattn = dropin(QUALNAME, __name__, """\
Advances vLLM's decode inputs by one step, in place (returns None). Without speculation,
for i < num_queries with p = old seq_lens[i]: input_tokens[i] = sampled_token_ids[i, 0],
input_positions[i] = p, seq_lens[i] = p + 1, slot_mapping[i] =
block_tables[i, p // block_size] * block_size + p % block_size; padding rows
num_queries <= i < num_seqs get token 0, position 0 and slot -1. With spec_token and
accepted_num, every token j of request i moves to position input_positions[i, j] +
accepted_num[i] + 1 (seq_lens = position + 1, slot from block_tables), input_tokens[i, 0]
becomes the last non-rejected (-1) sampled token and input_tokens[i, 1:] = spec_token[i].
See the module docstring for shapes, constraints and the choices made.""")
