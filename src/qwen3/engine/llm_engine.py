"""The engine core: token ids in, one batched model step at a time, token ids out. No text.

``step()`` schedules, runs the model once on every scheduled token, samples one token for each
sequence whose pending tokens are all computed, then applies the per-request rules that live at the
token level: thinking budget (insert the stop-thinking ids), eos and stop token ids, ``max_tokens`` and
``max_model_len``, and a structured request's grammar (its masks are filled while the model runs and
applied before sampling; see :mod:`qwen3.structured`). Detokenization, stop strings, output parsing and
usage belong to the front end (:mod:`qwen3.output_processor`, used by ``LLM`` and ``AsyncLLM``), which
aborts a request when its text hits a stop string.

A step whose model run or sampling raises is retried sequence by sequence, so a request that breaks the
step fails alone (with ``finish_reason="error"``) and the others carry on; results do not change by running
alone, as the CPU engine is batch-invariant, and nothing is committed before the whole computation
succeeded (seeded generators are rewound). An exception in the commit itself is an engine bug and
propagates (``AsyncLLM`` then reports the engine dead).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from qwen3.distributed import ParallelError, Workers
from qwen3.engine.block_manager import BlockManager
from qwen3.engine.model_runner import ModelRunner
from qwen3.engine.scheduler import Scheduler
from qwen3.engine.sequence import Sequence, ThinkingBudget
from qwen3.model import Qwen3ForCausalLM
from qwen3.sampling import Sampler, SampleResult, SamplingParams
from qwen3.structured import GrammarBackend, GrammarError, Phase

logger = logging.getLogger(__name__)

# Qwen3 technical report §4.3, as the official thinking_budget.md client inserts it.
STOP_THINKING_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
    "directly now.\n</think>\n\n"
)


class RequestError(ValueError):
    """A request the engine cannot take (empty or over-long prompt, duplicate id); ``field`` names why."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class ThinkingTokens:
    """The token ids the thinking controls need (from the tokenizer; absent without one)."""

    think_start_id: int
    think_end_id: int
    stop_thinking_ids: list[int]  # STOP_THINKING_TEXT: inserted when a budget runs out
    gap_ids: list[int]  # "\n\n": what follows </think> before the answer (and an answer prefix)


@dataclass
class EngineConfig:
    max_model_len: int
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    eos_token_ids: frozenset[int] = frozenset()
    thinking: ThinkingTokens | None = None
    attention_backend: str | None = None  # "kernel", "torch", or None: the best that runs here
    batch_invariant: bool = False  # the torch path too (the CPU kernels always are): fixed-shape steps
    grammars: GrammarBackend | None = None  # structured outputs (needs the tokenizer; absent without one)


@dataclass
class EngineOutput:
    """What one step added to one sequence (what a stream turns into a delta)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | None = None  # the stop token id that ended it, if one did
    logprobs: list = field(default_factory=list)  # aligned with new_token_ids; None for inserted ids
    inserted_token_ids: list[int] = field(default_factory=list)  # the engine's own (thinking budget)
    error: str | None = None  # why the sequence failed (finish_reason "error")
    num_cached_tokens: int = 0  # on the last output: prompt tokens served by the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)  # on the last output: timings


class LLMEngine:
    def __init__(self, model: Qwen3ForCausalLM, config: EngineConfig, workers: Workers | None = None) -> None:
        """``workers``: the tensor-parallel ranks the runner drives (``model`` is then rank 0's shard)."""
        self.model = model
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            model, config.num_blocks, config.block_size, config.max_num_seqs, config.max_model_len,
            config.attention_backend, config.batch_invariant, workers,
        )  # fmt: skip
        self.sampler = Sampler()
        self.requests: dict[str, Sequence] = {}
        self.pending_inserted: dict[
            str, list[int]
        ] = {}  # ids inserted at admission, emitted with the first output
        self.num_steps = 0

    # --- requests ---------------------------------------------------------------------------------

    def admission_insert(
        self, thinking_budget: int | None, reasoning_started: bool, answer_prefix_ids: list[int]
    ) -> list[int]:
        """The ids ``add_request`` appends to the prompt: the stop-thinking text (and the answer prefix)
        when the prompt opened ``<think>`` and the budget is 0; else nothing."""
        tokens = self.config.thinking
        if tokens is None or not reasoning_started or thinking_budget != 0:
            return []
        return tokens.stop_thinking_ids + list(answer_prefix_ids)

    def check_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        thinking_budget: int | None = None,
        reasoning_started: bool = False,
        answer_prefix_ids: list[int] | None = None,
    ) -> None:
        """Raise :class:`RequestError` if ``add_request`` would refuse this request.

        Callable from any thread (it reads only fixed configuration), so a server can answer 400
        before it commits to a streaming response.
        """
        if not prompt_token_ids:
            raise RequestError("prompt", "is empty")
        limit = self.config.max_model_len
        inserted = len(self.admission_insert(thinking_budget, reasoning_started, answer_prefix_ids or []))
        if len(prompt_token_ids) + inserted >= limit:
            extra = f" ({inserted} more to close the thinking)" if inserted else ""
            raise RequestError(
                "prompt",
                f"has {len(prompt_token_ids)} tokens{extra}; the context holds {limit} (prompt + output)",
            )
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError("prompt", f"has token ids outside [0, {vocab})")
        if params.max_tokens is not None and len(prompt_token_ids) + params.max_tokens > limit:
            raise RequestError(
                "max_tokens",
                f"{params.max_tokens} is too large: the context holds {limit} tokens and the prompt has "
                f"{len(prompt_token_ids)}, so at most {limit - len(prompt_token_ids)} can be generated",
            )
        if thinking_budget is not None:
            if thinking_budget < 0:
                raise RequestError("thinking_budget", f"must be >= 0, got {thinking_budget}")
            if self.config.thinking is None:
                raise RequestError(
                    "thinking_budget", "needs <think> and </think> in the vocabulary (a tokenizer)"
                )
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise RequestError("stop_token_ids", f"has token ids outside [0, {vocab})")
        if params.structured_outputs is not None:
            if self.config.grammars is None:
                raise RequestError("structured_outputs", "needs a tokenizer (this engine has none)")
            if answer_prefix_ids:
                raise RequestError("structured_outputs", "cannot be combined with an answer prefix")
            try:
                self.config.grammars.compile(params.structured_outputs)
            except GrammarError as exc:
                raise RequestError("structured_outputs", str(exc).partition(": ")[2]) from None

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        thinking_budget: int | None = None,
        reasoning_started: bool = False,
        answer_prefix_ids: list[int] | None = None,
        thinking: bool = False,
    ) -> None:
        """Queue a request. ``reasoning_started``: the prompt already opened ``<think>``.

        ``thinking_budget`` caps the tokens generated inside ``<think>``; 0 with ``reasoning_started``
        closes the thinking before the first token. ``answer_prefix_ids`` are inserted where the reasoning
        ends (after ``</think>\\n\\n``, whether the model closed its thinking or the budget did), so the
        answer is forced to begin with them — how a server makes a thinking model call a tool without
        cutting its thinking short.

        ``thinking``: the model may reason before it answers (thinking mode), so a ``structured_outputs``
        constraint applies from the end of the reasoning; otherwise from the first token.
        """
        if request_id in self.requests:
            raise RequestError("request_id", f"{request_id!r} is already running")
        answer_prefix_ids = list(answer_prefix_ids or [])
        self.check_request(prompt_token_ids, params, thinking_budget, reasoning_started, answer_prefix_ids)
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params)
        seq.answer_prefix_ids = answer_prefix_ids
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        tokens = self.config.thinking
        constrained = params.structured_outputs is not None
        # a budget or a prompt that opened <think> means the model reasons first, whatever the caller said
        thinking = (thinking or reasoning_started or thinking_budget is not None) and tokens is not None
        if (
            thinking_budget is not None or answer_prefix_ids or constrained and thinking
        ) and tokens is not None:
            seq.thinking = ThinkingBudget(thinking_budget, tokens.think_start_id, tokens.think_end_id)
            seq.thinking.inside = reasoning_started
            inserted = self.admission_insert(thinking_budget, reasoning_started, answer_prefix_ids)
            if inserted:
                seq.thinking.close()
                seq.token_ids.extend(inserted)
                self.pending_inserted[request_id] = inserted
        if constrained:
            reasoning = thinking and not seq.thinking.finished
            seq.grammar = self.config.grammars.new_state(
                params.structured_outputs, reasoning, reasoning_started
            )
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is not running."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.pending_inserted.pop(request_id, None)
        self.scheduler.finish(seq)
        self.runner.remove(seq)
        seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the step ---------------------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        out = self.scheduler.schedule()
        for seq in out.preempted:
            self.runner.remove(seq)
        if not out.scheduled:
            return []
        self.num_steps += 1
        try:
            return self._commit(out.scheduled, *self._compute(out.scheduled))
        except _ComputeError as error:
            logger.error(
                "engine step failed (%s); retrying its %d sequences one by one", error.cause,
                len(out.scheduled), exc_info=error.__cause__,
            )  # fmt: skip
        outputs: list[EngineOutput] = []
        for item in out.scheduled:
            try:
                computed = self._compute([item])
            except _ComputeError as error:
                logger.error("request %s failed: %s", item[0].request_id, error.cause)
                outputs.append(self._fail(item[0], error.cause))
                continue
            outputs += self._commit([item], *computed)
        return outputs

    @torch.inference_mode()
    def _compute(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], SampleResult | None]:
        """Run the model and sample. Changes nothing a retry could see: on failure the seeded generators
        are rewound (cache slots written by the failed run are rewritten by the retry)."""
        states = [(s.generator, s.generator.get_state()) for s, _ in scheduled if s.generator is not None]
        constrained = [
            s for s, n in scheduled if s.grammar is not None and s.num_computed + n == s.num_tokens
        ]
        try:
            masks = (
                self.config.grammars.start_masks([s.grammar for s in constrained]) if constrained else None
            )
            sampled, logits = self.runner.run(scheduled)  # the masks are filled meanwhile
            result = None
            if sampled:
                batch = self.runner.batch.sampling_batch(sampled)
                if masks is not None:
                    order = {seq: i for i, seq in enumerate(sampled)}
                    batch.masked_rows = [order[s] for s in constrained]
                    batch.banned = masks.result()
                result = self.sampler(logits, batch)
        except ParallelError:
            raise  # a rank is gone: no retry can succeed, and the ranks must not fall out of lockstep
        except Exception as exc:
            for generator, state in states:
                generator.set_state(state)
            raise _ComputeError(f"{type(exc).__name__}: {exc}") from exc
        return sampled, result

    @torch.inference_mode()
    def _commit(
        self, scheduled: list[tuple[Sequence, int]], sampled: list[Sequence], result: SampleResult | None
    ) -> list[EngineOutput]:
        """Advance the cache, register full blocks, append the tokens, apply the per-request rules."""
        for seq, n in scheduled:
            seq.num_computed += n
            self.blocks.commit(seq)
        if result is None:
            return []
        self.runner.batch.record(sampled, [[t] for t in result.token_ids])
        now = time.perf_counter()
        return [
            self._append(seq, token, logprob, now)
            for seq, token, logprob in zip(sampled, result.token_ids, result.logprobs, strict=True)
        ]

    def _append(self, seq: Sequence, token: int, logprob, now: float) -> EngineOutput:
        params = seq.params
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.token_ids.append(token)
        new_ids = self.pending_inserted.pop(seq.request_id, []) + [token]
        logprobs = [None] * (len(new_ids) - 1) + [logprob]
        inserted: list[int] = []
        finish = error = None
        grammar = seq.grammar
        if grammar is not None and grammar.error:  # it gave up filling this row's mask (too complex)
            finish, error = "error", f"structured_outputs: {grammar.error}"
        elif token in self.config.eos_token_ids and not params.ignore_eos:
            finish = "stop"
        elif token in params.stop_token_ids:
            finish, seq.stop_reason = "stop", token
        elif grammar is not None and grammar.phase is Phase.OPEN and token != grammar.think_start_id:
            grammar.start_answer()  # the model answers without reasoning: the grammar holds from here
            seq.thinking.close()
        elif seq.thinking is not None and not seq.thinking.finished:
            inserted = self._reasoning(seq, token)
            grammar = None  # a reasoning token is not the grammar's
        if finish is None and grammar is not None and not grammar.consume(token):
            finish, error = (
                "error",
                f"structured_outputs: the grammar rejected token {token}: {grammar.error}",
            )
        if finish is None and (
            params.max_tokens is not None
            and seq.num_output_tokens >= params.max_tokens
            or seq.num_tokens >= self.config.max_model_len
        ):
            finish = "length"
        output = EngineOutput(
            seq.request_id, new_ids + inserted, finish is not None, finish, seq.stop_reason,
            logprobs + [None] * len(inserted), new_ids[:-1] + inserted, error,
        )  # fmt: skip
        if finish is not None:
            self._finish(seq, finish, now, output)
        return output

    def _reasoning(self, seq: Sequence, token: int) -> list[int]:
        """Track a token of the reasoning; the ids to insert after it (the stop-thinking text when the
        budget is spent; the blank line and answer prefix when the model closed it and one is due)."""
        tokens, grammar = self.config.thinking, seq.grammar
        inserted: list[int] = []
        if seq.thinking.observe(token):  # the budget is spent: close the reasoning ourselves
            seq.thinking.close()
            inserted = tokens.stop_thinking_ids + seq.answer_prefix_ids
        elif seq.thinking.finished and (seq.answer_prefix_ids or grammar is not None):  # the model closed it
            inserted = tokens.gap_ids + seq.answer_prefix_ids
        inserted = inserted[: max(self.config.max_model_len - seq.num_tokens, 0)]  # never past the context
        if inserted:
            seq.token_ids.extend(inserted)
            self.runner.batch.record([seq], [inserted])
        if grammar is not None and seq.thinking.finished:
            grammar.start_answer()
        elif grammar is not None and seq.thinking.inside:
            grammar.phase = Phase.THINKING
        return inserted

    def _fail(self, seq: Sequence, error: str) -> EngineOutput:
        output = EngineOutput(seq.request_id, [], True, "error", error=error)
        self._finish(seq, "error", time.perf_counter(), output)
        return output

    def _finish(self, seq: Sequence, reason: str, now: float, output: EngineOutput) -> None:
        seq.finish_reason, seq.finish_time = reason, now
        self.scheduler.finish(seq)
        self.runner.remove(seq)
        self.requests.pop(seq.request_id, None)
        self.pending_inserted.pop(seq.request_id, None)
        output.num_cached_tokens = seq.num_prefix_cached
        output.metrics = _metrics(seq)


class _ComputeError(Exception):
    """A step's model run or sampling failed (``cause`` says how); nothing was committed."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def _metrics(seq: Sequence) -> dict[str, float]:
    end = seq.finish_time or seq.arrival_time
    first = seq.first_token_time or end
    n = seq.num_output_tokens
    return {
        "time_to_first_token_s": first - seq.arrival_time,
        "total_time_s": end - seq.arrival_time,
        "decode_tokens_per_s": (n - 1) / (end - first) if n > 1 and end > first else 0.0,
        "preemptions": float(seq.num_preemptions),
    }
