"""Runs one engine step on the model: lay out the scheduled tokens, run, return the rows to sample.

The runner owns the device side of the engine: the KV pool and its attention backend, and the
persistent :class:`InputBatch`. It decides the packed order of the step's rows (the torch backend wants
single-token rows first), builds the step's metadata from the batch's tensors with a handful of
vectorised ops, runs the model on every scheduled token at once, and computes logits only for the
sequences whose pending tokens are all done.

Batch invariance: on the CPU kernels every op already gives a row the same bits whatever the batch. On
the torch path (CUDA) the ``batch_invariant`` option gets there by shape: the step's tokens are run in
chunks of exactly ``FIXED_ROWS`` rows (the last one padded with dummy rows that write to a scratch block),
attention is the torch backend's fixed-tile mode, the lm_head runs on chunks of ``FIXED_ROWS`` rows too,
and MoE experts on fixed-size slot batches; every torch kernel then sees the same shapes in every step,
and a GEMM's rows do not depend on each other. It costs the padding and more, smaller launches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from qwen3.device import index_tensor, to_device
from qwen3.distributed import ParallelError
from qwen3.engine.attention import (
    AttentionMetadata,
    KVPool,
    RowMetadata,
    TorchAttention,
    make_backend,
)
from qwen3.engine.input_batch import InputBatch
from qwen3.engine.sequence import Sequence
from qwen3.model import Qwen3ForCausalLM

if TYPE_CHECKING:
    from qwen3.distributed import Workers


@dataclass
class StepInputs:
    """A step's model calls, host-side (what rank 0 broadcasts to tensor-parallel workers): each call is
    (metadata, token ids, positions, max position); then the packed rows whose logits are wanted."""

    calls: list[tuple[AttentionMetadata | RowMetadata, torch.Tensor, torch.Tensor, int]]
    last_rows: list[int]


FIXED_ROWS = 16  # tokens per model call in the batch-invariant torch mode
KEY_TILE = 256  # keys per attention tile in that mode


class ModelRunner:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        attention_backend: str | None = None,
        batch_invariant: bool = False,
        workers: Workers | None = None,
    ) -> None:
        """``workers``: tensor-parallel ranks (rank 0 only) that are sent each step's inputs."""
        if workers is not None:  # each rank builds the same runner around its shard
            workers.send("runner", dict(
                num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                max_model_len=max_model_len, attention_backend=attention_backend, batch_invariant=batch_invariant,
            ))  # fmt: skip
        self.model = model
        self.workers = workers
        self.device = model.device
        self.block_size = block_size
        config = model.config
        self.scratch_block = num_blocks  # one block past the manager's: where padding rows write
        self.pool = KVPool(
            config.num_hidden_layers, num_blocks + int(batch_invariant), block_size,
            model.num_kv_heads, config.head_dim, model.dtype, model.device,
        )  # fmt: skip
        self.backend = make_backend(attention_backend, self.pool, KEY_TILE if batch_invariant else None)
        # The kernel backend is invariant as it is; the torch one needs fixed-shape steps.
        self.fixed_rows = FIXED_ROWS if batch_invariant and isinstance(self.backend, TorchAttention) else None
        if self.fixed_rows:
            model.use_fixed_shapes(FIXED_ROWS)
        max_blocks = -(-max_model_len // block_size)
        self.batch = InputBatch(max_num_seqs, max_blocks, config.vocab_size, model.device)

    def remove(self, seq: Sequence) -> None:
        """``seq`` left the running batch (finished, aborted or preempted)."""
        self.batch.remove(seq)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Compute the scheduled tokens; logits [S, vocab] for the sequences whose pending tokens are all done."""
        if self.backend.decodes_first:
            scheduled = sorted(scheduled, key=lambda item: item[1] != 1)  # stable: decodes first
        batch, bs = self.batch, self.block_size
        token_ids: list[int] = []
        begins: list[int] = []
        lengths: list[int] = []
        sampled: list[Sequence] = []
        last_rows: list[int] = []
        for seq, n in scheduled:
            if seq not in batch:
                batch.add(seq)
            else:
                batch.sync_block_table(seq)
            begin = seq.num_computed
            token_ids.extend(seq.token_ids[begin : begin + n])
            begins.append(begin)
            lengths.append(n)
            if begin + n == seq.num_tokens:
                sampled.append(seq)
                last_rows.append(len(token_ids) - 1)
        rows = torch.tensor(batch.rows([seq for seq, _ in scheduled]))
        lens = torch.tensor(lengths)
        starts = torch.cumsum(lens, 0) - lens
        owner = torch.repeat_interleave(torch.arange(len(lengths)), lens)  # each token's sequence
        positions = torch.arange(len(token_ids)) - starts[owner] + torch.tensor(begins)[owner]
        slots = batch.block_tables[rows[owner], positions // bs].long() * bs + positions % bs
        seq_lens = [b + n for b, n in zip(begins, lengths, strict=True)]
        width = -(-max(seq_lens) // bs)
        if self.fixed_rows:
            tables = batch.block_tables.index_select(0, rows[owner])[:, :width]  # each token's sequence's
            inputs = self._fixed_inputs(token_ids, positions, slots, tables, last_rows)
        else:
            meta = AttentionMetadata(
                slots=slots,
                block_tables=batch.block_tables.index_select(0, rows)[:, :width].contiguous(),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                query_starts=torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lens, 0).int()]),
                host_seq_lens=seq_lens,
                host_query_lens=lengths,
            )
            inputs = StepInputs([(meta, torch.tensor(token_ids), positions, max(seq_lens))], last_rows)
        if self.workers is None:
            return sampled, self.execute(inputs)
        self.workers.send("step", inputs)  # every rank runs the same step on its shard
        try:
            return sampled, self.execute(inputs)
        except ParallelError as exc:  # a collective inside the model failed: say which rank is gone
            who = self.workers.who_died()
            if not who:
                raise
            raise ParallelError(f"{exc} ({who})") from exc

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run a step laid out by :meth:`run` (on every tensor-parallel rank): logits [len(last_rows), V]."""
        device = self.device
        hidden = []
        for meta, ids, positions, top in inputs.calls:
            fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
            self.backend.prepare(
                type(meta)(
                    **{
                        k: to_device(v, device) if isinstance(v, torch.Tensor) else v
                        for k, v in fields.items()
                    }
                )
            )
            out = self.model.hidden_states(to_device(ids, device)[None], to_device(positions, device)[None],
                                           self.backend, top)  # fmt: skip
            hidden.append(out[0])
        if not inputs.last_rows:
            return hidden[0].new_empty(0)
        last = torch.cat(hidden).index_select(0, index_tensor(inputs.last_rows, device))
        if not self.fixed_rows:
            return self.model.compute_logits(last)
        rows = self.fixed_rows
        last = F.pad(last, (0, 0, 0, -len(inputs.last_rows) % rows))
        logits = [self.model.compute_logits(last[i : i + rows]) for i in range(0, len(last), rows)]
        return torch.cat(logits)[: len(inputs.last_rows)]

    def _fixed_inputs(
        self, token_ids: list[int], positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
        last_rows: list[int],
    ) -> StepInputs:  # fmt: skip
        """The step in chunks of exactly ``fixed_rows`` tokens (batch-invariant torch mode)."""
        rows, bs = self.fixed_rows, self.block_size
        pad = -len(token_ids) % rows
        ids = torch.tensor(token_ids + [0] * pad)
        positions = F.pad(positions, (0, pad))
        slots = F.pad(slots, (0, pad), value=self.scratch_block * bs)
        tables = F.pad(tables, (0, 0, 0, pad), value=self.scratch_block)
        calls = []
        for start in range(0, len(ids), rows):
            chunk = slice(start, start + rows)
            top = int(positions[chunk].max())
            meta = RowMetadata(slots[chunk], tables[chunk].contiguous(), positions[chunk], top)
            calls.append((meta, ids[chunk], positions[chunk], top))
        return StepInputs(calls, last_rows)
