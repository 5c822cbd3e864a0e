"""The engine: block manager + scheduler + model runner + sampler.

The model runner holds the paged caches and one set of step-state tensors per decode
batch size, and runs the model definition's ``prefill`` and ``decode`` through
``torch.compile(..., backend="npu_attn")`` (or eagerly). It never calls an npu_attn op
itself: whatever is fused is the backend's doing.

Batches are padded to fixed shapes so that steady-state serving never recompiles:

* decode: B rows with B in ``decode_batch_sizes`` (default 2, 3, 5, 9, 17, 33: room for
  1, 2, 4, 8, 16, 32 live requests plus the one padding row that
  npu_advance_step_flashattn requires, num_seqs > num_queries). Unused live rows are
  dummy requests with no cached token that write and read slot 0 of the scratch block;
  the padding row has slot -1 (the scratch block's last slot for eager PyTorch, skipped
  by the fused writer) and seq_len 1. Rows never mix (every op is per row), so padding
  cannot change a real row's result;
* prefill: the packed token count padded to a power of two (>= 16) up to 256, then to a
  multiple of 256, up to ``max_num_batched_tokens`` (``prefill_token_counts``); padding tokens have slot -1 and form causal sequences of
  their own (ids -1, -2, ..., positions 0, 1, ...), none longer than the batch's longest.

``warmup()`` compiles every shape once on scratch-only data. After it, ``step()`` runs
the compiled graphs with dynamo's guard evaluation skipped
(``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``; ``skip_guards_after_warmup=False``
keeps it): every input is one the engine owns and has warmed up, so the guards could
only pass. Before warm-up, or for a step outside those shapes, that would be unsafe;
the engine never makes one (tests/test_mini_vllm.py counts no compile after warm-up
with the guards evaluated).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass

import torch

from .block_manager import BlockManager
from .model import PagedCausalLM
from .sampler import SamplingParams, sample
from .scheduler import Request, Scheduler

DEFAULT_DECODE_CAPACITIES = (1, 2, 4, 8, 16, 32)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: str
    num_preemptions: int
    arrival_time: float
    first_token_time: float
    finish_time: float


@dataclass
class StepStats:
    prefill_requests: int
    prefill_tokens: int  # real tokens (padding excluded)
    prefill_padded: int
    decode_requests: int
    decode_padded: int  # decode batch size B (0: no decode this step)
    preempted: int
    finished: int


class _DecodeState:
    """vLLM's persistent decode inputs for one padded batch size."""

    def __init__(self, batch: int, max_blocks: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.int64, device=device)  # noqa: E731
        self.input_tokens, self.positions, self.seq_lens, self.slot_mapping = z(batch), z(batch), z(batch), z(batch)
        self.block_tables = z(batch, max_blocks)
        self.sampled = z(batch - 1, 1)


PREFILL_STEP = 256


def prefill_token_counts(max_num_batched_tokens: int) -> tuple[int, ...]:
    """The packed token counts a prefill is padded to: powers of two from 16 up to
    PREFILL_STEP, then multiples of PREFILL_STEP, up to max_num_batched_tokens. Powers of
    two all the way would pad 1,100 tokens to 2,048 (MLP and projections on 86% more
    tokens); steps of 256 keep the padding under 256 tokens for one more compiled shape
    per 256 tokens of budget."""
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    sizes, t = [], 16
    while t < min(max_num_batched_tokens, PREFILL_STEP):
        sizes.append(t)
        t *= 2
    t = PREFILL_STEP
    while t < max_num_batched_tokens:
        sizes.append(t)
        t += PREFILL_STEP
    return tuple(sizes + [max_num_batched_tokens])


class LLMEngine:
    def __init__(self, model: PagedCausalLM, *, num_blocks: int = 128, block_size: int = 16,
                 max_model_len: int = 256, max_num_seqs: int = 32, max_num_batched_tokens: int = 256,
                 compile: bool = True, backend: str | object = "npu_attn", backend_options: dict | None = None,
                 decode_batch_sizes: tuple[int, ...] | None = None, device: str | torch.device = "cpu",
                 skip_guards_after_warmup: bool = True):
        self.model = model.to(device).eval()
        cfg = model.config
        self.device = torch.device(device)
        self.block_size, self.max_model_len = block_size, max_model_len
        self.blocks = BlockManager(num_blocks, block_size)
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        dtype = next(model.parameters()).dtype
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * cfg.num_layers)]
        if decode_batch_sizes is None:
            caps = sorted({c for c in DEFAULT_DECODE_CAPACITIES if c < max_num_seqs} | {max_num_seqs})
            decode_batch_sizes = tuple(c + 1 for c in caps)
        self.decode_batch_sizes = tuple(sorted(decode_batch_sizes))
        if self.decode_batch_sizes[0] < 2 or self.decode_batch_sizes[-1] - 1 < max_num_seqs:
            raise ValueError(f"decode_batch_sizes {self.decode_batch_sizes} must be >= 2 and the largest must leave "
                             f"room for max_num_seqs={max_num_seqs} live rows plus one padding row")
        self.prefill_sizes = prefill_token_counts(max_num_batched_tokens)
        self._states = {b: _DecodeState(b, self.max_blocks_per_seq, device) for b in self.decode_batch_sizes}
        self.compiled = compile
        # After warmup() has compiled every shape the engine can produce, dynamo's guards only
        # re-check what the engine fixes (the same model, caches and state tensors, warmed
        # shapes): skipped, as vLLM does, keeping only those that tell the shapes apart.
        self.skip_guards_after_warmup = skip_guards_after_warmup
        self._warmed = False
        if compile:
            opts = dict(backend_options or {})
            kw = {"options": opts} if opts else {}
            self._prefill = torch.compile(model.prefill, backend=backend, fullgraph=True, dynamic=False, **kw)
            # advance_step and the forward in one graph: the backend puts npu_advance_step_flashattn
            # before the forward's first read of the new state.
            self._decode_step = torch.compile(model.advance_and_decode, backend=backend, fullgraph=True,
                                              dynamic=False, **kw)
        else:
            self._prefill, self._decode_step = model.prefill, model.advance_and_decode
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}
        self.step_stats: list[StepStats] = []

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, **kwargs) -> "LLMEngine":
        return cls(PagedCausalLM.from_hf(hf_model), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, **kwargs) -> "LLMEngine":
        return cls(PagedCausalLM.from_pretrained(path, dtype), **kwargs)

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise ValueError(f"request {request_id!r}: empty prompt")
        longest = len(prompt) + params.max_tokens - 1  # tokens that ever need a cache slot
        if longest > self.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt of {len(prompt)} tokens + max_tokens "
                             f"{params.max_tokens} needs {longest} cache positions > max_model_len {self.max_model_len}")
        if longest > self.scheduler.max_num_batched_tokens:
            raise ValueError(f"request {request_id!r}: up to {longest} tokens may need to be prefilled at once "
                             f"(after a preemption) > max_num_batched_tokens {self.scheduler.max_num_batched_tokens}")
        if self.blocks.blocks_for(longest) > self.blocks.num_usable:
            raise ValueError(f"request {request_id!r}: {longest} tokens need {self.blocks.blocks_for(longest)} blocks "
                             f"of {self.block_size}, the cache has only {self.blocks.num_usable} usable blocks")
        request = Request(request_id, prompt, params)
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one iteration --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        with self._guards():
            decode_b = self._run_decode(plan.decode) if plan.decode else 0
            prefill_t = self._run_prefill(plan.prefill) if plan.prefill else 0
        finished = []
        for request in plan.decode + plan.prefill:
            if self._done(request):
                finished.append(self._output(request))
        self.step_stats.append(StepStats(len(plan.prefill), sum(len(r.all_token_ids) - 1 for r in plan.prefill),
                                         prefill_t, len(plan.decode), decode_b, len(plan.preempted), len(finished)))
        return finished

    def _guards(self) -> contextlib.AbstractContextManager:
        if not self.compiled:
            return contextlib.nullcontext()
        if not self._warmed:  # every shape is one graph of the same function: room for all of them
            return self._room_for_every_shape()
        if self.skip_guards_after_warmup:
            return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        return contextlib.nullcontext()

    def _room_for_every_shape(self) -> contextlib.AbstractContextManager:
        """dynamo's recompile limit (8 graphs per function by default) raised to the number
        of shapes the engine compiles prefill and decode for."""
        shapes = max(len(self.prefill_sizes), len(self.decode_batch_sizes))
        return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, shapes))

    def _done(self, request: Request) -> bool:
        token, p = request.output_token_ids[-1], request.params
        eos = self.model.config.eos_token_id
        reason = None
        if not p.ignore_eos and (token in p.stop_token_ids or (eos is not None and token == eos)):
            reason = "stop"
        elif len(request.output_token_ids) >= p.max_tokens:
            reason = "length"
        if reason:
            self.scheduler.finish(request, reason)
        return reason is not None

    def _append(self, requests: list[Request], logits: torch.Tensor) -> None:
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests])
        now = time.perf_counter()
        for request, token in zip(requests, tokens):
            request.output_token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now

    def _decode_size(self, n: int) -> int:
        for b in self.decode_batch_sizes:
            if b - 1 >= n:
                return b
        raise AssertionError(f"no decode batch size for {n} rows")

    def _decode_state(self, st: _DecodeState, b: int) -> torch.Tensor:
        """advance_step (tokens, positions, seq_lens and slots for this step, in place), then the
        decode forward: the logits (b, vocab)."""
        return self._decode_step(st.input_tokens, st.sampled, st.positions, st.seq_lens, st.slot_mapping,
                                 st.block_tables, b, b - 1, self.block_size, self.kv_caches)

    def _run_decode(self, requests: list[Request]) -> int:
        n = len(requests)
        b = self._decode_size(n)
        st = self._states[b]
        scratch, w = self.blocks.scratch_block, self.max_blocks_per_seq
        tables = [self.blocks.tables[r.request_id] for r in requests]
        tables = [t + [scratch] * (w - len(t)) for t in tables] + [[scratch] * w] * (b - n)
        st.block_tables.copy_(torch.tensor(tables, dtype=torch.int64))
        # Old seq_lens (cached tokens): dummy live rows 0, advance_step's padding row 1 (kept as is by it).
        st.seq_lens.copy_(torch.tensor([r.num_cached for r in requests] + [0] * (b - 1 - n) + [1]))
        st.sampled.copy_(torch.tensor([[r.output_token_ids[-1]] for r in requests] + [[0]] * (b - 1 - n)))
        logits = self._decode_state(st, b)
        for r in requests:
            r.num_cached += 1
        self._append(requests, logits[:n])
        return b

    def _prefill_size(self, t: int) -> int:
        for s in self.prefill_sizes:
            if s >= t:
                return s
        raise AssertionError(f"no prefill size for {t} tokens")

    def _run_prefill(self, requests: list[Request]) -> int:
        ids, positions, seq_ids, slots, last = [], [], [], [], []
        for i, r in enumerate(requests):
            tokens = r.all_token_ids
            ids += tokens
            positions += range(len(tokens))
            seq_ids += [i] * len(tokens)
            slots += [self.blocks.slot(r.request_id, p) for p in range(len(tokens))]
            last.append(len(ids) - 1)
        t = self._prefill_size(len(ids))
        pad = t - len(ids)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=self.device)  # noqa: E731
        # Padding tokens: causal sequences of their own (ids -1, -2, ... at positions 0, 1, ...),
        # none longer than the longest real one, so the fused prefill is one TND call (at one
        # position they would be a second, full one) whose segments are no wider than the batch's.
        width = max(len(r.all_token_ids) for r in requests)
        hidden = self._prefill(as_tensor(ids + [0] * pad), as_tensor(positions + [i % width for i in range(pad)]),
                               as_tensor(seq_ids + [-1 - i // width for i in range(pad)]),
                               as_tensor(slots + [-1] * pad), self.kv_caches)
        for r in requests:
            r.num_cached = len(r.all_token_ids)
        self._append(requests, self.model.compute_logits(hidden[as_tensor(last)]))
        return t

    def _output(self, r: Request) -> RequestOutput:
        return RequestOutput(r.request_id, r.prompt_token_ids, list(r.output_token_ids), r.finish_reason,
                             r.num_preemptions, r.arrival_time, r.first_token_time, r.finish_time)

    # -- whole runs -----------------------------------------------------------------------------
    @torch.no_grad()
    def warmup(self) -> None:
        """Compile (or run) every decode and prefill shape once, on the scratch block only."""
        with self._guards():
            self._warm_every_shape()
        self._warmed = True

    def _warm_every_shape(self) -> None:
        scratch = self.blocks.scratch_block
        for b in self.decode_batch_sizes:
            st = self._states[b]
            st.block_tables.fill_(scratch)
            st.seq_lens.copy_(torch.tensor([0] * (b - 1) + [1]))
            st.sampled.zero_()
            self._decode_state(st, b)
        for t in self.prefill_sizes:
            z = lambda fill: torch.full((t,), fill, dtype=torch.int64, device=self.device)  # noqa: E731
            self._prefill(z(0), z(0), z(-1), z(-1), self.kv_caches)  # distinct tensors: no aliasing guard

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 arrivals: list[int] | None = None) -> list[RequestOutput]:
        """Serve `prompts` to completion; request i arrives at iteration arrivals[i] (default 0).
        Returns the outputs in prompt order."""
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        arrivals = arrivals or [0] * len(prompts)
        pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
        ids: dict[int, str] = {}
        done: dict[str, RequestOutput] = {}
        iteration = 0
        while pending or self.has_unfinished():
            while pending and arrivals[pending[0]] <= iteration:
                i = pending.pop(0)
                ids[i] = self.add_request(prompts[i], params[i])
            if self.has_unfinished():
                for out in self.step():
                    done[out.request_id] = out
            iteration += 1
        return [done[ids[i]] for i in range(len(prompts))]
