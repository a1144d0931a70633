"""Attention over a paged KV cache: the engine's implementation of ``layers.AttentionBackend``.

Keys and values of every layer live in one preallocated pool of blocks, ``[num_blocks, kv_heads,
block_size, head_dim]`` per layer: one head's keys of one block are one contiguous 4 KiB run, which is
what attention reads (token slot ``s`` is row ``s % block_size`` of block ``s // block_size``). A step
packs all scheduled tokens of all sequences into one row; ``prepare`` turns the step's sequences into
index tensors once, and every layer's ``attend`` reuses them: it writes the new keys
and values into their slots, then attends. A bf16 cache on CPU with qwen3's kernels attends every
sequence in one call that reads the blocks in place (``kernels.paged_attention``); otherwise torch
does it: single-token rows (decodes) in one batched SDPA call over their gathered blocks, multi-token
rows (prompt chunks) one by one with a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen3 import kernels
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
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_layers, self.value_layers = self.keys.unbind(0), self.values.unbind(0)
        self.block_size = block_size
        self.device = torch.device(device)
        self.use_kernel = (
            self.device.type == "cpu" and dtype == torch.bfloat16 and kernels.kernels_available()
        )

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
        bs = self.block_size
        slots = [
            s.block_table[p // bs] * bs + p % bs
            for s in spans
            for p in range(s.context, s.context + s.length)
        ]
        slots = torch.tensor(slots, dtype=torch.long, device=self.device)
        if self.use_kernel:
            width = max(len(s.block_table) for s in spans)
            tables = [s.block_table + [0] * (width - len(s.block_table)) for s in spans]
            starts = [0]
            for s in spans:
                starts.append(starts[-1] + s.length)
            self.kernel_args = (
                slots,
                torch.tensor(tables, dtype=torch.int32),
                torch.tensor([s.context + s.length for s in spans], dtype=torch.int32),
                torch.tensor(starts, dtype=torch.int32),
            )
            return
        self.write_at = self.block_and_row(slots)
        self.num_decode = sum(1 for s in spans if s.length == 1)
        decodes = spans[: self.num_decode]
        assert all(s.length == 1 for s in decodes), "single-token rows must come first"
        if decodes:
            lengths = [s.context + 1 for s in decodes]
            width = max(lengths)
            gather = torch.zeros(len(decodes), width, dtype=torch.long)
            for i, s in enumerate(decodes):
                gather[i, : lengths[i]] = self.slots(s.block_table, 0, lengths[i])
            self.decode_gather = self.block_and_row(gather.to(self.device))
            mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
            self.decode_mask = mask[:, None, None, :].to(self.device)  # [B, 1, 1, S]
        self.prefill_slots = [
            self.block_and_row(self.slots(s.block_table, 0, s.context + s.length).to(self.device))
            for s in spans[self.num_decode :]
        ]

    def block_and_row(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot indices -> (block, row) indices: ``cache[block, :, row]`` is the slots' [..., Hkv, D]."""
        return slots // self.block_size, slots % self.block_size

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        key_cache, value_cache = self.key_layers[layer_idx], self.value_layers[layer_idx]
        if self.use_kernel:  # writes k and v, then attends
            return kernels.paged_attention(
                q[0], k[0], v[0], key_cache, value_cache, *self.kernel_args, scale
            )[None]
        block, row = self.write_at
        key_cache[block, :, row] = k[0]
        value_cache[block, :, row] = v[0]
        outputs = []
        nd = self.num_decode
        if nd:
            qd = q[0, :nd].unsqueeze(2)  # [B, Hq, 1, D]
            block, row = self.decode_gather
            kd = key_cache[block, :, row].transpose(1, 2)  # [B, Hkv, S, D]
            vd = value_cache[block, :, row].transpose(1, 2)
            out = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=self.decode_mask, scale=scale, enable_gqa=True
            )
            outputs.append(out.squeeze(2))  # [B, Hq, D]
        for span, (block, row) in zip(self.spans[nd:], self.prefill_slots, strict=True):
            qs = q[:, span.start : span.start + span.length]
            ks, vs = key_cache[block, :, row][None], value_cache[block, :, row][None]
            out = causal_attention(qs, ks, vs, scale, offset=span.context)
            outputs.append(out[0])
        return torch.cat(outputs, dim=0).unsqueeze(0) if len(outputs) > 1 else outputs[0].unsqueeze(0)
