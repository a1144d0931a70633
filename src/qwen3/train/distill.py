"""``qwen3 train --stage distill --teacher M``: strong-to-weak distillation, as the Qwen3 report does it
for its small models (../shared/spec/qwen3_tech_report_excerpts.txt, section 4.5), in two phases:

1. **Off-policy** (the first ``offpolicy_steps`` steps): the teacher answers the step's prompts
   (thinking and non-thinking, the mix of SFT stage ``prompt_stage`` from
   :func:`qwen3.train.rollout.prompts`, with ``after_tool`` of the tool dialogs asked after the tool's
   response so that copying its result is learned too, and ``budget_cut`` of the thinking prompts given
   a random thinking budget, so that the answer after the engine's cut is learned too), sampled through
   its engine, and the student learns those replies by cross-entropy on the reply tokens (not on the
   stop-thinking text the engine inserts).
2. **On-policy** (the rest): the student answers the prompts itself, through its own engine (whose model
   is the student being trained, as in GRPO), and at every position of its replies is pulled toward the
   teacher's next-token distribution by the **reverse KL**, ``KL(student || teacher) = Σ_v p_s(v) (log
   p_s(v) - log p_t(v))``, summed exactly over the vocabulary and averaged over reply tokens.

Why reverse KL: on its own samples the student is corrected where it actually goes, and reverse KL
punishes putting mass where the teacher puts none (mode-seeking) rather than asking a smaller model to
cover every mode of the teacher (forward KL's mass-covering), which is the choice of on-policy
distillation in GKD (Agarwal et al., 2024) and of the per-token reverse KL in later on-policy
distillation work. Computed over the full vocabulary (1,024 ids for the tiny models), the per-position
loss has no sampling variance; the only randomness is which prefixes the student visits.

Both models share the teacher's tokenizer. Without ``--model`` the student is a fresh model of the
teacher's architecture, ``student_layers`` layers of width ``student_hidden`` (the defaults make it
about a third of the shipped model's 3.4M parameters).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen3.config import Qwen3Config
from qwen3.llm import LLM
from qwen3.model import Qwen3ForCausalLM
from qwen3.train import data, rollout
from qwen3.train.trainer import export_model, make_optimizer, supervised_loss, warmup_cosine

logger = logging.getLogger(__name__)

HEAD_DIM = 64  # the fresh student's attention head size (as the shipped model's)


@dataclass
class DistillConfig:
    """Everything that determines a distillation run (written beside its output)."""

    seed: int = field(
        default=0, metadata={"help": "the student's weights, prompts and sampling follow from it"}
    )
    steps: int = field(default=300, metadata={"help": "optimizer steps in all"})
    offpolicy_steps: int = field(
        default=200, metadata={"help": "of those, first ones on the teacher's replies"}
    )
    prompts_per_step: int = field(default=32, metadata={"help": "prompts (one reply each) per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate (cosine decay to 10%)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up"})
    weight_decay: float = field(default=0.1, metadata={"help": "on matrices only"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm"})
    max_tokens: int = field(default=512, metadata={"help": "longest reply sampled"})
    prompt_stage: int = field(
        default=5,
        metadata={"help": "the SFT stage whose conversations are asked (4: agent; 5: polish; 6: breadth)"},
    )
    after_tool: float = field(
        default=0.5, metadata={"help": "share of tool dialogs asked after the tool's response (the reply "
                               "that copies the result)"}
    )  # fmt: skip
    budget_cut: float = field(
        default=0.3, metadata={"help": "share of thinking prompts (no tools) given a random thinking budget, "
                               "so the answer after the engine's cut is learned (SFT stage 4's share)"}
    )  # fmt: skip
    micro_batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per forward pass"})
    student_layers: int = field(default=3, metadata={"help": "fresh student: decoder layers"})
    student_hidden: int = field(default=192, metadata={"help": "fresh student: hidden size (heads of 64)"})
    student_intermediate: int = field(default=384, metadata={"help": "fresh student: MLP width"})

    def __post_init__(self) -> None:
        checks = [("steps", self.steps >= 0, "must be >= 0"),
                  ("offpolicy_steps", self.offpolicy_steps >= 0, "must be >= 0"),
                  ("prompts_per_step", self.prompts_per_step >= 1, "must be >= 1"),
                  ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
                  ("lr", self.lr > 0, "must be > 0"),
                  ("prompt_stage", self.prompt_stage in (4, 5, 6), "must be 4, 5 or 6"),
                  ("after_tool", 0 <= self.after_tool <= 1, "must be in [0, 1]"),
                  ("budget_cut", 0 <= self.budget_cut <= 1, "must be in [0, 1]")]  # fmt: skip
        rollout.check_config(self, checks)

    def learning_rate(self, step: int) -> float:
        return warmup_cosine(step, self.lr, self.warmup_steps, self.steps, 0.1)

    def student(self, teacher: Qwen3Config) -> Qwen3ForCausalLM:
        """A fresh student: the teacher's architecture (vocabulary, RoPE, norms), narrower and shallower."""
        heads = self.student_hidden // HEAD_DIM
        if heads < 1 or self.student_hidden % HEAD_DIM:
            raise ValueError(f"student_hidden must be a multiple of {HEAD_DIM}, got {self.student_hidden}")
        config = dataclasses.replace(
            teacher, hidden_size=self.student_hidden, intermediate_size=self.student_intermediate,
            num_hidden_layers=self.student_layers, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2), head_dim=HEAD_DIM,
        )  # fmt: skip
        torch.manual_seed(self.seed)
        return Qwen3ForCausalLM(config).init_weights(seed=self.seed)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) at every position [..., vocab] -> [...], exact over the vocabulary."""
    s = student_logits.float().log_softmax(dim=-1)
    t = teacher_logits.float().log_softmax(dim=-1)
    return (s.exp() * (s - t)).sum(dim=-1)


class Distiller(rollout.OnPolicyRun):
    """A run: the teacher's engine, the student's engine (whose model is trained), the optimizer."""

    name = "distill"

    def __init__(
        self, config: DistillConfig, teacher: str | Path, output: Path, student: str | Path | None = None,
        progress: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.config = config
        self.progress = progress
        engine = dict(max_num_seqs=min(256, config.prompts_per_step), max_num_batched_tokens=8192,
                      kv_cache_memory="512MiB", progress=False)  # fmt: skip
        self.teacher = LLM(teacher, **engine)
        self.teacher.model.requires_grad_(False)
        if student is None:  # the fresh student's first weights, for its engine to load
            student = export_model(
                config.student(self.teacher.model.config), self.teacher.tokenizer, output / "student-init"
            )
        self.student = LLM(student, **engine)
        theirs, ours = self.teacher.tokenizer, self.student.tokenizer
        if self.student.model.config.vocab_size != self.teacher.model.config.vocab_size or any(
            theirs.id_to_token(i) != ours.id_to_token(i)
            for i in range(max(theirs.vocab_size, ours.vocab_size))
        ):  # the KL compares the two distributions id by id
            raise ValueError("the student and the teacher must share a vocabulary (the teacher's tokenizer)")
        self.model = self.student.model
        self.tokenizer = self.teacher.tokenizer
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay)

    def phase(self, step: int) -> str:
        return "off-policy" if step < self.config.offpolicy_steps else "on-policy"

    def train_step(self) -> dict[str, float]:
        config, step = self.config, self.step
        start = time.perf_counter()
        prompts = rollout.prompts(
            config.seed,
            step,
            config.prompts_per_step,
            stage=config.prompt_stage,
            after_tool=config.after_tool,
            budget_cut=config.budget_cut,
        )
        seed = random.Random(f"distill:{config.seed}:{step}").getrandbits(63)
        phase = self.phase(step)
        writer = self.teacher if phase == "off-policy" else self.student
        replies = [g[0] for g in rollout.generate(writer, prompts, rollout.sampling(config.max_tokens, seed))]
        samples = [r.sample for r in replies]
        targets = sum(sum(s.targets) for s in samples)  # the learned tokens: replies less inserted text
        lr = config.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = 0.0
        pad_id = self.tokenizer.pad_token_id
        for batch in data.micro_batches(samples, config.micro_batch_tokens, pad_id):
            if phase == "off-policy":
                loss = supervised_loss(self.model, batch)
            else:
                mask = batch.labels != -100
                with torch.no_grad():
                    teacher_logits = self.teacher.model(batch.input_ids)
                loss = (reverse_kl(self.model(batch.input_ids), teacher_logits) * mask).sum()
            (loss / targets).backward()
            total += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.student.refresh_weights()
        self.step += 1
        return {"step": step, "phase": phase, "loss": total / targets, "lr": lr, "grad_norm": float(grad_norm),
                "reply_tokens": targets / len(replies), "seconds": time.perf_counter() - start}  # fmt: skip

    @torch.no_grad()
    def kl_on_student_samples(self, prompts: list[rollout.Prompt], seed: int) -> float:
        """The mean per-token reverse KL to the teacher on the student's own replies to ``prompts``."""
        replies = [
            g[0]
            for g in rollout.generate(self.student, prompts, rollout.sampling(self.config.max_tokens, seed))
        ]
        total, tokens = 0.0, 0
        for batch in data.micro_batches([r.sample for r in replies], self.config.micro_batch_tokens,
                                        self.tokenizer.pad_token_id):  # fmt: skip
            mask = batch.labels != -100
            kl = reverse_kl(self.model(batch.input_ids), self.teacher.model(batch.input_ids))
            total += float((kl * mask).sum())
            tokens += int(mask.sum())
        return total / max(1, tokens)

    def summary(self, record: dict[str, Any]) -> dict[str, str]:
        return {"phase": record["phase"], "loss": f"{record['loss']:.4f}", "s": f"{record['seconds']:.1f}"}


def run(config: DistillConfig, teacher: str, student: str | None, output: Path) -> int:
    """``qwen3 train --stage distill``: the run, the student in ``output/model``."""
    distiller = Distiller(config, teacher, output, student)
    params = sum(p.numel() for p in distiller.model.parameters())
    logger.info("distilling %s into a %.2fM-parameter student: %d off-policy then %d on-policy steps", teacher,
                params / 1e6, min(config.steps, config.offpolicy_steps),
                max(0, config.steps - config.offpolicy_steps))  # fmt: skip
    distiller.train()
    folder = distiller.export(output / "model")
    curve = distiller.plot(
        output / "loss.png", ("loss",), "cross-entropy (off-policy), reverse KL (on-policy)"
    )
    logger.info("student written to %s (curve: %s)", folder, curve)
    return 0
