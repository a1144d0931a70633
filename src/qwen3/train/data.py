"""Training data for the tiny Qwen3: its tokenizer, the samples of each stage, and micro-batches.

Six stages, after the Qwen3 report (../shared/spec/hybrid_thinking.md (i)), scaled down:

1. **Cold start** — plain documents of worked solutions (question, step-by-step solution, answer),
   loss on every token: the model learns the procedures before it learns the chat format.
2. **Thinking Mode Fusion** — conversations rendered with the official Qwen3 chat template, loss on the
   assistant's tokens only, mixing thinking turns (no flag or ``/think``), non-thinking turns
   (``/no_think``, or ``enable_thinking=False`` with its pre-filled empty think block), multi-turn
   dialogs whose latest flag wins, dialogs with the ``calculator`` tool (call, response, answer), and
   thinking cut short by the engine's stop-thinking text at a random budget, so the model learns to
   answer from incomplete thinking exactly as the engine will ask it to.
3. **General** — the same conversations with questions in broader phrasings (more templates, openings
   and closings: ``tasks`` ``phrasing="broad"``), standing in for the report's general stage, whose
   aim is following instructions however they are worded.
4. **Agent** — wider phrasings still (everyday word problems, more synonyms: ``phrasing="wide"``),
   the calculator offered in a further quarter of the conversations (called for arithmetic, left
   unused for the rest) and more budget cuts. It stands in for the report's fourth stage, which
   trains agent and tool-use abilities among others, by supervised replies rather than reinforcement
   learning.
5. **Polish** — stage 4's mix with a share of its problems asked and answered in five other languages
   (:mod:`qwen3.train.languages`; the thinking stays English), plus tool dialogs with large operands
   whose call and result must be copied exactly, and questions outside the skills answered with an
   honest refusal in the question's language.
6. **Breadth** — stage 5's mix with questions from hundreds of templates per form and language, composed
   from stems and endings (:mod:`qwen3.train.composed`, ``phrasing="rich"``), none of them using the
   held-out templates' own words, and more of the problems in other languages: it teaches the model to
   find the operation and the numbers in a sentence it has not seen, rather than to recognise a
   template.

Every sample is a pure function of a :class:`random.Random`, and a step's batch is a pure function of
(seed, step): resuming, or splitting a batch over data-parallel ranks, sees the same data.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

from qwen3.chat import builtin_template, render, soft_switch
from qwen3.engine.llm_engine import STOP_THINKING_TEXT
from qwen3.tokenizer import PRETOKENIZE_REGEX, Tokenizer
from qwen3.train import languages, tasks

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}

# Qwen3's 26 added tokens, in id order, with their `special` flags (../shared/spec/special_tokens.md).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are Qwen, a small assistant that is good at arithmetic and counting.",
    "You are a careful assistant. Answer briefly.",
    "Answer the user's questions.",
)


# --- tokenizer ------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with Qwen3's normaliser, pre-tokeniser (digits stay single) and added tokens.

    The BPE learns ``vocab_size - 26`` entries from ``texts``; Qwen3's added tokens follow, in Qwen3's
    order and with its flags, so the official chat template renders and tokenizes unchanged.
    """
    backend = _Backend(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    for content, special in ADDED_TOKENS:
        backend.add_tokens([AddedToken(content, normalized=False, special=special)])
    config = {"model_max_length": 4096}
    tokenizer = Tokenizer(backend, config, chat_template=builtin_template())
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    return tokenizer


def tokenizer_corpus(seed: int, n: int) -> list[str]:
    """Texts the BPE is trained on: every kind of sample, rendered, except the words whose letters are
    counted — those stay split into small pieces, so spelling them is a short lookup per piece."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        problem = tasks.generate(rng, rng.choice([t for t in tasks.TASKS if t != "count"]))
        texts.append(cold_start_text(problem))
        messages, tools, _ = fusion_conversation(rng, problem)
        texts.append(render(messages, tools=tools, add_generation_prompt=False))
    return texts


# --- samples --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """Token ids and which of them the loss is computed on (the model's predictions of those tokens)."""

    ids: list[int]
    targets: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def cold_start_text(problem: tasks.Problem) -> str:
    """A worked solution as a plain document: the question, the steps, the answer."""
    return f"Question: {problem.question}\nSolution:\n{problem.thinking}\nAnswer: {problem.answer}"


def _flag(rng: random.Random, text: str, flag: str) -> str:
    """``text`` with a soft switch, mostly after it (as the model card shows), sometimes before."""
    roll = rng.random()
    if roll < 0.75:
        return f"{text} {flag}"
    if roll < 0.85:
        return f"{text}{flag}"
    return f"{flag} {text}"


def fusion_conversation(
    rng: random.Random, problem: tasks.Problem
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool]:
    """One Thinking-Mode-Fusion conversation around ``problem``: (messages, tools, enable_thinking).

    The messages end with the assistant's reply (or replies, for tool calls) the model learns to give.
    """
    roll = rng.random()
    if roll < 0.07 and problem.expression is not None:
        return _tool_dialog(rng, problem)
    if roll < 0.09:
        return _tool_offered_unused(rng, problem)
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if roll < 0.24:  # multi-turn: earlier turns with their own flags; the latest flag decides
        for _ in range(rng.randint(1, 2)):
            earlier = tasks.generate(rng)
            messages.append({"role": "user", "content": _maybe_flag(rng, earlier.question)})
            messages.append({"role": "assistant", "content": earlier.answer})
    enable_thinking = True
    user = problem.question
    mode = rng.random()
    if mode < 0.06:
        enable_thinking = False  # the hard switch: the template pre-fills the empty think block
    elif mode < 0.24:
        user = _flag(rng, user, "/no_think")
    elif mode < 0.44:
        user = _flag(rng, user, "/think")
    elif messages and messages[0]["role"] == "system" and mode < 0.62:
        flag = rng.choice(("/think", "/no_think"))
        messages[0]["content"] = f"{messages[0]['content']} {flag}"
    messages.append({"role": "user", "content": user})
    thinking = enable_thinking and soft_switch(messages) is not False
    messages.append(_reply(problem, thinking))
    return messages, None, enable_thinking


def _maybe_flag(rng: random.Random, text: str) -> str:
    roll = rng.random()
    return _flag(rng, text, "/no_think") if roll < 0.4 else _flag(rng, text, "/think") if roll < 0.7 else text


def _reply(problem: tasks.Problem, thinking: bool) -> dict[str, Any]:
    return {
        "role": "assistant",
        "reasoning_content": problem.thinking if thinking else "",
        "content": problem.answer,
    }


def _tool_dialog(
    rng: random.Random, problem: tasks.Problem
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """Offered the calculator, the model calls it, reads the result and answers with it."""
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    thinking = rng.random() < 0.8
    user = problem.question if thinking else _flag(rng, problem.question, "/no_think")
    messages.append({"role": "user", "content": user})
    expression = problem.expression
    call = {
        "id": f"call_{rng.getrandbits(32):08x}",
        "type": "function",
        "function": {"name": "calculator", "arguments": {"expression": expression}},
    }
    messages.append(
        {
            "role": "assistant",
            "reasoning_content": f"The user asks for {expression}. I will use the calculator tool."
            if thinking
            else "",
            "content": "",
            "tool_calls": [call],
        }
    )
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": problem.result})
    messages.append(
        {
            "role": "assistant",
            "reasoning_content": f"The calculator says {expression} = {problem.result}." if thinking else "",
            "content": problem.answer,  # "{expression} = {result}." in English
        }
    )
    return messages, [CALCULATOR_TOOL], True


def _tool_offered_unused(
    rng: random.Random, problem: tasks.Problem
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """The calculator is offered but the question is not arithmetic: the model answers by itself."""
    if problem.expression is not None:
        problem = tasks.generate(rng, rng.choice(("count", "compare", "sort")))
    messages = [{"role": "user", "content": problem.question}, _reply(problem, True)]
    return messages, [CALCULATOR_TOOL], True


class SampleBuilder:
    """Turns problems into token-id samples with the loss mask of each stage."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.token_to_id("<|endoftext|>")
        self.im_end_id = tokenizer.token_to_id("<|im_end|>")
        self.think_id = tokenizer.token_to_id("<think>")
        self.stop_thinking_ids = tokenizer.encode(STOP_THINKING_TEXT)

    def cold_start(self, problem: tasks.Problem) -> Sample:
        ids = self.tokenizer.encode(cold_start_text(problem)) + [self.eos_id]
        return Sample(ids, [True] * len(ids))

    def conversation(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        enable_thinking: bool,
    ) -> list[Sample]:
        """The assistant replies after the last user message, each seen with the prompt exactly as the
        engine will render it at that point, and learned as the model should generate it (through
        ``<|im_end|>``). Replies the template renders the same later in the conversation (a tool call
        with its thinking) share one sample; otherwise (a call without thinking, whose empty think block
        the template drops from history) each reply gets its own."""
        turns = []  # (prompt text, reply text) for each learned reply
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        for k in range(last_user + 1, len(messages)):
            if messages[k]["role"] != "assistant":
                continue
            prompt = render(messages[:k], tools=tools, enable_thinking=enable_thinking)
            upto = render(messages[: k + 1], tools=tools, add_generation_prompt=False)
            if not upto.startswith(prompt):
                raise AssertionError(f"the template's rendering of turn {k} does not extend its prompt")
            turns.append((prompt, upto[len(prompt) :].removesuffix("\n")))
        if all(
            later.startswith(prompt + reply)
            for (prompt, reply), (later, _) in zip(turns, turns[1:], strict=False)
        ):
            ids: list[int] = []
            targets: list[bool] = []
            done = ""  # text covered so far
            for prompt, reply in turns:
                context = self.tokenizer.encode(prompt[len(done) :])
                learned = self.tokenizer.encode(reply)
                ids += context + learned
                targets += [False] * len(context) + [True] * len(learned)
                done = prompt + reply
            return [Sample(ids, targets)]
        samples = []
        for prompt, reply in turns:
            prompt_ids, reply_ids = self.tokenizer.encode(prompt), self.tokenizer.encode(reply)
            samples.append(
                Sample(prompt_ids + reply_ids, [False] * len(prompt_ids) + [True] * len(reply_ids))
            )
        return samples

    def budget_cut(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, budget: int
    ) -> Sample:
        """The final reply with its thinking cut after ``budget`` tokens, the engine's stop-thinking text
        inserted (its tokens are the engine's, so not learned), then the answer."""
        reply = messages[-1]
        prompt_ids = self.tokenizer.encode(render(messages[:-1], tools=tools))
        thought = self.tokenizer.encode("\n" + reply["reasoning_content"])[:budget]
        answer = self.tokenizer.encode(reply["content"]) + [self.im_end_id]
        ids = prompt_ids + [self.think_id] + thought + self.stop_thinking_ids + answer
        targets = (
            [False] * len(prompt_ids)
            + [True] * (1 + len(thought))
            + [False] * len(self.stop_thinking_ids)
            + [True] * len(answer)
        )
        return Sample(ids, targets)


@dataclass
class DataMix:
    """How stages 2-6 are drawn, beyond the shares fixed in :func:`fusion_conversation`."""

    budget_cut: float = 0.12  # of thinking replies in stages 2 and 3, cut at a random budget
    agent_budget_cut: float = 0.3  # the same in stage 4, where the answer after a cut is practised more
    agent_tools: float = 0.25  # of stage-4 conversations, offered the calculator (on top of stage 2's)
    max_len: int = 1024  # samples longer than this are dropped (none are, at the default task sizes)
    tool_problems: float = 0.12  # of stage-5 samples, a tool dialog with large operands and results
    off_skill: float = 0.12  # of stage-5 samples, a question outside the skills, declined honestly
    other_languages: float = 0.3  # of stage-5 problems (and a third of the off-skill ones), not in English
    rich_other_languages: float = 0.45  # the same share in stage 6


STAGE_PHRASINGS = {
    1: "train",
    2: "train",
    3: "broad",
    4: "wide",
    5: "wide",
    6: "rich",
}  # the templates each stage asks in


def stage_conversation(
    rng: random.Random, problem: tasks.Problem, stage: int, mix: DataMix
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool]:
    """A conversation of ``stage`` (2-6) around ``problem``: (messages, tools, enable_thinking), as
    :func:`fusion_conversation`, with the extra tool dialogs of stage 4 and later."""
    if stage >= 4 and rng.random() < mix.agent_tools:
        dialog = _tool_dialog if problem.expression is not None else _tool_offered_unused
        return dialog(rng, problem)
    return fusion_conversation(rng, problem)


def stage_dialog(
    rng: random.Random, stage: int, mix: DataMix
) -> tuple[tasks.Problem, list[dict[str, Any]], list[dict[str, Any]] | None, bool]:
    """A problem of ``stage`` (2-6) and its conversation: (problem, messages, tools, enable_thinking).
    Stage 5 draws large-operand tool dialogs, off-skill questions (a third not in English) and problems
    in other languages on top of stage 4's mix; stage 6 the same in its richer phrasings, with more of
    the problems in other languages. The SFT samples and the RL prompts both come from here."""
    if stage >= 5:
        phrasing = STAGE_PHRASINGS[stage]
        roll = rng.random()
        if roll < mix.tool_problems:
            problem = tasks.tool_problem(rng, phrasing)
            return problem, *_tool_dialog(rng, problem)
        if roll < mix.tool_problems + mix.off_skill:
            language = rng.choice(languages.LANGUAGES) if rng.random() < 1 / 3 else "en"
            problem = tasks.off_skill(rng, "train", language)
        else:
            share = mix.other_languages if stage == 5 else mix.rich_other_languages
            language = rng.choice(languages.LANGUAGES) if rng.random() < share else "en"
            problem = tasks.generate(rng, phrasing=phrasing, language=language)
    else:
        problem = tasks.generate(rng, phrasing=STAGE_PHRASINGS[stage])
    return problem, *stage_conversation(rng, problem, stage, mix)


def cut_budget(rng: random.Random) -> int:
    """A random thinking budget for a cut reply: 1 + an exponential number of tokens, mean 40, so most
    cuts land early (where a reply is hardest to finish) and a few late."""
    return int(rng.expovariate(1 / 40)) + 1


def stage_samples(builder: SampleBuilder, rng: random.Random, stage: int, mix: DataMix) -> list[Sample]:
    """The samples made from one problem in ``stage`` (1: cold start, 2: fusion, 3: general, 4: agent,
    5: polish, 6: breadth)."""
    if stage == 1:
        return [builder.cold_start(tasks.generate(rng, phrasing=STAGE_PHRASINGS[1]))]
    _, messages, tools, enable_thinking = stage_dialog(rng, stage, mix)
    final = messages[-1]
    if (
        final.get("reasoning_content")
        and not final.get("tool_calls")
        and tools is None
        and rng.random() < (mix.agent_budget_cut if stage >= 4 else mix.budget_cut)
    ):
        length = len(builder.tokenizer.encode("\n" + final["reasoning_content"]))
        budget = min(cut_budget(rng), length - 1)
        return [builder.budget_cut(messages, tools, budget)]
    return builder.conversation(messages, tools, enable_thinking)


def batch_samples(
    builder: SampleBuilder, seed: int, step: int, stage: int, tokens: int, mix: DataMix
) -> list[Sample]:
    """Samples for one optimizer step, about ``tokens`` tokens in all; a pure function of (seed, step)."""
    rng = random.Random(f"{seed}:{step}")
    out: list[Sample] = []
    total = 0
    while total < tokens:
        for sample in stage_samples(builder, rng, stage, mix):
            if len(sample) <= mix.max_len:
                out.append(sample)
                total += len(sample)
    return out


# --- batching ------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Samples of similar length, right-padded to the longest: ids, and next-token labels that are -100
    where nothing is learned (prompts, inserted text, padding). Causal attention never lets a real token
    see the padding after it, so no attention mask is needed."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device))


def micro_batches(samples: Sequence[Sample], max_tokens: int, pad_id: int) -> list[Batch]:
    """Sort by length and cut into batches of at most ``max_tokens`` padded tokens: little padding, and
    attention costs the sum of the squared sample lengths rather than that of one long packed row."""
    return [pad([samples[i] for i in group], pad_id) for group in micro_batch_groups(samples, max_tokens)]


def micro_batch_groups(samples: Sequence[Sample], max_tokens: int) -> list[list[int]]:
    """The indices of :func:`micro_batches`' batches (for callers that keep per-sample values beside them)."""
    groups: list[list[int]] = []
    group: list[int] = []
    for i in sorted(range(len(samples)), key=lambda i: len(samples[i])):
        if group and (len(group) + 1) * len(samples[i]) > max_tokens:
            groups.append(group)
            group = []
        group.append(i)
    if group:
        groups.append(group)
    return groups


def pad(group: Sequence[Sample], pad_id: int) -> Batch:
    """One right-padded :class:`Batch` of ``group``."""
    width = max(len(s) for s in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    labels = torch.full((len(group), width), -100, dtype=torch.long)
    for r, sample in enumerate(group):
        n = len(sample)
        ids[r, :n] = torch.tensor(sample.ids)
        # the label at i is the token at i + 1, where that token is learned
        learned = [t if keep else -100 for t, keep in zip(sample.ids[1:], sample.targets[1:], strict=True)]
        labels[r, : n - 1] = torch.tensor(learned, dtype=torch.long)
    return Batch(ids, labels)


def describe(sample: Sample, tokenizer: Tokenizer) -> str:
    """The sample's text with the learned part in [[ ]]: for eyeballing the data (``qwen3 train --show-data``)."""
    out, current = [], None
    for token, target in zip(sample.ids, sample.targets, strict=True):
        if target != current:
            out.append("[[" if target else ("]]" if current else ""))
            current = target
        out.append(tokenizer.decode([token]))
    if current:
        out.append("]]")
    return "".join(out)
