"""``qwen3 serve`` against the official ``openai`` client: one live server on loopback for the module.

The model is the random tiny Qwen3 (real vocabulary, random weights), so what it says is noise. What is
checked is structure — reasoning and content in the right fields, tool calls, usage, errors, streaming
order — and that the server answers exactly what offline ``LLM.chat`` / ``LLM.generate`` answer for the
same prompt, sampling and seed. The server uses the official template with one change (thinking mode
opens ``<think>`` in the prompt, as Thinking-2507's template does), so a random model's output is
reasoning until the thinking budget closes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qwen3.chat import render
from qwen3.engine.llm_engine import STOP_THINKING_TEXT
from qwen3.llm import LLM
from qwen3.sampling import RECOMMENDED, SampleResult, SamplingParams
from qwen3.server import ServerConfig
from qwen3.structured import tool_call_grammar
from tests.live_server import free_port, live_server, wait_healthy

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "Hi"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
STOP_THINKING = "Considering the limited time by the user, I have to give the solution based on the thinking directly now."
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


def forced_think(template: str) -> str:
    """The official template, but thinking mode's generation prompt opens ``<think>`` itself."""
    tail = "{{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}"
    assert tail in template
    return template.replace(
        tail,
        "{{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- else %}\n        {{- '<think>\\n' }}\n    {%- endif %}",
    )


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), kv_cache_memory="16MiB", max_num_seqs=64, progress=False)
    config = ServerConfig(
        ["tiny", "tiny-alias"], api_key=API_KEY, chat_template=forced_think(llm.tokenizer.chat_template)
    )
    with live_server(llm, config) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def offline_chat(server, messages, params: SamplingParams, **kwargs):
    """What ``LLM.chat`` answers for the same conversation with the server's template."""
    return server.llm.chat(messages, params, chat_template=server.state.config.chat_template, **kwargs)


def metric_values(server) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client's own parser (which also proves the format is valid)."""
    text = httpx.get(server.url + "/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def aborted(server) -> float:
    return metric_values(server).get(("qwen3_request_finish_total", (("reason", "abort"),)), 0.0)


# --------------------------------------------------------------------------------------------- basics


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


# --------------------------------------------------------------------------------------------- thinking


def test_thinking_budget_is_honoured_and_fields_match_offline(server, client):
    budget = 6
    response = client.chat.completions.create(
        model="tiny",
        messages=HI,
        temperature=0,
        max_tokens=48,
        extra_body={"thinking_budget": budget, "ignore_eos": True},
    )
    message = response.choices[0].message
    offline = offline_chat(
        server, HI, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), thinking_budget=budget
    )
    assert message.reasoning_content == offline.reasoning and message.content == offline.content
    assert message.reasoning_content.endswith(STOP_THINKING)  # the budget closed the thinking...
    assert message.content  # ...and the model answered after it
    inserted = len(server.llm.engine.config.thinking.stop_thinking_ids)
    reasoning_tokens = response.usage.completion_tokens_details.reasoning_tokens
    assert budget < reasoning_tokens <= budget + inserted
    assert response.usage.completion_tokens == 48 and response.choices[0].finish_reason == "length"


def test_streaming_thinking_equals_non_streaming(server, client):
    kwargs = dict(
        model="tiny",
        messages=HI,
        temperature=0,
        max_tokens=40,
        extra_body={"thinking_budget": 4, "ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    kinds = []
    for chunk in chunks[1:]:
        for choice in chunk.choices:
            if getattr(choice.delta, "reasoning_content", None):
                kinds.append("reasoning")
            if choice.delta.content:
                kinds.append("content")
    assert kinds and kinds == sorted(kinds, key=lambda k: k != "reasoning")  # all reasoning, then all content
    assert kinds.count("reasoning") > 1 and kinds.count("content") > 1  # streamed, not sent at the end
    reasoning = "".join(
        getattr(c.delta, "reasoning_content", None) or "" for ch in chunks for c in ch.choices
    )
    content = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    assert reasoning == whole.choices[0].message.reasoning_content
    assert content == whole.choices[0].message.content
    finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_thinking_without_budget_is_all_reasoning(server, client):
    response = client.chat.completions.create(model="tiny", messages=HI, temperature=0, max_tokens=12)
    message = response.choices[0].message
    offline = offline_chat(server, HI, SamplingParams(temperature=0, max_tokens=12))
    assert message.reasoning_content == offline.reasoning and message.reasoning_content
    assert message.content == ""
    assert response.usage.completion_tokens_details.reasoning_tokens == response.usage.completion_tokens == 12


def test_non_thinking_mode_by_template_kwargs_or_budget_zero(server, client):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    offline = offline_chat(server, HI, params, enable_thinking=False)
    by_kwargs = client.chat.completions.create(
        model="tiny", messages=HI, temperature=0, max_tokens=10, extra_body={**NO_THINK, "ignore_eos": True}
    )
    by_budget = client.chat.completions.create(
        model="tiny",
        messages=HI,
        temperature=0,
        max_tokens=10,
        extra_body={"thinking_budget": 0, "ignore_eos": True},
    )
    for response in (by_kwargs, by_budget):
        message = response.choices[0].message
        assert message.reasoning_content is None and message.content == offline.content and message.content
        assert response.usage.completion_tokens_details.reasoning_tokens == 0


def test_no_think_soft_switch_reaches_the_model_and_picks_non_thinking_sampling(server, client):
    messages = [{"role": "user", "content": "Tell me a joke /no_think"}]
    response = client.chat.completions.create(model="tiny", messages=messages, seed=7, max_tokens=12)
    expected = server.llm.recommended_sampling(messages)
    assert (expected.temperature, expected.top_p) == (
        RECOMMENDED[False]["temperature"],
        RECOMMENDED[False]["top_p"],
    )
    offline = offline_chat(server, messages, expected.replace(seed=7, max_tokens=12))
    message = response.choices[0].message
    assert (message.reasoning_content, message.content) == (offline.reasoning, offline.content)
    prompt = render(messages, template=server.state.config.chat_template)
    assert "Tell me a joke /no_think<|im_end|>" in prompt  # the flag goes to the model verbatim
    assert response.usage.prompt_tokens == len(server.llm.tokenizer.encode(prompt))


# --------------------------------------------------------------------------------------------- sampling


def test_n_choices_are_seeded_like_offline(server, client):
    response = client.chat.completions.create(
        model="tiny", messages=HI, n=3, seed=11, temperature=1.0, top_p=1.0, max_tokens=8,
        extra_body={**NO_THINK, "top_k": 0, "ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in response.choices] == [0, 1, 2]
    for i, choice in enumerate(response.choices):
        params = SamplingParams(
            temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=11 + i, max_tokens=8, ignore_eos=True
        )
        assert choice.message.content == offline_chat(server, HI, params, enable_thinking=False).content
    assert len({c.message.content for c in response.choices}) > 1
    assert response.usage.completion_tokens == 24


def test_chat_logprobs(server, client):
    response = client.chat.completions.create(
        model="tiny", messages=HI, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3,
        extra_body={**NO_THINK, "ignore_eos": True},
    )  # fmt: skip
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == 6
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy took the best
        assert entry.logprob <= 0
    assert bytes(b for entry in entries for b in entry.bytes).decode("utf-8") == choice.message.content


def test_completions_text_and_token_prompts_match_offline(server, client):
    prompts = ["Hello", "The sky is"]
    extra = {"top_k": 0, "ignore_eos": True}
    response = client.completions.create(
        model="tiny-alias",
        prompt=prompts,
        n=2,
        seed=3,
        temperature=0.9,
        top_p=1.0,
        max_tokens=8,
        extra_body=extra,
    )
    params = server.llm.default_sampling_params(
        temperature=0.9, top_p=1.0, top_k=0, seed=3, n=2, max_tokens=8, ignore_eos=True
    )
    offline = server.llm.generate(prompts, params)
    assert [c.text for c in response.choices] == [o.text for out in offline for o in out.outputs]
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 32
    ids = server.llm.tokenizer.encode("The sky is")
    by_ids = client.completions.create(
        model="tiny", prompt=ids, seed=3, temperature=0.9, top_p=1.0, max_tokens=8, extra_body=extra
    )
    assert by_ids.choices[0].text == offline[1].outputs[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_streaming_completion_equals_non_streaming(server, client):
    kwargs = dict(
        model="tiny", prompt="Once upon a time", temperature=0, max_tokens=10, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.text for ch in chunks for c in ch.choices) == whole.choices[0].text
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["length"]
    assert (
        chunks[-1].usage.completion_tokens == 10
        and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    )


# --------------------------------------------------------------------------------------------- tools


def test_tool_choice_required_and_named_force_the_call(server, client):
    """A forced tool call is the offline chat with the tool-call grammar; the call is written in Qwen3's
    format from its first token (random weights, so the arguments are whatever the grammar let through)."""

    def same(message, offline) -> None:
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        assert calls == [(c.name, c.arguments) for c in offline.tool_calls]
        assert (message.content or "") == offline.content
        assert (message.reasoning_content, offline.text.split("</think>")[-1].lstrip()[:40]) == (
            offline.reasoning,
            '<tool_call>\n{"name": "calculator", "argu',
        )

    question = [{"role": "user", "content": "What is 347 * 589?"}]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    required = client.chat.completions.create(
        model="tiny", messages=question, tools=[CALCULATOR], tool_choice="required", temperature=0, max_tokens=40,
        extra_body={**NO_THINK, "ignore_eos": True},
    )  # fmt: skip
    grammar = tool_call_grammar([CALCULATOR], "required")
    offline = offline_chat(
        server,
        question,
        params.replace(structured_outputs=grammar),
        tools=[CALCULATOR],
        enable_thinking=False,
    )
    same(required.choices[0].message, offline)

    named = {"type": "function", "function": {"name": "calculator"}}
    thinking = client.chat.completions.create(
        model="tiny", messages=question, tools=[CALCULATOR], tool_choice=named, temperature=0, max_tokens=60,
        extra_body={"thinking_budget": 5, "ignore_eos": True},
    )  # fmt: skip
    offline = offline_chat(
        server,
        question,
        params.replace(max_tokens=60, structured_outputs=grammar),
        tools=[CALCULATOR],
        thinking_budget=5,
    )
    same(thinking.choices[0].message, offline)
    assert offline.reasoning.endswith(STOP_THINKING)  # it thought first, then had to call the tool


def test_tool_choice_none_renders_no_tools(server, client):
    common = dict(model="tiny", messages=HI, max_tokens=1)
    plain = client.chat.completions.create(**common)
    none = client.chat.completions.create(tools=[CALCULATOR], tool_choice="none", **common)
    auto = client.chat.completions.create(tools=[CALCULATOR], **common)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens


class ScriptedSampler:
    """Stands in for the sampler so the random model 'writes' a calculator call, then an answer."""

    def __init__(self, llm: LLM) -> None:
        self.engine = llm.engine
        encode = llm.tokenizer.encode
        end = llm.tokenizer.token_to_id("<|im_end|>")
        call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "347 * 589"}}\n</tool_call>'
        self.call = encode(call) + [end]
        self.answer = encode("347 * 589 = 204383") + [end]
        self.tool_response = llm.tokenizer.token_to_id("<tool_response>")

    def __call__(self, logits, batch) -> SampleResult:
        tokens = []
        for request_id in batch.request_ids:
            seq = self.engine.requests[request_id]
            script = self.answer if self.tool_response in seq.prompt_token_ids else self.call
            tokens.append(script[min(seq.num_output_tokens, len(script) - 1)])
        return SampleResult(tokens, [None] * len(tokens))


def test_tool_call_round_trip_with_scripted_sampling(server, client, monkeypatch):
    monkeypatch.setattr(server.llm.engine, "sampler", ScriptedSampler(server.llm))
    messages = [{"role": "user", "content": "What is 347 * 589?"}]
    common = dict(model="tiny", tools=[CALCULATOR], max_tokens=64, extra_body=NO_THINK)
    first = client.chat.completions.create(messages=messages, **common)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "347 * 589"}

    chunks = list(client.chat.completions.create(messages=messages, stream=True, **common))
    deltas = [c.delta.tool_calls for ch in chunks for c in ch.choices if c.delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].index == 0 and deltas[0][0].id.startswith("call_")
    assert deltas[0][0].function.name == "calculator"
    assert json.loads(deltas[0][0].function.arguments) == {"expression": "347 * 589"}
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["tool_calls"]

    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "204383"},
    ]
    final = client.chat.completions.create(messages=messages, **common)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == "347 * 589 = 204383"
    prompt = render(
        messages, tools=[CALCULATOR], enable_thinking=False, template=server.state.config.chat_template
    )
    assert "<tool_response>\n204383\n</tool_response>" in prompt and '"arguments": {"expression"' in prompt
    assert final.usage.prompt_tokens == len(server.llm.tokenizer.encode(prompt))


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0].type"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 600}, "max_tokens"),  # prompt + max_tokens can never fit the 512-token context
        ({"max_completion_tokens": 600}, "max_completion_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"thinking_budget": -1}, "thinking_budget"),
        ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "has\ncontrol"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [CALCULATOR], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hello " * 5000}]}, "messages"),  # longer than max_model_len
    ],
)  # fmt: skip
def test_bad_chat_requests_are_400_naming_the_field(client, fields, param):
    fields = dict(fields)
    messages = fields.pop("messages", HI)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=messages, extra_body=fields)
    error = info.value
    assert error.status_code == 400 and error.param == param and error.type == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in error.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"prompt": "hi " * 5000}, "prompt"), ({"prompt": [[1, 10**7]]}, "prompt"), ({"echo": True}, "echo")],
)
def test_bad_completion_requests_are_400(client, fields, param):
    fields = dict(fields)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=fields.pop("prompt", "x"), extra_body=fields)
    assert info.value.param == param


def test_invalid_json_unknown_model_and_api_key(server, client):
    response = httpx.post(server.base_url + "/chat/completions", content=b'{"messages": [', headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json" and set(response.json()["error"]) == {
        "message", "type", "param", "code"
    }  # fmt: skip
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert info.value.param == "model" and info.value.code == "model_not_found"
    intruder = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with intruder, pytest.raises(openai.AuthenticationError) as info:
        intruder.chat.completions.create(model="tiny", messages=HI)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert httpx.post(server.base_url + "/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key


# --------------------------------------------------------------------------------------------- lifecycle


def test_streaming_client_disconnect_aborts_and_frees_blocks(server):
    before = aborted(server)
    body = {"model": "tiny", "messages": HI, "stream": True, "max_tokens": 480, "ignore_eos": True}
    url = server.base_url + "/chat/completions"
    with httpx.Client(timeout=30) as http, http.stream("POST", url, json=body, headers=AUTH) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(12), strict=False) if line.startswith("data:")]
        assert len(received) >= 3
        assert server.llm.engine.blocks.num_used > 0  # it is generating, holding blocks
    assert server.wait_idle(timeout=5) < 3  # the engine let go of it at once
    assert aborted(server) == before + 1


def test_non_streaming_client_disconnect_aborts_too(server):
    before = aborted(server)
    body = {"model": "tiny", "messages": HI, "max_tokens": 480, "ignore_eos": True}
    with httpx.Client(timeout=httpx.Timeout(30, read=0.5)) as http, pytest.raises(httpx.ReadTimeout):
        http.post(server.base_url + "/chat/completions", json=body, headers=AUTH)
    assert server.wait_idle(timeout=5) < 3
    assert aborted(server) == before + 1


def test_64_concurrent_seeded_streams_match_solo_runs(server):
    def request(i: int) -> dict:
        return dict(
            model="tiny", messages=[{"role": "user", "content": f"Request {i}: tell me a story"}], stream=True,
            temperature=0.8, top_p=1.0, seed=i, max_tokens=6, extra_body={**NO_THINK, "top_k": 0, "ignore_eos": True},
        )  # fmt: skip

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        text, finish = [], None
        async for chunk in await client.chat.completions.create(**request(i)):
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return "".join(text), finish

    def solo(client: openai.OpenAI, i: int) -> tuple[str, str | None]:
        text, finish = [], None
        for chunk in client.chat.completions.create(**request(i)):
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return "".join(text), finish

    async def run(indices: list[int]) -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120
        ) as c:
            return list(await asyncio.gather(*(one(c, i) for i in indices)))

    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, server.state.front.num_running())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        together = asyncio.run(run(list(range(64))))
    finally:
        stop.set()
        watcher.join()
    assert peak >= 16  # they really ran side by side
    with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60) as client:
        alone = [solo(client, i) for i in range(64)]
    assert together == alone
    assert all(finish == "length" and text for text, finish in together)
    assert len({text for text, _ in together}) == 64
    server.wait_idle(timeout=5)
    values = metric_values(server)
    assert values[("qwen3_num_requests_running", ())] == 0 and values[("qwen3_kv_cache_blocks_used", ())] == 0


def test_metrics_exposition(server, client):
    long_prompt = [
        {"role": "user", "content": "A long shared instruction that fills a few cache blocks. " * 4}
    ]
    for _ in range(2):  # the second request finds the first one's prompt blocks in the prefix cache
        client.chat.completions.create(model="tiny", messages=long_prompt, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HI, top_p=2.0)
    values = metric_values(server)
    engine = server.llm.engine
    assert values[("qwen3_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] >= 2
    assert values[("qwen3_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "400")))] >= 1
    assert values[("qwen3_kv_cache_blocks_total", ())] == engine.blocks.num_blocks
    assert values[("qwen3_kv_cache_blocks_used", ())] == 0
    assert values[("qwen3_num_requests_waiting", ())] == 0
    assert (
        values[("qwen3_prefix_cache_hit_rate", ())] == pytest.approx(engine.blocks.hit_rate)
        and engine.blocks.hit_rate > 0
    )
    assert values[("qwen3_time_to_first_token_seconds_count", ())] >= 2
    assert values[("qwen3_time_per_output_token_seconds_count", ())] >= 2
    assert (
        values[("qwen3_prompt_tokens_total", ())] > 0 and values[("qwen3_generation_tokens_total", ())] >= 4
    )


# --------------------------------------------------------------------------------------------- the command


def test_serve_command_queue_limit_and_graceful_sigterm(tiny_checkpoint):
    """``qwen3 serve`` as users run it: --max-num-seqs 1 --max-queue 1 admits one running and one waiting
    request and refuses a third with 503; on SIGTERM it stops accepting, lets both finish, and exits 0."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "qwen3.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
        "--max-num-seqs", "1", "--max-queue", "1", "--api-key", API_KEY, "--served-model-name", "tiny",
        "--max-model-len", "512", "--kv-cache-memory", "16MiB",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, 60)

        def body(max_tokens: int, stream: bool = True) -> dict:
            return {
                "model": "tiny",
                "messages": HI,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": stream,
            }

        http = httpx.Client(base_url=url + "/v1", headers=AUTH, timeout=60)
        first = http.stream("POST", "/chat/completions", json={**body(200), "ignore_eos": True})
        second = http.stream("POST", "/chat/completions", json={**body(8), "ignore_eos": True})
        with http, first as running, second as waiting:
            running_lines = running.iter_lines()
            assert next(line for line in running_lines if '"content":"' in line and '"role"' not in line)
            waiting_lines = waiting.iter_lines()
            assert '"role":"assistant"' in next(waiting_lines)  # admitted; queued behind the first
            refused = http.post("/chat/completions", json=body(4, stream=False))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
            gauges = httpx.get(url + "/metrics").text
            assert "qwen3_num_requests_waiting 1.0" in gauges and "qwen3_num_requests_running 1.0" in gauges
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while True:  # new connections are refused at once...
                try:
                    httpx.get(url + "/health", timeout=1)
                except httpx.ConnectError:
                    break
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.05)
            for lines in (running_lines, waiting_lines):  # ...while the admitted requests run to the end
                rest = list(lines)
                assert "data: [DONE]" in rest and any('"finish_reason":"length"' in line for line in rest)
        assert process.wait(timeout=30) == 0
        output = process.stdout.read()
        assert "shut down on SIGTERM" in output and "stopping the engine" in output
        assert f"chat page: open {url}/ in a browser" in output
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_budget_zero_on_a_template_that_always_thinks(tiny_checkpoint, spec_dir):
    """A server whose template opens <think> itself (Thinking-2507): budget 0 and enable_thinking false
    still close the reasoning at once, streamed or not, exactly as offline."""
    template = (spec_dir / "templates" / "qwen3_thinking_2507_chat_template.jinja").read_text()
    llm = LLM(str(tiny_checkpoint), kv_cache_memory="8MiB", progress=False)
    stop_reasoning = STOP_THINKING_TEXT.split("</think>")[0].strip("\n")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    offline = llm.chat(HI, params, thinking_budget=0, chat_template=template)
    assert offline.reasoning == stop_reasoning
    config = ServerConfig(["tiny"], chat_template=template)
    with (
        live_server(llm, config) as live,
        openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0) as client,
    ):
        for extra in ({"thinking_budget": 0}, {"chat_template_kwargs": {"enable_thinking": False}}):
            common = dict(model="tiny", messages=HI, temperature=0, max_tokens=40,
                          extra_body={**extra, "ignore_eos": True})  # fmt: skip
            message = client.chat.completions.create(**common).choices[0].message
            assert (message.reasoning_content, message.content) == (offline.reasoning, offline.content)
            chunks = list(client.chat.completions.create(stream=True, **common))
            deltas = [c.delta for ch in chunks for c in ch.choices]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            assert reasoning == stop_reasoning
            assert "".join(d.content or "" for d in deltas) == offline.content


def test_health_says_when_the_engine_thread_died(tiny_checkpoint, monkeypatch):
    llm = LLM(str(tiny_checkpoint), kv_cache_memory="8MiB", progress=False)

    def broken_step():
        raise SystemError("the engine is broken")

    with live_server(llm, ServerConfig(["tiny"])) as live:
        assert httpx.get(live.url + "/health").status_code == 200
        monkeypatch.setattr(llm.engine, "step", broken_step)
        body = {"model": "tiny", "messages": HI, "max_tokens": 5, "stream": True}
        with httpx.stream("POST", live.base_url + "/chat/completions", json=body, timeout=30) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]" and "the engine stopped" in lines[-2]
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "engine stopped"
        refused = httpx.post(live.base_url + "/chat/completions", json={**body, "stream": False}, timeout=30)
        assert refused.status_code == 503
