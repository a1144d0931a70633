"""Sampling parameters and the batched sampler.

One step samples one token for every sequence that needs one, all rows at once: penalties (from counts
the engine keeps incrementally), temperature, top-k, top-p and min-p, then an exponential race for the
draw. Top-k runs ``torch.topk`` per group of rows that share a k (rows usually all share Qwen3's
recommended 20), and top-p and min-p then work on those k sorted candidates; only rows with top-k off
and top-p on sort the whole vocabulary, once. Every row is computed from its own logits alone, and a
seeded row draws its noise from its own ``torch.Generator`` in a shape fixed by its own parameters, so a
seeded request samples the same tokens whatever else shares its batch (greedy rows trivially so).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch

from qwen3.device import index_tensor
from qwen3.hub import read_json
from qwen3.structured import StructuredOutputs

# Per-request bounds, so that no request's stop matching can slow a step for everyone (the holdback scans
# every stop string against the text's tail each step).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 512
SEED_MIN, SEED_END = -(2**63), 2**64  # what torch.Generator.manual_seed accepts

_FIELD_TYPES = {
    "temperature": float, "top_p": float, "min_p": float, "presence_penalty": float,
    "frequency_penalty": float, "repetition_penalty": float,
    "top_k": int, "max_tokens": int, "seed": int, "logprobs": int, "n": int,
}  # fmt: skip
_OPTIONAL = {"max_tokens", "seed", "logprobs"}


def _is(value: Any, kind: type) -> bool:
    """An integer (not a bool; numpy's too) for ``int``; a finite real number (not a bool) for ``float``."""
    if isinstance(value, (bool, numpy.bool_)):
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Real) and math.isfinite(value)


class SamplingError(ValueError):
    """An invalid sampling parameter; ``field`` names it (the server turns this into a 400)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, per request (the names vLLM and OpenAI use)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None  # None: until eos, a stop, or the context is full
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives to return with each token's logprob
    n: int = 1
    ignore_eos: bool = False
    structured_outputs: StructuredOutputs | None = None  # what the answer must match (qwen3.structured)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable)
            ):
                raise SamplingError(name, f"must be a list, got {value!r}")
            setattr(self, name, list(value or []))
        for name, kind in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not (value is None and name in _OPTIONAL) and not _is(value, kind):
                raise SamplingError(
                    name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}"
                )
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 or -1 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 100, "must be in (0, 100]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("n", self.n >= 1, "must be >= 1"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("seed", self.seed is None or SEED_MIN <= self.seed < SEED_END, "must be in [-2**63, 2**64)"),
            ("stop", len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            (
                "stop",
                all(not isinstance(s, str) or len(s) <= MAX_STOP_CHARS for s in self.stop),
                f"at most {MAX_STOP_CHARS} characters each",
            ),
            (
                "stop_token_ids",
                len(self.stop_token_ids) <= MAX_STOP_STRINGS,
                f"at most {MAX_STOP_STRINGS} ids",
            ),
            ("stop_token_ids", all(_is(t, int) for t in self.stop_token_ids), "must be integers"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "must be true or false"),
            (
                "structured_outputs",
                self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
                "must be a qwen3.StructuredOutputs",
            ),
        ]
        for name, ok, message in checks:
            if not ok:
                shown = repr(getattr(self, name))
                raise SamplingError(
                    name, f"{message}, got {shown[:80] + '...' if len(shown) > 80 else shown}"
                )

    def for_choice(self, index: int) -> SamplingParams:
        """Choice ``index`` of an ``n``-choice request as its own sequence: ``n=1``, seed ``seed + index``
        (wrapped into the seed range, so any valid seed gives valid choice seeds)."""
        seed = self.seed
        if seed is not None:
            seed += index
            if seed >= SEED_END:
                seed -= SEED_END - SEED_MIN
        return self.replace(seed=seed, n=1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(
        cls, generation_config: Mapping[str, Any] | str | os.PathLike | None, **overrides: Any
    ) -> SamplingParams:
        """Defaults from a checkpoint's generation_config.json, given parsed or as the checkpoint folder
        (do_sample false means greedy)."""
        if generation_config is None or isinstance(generation_config, (str, os.PathLike)):
            folder = generation_config
            generation_config = read_json(Path(folder) / "generation_config.json") if folder else {}
        values: dict[str, Any] = {}
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if generation_config.get(key) is not None:
                values[key] = generation_config[key]
        if generation_config.get("do_sample") is False:
            values["temperature"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# Qwen3's recommended settings per mode (model card, Best Practices).
RECOMMENDED = {
    True: dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0),
    False: dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0),
}


@dataclass
class SamplingBatch:
    """The rows one step samples: host-side parameters (for decisions, no device sync) and device tensors.

    ``penalty_counts`` / ``prompt_mask`` ([rows, vocab], on the logits' device) are given for the rows in
    ``penalty_rows`` only, in that order: how often each token was generated, and which the prompt holds.
    """

    request_ids: list[str]
    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    temperature: torch.Tensor  # [rows] float32
    top_p: torch.Tensor
    min_p: torch.Tensor
    penalty_rows: list[int] = field(default_factory=list)
    penalty_counts: torch.Tensor | None = None  # [len(penalty_rows), vocab] int32
    prompt_mask: torch.Tensor | None = None  # [len(penalty_rows), vocab] bool
    presence: torch.Tensor | None = None  # [len(penalty_rows)] float32, and the two below
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    masked_rows: list[int] = field(default_factory=list)  # rows held to a grammar (qwen3.structured)
    banned: torch.Tensor | None = None  # [len(masked_rows), vocab] bool: the tokens those rows may not take


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: (logprob of the chosen token, [(token id, logprob), ...] top alternatives) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output, HF/vLLM style), presence and frequency (output only, OpenAI style).

    Reads the counts the engine keeps up to date token by token: nothing here is O(sequence length).
    """
    rows = batch.penalty_rows
    if not rows:
        return logits
    index = index_tensor(rows, logits.device)
    sub = logits.index_select(0, index)
    counts = batch.penalty_counts.to(sub.dtype)
    generated = batch.penalty_counts > 0
    if any(batch.params[i].repetition_penalty != 1.0 for i in rows):
        seen = generated | batch.prompt_mask
        rp = batch.repetition[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
    sub = sub - batch.frequency[:, None] * counts - batch.presence[:, None] * generated.to(sub.dtype)
    return logits.index_copy(0, index, sub)


def apply_masks(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Tokens a constrained row may not take become -inf, in place (no copy of the batch's logits): in one
    call when every row is constrained, in their order (the common case), else a row at a time."""
    rows = batch.masked_rows
    if rows:
        banned = batch.banned.to(logits.device, non_blocking=True)
        if rows == list(range(logits.shape[0])):
            logits.masked_fill_(banned, float("-inf"))
        else:
            for j, row in enumerate(rows):
                logits[row].masked_fill_(banned[j], float("-inf"))
    return logits


def _filter_sorted(
    values: torch.Tensor, top_p: torch.Tensor | None, min_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-p, then min-p, on candidates sorted by descending logit; dropped entries become -inf."""
    if top_p is not None:
        probs = values.softmax(dim=-1)
        # drop a candidate when the ones before it already reach top_p (the first is always kept)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        values = values.masked_fill(drop, float("-inf"))
    if min_p is not None:
        probs = values.softmax(dim=-1)
        values = values.masked_fill(
            probs < probs.max(dim=-1, keepdim=True).values * min_p[:, None], float("-inf")
        )
    return values


def _exponential(shape: tuple[int, int], generators: list[torch.Generator | None], device) -> torch.Tensor:
    """Exp(1) noise, row i from ``generators[i]`` when it has one (its own stream), else the global one."""
    noise = torch.empty(shape, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        fill = torch.empty((len(unseeded), shape[1]), device=device).exponential_()
        noise[index_tensor(unseeded, device)] = fill
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return noise


class Sampler:
    """Turns a [rows, vocab] logits tensor into one token per row (see the module docstring)."""

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
        logits = apply_penalties(logits.float(), batch)
        # logprobs are the model's (after penalties), not the grammar's: never -inf for an alternative
        masked_with_logprobs = batch.masked_rows and any(p.logprobs is not None for p in batch.params)
        raw = logits.clone() if masked_with_logprobs else logits
        logits = apply_masks(logits, batch)
        params = batch.params
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            index = index_tensor(greedy, logits.device)
            tokens[index] = logits.index_select(0, index).argmax(dim=-1)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            if not p.greedy:
                groups.setdefault(min(p.top_k, logits.shape[-1]), []).append(i)
        for k, rows in groups.items():
            tokens[index_tensor(rows, logits.device)] = self._sample(logits, rows, k, batch)
        token_ids = tokens.tolist()
        return SampleResult(token_ids, self._logprobs(raw, params, token_ids))

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[int], k: int, batch: SamplingBatch) -> torch.Tensor:
        """Tokens for rows that share top-k value ``k`` (0: off)."""
        index = index_tensor(rows, logits.device)
        scaled = logits.index_select(0, index) / batch.temperature[index].clamp_min(1e-5)[:, None]
        use_top_p = any(batch.params[i].top_p < 1 for i in rows)
        use_min_p = any(batch.params[i].min_p > 0 for i in rows)
        if k:
            values, candidates = scaled.topk(k, dim=-1)  # sorted, descending
        elif use_top_p:
            values, candidates = scaled.sort(dim=-1, descending=True)
        else:
            values, candidates = scaled, None  # min-p needs no order
        values = _filter_sorted(
            values, batch.top_p[index] if use_top_p else None, batch.min_p[index] if use_min_p else None
        )
        probs = values.softmax(dim=-1)
        # Exponential race (Gumbel-max in disguise): argmax(p / E) with E ~ Exp(1) samples from p.
        noise = _exponential(tuple(probs.shape), [batch.generators[i] for i in rows], logits.device)
        choice = (probs / noise).argmax(dim=-1)
        return choice if candidates is None else candidates.gather(1, choice[:, None]).squeeze(1)

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, params: list[SamplingParams], token_ids: list[int]
    ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(params)
        if not rows:
            return out
        logprobs = logits.index_select(0, index_tensor(rows, logits.device)).log_softmax(dim=-1)
        chosen = logprobs.gather(1, index_tensor([token_ids[i] for i in rows], logits.device)[:, None])
        width = max(params[i].logprobs for i in rows)
        top_values, top_ids = logprobs.topk(width, dim=-1) if width else (None, None)
        chosen_list = chosen.squeeze(1).tolist()
        top_v = top_values.tolist() if width else None
        top_i = top_ids.tolist() if width else None
        for j, i in enumerate(rows):
            k = params[i].logprobs
            top = list(zip(top_i[j][:k], top_v[j][:k], strict=True)) if k else []
            out[i] = (chosen_list[j], top)
        return out
