"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step has a token budget. Running sequences go first, oldest first, each with all its pending
tokens (1 when decoding; a prompt chunk or inserted text otherwise) as far as the budget allows, so
long prompts are prefilled in chunks between decode steps. Waiting sequences join while budget,
``max_num_seqs`` and free blocks allow. When the cache is full, the youngest running sequence is
preempted: its blocks are released and it goes back to the front of the queue, to be recomputed
(mostly from the prefix cache) later. Nothing is ever dropped. How the step's rows are laid out for
the model is the runner's business, not the scheduler's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwen3.engine.block_manager import BlockManager
from qwen3.engine.sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    preempted: list[Sequence] = field(default_factory=list)  # left the running batch this step


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finished or aborted)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        """The (sequence, number of tokens to compute) pairs of the next step."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_pending, budget)
            while not self.blocks.reserve(seq, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                out.scheduled.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            n = min(seq.num_pending, budget)
            if not self.blocks.reserve(seq, n):
                self.blocks.cancel_match(seq)  # waiting sequences hold no blocks (its hits stay cached)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out
