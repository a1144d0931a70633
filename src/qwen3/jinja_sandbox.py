"""The jinja2 sandbox chat templates run in: transformers' environment, with bounds on time and size.

A chat template is code from a checkpoint (or an operator's ``--chat-template``), and it runs on every
request with the client's messages as input. The environment is the one transformers uses (an
``ImmutableSandboxedEnvironment`` with loop controls, its ``tojson``, ``raise_exception``,
``strftime_now`` and a ``namespace`` that refuses underscore attributes), so a well-behaved template renders
byte for byte as ``apply_chat_template`` does. On top of jinja's own limits (no unsafe attributes,
``range`` capped at 100,000 items), every render gets a :class:`RenderLimits` budget:

- time: every loop iteration, call, filter and output chunk checks the deadline, so nested loops stop;
- size: the output and every string or list a template builds (``*``, ``+``, ``~``, ``%``, filters,
  method calls, namespace attributes) are bounded, each one and all together; the operations that can build
  far more than they are given (``replace``, ``join``, ``center``, ``indent``, ``format``, a repeat, ...)
  are refused before they run when the size they would build is over the limit;
- recursion and memory exhaustion inside a template become the same clear error.

A template that breaks a limit raises :class:`TemplateLimitError` naming the limit; nothing else changes.
The loop and concatenation checks are added by rewriting the parsed template: each ``{% for %}`` iterates
through the extension's guard and each ``~`` calls it (``nodes.ExtensionAttribute``, a name templates
themselves cannot reach or rebind); a recursive loop's ``loop(children)`` is guarded at the call.
"""

from __future__ import annotations

import contextvars
import json
import math
import re
import string
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["RenderLimits", "TemplateLimitError", "compile_template", "render_template", "template_globals"]


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render: wall time, and characters of output (and of any value the template builds)."""

    seconds: float = 5.0
    max_chars: int = 16 * 2**20  # the output, and any one value; all values built together: 16x this


class TemplateLimitError(jinja2.exceptions.TemplateError):
    """A chat template ran past a :class:`RenderLimits` bound (too long, too large, too deep)."""


class _Budget:
    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.built = 0  # characters (items) of every value checked so far: bounds the work, not just peaks

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the chat template ran longer than {self.limits.seconds:g} s")

    def expect(self, size: int, what: str) -> None:
        """Refuse, before it is built, a value predicted to be larger than the limit."""
        if size > self.limits.max_chars:
            raise TemplateLimitError(
                f"the chat template would build {what} of {size} items (limit {self.limits.max_chars})"
            )

    def size(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, list, tuple, dict)):
            self.expect(len(value), what)
            self.built += len(value)
            if self.built > 16 * self.limits.max_chars:
                raise TemplateLimitError(
                    f"the chat template built more than {16 * self.limits.max_chars} items in all"
                )
        return value


def _text_size(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(str(value)) if isinstance(value, (int, float)) else 0


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\d+)?(?:\.(\d+))?[diouxXeEfFgGcrsa]")


def _format_size(template: str, args: Iterable[Any], percent: bool = False) -> int:
    """An upper bound on the length of ``template.format(*args)`` (or ``template % args``): the text,
    every argument, and every width and precision its fields ask for."""
    widths = 0
    if percent:
        for width, precision in _PERCENT_FIELD.findall(template):
            widths += int(width or 0) + int(precision or 0)
    else:
        try:
            fields = list(string.Formatter().parse(template))
        except ValueError:
            fields = []  # str.format will raise the same error itself
        args = list(args)
        largest = max((a for a in args if isinstance(a, int) and not isinstance(a, bool)), default=0)
        for _literal, _name, spec, _conversion in fields:
            widths += sum(int(d) for d in re.findall(r"\d+", spec or ""))
            if spec and "{" in spec:  # a width given as an argument: {:>{w}}
                widths += abs(largest)
    return len(template) + widths + sum(_text_size(a) for a in args)


def _predicted_size(name: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The size of what a string method or filter named ``name`` will build from ``target``, for the few
    that can build far more than they are given; None for the rest (checked after they run)."""
    if not isinstance(target, str):
        return None
    values = [*args, *kwargs.values()]
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    if name == "replace" and args and isinstance(args[0], str) and len(args) > 1 and isinstance(args[1], str):
        old, new = args[0], args[1]
        count = target.count(old) if old else len(target) + 1
        return len(target) + count * max(len(new) - len(old), 0)
    if name in ("center", "ljust", "rjust", "zfill"):
        return max([len(target), *ints])
    if name == "expandtabs":
        return len(target) + target.count("\t") * max([8, *ints])
    if name == "indent":
        width = values[0] if values else 4
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(target) + (target.count("\n") + 1) * pad
    if name == "wordwrap":
        wrap = next((v for v in values if isinstance(v, str)), "\n")
        return len(target) * (1 + len(wrap))
    if name in ("format", "format_map"):
        return _format_size(target, values)
    return None


_MAX_INT_BITS = 2**16  # integers a template computes (a 20,000-digit number is no prompt's business)
_unbounded = _Budget(RenderLimits(seconds=math.inf, max_chars=2**62))
_current: contextvars.ContextVar[_Budget] = contextvars.ContextVar(
    "qwen3_template_budget", default=_unbounded
)


class _Limits(jinja2.ext.Extension):
    """Holds the guards the compiled template calls: every ``{% for %}`` iterates through ``loop`` and
    every ``~`` concatenation is ``concat`` (see :func:`compile_template`)."""

    @staticmethod
    def loop(iterable: Any) -> Iterator[Any]:
        budget = _current.get()
        for item in iterable:
            budget.tick()
            yield item

    @staticmethod
    def concat(*parts: Any) -> str:
        budget = _current.get()
        budget.tick()
        texts = [str(p) for p in parts]
        budget.expect(sum(map(len, texts)), "a ~ concatenation")
        return budget.size("".join(texts), "a ~ concatenation")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: unlike jinja's own tojson it does not HTML-escape, and it takes json.dumps options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes, as in transformers: templates are untrusted code.
    Its attributes are the only state that survives a loop iteration, so their size is bounded too."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick, self in args[0]
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        _current.get().size(value, f"namespace attribute {name!r}")
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore attributes ({name!r})"
            )


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with every operator, call and filter that can grow a value checked against the budget."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        budget = _current.get()
        budget.tick()
        if operator in ("*", "**") and all(isinstance(v, int) for v in (left, right)):
            bits = abs(left).bit_length() * (abs(right) if operator == "**" else 1) + (
                0 if operator == "**" else abs(right).bit_length()
            )
            if abs(left) > 1 and bits > _MAX_INT_BITS:
                raise TemplateLimitError(f"the chat template computes an integer of about {bits} bits")
        elif operator == "*":
            count, seq = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(count, int) and hasattr(seq, "__len__"):
                budget.expect(len(seq) * count, "a repeated value")
        elif operator == "%" and isinstance(left, str):
            values = right if isinstance(right, tuple) else (right,)
            budget.expect(_format_size(left, values, percent=True), "a % format")
        return budget.size(super().call_binop(context, operator, left, right), f"a value with {operator!r}")

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _current.get()
        budget.tick()
        if isinstance(__obj, jinja2.runtime.LoopContext) and args:  # loop(children) in a recursive loop
            args = (_Limits.loop(args[0]), *args[1:])
        what = getattr(__obj, "__name__", type(__obj).__name__)
        target = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if what == "join" and isinstance(target, str) and args:
            items = [str(item) for item in args[0]]
            budget.expect(sum(map(len, items)) + len(target) * len(items), "a joined string")
            args = (items, *args[1:])
        predicted = _predicted_size(what, target, args, kwargs)
        if predicted is not None:
            budget.expect(predicted, f"a value with {what}()")
        return budget.size(super().call(__context, __obj, *args, **kwargs), f"a value with {what}()")


_PASSED = (jinja2.runtime.Context, jinja2.Environment, nodes.EvalContext)  # what pass_context & co. prepend


def _bounded_filter(name: str, function: Any) -> Any:
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _current.get()
        budget.tick()
        values = [a for a in args if not isinstance(a, _PASSED)]
        if values:
            target, rest = values[0], tuple(values[1:])
            if name == "format" and isinstance(target, str):
                budget.expect(_format_size(target, rest, percent=True), "a value with the format filter")
            elif name == "join" and not isinstance(target, str):
                items = list(target)
                budget.expect(
                    sum(_text_size(i) for i in items)
                    + len(items) * (len(rest[0]) if rest and isinstance(rest[0], str) else 0),
                    "a joined string",
                )
                args = tuple(items if a is target else a for a in args)
            elif name in ("batch", "slice") and rest and isinstance(rest[0], int):
                budget.expect(rest[0], f"a value with the {name} filter")
            else:
                predicted = _predicted_size(name, target, rest, kwargs)
                if predicted is not None:
                    budget.expect(predicted, f"a value with the {name} filter")
        return budget.size(function(*args, **kwargs), f"a value with the {name} filter")

    # keep jinja's pass_context / pass_environment markers, which it reads from the function object
    bounded.__dict__.update(getattr(function, "__dict__", {}))
    return bounded


@lru_cache(maxsize=1)
def _environment() -> _BoundedEnvironment:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Limits]
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # generates text in bulk; no chat template has a use for it
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env


def template_globals() -> frozenset[str]:
    """Names every template sees (``range``, ``namespace``, ``raise_exception``, ...): variables a caller
    passes must not shadow them."""
    return frozenset(_environment().globals)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compile a chat template once (cached on its text), every loop routed through the budget's guard.

    Raises ``jinja2.TemplateSyntaxError`` for a template that does not parse.
    """
    env = _environment()
    tree = env.parse(template)
    for loop in tree.find_all(nodes.For):
        guard = nodes.ExtensionAttribute(_Limits.identifier, "loop")
        loop.iter = nodes.Call(guard, [loop.iter], [], None, None, lineno=loop.lineno)
    for parent in tree.find_all(nodes.Node):  # every a ~ b through the concat guard
        for field_name, value in parent.iter_fields():
            if isinstance(value, nodes.Concat):
                setattr(parent, field_name, _guarded_concat(value))
            elif isinstance(value, list):
                setattr(
                    parent,
                    field_name,
                    [_guarded_concat(v) if isinstance(v, nodes.Concat) else v for v in value],
                )
    return env.from_string(tree)


def _guarded_concat(node: nodes.Concat) -> nodes.Call:
    guard = nodes.ExtensionAttribute(_Limits.identifier, "concat")
    return nodes.Call(guard, node.nodes, [], None, None, lineno=node.lineno)


def render_template(template: str, limits: RenderLimits | None = None, **variables: Any) -> str:
    """Render ``template`` with ``variables`` inside ``limits`` (defaults: :class:`RenderLimits`)."""
    budget = _Budget(limits or RenderLimits())
    token = _current.set(budget)
    try:
        compiled = compile_template(template)
        parts, size = [], 0
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            if size > budget.limits.max_chars:
                raise TemplateLimitError(
                    f"the chat template's output exceeds {budget.limits.max_chars} characters"
                )
            budget.tick()
            parts.append(chunk)
        return "".join(parts)
    except RecursionError:
        raise TemplateLimitError("the chat template recursed too deeply") from None
    except MemoryError:
        raise TemplateLimitError("the chat template ran out of memory") from None
    except jinja2.exceptions.TemplateError:
        raise
    except Exception as exc:  # a template bug (1/0, a wrong type): the template's error, not the caller's
        raise jinja2.exceptions.TemplateRuntimeError(
            f"the chat template failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        _current.reset(token)
