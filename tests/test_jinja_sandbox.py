"""qwen3.jinja_sandbox: runaway chat templates stop with a clear error, fast; honest ones render unchanged."""

from __future__ import annotations

import time

import jinja2
import pytest

from qwen3.chat import builtin_template, check_template_variables, render
from qwen3.jinja_sandbox import RenderLimits, TemplateLimitError, render_template, template_globals

U = [{"role": "user", "content": "hi"}]
FAST = RenderLimits(seconds=0.5)

RUNAWAY = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "nested output": "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    "loops over messages": "{% for a in range(100000) %}{% for m in messages %}{% for c in m.content %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "string repeat": "{{ 'x' * 1000000000 }}",
    "list repeat": "{{ [1, 2] * 1000000000 }}",
    "huge power": "{{ 9 ** 99999999 }}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "center filter": "{{ 'x'|center(1000000000) }}",
    "indent filter": "{{ 'a\nb'|indent(1000000000) }}",
    "batch filter": "{{ [1]|batch(1000000000, 'x')|list }}",
    "ljust method": "{{ 'x'.ljust(1000000000) }}",
    "format width": "{{ '{:>1000000000}'.format(1) }}",
    "format width argument": "{{ '{:>{w}}'.format(1, w=1000000000) }}",
    "percent width": "{{ '%1000000000d' % 1 }}",
    "format filter width": "{{ '%1000000000d'|format(1) }}",
    "macro recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "output flood": "{% for a in range(100000) %}{% for b in range(1000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
    # found in review: operations that build far more than they are given, and the sum of many values
    "replace with empty": "{% set s = 'x' * 40000 %}{{ s.replace('', s) }}",
    "join a long list": "{% set s = 'x' * 40000 %}{{ s.join([s] * 15000) }}",
    "join filter": "{% set s = 'x' * 40000 %}{{ ([s] * 15000)|join(s) }}",
    "indent a long text": "{% set s = 'a\n' * 100000 %}{{ s|indent(15000, true, true) }}",
    "many format fields": "{{ ('{0:99999}' * 20000).format('a') }}",
    "doubling in a macro": "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}"
    "{% endmacro %}{{ d('x', 40) }}",
    "many values under the limit": "{% set ns = namespace(all=[]) %}{% for i in range(100000) %}"
    "{% set ns.all = ns.all + ['x'.center(100000)] %}{% endfor %}",
    "map center": "{{ range(100000)|map('string')|map('center', 100000)|list|length }}",
    "recursive loop": "{% for n in tree recursive %}{{ loop(n.children) }}{% endfor %}",
}


WIDE_TREE = [{"children": [{"children": []} for _ in range(200)]} for _ in range(3000)]  # 600k nodes


@pytest.mark.parametrize("template", RUNAWAY.values(), ids=RUNAWAY.keys())
def test_runaway_templates_stop_with_a_clear_error(template: str) -> None:
    start = time.perf_counter()
    with pytest.raises(TemplateLimitError, match="chat template"):
        render(U, template=template, limits=FAST, tree=WIDE_TREE)
    assert time.perf_counter() - start < FAST.seconds + 2.0


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ 'ts=%d' % 1700000000 }}", "ts=1700000000"),
        ("{{ '{} tokens'.format(131072) }}", "131072 tokens"),
        ("{{ '%s'|format(1700000000) }}", "1700000000"),
        ("{{ 'Knowledge cutoff 20240601. %s' % 'x' }}", "Knowledge cutoff 20240601. x"),
        ("{{ 'Time: 1700000000 {}'.format(1) }}", "Time: 1700000000 1"),
        ("{{ '%5.2f|%-8s|' % (3.14159, 'ab') }}", " 3.14|ab      |"),
        ("{{ 'a,b'.replace(',', ', ') }}{{ ['x', 'y']|join('-') }}{{ 'ab'.center(6) }}", "a, bx-y  ab  "),
    ],
)
def test_honest_templates_are_not_refused(template: str, expected: str) -> None:
    assert render(U, template=template) == expected


def test_output_and_value_sizes_follow_the_limit() -> None:
    small = RenderLimits(max_chars=1000)
    assert len(render(U, template="{{ 'x' * 1000 }}", limits=small)) == 1000
    with pytest.raises(TemplateLimitError, match="1000"):
        render(U, template="{{ 'x' * 1001 }}", limits=small)
    with pytest.raises(TemplateLimitError, match="output exceeds 1000"):
        render(U, template="{% for i in range(300) %}abcd{% endfor %}", limits=small)


def test_template_bugs_are_template_errors() -> None:
    for template in ("{{ 1 / 0 }}", "{{ messages[5].role.x }}", "{{ 'a' + 1 }}"):
        with pytest.raises(jinja2.TemplateError):
            render(U, template=template)


def test_loop_semantics_survive_the_guard() -> None:
    """The guard wraps each loop's iterable; loop.length, loop.last, filters, else and recursion still work."""
    template = (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }} {% endfor %}"
        "{% for x in [3, 1, 2]|sort if x > 1 %}{{ x }}{% else %}none{% endfor %}"
        "{% for x in [] %}{{ x }}{% else %}-empty{% endfor %}"
        "{% for k, v in {'a': 1}.items() %} {{ k }}={{ v }}{% endfor %}"
        "{% for node in tree recursive %}[{{ node.name }}{{ loop(node.children) }}]{% endfor %}"
    )
    tree = [{"name": "a", "children": [{"name": "b", "children": []}]}]
    out = render([*U, *U], template=template, tree=tree)
    assert out == "1/2 2/2! 23-empty a=1[a[b]]"


def test_the_builtin_template_renders_within_default_limits_without_the_guard_changing_it() -> None:
    messages = [{"role": "user", "content": "q" * 10000}, {"role": "assistant", "content": "a"}, *U]
    unguarded = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    ).from_string(builtin_template())
    expected = unguarded.render(messages=messages, tools=None, add_generation_prompt=True)
    assert render(messages, enable_thinking=True) == expected


def test_limits_apply_per_render_and_unbounded_outside() -> None:
    slow = "{% for a in range(3000) %}{% for b in range(300) %}{% endfor %}{% endfor %}"  # ~1M iterations
    with pytest.raises(TemplateLimitError):
        render_template(slow, RenderLimits(seconds=0.01))
    assert render_template(slow, RenderLimits(seconds=60)) == ""  # the same compiled template, a new budget


def test_template_variables_may_not_shadow_globals_or_render_parameters() -> None:
    assert {"range", "namespace", "raise_exception", "strftime_now"} <= template_globals()
    assert "lipsum" not in template_globals()
    for name in ("messages", "tools", "template", "limits", "range", "namespace", "_secret", "not-a-name", 3):
        with pytest.raises(ValueError, match="template variable"):
            check_template_variables([name])
    check_template_variables(["custom_instructions", "eos_token"])
    with pytest.raises(ValueError, match="'range'"):
        render(U, range=5)
