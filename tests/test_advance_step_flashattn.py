"""npu_advance_step_flashattn: reference kernel against plain-Python models of vLLM's decode
step (non-speculative and speculative), opcheck, torch.compile, and one test per
documented constraint (eagerly and, for shape rules, under FakeTensorMode)."""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from npu_attn_graph.kernels._library import NpuAttnArgumentError
from npu_attn_graph.kernels.advance_step_flashattn import npu_advance_step_flashattn

OP = torch.ops.npu_attn.npu_advance_step_flashattn.default
TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
              "test_aot_dispatch_dynamic")
i64 = torch.int64


# ============================================================================ plain-Python models of vLLM's step


class DecodeModel:
    """vLLM's advance_step_flashattn on Python lists: live rows advance by one token,
    padding rows get token 0, position 0 and PAD_SLOT_ID -1 (seq_lens untouched)."""

    def __init__(self, tokens, positions, seq_lens, slots, block_tables, num_queries, block_size):
        self.tokens, self.positions, self.seq_lens, self.slots = tokens, positions, seq_lens, slots
        self.block_tables, self.num_queries, self.block_size = block_tables, num_queries, block_size

    def step(self, sampled):
        for i in range(len(self.tokens)):
            if i < self.num_queries:
                pos = self.seq_lens[i]
                self.tokens[i] = sampled[i]
                self.positions[i] = pos
                self.seq_lens[i] = pos + 1
                self.slots[i] = self.block_tables[i][pos // self.block_size] * self.block_size + pos % self.block_size
            else:
                self.tokens[i], self.positions[i], self.slots[i] = 0, 0, -1


class SpecDecodeModel:
    """The speculative step on nested lists (request i, token j): every token of request i
    moves accepted[i] + 1 positions on, seq_len = position + 1, slot from the block table;
    token 0 becomes the last sampled token before the first -1, tokens 1.. the drafts."""

    def __init__(self, tokens, positions, seq_lens, slots, block_tables, block_size):
        self.tokens, self.positions, self.seq_lens, self.slots = tokens, positions, seq_lens, slots
        self.block_tables, self.block_size = block_tables, block_size

    @staticmethod
    def last_valid(row):
        count = 0
        while count < len(row) and row[count] != -1:
            count += 1
        return row[count - 1] if count > 0 else -1

    def step(self, sampled, spec, accepted):
        bs = self.block_size
        for i in range(len(self.tokens)):
            for j in range(len(self.tokens[i])):
                pos = self.positions[i][j] + accepted[i] + 1
                self.positions[i][j] = pos
                self.seq_lens[i][j] = pos + 1
                self.slots[i][j] = self.block_tables[i][pos // bs] * bs + pos % bs
            self.tokens[i][0] = self.last_valid(sampled[i])
            self.tokens[i][1:] = list(spec[i])


def _flat(x):
    return [v for row in x for v in row] if x and isinstance(x[0], list) else list(x)


# ============================================================================ 50-step simulated decodes

STEPS = 50
SEQUENCES = 8


def _block_tables(rng, rows, width):
    """Distinct physical block ids for every (row, logical block), like a block allocator."""
    ids = list(range(rows * width))
    rng.shuffle(ids)
    return [ids[r * width:(r + 1) * width] for r in range(rows)]


@pytest.mark.parametrize("num_pad,block_size,column", [(1, 4, False), (4, 16, False), (2, 8, True)],
                         ids=["pad1_bs4", "pad4_bs16", "pad2_bs8_column"])
def test_simulated_decode_matches_vllm_model(num_pad, block_size, column):
    rng = random.Random(1000 + num_pad + block_size)
    num_seqs = SEQUENCES + num_pad
    # Live lengths straddle block boundaries; padding rows hold small stale lengths.
    init = [rng.randint(1, 5 * block_size) for _ in range(SEQUENCES)] + [rng.randint(0, 3) for _ in range(num_pad)]
    width = (max(init) + STEPS) // block_size + 1
    tables = _block_tables(rng, num_seqs, width)
    model = DecodeModel([rng.randint(1, 9) for _ in range(num_seqs)], [rng.randint(0, 9) for _ in range(num_seqs)],
                        list(init), [rng.randint(0, 9) for _ in range(num_seqs)], tables, SEQUENCES, block_size)

    def tensor(values):
        t = torch.tensor(values, dtype=i64)
        return t.unsqueeze(1) if column else t

    tokens, positions, seq_lens, slots = (tensor(v) for v in (model.tokens, model.positions, model.seq_lens,
                                                              model.slots))
    block_tables = torch.tensor(tables, dtype=i64)
    history = [[] for _ in range(SEQUENCES)]
    for _ in range(STEPS):
        sampled = [rng.randint(1, 50000) for _ in range(SEQUENCES)]
        npu_advance_step_flashattn(tokens, torch.tensor(sampled, dtype=i64).unsqueeze(1), positions, seq_lens, slots,
                                   block_tables, num_seqs, SEQUENCES, block_size)
        model.step(sampled)
        for got, want in ((tokens, model.tokens), (positions, model.positions), (seq_lens, model.seq_lens),
                          (slots, model.slots)):
            assert got.reshape(-1).tolist() == want
        for i in range(SEQUENCES):
            history[i].append(int(slots.reshape(-1)[i]))
    # Every KV slot ever handed out is distinct (no two tokens share a cache cell).
    every = [s for h in history for s in h]
    assert len(set(every)) == len(every)
    assert seq_lens.reshape(-1)[:SEQUENCES].tolist() == [n + STEPS for n in init[:SEQUENCES]]
    assert seq_lens.reshape(-1)[SEQUENCES:].tolist() == init[SEQUENCES:]


@pytest.mark.parametrize("spec_num,block_size,flat", [(1, 4, True), (3, 8, True), (2, 16, False)],
                         ids=["spec1_bs4_flat", "spec3_bs8_flat", "spec2_bs16_rows"])
def test_simulated_speculative_decode_matches_model(spec_num, block_size, flat):
    rng = random.Random(77 + spec_num * block_size)
    per_request = 1 + spec_num
    base = [rng.randint(0, 4 * block_size) for _ in range(SEQUENCES)]
    positions0 = [[b + j for j in range(per_request)] for b in base]
    width = (max(base) + spec_num + STEPS * per_request) // block_size + 1
    tables = _block_tables(rng, SEQUENCES, width)
    model = SpecDecodeModel([[rng.randint(1, 9) for _ in range(per_request)] for _ in range(SEQUENCES)],
                            positions0, [[p + 1 for p in row] for row in positions0],
                            [[0] * per_request for _ in range(SEQUENCES)], tables, block_size)

    def tensor(rows):
        t = torch.tensor(rows, dtype=i64)
        return t.reshape(-1) if flat else t

    tokens, positions, seq_lens, slots = (tensor(v) for v in (model.tokens, model.positions, model.seq_lens,
                                                              model.slots))
    block_tables = torch.tensor(tables, dtype=i64)
    for _ in range(STEPS):
        accepted = [rng.randint(0, spec_num) for _ in range(SEQUENCES)]
        sampled = [[rng.randint(1, 50000) if j <= a else -1 for j in range(per_request)] for a in accepted]
        spec = [[rng.randint(1, 50000) for _ in range(spec_num)] for _ in range(SEQUENCES)]
        npu_advance_step_flashattn(tokens, torch.tensor(sampled, dtype=i64), positions, seq_lens, slots, block_tables,
                                   SEQUENCES, SEQUENCES, block_size, spec_token=torch.tensor(spec, dtype=i64),
                                   accepted_num=torch.tensor(accepted, dtype=i64))
        model.step(sampled, spec, accepted)
        for got, want in ((tokens, model.tokens), (positions, model.positions), (seq_lens, model.seq_lens),
                          (slots, model.slots)):
            assert got.reshape(-1).tolist() == _flat(want)


# ============================================================================ hand-computed cases


def test_non_speculative_hand_computed():
    tokens = torch.tensor([5, 5, 5, 5], dtype=i64)
    positions = torch.tensor([9, 9, 9, 9], dtype=i64)
    seq_lens = torch.tensor([7, 8, 2, 3], dtype=i64)
    slots = torch.tensor([9, 9, 9, 9], dtype=i64)
    tables = torch.tensor([[3, 1, 4], [1, 5, 9], [2, 6, 5], [3, 5, 8]], dtype=i64)
    npu_advance_step_flashattn(tokens, torch.tensor([[11], [22]], dtype=i64), positions, seq_lens, slots, tables,
                               4, 2, 4)
    assert tokens.tolist() == [11, 22, 0, 0]
    assert positions.tolist() == [7, 8, 0, 0]
    assert seq_lens.tolist() == [8, 9, 2, 3]
    # position 7 -> block 1 (id 1), offset 3: 1*4+3; position 8 -> block 2 (id 9), offset 0: 36
    assert slots.tolist() == [7, 36, -1, -1]


def test_speculative_hand_computed_last_token_rules():
    spec = torch.tensor([[31, 32], [41, 42], [51, 52]], dtype=i64)
    sampled = torch.tensor([[7, 8, -1], [-1, -1, -1], [4, 5, 6]], dtype=i64)
    positions = torch.tensor([[2, 3, 4], [0, 1, 2], [5, 6, 7]], dtype=i64)
    seq_lens = positions + 1
    tokens = torch.zeros(3, 3, dtype=i64)
    slots = torch.zeros(9, dtype=i64)  # flat and 2-D layouts may be mixed
    tables = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]], dtype=i64)
    npu_advance_step_flashattn(tokens, sampled, positions, seq_lens, slots, tables, 3, 3, 4, spec_token=spec,
                               accepted_num=torch.tensor([1, 0, 2], dtype=i64))
    assert tokens.tolist() == [[8, 31, 32], [-1, 41, 42], [6, 51, 52]]
    assert positions.tolist() == [[4, 5, 6], [1, 2, 3], [8, 9, 10]]
    assert seq_lens.tolist() == [[5, 6, 7], [2, 3, 4], [9, 10, 11]]
    assert slots.tolist() == [44, 45, 46, 81, 82, 83, 128, 129, 130]


@pytest.mark.parametrize("spec_num", [1, 3])
def test_speculative_step_on_every_rejection_pattern(spec_num):
    """One request per pattern of -1 entries (all 2 ** (1 + spec_num), -1s not only trailing), with
    accepted counts unrelated to the pattern: the kernel against SpecDecodeModel's per-request loop
    (token 0 = the entry before the first -1, -1 when the row starts with -1; positions move
    accepted + 1 on whatever the sampled row holds)."""
    rng = random.Random(spec_num)
    per_request, block_size = 1 + spec_num, 4
    n = 2 ** per_request
    sampled = [[-1 if mask >> j & 1 else rng.randint(0, 50000) for j in range(per_request)] for mask in range(n)]
    accepted = [rng.randint(0, spec_num) for _ in range(n)]
    spec = [[rng.randint(0, 50000) for _ in range(spec_num)] for _ in range(n)]
    positions0 = [[rng.randint(0, 9) + j for j in range(per_request)] for _ in range(n)]
    tables = _block_tables(rng, n, 6)
    model = SpecDecodeModel([[0] * per_request for _ in range(n)], [list(r) for r in positions0],
                            [[p + 1 for p in r] for r in positions0], [[0] * per_request for _ in range(n)],
                            tables, block_size)
    state = [torch.tensor(v, dtype=i64) for v in (model.tokens, model.positions, model.seq_lens, model.slots)]
    npu_advance_step_flashattn(state[0], torch.tensor(sampled, dtype=i64), state[1], state[2], state[3],
                               torch.tensor(tables, dtype=i64), n, n, block_size,
                               spec_token=torch.tensor(spec, dtype=i64), accepted_num=torch.tensor(accepted, dtype=i64))
    model.step(sampled, spec, accepted)
    for got, want in zip(state, (model.tokens, model.positions, model.seq_lens, model.slots)):
        assert got.tolist() == want
    # No -1: the last entry; a leading -1: -1; a -1 at index 1 only: entry 0 (the entries after it are ignored).
    assert [row[0] for row in model.tokens][:4] == [sampled[0][-1], -1, sampled[2][0], -1]


def test_noncontiguous_views_are_updated_in_place():
    base = torch.zeros(4, 3, dtype=i64)
    tokens, positions = base[:, 0], base[:, 2]  # strided views of one buffer
    seq_lens = torch.tensor([3, 4, 1, 1], dtype=i64)
    slots = torch.zeros(8, dtype=i64)[::2]
    tables = torch.arange(12, dtype=i64).reshape(3, 4).t()  # non-contiguous (4, 3): tables[i, j] = 4 * j + i
    npu_advance_step_flashattn(tokens, torch.tensor([[1], [2], [3]], dtype=i64), positions, seq_lens, slots, tables,
                               4, 3, 2)
    assert base[:, 0].tolist() == [1, 2, 3, 0] and base[:, 1].tolist() == [0, 0, 0, 0]
    assert base[:, 2].tolist() == [3, 4, 1, 0]
    assert seq_lens.tolist() == [4, 5, 2, 1]
    # p=3 -> block 1 (id 4): 9; p=4 -> block 2 (id 9): 18; p=1 -> block 0 (id 2): 5; padding -> -1
    assert slots.tolist() == [9, 18, 5, -1]


# ============================================================================ opcheck and torch.compile


def _non_spec_args(num_seqs=5, num_queries=3, block_size=4, column=False):
    g = torch.Generator().manual_seed(num_seqs * 10 + num_queries)
    seq_lens = torch.randint(1, 12, (num_seqs,), generator=g)
    shape = (num_seqs, 1) if column else (num_seqs,)
    width = 12 // block_size + 1
    tables = torch.randperm(num_seqs * width, generator=g).reshape(num_seqs, width)
    return (torch.randint(1, 100, shape, generator=g), torch.randint(1, 100, (num_queries, 1), generator=g),
            torch.randint(0, 9, shape, generator=g), seq_lens.reshape(shape), torch.randint(0, 9, shape, generator=g),
            tables, num_seqs, num_queries, block_size), {}


def _spec_args(num_seqs=3, spec_num=2, block_size=4, flat=True):
    g = torch.Generator().manual_seed(num_seqs * 10 + spec_num)
    k = 1 + spec_num
    positions = (torch.randint(0, 6, (num_seqs, 1), generator=g) + torch.arange(k)).to(i64)
    shape = (num_seqs * k,) if flat else (num_seqs, k)
    sampled = torch.randint(1, 100, (num_seqs, k), generator=g)
    sampled[0, 1:] = -1
    width = (6 + k + k) // block_size + 2
    args = (torch.zeros(shape, dtype=i64), sampled, positions.reshape(shape), (positions + 1).reshape(shape),
            torch.zeros(shape, dtype=i64), torch.randperm(num_seqs * width, generator=g).reshape(num_seqs, width),
            num_seqs, num_seqs, block_size)
    kwargs = dict(spec_token=torch.randint(1, 100, (num_seqs, spec_num), generator=g),
                  accepted_num=torch.randint(0, k, (num_seqs,), generator=g))
    return args, kwargs


@pytest.mark.parametrize("build", [lambda: _non_spec_args(), lambda: _non_spec_args(6, 1, 2, column=True),
                                   lambda: _spec_args(), lambda: _spec_args(2, 3, 8, flat=False)],
                         ids=["plain", "plain_column", "spec_flat", "spec_rows"])
def test_opcheck(build):
    args, kwargs = build()
    torch.library.opcheck(OP, args, kwargs, test_utils=TEST_UTILS)


def test_fake_returns_none():
    args, kwargs = _spec_args()
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_kwargs = {k: mode.from_tensor(v) for k, v in kwargs.items()}
        assert OP(*fake_args, **fake_kwargs) is None


def test_compiled_multistep_loop_matches_eager():
    def three_steps(tokens, sampled, positions, seq_lens, slots, tables):
        for _ in range(3):
            npu_advance_step_flashattn(tokens, sampled, positions, seq_lens, slots, tables, 5, 3, 4)
        return slots * 2

    args, _ = _non_spec_args()
    eager = [a.clone() if isinstance(a, torch.Tensor) else a for a in args[:6]]
    compiled = [a.clone() if isinstance(a, torch.Tensor) else a for a in args[:6]]
    expected = three_steps(*eager)
    got = torch.compile(three_steps, fullgraph=True, backend="aot_eager")(*compiled)
    assert torch.equal(got, expected)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_public_signature_matches_schema():
    params = inspect.signature(npu_advance_step_flashattn).parameters
    schema = OP._schema
    assert list(params) == [a.name for a in schema.arguments]
    assert [p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY] == ["spec_token", "accepted_num"]
    assert params["spec_token"].default is None and params["accepted_num"].default is None
    assert [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments][:5] == [
        True, False, True, True, True]
    assert len(schema.returns) == 0


# ============================================================================ constraint errors


def _plain(**over):
    args, _ = _non_spec_args()
    names = ["input_tokens", "sampled_token_ids", "input_positions", "seq_lens", "slot_mapping", "block_tables",
             "num_seqs", "num_queries", "block_size"]
    kwargs = dict(zip(names, args))
    kwargs.update(over)
    return kwargs


def _spec(**over):
    args, extra = _spec_args()
    names = ["input_tokens", "sampled_token_ids", "input_positions", "seq_lens", "slot_mapping", "block_tables",
             "num_seqs", "num_queries", "block_size"]
    kwargs = dict(zip(names, args), **extra)
    kwargs.update(over)
    return kwargs


z = lambda *shape, dtype=i64: torch.zeros(shape, dtype=dtype)  # noqa: E731

# (name, kwargs builder, argument named in the message, shape-level rule: the fake raises too)
ERRORS = [
    ("num_seqs_positive", lambda: _plain(num_seqs=0), "num_seqs", True),
    ("num_seqs_limit", lambda: _plain(num_seqs=200_000_000), "num_seqs", True),
    ("num_queries_positive", lambda: _plain(num_queries=0), "num_queries", True),
    ("block_size_positive", lambda: _plain(block_size=0), "block_size", True),
    ("input_tokens_dtype", lambda: _plain(input_tokens=z(5, dtype=torch.int32)), "input_tokens.dtype", True),
    ("sampled_dtype", lambda: _plain(sampled_token_ids=z(3, 1, dtype=torch.int32)), "sampled_token_ids.dtype", True),
    ("positions_dtype", lambda: _plain(input_positions=z(5, dtype=torch.float32)), "input_positions.dtype", True),
    ("seq_lens_dtype", lambda: _plain(seq_lens=z(5, dtype=torch.int32)), "seq_lens.dtype", True),
    ("slot_dtype", lambda: _plain(slot_mapping=z(5, dtype=torch.int32)), "slot_mapping.dtype", True),
    ("block_tables_dtype", lambda: _plain(block_tables=z(5, 4, dtype=torch.int32)), "block_tables.dtype", True),
    ("spec_token_dtype", lambda: _spec(spec_token=z(3, 2, dtype=torch.int32)), "spec_token.dtype", True),
    ("accepted_dtype", lambda: _spec(accepted_num=z(3, dtype=torch.int32)), "accepted_num.dtype", True),
    ("block_tables_rank", lambda: _plain(block_tables=z(20)), "block_tables.dim()", True),
    ("block_tables_rows", lambda: _plain(block_tables=z(4, 4)), "block_tables.shape[0]", True),
    ("block_tables_empty", lambda: _plain(block_tables=z(5, 0)), "block_tables.shape[1]", True),
    ("num_seqs_not_above_queries", lambda: _plain(num_queries=5, sampled_token_ids=z(5, 1)), "num_seqs", True),
    ("sampled_shape", lambda: _plain(sampled_token_ids=z(3)), "sampled_token_ids.shape", True),
    ("sampled_rows", lambda: _plain(sampled_token_ids=z(4, 1)), "sampled_token_ids.shape", True),
    ("input_tokens_shape", lambda: _plain(input_tokens=z(4)), "input_tokens.shape", True),
    ("input_tokens_cols", lambda: _plain(input_tokens=z(5, 2)), "input_tokens.shape", True),
    ("positions_shape", lambda: _plain(input_positions=z(6)), "input_positions.shape", True),
    ("seq_lens_shape", lambda: _plain(seq_lens=z(3, 1)), "seq_lens.shape", True),
    ("slot_shape", lambda: _plain(slot_mapping=z(1, 5)), "slot_mapping.shape", True),
    ("spec_without_accepted", lambda: _spec(accepted_num=None), "accepted_num", True),
    ("accepted_without_spec", lambda: _spec(spec_token=None), "spec_token", True),
    ("spec_queries", lambda: _spec(num_queries=2), "num_queries", True),
    ("spec_token_shape", lambda: _spec(spec_token=z(2, 2)), "spec_token.shape", True),
    ("spec_token_empty", lambda: _spec(spec_token=z(3, 0)), "spec_token.shape[1] (spec_num)", True),
    ("accepted_shape", lambda: _spec(accepted_num=z(3, 1)), "accepted_num.shape", True),
    ("spec_sampled_shape", lambda: _spec(sampled_token_ids=z(3, 1)), "sampled_token_ids.shape", True),
    ("spec_tokens_shape", lambda: _spec(input_tokens=z(3)), "input_tokens.shape", True),
    ("spec_positions_shape", lambda: _spec(input_positions=z(3, 2)), "input_positions.shape", True),
    ("spec_seq_lens_shape", lambda: _spec(seq_lens=z(8)), "seq_lens.shape", True),
    ("spec_slot_shape", lambda: _spec(slot_mapping=z(3, 1)), "slot_mapping.shape", True),
    # data rules: reference kernel only
    ("block_tables_too_narrow", lambda: _plain(seq_lens=torch.tensor([3, 2, 1, 1, 16]), block_tables=z(5, 4)),
     "block_tables.shape[1]", False),
    ("seq_lens_negative", lambda: _plain(seq_lens=torch.tensor([3, -1, 1, 1, 1])), "seq_lens", False),
    ("spec_block_tables_too_narrow", lambda: _spec(seq_lens=torch.full((9,), 40)), "block_tables.shape[1]", False),
    ("accepted_negative", lambda: _spec(accepted_num=torch.tensor([0, -1, 0])), "accepted_num", False),
    ("sampled_below_placeholder", lambda: _spec(sampled_token_ids=torch.tensor([[1, -2, 3]] * 3)),
     "sampled_token_ids", False),
    ("spec_positions_overflow", lambda: _spec(input_positions=torch.full((9,), 30)), "input_positions", False),
    ("spec_positions_negative", lambda: _spec(input_positions=torch.full((9,), -5)), "input_positions", False),
]


def _raises(kwargs, argument):
    with pytest.raises(NpuAttnArgumentError, match=r"^npu_advance_step_flashattn: ") as info:
        npu_advance_step_flashattn(**kwargs)
    assert str(info.value).split(": ", 1)[1].startswith(argument + " "), str(info.value)


@pytest.mark.parametrize("name,build,argument,shape_rule", ERRORS, ids=[e[0] for e in ERRORS])
def test_constraint_errors(name, build, argument, shape_rule):
    kwargs = build()
    _raises({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}, argument)
    if shape_rule:
        with FakeTensorMode() as mode:
            fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            _raises(fake, argument)


def test_failed_validation_leaves_inputs_untouched():
    kwargs = _spec(accepted_num=torch.tensor([0, -1, 0]))
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(NpuAttnArgumentError):
        npu_advance_step_flashattn(**kwargs)
    for k, v in before.items():
        assert torch.equal(kwargs[k], v), k
