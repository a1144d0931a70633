"""Random-initialised checkpoints written by transformers itself: the reference our model must match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # deliberately not hidden_size / num_attention_heads
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

TINY_MOE = dict(TINY, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2)


def make_hf_checkpoint(
    folder: Path, moe: bool = False, seed: int = 0, max_shard_size: str | None = None, **overrides: Any
) -> Path:
    """Build a transformers Qwen3 (or Qwen3-MoE) model with random weights and save_pretrained it."""
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(TINY_MOE if moe else TINY)
    kwargs.update(overrides)
    config_cls = transformers.Qwen3MoeConfig if moe else transformers.Qwen3Config
    model_cls = transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0; randomise them so mistakes show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **save_kwargs)
    return folder


def to_official_dialect(folder: Path) -> None:
    """Rewrite a transformers-5 config.json in the dialect of the official (transformers 4.51) checkpoints."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    rope = dict(raw.pop("rope_parameters", None) or {})
    raw["rope_theta"] = rope.pop("rope_theta", 10000.0)
    raw["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    if "num_local_experts" in raw:
        raw["num_experts"] = raw.pop("num_local_experts")
    raw["torch_dtype"] = raw.pop("dtype", "float32")
    raw.pop("layer_types", None)
    raw["transformers_version"] = "4.51.0"
    path.write_text(json.dumps(raw, indent=2))


def load_reference(folder: Path, dtype: torch.dtype = torch.float32):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
