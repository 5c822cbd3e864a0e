"""Requests and continuous batching.

Every iteration the scheduler forms a decode batch (every running request: one new
token each) and a prefill batch (waiting requests, first come first served, while the
token budget, the sequence limit and the free blocks allow). Requests arrive and
finish at any iteration; a finished request's blocks go back to the block manager at
once and are reused by the next admissions.

When a running request needs a new block and none is free, the most recently admitted
running request is preempted (vLLM's recompute preemption): its blocks are freed and it
goes back to the front of the waiting queue; when readmitted its prompt and the tokens
generated so far are prefilled again, so its output continues unchanged.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager, OutOfBlocks
from .sampler import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_cached: int = 0  # tokens whose keys/values are in the cache
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


@dataclass
class SchedulerOutput:
    prefill: list[Request]
    decode: list[Request]
    preempted: list[Request]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request.request_id)
        self.running.remove(request)
        request.status, request.num_cached = Status.WAITING, 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        # Decode: every running request gets a slot for its next token (position num_cached).
        decode: list[Request] = []
        preempted: list[Request] = []
        for request in list(self.running):
            if request.status is not Status.RUNNING:
                continue  # preempted below in this loop
            while True:
                try:
                    self.blocks.allocate(request.request_id, request.num_cached + 1)
                    decode.append(request)
                    break
                except OutOfBlocks:
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is request:
                        break
        # Prefill: admit waiting requests while the budgets and the free blocks allow.
        prefill: list[Request] = []
        tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            n = len(request.all_token_ids)
            if tokens + n > self.max_num_batched_tokens or not self.blocks.can_allocate(request.request_id, n):
                break  # back-pressure: it waits for tokens budget or blocks to free up
            self.blocks.allocate(request.request_id, n)
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            prefill.append(request)
            tokens += n
        if not decode and not prefill and self.waiting:
            request = self.waiting[0]
            n = len(request.all_token_ids)
            raise OutOfBlocks(f"request {request.request_id!r} can never be scheduled: its {n} tokens need "
                              f"{self.blocks.blocks_for(n)} blocks, {self.blocks.num_free} of "
                              f"{self.blocks.num_usable} are free and nothing is running; or it exceeds "
                              f"max_num_batched_tokens={self.max_num_batched_tokens}",
                              self.blocks.blocks_for(n), self.blocks.num_free)
        return SchedulerOutput(prefill, decode, preempted)

    def finish(self, request: Request, reason: str) -> None:
        request.status, request.finish_reason = Status.FINISHED, reason
        request.finish_time = time.perf_counter()
        self.running.remove(request)
        self.blocks.free(request.request_id)
