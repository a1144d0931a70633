"""``qwen3 serve`` against hostile and careless clients: no request can hurt another or the server.

One live server on the shipped default model (fast, trained, needs nothing from ../shared) with small
limits. Each finding of the hardening issue is a test here: bad values are 400s naming the field (never
500s), bodies are bounded (413), blocking work runs off the event loop, template renders are bounded,
streams end properly on SIGTERM, and good streams running beside all of it answer exactly as alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from qwen3.llm import LLM
from qwen3.server import ServerConfig
from tests.live_server import free_port, live_server, wait_healthy

API_KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "What is 2 + 3?"}]
MAX_BODY = 4 * 2**20


@pytest.fixture(scope="module")
def server():
    llm = LLM(None, max_model_len=256, max_num_seqs=16, kv_cache_memory="64MiB", progress=False)
    config = ServerConfig(["tiny"], api_key=API_KEY, max_queue=48, max_request_bytes=MAX_BODY)
    with live_server(llm, config) as live:
        yield live


def post(server, path: str, body: Any, **kwargs) -> httpx.Response:
    content = json.dumps(body) if isinstance(body, dict) else body
    headers = {**AUTH, "Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=120, **kwargs)


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": HI, "max_tokens": 8, **fields}


# Requests a client may send (or a hostile one would) that must be refused with 400 naming the field.
BAD_CHAT = [
    (chat(max_tokens=True), "max_tokens"),
    (chat(max_tokens="5"), "max_tokens"),
    (chat(temperature=-1), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(presence_penalty=3), "presence_penalty"),
    (chat(seed=2**64), "seed"),
    (chat(n=0), "n"),
    (chat(n=1000), "n"),
    (chat(stop=["x"] * 10_000), "stop"),
    (chat(stop=["x" * 10_000]), "stop"),
    (chat(stop_token_ids=[10**12]), "stop_token_ids"),
    (chat(logprobs=True, top_logprobs=99), "top_logprobs"),
    (chat(chat_template_kwargs={"self": 1}), "chat_template_kwargs.self"),
    (chat(chat_template_kwargs={"range": 1}), "chat_template_kwargs.range"),
    (chat(chat_template_kwargs={"raise_exception": 1}), "chat_template_kwargs.raise_exception"),
    (chat(chat_template_kwargs={"messages": []}), "chat_template_kwargs.messages"),
    (chat(chat_template_kwargs={"_private": 1}), "chat_template_kwargs._private"),
    (chat(chat_template_kwargs={"not a name": 1}), "chat_template_kwargs.not a name"),
    (chat(messages=[{"role": "user", "content": "hi " * 1000}]), "messages"),  # longer than the context
    (chat(max_tokens=10_000), "max_tokens"),
]
RAW_BAD = [  # bodies JSON libraries would not even produce: invalid JSON (400), or the field named
    '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
    '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
    '"function": {"name": "f", "description": "\\udfff"}}]}',
    '{"model": "tiny", "messages": ' + "[" * 1000 + "]" * 1000 + "}",
    '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "[]",
]
RAW_PARAMS = [None, None, None, "temperature", None]
BAD_COMPLETION = [
    ({"model": "tiny", "prompt": [True, False]}, "prompt[0]"),
    ({"model": "tiny", "prompt": [[1, 2], [10**9]]}, "prompt[1]"),
    ({"model": "tiny", "prompt": "x", "seed": -(2**63) - 1}, "seed"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_bad_chat_fields_are_400_naming_the_field(server, body, param):
    response = post(server, "/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("raw", "param"), list(zip(RAW_BAD, RAW_PARAMS, strict=True)), ids=range(len(RAW_BAD))
)
def test_malformed_bodies_are_400(server, raw, param):
    response = post(server, "/chat/completions", raw)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param, response.text
    assert param is not None or error["code"] == "invalid_json"


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETION, ids=[p for _, p in BAD_COMPLETION])
def test_bad_completion_fields_are_400(server, body, param):
    response = post(server, "/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_penalties_huge_top_k_and_top_seeds_work(server):
    """Values a client may legally send, which used to fail the step for everyone."""
    for fields in (
        {"presence_penalty": 1.5},
        {"frequency_penalty": 1.0, "repetition_penalty": 1.3},
        {"top_k": 2**63},
        {"seed": 2**64 - 1, "n": 3, "temperature": 1.0},
        {"stop": ["y" * 512] * 64},  # the limits themselves are fine
        # names of prepare_chat's own parameters: template variables now, colliding with nothing
        {"chat_template_kwargs": {"sampling": 1, "thinking_budget": 2, "tools_extra": "x"}},
    ):
        response = post(server, "/chat/completions", chat(**fields))
        assert response.status_code == 200, (fields, response.text)
        assert all(c["finish_reason"] in ("stop", "length") for c in response.json()["choices"])


def test_body_size_is_bounded(server):
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * MAX_BODY}]))
    response = post(server, "/chat/completions", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 2**16):
            yield big[start : start + 2**16].encode()

    response = post(server, "/chat/completions", chunked())
    assert response.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200


def test_tokenization_runs_off_the_event_loop(server):
    """A message near the body limit takes seconds to tokenize; /health and other streams do not wait."""
    big = chat(messages=[{"role": "user", "content": "hello world " * (MAX_BODY // 12 - 100)}])
    result: dict = {}

    def send() -> None:
        start = time.perf_counter()
        result["response"] = post(server, "/chat/completions", big)
        result["seconds"] = time.perf_counter() - start

    rss_before = _rss()
    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.2)
    latencies = []
    while sender.is_alive():
        start = time.perf_counter()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.05)
    sender.join()
    assert result["response"].status_code == 400  # far longer than the context, found after tokenizing
    assert _rss() - rss_before < 200 * 2**20  # the worker gave the tokenizer's memory back
    assert len(latencies) >= 3 and max(latencies) < max(0.5, result["seconds"] / 3), (
        latencies,
        result["seconds"],
    )


def test_bearer_scheme_is_case_insensitive_and_503_says_when_to_retry(server):
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = httpx.get(server.base_url + "/models", headers={"Authorization": f"{scheme} {API_KEY}"})
        assert response.status_code == 200, scheme
    for header in ("Bearer wrong", "Basic " + API_KEY, API_KEY, "Bearer"):
        assert httpx.get(server.base_url + "/models", headers={"Authorization": header}).status_code == 401
    state = server.state
    admitted = state.admitted
    state.admitted = state.capacity  # as if the queue were full
    try:
        response = post(server, "/chat/completions", chat())
    finally:
        state.admitted = admitted
    assert response.status_code == 503 and response.headers["retry-after"] == "1"


def test_openapi_documents_request_bodies_and_errors(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    for path, model in (
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
    ):
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert {"400", "401", "404", "413", "503"} <= set(operation["responses"])
        error = operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert error.endswith("/ErrorResponse")
    fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "tools", "chat_template_kwargs", "thinking_budget", "max_tokens"} <= set(fields)


def test_bad_requests_beside_good_streams_change_nothing(server):
    """Hostile requests fired next to seeded streams: every good stream says exactly what it says alone."""

    def good(i: int) -> dict:
        return chat(
            messages=[{"role": "user", "content": f"What is {i} + {i + 1}?"}], max_tokens=24, seed=i,
            temperature=0.8, stream=True, ignore_eos=True,
        )  # fmt: skip

    hostile = [body for body, _ in BAD_CHAT] + [
        chat(presence_penalty=1.5, max_tokens=24),
        chat(top_k=2**63, max_tokens=24),
        chat(seed=2**64 - 1, n=3, max_tokens=24),
        chat(stop=["z" * 512] * 64, max_tokens=24),
    ]

    async def text_of(client: httpx.AsyncClient, body: dict) -> str:
        parts = []
        async with client.stream("POST", "/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        parts.append(
                            choice["delta"].get("content") or choice["delta"].get("reasoning_content") or ""
                        )
        return "".join(parts)

    async def status_of(client: httpx.AsyncClient, body: dict | str) -> int:
        content = body if isinstance(body, str) else json.dumps(body)
        response = await client.post("/chat/completions", content=content)
        return response.status_code

    async def run(with_hostile: bool) -> tuple[list[str], list[int]]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=120) as client:
            goods = [text_of(client, good(i)) for i in range(8)]
            bads = [status_of(client, b) for b in (hostile + RAW_BAD if with_hostile else [])]
            results = await asyncio.gather(*goods, *bads)
        return list(results[:8]), list(results[8:])

    alone, _ = asyncio.run(run(False))
    together, statuses = asyncio.run(run(True))
    assert together == alone and all(alone)
    assert all(status < 500 for status in statuses), statuses
    assert statuses.count(200) == 4  # the legal ones among the hostile
    server.wait_idle(timeout=10)


def test_schemathesis_finds_no_server_error(server):
    """The published schema, fuzzed (bounded example count): no generated request gets a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures, calls = [], 0
    for result in schema.get_all_operations():

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(result.ok().as_strategy())
        def check(case) -> None:
            nonlocal calls
            calls += 1
            response = case.call(base_url=server.url, headers=AUTH, timeout=60)
            if response.status_code >= 500:
                failures.append(
                    (case.method, case.path, case.body, response.status_code, response.text[:200])
                )

        check()
    assert calls >= 60 and not failures, failures[:3]
    server.wait_idle(timeout=10)


# ------------------------------------------------------------------------------------------- templates

NESTED_LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


def test_a_runaway_template_fails_its_request_only():
    llm = LLM(None, max_model_len=256, kv_cache_memory="16MiB", progress=False)
    config = ServerConfig(["tiny"], chat_template=NESTED_LOOPS, template_timeout=0.5)
    with live_server(llm, config) as live:
        start = time.perf_counter()
        response = httpx.post(live.base_url + "/chat/completions", json=chat(), timeout=30)
        assert time.perf_counter() - start < 5
        assert response.status_code == 400 and response.json()["error"]["code"] == "template_limit"
        assert "ran longer than 0.5 s" in response.json()["error"]["message"]
        completion = httpx.post(
            live.base_url + "/completions", json={"prompt": "1 + 1 =", "max_tokens": 4}, timeout=30
        )
        assert completion.status_code == 200  # the server serves on


# ------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_ends_unfinished_streams_with_a_final_chunk(tiny_checkpoint, tmp_path):
    """Streams still running at --shutdown-timeout get finish_reason "abort" and [DONE], not a cut body;
    a non-streaming request gets its JSON; the process exits 0."""
    folder = tmp_path / "long"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "max_position_embeddings": 16384})
    )  # long streams
    port = free_port()
    command = [
        sys.executable, "-m", "qwen3.cli", "serve", "--model", str(folder), "--port", str(port),
        "--max-model-len", "16384", "--kv-cache-memory", "64MiB", "--shutdown-timeout", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    long = {"messages": HI, "max_tokens": 16000, "temperature": 0, "ignore_eos": True}
    try:
        wait_healthy(process, url, 60)
        result: dict = {}

        def non_streaming() -> None:
            result["response"] = httpx.post(url + "/v1/chat/completions", json=long, timeout=60)

        waiter = threading.Thread(target=non_streaming)
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", url + "/v1/chat/completions", json={**long, "stream": True}) as stream,
        ):
            lines = stream.iter_lines()
            assert '"role":"assistant"' in next(lines)
            waiter.start()
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            rest = list(lines)  # raises if the body is cut
        waiter.join()
        events = [line for line in rest if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "abort"
        response = result["response"]
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "abort"
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
