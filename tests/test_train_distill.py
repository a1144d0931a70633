"""Distillation: reverse KL is exact, the off-policy phase learns the teacher's replies, and the
on-policy phase pulls a student's own samples toward the teacher (the KL falls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen3.checkpoint import load_model
from qwen3.engine.llm_engine import STOP_THINKING_TEXT
from qwen3.llm import LLM, default_model_dir
from qwen3.tokenizer import Tokenizer
from qwen3.train import rollout
from qwen3.train.distill import DistillConfig, Distiller, reverse_kl
from qwen3.train.trainer import export_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reverse_kl_is_kl_of_student_from_teacher() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 17, generator=g), torch.randn(3, 5, 17, generator=g)
    expected = torch.nn.functional.kl_div(
        teacher.log_softmax(-1), student.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    assert torch.allclose(reverse_kl(student, teacher), expected, atol=1e-6)
    assert torch.allclose(reverse_kl(student, student), torch.zeros(3, 5), atol=1e-6)


def test_fresh_student_is_a_third_of_the_teacher() -> None:
    teacher = load_model(default_model_dir())
    student = DistillConfig().student(teacher.config)
    ratio = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters())
    assert 0.28 < ratio < 0.4, ratio
    assert student.config.vocab_size == teacher.config.vocab_size


def test_off_policy_phase_learns_the_teachers_replies(tmp_path: Path) -> None:
    config = DistillConfig(steps=12, offpolicy_steps=12, prompts_per_step=8, lr=1e-2, warmup_steps=2,
                           max_tokens=64, student_layers=1, student_hidden=64, student_intermediate=128)  # fmt: skip
    history = Distiller(config, str(default_model_dir()), tmp_path, progress=False).train()
    losses = [h["loss"] for h in history]
    assert {h["phase"] for h in history} == {"off-policy"}
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:2]) / 2, losses


def test_on_policy_phase_makes_the_kl_fall(tmp_path: Path) -> None:
    """A student the teacher's size but with noisy weights: a few on-policy steps bring the reverse KL on
    its own replies to fixed prompts well down."""
    model = load_model(default_model_dir())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.7)
    export_model(model, Tokenizer.from_pretrained(default_model_dir()), tmp_path / "noisy")
    config = DistillConfig(steps=12, offpolicy_steps=0, prompts_per_step=8, lr=3e-4, warmup_steps=1,
                           max_tokens=64)  # fmt: skip
    distiller = Distiller(
        config, str(default_model_dir()), tmp_path, student=tmp_path / "noisy", progress=False
    )
    fixed = rollout.prompts(99, 0, 8)
    before = distiller.kl_on_student_samples(fixed, seed=5)
    history = distiller.train()
    after = distiller.kl_on_student_samples(fixed, seed=5)
    assert {h["phase"] for h in history} == {"on-policy"}
    assert before > 0.05 and after < 0.5 * before, (before, after)


def test_prompts_after_the_tool_ask_for_the_reply_that_copies_its_result() -> None:
    assert [p.messages for p in rollout.prompts(3, 1, 32, stage=5, after_tool=0.0)] == [
        p.messages for p in rollout.prompts(3, 1, 32, stage=5)
    ]  # at 0 the prompts are those of before (GRPO's)
    items = rollout.prompts(3, 1, 64, stage=5, after_tool=1.0)
    after = [p for p in items if p.messages[-1]["role"] == "tool"]
    assert after and all(p.tools is not None for p in after)
    for p in after:
        assert p.messages[-2]["tool_calls"] and p.messages[-1]["content"] == p.problem.result
        assert not p.expects_tool_call  # the reply answers with the result; it calls nothing
    assert not any(p.tools and p.problem.expression and p.messages[-1]["role"] == "user" for p in items)


def test_student_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    """Same vocabulary size, two ids swapped: the KL would compare different tokens, so it is an error."""
    folder = export_model(load_model(default_model_dir()), Tokenizer.from_pretrained(default_model_dir()),
                          tmp_path / "swapped")  # fmt: skip
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "Answer", "Question"
    assert a in vocab and b in vocab
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="share a vocabulary"):
        Distiller(DistillConfig(), str(default_model_dir()), tmp_path, student=folder, progress=False)


def test_budget_cut_prompts_get_a_thinking_budget_and_nothing_else_changes() -> None:
    plain = rollout.prompts(4, 2, 64, stage=5, after_tool=0.5)
    assert [p.messages for p in rollout.prompts(4, 2, 64, stage=5, after_tool=0.5, budget_cut=0.0)] == [
        p.messages for p in plain
    ]
    assert all(p.thinking_budget is None for p in plain)
    items = rollout.prompts(4, 2, 64, stage=5, after_tool=0.5, budget_cut=1.0)
    cut = [p for p in items if p.thinking_budget is not None]
    assert cut and all(p.thinking and p.tools is None and p.thinking_budget >= 1 for p in cut)
    assert all(p.tools is not None or not p.thinking for p in items if p.thinking_budget is None)


def test_a_cut_reply_learns_the_answer_but_not_the_engines_stop_thinking_text() -> None:
    llm = LLM(default_model_dir(), kv_cache_memory="64MiB", progress=False)
    items = [p for p in rollout.prompts(5, 0, 16, stage=4, budget_cut=1.0) if p.thinking_budget][:4]
    for p in items:
        p.thinking_budget = 6
    replies = [g[0] for g in rollout.generate(llm, items, rollout.sampling(256, seed=1))]
    stop_ids = llm.tokenizer.encode(STOP_THINKING_TEXT)
    think = llm.tokenizer.token_to_id("<think>")
    assert len(replies) == 4
    for r in replies:
        assert r.inserted is not None and sum(r.inserted) == len(stop_ids)
        first = r.inserted.index(True)  # <think>, then 6 thinking tokens, then the engine's cut
        assert r.ids[0] == think and first == 7 and r.ids[first : first + len(stop_ids)] == stop_ids
        targets = r.sample.targets[len(r.prompt_ids) :]
        assert targets == [not i for i in r.inserted]
        assert any(targets[first + len(stop_ids) :])  # the answer after the cut is learned
        assert r.parsed.content
