"""``POST /v1/responses``: OpenAI's Responses API, on the chat path.

A Responses request becomes a :class:`ChatCompletionRequest` (:meth:`ResponsesRequest.to_chat`) and runs
through :func:`chat_completions.prepare` and the same generation and parsing, so both endpoints render,
sample, force tool calls and think identically; only the shapes differ.

- **Items to messages.** ``instructions`` is a system message first; a string ``input`` is one user
  message. ``message`` items are messages (``input_text`` / ``output_text`` / ``refusal`` parts read as
  text); a ``reasoning`` item, the assistant ``message`` and the ``function_call`` items that follow it make
  one assistant turn (``reasoning_content``, ``content``, ``tool_calls``), which is how Qwen3's template
  writes a turn; a ``function_call_output`` is a ``tool`` message for its ``call_id``.
- **Output to items.** The thinking is a ``reasoning`` item whose ``content`` holds the text
  (``reasoning_text``; Qwen3 writes no summary, so ``summary`` is empty), the answer an assistant
  ``message`` with one ``output_text`` part, each tool call a ``function_call`` item.
- **Thinking.** ``reasoning.effort`` is mapped like chat's ``reasoning_effort`` (``EFFORT_BUDGETS``:
  "none"/"minimal" non-thinking, "low" 1,024 and "medium" 8,192 thinking tokens, "high" and above no cap).
- **Stateless.** Nothing is kept: ``store`` is accepted and answered as false; ``previous_response_id``,
  ``conversation`` and ``item_reference`` items (which need stored responses) and ``background`` are
  refused with a 400 naming the field. ``text.format`` (``json_object``, ``json_schema``) is the chat
  endpoint's ``response_format``: a structured output held from the end of the reasoning.
- **Streaming** sends OpenAI's typed events, numbered by ``sequence_number``: ``response.created``,
  ``response.in_progress``, then per output item ``response.output_item.added``,
  ``response.content_part.added``, the text deltas (``response.reasoning_text.delta`` /
  ``response.output_text.delta``) or ``response.function_call_arguments.delta`` (a call arrives whole, when
  its ``</tool_call>`` is decoded), the matching ``.done`` events and ``response.output_item.done``; last
  ``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` cut it, ``response.failed``
  if the engine failed it).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from qwen3.async_llm import AsyncLLM
from qwen3.chat import ToolCall
from qwen3.llm import ChatRequest
from qwen3.server import chat_completions
from qwen3.server.errors import APIError, from_validation_error
from qwen3.server.protocol import (
    MAX_TOOLS,
    ChatCompletionRequest,
    NamedToolChoice,
    ReasoningEffort,
    TextPart,
    ToolName,
    _Body,
)
from qwen3.server.serving import ServerState, Usage, sse

logger = logging.getLogger(__name__)

MAX_ITEMS = 4096  # input items in one request
MAX_ID = 256  # characters of a call_id

# --------------------------------------------------------------------------------------------- requests


class MessageItem(_Body):
    """``{"type": "message", "role", "content"}``; ``type`` may be left out (OpenAI's easy input message)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        content = self.content
        return content if isinstance(content, str) else "\n".join(part.content for part in content)


class FunctionCallItem(_Body):
    """A call the model made earlier, sent back with the history."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=MAX_ID)
    name: ToolName
    arguments: str


class FunctionCallOutputItem(_Body):
    """A call's result: becomes the ``tool`` message of ``call_id``."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=MAX_ID)
    output: str | list[TextPart]

    @property
    def text(self) -> str:
        output = self.output
        return output if isinstance(output, str) else "\n".join(part.content for part in output)


class ReasoningPart(_Body):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Body):
    """Thinking from an earlier turn: ``content`` (the text, as this server returns it) or, from other
    servers, only ``summary``. ``encrypted_content`` is opaque to Qwen3 and ignored."""

    type: Literal["reasoning"]
    summary: list[ReasoningPart] = Field(default_factory=list)
    content: list[ReasoningPart] | None = None

    @property
    def text(self) -> str:
        return "\n".join(part.text for part in (self.content or self.summary))


def _item_kind(item: Any) -> str | None:
    """The union member an input item is, by its ``type`` (a message may leave it out); the tags are
    capitalised so error paths skip them (``input[2].call_id``, not ``input[2].function_call.call_id``)."""
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)
    return _ITEM_TAGS.get(kind) if isinstance(kind, str) else None


_ITEM_TAGS = {
    "message": "Message",
    "function_call": "FunctionCall",
    "function_call_output": "FunctionCallOutput",
    "reasoning": "Reasoning",
}
InputItem = Annotated[
    Annotated[MessageItem, Tag("Message")]
    | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")]
    | Annotated[ReasoningItem, Tag("Reasoning")],
    Discriminator(
        _item_kind,
        custom_error_type="invalid_item",
        custom_error_message="an input item is a message, function_call, function_call_output or reasoning "
        "(item_reference needs stored responses, which this server does not keep)",
    ),
]


class FunctionTool(_Body):
    """A function tool; OpenAI's hosted tools (web search, file search, ...) do not exist here."""

    type: str
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("type")
    @classmethod
    def _function_only(cls, value: str) -> str:
        if value != "function":
            raise ValueError(f"tool type {value!r} is not supported (function tools only)")
        return value


class ReasoningOptions(_Body):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted; the full text is returned


class TextFormat(_Body):
    """The answer's format: text, any JSON object, or JSON valid against ``schema`` (structured outputs,
    held from the end of the reasoning as on the chat endpoint)."""

    type: Literal["text", "json_schema", "json_object"]
    name: str = Field(default="response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def response_format(self) -> dict[str, Any]:
        """The chat endpoint's ``response_format`` for this format."""
        if self.type != "json_schema":
            return {"type": self.type}
        inner = {
            "name": self.name,
            "schema": self.schema_,
            "strict": self.strict,
            "description": self.description,
        }
        return {"type": "json_schema", "json_schema": {k: v for k, v in inner.items() if v is not None}}


class TextOptions(_Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted; Qwen3 has no such control


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[InputItem] = Field(max_length=MAX_ITEMS)
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # accepted: Qwen3 may write several calls in one turn either way
    reasoning: ReasoningOptions | None = None
    thinking_budget: int | None = Field(default=None, ge=0)  # qwen3's own control, as on chat
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extensions from here to seed
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stream: bool = False
    store: bool = True  # accepted; nothing is stored
    background: bool = False
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    text: TextOptions | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)  # echoed, as OpenAI does

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, list) and not value:
            raise ValueError("input is empty")
        return value

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _stateless(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(
                "this server keeps no responses (stateless): send the whole conversation as input"
            )
        return value

    @field_validator("background")
    @classmethod
    def _foreground(cls, value: bool) -> bool:
        if value:
            raise ValueError("background responses are not supported (they need stored responses)")
        return value

    @model_validator(mode="after")
    def _has_a_turn(self) -> ResponsesRequest:
        if isinstance(self.input, list) and all(isinstance(i, ReasoningItem) for i in self.input):
            raise ValueError("input holds no message")
        return self

    def messages(self) -> list[dict[str, Any]]:
        """The items as chat messages (see the module's docstring)."""
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        turn: dict[str, Any] | None = None  # the assistant turn being assembled

        def close() -> None:
            nonlocal turn
            if turn is not None:
                turn.setdefault("content", "")
                messages.append(turn)
                turn = None

        for item in items:
            if isinstance(item, ReasoningItem):
                close()
                turn = {"role": "assistant", "reasoning_content": item.text}
            elif isinstance(item, MessageItem) and item.role == "assistant":
                if turn is not None and ("content" in turn or "tool_calls" in turn):
                    close()
                turn = turn or {"role": "assistant"}
                turn["content"] = item.text
            elif isinstance(item, FunctionCallItem):
                turn = turn or {"role": "assistant"}
                call = {"id": item.call_id, "type": "function"}
                turn.setdefault("tool_calls", []).append(
                    {**call, "function": {"name": item.name, "arguments": item.arguments}}
                )
            else:
                close()
                if isinstance(item, FunctionCallOutputItem):
                    messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
                else:
                    messages.append({"role": item.role, "content": item.text})
        close()
        return messages

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request this response runs as (a 400 in this API's field names if it is invalid)."""
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages(),
            "tool_choice": self.tool_choice,
            "max_completion_tokens": self.max_output_tokens,
            "thinking_budget": self.thinking_budget,
            "reasoning_effort": self.reasoning.effort if self.reasoning else None,
        }
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty"):
            fields[name] = getattr(self, name)
        fields["repetition_penalty"], fields["seed"] = self.repetition_penalty, self.seed
        if self.text is not None and self.text.format is not None:
            fields["response_format"] = self.text.format.response_format()
        if self.tools is not None:
            fields["tools"] = [
                {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                for tool in self.tools
            ]
        try:
            return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise responses_error(from_validation_error(exc)) from None


_CHAT_PARAMS = [
    (re.compile(r"^messages\b(\[\d+\])?"), "input"),
    (re.compile(r"^max_completion_tokens\b"), "max_output_tokens"),
    (re.compile(r"^tool_choice\.allowed_tools\."), "tool_choice."),
    (re.compile(r"\.function\."), "."),
    (re.compile(r"^reasoning_effort\b"), "reasoning.effort"),
    (re.compile(r"^response_format(\.json_schema)?\b"), "text.format"),
]


def _responses_param(param: str) -> str:
    for pattern, replacement in _CHAT_PARAMS:
        param = pattern.sub(replacement, param)
    return param


def responses_error(error: APIError) -> APIError:
    """A chat-path error in this API's field names (``max_completion_tokens`` -> ``max_output_tokens``)."""
    if error.param is None:
        return error
    param = _responses_param(error.param)
    message = error.message
    if message.startswith(error.param):
        message = param + message[len(error.param) :]
    return APIError(error.status, message, param, error.code, error.type)


def prepare(state: ServerState, body: ResponsesRequest) -> ChatRequest:
    """Render and tokenize as the chat endpoint does (blocking: run off the event loop)."""
    try:
        return chat_completions.prepare(state, body.to_chat())
    except APIError as exc:
        raise responses_error(exc) from None


# --------------------------------------------------------------------------------------------- output


def new_id(prefix: str) -> str:
    """An id in OpenAI's form for this API (``resp_...``, ``rs_...``, ``msg_...``, ``fc_...``)."""
    return f"{prefix}_{uuid.uuid4().hex}"


def _status(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """The response's ``status`` and ``incomplete_details`` for how generation ended."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "error":
        return "failed", None
    if finish_reason == "abort":
        return "cancelled", None
    return "completed", None


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning},
        "total_tokens": usage.prompt + usage.completion,
    }


def reasoning_item(text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": content, "status": status}


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    content = [_text_part(text)] if status == "completed" else []
    return {"id": new_id("msg"), "type": "message", "role": "assistant", "status": status, "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    arguments = call.arguments if status == "completed" else ""
    return {
        "id": new_id("fc"),
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


class ResponseShell:
    """The response object around the output: everything the request set, echoed as OpenAI echoes it."""

    def __init__(self, state: ServerState, body: ResponsesRequest) -> None:
        self.id = new_id("resp")
        self.created = int(time.time())
        self.state = state
        self.body = body

    def render(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: Usage | None = None,
        incomplete: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = self.body
        choice = body.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.state.model_name,
            "output": output,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": False,
            "temperature": body.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": choice.model_dump(exclude_none=True)
            if isinstance(choice, NamedToolChoice)
            else choice or "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": _usage(usage) if usage is not None else None,
        }


def _output(choice: chat_completions.Choice) -> list[dict[str, Any]]:
    items = []
    if choice.reasoning:
        items.append(reasoning_item(choice.reasoning))
    if choice.content or not choice.tool_calls:
        items.append(message_item(choice.content))
    items += [function_call_item(call) for call in choice.tool_calls]
    return items


async def complete(
    state: ServerState, front: AsyncLLM, body: ResponsesRequest, request: ChatRequest, arrival: float
) -> dict[str, Any]:
    """The whole response object, the text parsed exactly as the chat endpoint parses it."""
    shell = ResponseShell(state, body)
    (choice,), usage = await chat_completions.generate(state, front, request, 1, shell.id, arrival)
    status, incomplete = _status(choice.finish_reason)
    error = {"code": "server_error", "message": "generation failed"} if status == "failed" else None
    return shell.render(status, _output(choice), usage, incomplete, error)


class _EventWriter:
    """Numbers the events and keeps the output items as they are completed."""

    def __init__(self) -> None:
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the text item being streamed: reasoning or message
        self.text: list[str] = []

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n{sse(payload)}"

    def _added(self, item: dict[str, Any]) -> str:
        return self.event("response.output_item.added", output_index=len(self.output), item=item)

    def _done(self, item: dict[str, Any]) -> str:
        self.output.append(item)
        return self.event("response.output_item.done", output_index=len(self.output) - 1, item=item)

    def _in_open(self, kind: str, item: dict[str, Any], **fields: Any) -> str:
        """An event about the text item being streamed (always its one content part)."""
        return self.event(kind, item_id=item["id"], output_index=len(self.output), content_index=0, **fields)

    def text_delta(self, kind: Literal["reasoning", "message"], delta: str) -> list[str]:
        """A reasoning or answer delta: opens its item (closing another) first when needed."""
        events = []
        if self.open is not None and self.open["type"] != kind:
            events += self.close()
        reasoning = kind == "reasoning"
        if self.open is None:
            self.open = item = (
                reasoning_item("", "in_progress") if reasoning else message_item("", "in_progress")
            )
            part = {"type": "reasoning_text", "text": ""} if reasoning else _text_part("")
            events += [self._added(item), self._in_open("response.content_part.added", item, part=part)]
        self.text.append(delta)
        if reasoning:
            events.append(self._in_open("response.reasoning_text.delta", self.open, delta=delta))
        else:
            events.append(self._in_open("response.output_text.delta", self.open, delta=delta, logprobs=[]))
        return events

    def close(self) -> list[str]:
        """Finish the open text item: its ``.done`` events with the whole text."""
        if self.open is None:
            return []
        item, text = self.open, "".join(self.text)
        self.open, self.text = None, []
        if item["type"] == "reasoning":
            part: dict[str, Any] = {"type": "reasoning_text", "text": text}
            done = self._in_open("response.reasoning_text.done", item, text=text)
        else:
            part = _text_part(text)
            done = self._in_open("response.output_text.done", item, text=text, logprobs=[])
        part_done = self._in_open("response.content_part.done", item, part=part)
        return [done, part_done, self._done({**item, "status": "completed", "content": [part]})]

    def call(self, call: ToolCall) -> list[str]:
        """A tool call, whole: added, its arguments in one delta, done."""
        events = self.close()
        item = function_call_item(call, "in_progress")
        ids = {"item_id": item["id"], "output_index": len(self.output)}
        events += [
            self._added(item),
            self.event("response.function_call_arguments.delta", delta=call.arguments, **ids),
            self.event(
                "response.function_call_arguments.done", name=call.name, arguments=call.arguments, **ids
            ),
        ]
        return [*events, self._done({**item, "arguments": call.arguments, "status": "completed"})]


async def stream(
    state: ServerState, front: AsyncLLM, body: ResponsesRequest, request: ChatRequest, arrival: float
) -> AsyncIterator[str]:
    """Server-sent typed events (see the module's docstring); an engine failure mid-stream is an
    ``error`` event then ``response.failed``."""
    shell = ResponseShell(state, body)
    writer = _EventWriter()
    usage = Usage()
    usage.prompt = len(request.prompt_token_ids)
    yield writer.event("response.created", response=shell.render("in_progress", []))
    yield writer.event("response.in_progress", response=shell.render("in_progress", []))
    finish: str | None = None
    called = False
    try:
        (source,) = chat_completions.streams(state, front, request, 1, shell.id, arrival, parse=True)
        try:
            async for delta in source:
                events: list[str] = []
                if delta.reasoning:
                    events += writer.text_delta("reasoning", delta.reasoning)
                if delta.content:
                    events += writer.text_delta("message", delta.content)
                for call in delta.tool_calls:
                    called = True
                    events += writer.call(ToolCall(call.name or "", call.arguments or "{}", call.id or ""))
                for event in events:
                    yield event
                if delta.finished:
                    usage.add(delta)
                    finish = delta.finish_reason
        finally:
            await source.aclose()  # type: ignore[attr-defined]
        for event in writer.close():
            yield event
        if not writer.output:  # nothing was said: an empty answer, as the non-streaming response has
            for event in writer.text_delta("message", "") + writer.close():
                yield event
    except Exception as exc:  # the engine failed mid-stream: the status line is long gone, say so in-band
        logger.exception("responses stream %s failed", shell.id)
        yield writer.event("error", code="server_error", message=f"generation failed: {exc}", param=None)
        failed = shell.render(
            "failed", writer.output, usage, error={"code": "server_error", "message": str(exc)}
        )
        yield writer.event("response.failed", response=failed)
        return
    status, incomplete = _status(chat_completions.finish_reason(finish, called))
    error = {"code": "server_error", "message": "generation failed"} if status == "failed" else None
    final = shell.render(status, writer.output, usage, incomplete, error)
    kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
        status, "response.failed"
    )
    yield writer.event(kind, response=final)
