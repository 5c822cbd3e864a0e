"""vLLM's decode-step bookkeeping, in plain PyTorch.

``advance_step`` is vLLM's ``advance_step_flashattn`` (the Python form of
csrc/prepare_inputs/advance_step.cu) written as a function of tensors, with exactly
the semantics of ``npu_attn.npu_advance_step_flashattn`` (non-speculative form; see
npu_attn_graph/kernels/advance_step_flashattn.py), so that a compiler rule can replace
it with that op. It updates in place, for the live rows i < num_queries with
p = the OLD seq_lens[i]::

    input_tokens[i]    = sampled_token_ids[i, 0]
    input_positions[i] = p
    seq_lens[i]        = p + 1
    slot_mapping[i]    = block_tables[i, p // block_size] * block_size + p % block_size

and for the padding rows num_queries <= i < num_seqs: token 0, position 0, slot -1
(PAD_SLOT_ID), seq_lens untouched. The op requires num_seqs > num_queries, so the engine
always leaves one padding row. As in vLLM, it runs on its own between the sampler and
the next decode forward (vLLM launches it outside the captured graph); the engine
compiles it as a graph of its own.
"""

from __future__ import annotations

import torch

PAD_SLOT_ID = -1


def advance_step(input_tokens: torch.Tensor, sampled_token_ids: torch.Tensor, input_positions: torch.Tensor,
                 seq_lens: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor, num_seqs: int,
                 num_queries: int, block_size: int) -> None:
    nq = num_queries
    pos = seq_lens[:nq]  # the old lengths: read before seq_lens is advanced below
    input_positions[:nq] = pos
    slot_mapping[:nq] = block_tables[:nq].gather(1, (pos // block_size)[:, None])[:, 0] * block_size + \
        pos % block_size
    input_tokens[:nq] = sampled_token_ids[:, 0]
    seq_lens[:nq] += 1
    input_tokens[nq:num_seqs] = 0
    input_positions[nq:num_seqs] = 0
    slot_mapping[nq:num_seqs] = PAD_SLOT_ID
