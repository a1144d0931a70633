"""Attention over the paged KV cache: the pool, the step's metadata, and two backends behind one interface.

Keys and values of every layer live in one preallocated pool of blocks, ``[layers, blocks, kv_heads,
block_size, head_dim]``: one head's keys of one block are one contiguous run (4 KiB in bf16 for 16 x 128),
which is what attention reads; token slot ``s`` is row ``s % block_size`` of block ``s // block_size``.
A step packs all scheduled tokens of all sequences into one row; the runner describes it once in an
:class:`AttentionMetadata`, the backend's ``prepare`` turns that into whatever index tensors it wants, and
every layer's ``attend`` (the model's ``layers.AttentionBackend``) writes the new keys and values into
their slots and attends.

- :class:`KernelAttention`: qwen3's C++ kernel (CPU, bf16 or fp32): every sequence of the step in one call
  per layer, reading the blocks in place through the block tables. Batch-invariant (each query's result
  depends on its own keys only).
- :class:`TorchAttention`: device-agnostic torch (CUDA, or CPU without the kernels): single-token rows
  (decodes) in one batched SDPA call over their gathered blocks, multi-token rows one by one with a
  causal mask. It wants the decodes first, which the runner arranges (``decodes_first``). With a
  ``key_tile`` (the engine's ``batch_invariant`` option) it computes each query instead with a fixed-shape
  online softmax over tiles of ``key_tile`` keys, on chunks of a fixed number of query rows (the runner's
  job), so that every torch kernel sees the same shapes whatever the batch (see ``attend_fixed``).

The pool is allocated uninitialised (``torch.empty``): on CPU its pages are only committed as blocks are
first written, and no backend ever reads a slot that was not written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen3 import kernels
from qwen3.layers import causal_attention

DECODE_GATHER_KEYS = 1 << 18  # the torch backend's largest decode gather (rows x padded width)


class KVPool:
    """The cache tensors of every layer."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> None:  # fmt: skip
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.key_layers, self.value_layers = self.keys.unbind(0), self.values.unbind(0)
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Keys and values of one token in every layer."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class AttentionMetadata:
    """One step's layout: sequence s owns rows ``query_starts[s]:query_starts[s+1]`` of the packed step and
    has ``seq_lens[s]`` tokens in the cache once they are written; its blocks are ``block_tables[s]``.

    Device tensors, plus the same lengths as host ints so that backends never read them back (no sync).
    """

    slots: torch.Tensor  # [N] int64: cache slot of each new token
    block_tables: torch.Tensor  # [S, W] int32
    seq_lens: torch.Tensor  # [S] int32
    query_starts: torch.Tensor  # [S + 1] int32
    host_seq_lens: list[int]
    host_query_lens: list[int]


@dataclass
class RowMetadata:
    """A fixed-size chunk of query rows for the batch-invariant torch path: row i writes its key and value
    at ``slots[i]`` and attends keys 0..``positions[i]`` of the sequence whose block table is ``tables[i]``."""

    slots: torch.Tensor  # [C] int64
    tables: torch.Tensor  # [C, W] int32
    positions: torch.Tensor  # [C] int64
    host_max_position: int


class PagedAttention:
    """The interface: ``prepare`` once per step, then ``attend`` per layer (writes k/v, returns the output)."""

    decodes_first = False  # whether single-token rows must come first in the packed step

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    def prepare(self, meta: AttentionMetadata) -> None:
        raise NotImplementedError

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        raise NotImplementedError


class KernelAttention(PagedAttention):
    """``kernels.paged_attention``: writes the step's keys/values, then attends every sequence in one call."""

    def prepare(self, meta: AttentionMetadata) -> None:
        self.args = (meta.slots, meta.block_tables, meta.seq_lens, meta.query_starts)

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        key_cache, value_cache = self.pool.key_layers[layer_idx], self.pool.value_layers[layer_idx]
        return kernels.paged_attention(q[0], k[0], v[0], key_cache, value_cache, *self.args, scale)[None]


class TorchAttention(PagedAttention):
    """SDPA over gathered blocks; decodes batched with a padding mask, prompt chunks one by one.

    ``key_tile``: the batch-invariant mode instead (``RowMetadata`` chunks, ``attend_fixed``).
    """

    decodes_first = True

    def __init__(self, pool: KVPool, key_tile: int | None = None) -> None:
        super().__init__(pool)
        self.key_tile = key_tile

    def prepare(self, meta: AttentionMetadata | RowMetadata) -> None:
        bs, device = self.pool.block_size, self.pool.device
        if isinstance(meta, RowMetadata):
            self.rows, self.write_at = meta, (meta.slots // bs, meta.slots % bs)
            return
        self.meta = meta
        self.write_at = (meta.slots // bs, meta.slots % bs)
        lens = meta.host_seq_lens
        nd = 0
        while nd < len(lens) and meta.host_query_lens[nd] == 1:
            nd += 1
        assert all(n != 1 for n in meta.host_query_lens[nd:]), "single-token rows must come first"
        self.num_decode = nd
        # Decodes in groups whose padded gather holds at most DECODE_GATHER_KEYS keys, so the copies stay
        # bounded (64 sequences of 40k tokens would be ~5 GB per layer gathered at once).
        self.decode_groups = []
        first = 0
        while first < nd:
            last, width = first + 1, lens[first]
            while last < nd and (last - first + 1) * max(width, lens[last]) <= DECODE_GATHER_KEYS:
                width = max(width, lens[last])
                last += 1
            positions = torch.arange(width, device=device)[None, :]
            seq_lens = meta.seq_lens[first:last, None].long()
            # Padding positions read the sequence's last key (written, finite) and are masked out.
            clamped = torch.minimum(positions, seq_lens - 1)
            blocks = meta.block_tables[first:last].long().gather(1, clamped // bs)
            mask = (positions < seq_lens)[:, None, None, :]  # [B, 1, 1, S]
            self.decode_groups.append((first, last, blocks, clamped % bs, mask))
            first = last
        self.prefill_gather = []
        for s in range(nd, len(lens)):
            positions = torch.arange(lens[s], device=device)
            self.prefill_gather.append((meta.block_tables[s].long()[positions // bs], positions % bs))

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        key_cache, value_cache = self.pool.key_layers[layer_idx], self.pool.value_layers[layer_idx]
        block, row = self.write_at
        key_cache[block, :, row] = k[0]
        value_cache[block, :, row] = v[0]
        if self.key_tile is not None:
            return self.attend_fixed(key_cache, value_cache, q, scale)
        outputs = []
        nd = self.num_decode
        for first, last, block, row, mask in self.decode_groups:
            qd = q[0, first:last].unsqueeze(2)  # [B, Hq, 1, D]
            kd = key_cache[block, :, row].transpose(1, 2)  # [B, Hkv, S, D]
            vd = value_cache[block, :, row].transpose(1, 2)
            out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
            outputs.append(out.squeeze(2))  # [B, Hq, D]
        qlens, lens = self.meta.host_query_lens, self.meta.host_seq_lens
        start = sum(qlens[:nd])
        for s, (block, row) in zip(range(nd, len(lens)), self.prefill_gather, strict=True):
            n = qlens[s]
            qs = q[:, start : start + n]
            ks, vs = key_cache[block, :, row][None], value_cache[block, :, row][None]
            outputs.append(causal_attention(qs, ks, vs, scale, offset=lens[s] - n)[0])
            start += n
        return torch.cat(outputs, dim=0).unsqueeze(0) if len(outputs) > 1 else outputs[0].unsqueeze(0)

    def attend_fixed(
        self, key_cache: torch.Tensor, value_cache: torch.Tensor, q: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Each query row over its own keys, in fp32, one tile of ``key_tile`` keys at a time (online softmax).

        Every op has the same shape in every call ([C, Hkv, G, D] x [C, Hkv, D, T] and so on), so the
        kernels torch picks do not change with the batch, and row i reads only row i's data. Tiles past a
        row's position are masked entirely and leave its running max, sum and output exactly as they
        were (a factor exp(0) = 1, added zeros): how many tiles a chunk needs does not change any row.
        """
        rows, bs, tile = self.rows, self.pool.block_size, self.key_tile
        c, hq, d = q.shape[1:]
        hkv = key_cache.shape[1]
        qf = q[0].float().view(c, hkv, hq // hkv, d)  # [C, Hkv, G, D]
        position = rows.positions[:, None]
        best = torch.full((c, hkv, hq // hkv, 1), float("-inf"), device=q.device)
        total = torch.zeros_like(best)
        acc = torch.zeros_like(qf)
        for start in range(0, rows.host_max_position + 1, tile):
            keys = start + torch.arange(tile, device=q.device)[None, :]  # [1, T]
            valid = keys <= position  # [C, T]
            at = torch.minimum(keys, position)  # masked keys read a written slot of the same sequence
            block, row = rows.tables.long().gather(1, at // bs), at % bs
            kt = key_cache[block, :, row].float().permute(0, 2, 3, 1)  # [C, Hkv, D, T]
            vt = value_cache[block, :, row].float().transpose(1, 2)  # [C, Hkv, T, D]
            scores = (qf @ kt * scale).masked_fill(~valid[:, None, None, :], float("-inf"))
            new_best = torch.maximum(best, scores.amax(dim=-1, keepdim=True))
            keep = torch.exp(best - new_best)
            weights = torch.exp(scores - new_best)
            total = total * keep + weights.sum(dim=-1, keepdim=True)
            acc = acc * keep + weights @ vt
            best = new_best
        return (acc / total).view(1, c, hq, d).to(q.dtype)


BACKENDS = {"kernel": KernelAttention, "torch": TorchAttention}


def kernel_attention_available(dtype: torch.dtype, device: torch.device | str) -> bool:
    return (
        torch.device(device).type == "cpu"
        and dtype in (torch.bfloat16, torch.float32)
        and kernels.kernels_available()
    )


def make_backend(name: str | None, pool: KVPool, key_tile: int | None = None) -> PagedAttention:
    """``"kernel"``, ``"torch"``, or None: the kernel where it runs (CPU, bf16/fp32, built), else torch.

    ``key_tile`` puts the torch backend in its batch-invariant mode (the kernel always is).
    """
    if name is None:
        name = "kernel" if kernel_attention_available(pool.dtype, pool.device) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: choose one of {sorted(BACKENDS)}")
    if name == "kernel" and not kernel_attention_available(pool.dtype, pool.device):
        raise ValueError(
            f"the kernel attention backend needs qwen3's CPU kernels and a bf16 or float32 cache on CPU "
            f"(got {pool.dtype} on {pool.device}, kernels {'on' if kernels.kernels_available() else 'off'})"
        )
    return KernelAttention(pool) if name == "kernel" else TorchAttention(pool, key_tile)
