"""Chat prompts in, structured answers out: the Qwen3 chat template and the parser for what the model writes.

:func:`render` runs a Hugging Face chat template exactly as transformers does (same jinja2 sandbox, same
``tojson``), so prompts are byte-identical to ``tokenizer.apply_chat_template``. :func:`parse_output` and
:class:`StreamingOutputParser` split generated text into reasoning (``<think>...</think>``), content and
Hermes-style tool calls (``<tool_call>{json}</tool_call>``), whole or increment by increment, with the same
result either way.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Literal, NamedTuple

from qwen3.jinja_sandbox import (  # noqa: F401 - compile_template re-exported
    RenderLimits,
    compile_template,
    render_template,
    template_globals,
)

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
# transformers 5 reads a message's reasoning under any of these names and hands it to templates as
# `reasoning_content` (the name Qwen3's template reads); vLLM's API calls it `reasoning`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# Tags a message's content may hold as they are, per role, because the template reads them there: an
# assistant's reasoning and tool calls, and a tool result that a client sent as a user message.
CONTENT_TAGS = {
    "assistant": (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE),
    "user": ("<tool_response>", "</tool_response>"),
}
# Variables render() sets itself, which template variables passed to it may not replace ("self" is the
# first parameter of jinja's own Template.render/generate).
_RENDER_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "enable_thinking", "continue_final_message",
     "template", "limits", "self"}
)  # fmt: skip


# --------------------------------------------------------------------------------------------- rendering


def builtin_template() -> str:
    """The official Qwen3 hybrid-thinking template shipped with the package (used when a checkpoint has none)."""
    return _builtin_template()


@lru_cache(maxsize=1)
def _builtin_template() -> str:
    return resources.files("qwen3").joinpath("templates/qwen3.jinja").read_text(encoding="utf-8")


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate and copy ``messages`` the way transformers prepares them (None-valued keys dropped,
    reasoning aliases filled). Raises ValueError naming the first problem; valid input renders unchanged."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] is a {type(message).__name__}, not a dict")
        msg = {k: v for k, v in message.items() if v is not None}
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        content = msg.get("content")
        if content is None and not (role == "assistant" and msg.get("tool_calls")):
            raise ValueError(f"messages[{i}] ({role}) has no content")
        if content is not None and not isinstance(content, str):
            raise ValueError(
                f"messages[{i}] ({role}) content must be a string (Qwen3 is text-only), "
                f"got {type(content).__name__}"
            )
        if "tool_calls" in msg:
            msg["tool_calls"] = [c.to_openai() if isinstance(c, ToolCall) else c for c in msg["tool_calls"]]
            for j, call in enumerate(msg["tool_calls"]):
                function = call.get("function", call) if isinstance(call, Mapping) else None
                if not isinstance(function, Mapping) or not function.get("name"):
                    raise ValueError(f"messages[{i}].tool_calls[{j}] has no function name")
        reasoning = next((msg[k] for k in _REASONING_FIELDS if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def check_template_variables(names: Iterable[Any]) -> None:
    """Refuse template variable names that are not plain identifiers, or that would replace what
    :func:`render` sets or a template global (``range``, ``namespace``, ``raise_exception``, ...)."""
    reserved = _RENDER_VARIABLES | template_globals()
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"template variable {name!r}: names are identifiers that do not start with '_'")
        if name in reserved:
            raise ValueError(
                f"template variable {name!r}: is set by qwen3 (it would replace a variable or global)"
            )


def render(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    template: str | None = None,
    continue_final_message: bool = False,
    limits: RenderLimits | None = None,
    **kwargs: Any,
) -> str:
    """Render a conversation to the prompt text, byte-identical to transformers' ``apply_chat_template``.

    ``messages`` are OpenAI-style dicts: system / user / assistant (optional ``reasoning_content`` and
    ``tool_calls``, whose ``function.arguments`` may be a dict or a JSON string) / tool. ``tools`` are
    OpenAI function schemas. ``template=None`` uses the built-in Qwen3 template. ``enable_thinking=False``
    makes the Qwen3 template pre-fill an empty think block. ``continue_final_message`` leaves the last
    message open (no ``<|im_end|>``) so the model continues it, e.g. to resume thinking after a budget cut.
    Extra ``kwargs`` are template variables. The template runs in :mod:`qwen3.jinja_sandbox`, bounded by
    ``limits`` (time and size; a template past them raises ``TemplateLimitError``).
    """
    check_template_variables(kwargs)
    chat = _check_messages(messages)
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ValueError("tools must be JSON-schema dicts ({'type': 'function', 'function': {...}})")
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        if not isinstance(chat[-1].get("content"), str):
            raise ValueError("continue_final_message needs a final message with string content")
        final = chat[-1]["content"]
        chat[-1]["content"] = final + _CONTINUE_TAG
    text = render_template(
        template if template is not None else _builtin_template(),
        limits,
        messages=chat,
        tools=None if tools is None else [dict(t) for t in tools],
        documents=None,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        **kwargs,
    )
    if continue_final_message:
        # Cut right after the final message's text, as transformers does (the tag marks where it ends).
        tag = text.rfind(_CONTINUE_TAG.strip())
        if tag < 0 or final.strip() not in text:
            raise ValueError("continue_final_message: the template dropped part of the final message")
        text = text[:tag] if text.startswith(_CONTINUE_TAG, tag) else text[:tag].rstrip()
    return text


def reasoning_opened(prompt: str) -> bool:
    """Whether ``prompt`` leaves a ``<think>`` open for the model to continue: the last ``<think>`` of the
    turn being generated (after the last ``<|im_start|>``) has no ``</think>`` after it.

    True for the Thinking-2507 template, for a forced ``<think>\n`` (even with text after it), and for any
    custom template that opens the reasoning itself; False for the hybrid template in either mode (thinking:
    the model writes ``<think>``; non-thinking: the empty block is closed).
    """
    opened = prompt.rfind(THINK_OPEN)
    return opened > prompt.rfind(THINK_CLOSE) and opened > prompt.rfind("<|im_start|>")


def soft_switch(messages: Sequence[Mapping[str, Any]]) -> bool | None:
    """The mode Qwen3's soft switches ask for: True after ``/think``, False after ``/no_think``, else None.

    The flags are plain text the template leaves alone; the model was trained to follow the most recent
    one in a user or system message (hybrid_thinking.md (b)), so the latest occurrence wins.
    """
    for message in reversed(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "system"):
            continue
        content = message.get("content")
        if not isinstance(content, str):
            continue
        think, no_think = content.rfind("/think"), content.rfind("/no_think")
        if think >= 0 or no_think >= 0:
            return think > no_think
    return None


# --------------------------------------------------------------------------------------------- parsing


@dataclass
class ToolCall:
    """One function call the model asked for; ``arguments`` is a JSON string, as the OpenAI API returns it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry; it can go straight back into an assistant message for render()."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class ParsedOutput(NamedTuple):
    """Generated text split up. ``reasoning`` is None when there was no think block, "" when it was empty."""

    reasoning: str | None
    content: str
    tool_calls: list[ToolCall]


@dataclass
class Delta:
    """One piece of streamed output: reasoning or content text, or one complete tool call."""

    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    index: int | None = None  # tool calls: 0, 1, ... in order
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


def _parse_tool_call(body: str) -> ToolCall | None:
    """The call in ``<tool_call>body</tool_call>``, or None (logged) if it is not ``{"name", "arguments"}`` JSON."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        logger.warning("ignoring malformed tool call (kept as content): %.200r", body)
        return None
    args = obj.get("arguments", {})
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


# A code fence opens/closes at a line start (after spaces or tabs); inside one, <tool_call> is just text.
_FENCE = r"^[ \t]*```"
_FENCE_RE = re.compile(_FENCE, re.M)
_FENCE_OR_CALL_RE = re.compile(f"{_FENCE}|{re.escape(CALL_OPEN)}", re.M)


def _split_answer(answer: str) -> tuple[str, list[ToolCall]]:
    """Take the tool calls out of the answer text. Text before a call loses its trailing whitespace, and so
    does the end of the content when there were calls; a malformed call stays, verbatim. An unclosed call
    at the end (cut by max_tokens) is a call if its JSON is complete, else it stays too."""
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = start = 0  # pos: scan position; start: first character not yet put in `content`
    in_fence = False
    while m := (_FENCE_RE if in_fence else _FENCE_OR_CALL_RE).search(answer, pos):
        if m.group() != CALL_OPEN:
            in_fence, pos = not in_fence, m.end()
            continue
        end = answer.find(CALL_CLOSE, m.end())
        if end < 0:
            if call := _parse_unclosed_call(answer[m.end() :]):
                content.append(answer[start : m.start()].rstrip())
                calls.append(call)
                start = len(answer)
            break
        pos = end + len(CALL_CLOSE)
        if call := _parse_tool_call(answer[m.end() : end]):
            content.append(answer[start : m.start()].rstrip())
            calls.append(call)
            start = pos
    tail = answer[start:]
    content.append(tail.rstrip() if calls else tail)
    return "".join(content), calls


def _parse_unclosed_call(body: str) -> ToolCall | None:
    """A ``<tool_call>`` that never closed (generation ended inside it): a call if its JSON is complete."""
    try:
        json.loads(body)
    except ValueError:
        logger.warning("unclosed tool call kept as text: %.200r", CALL_OPEN + body)
        return None
    return _parse_tool_call(body)


def _split_open_reasoning(body: str) -> tuple[str, list[ToolCall]]:
    """Reasoning that never closed: the tool calls written in it are calls (the model forgot ``</think>``);
    the text around them stays reasoning. No code-fence rule here: inside thinking, a call is a call."""
    text: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (i := body.find(CALL_OPEN, pos)) >= 0:
        end = body.find(CALL_CLOSE, i + len(CALL_OPEN))
        inner = body[i + len(CALL_OPEN) : end if end >= 0 else len(body)]
        call = _parse_tool_call(inner) if end >= 0 else _parse_unclosed_call(inner)
        after = len(body) if end < 0 else end + len(CALL_CLOSE)
        if call is not None:
            text.append(body[pos:i])
            calls.append(call)
        else:
            text.append(body[pos:after])
        pos = after
    text.append(body[pos:])
    return "".join(text), calls


def _closes_unopened(text: str) -> bool:
    """A ``</think>`` comes before any ``<think>``: the prompt must have opened the reasoning."""
    close = text.find(THINK_CLOSE)
    return close >= 0 and THINK_OPEN not in text[:close]


def parse_output(text: str, reasoning_started: bool | None = None) -> ParsedOutput:
    """Split generated text into (reasoning, content, tool_calls).

    The text is an optional ``<think>\n...\n</think>\n\n`` block, then the answer. Where the reasoning
    starts depends on what the prompt did, ``reasoning_started``:

    - True: the prompt opened ``<think>`` (Qwen3 Thinking-2507, forced thinking): the text is reasoning up
      to ``</think>``;
    - False: it did not: only a ``<think>`` at the very start (after whitespace) opens reasoning;
    - None (not known): as False, except that a ``</think>`` with no ``<think>`` before it means the prompt
      opened it, so the text before it is reasoning (a stray ``</think>`` is content with False).

    Reasoning that never closes (budget or length cut) is all reasoning, except for tool calls written in
    it, which are calls. Newlines around the reasoning and after ``</think>`` are dropped, as the chat
    template drops them. Tool calls inside a ``` code block are content. A call cut before
    ``</tool_call>`` whose JSON is complete is a call. Malformed calls stay in the content, with a
    warning; nothing here raises.
    """
    stripped = text.lstrip()
    if reasoning_started or stripped.startswith(THINK_OPEN):
        body = text if reasoning_started else stripped[len(THINK_OPEN) :]
    elif reasoning_started is None and _closes_unopened(text):
        body = text
    else:
        content, calls = _split_answer(text)
        return ParsedOutput(None, content, calls)
    head, closed, answer = body.partition(THINK_CLOSE)
    if not closed:
        reasoning, calls = _split_open_reasoning(head)
        return ParsedOutput(reasoning.strip("\n"), "", calls)
    content, calls = _split_answer(answer.lstrip("\n"))
    return ParsedOutput(head.strip("\n"), content, calls)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag`` (it may still become ``tag``)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


_PARTIAL_FENCE_RE = re.compile(r"^[ \t]*`{0,2}\Z", re.M)


class StreamingOutputParser:
    """:func:`parse_output`, increment by increment: ``feed`` text as it is decoded, then ``finish``.

    Text that could still turn out to be a tag (``<thi``, ``</think`` split across increments, a trailing
    newline before ``</think>``, whitespace before a possible ``<tool_call>``, a half-written code fence) is
    held back until it is decided, so for any split of a text the deltas of each kind concatenate to what
    :func:`parse_output` returns for the whole. A tool call is emitted as one delta when its
    ``</tool_call>`` arrives (the way vLLM's hermes parser ends up). Two things can only be decided late,
    and are held until they are: a ``<tool_call>`` inside unclosed reasoning (reasoning text if
    ``</think>`` follows, a call if the text ends first), and, with ``reasoning_started=None``, text that
    does not start with ``<think>`` (reasoning if a ``</think>`` follows, else content) — front ends
    know from the prompt and pass True or False, so their streams are not held.
    """

    def __init__(self, reasoning_started: bool | None = None) -> None:
        self._state: Literal["start", "undecided", "reasoning", "after_think", "answer", "tool_call"] = (
            "reasoning" if reasoning_started else "start"
        )
        self._unknown = reasoning_started is None
        self._buf = ""  # received, not yet decided
        self._reasoning_lead = True  # still dropping newlines that open the reasoning
        self._reasoning_emitted = False
        self._held_call = False  # the buffer holds a <tool_call> written inside unclosed reasoning
        self._ws = ""  # content whitespace held back: dropped if a tool call follows
        self._line_start = True  # the answer text before `_buf` ends a line (or is empty)
        self._in_fence = False
        self._calls = 0
        self._out: list[Delta] = []

    def feed(self, text: str) -> list[Delta]:
        """Add generated text; return the deltas it decides (possibly none)."""
        self._buf += text
        self._run(final=False)
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Delta]:
        """End of generation: decide everything still held back and return the last deltas."""
        self._run(final=True)
        if self._ws and not self._calls:
            self._out.append(Delta("content", self._ws))
        self._ws = ""
        out, self._out = self._out, []
        return out

    def _content(self, text: str) -> None:
        body = text.rstrip()
        if body:
            self._out.append(Delta("content", self._ws + body))
            self._ws = text[len(body) :]
        else:
            self._ws += text

    def _reasoning(self, text: str) -> None:
        if text:
            self._out.append(Delta("reasoning", text))
            self._reasoning_emitted = True

    def _call(self, call: ToolCall) -> None:
        self._ws = ""
        self._out.append(
            Delta("tool_call", index=self._calls, id=call.id, name=call.name, arguments=call.arguments)
        )
        self._calls += 1

    def _run(self, final: bool) -> None:
        while True:
            state, buf = self._state, self._buf
            if state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._state, self._buf = "reasoning", stripped[len(THINK_OPEN) :]
                elif final or (stripped and not THINK_OPEN.startswith(stripped)):
                    self._state = "undecided" if self._unknown else "answer"
                else:
                    return
            elif state == "undecided":  # no <think> first, the prompt's state unknown: wait for a tag
                close, opened = buf.find(THINK_CLOSE), buf.find(THINK_OPEN)
                if close >= 0 and not 0 <= opened < close:  # the prompt opened the reasoning
                    self._reasoning(buf[:close].strip("\n"))
                    self._state, self._buf = "after_think", buf[close + len(THINK_CLOSE) :]
                elif opened >= 0 or final:  # a <think> mid-text, or the end: it was all answer
                    self._state = "answer"
                else:
                    return
            elif state == "reasoning":
                if self._reasoning_lead:
                    buf = self._buf = buf.lstrip("\n")
                    self._reasoning_lead = not buf
                head, closed, rest = buf.partition(THINK_CLOSE)
                if closed:  # everything before it is reasoning, tool-call text included
                    self._reasoning(head.rstrip("\n"))
                    self._state, self._buf, self._held_call = "after_think", rest, False
                    continue
                if final:
                    if self._held_call:
                        text, calls = _split_open_reasoning(buf)
                        text = text.rstrip("\n")
                        self._reasoning(text if self._reasoning_emitted else text.lstrip("\n"))
                        for call in calls:
                            self._call(call)
                    else:
                        self._reasoning(buf.rstrip("\n"))
                    self._buf = ""
                    return
                if not self._held_call:
                    call_at = buf.find(CALL_OPEN)
                    if call_at >= 0:
                        self._held_call = True
                        keep = call_at
                    else:  # hold back a possible start of </think> or <tool_call>
                        keep = len(buf) - max(
                            _partial_suffix(buf, THINK_CLOSE), _partial_suffix(buf, CALL_OPEN)
                        )
                    emit = buf[:keep].rstrip("\n")  # newlines just before </think> are not reasoning
                    self._reasoning(emit)
                    self._buf = buf[len(emit) :]
                return
            elif state == "after_think":
                self._buf = buf.lstrip("\n")
                if not (self._buf or final):
                    return
                self._state = "answer"
            elif state == "answer":
                if not self._scan_answer(final):
                    return
            else:  # tool_call: wait for the closing tag
                end = buf.find(CALL_CLOSE)
                if end < 0:
                    if final:
                        if call := _parse_unclosed_call(buf):
                            self._call(call)
                        else:
                            self._content(CALL_OPEN + buf)
                        self._buf = ""
                    return
                body, self._buf = buf[:end], buf[end + len(CALL_CLOSE) :]
                if call := _parse_tool_call(body):
                    self._call(call)
                else:
                    self._content(CALL_OPEN + body + CALL_CLOSE)
                self._state, self._line_start = "answer", False

    def _scan_answer(self, final: bool) -> bool:
        """Emit answer text up to the next tool call; True if one opened (the caller goes on), else False."""
        # A sentinel first character tells the line-start (^) regexes whether the buffer begins a line.
        text = ("\n" if self._line_start else "x") + self._buf
        pos = 1
        while m := (_FENCE_RE if self._in_fence else _FENCE_OR_CALL_RE).search(text, pos):
            if m.group() == CALL_OPEN:
                self._content(text[1 : m.start()])
                self._state, self._buf = "tool_call", text[m.end() :]
                return True
            self._in_fence, pos = not self._in_fence, m.end()  # fences are content; they only flip the mode
        keep = len(text)
        if not final:  # hold back a possible start of <tool_call> or of a fence
            if not self._in_fence:
                keep -= _partial_suffix(text, CALL_OPEN)
            if fence := _PARTIAL_FENCE_RE.search(text, pos):
                keep = min(keep, fence.start())
        self._content(text[1:keep])
        self._line_start, self._buf = text[keep - 1] == "\n", text[keep:]
        return False
