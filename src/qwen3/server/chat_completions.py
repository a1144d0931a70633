"""``POST /v1/chat/completions``: an OpenAI chat request in; reasoning, content and tool calls out.

The request is rendered by :meth:`qwen3.LLM.prepare_chat` — the same path as offline ``LLM.chat``, so a
greedy or seeded request answers exactly as it would offline. Thinking is controlled the way vLLM and
SGLang accept it (``chat_template_kwargs.enable_thinking``) plus a ``thinking_budget`` field (0 means
non-thinking); sampling fields the client leaves out take Qwen3's recommended values for the mode.

``reasoning_effort`` maps onto those controls (``protocol.EFFORT_BUDGETS``: "none"/"minimal" are
non-thinking, "low"/"medium" a budget); Qwen3's own controls win when both are given.

``tool_choice``: ``auto`` renders the tools and lets the model decide; ``none`` renders no tools;
``required`` holds the answer to one or more calls in Qwen3's ``<tool_call>`` format, a named function to
calls of that function, their arguments valid against its ``parameters``; with ``auto`` and a tool marked
``strict``, a call the model starts is completed validly. ``response_format`` and vLLM's
``structured_outputs`` (and ``guided_*``) hold the answer to a schema, regex, choice or grammar. All of it
is a grammar (:mod:`qwen3.structured`) that applies after the reasoning: the model thinks freely first.
``allowed_tools`` renders only the tools it lists, then acts as ``auto`` or ``required``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jinja2

from qwen3.async_llm import AsyncLLM, StreamDelta
from qwen3.chat import ToolCall, check_template_variables, parse_output
from qwen3.jinja_sandbox import RenderLimits, TemplateLimitError
from qwen3.llm import ChatRequest
from qwen3.server.errors import APIError
from qwen3.server.protocol import ChatCompletionRequest
from qwen3.server.serving import (
    SSE_DONE,
    ServerState,
    TokenText,
    Usage,
    chat_logprobs,
    merge,
    new_id,
    sse,
)
from qwen3.structured import GrammarError, StructuredOutputs, check_tool_parameters, tool_call_grammar

logger = logging.getLogger(__name__)


def prepare(state: ServerState, body: ChatCompletionRequest, check: bool = True) -> ChatRequest:
    """Render the conversation and pick sampling; every mistake is a 400 naming the field. ``check``:
    refuse a prompt the engine could not run (too long for the context); ``/tokenize`` counts it anyway.

    Blocking work (rendering, tokenizing): the app runs it on a worker thread, off the event loop.
    """
    llm = state.llm
    messages = [message.to_template() for message in body.messages]
    template_vars = dict(body.chat_template_kwargs or {})
    effort_thinking, thinking_budget = body.thinking_controls()
    enable_thinking = template_vars.pop("enable_thinking", effort_thinking)
    if not isinstance(enable_thinking, bool):
        name = "chat_template_kwargs.enable_thinking"
        raise APIError(400, f"{name}: must be true or false", param=name)
    for key in template_vars:
        try:
            check_template_variables([key])
        except ValueError as exc:
            name = f"chat_template_kwargs.{key}"
            raise APIError(400, f"chat_template_kwargs: {exc}", param=name) from None
    tools, constraint, where = _constraint(body)
    defaults = llm.recommended_sampling(messages, enable_thinking, thinking_budget)
    params = state.sampling(defaults, body.sampling_overrides(), body.param_name)
    params = params.replace(structured_outputs=constraint)
    config = state.config
    try:
        request = llm.prepare_chat(
            messages,
            params,
            enable_thinking,
            thinking_budget,
            tools,
            config.chat_template,
            template_vars=template_vars,
            plain_text_messages=config.plain_text_messages,
            render_limits=RenderLimits(
                seconds=config.template_timeout, max_chars=config.max_request_bytes * 4
            ),
        )
    except TemplateLimitError as exc:
        logger.warning("chat template refused a request: %s", exc)
        raise APIError(400, f"messages: {exc}", param="messages", code="template_limit") from None
    except (ValueError, jinja2.TemplateError) as exc:
        raise APIError(400, f"messages: {exc}", param="messages") from None

    def param_name(field: str) -> str:
        return where if field == "structured_outputs" else body.param_name(field)

    if check:
        state.check_prompt(request.prompt_token_ids, params, "messages", param_name, request)
    return request


def _constraint(
    body: ChatCompletionRequest,
) -> tuple[list[dict[str, Any]] | None, StructuredOutputs | None, str]:
    """The tools to render, the answer's constraint (from ``tool_choice`` and strict tools, or from the
    answer-format fields) and the field it came from; a 400 naming the field for anything invalid."""
    try:
        answer, where = body.constraint()
    except GrammarError as exc:
        raise APIError(400, str(exc), param=exc.field) from None
    choice = body.tool_choice
    tools = [tool.model_dump(exclude_none=True, by_alias=True) for tool in body.tools] if body.tools else None
    if choice == "none":
        return None, answer, where
    if choice in (None, "auto"):
        mode, calls = "auto", tools or []
    elif not tools:
        raise APIError(400, "tool_choice: choosing or forcing tools needs tools", param="tool_choice")
    elif choice == "required":
        mode, calls = "required", tools
    else:
        mode, named = choice.selection()
        names = {tool["function"]["name"] for tool in tools}
        for name, param in named:
            if name not in names:
                raise APIError(400, f"{param}: {name!r} is not one of the tools", param=param)
        chosen = {name for name, _ in named}
        calls = [tool for tool in tools if tool["function"]["name"] in chosen]
        if mode != "named":  # allowed_tools: only those are shown, then auto or required
            tools = calls
        mode = "required" if mode == "named" else mode
    if mode == "auto" and not any(tool["function"].get("strict") for tool in calls):
        return tools, answer, where
    if answer is not None:
        why = "strict tools" if mode == "auto" else "a forced tool_choice"
        raise APIError(400, f"{where}: cannot be combined with {why}", param=where)
    try:
        check_tool_parameters(calls)
    except GrammarError as exc:
        raise APIError(400, str(exc), param=exc.field) from None
    return tools, tool_call_grammar(calls, mode), "tools"


def streams(
    state: ServerState,
    front: AsyncLLM,
    request: ChatRequest,
    n: int,
    request_id: str,
    arrival: float,
    parse: bool,
) -> list[AsyncIterator[StreamDelta]]:
    """The engine streams of a prepared chat request's ``n`` choices (parsed into reasoning, content and
    tool calls as they decode if ``parse``), observed by the metrics."""
    return [
        state.metrics.observe(
            front.stream_chat(
                dataclasses.replace(request, params=request.params.for_choice(i)),
                f"{request_id}-{i}",
                parse,
            ),
            arrival,
        )
        for i in range(n)
    ]


def finish_reason(reason: str | None, called_tools: bool) -> str | None:
    return "tool_calls" if called_tools and reason == "stop" else reason


@dataclass
class Choice:
    """One generated choice, parsed from its whole text exactly as offline ``LLM.chat`` parses it."""

    reasoning: str | None
    content: str
    tool_calls: list[ToolCall]
    finish_reason: str | None
    logprobs: list[dict[str, Any]]


async def generate(
    state: ServerState,
    front: AsyncLLM,
    request: ChatRequest,
    n: int,
    request_id: str,
    arrival: float,
    logprobs: bool = False,
) -> tuple[list[Choice], Usage]:
    """Generate every choice to the end, then parse each; the usage summed over them."""
    texts: list[list[str]] = [[] for _ in range(n)]
    entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    usage = Usage()
    usage.prompt = len(request.prompt_token_ids)
    token_text = TokenText(state.llm.tokenizer)
    async for i, delta in merge(streams(state, front, request, n, request_id, arrival, parse=False)):
        texts[i].append(delta.text)
        if logprobs:
            entries[i] += chat_logprobs(delta.token_ids, delta.logprobs, token_text)
        if delta.finished:
            finish[i] = delta.finish_reason
            usage.add(delta)
    choices = []
    for i in range(n):
        reasoning, content, calls = parse_output(
            request.parse_prefix + "".join(texts[i]), request.reasoning_started
        )
        choices.append(Choice(reasoning, content, calls, finish_reason(finish[i], bool(calls)), entries[i]))
    return choices, usage


async def complete(
    state: ServerState, front: AsyncLLM, body: ChatCompletionRequest, request: ChatRequest, arrival: float
) -> dict[str, Any]:
    """The ``chat.completion`` object for every choice."""
    request_id = new_id("chatcmpl")
    generated, usage = await generate(state, front, request, body.n, request_id, arrival, body.logprobs)
    choices = []
    for i, choice in enumerate(generated):
        calls = choice.tool_calls
        message: dict[str, Any] = {
            "role": "assistant",
            "content": choice.content if choice.content or not calls else None,
            "reasoning_content": choice.reasoning,
        }
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": {"content": choice.logprobs} if body.logprobs else None,
                "finish_reason": choice.finish_reason,
            }
        )
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": choices,
        "usage": usage.body(),
    }


async def stream(
    state: ServerState, front: AsyncLLM, body: ChatCompletionRequest, request: ChatRequest, arrival: float
) -> AsyncIterator[str]:
    """Server-sent events: the role first, then reasoning/content/tool-call deltas as they are decoded,
    a finish chunk per choice, the usage chunk if asked for, and ``[DONE]``."""
    request_id = new_id("chatcmpl")
    created = int(time.time())
    include_usage = body.include_usage
    token_text = TokenText(state.llm.tokenizer)

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        payload: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": state.model_name,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return sse(payload)

    usage = Usage()
    usage.prompt = len(request.prompt_token_ids)
    called = [False] * body.n
    try:
        for i in range(body.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, delta in merge(streams(state, front, request, body.n, request_id, arrival, parse=True)):
            logprobs = None
            if body.logprobs:
                logprobs = {"content": chat_logprobs(delta.token_ids, delta.logprobs, token_text)}
            parts: list[dict[str, Any]] = []
            if delta.reasoning:
                parts.append({"reasoning_content": delta.reasoning})
            if delta.content:
                parts.append({"content": delta.content})
            if delta.tool_calls:
                called[i] = True
                calls = [
                    {
                        "index": call.index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for call in delta.tool_calls
                ]
                parts.append({"tool_calls": calls})
            if logprobs and logprobs["content"] and not parts:
                parts.append({})  # the text is held back (a possible tag), its logprobs are not
            for k, part in enumerate(parts):
                yield chunk(i, part, logprobs=logprobs if k == 0 else None)
            if delta.finished:
                usage.add(delta)
                yield chunk(i, {}, finish=finish_reason(delta.finish_reason, called[i]))
        if include_usage:
            payload = {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.model_name,
                "choices": [],
                "usage": usage.body(),
            }
            yield sse(payload)
    except Exception as exc:  # the engine failed mid-stream: the status line is long gone, say so in-band
        logger.exception("chat stream %s failed", request_id)
        yield sse(APIError(500, f"generation failed: {exc}").body())
    yield SSE_DONE
