"""The agent loop: tools from Python functions, a calculator that never evaluates code, and a real
round trip with the shipped tiny model."""

from __future__ import annotations

import json

import pytest

from qwen3.agent import CALCULATOR, Agent, Tool, calculator, evaluate_arithmetic
from qwen3.sampling import SamplingParams


def test_tool_schema_from_a_python_function() -> None:
    def convert(amount: float, currency: str, rounded: bool = False) -> dict:
        """Convert an amount of money.

        Longer description that is not part of the schema."""
        return {"amount": amount * 2, "currency": currency, "rounded": rounded}

    tool = Tool.from_function(convert)
    assert tool.schema() == {
        "type": "function",
        "function": {
            "name": "convert",
            "description": "Convert an amount of money.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "currency": {"type": "string"},
                    "rounded": {"type": "boolean"},
                },
                "required": ["amount", "currency"],
            },
        },
    }
    assert json.loads(tool.call('{"amount": 2, "currency": "EUR"}')) == {
        "amount": 4,
        "currency": "EUR",
        "rounded": False,
    }
    assert tool.call("not json").startswith("Error:")  # the model sees the error; nothing raises
    assert tool.call('{"amount": 1}').startswith("Error:")
    assert tool.call("[1, 2]").startswith("Error:")


def test_calculator_schema_is_the_one_the_model_was_trained_with() -> None:
    from qwen3.train.data import CALCULATOR_TOOL

    assert CALCULATOR.schema() == CALCULATOR_TOOL


@pytest.mark.parametrize(
    ("expression", "value"),
    [("347 * 589", "204383"), ("(3 + 4) * 5", "35"), ("2 - 10", "-8"), ("7 / 2", "3.5"), ("8 / 2", "4"),
     ("2 ** 10", "1024"), ("-3 + 1", "-2"), ("6 × 7", "42")],
)  # fmt: skip
def test_calculator_values(expression: str, value: str) -> None:
    assert calculator(expression) == value


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "open('/etc/passwd')", "x + 1", "(1).__class__", "[1, 2]", "'a' * 3",
     "2 ** 1000000", "lambda: 1"],
)  # fmt: skip
def test_calculator_refuses_anything_but_arithmetic(expression: str) -> None:
    with pytest.raises((ValueError, SyntaxError)):
        evaluate_arithmetic(expression)
    assert CALCULATOR.call(json.dumps({"expression": expression})).startswith("Error:")


def test_agent_round_trip_with_the_shipped_model(default_llm) -> None:
    """Numbers of the sizes the tiny model was trained on (it copies them into the call)."""
    agent = Agent(default_llm, [calculator], sampling=SamplingParams(temperature=0, max_tokens=256))
    results = agent.run_batch(["What is 347 * 58?", "Compute 4821 - 937.", "How many r's are in strawberry?"])
    mul, sub, count = results
    assert mul.calls == [("calculator", json.dumps({"expression": "347 * 58"}), "20126")]
    assert "20126" in mul.content and mul.finish_reason == "stop"
    assert [m["role"] for m in mul.messages] == ["user", "assistant", "tool", "assistant"]
    assert sub.calls and sub.calls[0][2] == "3884" and "3884" in sub.content
    assert count.calls == [] and count.content.rstrip(".").endswith("strawberry")  # no tool needed


def test_strict_calls_name_a_real_tool(default_llm) -> None:
    """The shipped model was trained on a tool named "calculator"; offered the same function as "calc",
    it still writes "calculator" unless its calls are strict, which holds them to the tools that exist."""
    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string", "pattern": "^[0-9+*/() -]{1,30}$"}},
        "required": ["expression"],
    }
    calc = Tool("calc", "Evaluate an arithmetic expression", parameters, calculator)
    greedy = SamplingParams(temperature=0, max_tokens=256)
    strict = Agent(default_llm, [calc], sampling=greedy).run("Compute 4821 - 937.")
    assert strict.calls == [("calc", json.dumps({"expression": "4821 - 937"}), "3884")]
    assert "3884" in strict.content
    loose = Agent(default_llm, [calc], sampling=greedy, strict=False, max_rounds=1).run("Compute 4821 - 937.")
    assert loose.calls and loose.calls[0][0] == "calculator" and loose.calls[0][2].startswith("Error")
