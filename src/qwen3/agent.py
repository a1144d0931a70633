"""A small tool-calling agent loop: the model asks for calls, Python runs them, the model answers.

Qwen3 calls tools Hermes-style (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, see
../shared/spec/hybrid_thinking.md (h)); :meth:`qwen3.LLM.chat` already parses the calls. The loop here
executes them with the user's own functions, appends the results as ``tool`` messages and asks again,
until the model answers without a call. Many conversations run side by side, so a whole evaluation set
is one batched loop through the engine. Calls are strict by default: every call the model starts is held
to a known tool's name and its parameters' schema (:func:`qwen3.structured.tool_call_grammar`), so a
call always parses and names a real function.

    def add(a: int, b: int) -> int:
        "Add two integers."
        return a + b

    agent = Agent(llm, [add, calculator])
    print(agent.run("What is 2 + 3?").content)
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen3.llm import LLM
from qwen3.sampling import SamplingParams
from qwen3.structured import tool_call_grammar

logger = logging.getLogger(__name__)

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass
class Tool:
    """A Python function the model may call, with the OpenAI function schema the chat template shows."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]

    @classmethod
    def from_function(cls, function: Callable[..., Any]) -> Tool:
        """Schema from the signature (type hints give JSON types) and the docstring's first line."""
        properties, required = {}, []
        hints = inspect.get_annotations(function, eval_str=True)
        for name, param in inspect.signature(function).parameters.items():
            properties[name] = {"type": _JSON_TYPES.get(hints.get(name), "string")}
            if param.default is inspect.Parameter.empty:
                required.append(name)
        doc = inspect.getdoc(function) or function.__name__
        schema = {"type": "object", "properties": properties, "required": required}
        return cls(function.__name__, doc.splitlines()[0], schema, function)

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def call(self, arguments: str) -> str:
        """Run with the model's JSON arguments; errors become the tool's reply, so the model can react."""
        try:
            args = json.loads(arguments) if arguments else {}
            if not isinstance(args, dict):
                raise TypeError("arguments must be a JSON object")
            result = self.function(**args)
        except Exception as exc:  # the model sees what went wrong, the loop goes on
            return f"Error: {exc}"
        return result if isinstance(result, str) else json.dumps(result)


# --- the calculator the tiny model is trained with ------------------------------------------------------

_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def evaluate_arithmetic(expression: str) -> int | float:
    """The value of an arithmetic expression, parsed with :mod:`ast` (numbers and + - * / // % ** only,
    never ``eval``): the model's arguments are untrusted text."""

    def visit(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return visit(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = visit(node.left), visit(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](visit(node.operand))
        raise ValueError(f"not an arithmetic expression: {expression!r}")

    return visit(ast.parse(expression.replace("×", "*").replace("^", "**"), mode="eval"))


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression"""
    value = evaluate_arithmetic(expression)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


CALCULATOR = Tool.from_function(calculator)


# --- the loop -----------------------------------------------------------------------------------------


@dataclass
class AgentResult:
    """How a conversation ended: the final answer, every call made, and the whole exchange."""

    content: str
    reasoning: str | None
    messages: list[dict[str, Any]]
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (name, arguments, result)
    finish_reason: str | None = None


class Agent:
    """Runs conversations with tools to completion (at most ``max_rounds`` model turns each)."""

    def __init__(
        self,
        llm: LLM,
        tools: Sequence[Tool | Callable[..., Any]],
        sampling: SamplingParams | None = None,
        enable_thinking: bool = True,
        max_rounds: int = 4,
        strict: bool = True,
    ) -> None:
        self.llm = llm
        self.tools = {t.name: t for t in (t if isinstance(t, Tool) else Tool.from_function(t) for t in tools)}
        self.sampling = sampling
        self.enable_thinking = enable_thinking
        self.max_rounds = max_rounds
        self.strict = strict
        schemas = [t.schema() for t in self.tools.values()]
        self._calls = tool_call_grammar(schemas, "auto") if strict and schemas else None

    def _params(self, messages: Sequence[Mapping[str, Any]]) -> SamplingParams | None:
        """This round's sampling for one conversation: the caller's (or Qwen3's recommended for the mode),
        held to valid calls when strict."""
        if self._calls is None:
            return self.sampling
        params = self.sampling or self.llm.recommended_sampling(messages, self.enable_thinking)
        return (
            params
            if params.structured_outputs is not None
            else params.replace(structured_outputs=self._calls)
        )

    def run(self, conversation: str | Sequence[Mapping[str, Any]]) -> AgentResult:
        return self.run_batch([conversation])[0]

    def run_batch(self, conversations: Sequence[str | Sequence[Mapping[str, Any]]]) -> list[AgentResult]:
        """All conversations advance together: one batched ``LLM.chat`` per round."""
        states = [
            AgentResult(
                "", None, [{"role": "user", "content": c}] if isinstance(c, str) else [dict(m) for m in c]
            )
            for c in conversations
        ]
        active = list(range(len(states)))
        schemas = [t.schema() for t in self.tools.values()]
        for _ in range(self.max_rounds):
            if not active:
                break
            conversations = [states[i].messages for i in active]
            outputs = self.llm.chat(
                conversations, [self._params(m) for m in conversations], enable_thinking=self.enable_thinking,
                tools=schemas,
            )  # fmt: skip
            still = []
            for i, out in zip(active, outputs, strict=True):
                state = states[i]
                state.content, state.reasoning, state.finish_reason = (
                    out.content,
                    out.reasoning,
                    out.finish_reason,
                )
                reply: dict[str, Any] = {"role": "assistant", "content": out.content}
                reply["reasoning_content"] = out.reasoning or ""
                if out.tool_calls:
                    reply["tool_calls"] = [c.to_openai() for c in out.tool_calls]
                state.messages.append(reply)
                if not out.tool_calls:
                    continue
                for call in out.tool_calls:
                    tool = self.tools.get(call.name)
                    result = tool.call(call.arguments) if tool else f"Error: no tool named {call.name!r}"
                    state.calls.append((call.name, call.arguments, result))
                    state.messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
                still.append(i)
            active = still
        for i in active:
            logger.warning("conversation %d still calling tools after %d rounds", i, self.max_rounds)
        return states
