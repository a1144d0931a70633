"""What both completion endpoints share: server state, admission, running ``n`` streams, SSE, logprobs.

A request with ``n`` choices becomes ``n`` engine sequences (seeds ``seed``, ``seed + 1``, ... as in
``LLM.generate``) whose streams are merged as they arrive. Admission is counted in sequences: at most
``max_num_seqs`` run and ``max_queue`` more may wait; beyond that a request gets 503 at once rather than a
place in an unbounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import Scope

from qwen3.async_llm import AsyncLLM, StreamDelta
from qwen3.device import release_memory
from qwen3.engine.llm_engine import RequestError
from qwen3.llm import LLM, ChatRequest
from qwen3.sampling import SamplingError, SamplingParams
from qwen3.server.errors import APIError
from qwen3.server.metrics import Metrics
from qwen3.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")
ADMITTED_KEY = "qwen3.admitted"  # scope key: sequences this HTTP exchange holds (released when it ends)
LARGE_REQUEST_BYTES = 256 * 2**10  # bodies from this size on: the worker trims the heap after preparing them


@dataclass
class ServerConfig:
    """How the HTTP front behaves; the engine's own limits live in :class:`qwen3.LLM`."""

    served_model_names: list[str]
    api_key: str | None = None
    max_queue: int = 256  # sequences that may wait beyond the running batch before 503
    chat_template: str | None = None  # replaces the checkpoint's template (e.g. a Thinking-2507 one)
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    max_request_bytes: int = 2 * 2**20  # request bodies beyond this get 413 (the template's output: 4x)
    template_timeout: float = 5.0  # seconds one chat template render may take
    plain_text_messages: bool = True  # control tokens only from the template, never from message text
    prepare_threads: int = 4  # worker threads that render and tokenize requests off the event loop
    web_ui: bool = True  # the chat page at / (--no-ui turns it off)
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])  # CORS; "*": any, no credentials

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        for name in ("max_queue", "shutdown_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("max_request_bytes", "template_timeout", "prepare_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")


@dataclass
class ServerState:
    llm: LLM
    config: ServerConfig
    metrics: Metrics
    front: AsyncLLM | None = None  # started by the app's lifespan
    admitted: int = 0  # sequences held by requests in flight
    created: int = field(default_factory=lambda: int(time.time()))
    workers: ThreadPoolExecutor | None = None  # started by the app's lifespan

    async def off_loop(self, work: Callable[..., T], *args: Any, large: bool = False) -> T:
        """Run blocking request work (render, tokenize, validate) on a worker thread, so the event loop
        keeps serving other streams and /health however large or slow one request is. After ``large``
        work the worker gives the memory it freed back to the OS."""
        if self.workers is None:
            raise APIError(503, "the server is not running", code="engine_unavailable")

        def run() -> T:
            try:
                return work(*args)
            finally:
                if large:
                    release_memory()

        return await asyncio.get_running_loop().run_in_executor(self.workers, run)

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    @property
    def capacity(self) -> int:
        return self.llm.engine.scheduler.max_num_seqs + self.config.max_queue

    def engine_front(self) -> AsyncLLM:
        if self.front is None or not self.front.is_alive():
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        return self.front

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.config.served_model_names:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {', '.join(self.config.served_model_names)}",
                param="model",
                code="model_not_found",
            )

    def admit(self, scope: Scope, sequences: int) -> None:
        """Hold ``sequences`` slots for this HTTP exchange, or refuse with 503 when the queue is full.

        The slots are given back by :class:`qwen3.server.app.RequestMiddleware` when the exchange ends
        however it ends (done, error, client gone), so nothing can leak them.
        """
        if sequences > self.capacity:
            raise APIError(
                400, f"n: {sequences} sequences exceed this server's capacity {self.capacity}", "n"
            )
        if self.admitted + sequences > self.capacity:
            raise APIError(
                503,
                f"the server is at capacity ({self.admitted} sequences running or queued, "
                f"max_queue {self.config.max_queue}); retry later",
                code="queue_full",
            )
        self.admitted += sequences
        scope[ADMITTED_KEY] = scope.get(ADMITTED_KEY, 0) + sequences

    def release(self, scope: Scope) -> None:
        self.admitted -= scope.pop(ADMITTED_KEY, 0)

    def sampling(
        self, defaults: SamplingParams, overrides: dict[str, Any], param_name: Callable[[str], str]
    ) -> SamplingParams:
        """``defaults`` with the client's fields on top; a bad value is a 400 naming the client's field."""
        try:
            return defaults.replace(**overrides)
        except SamplingError as exc:
            name = param_name(exc.field)
            raise APIError(400, f"{name}: {str(exc).partition(': ')[2]}", param=name) from None

    def check_prompt(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        param: str,
        param_name: Callable[[str], str] = str,
        chat: ChatRequest | None = None,
    ) -> None:
        """400 now for what the engine would refuse later (too long for the context, unknown ids, a
        ``max_tokens`` that cannot fit); ``param`` names the prompt, ``param_name`` maps other fields;
        ``chat``: the prepared chat request (its thinking controls add ids to the prompt)."""
        thinking = (chat.thinking_budget, chat.reasoning_started, chat.answer_prefix_ids) if chat else ()
        try:
            self.llm.engine.check_request(prompt_ids, params, *thinking)
        except RequestError as exc:
            name = param if exc.field == "prompt" else param_name(exc.field)
            raise APIError(400, f"{name}: {str(exc).partition(': ')[2]}", param=name) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index.

    Closing (or cancelling) the merged stream closes every source, which aborts their engine requests.
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, done))
        except Exception as exc:  # hand it to the consumer, which re-raises it
            await queue.put((index, exc))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (a non-streaming generation), cancelling it if the client hangs up first.

    Cancelling closes its engine streams, which aborts them and frees their KV blocks at once.
    """
    task = asyncio.ensure_future(work)

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(499, "the client closed the connection", code="client_closed")
    return task.result()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage_body(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return body


class Usage:
    """Token counts summed over a request's sequences (the prompt counted once per prompt)."""

    def __init__(self) -> None:
        self.prompt = self.completion = self.reasoning = 0

    def add(self, delta: StreamDelta, prompt_tokens: int = 0) -> None:
        if delta.usage is not None:
            self.completion += delta.usage["completion_tokens"]
            self.reasoning += delta.usage["reasoning_tokens"]
        self.prompt += prompt_tokens

    def body(self, reasoning: bool = True) -> dict[str, Any]:
        return usage_body(self.prompt, self.completion, self.reasoning if reasoning else None)


# --------------------------------------------------------------------------------------------- logprobs


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins back to bytes (GPT-2's table, which Qwen's vocabulary uses)."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in shown}  # printable bytes stand for themselves
    hidden = [b for b in range(256) if b not in shown]
    table.update({chr(256 + i): b for i, b in enumerate(hidden)})  # the rest, in order, from U+0100 on
    return table


class TokenText:
    """A token's bytes and text for logprobs (a token may hold part of a UTF-8 character)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tokenizer.id_to_token(token_id) or ""
            table = _byte_level_decoder()
            if all(c in table for c in piece) and token_id not in self.tokenizer.special_token_ids:
                raw = bytes(table[c] for c in piece)
            else:
                raw = piece.encode("utf-8")
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit


def chat_logprobs(token_ids: list[int], logprobs: list, text: TokenText) -> list[dict[str, Any]]:
    """OpenAI chat ``logprobs.content`` entries for sampled tokens (engine-inserted ones have none)."""
    entries = []
    for token_id, item in zip(token_ids, logprobs, strict=False):
        if item is None:
            continue
        chosen, top = item
        token, raw = text(token_id)
        alternatives = []
        for alt_id, alt_logprob in top:
            alt_token, alt_raw = text(alt_id)
            alternatives.append({"token": alt_token, "logprob": alt_logprob, "bytes": alt_raw})
        entries.append({"token": token, "logprob": chosen, "bytes": raw, "top_logprobs": alternatives})
    return entries


def completion_logprobs(token_ids: list[int], logprobs: list, text: TokenText, offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for these tokens, text offsets starting at ``offset``."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, item in zip(token_ids, logprobs, strict=False):
        token, _ = text(token_id)
        out["tokens"].append(token)
        out["token_logprobs"].append(None if item is None else item[0])
        out["top_logprobs"].append(None if item is None else {text(i)[0]: lp for i, lp in item[1]})
        out["text_offset"].append(offset)
        offset += len(token)
    return out
