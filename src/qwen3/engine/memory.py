"""How big the KV cache is, and how long a sequence may get: sized from the memory the machine has.

The default budget is a share of what is free once the weights are loaded:

- CPU: ``CPU_KV_CACHE_FRACTION`` (half) of the RAM still available (``MemAvailable``, or the cgroup's
  limit when the process runs in a smaller container). Half, because the cache is not the only thing
  that grows: activations, the tokenizer, the server and whatever else runs on the machine need the
  rest, and the pool is allocated lazily (pages are committed as blocks are first written), so an
  unused share costs nothing. llama.cpp allocates its whole context up front; vLLM's CPU backend takes
  a fixed 4 GiB; a share scales from a laptop to a server.
- CUDA: vLLM's rule: ``gpu_memory_utilization`` (0.9) of the device's total memory, minus what is used
  once the weights are loaded and a forward pass of the largest step has run (its peak activations).

The budget never exceeds what ``max_num_seqs`` sequences of ``max_model_len`` tokens could fill. If the
checkpoint's whole context (40,960 tokens for every Qwen3) does not fit even once, ``max_model_len`` is
lowered to what fits and a warning names the flags; an explicit ``max_model_len`` that cannot fit is an
error at start-up, never a per-request surprise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qwen3.config import Qwen3Config
from qwen3.device import available_cpu_memory

logger = logging.getLogger(__name__)

CPU_KV_CACHE_FRACTION = 0.5
GPU_MEMORY_UTILIZATION = 0.9
MIN_CONTEXT = 256  # a cache smaller than this many tokens is a configuration mistake, not a cache


class KVCacheError(ValueError):
    """The KV cache cannot be sized as asked (too little memory for ``max_model_len``, and the like)."""


def kv_bytes_per_token(config: Qwen3Config, dtype: torch.dtype, kv_heads: int | None = None) -> int:
    """Keys and values of one token in every layer (``kv_heads``: the heads one rank holds, if not all)."""
    element = torch.empty((), dtype=dtype).element_size()
    heads = config.num_key_value_heads if kv_heads is None else kv_heads
    return 2 * config.num_hidden_layers * heads * config.head_dim * element


@dataclass
class KVCachePlan:
    num_blocks: int
    max_model_len: int
    memory_bytes: int  # what the pool takes
    budget_source: str  # how the budget was chosen, for the log


def plan_kv_cache(
    config: Qwen3Config,
    dtype: torch.dtype,
    budget_bytes: int,
    budget_source: str,
    block_size: int = 16,
    max_num_seqs: int = 64,
    max_model_len: int | None = None,
    kv_heads: int | None = None,
) -> KVCachePlan:
    """Blocks and context length for a KV-cache budget; pure arithmetic (tests run it for every config).

    ``kv_heads``: the KV heads one tensor-parallel rank holds (its cache is that much smaller per token, so
    the same budget holds more tokens); the budget is then per rank, as vLLM's is per GPU.

    ``max_model_len`` None means the checkpoint's context, lowered (with a warning) when it does not fit;
    an explicit value that does not fit, or exceeds the checkpoint's context, raises :class:`KVCacheError`.
    """
    context = config.context_length
    if max_model_len is not None and max_model_len > context:
        raise KVCacheError(
            f"max_model_len {max_model_len} exceeds the model's context of {context} tokens "
            f"(max_position_embeddings, and rope_scaling if any); add rope_scaling (YaRN) to config.json "
            f"to extend it, as Qwen's long-context guide does"
        )
    if max_model_len is not None and max_model_len < 1:
        raise KVCacheError(f"max_model_len must be >= 1, got {max_model_len}")
    per_block = kv_bytes_per_token(config, dtype, kv_heads) * block_size
    wanted = max_model_len or context
    useful = -(-wanted // block_size) * max_num_seqs * per_block  # more than this could never be used
    num_blocks = min(budget_bytes, useful) // per_block
    capacity = num_blocks * block_size
    gib = budget_bytes / 2**30
    if max_model_len is not None and capacity < max_model_len:
        raise KVCacheError(
            f"max_model_len {max_model_len} does not fit the KV cache: {budget_source} is {gib:.2f} GiB, "
            f"room for {capacity} tokens; lower --max-model-len or raise --kv-cache-memory"
        )
    if capacity < min(MIN_CONTEXT, wanted):
        raise KVCacheError(
            f"the KV cache would hold only {capacity} tokens ({budget_source}: {gib:.2f} GiB); "
            f"raise --kv-cache-memory"
        )
    if max_model_len is None and capacity < context:
        max_model_len = capacity
        logger.warning(
            "max_model_len lowered from the model's %d tokens to %d: that is what the KV cache holds "
            "(%s: %.2f GiB); raise --kv-cache-memory for longer sequences, or set --max-model-len",
            context, capacity, budget_source, gib,
        )  # fmt: skip
    return KVCachePlan(num_blocks, max_model_len or context, num_blocks * per_block, budget_source)


def default_budget(
    device: torch.device, fraction: float | None = None, activation_bytes: int = 0
) -> tuple[int, str]:
    """The KV-cache budget when none is given (see the module docstring), and how it was chosen.

    Call it once the weights are loaded. ``fraction`` replaces the device's default share;
    ``activation_bytes`` (CUDA) is the peak a forward pass of the largest step adds.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        share = GPU_MEMORY_UTILIZATION if fraction is None else fraction
        budget = int(total * share) - (total - free) - activation_bytes
        return max(
            budget, 0
        ), f"gpu_memory_utilization {share:g} of {total / 2**30:.1f} GiB less what is in use"
    share = CPU_KV_CACHE_FRACTION if fraction is None else fraction
    available = available_cpu_memory()
    return int(available * share), f"{share:g} of the {available / 2**30:.1f} GiB of RAM available"
