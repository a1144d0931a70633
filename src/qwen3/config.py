"""Model configuration: one dataclass for dense Qwen3 and Qwen3-MoE, read from either config.json dialect.

Official checkpoints were written by transformers 4.51 (``num_experts``, ``rope_theta``,
``rope_scaling``, ``torch_dtype``); transformers 5 writes ``num_local_experts``, ``rope_parameters``
(holding ``rope_theta``) and ``dtype``. :meth:`Qwen3Config.from_dict` folds both into the same fields,
so nothing downstream ever looks at the dialect again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes a model qwen3 does not implement."""


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"bfloat16"``/``torch.bfloat16``/``None`` to a torch dtype (or None); reject anything else."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and value not in _DTYPES.values():
            raise ConfigError(f"unsupported dtype {value}; use float32, bfloat16 or float16")
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {value!r}; use float32, bfloat16 or float16")
    return _DTYPES[name]


@dataclass
class Qwen3Config:
    """Everything the model code needs, with transformers' defaults for fields a config omits."""

    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None for plain RoPE; else a dict with at least "rope_type" ("yarn", "linear", ...).
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Mixture of experts (qwen3_moe only).
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001

    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen3_moe"

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def context_length(self) -> int:
        """Positions the model is meant to serve: ``max_position_embeddings``, or, with RoPE scaling
        (Qwen's YaRN recipe adds ``rope_scaling`` and leaves ``max_position_embeddings`` at 40,960),
        ``original_max_position_embeddings * factor`` (131,072 for factor 4), as vLLM derives it."""
        scaling = self.rope_scaling
        if not scaling:
            return self.max_position_embeddings
        factor = scaling.get("factor") or 1.0
        original = scaling.get("original_max_position_embeddings") or self.max_position_embeddings
        return max(self.max_position_embeddings, int(original * factor))

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` uses experts: the rule of transformers' Qwen3MoeDecoderLayer."""
        return (
            self.is_moe
            and self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen3Config:
        """Build from a parsed config.json of either dialect; unknown keys are ignored."""
        model_type = raw.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"model_type {model_type!r} is not a Qwen3 model; qwen3 loads {sorted(ARCHITECTURES)}"
            )
        architectures = raw.get("architectures") or [ARCHITECTURES[model_type]]
        if ARCHITECTURES[model_type] not in architectures:
            raise ConfigError(
                f"architectures {architectures} do not match model_type {model_type!r} "
                f"(expected {ARCHITECTURES[model_type]})"
            )
        if raw.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported (no released Qwen3 model uses it)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {raw['hidden_act']!r} is not supported; Qwen3 uses silu")

        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        # transformers 5 dialect: rope_theta lives inside rope_parameters, experts are "local".
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        if "rope_theta" in rope:
            values.setdefault("rope_theta", rope.pop("rope_theta"))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            values["rope_scaling"] = None
        else:
            rope["rope_type"] = rope_type
            rope.pop("type", None)
            values["rope_scaling"] = rope
        if "num_local_experts" in raw:
            values.setdefault("num_experts", raw["num_local_experts"])
        values["torch_dtype"] = parse_dtype(raw.get("torch_dtype", raw.get("dtype")))
        if values.get("head_dim") is None:
            values["head_dim"] = values.get("hidden_size", cls.hidden_size) // values.get(
                "num_attention_heads", cls.num_attention_heads
            )
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values.get("num_attention_heads", cls.num_attention_heads)
        values["mlp_only_layers"] = list(values.get("mlp_only_layers") or [])
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen3Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no config.json") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def validate(self) -> None:
        """Reject configs that would build a wrong model silently."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling["rope_type"]
            if rope_type not in ("yarn", "linear"):
                raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (yarn, linear)")
            if rope_type == "yarn" and "original_max_position_embeddings" not in self.rope_scaling:
                self.rope_scaling["original_max_position_embeddings"] = self.max_position_embeddings
        if self.is_moe and self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
            )

    def to_dict(self) -> dict[str, Any]:
        """config.json in the official (transformers 4.51) dialect, which every loader reads."""
        out: dict[str, Any] = {"architectures": [self.architecture]}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "torch_dtype":
                value = str(value).removeprefix("torch.") if value is not None else None
            out[f.name] = value
        if not self.is_moe:
            for name in (
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "norm_topk_prob",
                "decoder_sparse_step",
                "mlp_only_layers",
                "router_aux_loss_coef",
            ):
                out.pop(name)
        out["use_sliding_window"] = False
        out["sliding_window"] = None
        return out
