"""The OpenAI request bodies qwen3 serves, as pydantic models that say which field is wrong.

Only what the runtime can honour is modelled; any other field a client sends is ignored, as OpenAI and
vLLM do (``extra="ignore"``). Types are checked strictly, as OpenAI's API does: ``true`` is not a number,
``"5"`` is not an integer, NaN and infinities are not numbers (an integer is a valid float). An explicit
``null`` for a field that has a default means that default, as OpenAI and vLLM read it (SDKs send
``"n": null``, ``"stream": null``). Value ranges of sampling fields are checked once, by
:class:`qwen3.SamplingParams`, and reported under the name the client used (``param_name``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from qwen3.structured import GrammarError, StructuredOutputs

MAX_TOOL_NAME = 256  # OpenAI allows 64; MCP-style "server:tool" names run longer, vLLM has no bound
MAX_TOOLS = 256  # tools in one request (each is rendered into the prompt)
# Characters a tool name may not hold: control characters (they would break the prompt's lines), and the
# quote and backslash, which the chat template writes unescaped inside the JSON of earlier calls.
_BAD_TOOL_NAME = re.compile(r'[\x00-\x1f\x7f"\\]')
# Reasoning effort (OpenAI's values) -> Qwen3's thinking controls: (thinking on, thinking budget or None).
# Qwen3 has no effort knob; "none"/"minimal" are its non-thinking mode, "low"/"medium" cap the thinking,
# "high" and above let it think as long as it wants (up to max_tokens).
EFFORT_BUDGETS: dict[str, tuple[bool, int | None]] = {
    "none": (False, None),
    "minimal": (False, None),
    "low": (True, 1024),
    "medium": (True, 8192),
    "high": (True, None),
    "xhigh": (True, None),
    "max": (True, None),
}
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


def _tool_name(value: str) -> str:
    if _BAD_TOOL_NAME.search(value):
        raise ValueError("a tool name may not contain control characters, '\"' or '\\'")
    return value


ToolName = Annotated[str, Field(min_length=1, max_length=MAX_TOOL_NAME), AfterValidator(_tool_name)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Drop explicit nulls of fields that have a default, so ``null`` reads as "not given"."""
        if isinstance(data, dict) and None in data.values():
            fields = cls.model_fields
            return {
                k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()
            }
        return data


class TextPart(_Body):
    """One part of a message's content. Qwen3 is text-only: ``text`` parts, and the Responses API's
    ``input_text`` / ``output_text`` and ``refusal`` parts (read as their text)."""

    type: str
    text: str = ""
    refusal: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value not in ("text", "input_text", "output_text", "refusal"):
            raise ValueError(f"content part type {value!r} is not supported (Qwen3 reads text only)")
        return value

    @property
    def content(self) -> str:
        return self.refusal if self.type == "refusal" and self.refusal is not None else self.text


class FunctionCall(_Body):
    name: ToolName
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Body):
    """A call an assistant made earlier in the conversation (sent back with the history)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # function: legacy tool
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's name for the same thing
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def to_template(self) -> dict[str, Any]:
        """The dict the chat template reads: text parts joined, ``developer`` read as ``system``."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.content for part in content)  # vLLM joins text parts the same way
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        message: dict[str, Any] = {"role": role, "content": content}
        reasoning = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if self.role == "assistant" and reasoning is not None:
            message["reasoning_content"] = reasoning
        if self.role == "assistant" and self.tool_calls:
            message["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        if role == "tool" and self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class FunctionDefinition(_Body):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: ToolName


class ToolReference(_Body):
    """A function named in ``allowed_tools``: ``{"type": "function", "function": {"name"}}`` (chat) or
    ``{"type": "function", "name"}`` (Responses)."""

    type: Literal["function"] = "function"
    function: NamedFunction | None = None
    name: ToolName | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolReference:
        if (self.function is None) == (self.name is None):
            raise ValueError('name the function once: {"function": {"name": ...}} or {"name": ...}')
        return self

    @property
    def tool_name(self) -> str:
        return self.function.name if self.function is not None else self.name  # type: ignore[return-value]


class AllowedTools(_Body):
    mode: Literal["auto", "required"]
    tools: list[ToolReference] = Field(min_length=1, max_length=MAX_TOOLS)


class NamedToolChoice(_Body):
    """An object ``tool_choice``, in every shape OpenAI's APIs use:

    - one function: ``{"type": "function", "function": {"name"}}`` (chat) or ``{"type": "function", "name"}``
      (Responses, and newer chat clients);
    - a subset of the tools: ``{"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}`` (chat) or
      ``{"type": "allowed_tools", "mode", "tools"}`` (Responses).
    """

    type: Literal["function", "allowed_tools"] = "function"
    function: NamedFunction | None = None
    name: ToolName | None = None
    allowed_tools: AllowedTools | None = None
    mode: Literal["auto", "required"] | None = None
    tools: list[ToolReference] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)

    @model_validator(mode="after")
    def _one_shape(self) -> NamedToolChoice:
        if self.type == "function" and (self.function is None) == (self.name is None):
            raise ValueError('name the function once: {"function": {"name": ...}} or {"name": ...}')
        if self.type == "allowed_tools" and (self.allowed_tools is None) == (
            self.mode is None or not self.tools
        ):
            raise ValueError('give {"allowed_tools": {"mode", "tools"}} or "mode" and "tools"')
        return self

    def selection(self) -> tuple[Literal["named", "auto", "required"], list[tuple[str, str]]]:
        """What the choice asks for, and each function it names with that name's param path."""
        if self.type == "function":
            if self.function is not None:
                return "named", [(self.function.name, "tool_choice.function.name")]
            return "named", [(self.name, "tool_choice.name")]  # type: ignore[list-item]
        if self.allowed_tools is not None:
            mode, tools, where = (
                self.allowed_tools.mode,
                self.allowed_tools.tools,
                "tool_choice.allowed_tools.",
            )
        else:
            mode, tools, where = self.mode, self.tools or [], "tool_choice."  # type: ignore[assignment]
        paths = [
            (t.tool_name, f"{where}tools[{i}]" + (".function.name" if t.function else ".name"))
            for i, t in enumerate(tools)
        ]
        return mode, paths  # type: ignore[return-value]


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    name: str = Field(default="response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type json_schema needs json_schema.schema")
        return self


class StructuredOutputsBody(_Body):
    """vLLM's ``structured_outputs`` field: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None

    @field_validator("structural_tag")
    @classmethod
    def _no_structural_tag(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("structural_tag is not supported; use json, regex, choice or grammar")
        return value


class _CommonFields(_Body):
    """Fields both endpoints share; a sampling field left None was not given (the default applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=128)
    ignore_eos: bool = False  # vLLM extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    model: str | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs, and vLLM's older names.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> tuple[StructuredOutputs | None, str]:
        """The answer's constraint and the field it came from; a 400 (ValueError) if several are given."""
        given: list[tuple[str, dict[str, Any]]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema":
            given.append(("response_format.json_schema.schema", {"json": fmt.json_schema.schema_}))
        if self.structured_outputs is not None:
            body = self.structured_outputs
            values = {
                "json": body.json_, "regex": body.regex, "choice": body.choice, "grammar": body.grammar,
                "json_object": body.json_object or False,
            }  # fmt: skip
            given.append(("structured_outputs", values))
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                given.append((f"guided_{kind}", {kind: value}))
        if not given:
            return None, ""
        if len(given) > 1:
            names = ", ".join(name for name, _ in given)
            raise GrammarError(given[1][0], f"give one constraint, not several ({names})")
        param, values = given[0]
        try:
            constraint = StructuredOutputs(**values)
            return constraint, f"{param}.{constraint.kind}" if param == "structured_outputs" else param
        except GrammarError as exc:
            nested = param == "structured_outputs" and exc.field != "structured_outputs"
            inner = f"structured_outputs.{exc.field}" if nested else param
            raise GrammarError(inner, str(exc).partition(": ")[2]) from None

    def sampling_overrides(self) -> dict[str, Any]:
        """The given fields as :class:`qwen3.SamplingParams` keyword arguments (``n`` is the server's)."""
        names = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty")
        values = {name: getattr(self, name) for name in (*names, "repetition_penalty", "seed")}
        values = {k: v for k, v in values.items() if v is not None}
        if self.max_tokens is not None:
            values["max_tokens"] = self.max_tokens
        if self.stop is not None:
            values["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.stop_token_ids:
            values["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            values["ignore_eos"] = True
        return values

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_CommonFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[FunctionDefinition] | None = Field(default=None, max_length=MAX_TOOLS)  # legacy tools
    function_call: Literal["none", "auto"] | NamedFunction | None = None  # legacy tool_choice
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = Field(default=None, ge=0)
    reasoning_effort: ReasoningEffort | None = None

    @field_validator("functions", "function_call")
    @classmethod
    def _not_both(cls, value: Any, info: ValidationInfo) -> Any:
        modern = {"functions": "tools", "function_call": "tool_choice"}[info.field_name]  # type: ignore[index]
        if value is not None and info.data.get(modern) is not None:
            raise ValueError(f"give {modern} or the legacy {info.field_name}, not both")
        return value

    @model_validator(mode="after")
    def _legacy_functions(self) -> ChatCompletionRequest:
        """OpenAI's deprecated ``functions`` / ``function_call`` are ``tools`` / ``tool_choice`` (clients
        that still send them get the calls as ``tool_calls``)."""
        if self.functions is not None:
            self.tools = [Tool(type="function", function=f) for f in self.functions]
        call = self.function_call
        if call is not None:
            self.tool_choice = call if isinstance(call, str) else NamedToolChoice(function=call)
        return self

    def thinking_controls(self) -> tuple[bool, int | None]:
        """``(enable_thinking, thinking_budget)`` by ``thinking_budget`` and ``reasoning_effort``; the
        template's ``enable_thinking`` (read by the caller) and ``thinking_budget`` win over the effort."""
        if self.reasoning_effort is None:
            return True, self.thinking_budget
        enable, budget = EFFORT_BUDGETS[self.reasoning_effort]
        return enable, self.thinking_budget if self.thinking_budget is not None else budget

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    def sampling_overrides(self) -> dict[str, Any]:
        values = super().sampling_overrides()
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins over max_tokens
            values["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            values["logprobs"] = self.top_logprobs or 0
        return values

    def param_name(self, sampling_field: str) -> str:
        """The request field a SamplingParams field came from, for error messages."""
        if sampling_field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        if sampling_field == "logprobs":
            return "top_logprobs"
        return sampling_field


class CompletionRequest(_CommonFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # the legacy endpoint's default, as OpenAI's
    logprobs: int | None = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if value == "" or value == [] or (isinstance(value, list) and any(p in ("", []) for p in value)):
            raise ValueError("prompt is empty")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def sampling_overrides(self) -> dict[str, Any]:
        values = super().sampling_overrides()
        if self.logprobs is not None:
            values["logprobs"] = self.logprobs
        return values

    def param_name(self, sampling_field: str) -> str:
        return sampling_field
