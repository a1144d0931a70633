"""Streaming on top of the engine: submit a request, iterate its deltas, abort it.

One background thread owns the engine and steps it while there is work; asyncio callers talk to it
through a command queue (add, abort) and receive their deltas on per-request asyncio queues. This is
the interface the server and the interactive CLI sit on; ``LLM.generate``/``LLM.chat`` drive the
same engine synchronously instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from qwen3.chat import Delta, StreamingOutputParser
from qwen3.engine.llm_engine import StepOutput
from qwen3.llm import LLM, ChatRequest
from qwen3.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class StreamDelta:
    """What one engine step added to a request, text split into reasoning/content/tool-call deltas."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    reasoning: str = ""
    content: str = ""
    tool_calls: list[Delta] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    usage: dict[str, int] | None = None  # set on the last delta


class AsyncLLM:
    """Thread-backed streaming front of an :class:`LLM` (one engine, many concurrent requests)."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.engine = llm.engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._pending_adds = 0  # add commands sent but not yet taken by the engine thread
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="qwen3-engine", daemon=True)
        self._thread.start()

    # --- the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            with self.llm.lock:
                self._drain_commands()
                busy = self.engine.has_unfinished()
            if not busy:
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            try:
                with self.llm.lock:
                    outputs = self.engine.step()
            except Exception as exc:  # a bug must not hang every client: fail their streams
                logger.exception("engine step failed")
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._deliver(request_id, exc)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _drain_commands(self) -> None:
        while True:
            try:
                command, args = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                request_id = args[0]
                with self._count_lock:
                    self._pending_adds -= 1
                try:
                    self.engine.add_request(*args)
                except Exception as exc:
                    self._deliver(request_id, exc)
            elif command == "abort":
                self.engine.abort(args[0])

    def _deliver(self, request_id: str, item: StepOutput | Exception) -> None:
        sink = self._sinks.get(request_id)
        if sink is not None:
            loop, q = sink
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _send(self, command: str, *args: Any) -> None:
        if command == "add":
            with self._count_lock:
                self._pending_adds += 1
        self._commands.put((command, args))
        self._wake.set()

    # --- the public interface ---------------------------------------------------------------------

    async def stream(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        thinking_budget: int | None = None,
        reasoning_started: bool = False,
        parse: bool = False,
        answer_prefix_ids: list[int] | None = None,
        parse_prefix: str = "",
    ) -> AsyncIterator[StreamDelta]:
        """Yield the request's deltas as they are decoded. Leaving the loop early aborts the request.

        ``parse`` splits text into reasoning, content and tool-call deltas (chat requests), reading
        ``parse_prefix`` (answer text the prompt already holds) first. ``answer_prefix_ids`` go to the
        engine (inserted after ``</think>``). Invalid requests raise :class:`qwen3.engine.RequestError`
        from the first iteration.
        """
        request_id = request_id or uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self._sinks[request_id] = (asyncio.get_running_loop(), q)
        parser = StreamingOutputParser(reasoning_started) if parse else None
        pending = parser.feed(parse_prefix) if parser is not None and parse_prefix else []
        output_ids: list[int] = []
        finished = False
        self._send(
            "add", request_id, list(prompt_token_ids), params, thinking_budget, reasoning_started,
            list(answer_prefix_ids or []),
        )  # fmt: skip
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                output_ids += item.new_token_ids
                delta = StreamDelta(
                    request_id, item.new_token_ids, item.new_text, finished, item.finish_reason,
                    logprobs=item.new_logprobs,
                )  # fmt: skip
                if parser is not None:
                    pieces = pending + parser.feed(item.new_text) + (parser.finish() if finished else [])
                    pending = []
                    delta.reasoning = "".join(p.text for p in pieces if p.kind == "reasoning")
                    delta.content = "".join(p.text for p in pieces if p.kind == "content")
                    delta.tool_calls = [p for p in pieces if p.kind == "tool_call"]
                if finished:
                    delta.usage = self.llm.usage(prompt_token_ids, output_ids, reasoning_started)
                yield delta
        finally:
            self._sinks.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    def stream_chat(
        self, request: ChatRequest, request_id: str | None = None, parse: bool = True
    ) -> AsyncIterator[StreamDelta]:
        """:meth:`stream` for a prepared chat request (see :meth:`qwen3.LLM.prepare_chat`)."""
        return self.stream(
            request.prompt_token_ids,
            request.params,
            request_id,
            request.thinking_budget,
            request.reasoning_started,
            parse,
            request.answer_prefix_ids,
            request.parse_prefix,
        )

    def stream_chat_sync(self, request: ChatRequest) -> Iterator[StreamDelta]:
        """Blocking iteration over :meth:`stream` for code without an event loop (the CLI)."""
        loop = asyncio.new_event_loop()
        agen = self.stream_chat(request)
        try:
            while True:
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    # --- load, for admission control and metrics (approximate: read without the engine lock) -------

    def num_running(self) -> int:
        """Sequences in the running batch."""
        return len(self.engine.scheduler.running)

    def num_waiting(self) -> int:
        """Sequences submitted but not running: queued, preempted, or not yet taken by the engine thread."""
        return max(0, self._pending_adds + len(self.engine.requests) - self.num_running())

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight are aborted and their streams raise."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        with self.llm.lock:
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
        for request_id in list(self._sinks):
            with contextlib.suppress(RuntimeError):  # that stream's event loop is already closed
                self._deliver(request_id, RuntimeError("the engine was shut down"))
