"""Structured outputs: answers held to a JSON schema, a regex, a list of choices or a grammar.

A thinking model must be free while it reasons and constrained only once it answers; a grammar applied
from the first token forbids the reasoning (the failure ../shared/spec/structured_outputs.md lists for
several peers). Each constrained sequence therefore carries a :class:`GrammarState` in one of three
phases, which the engine moves on as tokens arrive:

- ``OPEN`` (thinking mode, before the model wrote anything): the grammar's tokens or ``<think>``, so a
  model that answers at once is constrained from its first token and one that thinks may open its block;
- ``THINKING`` (inside ``<think>``): every token but end-of-sequence: the reasoning is free, and the reply
  cannot end before it has an answer;
- ``ANSWER`` (from the token after ``</think>`` and the blank line that follows it, however the reasoning
  ended: by the model, the thinking budget, or at admission; in non-thinking mode from the first token):
  the grammar's tokens only, end-of-sequence only where the grammar accepts.

The grammar work is llguidance's (no dependencies, about 1 ms to compile a schema, masks in tens of
microseconds): a request's constraint is compiled once per distinct source (a bounded cache keyed by its
digest), each sequence gets a copy of the compiled matcher, and a step fills the masks of its constrained
rows in one native call (on a worker thread while the model runs, when a core is free for it), then
applies them in place before sampling. Rows without a constraint cost nothing; a row's mask depends on its own
tokens only, so batch invariance and seeded sampling hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any

import llguidance
import numpy
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

# Bounds on one request's constraint (the server's body limit is the outer one).
MAX_SOURCE_CHARS = 256 * 2**10  # a schema's JSON text, a regex or a grammar
MAX_CHOICES = 1024
# The compiled-grammar cache: entries and the characters of their sources, whichever fills first.
CACHE_ENTRIES = 512
CACHE_SOURCE_CHARS = 16 * 2**20
# JSON is written in one canonical layout (json.dumps's, and the one Qwen3's template writes tool-call
# arguments in): no free whitespace, so a model cannot spend its tokens on indentation (llguidance reads
# these options from the schema's "x-guidance" key).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# llguidance's work per token, bounded below its defaults so that one request's grammar cannot slow every
# step of the batch by much (an ambiguous grammar then fails its own request with "too complex").
LIMITS = dict(max_items_in_row=500, step_max_items=20_000, step_lexer_fuel=100_000)
# llguidance builds grammars recursively in native code: thousands of chained rules or $refs (well under
# MAX_SOURCE_CHARS) overflow a thread's default 8 MiB stack and kill the process. Compiles run on one
# thread with this much stack (reserved, not committed).
COMPILE_STACK_BYTES = 512 * 2**20
_GBNF_RULE = re.compile(r"^\s*[A-Za-z0-9_.-]+\s*::=", re.MULTILINE)


class GrammarError(ValueError):
    """A constraint that cannot be compiled; ``field`` names which part (``json``, ``regex``, ...)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class StructuredOutputs:
    """What the answer must match: exactly one of ``json`` (a JSON schema, as a dict or its text),
    ``regex``, ``choice`` (one of these strings), ``grammar`` (Lark in llguidance's dialect, or GBNF as
    llama.cpp writes it) or ``json_object`` (any JSON object). vLLM's ``StructuredOutputsParams`` names.
    """

    json: Mapping[str, Any] | str | bool | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise GrammarError(
                "structured_outputs", f"give exactly one of {', '.join(_KINDS)} (got {given or 'none'})"
            )
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, (str, bytes, Mapping)) or not isinstance(choice, Sequence):
                raise GrammarError("choice", "must be a list of strings")
            if not choice or len(choice) > MAX_CHOICES:
                raise GrammarError("choice", f"must hold 1 to {MAX_CHOICES} strings, got {len(choice)}")
            if not all(isinstance(c, str) and c for c in choice):
                raise GrammarError("choice", "must hold non-empty strings")
            object.__setattr__(self, "choice", tuple(choice))
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise GrammarError(kind, "must be a non-empty string")
        if self.json is not None and not isinstance(self.json, (Mapping, str, bool)):
            raise GrammarError("json", f"must be a JSON schema (an object), got {type(self.json).__name__}")
        if not isinstance(self.json_object, bool):
            raise GrammarError("json_object", "must be true or false")

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))

    def source(self) -> str:
        """The constraint as llguidance grammar text (what is compiled and what the cache is keyed by)."""
        kind = self.kind
        if kind == "json" or kind == "json_object":
            schema = {"type": "object"} if kind == "json_object" else self.json
            try:
                if isinstance(schema, str):
                    _check_size("json", schema)
                    schema = json.loads(schema)
                if not isinstance(schema, (Mapping, bool)):
                    raise GrammarError("json", "must be a JSON schema (an object)")
                text = _json_schema_text(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError("json", f"is not valid JSON: {exc}") from None
            except RecursionError:
                raise GrammarError("json", "is nested too deeply") from None
            _check_size("json", text)
            # One newline may follow the value: tokens such as '"}}\n' end a JSON text in Qwen3's
            # vocabulary, and a grammar that stopped at '}' would forbid the token the model wants.
            return llguidance.LLMatcher.grammar_from_lark(
                f'%llguidance {{}}\nstart: value "\\n"?\nvalue: %json {text}'
            )
        if kind == "regex":
            _check_size("regex", self.regex)
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if kind == "choice":
            text = "start: " + " | ".join(_literal(c) for c in self.choice)
            _check_size("choice", text)
            return llguidance.LLMatcher.grammar_from_lark(text)
        _check_size("grammar", self.grammar)
        grammar = self.grammar
        if _GBNF_RULE.search(grammar):  # GBNF (llama.cpp's): llguidance translates it to its Lark dialect
            try:
                grammar = gbnf_to_lark(grammar)
            except Exception as exc:  # its translator raises plain exceptions on bad input
                raise GrammarError("grammar", f"is not valid GBNF: {exc}") from None
        return llguidance.LLMatcher.grammar_from_lark(grammar)

    def replace(self, **changes: Any) -> StructuredOutputs:
        return dataclasses.replace(self, **changes)


# Keywords whose value is a schema, a list of schemas, or a map from names to schemas.
# Not "not", "if"/"then"/"else" or "oneOf": closing objects there would change what they accept.
_SCHEMA_KEYS = ("items", "additionalProperties", "contains", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` wherever an object lists its ``properties`` and says
    nothing of others: vLLM's default (xgrammar's strict mode), and what OpenAI's strict mode requires.
    Without it a model may append keys without end. An answer valid here is valid against ``schema``.
    ``allOf`` branches are left as they are (closing each would forbid the others' properties), and so are
    ``not``, ``if``/``then``/``else`` and ``oneOf`` (closing a branch there can turn a rejection into a
    match)."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SCHEMA_KEYS:
        if key in out:
            out[key] = closed_objects(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")
    if isinstance(out.get("properties"), Mapping) and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


def _json_schema_text(schema: Mapping[str, Any] | bool) -> str:
    """A schema as llguidance's ``%json`` reads it: objects closed, the canonical layout asked for."""
    if isinstance(schema, Mapping):
        schema = {**closed_objects(schema), "x-guidance": JSON_OPTIONS}
    return json.dumps(schema, ensure_ascii=False)


def _literal(text: str) -> str:
    """A Lark string literal matching ``text`` exactly (llguidance reads JSON string escapes)."""
    return json.dumps(text, ensure_ascii=False)


class _DeepStackThread:
    """One long-lived thread with a deep stack, running llguidance's grammar builder for every caller."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            if self._thread is None:
                previous = threading.stack_size(COMPILE_STACK_BYTES)
                try:
                    self._thread = threading.Thread(
                        target=self._serve, name="qwen3-grammar-compile", daemon=True
                    )
                    self._thread.start()
                finally:
                    threading.stack_size(previous)
        done: Future = Future()
        self._jobs.put((fn, args, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            fn, args, done = self._jobs.get()
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, which re-raises it
                done.set_exception(exc)


_COMPILER = _DeepStackThread()


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS)


def _check_size(field_name: str, text: str) -> None:
    if len(text) > MAX_SOURCE_CHARS:
        raise GrammarError(field_name, f"is {len(text)} characters; at most {MAX_SOURCE_CHARS} are accepted")


# ------------------------------------------------------------------------------------------ tool calls


def _tool_call_rule(tool: Mapping[str, Any]) -> str:
    """One call in Qwen3's format, ``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>``, with
    ARGS held to the function's ``parameters`` (any object when it has none)."""
    function = tool.get("function", tool)
    schema = function.get("parameters") or {"type": "object"}
    head = '\n{"name": ' + json.dumps(function["name"], ensure_ascii=False) + ', "arguments": '
    arguments = _json_schema_text(schema)
    return f"<tool_call> {_literal(head)} %json {arguments} {_literal('}' + chr(10))} </tool_call>"


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], mode: str) -> StructuredOutputs:
    """The constraint for tool calls in OpenAI's ``tools`` format (``{"type": "function", "function":
    {...}}``): ``mode`` "required" (the answer is one or more calls to any of ``tools``) or "auto" (free
    text, and any call the model starts is completed validly). For a named ``tool_choice``, pass the one
    tool with "required"."""
    if mode not in ("required", "auto"):
        raise ValueError(f"mode must be 'required' or 'auto', got {mode!r}")
    rules = [f"call_{i}: {_tool_call_rule(tool)}" for i, tool in enumerate(tools)]
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    header = f"%llguidance {{}}\ncall: {calls}\n" + "\n".join(rules) + "\n"
    if mode == "required":
        start = 'start: call ("\\n" call)*\n'
    else:  # text in which calls may appear, as StructTag writes it with a special-token trigger
        start = "start: (TEXT call)* TEXT\nTEXT: /(.|\\n)*/\n"
    return StructuredOutputs(grammar=header + start)


def check_tool_parameters(tools: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`GrammarError` naming ``tools[i].function.parameters`` for a schema that cannot be
    compiled, so a 400 says which tool is wrong."""
    for i, tool in enumerate(tools):
        parameters = tool.get("function", tool).get("parameters")
        if parameters is not None:
            source = StructuredOutputs(json=parameters).source()
            error = _COMPILER.run(llguidance.LLMatcher.validate_grammar, source, None)
            if error:
                raise GrammarError(f"tools[{i}].function.parameters", _short(error))


def _short(error: str) -> str:
    """llguidance's error without the parser dump it may append."""
    return error.split("\n<state>")[0].strip()[:500]


# --------------------------------------------------------------------------------------- per sequence


class Phase(Enum):
    OPEN = "open"
    THINKING = "thinking"
    ANSWER = "answer"


class GrammarState:
    """One sequence's constraint (see the module docstring for the phases)."""

    def __init__(
        self, matcher: llguidance.LLMatcher, phase: Phase, think_start_id: int | None, eos_ids: list[int]
    ) -> None:
        self.matcher = matcher
        self.phase = phase
        self.think_start_id = think_start_id
        self.eos_ids = eos_ids

    def finish_row(self, banned: numpy.ndarray) -> None:
        """Adjust this sequence's row of banned tokens, already unpacked from its grammar's mask (none when
        thinking), for its phase."""
        if self.phase is Phase.THINKING:
            banned[self.eos_ids] = True
        elif self.phase is Phase.OPEN and self.think_start_id is not None:
            banned[self.think_start_id] = False

    def consume(self, token_id: int) -> bool:
        """Advance the grammar by one answer token; False if the grammar rejects it."""
        return self.matcher.consume_token(token_id)

    def start_answer(self) -> None:
        """The reasoning is over (and its closing blank line written): the grammar applies from now on."""
        self.phase = Phase.ANSWER

    @property
    def error(self) -> str:
        return _short(self.matcher.get_error()) if self.matcher.is_error() else ""


# ------------------------------------------------------------------------------------------ the backend


class GrammarBackend:
    """Compiles constraints for one tokenizer and vocabulary, caches them, and fills a step's masks.

    Thread-safe: the server checks requests on worker threads while the engine steps.
    """

    def __init__(
        self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int], think_start_id: int | None
    ) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.think_start_id = think_start_id
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, tuple[llguidance.LLMatcher, int]] = OrderedDict()
        self._cached_chars = 0
        self._pool: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None
        self.compiled = self.cache_hits = 0

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built on first use (about a second for Qwen3's 151k)."""
        with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = llguidance.LLTokenizer(
                        self._tokenizer_json, n_vocab=self.vocab_size, eos_token=self.eos_ids
                    )
                except Exception as exc:  # a tokenizer llguidance cannot read: no constraint can run
                    raise GrammarError(
                        "structured_outputs", f"unsupported with this tokenizer: {exc}"
                    ) from None
            return self._tokenizer

    def compile(self, constraint: StructuredOutputs) -> llguidance.LLMatcher:
        """The compiled matcher for ``constraint`` (a shared template: copy it per sequence); raises
        :class:`GrammarError` naming the field if it cannot be compiled."""
        source = constraint.source()
        key = hashlib.sha256(source.encode()).digest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return hit[0]
        tokenizer = self.tokenizer
        matcher = _COMPILER.run(
            lambda: llguidance.LLMatcher(tokenizer, source, log_level=0, limits=_limits())
        )
        if matcher.is_error():
            raise GrammarError(constraint.kind, _short(matcher.get_error()))
        with self._lock:
            self.compiled += 1
            if key not in self._cache:
                self._cache[key] = (matcher, len(source))
                self._cached_chars += len(source)
            while len(self._cache) > CACHE_ENTRIES or self._cached_chars > CACHE_SOURCE_CHARS:
                _, (_, size) = self._cache.popitem(last=False)
                self._cached_chars -= size
        return matcher

    def new_state(self, constraint: StructuredOutputs, thinking: bool, reasoning_open: bool) -> GrammarState:
        """A sequence's state: ``thinking`` mode waits for the end of the reasoning, which
        ``reasoning_open`` says has begun (the prompt opened ``<think>``)."""
        phase = Phase.ANSWER
        if thinking:
            phase = Phase.THINKING if reasoning_open else Phase.OPEN
        return GrammarState(self.compile(constraint).deep_copy(), phase, self.think_start_id, self.eos_ids)

    def start_masks(self, states: list[GrammarState]) -> Future[torch.Tensor]:
        """The banned-token rows of ``states`` (one per state, in order), as a future of a bool tensor
        [len(states), vocab], True where a token may not be sampled.

        With a core to spare (torch uses fewer threads than there are CPUs), the rows are filled on a
        worker thread while the caller runs the model; otherwise at once, here: on a machine whose cores
        all run the model's threads, a second thread only takes turns with them (measured on 2 cores: a
        4 us/row fill took 80 us/row beside the model's busy threads).
        """
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=1)  # one native call for all rows
            if (os.cpu_count() or 1) > torch.get_num_threads():
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="qwen3-grammar")
        if self._pool is not None:
            return self._pool.submit(self._fill, states)
        done: Future[torch.Tensor] = Future()
        done.set_result(self._fill(states))
        return done

    def _fill(self, states: list[GrammarState]) -> torch.Tensor:
        words = numpy.full((len(states), -(-self.vocab_size // 32)), -1, dtype=numpy.int32)  # -1: all allowed
        matchers = [(state.matcher, i) for i, state in enumerate(states) if state.phase is not Phase.THINKING]
        if matchers:
            self._executor.unsafe_compute_mask_ptr(
                matchers, words.ctypes.data, words.shape[1] * 4, len(states)
            )
        failed = [i for i, state in enumerate(states) if state.matcher.is_error()]
        for i in failed:  # the grammar gave up (too complex): any token will do, the engine fails the row
            words[i] = -1
        numpy.invert(words, out=words)  # llguidance's bits say allowed; the sampler wants banned
        bits = numpy.unpackbits(words.view(numpy.uint8), axis=1, count=self.vocab_size, bitorder="little")
        banned = bits.view(bool)
        for i, state in enumerate(states):
            state.finish_row(banned[i])
        return torch.from_numpy(banned)


__all__ = [
    "GrammarBackend",
    "GrammarError",
    "GrammarState",
    "Phase",
    "StructuredOutputs",
    "check_tool_parameters",
    "tool_call_grammar",
]
