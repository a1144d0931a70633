"""The API the clients expect, against a live server on the shipped tiny Qwen3 (trained: it thinks, answers
arithmetic and calls a calculator): the Responses API through the openai client, the OpenAI Agents SDK and
LangChain; forced tool calls of every tool shape; ``reasoning_effort``; CORS; lenient field handling; and
vLLM's small endpoints (``/tokenize``, ``/detokenize``, ``/version``, ``/ping``), over raw HTTP.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from qwen3.agent import CALCULATOR as AGENT_CALCULATOR
from qwen3.server import ServerConfig, create_app
from qwen3.server.chat_completions import prepare
from qwen3.server.protocol import ChatCompletionRequest
from tests.live_server import live_server

MODEL = "qwen3-default"
QUESTION = "What is 347 * 58?"
CALCULATOR = AGENT_CALCULATOR.schema()  # the tool the shipped model was trained with
NO_PARAMETERS = {"type": "function", "function": {"name": "get_time", "description": "The current time"}}
NESTED = {
    "type": "function",
    "function": {
        "name": "math:lookup table",  # MCP-style namespace, and a space
        "description": "Look a query up",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {
                    "type": "object",
                    "properties": {
                        # bounded: the tiny model never saw this tool, and nothing else makes it
                        # close a free string; the schema's bounds are enforced by the grammar
                        "text": {"type": "string", "maxLength": 40},
                        "tags": {
                            "type": "array",
                            "items": {"type": "string", "maxLength": 12},
                            "maxItems": 3,
                        },
                    },
                }
            },
        },
    },
}
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def flat(tool: dict) -> dict:
    """A chat tool in the Responses API's flat shape."""
    return {"type": "function", **tool["function"]}


@pytest.fixture(scope="module")
def server(default_llm):
    with live_server(default_llm, ServerConfig([MODEL])) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=300)


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 400, **fields}


# ------------------------------------------------------------------------------------ forced tool calls


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "non-thinking"])
@pytest.mark.parametrize(
    "tool", [CALCULATOR, NO_PARAMETERS, NESTED], ids=["calculator", "no-params", "nested"]
)
def test_named_tool_choice_calls_the_tool(client, tool, thinking, stream):
    """The forced prefix ends on a token boundary the model learned, so it writes well-formed arguments."""
    name = tool["function"]["name"]
    common = dict(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], tools=[tool], temperature=0,
        tool_choice={"type": "function", "function": {"name": name}}, max_tokens=400,
        extra_body={} if thinking else NO_THINK,
    )  # fmt: skip
    if stream:
        calls, finish, reasoning = [], None, ""
        for chunk in client.chat.completions.create(stream=True, **common):
            delta = chunk.choices[0].delta
            calls += delta.tool_calls or []
            reasoning += getattr(delta, "reasoning_content", None) or ""
            finish = chunk.choices[0].finish_reason or finish
    else:
        choice = client.chat.completions.create(**common).choices[0]
        calls, finish = choice.message.tool_calls or [], choice.finish_reason
        reasoning = getattr(choice.message, "reasoning_content", None) or ""
    assert finish == "tool_calls" and [c.function.name for c in calls] == [name]
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    assert bool(reasoning) == thinking  # thinking mode thought before it called


def test_allowed_tools_and_the_flat_named_shape(server):
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "calculator"}}],
        },
    }
    for choice in (allowed, {"type": "function", "name": "calculator"}):
        response = post(
            server, "/v1/chat/completions", chat(tools=[NO_PARAMETERS, CALCULATOR], tool_choice=choice)
        )
        body = response.json()["choices"][0]
        assert response.status_code == 200 and body["finish_reason"] == "tool_calls", body
        assert body["message"]["tool_calls"][0]["function"]["name"] == "calculator"
    # allowed_tools renders only the tools it lists
    tokens = [
        post(server, "/tokenize", chat(tools=[NO_PARAMETERS, CALCULATOR], tool_choice=c))
        for c in (
            "auto",
            {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "calculator"}]},
        )
    ]
    assert tokens[1].json()["count"] < tokens[0].json()["count"]


# ------------------------------------------------------------------------------------ reasoning effort


def test_reasoning_effort_maps_to_thinking_controls(server):
    def prepared(**fields):
        return prepare(server.state, ChatCompletionRequest.model_validate(chat(**fields)))

    assert prepared(reasoning_effort="low").thinking_budget == 1024
    assert prepared(reasoning_effort="medium").thinking_budget == 8192
    assert prepared(reasoning_effort="high").thinking_budget is None
    assert prepared(reasoning_effort="low", thinking_budget=7).thinking_budget == 7  # qwen3's own wins
    off = post(server, "/v1/chat/completions", chat(reasoning_effort="none")).json()
    on = post(server, "/v1/chat/completions", chat(reasoning_effort="high")).json()
    assert off["choices"][0]["message"]["reasoning_content"] is None
    assert off["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    assert on["choices"][0]["message"]["reasoning_content"]
    both = chat(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True})
    assert post(server, "/v1/chat/completions", both).json()["choices"][0]["message"]["reasoning_content"]
    bad = post(server, "/v1/chat/completions", chat(reasoning_effort="extreme")).json()["error"]
    assert bad["param"] == "reasoning_effort"


# ------------------------------------------------------------------------------------ the Responses API


def test_responses_plain_with_reasoning(client):
    response = client.responses.create(model=MODEL, input="What is 347 + 589?", max_output_tokens=400)
    assert response.status == "completed" and "936" in response.output_text
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    reasoning = response.output[0]
    assert reasoning.content[0].type == "reasoning_text" and "936" in reasoning.content[0].text
    usage = response.usage
    assert 0 < usage.output_tokens_details.reasoning_tokens < usage.output_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens

    quick = client.responses.create(
        model=MODEL, input="What is 347 + 589?", instructions="Answer briefly.", reasoning={"effort": "none"}
    )
    assert [item.type for item in quick.output] == ["message"] and quick.output_text  # (not always right)
    assert quick.usage.output_tokens_details.reasoning_tokens == 0 and quick.instructions == "Answer briefly."
    cut = client.responses.create(model=MODEL, input="What is 347 + 589?", max_output_tokens=5)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_responses_stream_sends_the_typed_events(client):
    whole = client.responses.create(model=MODEL, input="What is 347 + 589?", temperature=0)
    events = list(
        client.responses.create(model=MODEL, input="What is 347 + 589?", temperature=0, stream=True)
    )
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    expected = ["response.output_item.added", "response.content_part.added"]
    assert kinds[2:4] == expected and events[2].item.type == "reasoning"
    message_at = next(i for i, e in enumerate(events) if e.type == "response.output_item.added" and i > 2)
    assert kinds[message_at : message_at + 2] == expected and events[message_at].item.type == "message"
    for kind in ("reasoning_text", "output_text"):
        done = next(e for e in events if e.type == f"response.{kind}.done")
        deltas = "".join(e.delta for e in events if e.type == f"response.{kind}.delta")
        assert deltas == done.text
    assert kinds.count("response.output_item.done") == 2 and kinds.count("response.content_part.done") == 2
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output_text == whole.output_text and final.output[0].content == whole.output[0].content
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_responses_function_tool_round_trip(client):
    """The model calls the calculator, takes the result (the output items sent back as input) and answers."""
    tools = [flat(CALCULATOR)]
    first = client.responses.create(
        model=MODEL, input=QUESTION, tools=tools, temperature=0, max_output_tokens=600
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert [c.name for c in calls] == ["calculator"] and first.output[0].type == "reasoning"
    assert "347" in json.loads(calls[0].arguments)["expression"]
    history = [
        {"role": "user", "content": QUESTION},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": str(347 * 58)},
    ]
    second = client.responses.create(
        model=MODEL, input=history, tools=tools, temperature=0, max_output_tokens=600
    )
    assert second.status == "completed" and "20126" in second.output_text.replace(",", "")

    events = list(
        client.responses.create(model=MODEL, input=QUESTION, tools=tools, tool_choice="required", stream=True,
                                reasoning={"effort": "none"})
    )  # fmt: skip
    kinds = [e.type for e in events]
    at = kinds.index("response.function_call_arguments.delta")
    assert kinds[at - 1 : at + 3] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
    ]  # fmt: skip
    assert events[at + 1].arguments == events[at].delta and events[-1].response.output[0].name == "calculator"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
         "text.format.schema"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image"}]}]},
         "input[0].content[0].type"),
        ({"input": [{"type": "function_call_output", "output": "1"}]}, "input[0].call_id"),
        ({"input": []}, "input"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"tools": [flat(CALCULATOR)], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        ({"tools": [flat(CALCULATOR)], "tool_choice": {"type": "allowed_tools", "mode": "auto",
          "tools": [{"type": "function", "name": "nope"}]}}, "tool_choice.tools[0].name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"input": "hi " * 5000}, "input"),
    ],
)  # fmt: skip
def test_bad_responses_requests_are_400_naming_the_field(server, fields, param):
    response = post(server, "/v1/responses", {"model": MODEL, "input": "hi", **fields})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param, error
    assert error["message"].startswith(param) and "Responses" not in error["message"]


def test_stored_responses_do_not_exist(server):
    response = httpx.get(server.base_url + "/responses/resp_123")
    assert response.status_code == 404 and "stateless" in response.json()["error"]["message"]


# ------------------------------------------------------------------------------------ frameworks


def test_openai_agents_sdk_runs_a_function_tool(server):
    import agents  # the test extras install it: a missing package fails, never skips

    calls = []

    @agents.function_tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression"""
        calls.append(expression)
        return str(eval(expression, {"__builtins__": {}}))  # the tiny model writes "347 * 58"

    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    model = agents.OpenAIResponsesModel(model=MODEL, openai_client=client)  # the SDK's default model class
    agent = agents.Agent(
        name="calc", model=model, tools=[calculator],
        model_settings=agents.ModelSettings(tool_choice="calculator", temperature=0),
    )  # fmt: skip
    result = agents.Runner.run_sync(agent, QUESTION, max_turns=4)
    assert calls and "347" in calls[0]
    kinds = [item.type for item in result.new_items]
    assert "tool_call_item" in kinds and "tool_call_output_item" in kinds
    assert "20126" in str(result.final_output).replace(",", "")


def test_langchain_chat_openai(server):
    import langchain_openai
    from langchain_core.tools import tool

    @tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression"""
        return expression

    common = dict(model=MODEL, base_url=server.base_url, api_key="unused", temperature=0, max_retries=0)
    responses = langchain_openai.ChatOpenAI(use_responses_api=True, **common)
    answer = responses.invoke("What is 347 + 589?")
    assert "936" in answer.text and answer.usage_metadata["output_token_details"]["reasoning"] > 0
    for use_responses in (False, True):
        llm = langchain_openai.ChatOpenAI(use_responses_api=use_responses, **common)
        message = llm.bind_tools([calculator], tool_choice="calculator").invoke(QUESTION)
        assert [call["name"] for call in message.tool_calls] == ["calculator"], message
        assert "347" in message.tool_calls[0]["args"]["expression"]


# ------------------------------------------------------------------------------------ lenient fields


def test_explicit_nulls_mean_the_default(server):
    nulls = dict.fromkeys(
        ["n", "stream", "logprobs", "top_logprobs", "stop", "temperature", "top_p", "seed", "tools", "tool_choice",
         "stream_options", "max_completion_tokens", "response_format_unused", "reasoning_effort", "thinking_budget"]
    )  # fmt: skip
    response = post(server, "/v1/chat/completions", chat(**nulls, max_tokens=None))
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1 and response.json()["choices"][0]["logprobs"] is None
    completion = post(server, "/v1/completions", {"model": MODEL, "prompt": "1 + 1", "n": None, "echo": None})
    assert completion.status_code == 200 and len(completion.json()["choices"]) == 1
    assert post(server, "/v1/responses", {"model": MODEL, "input": "hi", "tools": None, "stream": None,
                                          "max_output_tokens": 8}).status_code == 200  # fmt: skip
    refused = post(server, "/v1/chat/completions", chat(messages=None)).json()["error"]
    assert refused["param"] == "messages"  # a required field's null is still an error


def test_tool_names_beyond_openais_pattern(server):
    for name in ("math:calculator", "my calculator", "ns.tool-1"):
        tool = {"type": "function", "function": {**CALCULATOR["function"], "name": name}}
        body = chat(tools=[tool], tool_choice={"type": "function", "function": {"name": name}}, **NO_THINK)
        calls = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == [name]
    longest = {"type": "function", "function": {"name": "x" * 256}}
    assert post(server, "/tokenize", chat(tools=[longest])).status_code == 200
    for bad in ("", "line\nbreak", 'quo"te', "x" * 257):
        tool = {"type": "function", "function": {"name": bad}}
        error = post(server, "/v1/chat/completions", chat(tools=[tool])).json()["error"]
        assert error["param"] == "tools[0].function.name", (bad, error)


def test_content_parts_and_legacy_functions(server):
    parts = [{"type": "input_text", "text": QUESTION}]
    history = [
        {"role": "user", "content": parts},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    assert post(server, "/v1/chat/completions", chat(messages=history, max_tokens=8)).status_code == 200

    legacy = chat(functions=[CALCULATOR["function"]], function_call={"name": "calculator"}, **NO_THINK)
    choice = post(server, "/v1/chat/completions", legacy).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "calculator"
    none = post(server, "/tokenize", chat(functions=[CALCULATOR["function"]], function_call="none")).json()
    assert none["count"] == post(server, "/tokenize", chat()).json()["count"]  # "none" renders no tools
    function_result = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "calculator", "arguments": '{"expression": "347 * 58"}'}}]},
        {"role": "function", "name": "calculator", "content": "20126"},
    ]  # fmt: skip
    answer = post(
        server, "/v1/chat/completions", chat(messages=function_result, functions=[CALCULATOR["function"]])
    )
    assert "20126" in answer.json()["choices"][0]["message"]["content"]
    both = post(server, "/v1/chat/completions", chat(functions=[CALCULATOR["function"]], tools=[CALCULATOR]))
    assert both.json()["error"]["param"] == "functions"


@pytest.mark.parametrize(
    ("choice", "param"),
    [
        ({"type": "bogus", "function": {"name": "calculator"}}, "tool_choice.type"),
        ({"type": "function"}, "tool_choice"),
        ({"type": "function", "function": {"name": 5}}, "tool_choice.function.name"),
        ({"type": "allowed_tools", "allowed_tools": {"mode": "sometimes", "tools": []}}, "tool_choice.allowed_tools.mode"),
    ],
)  # fmt: skip
def test_error_params_never_name_classes(server, choice, param):
    error = post(server, "/v1/chat/completions", chat(tools=[CALCULATOR], tool_choice=choice)).json()["error"]
    assert error["param"] == param, error
    assert "ToolChoice" not in error["message"]


# ------------------------------------------------------------------------------------ CORS, small endpoints


def test_cors_preflight(server, default_llm):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    response = httpx.options(server.base_url + "/chat/completions", headers=preflight)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers  # never with "*"
    simple = httpx.get(server.base_url + "/models", headers={"Origin": "http://app.example"})
    assert simple.headers["access-control-allow-origin"] == "*"

    app = create_app(default_llm, ServerConfig([MODEL], api_key="k", allowed_origins=["http://app.example"]))
    local = TestClient(app)  # no lifespan (the engine is the live server's): CORS and auth need none
    # the preflight needs no key; an unlisted origin gets none
    allowed = local.options("/v1/chat/completions", headers=preflight)
    assert (
        allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.example"
    )
    assert allowed.headers["access-control-allow-credentials"] == "true"
    other = local.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    refused = local.get("/v1/models", headers={"Origin": "http://app.example"})
    assert (
        refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://app.example"
    )
    assert local.post("/tokenize", json={"prompt": "hi"}).status_code == 401  # the key guards it too


def test_tokenize_round_trip(server):
    text = "Héllo, 世界! <think> 347 * 58"
    tokens = post(server, "/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) > 0
    assert tokens["max_model_len"] == server.llm.engine.config.max_model_len
    assert post(server, "/detokenize", {"model": MODEL, "tokens": tokens["tokens"]}).json() == {
        "prompt": text
    }

    for fields in ({}, {"tools": [CALCULATOR]}, NO_THINK):
        counted = post(server, "/tokenize", chat(**fields)).json()["count"]
        usage = post(server, "/v1/chat/completions", chat(max_tokens=1, **fields)).json()["usage"]
        assert counted == usage["prompt_tokens"], fields  # the chat template applied exactly as chat does
    long = post(server, "/tokenize", chat(messages=[{"role": "user", "content": "hi " * 5000}])).json()
    assert long["count"] > long["max_model_len"]  # counted, not refused
    bad = post(server, "/detokenize", {"tokens": [1, -5]}).json()["error"]
    assert bad["param"] == "tokens[1]"
    assert post(server, "/tokenize", {"model": MODEL}).status_code == 400
    assert post(server, "/tokenize", {"model": "other", "prompt": "x"}).status_code == 404


def test_version_ping_and_unknown_paths(server):
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/ping").status_code == httpx.post(server.url + "/ping").status_code == 200
    response = httpx.post(server.url + "/v1/chat/completion", json={})
    error = response.json()["error"]
    assert response.status_code == 404 and error["code"] == "unknown_endpoint"
    for endpoint in ("POST /v1/chat/completions", "POST /v1/responses", "POST /tokenize", "GET /v1/models"):
        assert endpoint in error["message"]
