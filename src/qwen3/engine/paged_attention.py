"""Attention over a paged KV cache: the engine's implementation of ``layers.AttentionBackend``.

Keys and values of every layer live in one preallocated pool of ``num_blocks * block_size`` slots.
A step packs all scheduled tokens of all sequences into one row; ``prepare`` turns the step's
sequences into index tensors once, and every layer's ``attend`` reuses them: it writes the new keys
and values into their slots, then attends single-token rows (decodes) in one batched SDPA call over
their gathered blocks, and multi-token rows (prompt chunks) one by one with a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen3.layers import causal_attention


@dataclass
class SeqSpan:
    """One sequence's part of a packed step: tokens [start, start+length) at cache positions ctx.."""

    start: int
    length: int
    context: int  # tokens already in the cache before this step
    block_table: list[int]


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.device = torch.device(device)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return (
            2
            * num_layers
            * block_size
            * num_kv_heads
            * head_dim
            * torch.empty((), dtype=dtype).element_size()
        )

    def slots(self, block_table: list[int], begin: int, end: int) -> torch.Tensor:
        """Cache slot index of each token position in [begin, end) of a sequence."""
        pos = torch.arange(begin, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, spans: list[SeqSpan]) -> None:
        """Precompute the step's index tensors (shared by all layers)."""
        self.spans = spans
        self.write_slots = torch.cat(
            [self.slots(s.block_table, s.context, s.context + s.length) for s in spans]
        )
        self.write_slots = self.write_slots.to(self.device)
        self.num_decode = sum(1 for s in spans if s.length == 1)
        decodes = spans[: self.num_decode]
        assert all(s.length == 1 for s in decodes), "single-token rows must come first"
        if decodes:
            lengths = [s.context + 1 for s in decodes]
            width = max(lengths)
            gather = torch.zeros(len(decodes), width, dtype=torch.long)
            for i, s in enumerate(decodes):
                gather[i, : lengths[i]] = self.slots(s.block_table, 0, lengths[i])
            self.decode_gather = gather.to(self.device)
            mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
            self.decode_mask = mask[:, None, None, :].to(self.device)  # [B, 1, 1, S]
        self.prefill_slots = [
            self.slots(s.block_table, 0, s.context + s.length).to(self.device)
            for s in spans[self.num_decode :]
        ]

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        key_cache, value_cache = self.keys[layer_idx], self.values[layer_idx]
        key_cache.index_copy_(0, self.write_slots, k[0])
        value_cache.index_copy_(0, self.write_slots, v[0])
        outputs = []
        nd = self.num_decode
        if nd:
            qd = q[0, :nd].unsqueeze(2)  # [B, Hq, 1, D]
            kd = key_cache[self.decode_gather].transpose(1, 2)  # [B, Hkv, S, D]
            vd = value_cache[self.decode_gather].transpose(1, 2)
            out = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=self.decode_mask, scale=scale, enable_gqa=True
            )
            outputs.append(out.squeeze(2))  # [B, Hq, D]
        for span, slots in zip(self.spans[nd:], self.prefill_slots, strict=True):
            qs = q[:, span.start : span.start + span.length]
            out = causal_attention(
                qs, key_cache[slots][None], value_cache[slots][None], scale, offset=span.context
            )
            outputs.append(out[0])
        return torch.cat(outputs, dim=0).unsqueeze(0) if len(outputs) > 1 else outputs[0].unsqueeze(0)
