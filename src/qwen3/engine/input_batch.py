"""The running sequences' state, one row each, kept in tensors between steps (vLLM V1's input batch).

A sequence takes a row when it starts running and gives it back when it finishes, is aborted or is
preempted. While it holds the row, its block table, sampling parameters and penalty counts live in
tensors that are written only when something changes: a new block, a new token for a penalised row.
A step then gathers what it needs by row index instead of rebuilding it from Python lists, and nothing
per step is O(sequence length): a 32k-token reasoning trace costs the same per token as a short one.
"""

from __future__ import annotations

import torch

from qwen3.device import index_tensor, to_device
from qwen3.engine.sequence import Sequence
from qwen3.sampling import SamplingBatch, SamplingParams

# Per-row float parameters, in this order, in one [len, rows] tensor so that a step moves them at once.
_PARAMS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


class InputBatch:
    def __init__(
        self, max_num_seqs: int, max_blocks_per_seq: int, vocab_size: int, device: torch.device
    ) -> None:
        self.capacity = max_num_seqs
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.row_of: dict[Sequence, int] = {}
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.params: list[SamplingParams | None] = [None] * max_num_seqs
        self.block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32)  # host
        self.num_table_entries = [0] * max_num_seqs
        self._values = torch.zeros(len(_PARAMS), max_num_seqs, dtype=torch.float32)  # host
        self._device_values: torch.Tensor | None = None  # refreshed when _values changes
        # Penalty state, allocated when the first penalised request arrives (two [rows, vocab] tensors).
        self.output_counts: torch.Tensor | None = None  # int32: how often each token was generated
        self.prompt_mask: torch.Tensor | None = None  # bool: which tokens the prompt holds
        self.penalised: set[int] = set()

    def __len__(self) -> int:
        return len(self.row_of)

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self.row_of

    # --- joining and leaving ---------------------------------------------------------------------------

    def add(self, seq: Sequence) -> int:
        """Give ``seq`` a row and write its state there (once per time it starts running)."""
        if not self.free_rows:
            raise RuntimeError(f"the input batch is full ({self.capacity} rows)")
        row = self.free_rows.pop()
        self.row_of[seq] = row
        p = seq.params
        self.params[row] = p
        for i, name in enumerate(_PARAMS):
            self._values[i, row] = float(getattr(p, name))
        self._device_values = None
        self.num_table_entries[row] = 0
        self.sync_block_table(seq)
        if p.has_penalties:
            self._init_penalties(row, seq)
        return row

    def remove(self, seq: Sequence) -> None:
        row = self.row_of.pop(seq, None)
        if row is None:
            return
        self.params[row] = None
        self.penalised.discard(row)
        self.free_rows.append(row)

    def _init_penalties(self, row: int, seq: Sequence) -> None:
        """Counts of the tokens generated so far (non-zero after a preemption) and the prompt's tokens."""
        if self.output_counts is None:
            shape = (self.capacity, self.vocab_size)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        vocab = self.vocab_size
        output = torch.tensor([t for t in seq.output_token_ids if t < vocab], dtype=torch.long)
        prompt = torch.tensor([t for t in seq.prompt_token_ids if t < vocab], dtype=torch.long)
        self.output_counts[row] = to_device(torch.bincount(output, minlength=vocab).int(), self.device)
        self.prompt_mask[row] = False
        self.prompt_mask[row, to_device(prompt, self.device)] = True
        self.penalised.add(row)

    # --- updates while running ---------------------------------------------------------------------------

    def sync_block_table(self, seq: Sequence) -> None:
        """Write the block ids ``seq`` gained since the last call into its row of the table."""
        row = self.row_of[seq]
        have, table = self.num_table_entries[row], seq.block_table
        if len(table) > have:
            self.block_tables[row, have : len(table)] = torch.tensor(table[have:], dtype=torch.int32)
            self.num_table_entries[row] = len(table)

    def record(self, seqs: list[Sequence], token_ids: list[list[int]]) -> None:
        """Count new output tokens (sampled or inserted) for the penalised rows among ``seqs``."""
        if not self.penalised:
            return
        rows, tokens = [], []
        for seq, ids in zip(seqs, token_ids, strict=True):
            row = self.row_of.get(seq)
            if row in self.penalised:
                for t in ids:
                    if t < self.vocab_size:
                        rows.append(row)
                        tokens.append(t)
        if rows:
            index = (index_tensor(rows, self.device), index_tensor(tokens, self.device))
            self.output_counts.index_put_(index, torch.ones(len(rows), dtype=torch.int32, device=self.device),
                                          accumulate=True)  # fmt: skip

    # --- what a step reads ---------------------------------------------------------------------------------

    def rows(self, seqs: list[Sequence]) -> list[int]:
        return [self.row_of[s] for s in seqs]

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """The sampler's view of ``seqs`` (in that order): parameters gathered by row."""
        rows = self.rows(seqs)
        if self._device_values is None:
            self._device_values = to_device(self._values.clone(), self.device)
        values = self._device_values.index_select(1, index_tensor(rows, self.device))
        batch = SamplingBatch(
            request_ids=[s.request_id for s in seqs],
            params=[self.params[r] for r in rows],
            generators=[s.generator for s in seqs],
            temperature=values[0],
            top_p=values[1],
            min_p=values[2],
        )
        penalty_rows = [i for i, r in enumerate(rows) if r in self.penalised]
        if penalty_rows:
            prow = index_tensor([rows[i] for i in penalty_rows], self.device)
            pvalues = self._device_values.index_select(1, prow)
            batch.penalty_rows = penalty_rows
            batch.penalty_counts = self.output_counts.index_select(0, prow)
            batch.prompt_mask = self.prompt_mask.index_select(0, prow)
            batch.presence, batch.frequency, batch.repetition = pvalues[3], pvalues[4], pvalues[5]
        return batch
