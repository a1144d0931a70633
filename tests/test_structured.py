"""Structured outputs: constraints compile, hold the answer and leave the reasoning free.

The end-to-end checks run the tiny Qwen3 shipped as the default model, which has never seen these
schemas: every answer must still be valid, in thinking and non-thinking mode, and the reasoning must be
there in thinking mode. Strings are bounded (``maxLength``, ``pattern``, ``enum``) and integers ranged, as
the schemas agents send usually are; an unbounded string is one a model this small may never close.
"""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import numpy
import pytest

from qwen3 import structured
from qwen3.agent import CALCULATOR as AGENT_CALCULATOR
from qwen3.chat import render
from qwen3.engine.llm_engine import STOP_THINKING_TEXT, RequestError
from qwen3.llm import LLM
from qwen3.sampling import RECOMMENDED, SamplingParams
from qwen3.structured import (
    GrammarBackend,
    GrammarError,
    Phase,
    StructuredOutputs,
    check_tool_parameters,
    closed_objects,
    tool_call_grammar,
)

NAME = {"type": "string", "maxLength": 12}
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                    "email": {"type": "string", "pattern": r"^[a-z]{1,8}@[a-z]{1,8}\.com$"},
                },
                "required": ["id", "email"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "bounded_array": {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": 10},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["scores"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "L"]},
        },
        "required": ["color", "size"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 20},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "note": {"type": "string", "maxLength": 10},
        },
        "required": ["title"],
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                "qty": {"enum": [1, 2, 3]},
            },
            "required": ["sku", "qty"],
        },
        "minItems": 1,
        "maxItems": 3,
    },
}
REGEXES = [r"(yes|no), because [a-z ]{3,30}\.", r"[0-9]{3}-[0-9]{4}", r"#[0-9a-f]{6}"]
CHOICES = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def llm(default_llm) -> LLM:
    return default_llm


def chat(llm: LLM, constraint: StructuredOutputs, thinking: bool, count: int = 4, **kwargs):
    """``count`` seeded answers to different questions, with Qwen3's recommended sampling for the mode."""
    params = SamplingParams(**RECOMMENDED[thinking], max_tokens=400, structured_outputs=constraint)
    conversations = [[{"role": "user", "content": f"Question {i}: give me the data."}] for i in range(count)]
    per_prompt = [params.replace(seed=i) for i in range(count)]
    return llm.chat(conversations, per_prompt, enable_thinking=thinking, **kwargs)


# --------------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("thinking", [False, True], ids=["no_think", "think"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_are_valid(llm, name, thinking):
    schema = SCHEMAS[name]
    for out in chat(llm, StructuredOutputs(json=schema), thinking):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.content), schema)
        assert bool(out.reasoning) == thinking, out.text  # the reasoning is free, and there in thinking mode


@pytest.mark.parametrize("thinking", [False, True], ids=["no_think", "think"])
def test_regex_and_choice_answers_match(llm, thinking):
    for pattern in REGEXES:
        for out in chat(llm, StructuredOutputs(regex=pattern), thinking, count=2):
            assert re.fullmatch(pattern, out.content), out.text
    for out in chat(llm, StructuredOutputs(choice=CHOICES), thinking):
        assert out.content in CHOICES and bool(out.reasoning) == thinking


def test_grammars_in_lark_and_gbnf(llm):
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]{0,3}/'
    gbnf = 'root ::= "Result: " [0-9] [0-9]? " " ("ok" | "fail")'
    for out in chat(llm, StructuredOutputs(grammar=lark), thinking=True, count=2):
        assert re.fullmatch(r"The answer is [1-9][0-9]{0,3}\.", out.content), out.text
    for out in chat(llm, StructuredOutputs(grammar=gbnf), thinking=False, count=2):
        assert re.fullmatch(r"Result: [0-9][0-9]? (ok|fail)", out.content), out.text


def test_json_object_is_an_object(llm):
    """Any JSON object. The tools in the prompt give this model something it knows how to write as one."""
    question = [{"role": "user", "content": "What is 347 * 58?"}]
    for thinking in (False, True):
        params = SamplingParams(**RECOMMENDED[thinking], max_tokens=300)
        constraint = StructuredOutputs(json_object=True)
        outs = llm.chat(
            [question] * 3,
            [params.replace(seed=i, structured_outputs=constraint) for i in range(3)],
            enable_thinking=thinking,
            tools=[CALCULATOR],
        )
        for out in outs:
            assert out.finish_reason == "stop" and not out.tool_calls  # held to JSON, no <tool_call> tag
            assert isinstance(json.loads(out.content), dict), out.text


# ----------------------------------------------------------------------- where the grammar starts


def test_the_grammar_starts_after_a_budget_cut(llm):
    budget = 12
    outs = chat(llm, StructuredOutputs(json=SCHEMAS["flat"]), thinking=True, thinking_budget=budget)
    for out in outs:
        cut = len(llm.engine.config.thinking.stop_thinking_ids)
        assert out.reasoning is not None and out.usage["reasoning_tokens"] <= budget + cut
        jsonschema.validate(json.loads(out.content), SCHEMAS["flat"])
    assert any(STOP_THINKING_TEXT.strip().split("\n")[0] in out.text for out in outs)  # a cut happened


def test_the_phases_follow_the_tokens(llm):
    """Thinking mode: a first token other than ``<think>`` is the grammar's (the model answers at once);
    ``<think>`` opens free reasoning, and ``</think>`` ends it, the blank line after it inserted, the
    grammar holding from the next token."""
    engine, tokenizer = llm.engine, llm.tokenizer
    thinking = engine.config.thinking
    params = SamplingParams(
        temperature=0, max_tokens=50, structured_outputs=StructuredOutputs(choice=CHOICES)
    )
    prompt = tokenizer.encode("Mood?")
    try:
        engine.add_request("at-once", prompt, params, thinking=True)
        seq = engine.requests["at-once"]
        assert seq.grammar.phase is Phase.OPEN
        engine._append(seq, tokenizer.encode("positive")[0], None, 0.0)
        assert seq.grammar.phase is Phase.ANSWER and seq.thinking.finished
        assert seq.grammar.matcher.try_consume_tokens(tokenizer.encode("negative")) == 0  # held to "positive"

        engine.add_request("thinks", prompt, params, thinking=True)
        seq = engine.requests["thinks"]
        engine._append(seq, thinking.think_start_id, None, 0.0)
        assert seq.grammar.phase is Phase.THINKING
        engine._append(seq, tokenizer.encode("hmm")[0], None, 0.0)
        out = engine._append(seq, thinking.think_end_id, None, 0.0)
        assert out.inserted_token_ids == thinking.gap_ids and seq.grammar.phase is Phase.ANSWER
        assert not seq.grammar.matcher.is_error()
    finally:
        engine.abort("at-once")
        engine.abort("thinks")


def test_open_and_thinking_masks(llm):
    backend = llm.engine.config.grammars
    vocab, think, eos = backend.vocab_size, backend.think_start_id, backend.eos_ids
    open_, thinking, answer = (
        backend.new_state(StructuredOutputs(choice=CHOICES), thinking=True, reasoning_open=False)
        for _ in range(3)
    )
    thinking.phase = Phase.THINKING
    answer.start_answer()
    allowed = ~backend.start_masks([open_, thinking, answer]).result().numpy()
    assert allowed.shape == (3, vocab)
    assert allowed[0, think] and 1 < allowed[0].sum() < 20  # the choices' first tokens, or <think>
    assert allowed[1].sum() == vocab - len(eos) and not allowed[1, eos].any()  # free, but no end
    assert not allowed[2, think] and not allowed[2, eos].any()
    assert (allowed[2] | (numpy.arange(vocab) == think) == allowed[0]).all()


# --------------------------------------------------------------- batching, preemption, n, seeds


def test_constrained_rows_do_not_change_the_others(llm):
    """A constrained and an unconstrained request in one batch answer as each does alone."""
    free = SamplingParams(temperature=0, max_tokens=30)
    held = free.replace(max_tokens=200, structured_outputs=StructuredOutputs(json=SCHEMAS["enums"]))
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    together = llm.chat([messages, messages], [free, held])
    assert together[0].token_ids == llm.chat(messages, free).token_ids
    assert together[1].token_ids == llm.chat(messages, held).token_ids
    assert together[0].content != together[1].content
    json.loads(together[1].content)


def test_seeds_and_n_choices(llm):
    params = SamplingParams(
        **RECOMMENDED[True],
        max_tokens=400,
        seed=7,
        n=3,
        structured_outputs=StructuredOutputs(json=SCHEMAS["flat"]),
    )
    prompt = render([{"role": "user", "content": "A person?"}], template=llm.tokenizer.chat_template)
    first = llm.generate(prompt, params)[0]
    again = llm.generate(prompt, params)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    # generate() is raw: no chat, so the grammar holds from the first token
    for completion in first.outputs:
        jsonschema.validate(json.loads(completion.text), SCHEMAS["flat"])


def test_preempted_constrained_requests_answer_as_alone():
    llm = LLM(None, kv_cache_memory=24 * 8 * 4096, block_size=8, max_model_len=190, progress=False)
    assert llm.engine.blocks.num_blocks == 24
    params = SamplingParams(
        temperature=0, max_tokens=120, structured_outputs=StructuredOutputs(json=SCHEMAS["nested"])
    )
    conversations = [[{"role": "user", "content": f"User number {i}?"}] for i in range(4)]
    together = llm.chat(conversations, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for conversation, out in zip(conversations, together, strict=True):
        assert out.token_ids == llm.chat(conversation, params).token_ids
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.content), SCHEMAS["nested"])


# ------------------------------------------------------------------------------ refused up front


def test_invalid_constraints_are_refused_with_the_field(llm):
    bad = {
        "json": StructuredOutputs(json={"type": "frobnicate"}),
        "regex": StructuredOutputs(regex="[a-"),
        "grammar": StructuredOutputs(grammar="start: undefined_rule"),
    }
    prompt = llm.tokenizer.encode("hi")
    for constraint in bad.values():
        with pytest.raises(RequestError) as info:
            llm.engine.check_request(prompt, SamplingParams(structured_outputs=constraint))
        assert info.value.field == "structured_outputs" and str(info.value)
    with pytest.raises(GrammarError, match="exactly one"):
        StructuredOutputs(json={"type": "object"}, regex="a")
    with pytest.raises(GrammarError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(GrammarError) as info:
        StructuredOutputs(choice=[])
    assert info.value.field == "choice"
    with pytest.raises(GrammarError) as info:
        StructuredOutputs(json="{not json").source()
    assert info.value.field == "json"
    with pytest.raises(GrammarError) as info:
        StructuredOutputs(regex="a" * (structured.MAX_SOURCE_CHARS + 1)).source()
    assert info.value.field == "regex"
    with pytest.raises(RequestError, match="answer prefix"):
        llm.engine.check_request(prompt, SamplingParams(structured_outputs=bad["regex"]), None, True, [1])


def test_compiled_grammars_are_cached_and_bounded(llm, monkeypatch):
    backend = GrammarBackend(llm.tokenizer.backend.to_str(), 1024, [1000], None)
    backend.compile(StructuredOutputs(regex="a+"))
    backend.compile(StructuredOutputs(regex="a+"))
    assert (backend.compiled, backend.cache_hits) == (1, 1)
    monkeypatch.setattr(structured, "CACHE_ENTRIES", 2)
    for pattern in ("b+", "c+", "d+"):
        backend.compile(StructuredOutputs(regex=pattern))
    assert len(backend._cache) == 2
    backend.compile(StructuredOutputs(regex="a+"))  # evicted: compiled again
    assert backend.compiled == 5


def test_closed_objects():
    schema = {
        "type": "object",
        "properties": {
            "inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "properties": {"type": "object", "properties": {}},  # a field named "properties"
            "list": {"type": "array", "items": {"type": "object", "properties": {"y": {}}}},
        },
        "$defs": {"d": {"type": "object", "properties": {"z": {}}}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    assert props["inner"]["additionalProperties"] is False
    assert props["properties"]["additionalProperties"] is False and "additionalProperties" not in props
    assert props["list"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is False
    kept = {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}}
    assert closed_objects(kept) == kept
    composed = {"allOf": [{"properties": {"a": {}}}], "properties": {"b": {}}}
    assert closed_objects(composed) == composed
    assert "additionalProperties" not in schema  # the input is left as it was


# ----------------------------------------------------------------------------------------- tool calls

# The shipped model's calculator, strict, its expression held to arithmetic characters.
CALCULATOR = copy.deepcopy(AGENT_CALCULATOR.schema())
CALCULATOR["function"]["parameters"]["properties"]["expression"]["pattern"] = "^[0-9+*/() -]{1,40}$"
CALCULATOR["function"]["strict"] = True


@pytest.mark.parametrize("thinking", [False, True], ids=["no_think", "think"])
def test_required_tool_calls_are_valid_calls(llm, thinking):
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Oslo"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
            },
        },
    }
    tools = [CALCULATOR, weather, {"type": "function", "function": {"name": "now"}}]
    outs = chat(llm, tool_call_grammar(tools, "required"), thinking, count=4, tools=tools)
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tools}
    for out in outs:
        assert out.finish_reason == "tool_calls" and out.tool_calls, out.text
        for call in out.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        assert bool(out.reasoning) == thinking


def test_auto_strict_calls_the_model_starts_are_completed_validly(llm):
    question = [{"role": "user", "content": "What is 347 * 58?"}]  # the shipped model calls its calculator
    params = SamplingParams(**RECOMMENDED[True], max_tokens=600, seed=0)
    outs = llm.chat(
        [question] * 3,
        [
            params.replace(seed=i, structured_outputs=tool_call_grammar([CALCULATOR], "auto"))
            for i in range(3)
        ],
        tools=[CALCULATOR],
    )
    calls = [call for out in outs for call in out.tool_calls]
    assert calls, [out.text for out in outs]
    for call in calls:
        assert call.name == "calculator"
        jsonschema.validate(json.loads(call.arguments), CALCULATOR["function"]["parameters"])


def test_tool_parameters_are_checked_with_the_tool_named():
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    with pytest.raises(GrammarError) as info:
        check_tool_parameters([CALCULATOR, broken])
    assert info.value.field == "tools[1].function.parameters"
    with pytest.raises(ValueError):
        tool_call_grammar([CALCULATOR], "sometimes")


def test_the_sampler_applies_masks_to_their_rows_only():
    """Banned tokens are never sampled; other rows are untouched; logprobs stay the model's."""
    import torch

    from qwen3.sampling import Sampler, SamplingBatch

    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0, logprobs=1)] * 2
    ones = torch.ones(2)
    batch = SamplingBatch(["a", "b"], params, [None, None], ones * 0, ones, ones * 0)
    batch.masked_rows, batch.banned = [1], torch.tensor([[True, False, False]])
    result = Sampler()(logits.clone(), batch)
    assert result.token_ids == [0, 1]
    batch.masked_rows, batch.banned = [0, 1], torch.tensor([[True, False, False], [False, False, False]])
    assert Sampler()(logits.clone(), batch).token_ids == [1, 0]  # every row masked: the one-call path
    batch.masked_rows = [1, 0]
    assert Sampler()(logits.clone(), batch).token_ids == [0, 1]  # out of order: row by row
    expected = logits.log_softmax(-1)
    assert result.logprobs[1][0] == pytest.approx(expected[1, 1].item())  # unmasked: no -inf anywhere
    assert result.logprobs[1][1][0][0] == 0  # the top alternative is still the banned token


def test_a_tokenizer_llguidance_cannot_read_is_a_request_error():
    backend = GrammarBackend("{not a tokenizer", 1024, [1000], None)
    with pytest.raises(GrammarError, match="unsupported with this tokenizer"):
        backend.compile(StructuredOutputs(regex="a"))


def test_hostile_constraints_fail_alone_and_never_crash(llm):
    """Found in review: thousands of chained rules or $refs overflowed a thread's stack in llguidance's
    builder (the process died); deep JSON text raised RecursionError (a 500); an ambiguous grammar slowed
    every step. Now they compile on a deep-stack thread, are refused, or fail only their own request."""
    prompt = llm.tokenizer.encode("hi")
    chain = "start: r0\n" + "\n".join(f'r{i}: "{i}" r{i + 1} | "z"' for i in range(3000)) + '\nr3000: "end"'
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(3000)} | {"d3000": {"type": "integer"}}
    for constraint in (
        StructuredOutputs(grammar=chain),
        StructuredOutputs(json={"$defs": defs, "$ref": "#/$defs/d0"}),
    ):
        llm.engine.check_request(prompt, SamplingParams(structured_outputs=constraint))  # compiles
    for text in ("[" * 3000, '{"a":' * 2000):
        with pytest.raises(RequestError, match="nested too deeply"):
            llm.engine.check_request(prompt, SamplingParams(structured_outputs=StructuredOutputs(json=text)))
    ambiguous = StructuredOutputs(grammar='start: x\nx: x x | x x x | "a"')
    fine = StructuredOutputs(choice=CHOICES)
    greedy = SamplingParams(temperature=0, max_tokens=400)
    bad, good = llm.generate(["hi", "hi"], [greedy.replace(structured_outputs=c) for c in (ambiguous, fine)])
    assert bad.finish_reason == "error" and "structured_outputs" in bad.outputs[0].error
    assert good.finish_reason == "stop" and good.text in CHOICES


def test_a_budget_means_reasoning_first_whatever_the_flag(llm):
    """``thinking_budget`` without ``thinking=True``: the grammar still waits for the end of the reasoning
    (review finding: it started at once and then never advanced)."""
    engine, tokenizer = llm.engine, llm.tokenizer
    prompt = tokenizer.encode("<|im_start|>user\nMood?<|im_end|>\n<|im_start|>assistant\n")
    params = SamplingParams(
        temperature=0, max_tokens=120, structured_outputs=StructuredOutputs(choice=CHOICES)
    )
    engine.add_request("budget", prompt, params, thinking_budget=5)
    ids: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            ids += out.new_token_ids
    answer = tokenizer.decode(ids, skip_special_tokens=True).split("</think>")[-1].strip()
    assert answer in CHOICES


def test_gbnf_is_told_from_lark_by_its_rules():
    lark = StructuredOutputs(grammar='start: "a::=b"').source()
    assert "a::=b" in lark
    assert "start" in StructuredOutputs(grammar='root ::= "x"').source()


def test_closed_objects_leave_one_of_and_not_alone():
    one_of = {"oneOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    negated = {"not": {"properties": {"a": {}}}, "if": {"properties": {"b": {}}}}
    assert closed_objects(one_of) == one_of and closed_objects(negated) == negated
