"""vLLM's torch-only advance_step -> npu_advance_step_flashattn (passes/advance_step_to_fused.py).

Each spelling runs eagerly and compiled with the npu_attn backend on the same state for several
steps; the four state tensors must be exactly equal after every step, the compiled graph must
hold the fused op and nothing else of the bookkeeping, and the report must list the site.
Spellings that are not the op's semantics must stay as written (and still be equal).
"""

from __future__ import annotations

import pytest
import torch

import npu_attn_graph
from npu_attn_graph import Report

NS, NQ, BS, W = 5, 3, 4, 4


def vllm_form(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables):
    """vLLM's torch-only advance_step (the padding rows after num_queries)."""
    input_tokens[:NQ] = sampled_token_ids[:NQ, 0]
    next_seq_len = seq_lens[:NQ] + 1
    next_input_pos = next_seq_len - 1
    input_positions[:NQ] = next_input_pos
    seq_lens[:NQ] = next_seq_len
    block_index = next_input_pos // BS
    block_offset = next_input_pos % BS
    slot_mapping[:NQ] = block_tables[:NQ].gather(1, block_index[:, None]).squeeze(1) * BS + block_offset
    input_tokens[NQ:] = 0
    input_positions[NQ:] = 0
    slot_mapping[NQ:] = -1


def indexed_form(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables):
    """The same with an in-place increment, a row index into the block table and div(floor)."""
    positions = seq_lens[:NQ].clone()
    seq_lens[:NQ] += 1
    input_positions[:NQ].copy_(positions)
    input_tokens[:NQ].copy_(sampled_token_ids.squeeze(-1))
    blocks = block_tables[torch.arange(NQ), torch.div(positions, BS, rounding_mode="floor")]
    slot_mapping[:NQ] = blocks * BS + positions % BS
    slot_mapping[NQ:] = -1
    input_positions[NQ:].zero_()
    input_tokens[NQ:].fill_(0)


def offset_off_by_one(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables):
    """Not the op: the slot takes the NEW length's offset."""
    input_tokens[:NQ] = sampled_token_ids[:NQ, 0]
    positions = seq_lens[:NQ].clone()
    seq_lens[:NQ] += 1
    input_positions[:NQ] = positions
    slot_mapping[:NQ] = block_tables[:NQ].gather(1, (positions // BS)[:, None])[:, 0] * BS + seq_lens[:NQ] % BS
    input_tokens[NQ:] = 0
    input_positions[NQ:] = 0
    slot_mapping[NQ:] = -1


def padding_slot_zero(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables):
    """Not the op: padding rows get slot 0, not -1 (the op's writers would write there)."""
    vllm_form(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables)
    slot_mapping[NQ:] = 0


def _state(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, 9, (NS,), generator=g)
    return [torch.zeros(NS, dtype=torch.long), torch.randint(0, 100, (NQ, 1), generator=g),
            torch.zeros(NS, dtype=torch.long), seq_lens, torch.zeros(NS, dtype=torch.long),
            torch.randperm(NS * W, generator=g).reshape(NS, W)]


def _run(fn, target: str = "torch", steps: int = 3):
    from fuzz.oracle import ge_target_backend

    torch._dynamo.reset()
    eager, compiled = _state(), _state()
    report = Report()
    backend = ge_target_backend(report) if target == "ge" else "npu_attn"
    options = None if target == "ge" else {"report": report, "executor": "eager"}
    step = torch.compile(fn, backend=backend, fullgraph=True, options=options)
    for i in range(steps):
        fn(*eager)
        step(*compiled)
        for name, e, c in zip(("input_tokens", "sampled", "input_positions", "seq_lens", "slot_mapping",
                               "block_tables"), eager, compiled):
            assert torch.equal(c, e), f"step {i}: {name}: compiled {c.tolist()} != eager {e.tolist()}"
        sampled = torch.randint(0, 100, (NQ, 1), generator=torch.Generator().manual_seed(i + 10))
        eager[1].copy_(sampled)
        compiled[1].copy_(sampled)
    return report


@pytest.mark.parametrize("target", ["torch", "ge"])
@pytest.mark.parametrize("fn", [vllm_form, indexed_form], ids=["vllm", "indexed"])
def test_the_step_becomes_the_fused_op(fn, target):
    report = _run(fn, target)
    (site,) = [s for s in report.sites if s.kind == "advance_step"]
    assert site.fused_op == "npu_advance_step_flashattn" and site.reason is None, report.table()
    assert site.layout == f"num_seqs={NS}, num_queries={NQ}, block_size={BS}"
    if target == "torch":
        code = report.code_after[0]
        assert code.count("torch.ops.npu_attn.npu_advance_step_flashattn.default(") == 1
        for leftover in ("slice_scatter", "gather", "copy_", "floor_divide", "remainder"):
            assert leftover not in code, code


@pytest.mark.parametrize("fn", [offset_off_by_one, padding_slot_zero])
def test_other_bookkeeping_stays_as_written(fn):
    report = _run(fn)
    assert not [s for s in report.sites if s.kind == "advance_step"], report.table()
    assert "npu_advance_step_flashattn" not in report.code_after[0]


def test_no_padding_row_is_refused_by_the_op_with_its_reason():
    """CANN needs num_seqs > num_queries (a padding row always exists); with none, the step stays."""
    def no_padding(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables):
        input_tokens[:] = sampled_token_ids[:, 0]
        positions = seq_lens.clone()
        seq_lens += 1
        input_positions[:] = positions
        slot_mapping[:] = block_tables.gather(1, (positions // BS)[:, None])[:, 0] * BS + positions % BS

    g = torch.Generator().manual_seed(3)
    state = lambda: [torch.zeros(NQ, dtype=torch.long), torch.randint(0, 9, (NQ, 1), generator=g),  # noqa: E731
                     torch.zeros(NQ, dtype=torch.long), torch.tensor([1, 5, 2]), torch.zeros(NQ, dtype=torch.long),
                     torch.arange(NQ * W).reshape(NQ, W)]
    eager, compiled = state(), state()
    compiled = [c.copy_(e) if c.shape == e.shape else c for c, e in zip(compiled, eager)]
    no_padding(*eager)
    report = Report()
    torch._dynamo.reset()
    torch.compile(no_padding, backend="npu_attn", options={"report": report})(*compiled)
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
    (site,) = [s for s in report.sites if s.kind == "advance_step"]
    assert not site.rewritten and site.reason.startswith("npu_advance_step_flashattn: num_seqs must be"), \
        report.table()


def test_the_step_is_one_complete_ge_graph(tmp_path):
    from test_ge_converters import only_op

    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(vllm_form, *_state(), out_dir=tmp_path)
    assert result.single_graph, result.summary()
    op = only_op(result.graphs[0].graph_def, "AdvanceStep")
    assert (op.attr["num_seqs"].i, op.attr["num_queries"].i, op.attr["block_size"].i) == (NS, NQ, BS)
    assert not [t for t in result.op_type_counts if t in ("SliceScatter", "GatherElements", "FloorDiv")], \
        result.summary()


def test_the_inductor_executor_runs_the_fused_step():
    """Inductor's decompositions spell the padding fill as a copy of a 0-d constant; the in-place
    op returns nothing, so Inductor keeps its writes (state equal after every step)."""
    torch._dynamo.reset()
    eager, compiled = _state(), _state()
    report = Report()
    step = torch.compile(vllm_form, backend="npu_attn", options={"report": report, "executor": "inductor"})
    for i in range(3):
        vllm_form(*eager)
        step(*compiled)
        assert all(torch.equal(c, e) for c, e in zip(compiled, eager)), i
    (site,) = [s for s in report.sites if s.kind == "advance_step"]
    assert site.rewritten, report.table()


def step_then_read(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
                   embedding):
    """The step and the next forward in one graph: the forward reads the new state."""
    vllm_form(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables)
    hidden = embedding[input_tokens] * (input_positions + 1)[:, None]
    return hidden + (seq_lens * 1000 + slot_mapping)[:, None]


@pytest.mark.parametrize("target", ["torch", "ge"])
def test_a_graph_that_reads_the_new_state_gets_the_op_before_its_first_read(target):
    from fuzz.oracle import ge_target_backend

    torch._dynamo.reset()
    embedding = torch.randn(100, 8, generator=torch.Generator().manual_seed(5))
    eager, compiled = _state(), _state()
    report = Report()
    backend = ge_target_backend(report) if target == "ge" else "npu_attn"
    options = None if target == "ge" else {"report": report, "executor": "eager"}
    step = torch.compile(step_then_read, backend=backend, fullgraph=True, options=options)
    for i in range(3):
        want = step_then_read(*eager, embedding)
        got = step(*compiled, embedding)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert all(torch.equal(c, e) for c, e in zip(compiled, eager)), i
    (site,) = [s for s in report.sites if s.kind == "advance_step"]
    assert site.rewritten, report.table()
