"""GE converter for npu_attn::npu_advance_step_flashattn -> GE ``AdvanceStep`` (custom-op builder).

TorchAir has no generated builder for AdvanceStep, so the node is built with
``torchair.ge.custom_op``. IR (CANN ops-nn, optim/advance_step:
op_graph/advance_step_proto.h and op_host/advance_step_def.cpp; torch_npu's
call in Ascend/op-plugin op_plugin/ops/opapi/AdvanceStepKernelNpuOpApi.cpp):
inputs input_tokens, sampled_token_ids, input_positions, seq_lens,
slot_mapping, block_tables, spec_token (optional), accepted_num (optional);
outputs input_tokens, input_positions, seq_lens, slot_mapping, which share
their inputs' names: GE's mark of ref (in-place) outputs; attrs num_seqs,
num_queries, block_size (Int).
"""

from __future__ import annotations

import torch

from ._ge import Tensor, attr, custom_op, dont_prune_me, register_fx_node_ge_converter, register_ir

OP_TYPE = "AdvanceStep"
INPUTS = [("input_tokens", "required"), ("sampled_token_ids", "required"), ("input_positions", "required"),
          ("seq_lens", "required"), ("slot_mapping", "required"), ("block_tables", "required"),
          ("spec_token", "optional"), ("accepted_num", "optional")]
OUTPUTS = ["input_tokens", "input_positions", "seq_lens", "slot_mapping"]
ATTRS = [("num_seqs", "Int"), ("num_queries", "Int"), ("block_size", "Int")]
register_ir(OP_TYPE, INPUTS, [(name, "required") for name in OUTPUTS], ATTRS)


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_advance_step_flashattn.default)
def convert_advance_step_flashattn(
    input_tokens: Tensor, sampled_token_ids: Tensor, input_positions: Tensor, seq_lens: Tensor,
    slot_mapping: Tensor, block_tables: Tensor, num_seqs: int, num_queries: int, block_size: int, *,
    spec_token: Tensor | None = None, accepted_num: Tensor | None = None, meta_outputs=None,
) -> None:
    """npu_attn::npu_advance_step_flashattn(Tensor(a!) input_tokens, Tensor sampled_token_ids,
    Tensor(b!) input_positions, Tensor(c!) seq_lens, Tensor(d!) slot_mapping, Tensor block_tables,
    int num_seqs, int num_queries, int block_size, *, Tensor? spec_token=None, Tensor? accepted_num=None) -> ()

    GE op type: AdvanceStep, updating its four ref inputs in place. The
    speculative inputs (spec_token, accepted_num) are the op's version-2 inputs;
    CANN's own GE example notes that older CANN releases reject them in graph mode.
    After AOT (auto_functionalized_v2) TorchAir feeds the op TensorMove copies of
    the four tensors and assigns the results back: TorchAir removes such copies
    only for the ref op types in its own table, which lacks AdvanceStep, so four
    copies of (num_seqs,) int64 vectors remain; small, and left as TorchAir makes them.
    """
    inputs = dict(input_tokens=input_tokens, sampled_token_ids=sampled_token_ids, input_positions=input_positions,
                  seq_lens=seq_lens, slot_mapping=slot_mapping, block_tables=block_tables, spec_token=spec_token,
                  accepted_num=accepted_num)
    outputs = custom_op(OP_TYPE, inputs=inputs, outputs=OUTPUTS,
                        attrs={"num_seqs": attr.Int(num_seqs), "num_queries": attr.Int(num_queries),
                               "block_size": attr.Int(block_size)})
    dont_prune_me(outputs[0])
