"""Runs one engine step on the model: lay out the scheduled tokens, run, return the rows to sample.

The runner owns the device side of the engine: the KV pool and its attention backend, and the
persistent :class:`InputBatch`. It decides the packed order of the step's rows (the torch backend wants
single-token rows first), builds the step's metadata from the batch's tensors with a handful of
vectorised ops, runs the model on every scheduled token at once, and computes logits only for the
sequences whose pending tokens are all done.
"""

from __future__ import annotations

import torch

from qwen3.device import index_tensor, to_device
from qwen3.engine.attention import AttentionMetadata, KVPool, make_backend
from qwen3.engine.input_batch import InputBatch
from qwen3.engine.sequence import Sequence
from qwen3.model import Qwen3ForCausalLM


class ModelRunner:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        attention_backend: str | None = None,
    ) -> None:
        self.model = model
        self.device = model.device
        self.block_size = block_size
        config = model.config
        self.pool = KVPool(
            config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim,
            model.dtype, model.device,
        )  # fmt: skip
        self.backend = make_backend(attention_backend, self.pool)
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
        device = self.device
        meta = AttentionMetadata(
            slots=to_device(slots, device),
            block_tables=to_device(batch.block_tables.index_select(0, rows)[:, :width].contiguous(), device),
            seq_lens=to_device(torch.tensor(seq_lens, dtype=torch.int32), device),
            query_starts=to_device(
                torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lens, 0).int()]), device
            ),
            host_seq_lens=seq_lens,
            host_query_lens=lengths,
        )
        self.backend.prepare(meta)
        ids = index_tensor(token_ids, device)[None]
        hidden = self.model.hidden_states(
            ids, to_device(positions, device)[None], self.backend, max(seq_lens)
        )
        if not last_rows:
            return sampled, hidden.new_empty(0)
        logits = self.model.compute_logits(hidden[0, index_tensor(last_rows, device)])
        return sampled, logits
