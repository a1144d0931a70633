"""The front end's side of a request: token ids from the engine in, text, stop strings, parsing and usage out.

The engine core deals in token ids only. :class:`RequestState` turns one sequence's engine outputs into
text increments (never half a UTF-8 character), finds stop strings across token boundaries (holding back
text that could still be the start of one), optionally splits the text into reasoning, content and tool
calls with the streaming parser, and counts usage. ``LLM`` (offline) and ``AsyncLLM`` (streaming) both use
it, so the two paths give the same text. When a stop string is hit the state reports it, and its owner
aborts the sequence in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen3.chat import Delta, StreamingOutputParser
from qwen3.engine.llm_engine import EngineOutput
from qwen3.sampling import SamplingParams
from qwen3.tokenizer import Tokenizer


@dataclass
class StreamDelta:
    """What one engine step added to a request, text split into reasoning/content/tool-call deltas."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    reasoning: str = ""
    content: str = ""
    tool_calls: list[Delta] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    usage: dict[str, int] | None = None  # set on the last delta
    stop_reason: str | int | None = None  # set on the last delta: the stop string or token that ended it
    error: str | None = None  # set when the engine failed this request (finish_reason "error")


def usage(
    prompt_tokens: int, output_ids: list[int], think_end_id: int | None, think_start_id: int | None,
    reasoning_started: bool = False,
) -> dict[str, int]:  # fmt: skip
    """Token counts; reasoning tokens run up to and including ``</think>`` (all, if it never closed)."""
    if think_end_id is not None and think_end_id in output_ids:
        reasoning = output_ids.index(think_end_id) + 1
    elif reasoning_started or (think_start_id is not None and think_start_id in output_ids):
        reasoning = len(output_ids)
    else:
        reasoning = 0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(output_ids),
        "reasoning_tokens": reasoning,
        "total_tokens": prompt_tokens + len(output_ids),
    }


class RequestState:
    """One sequence, seen from the front end (see the module docstring)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer | None,
        parse: bool = False,
        reasoning_started: bool = False,
        parse_prefix: str = "",
    ) -> None:
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer (this LLM has none: skip_tokenizer_init)")
        self.request_id = request_id
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.detokenizer = tokenizer.detokenizer(skip_special_tokens=True) if tokenizer else None
        self.reasoning_started = reasoning_started
        self.parser = StreamingOutputParser(reasoning_started) if parse else None
        self._pending = self.parser.feed(parse_prefix) if self.parser is not None and parse_prefix else []
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.text = ""  # all decoded text (cut at a stop string)
        self.emitted = 0  # characters of text handed out (the rest may be a stop-string prefix)
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None  # why the engine failed the sequence (finish_reason "error")
        self.num_cached_tokens = 0
        self.metrics: dict[str, float] = {}
        self._max_stop = max((len(s) for s in params.stop), default=0)
        self._partial = StopPrefixes(params.stop)

    def process(self, out: EngineOutput) -> StreamDelta | None:
        """Take one engine output; the delta to hand out, or None once finished. After a stop string,
        ``finished`` is set and the caller must abort the sequence in the engine."""
        if self.finished:
            return None
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        finished, reason, stop_reason = out.finished, out.finish_reason, out.stop_reason
        if self.detokenizer is not None and out.new_token_ids:
            # The engine stops with "stop" on an eos or stop token id: that token is not text.
            ids = out.new_token_ids[:-1] if finished and reason == "stop" else out.new_token_ids
            self.text += self.detokenizer.add(ids)
            if self.params.stop and self._find_stop():
                finished, reason, stop_reason = True, "stop", self.stop_reason
        if finished and self.detokenizer is not None and not isinstance(stop_reason, str):
            self.text += self.detokenizer.flush()
        new_text = self._releasable(finished)
        if finished:
            self.finished, self.finish_reason, self.stop_reason = True, reason, stop_reason
            self.num_cached_tokens, self.metrics, self.error = out.num_cached_tokens, out.metrics, out.error
        delta = StreamDelta(
            self.request_id, out.new_token_ids, new_text, finished, reason if finished else None,
            logprobs=out.logprobs, stop_reason=stop_reason if finished else None, error=out.error,
        )  # fmt: skip
        if self.parser is not None:
            pieces = self._pending + self.parser.feed(new_text) + (self.parser.finish() if finished else [])
            self._pending = []
            delta.reasoning = "".join(p.text for p in pieces if p.kind == "reasoning")
            delta.content = "".join(p.text for p in pieces if p.kind == "content")
            delta.tool_calls = [p for p in pieces if p.kind == "tool_call"]
        if finished:
            delta.usage = self.usage()
        return delta

    def usage(self) -> dict[str, int]:
        think_end = think_start = None
        if self.tokenizer is not None:
            think_end, think_start = (
                self.tokenizer.token_to_id("</think>"),
                self.tokenizer.token_to_id("<think>"),
            )
        return usage(self.num_prompt_tokens, self.token_ids, think_end, think_start, self.reasoning_started)

    def _find_stop(self) -> bool:
        """Cut the text at the first stop string that appears in what is not yet handed out."""
        window_start = max(0, self.emitted - self._max_stop)
        hits = [(i, s) for s in self.params.stop if (i := self.text.find(s, window_start)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.text = self.text[:index]
        self.stop_reason = stop
        return True

    def _releasable(self, finished: bool) -> str:
        """New text that cannot turn out to be the start of a stop string (held back until it can't)."""
        end = len(self.text)
        if not finished and self.params.stop:
            end -= self._partial.held(self.text)
        end = max(end, self.emitted)
        new = self.text[self.emitted : end]
        self.emitted = end
        return new


class StopPrefixes:
    """How much of the text's end could still become a stop string: the longest proper prefix of any stop
    string that the text ends with, kept up to date as text is appended (one KMP automaton per stop
    string). Each step costs the new characters times the number of stop strings, however long they are
    or however the text repeats, so no request's stop strings can slow a step for everyone."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.fail = [_failure(stop) for stop in stops]
        self.state = [0] * len(stops)
        self.fed = 0  # characters of the text seen so far

    def held(self, text: str) -> int:
        """Feed what ``text`` added since the last call; the length of its end to hold back."""
        for char in text[self.fed :]:
            for i, stop in enumerate(self.stops):
                k, fail = self.state[i], self.fail[i]
                while k and stop[k] != char:
                    k = fail[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(
                    stop
                ):  # a whole match: the caller cuts there; as a prefix, take the longest border
                    k = fail[k - 1]
                self.state[i] = k
        self.fed = len(text)
        return max(self.state, default=0)


def _failure(pattern: str) -> list[int]:
    """KMP's failure function: for each prefix, the length of its longest proper border."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail
