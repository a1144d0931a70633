"""Qwen3 causal language models (dense and MoE), a contiguous KV cache, and greedy decoding.

``Qwen3ForCausalLM.forward(input_ids) -> logits`` is the whole model. Callers that decode pass
``positions`` and an attention backend (``KVCache`` here, the engine's paged cache later); callers
that need logits for a few positions only call ``hidden_states`` and ``compute_logits`` apart.

Parameter names follow the Hugging Face checkpoints except where matrices are fused for speed
(``qkv_proj``, ``gate_up_proj``, stacked experts); :func:`checkpoint_layout` says, for every
tensor name of a Hugging Face checkpoint, which slice of which parameter holds it. Loading and
saving both use that one map.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from qwen3 import kernels
from qwen3.config import Qwen3Config
from qwen3.layers import (
    MLP,
    AttentionBackend,
    DecoderLayer,
    Experts,
    Linear,
    NoCache,
    RMSNorm,
    RotaryEmbedding,
    causal_attention,
)

if TYPE_CHECKING:
    from qwen3.distributed import TensorParallel


class Qwen3Model(nn.Module):
    """Embedding, decoder layers, final norm: token ids to hidden states (``tp``: this rank's shard)."""

    def __init__(self, config: Qwen3Config, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp
        vocab = tp.vocab_shard[1] - tp.vocab_shard[0] if tp else config.vocab_size
        self.embed_tokens = nn.Embedding(vocab, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        max_position: int | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if self.tp is None else self.tp.embed(self.embed_tokens, input_ids)
        rope = self.rotary(positions, x.dtype, max_position)
        for layer in self.layers:
            x = layer(x, rope, backend)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """Dense Qwen3 (and, through :class:`Qwen3MoeForCausalLM`, the MoE variant).

    ``tp`` (qwen3.distributed): build this rank's shard only; the forward pass then meets the other ranks
    at the row-parallel layers' all-reduces and gathers the vocab-parallel logits.
    """

    def __init__(self, config: Qwen3Config, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = Qwen3Model(config, tp)
        self.lm_head = Linear(config.hidden_size, self.model.embed_tokens.num_embeddings, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        backend: AttentionBackend | None = None,
        max_position: int | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden]; positions default to 0..T-1 (or the cache's next).

        ``max_position``: an upper bound on the positions, if the caller knows one (no device read-back).
        """
        if positions is None:
            start = backend.length if isinstance(backend, KVCache) else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            positions = positions.expand(input_ids.shape[0], -1)
            max_position = start + input_ids.shape[1] - 1
        return self.model(input_ids, positions, backend or NoCache(), max_position)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return logits if self.tp is None else self.tp.gather_last(logits)

    @property
    def num_kv_heads(self) -> int:
        """KV heads this model's cache holds (this rank's, under tensor parallel)."""
        return self.model.layers[0].self_attn.num_kv_heads

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        backend: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab_size] for every input position."""
        return self.compute_logits(self.hidden_states(input_ids, positions, backend))

    def use_cpu_kernels(self) -> bool:
        """Repack bf16 or fp32 weights for qwen3's CPU kernels, and fuse the norms and RoPE (inference).

        The linear layers (and MoE experts) then run on the packed copies (costs a copy of the weights);
        RMSNorm and the attention's q/k norm + RoPE run as one C++ op each. The kernels are
        batch-invariant, so the model's output for a row no longer depends on the other rows.

        Returns False, changing nothing, when the model is not bf16/fp32 on CPU or the kernels are
        unavailable. Weights must not change afterwards: the packed copies would go stale.
        """
        if (
            self.device.type != "cpu"
            or self.dtype not in (torch.bfloat16, torch.float32)
            or not kernels.kernels_available()
        ):
            return False
        for module in self.modules():
            if isinstance(module, (MLP, Experts)) or isinstance(module, Linear) and module.packable:
                module.pack()
            elif isinstance(module, RMSNorm):
                module.fused = True  # and Attention then fuses its q/k norms with RoPE
        return True

    def use_fixed_shapes(self, slots: int) -> None:
        """Batch-invariant torch mode (the engine runs fixed-size chunks): MoE experts then route in fixed
        batches of ``slots`` (token, expert) slots instead of groups whose sizes follow the batch."""
        for module in self.modules():
            if isinstance(module, Experts):
                module.fixed_slots = slots

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> Qwen3ForCausalLM:
        """Random initialisation as transformers does it: N(0, std) matrices, zero biases, unit norms."""
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=gen)
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3-MoE: the same decoder with sparse expert blocks where ``config.is_sparse_layer`` says."""


def model_class(config: Qwen3Config) -> type[Qwen3ForCausalLM]:
    return Qwen3MoeForCausalLM if config.is_moe else Qwen3ForCausalLM


class KVCache:
    """A preallocated contiguous cache for a batch of B sequences that advance together.

    The simple cache for incremental decoding of equal-length prompts (tests, one-user CLI use);
    the engine's paged cache implements the same ``attend`` for many sequences of any length.
    """

    def __init__(
        self,
        config: Qwen3Config,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, max_len, config.num_key_value_heads, config.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens stored, advanced after the last layer has written

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        start, end = self.length, self.length + q.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.keys[layer_idx, :, start:end] = k
        self.values[layer_idx, :, start:end] = v
        if layer_idx == self.keys.shape[0] - 1:
            self.length = end
        return causal_attention(
            q, self.keys[layer_idx, :, :end], self.values[layer_idx, :, :end], scale, start
        )


@torch.inference_mode()
def greedy_generate(
    model: Qwen3ForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
) -> torch.Tensor:
    """Greedy continuation of a batch of equal-length prompts with a KV cache: [B, T] -> [B, T + n].

    The reference decoding path (tests compare it with transformers' ``generate``); serving goes
    through the engine. Stops early once every row has produced an eos id.
    """
    batch, prompt_len = input_ids.shape
    cache = KVCache(model.config, batch, prompt_len + max_new_tokens, model.dtype, model.device)
    tokens = input_ids
    out = [input_ids]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model.compute_logits(model.hidden_states(tokens, backend=cache)[:, -1])
        tokens = logits.argmax(dim=-1, keepdim=True)
        out.append(tokens)
        if eos_token_ids:
            done |= torch.isin(tokens.squeeze(1), torch.tensor(sorted(eos_token_ids), device=tokens.device))
            if bool(done.all()):
                break
    return torch.cat(out, dim=1)


# --- Checkpoint layout: Hugging Face tensor name -> (our parameter, index into it) -----------------

Index = tuple[int | slice, ...]


def checkpoint_layout(model: Qwen3ForCausalLM) -> dict[str, tuple[nn.Parameter, Index]]:
    """Every tensor a Hugging Face checkpoint of this model holds, and where it lives in ours."""
    config = model.config
    layout: dict[str, tuple[nn.Parameter, Index]] = {}
    whole: Index = (slice(None),)
    layout["model.embed_tokens.weight"] = (model.model.embed_tokens.weight, whole)
    layout["model.norm.weight"] = (model.model.norm.weight, whole)
    if not config.tie_word_embeddings:
        layout["lm_head.weight"] = (model.lm_head.weight, whole)
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        attn = layer.self_attn
        q, kv = attn.q_size, attn.kv_size
        rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
        for name, rs in rows.items():
            layout[f"{p}self_attn.{name}.weight"] = (attn.qkv_proj.weight, (rs,))
            if attn.qkv_proj.bias is not None:
                layout[f"{p}self_attn.{name}.bias"] = (attn.qkv_proj.bias, (rs,))
        layout[f"{p}self_attn.o_proj.weight"] = (attn.o_proj.weight, whole)
        if attn.o_proj.bias is not None:
            layout[f"{p}self_attn.o_proj.bias"] = (attn.o_proj.bias, whole)
        layout[f"{p}self_attn.q_norm.weight"] = (attn.q_norm.weight, whole)
        layout[f"{p}self_attn.k_norm.weight"] = (attn.k_norm.weight, whole)
        layout[f"{p}input_layernorm.weight"] = (layer.input_layernorm.weight, whole)
        layout[f"{p}post_attention_layernorm.weight"] = (layer.post_attention_layernorm.weight, whole)
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            layout[f"{p}mlp.gate.weight"] = (mlp.gate.weight, whole)
            size = mlp.experts.intermediate_size
            for e in range(mlp.experts.num_experts):  # local index e holds global expert first + e
                q = f"{p}mlp.experts.{mlp.first_expert + e}."
                gate_up = mlp.experts.gate_up_proj
                layout[f"{q}gate_proj.weight"] = (gate_up, (e, slice(0, size)))
                layout[f"{q}up_proj.weight"] = (gate_up, (e, slice(size, 2 * size)))
                layout[f"{q}down_proj.weight"] = (mlp.experts.down_proj, (e,))
        else:
            size = mlp.intermediate_size
            layout[f"{p}mlp.gate_proj.weight"] = (mlp.gate_up_proj.weight, (slice(0, size),))
            layout[f"{p}mlp.up_proj.weight"] = (mlp.gate_up_proj.weight, (slice(size, 2 * size),))
            layout[f"{p}mlp.down_proj.weight"] = (mlp.down_proj.weight, whole)
    return layout


def iter_checkpoint_tensors(model: Qwen3ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor view) pairs: what a saved checkpoint of this model contains."""
    for name, (param, index) in checkpoint_layout(model).items():
        if param.numel() > 1 and not any(param.stride()):  # a stand-in: the weights are held quantized
            raise ValueError(
                f"{name} is held quantized (a GGUF loaded as is); load it with an explicit dtype to save it"
            )
        yield name, param.detach()[index]
