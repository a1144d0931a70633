"""A request's state inside the engine: its tokens, how many are in the KV cache, its blocks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from qwen3.sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class ThinkingBudget:
    """Counts tokens generated inside ``<think>`` and says when to force the stop-thinking text.

    Qwen3 technical report §4.3: once thinking reaches the budget, the engine appends the
    stop-thinking instruction and ``</think>`` itself, and the model answers from what it has.
    """

    budget: int | None  # None: no cap, only track where the reasoning ends (for an answer prefix)
    think_start_id: int
    think_end_id: int
    inside: bool = False  # True when the prompt already opened <think> (Thinking-2507 template)
    finished: bool = False
    count: int = 0

    def observe(self, token_id: int) -> bool:
        """Record one generated token; True when the budget is now exhausted."""
        if self.finished:
            return False
        if not self.inside:
            if token_id == self.think_start_id:
                self.inside = True
            return False
        if token_id == self.think_end_id:
            self.inside, self.finished = False, True
            return False
        self.count += 1
        return self.budget is not None and self.count >= self.budget

    def close(self) -> None:
        self.inside, self.finished = False, True


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)  # prompt + generated (and inserted) tokens
    num_computed: int = 0  # leading tokens whose keys/values are in the cache
    num_prefix_cached: int = 0  # of those, how many came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    thinking: ThinkingBudget | None = None
    answer_prefix_ids: list[int] = field(default_factory=list)  # inserted where the reasoning ends
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose keys/values still have to be computed (a prompt chunk, inserted text, or 1)."""
        return len(self.token_ids) - self.num_computed

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
