"""qwen3.chat: template rendering against transformers, and the reasoning / tool-call output parsers."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import jinja2
import pytest

from qwen3.chat import (
    Delta,
    ParsedOutput,
    StreamingOutputParser,
    ToolCall,
    builtin_template,
    compile_template,
    parse_output,
    render,
)

SPEC_TEMPLATES = {
    "official": "qwen3_chat_template.jinja",
    "2504": "templates/qwen3_chat_template_2504_original.jinja",
    "thinking2507": "templates/qwen3_thinking_2507_chat_template.jinja",
    "nonthinking": "templates/qwen3_nonthinking_official_asset.jinja",
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — «quoted» and 中文",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Now", "parameters": {}}}


def call(name: str, arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


U = {"role": "user", "content": "What is 2+2?"}
SYS = {"role": "system", "content": "You are a helpful assistant."}
TOOL_TURN = [
    {"role": "user", "content": "Weather in Paris and Tokyo? And the time."},
    {
        "role": "assistant",
        "content": "Let me check.",
        "reasoning_content": "Two cities, one time call.",
        "tool_calls": [
            call("get_weather", {"city": "Paris", "unit": "c"}),
            call("get_weather", '{"city": "Tokyo"}'),
            call("get_time", {}),
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 25, "sky": "晴れ"}'},
    {"role": "tool", "content": "12:00"},
]

# (id, messages, tools, kwargs). kwargs always name add_generation_prompt: its default differs from transformers'.
CASES: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]] = [
    ("single_turn", [U], None, {"add_generation_prompt": True}),
    ("system", [SYS, U], None, {"add_generation_prompt": True}),
    ("thinking_off", [SYS, U], None, {"add_generation_prompt": True, "enable_thinking": False}),
    ("thinking_on_explicit", [U], None, {"add_generation_prompt": True, "enable_thinking": True}),
    (
        "soft_switch_user",
        [{"role": "user", "content": "Count the r's /no_think"}],
        None,
        {"add_generation_prompt": True},
    ),
    (
        "soft_switch_system",
        [{"role": "system", "content": "/think"}, {"role": "user", "content": "hi/no_think"}],
        None,
        {"add_generation_prompt": True},
    ),
    (
        "history_reasoning_dropped",
        [
            U,
            {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4."},
            {"role": "user", "content": "And 3+3?"},
        ],
        None,
        {"add_generation_prompt": True},
    ),
    (
        "history_inline_think_dropped",
        [
            SYS,
            U,
            {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
            {"role": "user", "content": "Sure? /think"},
        ],
        None,
        {"add_generation_prompt": True},
    ),
    (
        "final_assistant_no_prompt",
        [U, {"role": "assistant", "content": "4"}],
        None,
        {"add_generation_prompt": False},
    ),
    (
        "final_assistant_with_reasoning",
        [U, {"role": "assistant", "content": "\n\n4", "reasoning_content": "\nsimple\n"}],
        None,
        {"add_generation_prompt": False},
    ),
    ("tools_offered", [U], [WEATHER, TIME], {"add_generation_prompt": True}),
    ("tools_with_system", [SYS, U], [WEATHER], {"add_generation_prompt": True, "enable_thinking": False}),
    ("tool_calls_and_responses", TOOL_TURN, [WEATHER, TIME], {"add_generation_prompt": True}),
    (
        "multi_step_tool_turn",
        [
            *TOOL_TURN,
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Need more.",
                "tool_calls": [call("get_time", {})],
            },
            {"role": "tool", "content": "12:01"},
            {"role": "assistant", "content": "Paris 21°C, Tokyo 25°C, 12:01.", "reasoning_content": "Done."},
        ],
        [WEATHER, TIME],
        {"add_generation_prompt": False},
    ),
    (
        "tool_call_without_content",
        [
            U,
            {"role": "assistant", "content": None, "tool_calls": [call("get_time", "{}")]},
            {"role": "tool", "content": "x"},
        ],
        [TIME],
        {"add_generation_prompt": True},
    ),
    (
        "tool_response_written_by_user",
        [
            U,
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "<tool_response>\n1\n</tool_response>"},
        ],
        None,
        {"add_generation_prompt": True},
    ),
    (
        "later_system_message",
        [
            SYS,
            U,
            {"role": "assistant", "content": "4"},
            {"role": "system", "content": "Now answer in French."},
            U,
        ],
        None,
        {"add_generation_prompt": True},
    ),
    (
        "unicode",
        [
            {"role": "system", "content": "Réponds en français 🇫🇷"},
            {"role": "user", "content": "你好！こんにちは 👋🏽 مرحبا\n\ttabs  and  spaces"},
            {"role": "assistant", "content": "Salut ! 😀", "reasoning_content": "用户在打招呼。"},
            {"role": "user", "content": "e\u0301"},
        ],
        None,
        {"add_generation_prompt": True},
    ),
    (
        "reasoning_alias_field",
        [U, {"role": "assistant", "content": "4", "reasoning": "plain"}],
        None,
        {"add_generation_prompt": False},
    ),
]


@pytest.fixture(scope="module")
def hf_tok():
    """A vocabulary-free transformers tokenizer: enough for apply_chat_template(tokenize=False)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))


@pytest.fixture(scope="module", params=["builtin", *SPEC_TEMPLATES])
def template(request: pytest.FixtureRequest) -> str:
    if request.param == "builtin":
        return builtin_template()
    spec_dir = request.getfixturevalue("spec_dir")
    return (spec_dir / SPEC_TEMPLATES[request.param]).read_text(encoding="utf-8")


def _hf_render(hf_tok, messages, tools, template, **kwargs) -> str:
    return hf_tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.parametrize(("messages", "tools", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_render_matches_transformers(hf_tok, template: str, messages, tools, kwargs) -> None:
    snapshot = json.dumps(messages)
    try:
        expected = _hf_render(hf_tok, messages, tools, template, **kwargs)
    except jinja2.exceptions.UndefinedError:
        # The April-2025 template reads message.content unguarded: transformers fails there, and so must we.
        with pytest.raises(jinja2.exceptions.UndefinedError):
            render(messages, tools=tools, template=template, **kwargs)
        return
    assert render(messages, tools=tools, template=template, **kwargs) == expected
    assert json.dumps(messages) == snapshot  # the caller's messages are not modified


def test_builtin_template_is_the_official_one(spec_dir: Path) -> None:
    assert builtin_template() == (spec_dir / "qwen3_chat_template.jinja").read_text(encoding="utf-8")


def test_render_known_strings() -> None:
    """The facts of hybrid_thinking.md (a), (c), (h), independently of transformers."""
    assert render([U]) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert render([U], enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render(hello, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"
    )
    again = render([*hello, {"role": "user", "content": "Again"}])
    assert "<|im_start|>assistant\nHello<|im_end|>\n" in again and "<think>" not in again
    text = render(TOOL_TURN, tools=[WEATHER])
    assert '"description": "Current weather in a city — «quoted» and 中文"' in text  # tojson: no \u escapes
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n<tool_response>' in text


def test_continue_final_message_matches_transformers(hf_tok) -> None:
    """The thinking-budget path: re-open the assistant's cut-off thinking and let the model go on."""
    messages = [
        U,
        {
            "role": "assistant",
            "content": "<think>\nLet me add.\n\nConsidering the limited time.\n</think>\n\n",
        },
    ]
    ours = render(messages, add_generation_prompt=False, continue_final_message=True)
    assert ours == _hf_render(hf_tok, messages, None, builtin_template(), continue_final_message=True)
    assert ours.endswith(
        "<|im_start|>assistant\n<think>\nLet me add.\n\nConsidering the limited time.\n</think>\n\n"
    )
    partial = [U, {"role": "assistant", "content": "The answer is"}]
    ours = render(partial, add_generation_prompt=False, continue_final_message=True)
    assert ours == _hf_render(hf_tok, partial, None, builtin_template(), continue_final_message=True)
    assert ours.endswith("The answer is")
    with pytest.raises(ValueError, match="add_generation_prompt"):
        render(partial, continue_final_message=True)


def test_tool_call_objects_render_like_dicts() -> None:
    tc = ToolCall("get_time", "{}", id="call_1")
    as_dict = render(
        [U, {"role": "assistant", "content": "", "tool_calls": [tc.to_openai()]}], add_generation_prompt=False
    )
    assert (
        render([U, {"role": "assistant", "content": "", "tool_calls": [tc]}], add_generation_prompt=False)
        == as_dict
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty"),
        ("hello", "non-empty"),
        (["hi"], r"messages\[0\] is a str"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\] has role 'bot'"),
        ([{"content": "x"}], "has role None"),
        ([U, {"role": "assistant"}], r"messages\[1\] \(assistant\) has no content"),
        ([{"role": "user", "content": None}], "has no content"),
        ([{"role": "tool"}], r"\(tool\) has no content"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "must be a string"),
        (
            [U, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}],
            "no function name",
        ),
    ],
)
def test_render_rejects_invalid_messages(messages, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render(messages)


def test_template_helpers() -> None:
    assert compile_template("x") is compile_template("x")  # compiled once
    assert render([U], template="{{ strftime_now('%Y') }}").isdigit()
    assert render([U], template="{{ {'a': 'é'} | tojson(indent=2) }}") == '{\n  "a": "é"\n}'
    assert (
        render([U], template="{% for m in messages %}{{ m.role }}{% break %}{% endfor %}") == "user"
    )  # loopcontrols
    with pytest.raises(jinja2.exceptions.TemplateError, match="nope"):
        render([U], template="{{ raise_exception('nope') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render([U], template="{% set ns = namespace(_x=1) %}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render([U], template="{{ messages.__class__ }}{{ ''.__class__.__mro__ }}")


# ------------------------------------------------------------------------------------------ parsing

WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'

# (text, reasoning_started, reasoning, content, [(name, arguments)])
CUT_WEATHER_CALL = WEATHER_CALL.removesuffix("</tool_call>")  # max_tokens ended it before the closing tag
PARSE_CASES: list[tuple[str, bool | None, str | None, str, list[tuple[str, str]]]] = [
    ("Hello!", False, None, "Hello!", []),
    ("", False, None, "", []),
    ("  \n", False, None, "  \n", []),
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", False, "Let me think.", "The answer is 4.", []),
    ("<think>\n\n</think>\n\nNo thinking.", False, "", "No thinking.", []),
    ("\n <think>\nx\n\n\n</think>\n\n\n\ny\n", False, "x", "y\n", []),
    ("<think>\nstep 1\n\nstep 2\n</think>answer", False, "step 1\n\nstep 2", "answer", []),
    ("<think>\ncut off by the bud", False, "cut off by the bud", "", []),
    ("<think>\ncut off\n\n", False, "cut off", "", []),
    ("<think>", False, "", "", []),
    ("still thinking\n</think>\n\nDone.", True, "still thinking", "Done.", []),
    ("thinking never ends", True, "thinking never ends", "", []),
    ("\nthinking\n", True, "thinking", "", []),
    (
        "Answer first <think>not reasoning</think>",
        False,
        None,
        "Answer first <think>not reasoning</think>",
        [],
    ),
    ("<think>\na\n</think>\n\nb <think>c</think> d", False, "a", "b <think>c</think> d", []),
    ("<thinking>no</thinking>", False, None, "<thinking>no</thinking>", []),
    (WEATHER_CALL, False, None, "", [("get_weather", '{"city": "Paris"}')]),
    (
        "<think>\nNeed weather.\n</think>\n\nLet me check.  \n" + WEATHER_CALL + "\n" + TIME_CALL + "\n",
        False,
        "Need weather.",
        "Let me check.",
        [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
    ),
    (
        "<think>\n\n</think>\n\n" + WEATHER_CALL + "\nAfter the call.\n",
        False,
        "",
        "\nAfter the call.",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
        False,
        None,
        "",
        [("f", '{"a": 1}')],
    ),
    ('<tool_call>{"name": "f"}</tool_call>', False, None, "", [("f", "{}")]),
    (
        '<tool_call>\n{"name": "f", "arguments": {"q": "中文"}}\n</tool_call>',
        False,
        None,
        "",
        [("f", '{"q": "中文"}')],
    ),
    (
        "Text\n<tool_call>\nnot json\n</tool_call>",
        False,
        None,
        "Text\n<tool_call>\nnot json\n</tool_call>",
        [],
    ),
    (
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        False,
        None,
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        [],
    ),
    (
        "A \n<tool_call>[1]</tool_call> \n" + TIME_CALL + "  ",
        False,
        None,
        "A \n<tool_call>[1]</tool_call>",
        [("get_time", "{}")],
    ),
    ("Cut: " + WEATHER_CALL[:30], False, None, "Cut: " + WEATHER_CALL[:30], []),
    (
        "Example:\n```xml\n" + WEATHER_CALL + "\n```\nDone.",
        False,
        None,
        "Example:\n```xml\n" + WEATHER_CALL + "\n```\nDone.",
        [],
    ),
    (
        "```\n<think>x</think>\n```\n  ```py\n" + TIME_CALL + "\n  ```\n" + TIME_CALL,
        False,
        None,
        "```\n<think>x</think>\n```\n  ```py\n" + TIME_CALL + "\n  ```",
        [("get_time", "{}")],
    ),
    (
        "inline ``` is not a fence " + TIME_CALL,
        False,
        None,
        "inline ``` is not a fence",
        [("get_time", "{}")],
    ),
    ("<think>\n```\n</think>\n\n" + TIME_CALL, False, "```", "", [("get_time", "{}")]),
    ("a < b and c <tool d", False, None, "a < b and c <tool d", []),
    ("``\n`", False, None, "``\n`", []),
    # The prompt opened <think> and nobody said so: a </think> with no <think> before it ends reasoning.
    ("I think so\n</think>\n\nYes.", None, "I think so", "Yes.", []),
    ("\n</think>\n\n" + TIME_CALL, None, "", "", [("get_time", "{}")]),
    ("Plain answer.", None, None, "Plain answer.", []),
    ("Answer <think>x</think> y", None, None, "Answer <think>x</think> y", []),
    ("I think so\n</think>\n\nYes.", False, None, "I think so\n</think>\n\nYes.", []),  # said: not opened
    # A call cut by max_tokens whose JSON is complete is a call; an incomplete one stays text.
    (CUT_WEATHER_CALL, False, None, "", [("get_weather", '{"city": "Paris"}')]),
    (
        "<think>\nok\n</think>\n\nSure. " + CUT_WEATHER_CALL,
        False,
        "ok",
        "Sure.",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (CUT_WEATHER_CALL[:-3], False, None, CUT_WEATHER_CALL[:-3], []),
    # A call written inside thinking that never closes is a call, the text around it reasoning.
    (
        "<think>\nI will check.\n" + WEATHER_CALL,
        False,
        "I will check.",
        "",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "Let me check " + WEATHER_CALL + "\n",
        True,
        "Let me check ",
        "",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "<think>\n" + WEATHER_CALL + "\nthen " + CUT_WEATHER_CALL.replace("Paris", "Rome"),
        False,
        "then ",
        "",
        [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')],
    ),  # fmt: skip
    (
        "<think>\nmention <tool_call>not json</tool_call> only",
        False,
        "mention <tool_call>not json</tool_call> only",
        "",
        [],
    ),
    # ...but inside thinking that closes, call text is reasoning.
    (
        "<think>\nmaybe " + WEATHER_CALL + "\n</think>\n\nNo call.",
        False,
        "maybe " + WEATHER_CALL,
        "No call.",
        [],
    ),
]
PARSE_IDS = [f"parse{i}" for i in range(len(PARSE_CASES))]


@pytest.mark.parametrize(("text", "started", "reasoning", "content", "calls"), PARSE_CASES, ids=PARSE_IDS)
def test_parse_output(text: str, started: bool, reasoning, content: str, calls) -> None:
    parsed = parse_output(text, reasoning_started=started)
    assert isinstance(parsed, ParsedOutput)
    r, c, tool_calls = parsed
    assert (r, c) == (reasoning, content)
    assert [(t.name, t.arguments) for t in tool_calls] == calls
    assert all(t.id.startswith("call_") for t in tool_calls)
    assert len({t.id for t in tool_calls}) == len(tool_calls)
    for t in tool_calls:
        json.loads(t.arguments)  # always a JSON string


def test_malformed_tool_call_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qwen3.chat"):
        _, content, calls = parse_output("<tool_call>\n{broken\n</tool_call>")
    assert calls == [] and content == "<tool_call>\n{broken\n</tool_call>"
    assert "malformed tool call" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwen3.chat"):
        parser = StreamingOutputParser()
        deltas = parser.feed("<tool_call>\n{broken") + parser.finish()
    assert deltas == [Delta("content", "<tool_call>\n{broken")]
    assert "unclosed tool call" in caplog.text


def _collect(deltas: list[Delta]) -> tuple[str, str, list[tuple[int | None, str | None, str | None]]]:
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    content = "".join(d.text for d in deltas if d.kind == "content")
    calls = [(d.index, d.name, d.arguments) for d in deltas if d.kind == "tool_call"]
    assert all(d.text for d in deltas if d.kind != "tool_call")  # no empty text deltas
    return reasoning, content, calls


def _stream(
    chunks: list[str], started: bool | None
) -> tuple[str, str, list[tuple[int | None, str | None, str | None]]]:
    parser = StreamingOutputParser(reasoning_started=started)
    deltas: list[Delta] = []
    for chunk in chunks:
        deltas += parser.feed(chunk)
    return _collect(deltas + parser.finish())


def _expected(
    text: str, started: bool | None
) -> tuple[str, str, list[tuple[int | None, str | None, str | None]]]:
    reasoning, content, calls = parse_output(text, reasoning_started=started)
    return reasoning or "", content, [(i, t.name, t.arguments) for i, t in enumerate(calls)]


EXTRA_STREAM_TEXTS = [
    "<think>\nI should call the tool.\n</think>\n\n" + WEATHER_CALL,
    "<think>\n" + "</thin" * 3 + "\n</think>\n\n" + "<tool_cal" * 2 + "\n" + TIME_CALL,
    "\n\n<thi\n",
    "<think>\n\n\n",
    "<t",
    "x\n```\n   ``\n`` ```\n" + TIME_CALL + "\n```\n" + TIME_CALL + " tail \n",
    "line\n\t```\n" + TIME_CALL + "\n\t```\n\n \n" + TIME_CALL + "\n\n",
    "<think>\n思考中……🤔\n</think>\n\n答案是 4。\n\n" + WEATHER_CALL.replace("Paris", "巴黎"),
    "<think>\n\n" + TIME_CALL + "\n\nmore\n" + CUT_WEATHER_CALL,
    "<think>\nx <tool_c" + "</think>\n\ny",
    "pre\n</think>\n\n<think>post",
    "<think>\n" + TIME_CALL + "\n</think>\n\n" + CUT_WEATHER_CALL,
]


@pytest.mark.parametrize("started", [False, True, None])
def test_streaming_parser_equals_parse_output_at_every_split(started: bool | None) -> None:
    texts = [case[0] for case in PARSE_CASES] + EXTRA_STREAM_TEXTS
    for text in texts:
        expected = _expected(text, started)
        assert _stream([text], started) == expected, text
        assert _stream(list(text), started) == expected, text  # one character at a time
        for i in range(len(text) + 1):
            assert _stream([text[:i], text[i:]], started) == expected, (text, i)


def test_streaming_parser_random_chunkings() -> None:
    rng = random.Random(1234)
    pieces = [
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "\n",
        "\n\n",
        " ",
        "```",
        "`",
        "<",
        "</",
        "x",
        "reason",
        "中",
        WEATHER_CALL,
        TIME_CALL,
        '{"name": "f", "arguments": {}}',
        "{bad",
        "\t",
    ]
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        started = rng.choice([False, False, True, None])
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _stream(chunks, started) == _expected(text, started), (text, cuts, started)


def test_streaming_parser_emits_early() -> None:
    """Held-back text is only what could still be a tag: ordinary text streams through at once."""
    parser = StreamingOutputParser()
    assert parser.feed("<thi") == []
    assert parser.feed("nk>\nStep one") == [Delta("reasoning", "Step one")]
    assert parser.feed("\n</thi") == []
    assert parser.feed("nk>\n\nHi") == [Delta("content", "Hi")]
    assert parser.feed(" there <tool") == [Delta("content", " there")]
    assert parser.feed('_call>\n{"name": "get_time",') == []
    [delta] = parser.feed(' "arguments": {}}\n</tool_call>')
    assert (delta.kind, delta.index, delta.name, delta.arguments) == ("tool_call", 0, "get_time", "{}")
    assert delta.id and delta.id.startswith("call_")
    assert parser.finish() == []
