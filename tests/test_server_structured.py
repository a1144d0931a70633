"""Structured outputs through the server, with the official openai client and the shipped tiny model.

``response_format`` (json_object, json_schema), vLLM's ``structured_outputs`` and ``guided_*`` fields,
strict tools and forced ``tool_choice``: valid answers, the reasoning kept in thinking mode, streaming
the same, and a 400 naming the field for anything that cannot be compiled.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from qwen3.server import ServerConfig
from tests.live_server import live_server
from tests.test_structured import CALCULATOR, CHOICES, SCHEMAS

MODEL = "qwen3-default"
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server(default_llm):
    with live_server(default_llm, ServerConfig([MODEL])) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def ask(client, content: str = "Give me the data.", **kwargs):
    kwargs = {"max_tokens": 400, "seed": 0, **kwargs}
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def collect(stream) -> tuple[str, str, dict[int, dict], str | None]:
    """A chat stream's reasoning, content, tool calls (by index) and finish reason."""
    reasoning, content, calls, finish = [], [], {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        content.append(delta.content or "")
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return "".join(reasoning), "".join(content), calls, finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_json_schema_keeps_the_reasoning(client, stream):
    schema = SCHEMAS["nested"]
    fmt = {"type": "json_schema", "json_schema": {"name": "account", "schema": schema, "strict": True}}
    for seed in range(3):
        if stream:
            reasoning, content, _, finish = collect(ask(client, response_format=fmt, seed=seed, stream=True))
        else:
            message = ask(client, response_format=fmt, seed=seed).choices[0].message
            reasoning, content = message.reasoning_content, message.content
        jsonschema.validate(json.loads(content), schema)
        assert reasoning  # thinking mode (the default): the model reasoned first, unconstrained


def test_the_openai_parse_helper_with_a_pydantic_model(client):
    class Reading(BaseModel):
        city: str = Field(pattern="^[A-Z][a-z]{2,9}$")
        celsius: int = Field(ge=-40, le=50)

    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "The weather?"}],
        response_format=Reading,
        max_tokens=400,
        seed=1,
        extra_body=NO_THINK,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Reading) and -40 <= parsed.celsius <= 50


def test_vllm_fields_and_their_older_names(client):
    regex = r"[0-9]{3}-[0-9]{4}"
    for extra in ({"structured_outputs": {"regex": regex}}, {"guided_regex": regex}):
        content = ask(client, extra_body={**extra, **NO_THINK}).choices[0].message.content
        assert re.fullmatch(regex, content), content
    for extra in ({"structured_outputs": {"choice": CHOICES}}, {"guided_choice": CHOICES}):
        message = ask(client, extra_body=extra).choices[0].message
        assert message.content in CHOICES and message.reasoning_content
    schema = SCHEMAS["enums"]
    for extra in ({"structured_outputs": {"json": schema}}, {"guided_json": json.dumps(schema)}):
        content = ask(client, extra_body={**extra, **NO_THINK}).choices[0].message.content
        jsonschema.validate(json.loads(content), schema)
    grammar = 'root ::= "Result: " [0-9] [0-9]?'
    for extra in ({"structured_outputs": {"grammar": grammar}}, {"guided_grammar": grammar}):
        content = ask(client, extra_body=extra).choices[0].message.content
        assert re.fullmatch(r"Result: [0-9][0-9]?", content), content


def test_json_object_and_the_completions_endpoint(client):
    # The rendered tools give this model an object it knows how to write (a strict tool would be refused).
    loose = {"type": "function", "function": {**CALCULATOR["function"], "strict": False}}
    response = ask(client, "What is 347 * 58?", tools=[loose], response_format={"type": "json_object"})
    message = response.choices[0].message
    assert isinstance(json.loads(message.content), dict), message
    regex = r"#[0-9a-f]{6}"
    completion = client.completions.create(
        model=MODEL, prompt="The colour is ", max_tokens=20, extra_body={"guided_regex": regex}
    )
    assert re.fullmatch(regex, completion.choices[0].text)
    for stream in (False, True):
        completion = client.completions.create(
            model=MODEL, prompt="Pick: ", max_tokens=20, stream=stream, extra_body={"guided_choice": CHOICES}
        )
        text = "".join(c.choices[0].text for c in completion) if stream else completion.choices[0].text
        assert text in CHOICES


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_are_valid(client, choice, stream):
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                "required": ["city"],
            },
        },
    }
    tool_choice = (
        "required" if choice == "required" else {"type": "function", "function": {"name": "get_weather"}}
    )
    for thinking in (True, False):
        extra = {} if thinking else NO_THINK
        response = ask(
            client,
            "Weather in Oslo?",
            tools=[CALCULATOR, weather],
            tool_choice=tool_choice,
            stream=stream,
            extra_body=extra,
        )
        if stream:
            reasoning, _, calls, finish = collect(response)
            calls = list(calls.values())
        else:
            message = response.choices[0].message
            reasoning, finish = message.reasoning_content, response.choices[0].finish_reason
            calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
        assert finish == "tool_calls" and calls
        assert bool(reasoning) == thinking
        schemas = {
            "calculator": CALCULATOR["function"]["parameters"],
            "get_weather": weather["function"]["parameters"],
        }
        for call in calls:
            assert choice == "required" or call["name"] == "get_weather"
            jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


def test_strict_tools_with_auto_complete_the_call_validly(client):
    """The shipped model calls its calculator for arithmetic; with a strict tool the call is held to the
    tool's schema (here, an expression of digits and operators only)."""
    for seed in range(2):
        response = ask(client, "What is 347 * 58?", tools=[CALCULATOR], seed=seed, max_tokens=800)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), CALCULATOR["function"]["parameters"])


def test_invalid_constraints_are_400_with_the_field(server):
    url = server.base_url + "/chat/completions"
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    broken_tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "nonsense"}, "strict": True},
    }
    cases = {
        "response_format.json_schema.schema": {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            }
        },
        "structured_outputs.regex": {"structured_outputs": {"regex": "[a-"}},
        "structured_outputs.choice": {"structured_outputs": {"choice": []}},
        "guided_grammar": {"guided_grammar": "start: missing_rule"},
        "guided_json": {"guided_json": "{not json"},
        "guided_choice": {"guided_regex": "a", "guided_choice": ["b"]},
        "structured_outputs": {"structured_outputs": {"regex": "a", "choice": ["b"]}},
        "tools[0].function.parameters": {"tools": [broken_tool]},
        "tool_choice": {"tool_choice": "required"},
    }
    for param, extra in cases.items():
        response = httpx.post(url, json={**base, **extra}, timeout=60)
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param, (param, response.text)
    for extra in (
        {"response_format": {"type": "json_schema"}},
        {"structured_outputs": {"structural_tag": {"type": "x"}}},
        {"response_format": {"type": "yaml"}},
    ):
        response = httpx.post(url, json={**base, **extra}, timeout=60)
        assert response.status_code == 400, response.text
    forced = {"tools": [CALCULATOR], "tool_choice": "required", "guided_regex": "a"}
    response = httpx.post(url, json={**base, **forced}, timeout=60)
    assert response.status_code == 400 and "cannot be combined" in response.json()["error"]["message"]
    completions = httpx.post(
        server.base_url + "/completions",
        json={"model": MODEL, "prompt": "x", "guided_regex": "("},
        timeout=60,
    )
    assert completions.status_code == 400 and completions.json()["error"]["param"] == "guided_regex"


def test_the_responses_api_text_format(client):
    """``text.format`` on /v1/responses is the same constraint: the reasoning item is there, the text valid."""
    schema = SCHEMAS["enums"]
    fmt = {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}
    response = client.responses.create(model=MODEL, input="Pick a colour and a size.", text={"format": fmt})
    kinds = [item.type for item in response.output]
    assert kinds[0] == "reasoning" and "message" in kinds
    jsonschema.validate(json.loads(response.output_text), schema)

    class Pick(BaseModel):
        color: str = Field(pattern="^(red|green|blue)$")
        size: int = Field(ge=1, le=3)

    parsed = client.responses.parse(
        model=MODEL, input="Pick one.", text_format=Pick, reasoning={"effort": "none"}
    ).output_parsed
    assert isinstance(parsed, Pick) and 1 <= parsed.size <= 3
