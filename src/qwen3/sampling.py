"""Sampling parameters and the batched sampler.

One step samples one token for every scheduled sequence at once: penalties, temperature, top-k,
top-p and min-p are applied to the whole [B, vocab] logits tensor; only the random draw is per row,
from the request's own ``torch.Generator`` when it has a seed, so a seeded request samples the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 or -1 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("n", self.n >= 1, "must be >= 1"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise SamplingError(name, f"{message}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(cls, folder: str | Path | None, **overrides: Any) -> SamplingParams:
        """Defaults from a checkpoint's generation_config.json (do_sample false means greedy)."""
        values: dict[str, Any] = {}
        path = Path(folder) / "generation_config.json" if folder else None
        if path is not None and path.is_file():
            raw = json.loads(path.read_text(encoding="utf-8"))
            for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
                if raw.get(key) is not None:
                    values[key] = raw[key]
            if raw.get("do_sample") is False:
                values["temperature"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# Qwen3's recommended settings per mode (model card, Best Practices).
RECOMMENDED = {
    True: dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0),
    False: dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0),
}


@dataclass
class SampleRequest:
    """What the sampler needs to know about one row: its params, history and random generator."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: (logprob of the chosen token, [(token id, logprob), ...] top alternatives) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def apply_penalties(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """Repetition (prompt + output, HF/vLLM style), presence and frequency (output only, OpenAI style)."""
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(row.prompt_token_ids + row.output_token_ids, dtype=torch.long)
            seen = seen[seen < vocab].unique().to(logits.device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            out = torch.tensor(row.output_token_ids, dtype=torch.long)
            counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.device, logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for rows that sample; masked entries become -inf."""
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=logits.device)
    logits = logits / temps.clamp_min(1e-5).unsqueeze(1)
    top_k = [r.params.top_k for r in rows]
    if any(top_k):
        k = torch.tensor([t or logits.shape[-1] for t in top_k], device=logits.device)
        kth = logits.sort(dim=-1, descending=True).values.gather(
            1, (k - 1).clamp(max=logits.shape[-1] - 1)[:, None]
        )
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=logits.dtype, device=logits.device)
    if bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first is always kept)
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p[:, None]
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=logits.dtype, device=logits.device)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


class Sampler:
    """Turns a [B, vocab] float logits tensor into one token per row."""

    def __call__(self, logits: torch.Tensor, rows: list[SampleRequest]) -> SampleResult:
        logits = apply_penalties(logits.float(), rows)
        want_logprobs = [r.params.logprobs is not None for r in rows]
        logprobs_all = logits.log_softmax(dim=-1) if any(want_logprobs) else None
        greedy = [r.params.greedy for r in rows]
        tokens = logits.argmax(dim=-1)
        if not all(greedy):
            sampling = [i for i, g in enumerate(greedy) if not g]
            sub_rows = [rows[i] for i in sampling]
            probs = filter_logits(logits[sampling], sub_rows).softmax(dim=-1)
            for j, i in enumerate(sampling):
                # Exponential race (Gumbel-max in disguise): argmax(p / E) with E ~ Exp(1) samples from p.
                noise = torch.empty_like(probs[j]).exponential_(generator=rows[i].generator)
                tokens[i] = (probs[j] / noise).argmax()
        token_ids = tokens.tolist()
        logprobs: list[tuple[float, list[tuple[int, float]]] | None] = []
        for i, row in enumerate(rows):
            if logprobs_all is None or row.params.logprobs is None:
                logprobs.append(None)
                continue
            chosen = float(logprobs_all[i, token_ids[i]])
            top: list[tuple[int, float]] = []
            if row.params.logprobs:
                values, ids = logprobs_all[i].topk(row.params.logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            logprobs.append((chosen, top))
        return SampleResult(token_ids, logprobs)
