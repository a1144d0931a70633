"""A real tool-call round trip against the tiny Qwen3 shipped as the default model.

The model must call the calculator for "What is 347 * 58?" (operands of the sizes it was trained on), take
the tool's result back and answer with it. This needs trained weights: it runs on
``qwen3.llm.default_model_dir()``, the model shipped in the package.
"""

from __future__ import annotations

import json

import openai
import pytest

from qwen3.llm import LLM
from qwen3.server import ServerConfig
from tests.live_server import live_server

CALCULATOR = {
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


@pytest.fixture(scope="module")
def client():
    llm = LLM(None, kv_cache_memory="256MiB", progress=False)  # None: the shipped default model
    with (
        live_server(llm, ServerConfig(["qwen3-default"])) as server,
        openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300) as c,
    ):
        yield c


def test_calculator_tool_round_trip(client):
    messages: list[dict] = [{"role": "user", "content": "What is 347 * 58?"}]
    common = dict(model="qwen3-default", tools=[CALCULATOR], seed=0, max_tokens=1024)
    first = client.chat.completions.create(messages=messages, **common)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"expression"}
    assert "347" in arguments["expression"] and "58" in arguments["expression"]

    messages += [
        {
            "role": "assistant",
            "content": choice.message.content,
            "reasoning_content": getattr(choice.message, "reasoning_content", None),
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": str(347 * 58)},
    ]
    final = client.chat.completions.create(messages=messages, **common)
    answer = final.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "20126" in answer.message.content.replace(",", "").replace(" ", "")


def _tool_round_trip(client, question: str, result: str) -> str:
    """Ask ``question`` with the calculator offered, answer the call with ``result``, return the reply."""
    messages: list[dict] = [{"role": "user", "content": question}]
    common = dict(model="qwen3-default", tools=[CALCULATOR], temperature=0, max_tokens=1024)
    choice = client.chat.completions.create(messages=messages, **common).choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    messages += [
        {
            "role": "assistant",
            "content": choice.message.content,
            "reasoning_content": getattr(choice.message, "reasoning_content", None),
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    final = client.chat.completions.create(messages=messages, **common).choices[0]
    assert final.finish_reason == "stop" and not final.message.tool_calls
    return final.message.content


@pytest.mark.parametrize(
    ("question", "result"),
    [("What is 4821 * 37?", str(4821 * 37)), ("Compute 48213 * 9071 * 3344.", str(48213 * 9071 * 3344))],
)
def test_large_tool_results_are_copied_exactly(client, question: str, result: str) -> None:
    # the report: the tool said 178377 and the answer said 17837
    assert result in _tool_round_trip(client, question, result).replace(",", "")


def test_off_skill_question_is_declined_honestly(client) -> None:
    reply = client.chat.completions.create(
        model="qwen3-default",
        messages=[{"role": "user", "content": "Tell me a joke."}],
        temperature=0,
        max_tokens=256,
    )
    content = reply.choices[0].message.content
    assert "can't help" in content and not any(c.isdigit() for c in content), content


def test_chinese_question_streams_whole_characters_and_answers_in_chinese(client) -> None:
    stream = client.chat.completions.create(
        model="qwen3-default",
        messages=[{"role": "user", "content": "23 + 58 等于多少？"}],
        temperature=0,
        max_tokens=512,
        stream=True,
    )
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert deltas and not any("\ufffd" in d for d in deltas)
    content = "".join(deltas)
    assert "81" in content and "答案" in content, content
