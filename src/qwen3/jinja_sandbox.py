"""The jinja2 sandbox chat templates run in: transformers' environment, with bounds on time and size.

A chat template is code from a checkpoint (or an operator's ``--chat-template``), and it runs on every
request with the client's messages as input. The environment is the one transformers uses (an
``ImmutableSandboxedEnvironment`` with loop controls, its ``tojson``, ``raise_exception``,
``strftime_now`` and a ``namespace`` that refuses underscore attributes), so a well-behaved template renders
byte for byte as ``apply_chat_template`` does. On top of jinja's own limits (no unsafe attributes,
``range`` capped at 100,000 items), every render gets a :class:`RenderLimits` budget:

- time: every loop iteration, call, filter and output chunk checks the deadline, so nested loops stop;
- size: the output, every string or list a template builds (``*``, ``+``, ``%``, filters, method calls,
  namespace attributes) and every integer argument it passes are bounded, so nothing grows without end;
- recursion and memory exhaustion inside a template become the same clear error.

A template that breaks a limit raises :class:`TemplateLimitError` naming the limit; nothing else changes.
The loop check is added by rewriting each ``{% for %}`` of the parsed template to iterate through the
extension's guard (``nodes.ExtensionAttribute``, a name templates themselves cannot reach or rebind).
"""

from __future__ import annotations

import contextvars
import json
import math
import re
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
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

__all__ = ["RenderLimits", "TemplateLimitError", "compile_template", "render_template", "template_globals"]


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render: wall time, and characters of output (and of any value the template builds)."""

    seconds: float = 5.0
    max_chars: int = 16 * 2**20
    max_int_arg: int = MAX_RANGE  # integer arguments to calls and filters (widths, counts); jinja's range cap


class TemplateLimitError(jinja2.exceptions.TemplateError):
    """A chat template ran past a :class:`RenderLimits` bound (too long, too large, too deep)."""


class _Budget:
    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the chat template ran longer than {self.limits.seconds:g} s")

    def size(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self.limits.max_chars:
            raise TemplateLimitError(
                f"the chat template built {what} larger than {self.limits.max_chars} items"
            )
        return value

    def ints(self, args: Iterable[Any], what: str) -> None:
        for arg in args:
            if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > self.limits.max_int_arg:
                raise TemplateLimitError(
                    f"the chat template passed {arg} to {what} (integer arguments are limited to "
                    f"{self.limits.max_int_arg})"
                )

    def format_spec(self, text: Any, what: str) -> None:
        """A width or precision in a format string is an allocation: refuse one over the size limit."""
        if isinstance(text, str):
            for digits in re.findall(r"\d+", text):
                if len(digits) > len(str(self.limits.max_int_arg)) and int(digits) > self.limits.max_int_arg:
                    raise TemplateLimitError(f"the chat template formats with a width of {digits} in {what}")


_MAX_INT_BITS = 2**16  # integers a template computes (a 20,000-digit number is no prompt's business)
_unbounded = _Budget(RenderLimits(seconds=math.inf, max_chars=2**62, max_int_arg=2**62))
_current: contextvars.ContextVar[_Budget] = contextvars.ContextVar(
    "qwen3_template_budget", default=_unbounded
)


class _Limits(jinja2.ext.Extension):
    """Holds the loop guard that every ``{% for %}`` iterates through (see the module docstring)."""

    @staticmethod
    def loop(iterable: Any) -> Iterator[Any]:
        budget = _current.get()
        for item in iterable:
            budget.tick()
            yield item


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
            if (
                isinstance(count, int)
                and hasattr(seq, "__len__")
                and len(seq) * count > budget.limits.max_chars
            ):
                raise TemplateLimitError(
                    f"the chat template repeats a value to more than {budget.limits.max_chars} items"
                )
        elif operator == "%":
            budget.format_spec(left, "a % format")
            budget.ints(right if isinstance(right, tuple) else (right,), "a % format")
        return budget.size(super().call_binop(context, operator, left, right), f"a value with {operator!r}")

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _current.get()
        budget.tick()
        what = getattr(__obj, "__name__", type(__obj).__name__)
        budget.ints((*args, *kwargs.values()), what)
        target = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if what in ("format", "format_map"):
            budget.format_spec(target, f"str.{what}")
        return budget.size(super().call(__context, __obj, *args, **kwargs), f"a value with {what}()")


_PASSED = (jinja2.runtime.Context, jinja2.Environment, nodes.EvalContext)  # what pass_context & co. prepend


def _bounded_filter(name: str, function: Any) -> Any:
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _current.get()
        budget.tick()
        values = [a for a in args if not isinstance(a, _PASSED)]
        budget.ints((*values[1:], *kwargs.values()), f"the {name} filter")  # [0] is the filtered value
        if name == "format" and values:
            budget.format_spec(values[0], "the format filter")
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
    return env.from_string(tree)


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
