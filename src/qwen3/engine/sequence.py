"""A request's state inside the engine: its tokens, how many are in the KV cache, its blocks. Tokens only."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from qwen3.sampling import SamplingParams
from qwen3.structured import GrammarState


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


@dataclass(eq=False)
class Sequence:
    """One sequence of a request (a request with ``n`` choices is ``n`` sequences).

    ``token_ids`` is the prompt followed by every generated or engine-inserted token; the first
    ``num_computed`` of them have their keys and values in the cache. Compared by identity.
    """

    request_id: str
    token_ids: list[int]  # prompt + generated (and inserted) tokens
    num_prompt_tokens: int
    params: SamplingParams
    num_computed: int = 0  # leading tokens whose keys/values are in the cache
    num_prefix_cached: int = 0  # of those, how many came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(
        default_factory=list
    )  # chain hash of each full block, kept across preemption
    num_committed_blocks: int = 0  # leading blocks registered in the prefix cache
    prefix_lookups: tuple[int, int] = (0, 0)  # (blocks looked up, found) by the last prefix match
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None  # the request's own random stream (seeded requests)
    thinking: ThinkingBudget | None = None
    answer_prefix_ids: list[int] = field(default_factory=list)  # inserted where the reasoning ends
    grammar: GrammarState | None = None  # the answer's constraint (structured outputs)
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose keys/values still have to be computed (a prompt chunk, inserted text, or 1)."""
        return len(self.token_ids) - self.num_computed

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """A copy (O(length)): for results, never for the per-step path."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
