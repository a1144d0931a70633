"""Runs one engine step on the model: pack the scheduled tokens, run, return the rows to sample."""

from __future__ import annotations

import torch

from qwen3.engine.paged_attention import PagedKVCache, SeqSpan
from qwen3.engine.sequence import Sequence
from qwen3.model import Qwen3ForCausalLM


class ModelRunner:
    def __init__(self, model: Qwen3ForCausalLM, num_blocks: int, block_size: int) -> None:
        self.model = model
        config = model.config
        self.cache = PagedKVCache(
            config.num_hidden_layers,
            num_blocks,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
            model.dtype,
            model.device,
        )

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Compute the scheduled tokens; logits [S, vocab] for the sequences whose pending tokens are all done."""
        token_ids: list[int] = []
        positions: list[int] = []
        spans: list[SeqSpan] = []
        last_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq, n in scheduled:
            begin = seq.num_computed
            spans.append(SeqSpan(len(token_ids), n, begin, seq.block_table))
            token_ids.extend(seq.token_ids[begin : begin + n])
            positions.extend(range(begin, begin + n))
            if begin + n == seq.num_tokens:
                sampled.append(seq)
                last_rows.append(len(token_ids) - 1)
        device = self.model.device
        ids = torch.tensor(token_ids, dtype=torch.long, device=device)[None]
        pos = torch.tensor(positions, dtype=torch.long, device=device)[None]
        self.cache.prepare(spans)
        hidden = self.model.hidden_states(ids, pos, self.cache)
        logits = self.model.compute_logits(hidden[0, last_rows]) if last_rows else hidden.new_empty(0)
        return sampled, logits.float()
