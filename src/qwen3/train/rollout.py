"""On-policy training's common ground: prompts, samples drawn through qwen3's own engine, and logprobs.

GRPO (:mod:`qwen3.train.grpo`) and on-policy distillation (:mod:`qwen3.train.distill`) both train the
model that the engine generates with: the engine's ``LLM.model`` *is* the policy, updated in place by
the optimizer, and :meth:`qwen3.LLM.refresh_weights` repacks it for the CPU kernels and drops the prefix
cache after every update. No weights go through disk between a rollout and the next.

Logprobs come in two kinds, with the same values:

- :func:`score`, no gradient, computes each sampled token's logprob the way the engine does: the same
  model in the same kernel mode (packed fp32/bf16 linear layers, fused norms, the paged attention
  kernel, over a KV pool of its own), then ``log_softmax`` of the float32 logits. Those kernels are
  batch-invariant: a row's bits depend on neither the number of rows in a call nor how the sequence was
  chunked (tests/test_batch_invariance.py), so a whole sequence scored in one prefill gives exactly the
  logprobs the engine reported token by token while sampling it. Asserted bit for bit in
  tests/test_train_grpo.py.
- :func:`policy_logprobs`, for the loss, takes those exact values and attaches the gradient of torch's
  differentiable forward pass (``F.linear``, SDPA: the kernels have no backward) as a zero-valued term,
  ``exact + (torch - torch.detach())``. So the importance ratio against the engine's logprobs is exactly
  1 before the first update (truly on-policy), while the gradient is that of the torch graph, whose
  values differ from the kernels' only by float32 rounding (~1e-6).

Rollouts sample at temperature 1 with no top-k, top-p or min-p, so the behaviour distribution is the
model's softmax itself and the engine's logprobs (which are of the raw logits) are the behaviour
policy's; a truncated or tempered distribution would make them differ from what was sampled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qwen3.chat import ParsedOutput, parse_output, soft_switch
from qwen3.engine.attention import AttentionMetadata, KVPool, make_backend
from qwen3.llm import LLM
from qwen3.model import Qwen3ForCausalLM
from qwen3.sampling import SamplingParams
from qwen3.tokenizer import Tokenizer
from qwen3.train import data, tasks
from qwen3.train.trainer import export_model

logger = logging.getLogger(__name__)

SCORE_BLOCK = 16  # tokens per block of score()'s own KV pool
SCORE_TOKENS = 16384  # tokens per score() call (bounds its pool and logits)


@dataclass
class Prompt:
    """One conversation to answer: its problem, the messages up to the user's question, the mode."""

    problem: tasks.Problem
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    enable_thinking: bool
    thinking_budget: int | None = None  # the engine cuts the thinking after this many tokens

    @property
    def thinking(self) -> bool:
        """Whether the reply should think: the hard switch, then the latest soft switch."""
        return self.enable_thinking and soft_switch(self.messages) is not False

    @property
    def expects_tool_call(self) -> bool:
        """Offered the calculator for an arithmetic problem, and not yet answered by it: the reply should
        call it."""
        return (
            self.tools is not None
            and self.problem.expression is not None
            and self.messages[-1]["role"] != "tool"
        )


def prompts(
    seed: int,
    step: int,
    n: int,
    mix: data.DataMix | None = None,
    stage: int = 4,
    after_tool: float = 0.0,
    budget_cut: float = 0.0,
) -> list[Prompt]:
    """``n`` prompts of step ``step``, a pure function of (seed, step): the conversations of SFT stage
    ``stage`` (4: the agent stage's wide phrasings, never the held-out ones; thinking and non-thinking,
    soft and hard switches, multi-turn, the calculator offered; 5: that and stage 5's other languages,
    off-skill questions and large tool problems; 6: stage 5's in the composed phrasings), cut after the
    last user message.

    A share ``after_tool`` of the tool dialogs is cut after the tool's response instead, so the reply is
    the second turn, which reads the result and answers with it: a reply that only calls the tool never
    practises copying its result. A share ``budget_cut`` of the thinking prompts without tools gets a
    thinking budget (:func:`qwen3.train.data.cut_budget`, as SFT cuts its replies), so the reply is cut by
    the engine's stop-thinking text and the answer after a cut is learned too. (At 0, neither draws a
    random number, so the prompts are those of before.)"""
    rng = random.Random(f"rl:{seed}:{step}")
    mix = mix or data.DataMix()
    out = []
    for _ in range(n):
        problem, messages, tools, enable_thinking = data.stage_dialog(rng, stage, mix)
        roles = [m["role"] for m in messages]
        cut = max(i for i, role in enumerate(roles) if role == "user")
        if after_tool > 0 and "tool" in roles[cut:] and rng.random() < after_tool:
            cut = max(i for i, role in enumerate(roles) if role == "tool")
        prompt = Prompt(problem, messages[: cut + 1], tools, enable_thinking)
        if budget_cut > 0 and prompt.thinking and tools is None and rng.random() < budget_cut:
            prompt.thinking_budget = data.cut_budget(rng)
        out.append(prompt)
    return out


@dataclass
class Rollout:
    """One sampled reply: prompt and reply ids, the engine's logprob of each reply token (0 for the tokens
    it inserted after a thinking budget, which are not learned), the parse."""

    prompt: Prompt
    prompt_ids: list[int]
    ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    parsed: ParsedOutput
    reward: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    inserted: list[bool] | None = None  # per reply token: the engine's own (a budget's stop-thinking text)

    @property
    def sample(self) -> data.Sample:
        """Prompt + reply as a training sample whose targets are the reply's tokens, less those inserted."""
        learned = [not i for i in self.inserted] if self.inserted else [True] * len(self.ids)
        return data.Sample(self.prompt_ids + self.ids, [False] * len(self.prompt_ids) + learned)


def sampling(max_tokens: int, seed: int, n: int = 1) -> SamplingParams:
    """The rollouts' sampling: the policy's own distribution (see the module docstring), seeded."""
    return SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=max_tokens, seed=seed,
                          n=n, logprobs=0)  # fmt: skip


def generate(llm: LLM, items: Sequence[Prompt], params: SamplingParams) -> list[list[Rollout]]:
    """``params.n`` replies to each prompt, through ``LLM.run_requests`` in one batch: a list per prompt.

    Only a prompt with a thinking budget may get tokens the engine inserted (no logprob): GRPO's
    importance ratios need every reply token to be the policy's own."""
    requests = [
        llm.prepare_chat(
            p.messages, params, p.enable_thinking, p.thinking_budget, tools=p.tools, plain_text_messages=True
        )
        for p in items
    ]
    outputs = llm.run_requests(requests)
    groups = []
    for prompt, request, output in zip(items, requests, outputs, strict=True):
        group = []
        for c in output.outputs:
            if c.logprobs is None:
                raise RuntimeError("rollouts need the engine's logprobs (SamplingParams.logprobs=0)")
            inserted = [lp is None for lp in c.logprobs]
            if any(inserted) and prompt.thinking_budget is None:
                raise RuntimeError("a rollout's reply holds tokens the engine inserted (no logprob)")
            group.append(
                Rollout(
                    prompt,
                    request.prompt_token_ids,
                    list(c.token_ids),
                    [0.0 if lp is None else lp[0] for lp in c.logprobs],
                    c.finish_reason,
                    parse_output(c.text, request.reasoning_started),
                    inserted=inserted if any(inserted) else None,
                )  # fmt: skip
            )
        groups.append(group)
    return groups


@torch.no_grad()
def score(model: Qwen3ForCausalLM, samples: Sequence[data.Sample]) -> list[torch.Tensor]:
    """Each sample's target tokens' logprobs [n_targets], float32, computed as the engine computes them
    (see the module docstring): exact, on the CPU kernels, to what the engine reported while sampling.

    Targets must be one run at the end of the sample (a prompt, then the reply). Off the CPU kernels
    (CUDA, or ``QWEN3_DISABLE_KERNELS=1``) the attention is the torch backend's and the linear layers are
    torch's GEMMs, whose results depend on the batch's shape: the values are then close, not exact."""
    out: list[torch.Tensor] = []
    chunk: list[data.Sample] = []
    for sample in samples:
        if chunk and sum(map(len, chunk)) + len(sample) > SCORE_TOKENS:
            out += _score_chunk(model, chunk)
            chunk = []
        chunk.append(sample)
    if chunk:
        out += _score_chunk(model, chunk)
    return out


def _score_chunk(model: Qwen3ForCausalLM, samples: Sequence[data.Sample]) -> list[torch.Tensor]:
    """One prefill of every sample at once, each in its own run of blocks of a fresh KV pool."""
    config, device = model.config, model.device
    lengths = [len(s) for s in samples]
    blocks = [-(-n // SCORE_BLOCK) for n in lengths]
    pool = KVPool(config.num_hidden_layers, sum(blocks), SCORE_BLOCK, model.num_kv_heads, config.head_dim,
                  model.dtype, device)  # fmt: skip
    backend = make_backend(None, pool)
    first = torch.tensor([0] + blocks[:-1]).cumsum(0)
    tables = torch.stack([torch.arange(max(blocks)) + f for f in first.tolist()]).int()
    positions = torch.cat([torch.arange(n) for n in lengths])
    owner = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths))
    lens = torch.tensor(lengths, dtype=torch.int32)
    backend.prepare(
        AttentionMetadata(
            slots=(first[owner] * SCORE_BLOCK + positions).to(device),
            block_tables=tables.to(device),
            seq_lens=lens.to(device),
            query_starts=torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()]).to(device),
            host_seq_lens=lengths,
            host_query_lens=lengths,
        )
    )
    ids = torch.tensor([t for s in samples for t in s.ids], device=device)
    hidden = model.hidden_states(ids[None], positions.to(device)[None], backend, max(lengths))[0]
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    results = []
    for s, begin in zip(samples, starts, strict=False):
        first_target = s.targets.index(True)
        if not all(s.targets[first_target:]):
            raise ValueError("score: a sample's targets must be one run at its end")
        rows = hidden[begin + first_target - 1 : begin + len(s) - 1]
        logprobs = model.compute_logits(rows).float().log_softmax(dim=-1)
        wanted = torch.tensor(s.ids[first_target:], device=device)[:, None]
        results.append(logprobs.gather(1, wanted).squeeze(1).clone())
    return results


def policy_logprobs(
    model: Qwen3ForCausalLM, samples: Sequence[data.Sample], group: Sequence[int], pad_id: int
) -> tuple[data.Batch, torch.Tensor, torch.Tensor]:
    """For the micro-batch ``group`` of ``samples``: the padded batch, each position's logprob of its label
    [B, T] (exact values from :func:`score`, torch's gradient; 0 where nothing is learned) and the mask of
    learned positions [B, T]."""
    chosen = [samples[i] for i in group]
    batch = data.pad(chosen, pad_id).to(model.device)
    mask = batch.labels != -100
    logits = model(batch.input_ids)
    differentiable = -F.cross_entropy(
        logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=-100, reduction="none"
    ).view_as(mask)
    exact = placed(chosen, score(model, chosen), mask)
    return batch, exact + (differentiable - differentiable.detach()), mask


def placed(
    samples: Sequence[data.Sample], values: Sequence[torch.Tensor], like: torch.Tensor
) -> torch.Tensor:
    """Per-sample values of the target tokens (as :func:`score` returns them) laid out as a padded
    batch's labels are [B, T] (the value for token t sits at position t - 1), zeros elsewhere."""
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for r, (sample, v) in enumerate(zip(samples, values, strict=True)):
        start = sample.targets.index(True) - 1
        out[r, start : start + len(v)] = v.to(out.device)
    return out


def check_config(config: Any, checks: Sequence[tuple[str, bool, str]]) -> None:
    """Raise ValueError for the first (field, ok, message) that is not ok (a config's ``__post_init__``)."""
    for name, ok, message in checks:
        if not ok:
            raise ValueError(f"{name} {message}, got {getattr(config, name)}")


class OnPolicyRun:
    """What GRPO and distillation share: the step loop with its progress bar and log, and the export.

    Subclasses set ``name``, ``config`` (with ``steps``), ``model``, ``tokenizer``, ``progress`` and
    implement :meth:`train_step` and :meth:`summary` (the figures the bar and the log show)."""

    name = ""
    config: Any
    model: Qwen3ForCausalLM
    tokenizer: Tokenizer
    progress: bool

    def __init__(self) -> None:
        self.step = 0
        self.history: list[dict[str, Any]] = []

    def train_step(self) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self, record: dict[str, Any]) -> dict[str, str]:
        raise NotImplementedError

    def train(self) -> list[dict[str, Any]]:
        """Steps up to ``config.steps``; returns the history (one record a step)."""
        steps = self.config.steps
        bar = tqdm(total=steps, initial=self.step, desc=self.name, unit="step", disable=not self.progress)
        while self.step < steps:
            record = self.train_step()
            self.history.append(record)
            figures = self.summary(record)
            bar.set_postfix(figures)
            bar.update(1)
            if not self.progress:
                logger.info(
                    "%s step %d: %s",
                    self.name,
                    record["step"],
                    " ".join(f"{k} {v}" for k, v in figures.items()),
                )
        bar.close()
        return self.history

    def plot(self, path: str | Path, keys: Sequence[str], ylabel: str) -> Path:
        """The history's ``keys`` against the step, as a PNG (a raw line and a 10-step moving average)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            values = [h[key] for h in self.history]
            line = ax.plot(steps, values, lw=0.6, alpha=0.4)[0]
            smooth = [
                sum(values[max(0, i - 9) : i + 1]) / len(values[max(0, i - 9) : i + 1])
                for i in range(len(values))
            ]
            ax.plot(steps, smooth, lw=1.5, color=line.get_color(), label=key.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"tiny Qwen3, {self.name}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)

    def export(self, folder: str | Path) -> Path:
        """The trained model as a Hugging Face folder, with the run's config and history beside it."""
        folder = export_model(self.model, self.tokenizer, folder)
        state = {"config": dataclasses.asdict(self.config), "history": self.history}
        (folder / f"{self.name}_state.json").write_text(json.dumps(state, indent=1) + "\n")
        return folder
