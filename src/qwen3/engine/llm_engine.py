"""The engine: requests in, one batched model step at a time, token and text increments out.

``step()`` schedules, runs the model once on every scheduled token, samples one token for each
sequence whose pending tokens are all computed, then applies the per-request rules: thinking budget
(insert the stop-thinking text), eos and stop token ids, stop strings across token boundaries,
``max_tokens`` and ``max_model_len``. Everything above (the LLM API, streaming, the server) is built
on ``add_request``/``step``/``abort``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from qwen3.engine.block_manager import BlockManager
from qwen3.engine.model_runner import ModelRunner
from qwen3.engine.paged_attention import PagedKVCache
from qwen3.engine.scheduler import Scheduler
from qwen3.engine.sequence import Sequence, ThinkingBudget
from qwen3.model import Qwen3ForCausalLM
from qwen3.sampling import Sampler, SampleRequest, SamplingParams
from qwen3.tokenizer import StreamingDetokenizer, Tokenizer

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
class EngineConfig:
    max_model_len: int
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True


@dataclass
class StepOutput:
    """What one step added to one request (what a stream yields)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    new_logprobs: list = field(default_factory=list)
    inserted_token_ids: list[int] = field(default_factory=list)  # the engine's (thinking budget), not sampled


class _Request:
    """Engine-side bookkeeping of one request: its sequence and its text so far."""

    def __init__(self, seq: Sequence, detokenizer: StreamingDetokenizer) -> None:
        self.seq = seq
        self.detokenizer = detokenizer
        self.text = ""
        self.emitted = 0  # characters of text already handed out (the rest may be a stop-string prefix)


class LLMEngine:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        tokenizer: Tokenizer,
        config: EngineConfig,
        eos_token_ids: set[int],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_ids = set(eos_token_ids)
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, config.num_blocks, config.block_size)
        self.sampler = Sampler()
        self.requests: dict[str, _Request] = {}
        self.stop_thinking_ids = tokenizer.encode(STOP_THINKING_TEXT)
        self.think_start_id = tokenizer.token_to_id("<think>")
        self.think_end_id = tokenizer.token_to_id("</think>")
        self.think_gap_ids = tokenizer.encode("\n\n")  # what follows </think> before the answer
        self.num_steps = 0

    @staticmethod
    def num_blocks_for_memory(model: Qwen3ForCausalLM, block_size: int, memory_bytes: int) -> int:
        c = model.config
        per_block = PagedKVCache.bytes_per_block(
            c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim, model.dtype
        )
        return max(memory_bytes // per_block, 1)

    # --- requests ---------------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise :class:`RequestError` if ``add_request`` would refuse this prompt.

        Callable from any thread (it reads only fixed configuration), so a server can answer 400
        before it commits to a streaming response.
        """
        if not prompt_token_ids:
            raise RequestError("prompt", "is empty")
        limit = self.config.max_model_len
        if len(prompt_token_ids) >= limit:
            raise RequestError(
                "prompt", f"has {len(prompt_token_ids)} tokens; the context holds {limit} (prompt + output)"
            )
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError("prompt", f"has token ids outside [0, {vocab})")
        longest = min(limit, len(prompt_token_ids) + (params.max_tokens or limit))
        if self.blocks.blocks_for(longest) > self.blocks.num_blocks:
            raise RequestError(
                "prompt",
                f"needs {self.blocks.blocks_for(longest)} KV-cache blocks at most; the cache has "
                f"{self.blocks.num_blocks} (raise kv_cache_memory or lower max_tokens)",
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        thinking_budget: int | None = None,
        reasoning_started: bool = False,
        answer_prefix_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. ``reasoning_started``: the prompt already opened ``<think>``.

        ``answer_prefix_ids`` are inserted where the reasoning ends (after ``</think>\\n\\n``, whether the
        model closed its thinking or the budget did), so the answer is forced to begin with them — how
        a server makes a thinking model call a tool without cutting its thinking short.
        """
        if request_id in self.requests:
            raise RequestError("request_id", f"{request_id!r} is already running")
        self.check_request(prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params)
        seq.answer_prefix_ids = list(answer_prefix_ids or [])
        tracked = thinking_budget is not None or seq.answer_prefix_ids
        if tracked and self.think_start_id is not None and self.think_end_id is not None:
            seq.thinking = ThinkingBudget(thinking_budget, self.think_start_id, self.think_end_id)
            seq.thinking.inside = reasoning_started
            if reasoning_started and thinking_budget is not None and thinking_budget <= 0:
                seq.thinking.close()
                seq.token_ids.extend(self.stop_thinking_ids + seq.answer_prefix_ids)
        self.requests[request_id] = _Request(seq, self.tokenizer.detokenizer(skip_special_tokens=True))
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is not running."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request.seq)
        request.seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the step ---------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        self.num_steps += 1
        sampled, logits = self.runner.run(scheduled)
        for seq, n in scheduled:
            seq.num_computed += n
            self.blocks.commit(seq)
        if not sampled:
            return []
        rows = [SampleRequest(s.params, s.prompt_token_ids, s.output_token_ids, s.generator) for s in sampled]
        result = self.sampler(logits, rows)
        now = time.perf_counter()
        outputs = []
        for seq, token, logprob in zip(sampled, result.token_ids, result.logprobs, strict=True):
            outputs.append(self._append(seq, token, logprob, now))
        return outputs

    def _append(self, seq: Sequence, token: int, logprob, now: float) -> StepOutput:
        request = self.requests[seq.request_id]
        params = seq.params
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        new_ids = [token]
        inserted: list[int] = []
        finish = None
        if token in self.eos_token_ids and not params.ignore_eos:
            finish, seq.stop_reason = "stop", None
        elif token in params.stop_token_ids:
            finish, seq.stop_reason = "stop", token
        else:
            request.text += request.detokenizer.add(token)
            thinking = seq.thinking
            if thinking is not None and not thinking.finished:
                if thinking.observe(token):  # the budget is spent: close the reasoning ourselves
                    thinking.close()
                    inserted = self.stop_thinking_ids + seq.answer_prefix_ids
                elif thinking.finished and seq.answer_prefix_ids:  # the model closed it
                    inserted = self.think_gap_ids + seq.answer_prefix_ids
            if inserted:
                seq.token_ids.extend(inserted)
                seq.logprobs.extend([None] * len(inserted))
                new_ids += inserted
                request.text += request.detokenizer.add(inserted)
            finish = self._check_stop_strings(request)
        if finish is None and (
            params.max_tokens is not None
            and seq.num_output_tokens >= params.max_tokens
            or seq.num_tokens >= self.config.max_model_len
        ):
            finish = "length"
        if finish is not None:
            if not isinstance(seq.stop_reason, str):  # a stop string already cut the text where it ends
                request.text += request.detokenizer.flush()
            seq.finish_reason = finish
            seq.finish_time = now
            self.scheduler.finish(seq)
        new_text = self._releasable_text(request, finished=finish is not None)
        if finish is not None:
            del self.requests[seq.request_id]
        return StepOutput(
            seq.request_id,
            new_ids,
            new_text,
            finish is not None,
            finish,
            seq.logprobs[-len(new_ids) :],
            inserted,
        )

    def _check_stop_strings(self, request: _Request) -> str | None:
        stops = request.seq.params.stop
        if not stops:
            return None
        window_start = max(0, request.emitted - max(len(s) for s in stops))
        hits = [(request.text.find(s, window_start), s) for s in stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        request.text = request.text[:index]
        request.seq.stop_reason = stop
        return "stop"

    def _releasable_text(self, request: _Request, finished: bool) -> str:
        """New text that cannot turn out to be the start of a stop string (held back until it can't)."""
        end = len(request.text)
        if not finished:
            for stop in request.seq.params.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if request.text.endswith(stop[:k]):
                        end = min(end, len(request.text) - k)
                        break
        end = max(end, request.emitted)
        new = request.text[request.emitted : end]
        request.emitted = end
        return new
