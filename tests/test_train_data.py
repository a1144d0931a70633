"""Training data: the tokenizer carries Qwen3's special tokens, samples mask exactly the assistant's
tokens, budget-cut samples match what the engine inserts, batches label the next token."""

from __future__ import annotations

import random
import re

import pytest

from qwen3.chat import render
from qwen3.engine.llm_engine import STOP_THINKING_TEXT
from qwen3.train import data, languages, tasks


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_tokenizer(data.tokenizer_corpus(0, 300), 512)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return data.SampleBuilder(tokenizer)


def test_tokenizer_has_qwen3_added_tokens_with_their_flags(tokenizer) -> None:
    assert tokenizer.vocab_size == 512
    first = 512 - len(data.ADDED_TOKENS)
    for offset, (content, special) in enumerate(data.ADDED_TOKENS):
        assert tokenizer.token_to_id(content) == first + offset  # Qwen3's order, after the BPE
        assert ((first + offset) in tokenizer.special_token_ids) == special
    text = "<|im_start|>user\nHow many r's in strawberry? 347<think>x</think><|im_end|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    for tag in ("<|im_start|>", "<think>", "</think>", "<|im_end|>"):
        assert tokenizer.token_to_id(tag) in ids  # matched whole, never split into BPE pieces
    digits = [tokenizer.decode([i]) for i in tokenizer.encode("12345")]
    assert digits == list("12345")  # Qwen's pre-tokenizer keeps digits single


def test_tokenizer_saved_folder_loads_in_transformers(tokenizer, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer.save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "What is 12 + 34? /think"}]
    text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)
    assert ref.encode(text, add_special_tokens=False) == tokenizer.encode(text)


def test_conversation_samples_learn_only_the_reply(builder, tokenizer) -> None:
    problem = tasks.addition(random.Random(0))
    messages = [
        {"role": "user", "content": problem.question},
        {"role": "assistant", "reasoning_content": problem.thinking, "content": problem.answer},
    ]
    (sample,) = builder.conversation(messages, None, True)
    learned = tokenizer.decode([i for i, t in zip(sample.ids, sample.targets, strict=True) if t])
    assert learned == f"<think>\n{problem.thinking}\n</think>\n\n{problem.answer}<|im_end|>"
    prompt = tokenizer.decode([i for i, t in zip(sample.ids, sample.targets, strict=True) if not t])
    assert prompt == render(messages[:1])  # exactly what the engine will be given


def test_non_thinking_hard_switch_learns_only_the_answer(builder, tokenizer) -> None:
    problem = tasks.sort_numbers(random.Random(1))
    messages = [
        {"role": "user", "content": problem.question},
        {"role": "assistant", "content": problem.answer},
    ]
    (sample,) = builder.conversation(messages, None, False)
    learned = tokenizer.decode([i for i, t in zip(sample.ids, sample.targets, strict=True) if t])
    assert learned == f"{problem.answer}<|im_end|>"
    assert tokenizer.decode(sample.ids).count("<think>\n\n</think>\n\n") == 1  # pre-filled by the template


def _tool_dialog(thinking: bool):
    rng = random.Random(0)
    while True:
        problem = tasks.generate(rng, "mul")
        messages, tools, enable_thinking = data._tool_dialog(rng, problem)
        if bool(messages[-1]["reasoning_content"]) == thinking:
            return problem, messages, tools, enable_thinking


def _learned(sample, tokenizer) -> list[str]:
    """The learned spans of a sample, as text."""
    spans, current = [], []
    for token, target in zip(sample.ids, sample.targets, strict=True):
        if target:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


def test_tool_dialog_with_thinking_is_one_sample_learning_both_replies(builder, tokenizer) -> None:
    problem, messages, tools, thinking = _tool_dialog(thinking=True)
    (sample,) = builder.conversation(messages, tools, thinking)
    call, answer = _learned(sample, tokenizer)
    assert call.startswith("<think>\nThe user asks for") and call.endswith(
        f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{problem.expression}"}}}}\n'
        "</tool_call><|im_end|>"
    )
    assert answer.endswith(f"{problem.expression} = {problem.result}.<|im_end|>")
    # the sample is exactly the conversation as rendered, with the generation prompts where replies start
    assert tokenizer.decode(sample.ids) == render(
        messages, tools=tools, add_generation_prompt=False
    ).removesuffix("\n")


def test_tool_dialog_without_thinking_learns_each_reply_in_its_own_context(builder, tokenizer) -> None:
    problem, messages, tools, thinking = _tool_dialog(thinking=False)
    call, answer = builder.conversation(messages, tools, thinking)
    assert _learned(call, tokenizer)[0].startswith("<think>\n\n</think>\n\n<tool_call>")
    # in the answer's context the call is rendered as history: the empty think block is gone
    context = tokenizer.decode([i for i, t in zip(answer.ids, answer.targets, strict=True) if not t])
    assert "<|im_start|>assistant\n<tool_call>" in context and f"<tool_response>\n{problem.result}" in context
    assert _learned(answer, tokenizer) == [
        f"<think>\n\n</think>\n\n{problem.expression} = {problem.result}.<|im_end|>"
    ]


def test_budget_cut_sample_matches_the_engine(builder, tokenizer) -> None:
    problem = tasks.multiplication(random.Random(2))
    messages = [
        {"role": "user", "content": problem.question},
        {"role": "assistant", "reasoning_content": problem.thinking, "content": problem.answer},
    ]
    sample = builder.budget_cut(messages, None, budget=5)
    stop = tokenizer.encode(STOP_THINKING_TEXT)
    prompt = tokenizer.encode(render(messages[:1]))
    think = tokenizer.token_to_id("<think>")
    assert sample.ids[: len(prompt) + 1] == prompt + [think]
    thought = sample.ids[len(prompt) + 1 : len(prompt) + 6]
    assert (
        thought == tokenizer.encode("\n" + problem.thinking)[:5]
    )  # the engine counts 5 tokens after <think>
    assert sample.ids[len(prompt) + 6 : len(prompt) + 6 + len(stop)] == stop
    assert not any(sample.targets[len(prompt) + 6 : len(prompt) + 6 + len(stop)])  # inserted, not learned
    assert tokenizer.decode(sample.ids[len(prompt) + 6 + len(stop) :]) == f"{problem.answer}<|im_end|>"


def test_fusion_conversations_follow_the_latest_flag() -> None:
    rng = random.Random(4)
    modes = {"thinking": 0, "non-thinking": 0, "multi-turn": 0, "tools": 0}
    for _ in range(600):
        messages, tools, enable_thinking = data.fusion_conversation(rng, tasks.generate(rng))
        final = messages[-1]
        assert final["role"] == "assistant"
        if tools:
            modes["tools"] += 1
            continue
        flag = data.soft_switch(messages)
        wants = enable_thinking and flag is not False
        assert bool(final["reasoning_content"]) == wants
        modes["thinking" if wants else "non-thinking"] += 1
        modes["multi-turn"] += sum(m["role"] == "user" for m in messages) > 1
    assert all(count > 30 for count in modes.values()), modes


def test_batches_are_reproducible_and_label_the_next_learned_token(builder, tokenizer) -> None:
    mix = data.DataMix()
    a = data.batch_samples(builder, 0, 5, 2, 3000, mix)
    assert [s.ids for s in a] == [s.ids for s in data.batch_samples(builder, 0, 5, 2, 3000, mix)]
    assert [s.ids for s in a] != [s.ids for s in data.batch_samples(builder, 0, 6, 2, 3000, mix)]
    assert sum(len(s) for s in a) >= 3000
    batches = data.micro_batches(a, 1024, tokenizer.pad_token_id)
    assert sum(b.input_ids.shape[0] for b in batches) == len(a)
    assert all(b.input_ids.numel() <= 1024 or b.input_ids.shape[0] == 1 for b in batches)
    learned = sum(sum(s.targets[1:]) for s in a)
    assert sum(int((b.labels != -100).sum()) for b in batches) == learned
    for b in batches:
        rows, cols = (b.labels != -100).nonzero(as_tuple=True)
        assert (b.labels[rows, cols] == b.input_ids[rows, cols + 1]).all()
    cold = data.batch_samples(builder, 0, 0, 1, 2000, mix)
    assert all(all(s.targets) for s in cold)  # stage 1 learns every token of the worked solutions


def test_stage_three_asks_in_broader_phrasings(builder, tokenizer) -> None:
    mix = data.DataMix()
    texts = {stage: [tokenizer.decode(s.ids) for s in data.batch_samples(builder, 0, 5, stage, 6000, mix)]
             for stage in (2, 3)}  # fmt: skip
    closings = [t for t in tasks._BROAD_SUFFIXES if t]
    assert not any(c in t for t in texts[2] for c in closings)
    assert sum(any(c in t for c in closings) for t in texts[3]) > 5
    assert all("<|im_start|>assistant" in t for t in texts[3])  # still Thinking Mode Fusion conversations


def test_stage_four_offers_the_calculator_more_and_asks_more_widely(builder, tokenizer) -> None:
    mix = data.DataMix()
    texts = {stage: [tokenizer.decode(s.ids) for s in data.batch_samples(builder, 0, 5, stage, 30000, mix)]
             for stage in (3, 4)}  # fmt: skip
    offered = {stage: sum("<tools>" in t for t in texts[stage]) / len(texts[stage]) for stage in (3, 4)}
    assert offered[4] > offered[3] + 0.1, offered
    opening = tasks._WIDE_PREFIXES
    assert not any(p in t for t in texts[3] for p in opening)
    assert sum(any(p in t for p in opening) for t in texts[4]) > 5
    # arithmetic is answered through a call, the rest directly: both kinds of tool conversation occur
    called = [t for t in texts[4] if "<tool_response>" in t]
    unused = [t for t in texts[4] if "<tools>" in t and '{"name": "calculator", "arguments"' not in t]
    assert len(called) > 2 * sum("<tool_response>" in t for t in texts[3]) and unused


def test_stage_five_adds_languages_declines_and_large_tool_results(builder, tokenizer) -> None:
    mix = data.DataMix()
    samples = data.batch_samples(builder, 0, 5, 5, 40000, mix)
    texts = [tokenizer.decode(s.ids) for s in samples]
    replies = [
        tokenizer.decode([t for t, keep in zip(s.ids, s.targets, strict=True) if keep]) for s in samples
    ]
    declines = [r for r in replies if languages.declines(r.split("</think>")[-1])]
    assert len(declines) > 0.05 * len(samples)
    assert {
        languages.detect_language(r.split("</think>")[-1].removesuffix("<|im_end|>")) for r in declines
    } > {"en"}
    spoken = {languages.detect_language(r.split("</think>")[-1]) for r in replies}
    assert set(languages.LANGUAGES) <= spoken
    results = [m for t in texts for m in re.findall(r"<tool_response>\n(-?\d+)\n</tool_response>", t)]
    assert max(len(r) for r in results) >= 10
    # the English stage-4 mix stays the bulk, so what stage 4 taught is kept
    assert sum(languages.detect_language(r.split("</think>")[-1]) == "en" for r in replies) > 0.5 * len(
        replies
    )
    assert data.batch_samples(builder, 0, 5, 5, 3000, mix)[0].ids == samples[0].ids


def test_stage_six_asks_stage_five_in_composed_phrasings_and_more_languages(builder, tokenizer) -> None:
    mix = data.DataMix()

    def asked(stage: int) -> tuple[set[str], float]:
        """The words of 1,500 dialogs' questions, and the share of the problems not in English."""
        rng = random.Random(7)
        problems = [p for p, *_ in (data.stage_dialog(rng, stage, mix) for _ in range(1500)) if p.form]
        words = {w for p in problems for w in re.findall(r"[^\W\d_]+", p.question.lower())}
        return words, sum(p.language != "en" for p in problems) / len(problems)

    (words5, foreign5), (words6, foreign6) = asked(5), asked(6)
    assert foreign6 > foreign5 + 0.08  # more of the problems in other languages
    assert len(words6) > 1.5 * len(words5)  # in far more varied wording
    samples = data.batch_samples(builder, 0, 5, 6, 3000, mix)
    assert samples and samples[0].ids == data.batch_samples(builder, 0, 5, 6, 3000, mix)[0].ids
