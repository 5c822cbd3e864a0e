"""The speculative advance_step -> npu_advance_step_flashattn(spec_token=, accepted_num=)
(passes/advance_step_to_fused.py, find_spec_step).

Each program runs eagerly and compiled with the npu_attn backend on the same state for several
steps with random accept counts, a padding request and block boundaries crossed; the four state
tensors must be exactly equal after every step. Spellings whose last token is provably the op's
(the entry before the first -1 of the sampled row) become the fused op; spellings equal to it only
under a precondition on the data stay as written, and the report names the precondition.
"""

from __future__ import annotations

import random

import pytest
import torch

import npu_attn_graph
from npu_attn_graph import Report

NS, SPEC, BS, W = 4, 2, 4, 8  # 3 live requests and 1 padding request, 2 draft tokens each
T = 1 + SPEC
STEPS = 5
OP = "torch.ops.npu_attn.npu_advance_step_flashattn.default("


def leading_run(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables, spec_token,
                accepted_num):
    """vLLM-style: the accepted tokens are the leading run of non -1 entries; the next input is the
    last of them, then the new drafts; every token moves accepted + 1 positions on."""
    num_valid = (sampled_token_ids != -1).cumprod(dim=1).sum(dim=1)
    last = sampled_token_ids.gather(1, (num_valid - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    input_tokens[:, 0] = last
    input_tokens[:, 1:] = spec_token
    input_positions += accepted_num.unsqueeze(1) + 1
    seq_lens.copy_(input_positions + 1)
    block_index = input_positions // BS
    slot_mapping.copy_(block_tables.gather(1, block_index) * BS + input_positions % BS)


def first_rejected(input_tokens, sampled, input_positions, seq_lens, slot_mapping, block_tables, spec_token,
                   accepted_num):
    """Another spelling: search the first -1, index the block table, write the state with cat/copy_."""
    n, t = sampled.shape
    first = torch.where(sampled == -1, torch.arange(t), t).min(dim=1).values
    last = torch.where(first > 0, sampled[torch.arange(n), (first - 1).clamp(min=0)], -1)
    input_tokens.copy_(torch.cat([last[:, None], spec_token], dim=1))
    positions = input_positions + (accepted_num + 1)[:, None]
    input_positions.copy_(positions)
    seq_lens.copy_(positions + 1)
    slot_mapping.copy_(block_tables[torch.arange(n)[:, None], positions // BS] * BS + positions % BS)


def by_accepted_num(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
                    spec_token, accepted_num):
    """Near miss: the last token read at accepted_num. Equal to the op only when accepted_num[i] + 1
    is where the sampled row's first -1 is, which only the sampler knows."""
    input_tokens[:, 0] = sampled_token_ids.gather(1, accepted_num[:, None]).squeeze(1)
    input_tokens[:, 1:] = spec_token
    input_positions += accepted_num.unsqueeze(1) + 1
    seq_lens.copy_(input_positions + 1)
    slot_mapping.copy_(block_tables.gather(1, input_positions // BS) * BS + input_positions % BS)


def valid_count(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables, spec_token,
                accepted_num):
    """Near miss (vLLM v1's EAGLE next-token spelling): the count of non -1 entries. Equal to the op
    only when each row's -1 entries are a suffix."""
    count = (sampled_token_ids != -1).sum(dim=1)
    input_tokens[:, 0] = sampled_token_ids.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]
    input_tokens[:, 1:] = spec_token
    input_positions += accepted_num.unsqueeze(1) + 1
    seq_lens.copy_(input_positions + 1)
    slot_mapping.copy_(block_tables.gather(1, input_positions // BS) * BS + input_positions % BS)


def no_bonus_position(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
                      spec_token, accepted_num):
    """Not the op at all: positions move by accepted_num only (no bonus token)."""
    num_valid = (sampled_token_ids != -1).cumprod(dim=1).sum(dim=1)
    input_tokens[:, 0] = sampled_token_ids.gather(1, (num_valid - 1).clamp(min=0)[:, None])[:, 0]
    input_tokens[:, 1:] = spec_token
    input_positions += accepted_num.unsqueeze(1)
    seq_lens.copy_(input_positions + 1)
    slot_mapping.copy_(block_tables.gather(1, input_positions // BS) * BS + input_positions % BS)


def flat_view(input_tokens, sampled, input_positions, seq_lens, slot_mapping, block_tables, spec_token,
              accepted_num):
    """The op's flat layout, (num_seqs * T,) state viewed as (num_seqs, T) and updated through the views."""
    num_valid = (sampled != -1).cumprod(dim=1).sum(dim=1)
    tokens = input_tokens.view(NS, T)
    tokens[:, 0] = sampled.gather(1, (num_valid - 1).clamp(min=0)[:, None])[:, 0]
    tokens[:, 1:] = spec_token
    positions = input_positions.view(NS, T)
    positions += accepted_num[:, None] + 1
    seq_lens.copy_(input_positions + 1)
    slot_mapping.copy_((block_tables.gather(1, positions // BS) * BS + positions % BS).flatten())


def flat_per_token(input_tokens, sampled, input_positions, seq_lens, slot_mapping, block_tables, spec_token,
                   accepted_num):
    """The flat layout as vLLM writes per-token code: each token's request index, then flat indexing."""
    req = torch.arange(NS * T) // T
    num_valid = (sampled != -1).cumprod(dim=1).sum(dim=1)
    last = sampled.gather(1, (num_valid - 1).clamp(min=0)[:, None])
    input_tokens.copy_(torch.cat([last, spec_token], dim=1).reshape(-1))
    input_positions += (accepted_num + 1)[req]
    seq_lens.copy_(input_positions + 1)
    slot_mapping.copy_(block_tables[req, input_positions // BS] * BS + input_positions % BS)


FLAT = (flat_view, flat_per_token)


def _state(seed: int = 0, flat: bool = False) -> list[torch.Tensor]:
    rng = random.Random(seed)
    base = torch.tensor([rng.randint(0, 6) for _ in range(NS - 1)] + [0])  # the padding request starts at 0
    positions = base[:, None] + torch.arange(T)
    ids = list(range(NS * W))
    rng.shuffle(ids)
    state = [torch.zeros(NS, T, dtype=torch.long), torch.full((NS, T), -1), positions, positions + 1,
             torch.zeros(NS, T, dtype=torch.long), torch.tensor(ids).reshape(NS, W),
             torch.zeros(NS, SPEC, dtype=torch.long), torch.zeros(NS, dtype=torch.long)]
    for k in (0, 2, 3, 4) if flat else ():  # tokens, positions, lengths, slots
        state[k] = state[k].reshape(-1).clone()
    return state


def _sample(rng: random.Random, rejection_sampler: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's sampler output. rejection_sampler: a row holds accepted + 1 tokens then -1s (what
    vLLM's rejection sampler writes); otherwise -1s anywhere. The last row is padding: all -1,
    nothing accepted, no drafts."""
    accepted = [rng.randint(0, SPEC) for _ in range(NS - 1)] + [0]
    rows = []
    for i, a in enumerate(accepted):
        if i == NS - 1:
            rows.append([-1] * T)
        elif rejection_sampler:
            rows.append([rng.randint(0, 999) if j <= a else -1 for j in range(T)])
        else:
            rows.append([rng.choice([-1, rng.randint(0, 999)]) for _ in range(T)])
    spec = [[rng.randint(0, 999) for _ in range(SPEC)] for _ in range(NS - 1)] + [[0] * SPEC]
    return torch.tensor(rows), torch.tensor(spec), torch.tensor(accepted)


def _run(fn, target: str = "torch", rejection_sampler: bool = True, executor: str = "eager") -> Report:
    from fuzz.oracle import ge_target_backend

    torch._dynamo.reset()
    eager, compiled = _state(flat=fn in FLAT), _state(flat=fn in FLAT)
    report = Report()
    backend = ge_target_backend(report) if target == "ge" else "npu_attn"
    options = None if target == "ge" else {"report": report, "executor": executor}
    step = torch.compile(fn, backend=backend, fullgraph=True, options=options)
    rng = random.Random(7)
    blocks_crossed = 0
    for i in range(STEPS):
        sampled, spec, accepted = _sample(rng, rejection_sampler)
        for state in (eager, compiled):
            state[1].copy_(sampled)
            state[6].copy_(spec)
            state[7].copy_(accepted)
        before = eager[2] // BS
        fn(*eager)
        step(*compiled)
        blocks_crossed += int((eager[2] // BS != before).any())
        for name, e, c in zip(("input_tokens", "sampled", "input_positions", "seq_lens", "slot_mapping"),
                              eager, compiled):
            assert torch.equal(c, e), f"step {i}: {name}: compiled {c.tolist()} != eager {e.tolist()}"
    assert blocks_crossed >= 2, blocks_crossed  # the slots move into new blocks during the run
    return report


def _site(report: Report):
    (site,) = [s for s in report.sites if s.kind == "advance_step"]
    return site


@pytest.mark.parametrize("fn,target", [
    (leading_run, "torch"), (leading_run, "ge"), (first_rejected, "torch"), (first_rejected, "ge"),
    (flat_view, "torch"), (flat_view, "ge"), (flat_per_token, "torch"),
], ids=["leading_run-torch", "leading_run-ge", "first_rejected-torch", "first_rejected-ge", "flat_view-torch",
        "flat_view-ge", "flat_per_token-torch"])
def test_the_speculative_step_becomes_the_fused_op(fn, target):
    report = _run(fn, target)
    site = _site(report)
    assert site.fused_op == "npu_advance_step_flashattn" and site.reason is None, report.table()
    assert site.pattern == "advance_step:speculative"
    assert site.layout == f"num_seqs={NS}, num_queries={NS}, block_size={BS}, spec_num={SPEC}"
    if target == "torch":
        code = report.code_after[0]
        assert code.count(OP) == 1 and "spec_token = " in code and "accepted_num = " in code, code
        for leftover in ("gather", "copy_", "cumprod", "floor_divide", "remainder", "where"):
            assert leftover not in code, code


@pytest.mark.parametrize("fn", [leading_run, first_rejected], ids=["leading_run", "first_rejected"])
def test_provably_equal_spellings_agree_with_the_op_on_any_rejection_pattern(fn):
    """-1s anywhere in a row (not only a trailing run): the op's 'entry before the first -1' and
    these spellings agree on every row, so the state stays equal."""
    assert _site(_run(fn, rejection_sampler=False)).rewritten


@pytest.mark.parametrize("fn,precondition", [
    (by_accepted_num, "only if accepted_num[i] + 1 is the index of the first -1 of sampled_token_ids[i]"),
    (valid_count, "only if each row's -1 entries are a suffix"),
], ids=["by_accepted_num", "valid_count"])
def test_near_misses_stay_as_written_with_the_precondition_named(fn, precondition):
    report = _run(fn)  # rejection-sampler data: eager and compiled agree (both run the program)
    site = _site(report)
    assert not site.rewritten and precondition in site.reason, report.table()
    assert "for the sampled row [" in site.reason, site.reason  # with a row where they differ
    assert "npu_advance_step_flashattn" not in report.code_after[0]


def test_near_misses_differ_from_the_op_on_data_outside_the_precondition():
    """Why they must stay: on a row the precondition excludes, the op gives another state."""
    from npu_attn_graph.kernels.advance_step_flashattn import npu_advance_step_flashattn

    for fn in (by_accepted_num, valid_count):
        program, op = _state(), _state()
        for state in (program, op):
            state[1].copy_(torch.tensor([[5, -1, 7], [5, 6, 7], [-1, -1, -1], [-1, -1, -1]]))
            state[7].copy_(torch.tensor([0, 1, 0, 0]))
        fn(*program)
        npu_advance_step_flashattn(*op[:6], NS, NS, BS, spec_token=op[6], accepted_num=op[7])
        assert not torch.equal(program[0], op[0]), fn.__name__
        assert all(torch.equal(a, b) for a, b in zip(program[2:5], op[2:5]))  # positions, lengths, slots agree


def test_other_bookkeeping_is_not_a_site():
    report = _run(no_bonus_position)
    assert not [s for s in report.sites if s.kind == "advance_step"], report.table()


def test_the_inductor_executor_runs_the_fused_speculative_step():
    assert _site(_run(leading_run, executor="inductor")).rewritten


def test_the_speculative_step_is_one_complete_ge_graph(tmp_path):
    from test_ge_converters import data_index, only_op, producer

    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(leading_run, *_state(), out_dir=tmp_path)
    assert result.single_graph, result.summary()
    graph = result.graphs[0].graph_def
    op = only_op(graph, "AdvanceStep")
    assert (op.attr["num_seqs"].i, op.attr["num_queries"].i, op.attr["block_size"].i) == (NS, NS, BS)
    # The speculative inputs are fed by graph inputs (not left unfed), each a different one.
    feeds = {name: producer(graph, op, name) for name in ("sampled_token_ids", "block_tables", "spec_token",
                                                          "accepted_num")}
    assert all(f is not None and f[0].type == "Data" for f in feeds.values()), feeds
    assert len({data_index(f[0]) for f in feeds.values()}) == 4
    assert not [t for t in result.op_type_counts if t in ("SliceScatter", "GatherElements", "FloorDiv", "Cumprod",
                                                          "ReduceSum")], result.summary()


def spec_step_then_read(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
                        spec_token, accepted_num, embedding):
    """The speculative step and the next forward in one graph: the forward reads the new state."""
    leading_run(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables, spec_token,
                accepted_num)
    hidden = embedding[input_tokens] * (input_positions + 1)[..., None]
    return hidden + (seq_lens * 1000 + slot_mapping)[..., None]


@pytest.mark.parametrize("target", ["torch", "ge"])
def test_a_graph_that_reads_the_new_speculative_state_gets_the_op_before_its_first_read(target):
    from fuzz.oracle import ge_target_backend

    torch._dynamo.reset()
    embedding = torch.randn(1000, 4, generator=torch.Generator().manual_seed(5))
    eager, compiled = _state(), _state()
    report = Report()
    backend = ge_target_backend(report) if target == "ge" else "npu_attn"
    options = None if target == "ge" else {"report": report, "executor": "eager"}
    step = torch.compile(spec_step_then_read, backend=backend, fullgraph=True, options=options)
    rng = random.Random(3)
    for i in range(3):
        sampled, spec, accepted = _sample(rng, rejection_sampler=True)
        for state in (eager, compiled):
            state[1].copy_(sampled)
            state[6].copy_(spec)
            state[7].copy_(accepted)
        want = spec_step_then_read(*eager, embedding)
        got = step(*compiled, embedding)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert all(torch.equal(c, e) for c, e in zip(compiled, eager)), i
    assert _site(report).rewritten, report.table()


# ============================================================================ the row evaluator against torch

_X = torch.tensor([[3, -1, 3], [-1, -1, -1], [0, 2, 2], [5, 5, -1]])  # ties, -1 patterns, zeros
_Y = torch.tensor([[1, 0], [2, 9], [0, 0], [7, 1]])
_V = torch.tensor([2, 0, 1, 2])
VOCABULARY = {
    "compare": lambda x, y, v: (x == -1).long() + (x != 3).long() * 2 + (x >= v[:, None]).long() * 4,
    "where_clamp": lambda x, y, v: torch.where(x > 0, x, v[:, None]).clamp(min=1, max=4),
    "sum_amin_amax": lambda x, y, v: x.sum(1) * 100 + x.amin(1) * 10 + x.amax(dim=1),
    "min_max_dim": lambda x, y, v: x.min(dim=1).indices * 10 + x.max(1).indices + x.min(1).values * 100,
    "argmin_argmax": lambda x, y, v: x.argmin(1) * 10 + (x == -1).long().argmax(dim=1),
    "cumsum_cumprod": lambda x, y, v: x.cumsum(1) * 10 + (x != -1).cumprod(dim=1),
    "any_all": lambda x, y, v: (x == -1).any(1).long() + (x >= 0).all(dim=1).long() * 2,
    "logical": lambda x, y, v: ((x > 0) & (x < 4)).long() + ((x == -1) | (x == 5)).long() * 2 + (~(x > 2)).long() * 4
    + torch.logical_and(x > 0, x.bool()).long() * 8,
    "maximum_cast": lambda x, y, v: torch.maximum(x, v[:, None]) + x.bool().long() * 10,
    "cat_columns": lambda x, y, v: torch.cat([v[:, None], y, x], dim=1),
    "cat_rows": lambda x, y, v: torch.cat([x, x + 1], dim=0),
    "select_scatter": lambda x, y, v: torch.select_scatter(x, v, 1, -1),
    "slice_scatter": lambda x, y, v: torch.slice_scatter(x, y, 1, 1, 3),
    "gather_2d": lambda x, y, v: x.gather(1, y.clamp(max=2)),
    "index_broadcast": lambda x, y, v: x[torch.arange(4)[:, None], y.clamp(max=2)] + x[torch.arange(4), v][:, None],
    "expand": lambda x, y, v: v[:, None].expand(-1, 3) * 10 + x,
    "first_rejected": lambda x, y, v: torch.where(x == -1, torch.arange(3), 3).min(dim=1).values,
    "views": lambda x, y, v: x.reshape(-1).view(4, 3) * 10 + x.view(4, 3) + x.view(12).view(4, 3)[:, :1],
    "flat": lambda x, y, v: x.reshape(-1)[(torch.arange(12) * 5) % 12] + v[torch.arange(12) // 3] * 10,
}


@pytest.mark.parametrize("name", list(VOCABULARY))
def test_the_row_evaluator_computes_what_torch_computes(name):
    """Every operation the matcher reads, evaluated symbolically and then on the data, against torch:
    the speculative match is only as sound as these meanings."""
    import sympy
    from torch.fx.experimental.proxy_tensor import make_fx

    from npu_attn_graph.passes.advance_step_to_fused import COL, ROW, _Evaluator

    fn = VOCABULARY[name]
    gm = make_fx(fn)(_X, _Y, _V)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (list, tuple)) else out
    evaluator = _Evaluator(gm)
    value = evaluator.rows(out)
    data = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], (_X, _Y, _V)))
    tensors = {evaluator.functions[n]: t for n, t in data.items() if n in evaluator.functions}
    want = fn(_X, _Y, _V)
    for i in range(want.shape[0]):
        for j in range(want.shape[1] if want.dim() == 2 else 1):
            e = next(e for lo, hi, e in value.pieces if lo <= i < hi).subs({ROW: i, COL: j}, simultaneous=True)
            for _ in range(6):  # an index read from the data becomes a number once the data is in
                e = e.replace(lambda x: isinstance(x, sympy.core.function.AppliedUndef) and x.func in tensors
                              and all(a.is_Integer for a in x.args),
                              lambda x: sympy.Integer(int(tensors[x.func][tuple(int(a) for a in x.args)])))
            expected = want[i, j] if want.dim() == 2 else want[i]
            assert e.is_Integer and int(e) == int(expected), (name, i, j, e, int(expected))
