"""The building blocks of a Qwen3 decoder: RMSNorm, rotary embedding, attention, SwiGLU MLP, MoE block.

Numerics follow transformers' Qwen3 modelling code (the reference): RMSNorm in float32 with the
weight applied after casting back, RoPE tables computed in float32 and cast to the activation
dtype, softmax routing in float32. Attention computes q, k, v (per-head RMSNorm on q and k before
RoPE, as Qwen3 adds over Qwen2) and hands the actual attention to a backend object, so the same
module runs with no cache, a contiguous KV cache, or the engine's paged cache.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qwen3 import kernels
from qwen3.config import Qwen3Config

if TYPE_CHECKING:
    from qwen3.distributed import TensorParallel


class Linear(nn.Linear):
    """``nn.Linear`` that can also run on a repacked copy of its weight (the CPU decode kernel).

    :meth:`pack` is called once after loading for bf16 or fp32 weights on CPU; until then, and for
    every other dtype or device, it is exactly ``nn.Linear``.
    """

    packed: kernels.PackedWeight | kernels.QuantWeight | tuple[kernels.QuantWeight, ...] | None = None
    packable = True  # False where the owner packs this weight in a fused layout of its own
    # Row-parallel (tensor parallel): the ranks' partial products are summed here, then the bias added once.
    reduce: TensorParallel | None = None

    def pack(self) -> None:
        if self.quantized:
            return  # the kernels' weights came with the checkpoint
        self.packed = kernels.pack_linear_weight(self.weight.detach())

    @property
    def quantized(self) -> bool:
        """Whether the weight is held quantized (``weight`` is then a stand-in: see qwen3.quantized)."""
        return isinstance(self.packed, (kernels.QuantWeight, tuple))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.reduce is None else None
        if self.packed is None:
            out = F.linear(x, self.weight, bias)
        else:
            out = kernels.linear(x, self.weight, self.packed, bias)
        if self.reduce is None:
            return out
        out = self.reduce.all_reduce(out)
        return out if self.bias is None else out + self.bias


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32 like the reference."""

    fused = False  # set by Qwen3ForCausalLM.use_cpu_kernels: CPU inference runs the one-pass C++ op

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not x.requires_grad:
            return kernels.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inverse_frequencies(config: Qwen3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale for plain, linear or YaRN RoPE (transformers' formulas)."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"], 1.0
    # YaRN: blend interpolated and extrapolated frequencies over a ramp of dimensions.
    factor = (
        scaling.get("factor") or config.max_position_embeddings / scaling["original_max_position_embeddings"]
    )
    original_max = scaling["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by position, grown on demand (YaRN contexts reach 131k positions)."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self._cos = self._sin = torch.empty(0)

    def _grow(self, length: int, device: torch.device) -> None:
        inv_freq, scale = rope_inverse_frequencies(self.config)
        length = max(length, 2 * self._cos.shape[0], 4096)
        freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin = (emb.cos() * scale).to(device), (emb.sin() * scale).to(device)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, max_position: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape positions.shape + (head_dim,), in ``dtype``.

        ``max_position`` (an upper bound on ``positions``, known to the caller) spares reading the
        positions back from the device, a host sync on CUDA.
        """
        if max_position is not None:
            needed = max_position + 1
        else:
            needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._cos.shape[0] or self._cos.device != positions.device:
            self._grow(needed, positions.device)
        return self._cos[positions].to(dtype), self._sin[positions].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, T, H, D] with cos/sin [B, T, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class AttentionBackend(Protocol):
    """Where keys and values are kept and attention is computed; the model never knows which one.

    ``q`` is [B, T, Hq, D]; ``k`` and ``v`` are [B, T, Hkv, D] for the new tokens only (RoPE applied).
    Returns [B, T, Hq, D]. A backend with a cache stores k and v before attending.
    """

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor: ...


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, offset: int = 0
) -> torch.Tensor:
    """SDPA over [B, T, H, D] tensors; query i sees keys 0..offset+i (grouped-query heads expanded)."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    t, s = q.shape[2], k.shape[2]
    if t == 1 or offset == 0 and t == s:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale)
    else:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


class NoCache:
    """Full-sequence causal attention with nothing kept: training and one-shot scoring."""

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return causal_attention(q, k, v, scale)


class Attention(nn.Module):
    """Grouped-query attention with QK-norm; fused q/k/v projection (one matmul per step).

    With ``tp`` it holds this rank's heads only (column-parallel q/k/v, row-parallel o_proj).
    """

    def __init__(self, config: Qwen3Config, layer_idx: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = tp.num_heads if tp else config.num_attention_heads
        self.num_kv_heads = tp.num_kv_heads if tp else config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        self.o_proj.reduce = tp
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend
    ) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        cos, sin = rope
        v = qkv[..., self.q_size + self.kv_size :].view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm.fused and not qkv.requires_grad:  # q/k norm and RoPE in one C++ pass
            q, k = kernels.qk_norm_rope(
                qkv.view(b * t, -1), self.q_norm.weight, self.k_norm.weight, cos.reshape(b * t, -1),
                sin.reshape(b * t, -1), self.num_heads, self.num_kv_heads, self.q_norm.eps,
            )  # fmt: skip
            q, k = q.view(b, t, self.num_heads, self.head_dim), k.view(b, t, self.num_kv_heads, self.head_dim)
        else:
            q, k = qkv[..., : self.q_size + self.kv_size].split([self.q_size, self.kv_size], dim=-1)
            q = apply_rotary(self.q_norm(q.view(b, t, self.num_heads, self.head_dim)), cos, sin)
            k = apply_rotary(self.k_norm(k.view(b, t, self.num_kv_heads, self.head_dim)), cos, sin)
        out = backend.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.reshape(b, t, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward with gate and up fused into one matrix: down(silu(gate(x)) * up(x)).

    With ``tp`` it holds this rank's slice of the intermediate size (column-parallel gate/up,
    row-parallel down_proj).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        intermediate_size = tp.intermediate_size if tp else intermediate_size
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.gate_up_proj.packable = False  # packed below, gate and up rows interleaved
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.down_proj.reduce = tp
        # packed for the bf16 kernel; or quantized: fused, or (gate, up) in two formats
        self.packed_gate_up: (
            kernels.PackedWeight | kernels.QuantWeight | tuple[kernels.QuantWeight, ...] | None
        ) = None

    def pack(self) -> None:
        """Interleave gate and up rows for the kernel that computes silu(gate) * up in one pass."""
        if isinstance(self.packed_gate_up, (kernels.QuantWeight, tuple)):
            return  # quantized with the checkpoint
        gate, up = self.gate_up_proj.weight.detach().chunk(2, dim=0)
        self.packed_gate_up = kernels.pack_gate_up_weight(gate, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_gate_up is not None and not x.requires_grad:
            return self.down_proj(kernels.gate_up_silu(x, self.packed_gate_up))
        if isinstance(self.packed_gate_up, (kernels.QuantWeight, tuple)):  # gate_up_proj.weight is a stand-in
            raise RuntimeError("quantized weights are for inference; load the model in bfloat16 to train")
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """All experts' weights of one layer stacked, so tokens are routed in grouped batches."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.packed: list[tuple[kernels.PackedWeight, kernels.PackedWeight]] | None = None
        self.quant: tuple[kernels.QuantWeight, kernels.QuantWeight] | None = None  # (gate/up, down), stacked
        self.fixed_slots: int | None = None  # batch-invariant torch mode: gather path in batches of this size

    def pack(self) -> None:
        """Each expert's gate/up (interleaved, for the fused SiLU) and down weights for the CPU kernels."""
        if self.quant is not None:
            return  # quantized with the checkpoint
        size = self.intermediate_size
        self.packed = [
            (kernels.pack_gate_up_weight(gu[:size], gu[size:]), kernels.pack_linear_weight(down))
            for gu, down in zip(self.gate_up_proj.detach(), self.down_proj.detach(), strict=True)
        ]

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_ids and weights [N, k]. Returns sum_k weights * expert_k(x), [N, H]."""
        n, top_k = expert_ids.shape
        flat_ids = expert_ids.reshape(-1)
        if self.quant is not None:
            if x.requires_grad:
                raise RuntimeError("quantized experts are for inference; load the model in bfloat16 to train")
            return kernels.quant_moe(x, *self.quant, expert_ids, weights)
        if self.packed is not None and not x.requires_grad:
            return self._grouped(x, flat_ids, weights, top_k, self._packed_expert)
        if self.fixed_slots is not None:
            return self._fixed_slots(x, flat_ids, weights)
        if n * top_k <= self.num_experts:
            # Few tokens (decode): gather just the chosen experts' weights and run one batched matmul.
            h = torch.bmm(self.gate_up_proj[flat_ids], x.repeat_interleave(top_k, dim=0).unsqueeze(-1))
            gate, up = h.squeeze(-1).chunk(2, dim=-1)
            out = torch.bmm(self.down_proj[flat_ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
            out = out * weights.reshape(-1, 1)
            return out.view(n, top_k, -1).sum(dim=1)
        return self._grouped(x, flat_ids, weights, top_k, self._torch_expert)

    def _fixed_slots(self, x: torch.Tensor, flat_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The gather path in batches of exactly ``fixed_slots`` (token, expert) slots, zero-padded: every
        batched matmul has one shape, so a token's result does not depend on the others (torch path)."""
        n, top_k = weights.shape
        size, total = self.fixed_slots, flat_ids.numel()
        pad = -total % size
        ids = F.pad(flat_ids, (0, pad))
        xs = F.pad(x.repeat_interleave(top_k, dim=0), (0, 0, 0, pad))
        out = []
        for i in range(0, total + pad, size):
            chosen = ids[i : i + size]
            h = torch.bmm(self.gate_up_proj[chosen], xs[i : i + size].unsqueeze(-1)).squeeze(-1)
            gate, up = h.chunk(2, dim=-1)
            out.append(torch.bmm(self.down_proj[chosen], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1))
        y = torch.cat(out)[:total] * weights.reshape(-1, 1)
        return y.view(n, top_k, -1).sum(dim=1)

    def _torch_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[expert])

    def _packed_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.packed[expert]
        return kernels.packed_linear(kernels.packed_gate_up_silu(x, gate_up), down)

    def _grouped(self, x, flat_ids, weights, top_k, expert_fn) -> torch.Tensor:
        """Sort token slots by expert and run each used expert once on its group of tokens.

        Each token's outputs are summed in expert order, and (with the kernels) each expert's rows do not
        depend on the group's size, so a token's result does not depend on the other tokens.
        """
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of_slot = order // top_k
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            slots = order[start : start + count]
            tokens = token_of_slot[start : start + count]
            start += count
            y = expert_fn(expert, x[tokens]) * weights.reshape(-1)[slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


class SparseMoeBlock(nn.Module):
    """Softmax router, top-k experts (optionally renormalised), no shared expert.

    With ``tp`` the router is replicated and every rank routes every token (the tokens are already on every
    rank, after attention's all-reduce); each rank runs the experts it holds and one all-reduce sums the
    ranks' partial outputs. Tensor parallel holds a 1/N slice of every expert; expert parallel holds E / N
    whole experts and runs only the (token, expert) slots routed to them, found through ``expert_map``
    (global id -> local index, -1 elsewhere), as vLLM's.
    """

    def __init__(self, config: Qwen3Config, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        local = len(tp.local_experts) if tp else config.num_experts
        size = tp.moe_intermediate_size if tp else config.moe_intermediate_size
        self.experts = Experts(local, config.hidden_size, size)
        self.first_expert = tp.local_experts.start if tp else 0  # global id of experts[0]
        # a plain tensor, not a buffer: the model is built on the meta device and this is never loaded
        self.expert_map = (
            torch.tensor(tp.expert_map, device="cpu") if tp is not None and tp.expert_parallel else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        if self.expert_map is None:
            out = self.experts(flat, expert_ids, weights)
        else:
            out = self._local_slots(flat, expert_ids, weights)
        return (out if self.tp is None else self.tp.all_reduce(out)).view(shape)

    def _local_slots(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Expert parallel: this rank's share of sum_k weights * expert_k(x), from the slots routed to the
        experts it holds (each slot then runs as a top-1 row; a token's slots are summed in top-k order)."""
        if self.expert_map.device != x.device:
            self.expert_map = self.expert_map.to(x.device)
        local = self.expert_map[expert_ids].reshape(-1)
        slots = (local >= 0).nonzero().squeeze(1)
        out = torch.zeros_like(x)
        if slots.numel():
            tokens = slots // self.top_k
            y = self.experts(x[tokens], local[slots, None], weights.reshape(-1)[slots, None])
            out.index_add_(0, tokens, y)
        return out


class DecoderLayer(nn.Module):
    """Pre-norm attention and feed-forward (dense SwiGLU or MoE), each with a residual."""

    def __init__(self, config: Qwen3Config, layer_idx: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, tp)
        self.mlp: nn.Module = (
            SparseMoeBlock(config, tp)
            if config.is_sparse_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size, tp)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, backend)
        return x + self.mlp(self.post_attention_layernorm(x))
