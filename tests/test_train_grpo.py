"""GRPO: the engine's logprobs and the trainer's agree bit for bit (before and after an update taken up in
place), rewards follow the checkers, advantages are group-relative, and a few steps raise the reward."""

from __future__ import annotations

import random

import pytest
import torch

from qwen3.chat import parse_output
from qwen3.llm import LLM
from qwen3.sampling import SamplingParams
from qwen3.train import data, languages, rollout, tasks
from qwen3.train.grpo import GRPO, GRPOConfig, group_advantages, judge
from qwen3.train.trainer import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm() -> LLM:
    """Its own engine over the shipped model: the tests here train it in place."""
    return LLM(None, max_num_seqs=64, max_num_batched_tokens=8192, kv_cache_memory="256MiB", progress=False)


def _check_agreement(llm: LLM, step: int) -> list[rollout.Rollout]:
    groups = rollout.generate(llm, rollout.prompts(0, step, 6), rollout.sampling(96, seed=11 + step, n=3))
    replies = [r for g in groups for r in g]
    scored = rollout.score(llm.model, [r.sample for r in replies])
    for r, values in zip(replies, scored, strict=True):
        assert torch.equal(values, torch.tensor(r.logprobs)), (r.parsed, values - torch.tensor(r.logprobs))
    return replies


def test_engine_and_trainer_logprobs_agree_exactly(llm: LLM) -> None:
    """Bitwise, on the CPU kernels; then once more after an optimizer step taken up by refresh_weights
    (stale packed weights or a stale prefix cache would break it)."""
    replies = _check_agreement(llm, 0)
    assert len({tuple(r.ids) for r in replies}) > 6  # sampled: some of the 6 groups differ within
    samples = [r.sample for r in replies]
    _, logprobs, mask = rollout.policy_logprobs(
        llm.model, samples, list(range(4)), llm.tokenizer.pad_token_id
    )
    engine = rollout.placed(samples[:4], [torch.tensor(r.logprobs) for r in replies[:4]], mask)
    assert torch.equal(logprobs.detach()[mask], engine[mask])  # the values the loss sees: the engine's
    optimizer = make_optimizer(llm.model, 1e-3, 0.0)
    (-(logprobs * mask).sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = llm.model.lm_head.packed
    llm.refresh_weights()
    assert llm.model.lm_head.packed is not before
    assert llm.engine.blocks.cached == {}
    after = _check_agreement(llm, 1)
    assert any(r.logprobs != s.logprobs for r, s in zip(after, replies, strict=False))  # the model did change


def test_refresh_weights_refuses_while_requests_run(llm: LLM) -> None:
    ids = llm.tokenizer.encode("What is 2 + 3?")
    llm.engine.add_request("busy", ids, SamplingParams(max_tokens=4), None, False, [], False)
    try:
        with pytest.raises(RuntimeError, match="running"):
            llm.refresh_weights()
    finally:
        llm.engine.abort("busy")
    while llm.engine.has_unfinished():
        llm.engine.step()
    llm.refresh_weights()


def _rollout(prompt: rollout.Prompt, text: str, finish: str = "stop") -> rollout.Rollout:
    return rollout.Rollout(prompt, [], [1], [0.0], finish, parse_output(text, False))


def test_judge_reads_answer_format_and_tool_call() -> None:
    problem = tasks.generate(random.Random(3), "add")
    ask = [{"role": "user", "content": problem.question}]
    thinking = rollout.Prompt(problem, ask, None, True)
    answer = f"The answer is {problem.result}."
    assert judge(_rollout(thinking, f"<think>\nwork\n</think>\n\n{answer}")) == (True, True)
    assert judge(_rollout(thinking, f"<think>\n\n</think>\n\n{answer}")) == (True, False)  # should think
    assert judge(_rollout(thinking, "<think>\nwork\n</think>\n\nThe answer is 1.")) == (False, True)
    assert judge(_rollout(thinking, f"<think>\nwork\n</think>\n\n{answer}", "length")) == (True, False)
    no_think = rollout.Prompt(
        problem, [{"role": "user", "content": problem.question + " /no_think"}], None, True
    )
    assert judge(_rollout(no_think, f"<think>\n\n</think>\n\n{answer}")) == (True, True)
    hard_off = rollout.Prompt(problem, ask, None, False)  # the prompt holds the empty block already
    assert judge(_rollout(hard_off, answer)) == (True, True)
    assert judge(_rollout(hard_off, f"<think>\nwork\n</think>\n\n{answer}")) == (True, False)
    tool = rollout.Prompt(problem, ask, [{"type": "function", "function": {"name": "calculator"}}], True)
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "%s"}}\n</tool_call>'
    think = "<think>\nI will use the calculator tool.\n</think>\n\n"
    assert judge(_rollout(tool, think + call % problem.expression)) == (True, True)
    assert judge(_rollout(tool, think + call % "1 + 1")) == (False, True)
    assert judge(_rollout(tool, think + answer)) == (False, True)  # answered without the tool


def test_judge_wants_the_questions_language_and_an_honest_refusal() -> None:
    rng = random.Random(5)
    problem = tasks.generate(rng, "add", language="es")
    prompt = rollout.Prompt(problem, [{"role": "user", "content": problem.question}], None, True)
    think = "<think>\nwork\n</think>\n\n"
    assert judge(_rollout(prompt, think + problem.answer)) == (True, True)
    french = languages.answer("fr", "add", expr=problem.expression, result=problem.result)
    assert judge(_rollout(prompt, think + french)) == (False, True)  # right number, wrong language
    joke = tasks.off_skill(rng, "train", "de")
    ask = rollout.Prompt(joke, [{"role": "user", "content": joke.question}], None, True)
    assert judge(_rollout(ask, think + joke.answer)) == (True, True)
    assert judge(_rollout(ask, think + "Die Antwort ist 42.")) == (False, True)


def test_judge_after_the_tools_response_wants_its_result_copied() -> None:
    config = GRPOConfig(after_tool=1.0, prompt_stage=5)
    prompts = rollout.prompts(2, 0, 64, stage=config.prompt_stage, after_tool=config.after_tool)
    after = next(p for p in prompts if p.messages[-1]["role"] == "tool" and len(p.problem.result) >= 7)
    think = "<think>\nThe calculator says so.\n</think>\n\n"
    right = after.problem.answer
    assert after.problem.result in right and judge(_rollout(after, think + right)) == (True, True)
    dropped = right.replace(after.problem.result, after.problem.result[:-1])  # one digit lost in the copy
    assert judge(_rollout(after, think + dropped)) == (False, True)
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 + 1"}}\n</tool_call>'
    assert judge(_rollout(after, think + call)) == (False, True)  # called again instead of answering


def test_stage5_prompts_mix_languages_refusals_and_large_tool_problems() -> None:
    items = [p for step in range(4) for p in rollout.prompts(0, step, 64, stage=5)]
    assert {p.problem.language for p in items} == {"en", *languages.LANGUAGES}
    assert any(p.problem.task == tasks.DECLINE for p in items)
    assert any(p.expects_tool_call and len(p.problem.result) >= 7 for p in items)
    assert all(p.problem.phrasing != "heldout" for p in items)


def test_off_skill_sets_the_share_of_refusals_grpo_asks() -> None:
    """More off-skill prompts keep the honest refusal rewarded in both modes while arithmetic is trained."""
    trainer = GRPO(GRPOConfig(prompt_stage=6, off_skill=0.6), None, progress=False)
    share = [
        sum(p.problem.task == tasks.DECLINE for p in rollout.prompts(0, 0, 400, mix, stage=6)) / 400
        for mix in (data.DataMix(), trainer.mix)
    ]
    assert share[0] < 0.2 and 0.5 < share[1] < 0.7, share
    with pytest.raises(ValueError, match="off_skill"):
        GRPOConfig(off_skill=0.95)


def test_group_advantages_are_relative_and_flat_groups_zero() -> None:
    rewards = torch.tensor([[1.2, 1.2, 1.2, 1.2], [0.0, 1.2, 0.2, 1.2]], dtype=torch.float32)
    adv = group_advantages(rewards)
    assert torch.equal(adv[0], torch.zeros(4, dtype=adv.dtype))  # exactly, though 1.2f's mean rounds
    assert abs(float(adv[1].mean())) < 1e-9 and abs(float(adv[1].std(unbiased=False)) - 1) < 1e-6
    assert adv[1, 1] > adv[1, 2] > adv[1, 0]


def test_grpo_raises_the_reward_on_a_toy_task() -> None:
    """Eight fixed non-thinking additions (the shipped model gets about half right without thinking, so
    the reward, at most 1.2, has room to rise): a few GRPO steps on them raise the mean reward of the
    replies sampled, and every first mini-batch was exactly on-policy."""
    rng = random.Random(7)
    problems = [tasks.generate(rng, "add") for _ in range(8)]
    fixed = [rollout.Prompt(p, [{"role": "user", "content": p.question}], None, False) for p in problems]
    config = GRPOConfig(steps=5, prompts_per_step=8, group_size=8, lr=1e-4, warmup_steps=1, max_tokens=48,
                        updates_per_step=1)  # fmt: skip
    history = GRPO(config, None, progress=False, prompt_source=lambda step: fixed).train()
    rewards = [h["reward"] for h in history]
    assert rewards[0] < 0.8, rewards  # room left to rise by more than 0.25
    assert min(rewards[-2:]) > rewards[0] + 0.25, rewards
    assert all(h["onpolicy_error"] == 0.0 for h in history), history


def test_grpo_clips_and_keeps_to_its_reference() -> None:
    """Two updates per rollout batch: the second is off-policy, so some ratios leave the clip range at a
    high learning rate; the KL to the frozen reference becomes positive and is reported."""
    config = GRPOConfig(steps=2, prompts_per_step=6, group_size=4, lr=3e-3, warmup_steps=1, max_tokens=64,
                        updates_per_step=2, kl_coef=0.1)  # fmt: skip
    trainer = GRPO(config, None, progress=False)
    history = trainer.train()
    assert trainer.reference is not None and not any(p.requires_grad for p in trainer.reference.parameters())
    assert any(h["clipped"] > 0 for h in history), history
    assert history[-1]["kl"] > 0, history
    assert all(h["onpolicy_error"] == 0.0 for h in history), history
