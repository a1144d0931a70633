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


# Bounds every config.json field is checked against before anything is allocated. They are wide (the
# largest Qwen3 has 94 layers, 151,936 ids, hidden size 8,192, 128 experts) but finite, so a corrupt or
# hostile config fails at once instead of allocating a terabyte or looping a million layers.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 2**22),
    "hidden_size": (1, 2**16),
    "intermediate_size": (1, 2**18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (2, 2048),
    "max_position_embeddings": (1, 2**24),
    "num_experts": (0, 4096),
    "num_experts_per_tok": (1, 4096),
    "moe_intermediate_size": (1, 2**18),
    "decoder_sparse_step": (1, 1024),
}
_FLOAT_RANGES: dict[str, tuple[float, float]] = {  # open at 0, closed at the top
    "rms_norm_eps": (0.0, 1.0),
    "rope_theta": (0.0, 1e12),
    "router_aux_loss_coef": (-1.0, 1e3),
}
_BOOL_FIELDS = ("attention_bias", "tie_word_embeddings", "norm_topk_prob", "use_sliding_window")
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _check_quantization(quantization: Any) -> None:
    """Qwen's official FP8 and AWQ formats are read (dequantized at load); any other scheme is refused by name."""
    if quantization is None:
        return
    if not isinstance(quantization, dict):
        raise ConfigError(f"quantization_config must be an object, got {quantization!r}")
    method = quantization.get("quant_method")
    if method == "awq":
        version = str(quantization.get("version", "gemm")).lower()
        group = quantization.get("group_size")
        if (
            quantization.get("bits", 4) != 4
            or version != "gemm"
            or quantization.get("zero_point", True) is not True
        ):
            raise ConfigError(
                f"quantization_config: qwen3 reads 4-bit AWQ GEMM checkpoints with zero points, got {quantization}"
            )
        if not (_is_int(group) and 1 <= group <= 4096):
            raise ConfigError(f"quantization_config.group_size must be a positive integer, got {group!r}")
        return
    if method != "fp8":
        raise ConfigError(
            f"quantization_config.quant_method {method!r} is not supported yet (qwen3 reads Qwen's fp8 and "
            "AWQ checkpoints, and GGUF files)"
        )
    if quantization.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"quantization_config.fmt {quantization.get('fmt')!r}: qwen3 reads e4m3")
    block = quantization.get("weight_block_size")
    if not (
        isinstance(block, list) and len(block) == 2 and all(_is_int(b) and 1 <= b <= 4096 for b in block)
    ):
        raise ConfigError(f"quantization_config.weight_block_size must be [rows, columns], got {block!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field_types(raw: dict[str, Any]) -> None:
    """Types and ranges of the fields present in ``raw``, naming the first that is wrong."""
    for name, (low, high) in _INT_RANGES.items():
        value = raw.get(name)
        if value is None and name in ("head_dim", "num_key_value_heads"):
            continue  # derived when absent
        if name in raw and not (_is_int(value) and low <= value <= high):
            raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    for name, (low, high) in _FLOAT_RANGES.items():
        value = raw.get(name)
        if name in raw and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and low < value <= high
        ):
            raise ConfigError(f"{name} must be a number in ({low:g}, {high:g}], got {value!r}")
    for name in _BOOL_FIELDS:
        if raw.get(name) is not None and not isinstance(raw[name], bool):
            raise ConfigError(f"{name} must be true or false, got {raw[name]!r}")
    for name in _TOKEN_FIELDS:
        value = raw.get(name)
        ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
        if value is not None and not all(_is_int(i) and 0 <= i < 2**22 for i in ids):
            raise ConfigError(f"{name} must be a token id (or, for eos, a list of them), got {value!r}")
    layers = raw.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(_is_int(i) for i in layers)):
        raise ConfigError(f"mlp_only_layers must be a list of layer indices, got {layers!r}")
    for name in ("rope_scaling", "rope_parameters"):
        rope = raw.get(name)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ConfigError(f"{name} must be an object or null, got {rope!r}")
        factor = rope.get("factor")
        if factor is not None and not (isinstance(factor, (int, float)) and not isinstance(factor, bool)
                                       and 0 < factor <= 1024):  # fmt: skip
            raise ConfigError(f"{name}.factor must be a number in (0, 1024], got {factor!r}")
        original = rope.get("original_max_position_embeddings")
        if original is not None and not (_is_int(original) and 1 <= original <= 2**24):
            raise ConfigError(f"{name}.original_max_position_embeddings must be an integer in [1, 2**24]")
        theta = rope.get("rope_theta")
        if theta is not None and not (
            isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0
        ):
            raise ConfigError(f"{name}.rope_theta must be a positive number, got {theta!r}")


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
    # How the checkpoint's weights are stored when not plain floats: Qwen's fine-grained FP8 (e4m3 blocks
    # with a scale each). qwen3 dequantizes at load; a saved model is plain floats again.
    quantization_config: dict[str, Any] | None = None

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """The (rows, columns) of one FP8 scale block, for an FP8 checkpoint; None otherwise."""
        if not self.quantization_config or self.quantization_config["quant_method"] != "fp8":
            return None
        rows, cols = self.quantization_config["weight_block_size"]
        return rows, cols

    @property
    def awq_group_size(self) -> int | None:
        """Input rows per AWQ scale and zero, for an AWQ checkpoint; None otherwise."""
        if not self.quantization_config or self.quantization_config["quant_method"] != "awq":
            return None
        return self.quantization_config["group_size"]

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
        """Build from a parsed config.json of either dialect; unknown keys are ignored.

        Every field is checked (type, range, consistency) before the model is built: a wrong one raises
        :class:`ConfigError` naming it.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json must hold a JSON object, got a {type(raw).__name__}")
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
            raise ConfigError(
                f"model_type {model_type!r} is not a Qwen3 model; qwen3 loads {sorted(ARCHITECTURES)}"
            )
        architectures = raw.get("architectures") or [ARCHITECTURES[model_type]]
        if not isinstance(architectures, list) or ARCHITECTURES[model_type] not in architectures:
            raise ConfigError(
                f"architectures {architectures} do not match model_type {model_type!r} "
                f"(expected {ARCHITECTURES[model_type]})"
            )
        if raw.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported (no released Qwen3 model uses it)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {raw['hidden_act']!r} is not supported; Qwen3 uses silu")
        _check_field_types(raw)
        _check_quantization(raw.get("quantization_config"))

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
            _check_field_types({"num_experts": raw["num_local_experts"]})
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
        """Reject configs that would build a wrong model silently (the fields' consistency; their types and
        ranges were checked as they were read)."""
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
        if any(not 0 <= i < self.num_hidden_layers for i in self.mlp_only_layers):
            raise ConfigError(
                f"mlp_only_layers {self.mlp_only_layers} names layers outside [0, num_hidden_layers)"
            )
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            if any(
                i >= self.vocab_size
                for i in (value if isinstance(value, list) else [value] if value is not None else [])
            ):
                raise ConfigError(f"{name} {value} is outside the vocabulary (vocab_size {self.vocab_size})")

    def num_parameters(self) -> int:
        """Parameters the model holds (the lm_head counted unless tied): what loading will allocate."""
        attention = (
            self.hidden_size * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        )
        attention += 2 * self.head_dim + self.hidden_size * 2  # q/k norms, the two layer norms
        if self.attention_bias:
            attention += (
                self.head_dim * (self.num_attention_heads + 2 * self.num_key_value_heads) + self.hidden_size
            )
        dense = 3 * self.hidden_size * self.intermediate_size
        sparse = (
            self.num_experts * 3 * self.hidden_size * self.moe_intermediate_size
            + self.num_experts * self.hidden_size
        )
        total = sum(
            attention + (sparse if self.is_sparse_layer(i) else dense) for i in range(self.num_hidden_layers)
        )
        embeddings = self.vocab_size * self.hidden_size
        return total + embeddings * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def decode_parameters(self) -> int:
        """Parameters one batch-1 decode step reads, what its roofline divides by: all of them but the
        experts the router leaves out (``num_experts - num_experts_per_tok`` per sparse layer) and, unless
        the lm_head shares it, the embedding table, of which a step reads one row."""
        expert = 3 * self.hidden_size * self.moe_intermediate_size
        idle = sum(self.is_sparse_layer(i) for i in range(self.num_hidden_layers)) * expert
        table = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_parameters() - idle * (self.num_experts - self.num_experts_per_tok) - table

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
        out.pop("quantization_config")  # a saved model holds plain float weights
        out["use_sliding_window"] = False
        out["sliding_window"] = None
        return out
