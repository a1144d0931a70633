"""``qwen3 train --stage grpo``: reasoning RL on the tasks' verifiable problems (the Qwen3 report's stage 2).

GRPO (Shao et al., 2024), as the report uses it, at the tiny model's scale. Each step:

1. ``prompts_per_step`` conversations of the agent stage's mix (:func:`qwen3.train.rollout.prompts`:
   thinking and non-thinking, soft and hard switches, multi-turn, the calculator offered), so both modes
   and tool calls keep being exercised; with ``prompt_stage`` 5, the polish stage's, which adds questions in
   other languages (answers count only in the question's language), off-skill questions (the honest
   refusal counts; ``off_skill`` of the prompts, SFT's share by default: refusals are nearly always
   right, so their groups are flat and carry no signal; 0.4 did not keep the non-thinking ones either,
   docs/tiny-model.md) and large tool problems; ``after_tool`` of the tool dialogs are asked after the tool's response, where the reward is
   for an answer that copies its result;
2. ``group_size`` replies to each through qwen3's engine (``LLM.run_requests`` with ``n``, seeded by (seed,
   step), all prompts in one batch), sampled from the policy itself: the engine's model is the model
   being trained (see :mod:`qwen3.train.rollout`);
3. rewards from the tasks' checkers (:func:`judge`): the exact answer, or for a prompt that offers the
   calculator for arithmetic, a call whose expression evaluates to the result (tool success); an answer
   only counts in the right format (the reply finished, and its think block is what the mode asks for),
   and the format alone earns ``format_reward``;
4. group-relative advantages, ``(r - mean(group)) / std(group)``; groups whose replies all scored the
   same carry no signal and are dropped (DAPO's dynamic sampling, without resampling);
5. ``updates_per_step`` optimizer steps on shuffled mini-batches of the remaining replies, minimising the
   clipped objective ``-min(ρA, clip(ρ, 1-ε, 1+ε)A)`` with ρ the ratio of the current policy to the
   one that sampled, averaged over all reply tokens of the mini-batch (a token-level mean, as DAPO and
   Dr. GRPO, so long replies are not down-weighted), plus ``kl_coef`` times the k3 estimate of the KL
   to the frozen starting model (the reference policy), when ``kl_coef > 0``.

The first mini-batch is exactly on-policy: the trainer's logprobs equal the engine's bit for bit
(``onpolicy_error`` in the history is their largest difference, 0.0); the later ones are one or more
updates off-policy, where the clip acts.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen3.checkpoint import load_model
from qwen3.eval import calculator_call_correct
from qwen3.llm import LLM
from qwen3.train import data, languages, rollout
from qwen3.train.trainer import make_optimizer

logger = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    """Everything that determines a GRPO run (written beside its output)."""

    seed: int = field(default=0, metadata={"help": "prompts and sampling follow from it"})
    steps: int = field(default=60, metadata={"help": "rollout batches"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts a rollout batch asks"})
    group_size: int = field(default=8, metadata={"help": "replies sampled per prompt (GRPO's group)"})
    updates_per_step: int = field(
        default=2, metadata={"help": "optimizer steps per rollout batch, on mini-batches of it"}
    )
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (after warm-up, constant)"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up, in rollout batches"})
    weight_decay: float = field(default=0.0, metadata={"help": "on matrices only"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm"})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range of the ratio"})
    kl_coef: float = field(default=0.0, metadata={"help": "weight of the KL to the starting model (0: off)"})
    format_reward: float = field(default=0.2, metadata={"help": "reward for the right format alone"})
    max_tokens: int = field(default=512, metadata={"help": "longest reply sampled (longer: no answer)"})
    prompt_stage: int = field(
        default=4, metadata={"help": "the SFT stage whose conversations are asked (4: agent; 5: polish, with "
                             "other languages, off-skill questions and large tool problems; 6: breadth, "
                             "stage 5 in composed phrasings)"}
    )  # fmt: skip
    agent_tools: float = field(
        default=0.25, metadata={"help": "share of prompts offered the calculator beyond the usual mix"}
    )
    off_skill: float = field(
        default=data.DataMix.off_skill, metadata={"help": "share of stage 5 and 6 prompts outside the skills "
                                                  "(the honest refusal is rewarded)"}
    )  # fmt: skip
    after_tool: float = field(
        default=0.0, metadata={"help": "share of tool dialogs asked after the tool's response (rewarded when "
                               "the answer holds the result)"}
    )  # fmt: skip
    micro_batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per forward pass"})

    def __post_init__(self) -> None:
        checks = [("group_size", self.group_size >= 2, "must be >= 2 (advantages are relative to the group)"),
                  ("prompts_per_step", self.prompts_per_step >= 1, "must be >= 1"),
                  ("updates_per_step", self.updates_per_step >= 1, "must be >= 1"),
                  ("steps", self.steps >= 0, "must be >= 0"),
                  ("clip_eps", 0 < self.clip_eps < 1, "must be in (0, 1)"),
                  ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
                  ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
                  ("lr", self.lr > 0, "must be > 0"),
                  ("prompt_stage", self.prompt_stage in (4, 5, 6), "must be 4, 5 or 6"),
                  ("off_skill", 0 <= self.off_skill <= 1 - data.DataMix.tool_problems,
                   f"must be in [0, {1 - data.DataMix.tool_problems}]"),
                  ("after_tool", 0 <= self.after_tool <= 1, "must be in [0, 1]")]  # fmt: skip
        rollout.check_config(self, checks)

    def learning_rate(self, step: int) -> float:
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))


def judge(r: rollout.Rollout) -> tuple[bool, bool]:
    """(correct, well formed) for one reply.

    Well formed: it finished (eos, not the length cap) and its think block is what the mode asks for:
    non-empty when thinking, empty after ``/no_think``, absent after ``enable_thinking=False`` (whose
    prompt already holds the empty block). Correct: the calculator called with an expression worth the
    result when the prompt offers it for arithmetic, otherwise no call and the exact answer, in the
    question's language (an off-skill question's answer is the honest refusal)."""
    prompt = r.prompt
    reasoning, content, calls = r.parsed
    if not prompt.enable_thinking:
        mode_ok = reasoning is None
    else:
        mode_ok = reasoning is not None and bool(reasoning.strip()) == prompt.thinking
    formed = r.finish_reason == "stop" and mode_ok
    if prompt.expects_tool_call:
        correct = len(calls) == 1 and calculator_call_correct(
            calls[0].name, calls[0].arguments, prompt.problem.result
        )
    else:
        correct = (
            not calls
            and prompt.problem.check(content)
            and languages.detect_language(content) == prompt.problem.language
        )
    return correct, formed


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[prompts, group] rewards -> advantages: each reward against its group's mean, over its std; exactly
    0 for a group whose rewards are all equal (its mean need not round to the rewards themselves)."""
    rewards = rewards.double()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    flat = (rewards.amax(dim=1) == rewards.amin(dim=1))[:, None]
    return torch.where(flat, 0.0, (rewards - mean) / std.clamp_min(1e-6))


class GRPO(rollout.OnPolicyRun):
    """One GRPO run from a checkpoint: the engine (whose model is trained), the reference, the optimizer."""

    name = "grpo"

    def __init__(
        self, config: GRPOConfig, model: str | Path | None, progress: bool = True,
        prompt_source: Callable[[int], list[rollout.Prompt]] | None = None,
    ) -> None:  # fmt: skip
        """``prompt_source(step)``: the step's prompts instead of :func:`qwen3.train.rollout.prompts`' mix
        (a narrower task, a fixed set)."""
        super().__init__()
        self.config = config
        self.prompt_source = prompt_source
        self.progress = progress
        rows = config.prompts_per_step * config.group_size
        self.llm = LLM(model, max_num_seqs=min(256, rows), max_num_batched_tokens=8192,
                       kv_cache_memory="1GiB", progress=False)  # fmt: skip
        self.model = self.llm.model
        self.tokenizer = self.llm.tokenizer
        self.reference = None
        if config.kl_coef > 0:
            self.reference = load_model(self.llm.model_dir, dtype=self.model.dtype, progress=False)
            self.reference.requires_grad_(False)
            self.reference.use_cpu_kernels()
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay)
        self.mix = dataclasses.replace(
            data.DataMix(), agent_tools=config.agent_tools, off_skill=config.off_skill
        )

    def rollouts(self, step: int) -> list[list[rollout.Rollout]]:
        """The step's groups of replies, judged and rewarded."""
        config = self.config
        if self.prompt_source is not None:
            prompts = self.prompt_source(step)
        else:
            prompts = rollout.prompts(
                config.seed, step, config.prompts_per_step, self.mix, config.prompt_stage, config.after_tool
            )
        seed = random.Random(f"grpo:{config.seed}:{step}").getrandbits(63)
        groups = rollout.generate(
            self.llm, prompts, rollout.sampling(config.max_tokens, seed, config.group_size)
        )
        for group in groups:
            for r in group:
                correct, formed = judge(r)
                r.extra = {"correct": float(correct and formed), "formed": float(formed)}
                r.reward = r.extra["correct"] + config.format_reward * formed
        return groups

    def train_step(self) -> dict[str, float]:
        """One rollout batch and its ``updates_per_step`` optimizer steps; returns the step's figures."""
        config, step = self.config, self.step
        start = time.perf_counter()
        groups = self.rollouts(step)
        generated = time.perf_counter() - start
        rewards = torch.tensor([[r.reward for r in g] for g in groups])
        advantages = group_advantages(rewards)
        kept = [(r, float(a)) for g, adv in zip(groups, advantages, strict=True)
                for r, a in zip(g, adv, strict=True) if a != 0]  # fmt: skip
        random.Random(f"grpo-shuffle:{config.seed}:{step}").shuffle(kept)
        lr = config.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        figures: dict[str, list[float]] = {"kl": [], "clipped": [], "onpolicy_error": []}
        updates = [kept[i :: config.updates_per_step] for i in range(config.updates_per_step)]
        for u, chunk in enumerate(c for c in updates if c):
            self._update(chunk, figures, first=u == 0)
        everything = [r for g in groups for r in g]
        record = {
            "step": step,
            "reward": float(rewards.mean()),
            "accuracy": _mean(r.extra["correct"] for r in everything),
            "formed": _mean(r.extra["formed"] for r in everything),
            "thinking_accuracy": _mean(r.extra["correct"] for r in everything if r.prompt.thinking),
            "non_thinking_accuracy": _mean(r.extra["correct"] for r in everything if not r.prompt.thinking),
            "reply_tokens": _mean(len(r.ids) for r in everything),
            "trained": len(kept),
            "lr": lr,
            "kl": _mean(figures["kl"]),
            "clipped": _mean(figures["clipped"]),
            "onpolicy_error": max(figures["onpolicy_error"], default=0.0),
            "seconds_generating": generated,
            "seconds": time.perf_counter() - start,
        }
        self.step += 1
        return record

    def _update(self, chunk: Sequence[tuple[rollout.Rollout, float]], figures: dict[str, list[float]],
                first: bool) -> None:  # fmt: skip
        """One optimizer step on a mini-batch of (reply, advantage), then the engine takes up the weights."""
        config = self.config
        samples = [r.sample for r, _ in chunk]
        old = [torch.tensor(r.logprobs) for r, _ in chunk]
        reference = rollout.score(self.reference, samples) if self.reference is not None else None
        tokens = sum(len(r.ids) for r, _ in chunk)
        pad_id = self.tokenizer.pad_token_id
        self.model.train()
        for group in data.micro_batch_groups(samples, config.micro_batch_tokens):
            batch, logprobs, mask = rollout.policy_logprobs(self.model, samples, group, pad_id)
            old_lp = rollout.placed([samples[i] for i in group], [old[i] for i in group], mask)
            advantage = torch.tensor([chunk[i][1] for i in group])[:, None]
            ratio = torch.exp(logprobs - old_lp)
            clipped = ratio.clamp(1 - config.clip_eps, 1 + config.clip_eps)
            loss = -torch.min(ratio * advantage, clipped * advantage)
            if first:
                figures["onpolicy_error"].append(float(((logprobs.detach() - old_lp).abs() * mask).max()))
            if reference is not None:
                ref = rollout.placed([samples[i] for i in group], [reference[i] for i in group], mask)
                delta = ref - logprobs
                kl = torch.exp(delta) - delta - 1  # k3: unbiased, never negative
                loss = loss + config.kl_coef * kl
                figures["kl"].append(float((kl.detach() * mask).sum() / mask.sum()))
            figures["clipped"].append(float(((ratio.detach() != clipped.detach()) & mask).sum() / mask.sum()))
            ((loss * mask).sum() / tokens).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.llm.refresh_weights()

    def summary(self, record: dict[str, Any]) -> dict[str, str]:
        keys = ("reward", "accuracy", "formed", "kl")
        return {**{k: f"{record[k]:.3f}" for k in keys}, "tokens": f"{record['reply_tokens']:.0f}",
                "s": f"{record['seconds']:.1f}"}  # fmt: skip


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def run(config: GRPOConfig, model: str | None, output: Path) -> int:
    """``qwen3 train --stage grpo``: the run, its model in ``output/model``, its curve in ``output``."""
    trainer = GRPO(config, model)
    logger.info("GRPO from %s: %d steps of %d prompts x %d replies", trainer.llm.model_dir, config.steps,
                config.prompts_per_step, config.group_size)  # fmt: skip
    trainer.train()
    folder = trainer.export(output / "model")
    curve = trainer.plot(output / "reward.png", ("reward", "thinking_accuracy", "non_thinking_accuracy"),
                         "on the step's sampled replies")  # fmt: skip
    logger.info("model written to %s (curve: %s)", folder, curve)
    return 0
