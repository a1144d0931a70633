"""``qwen3.LLM``: offline batched generation and chat, the shape users know from vLLM.

``LLM`` loads a checkpoint and its tokenizer, sizes the paged KV cache, and drives the engine until
every submitted request is done. Chat renders conversations with the checkpoint's template, applies
Qwen3's recommended sampling for the mode when the caller gives none, and splits the output into
reasoning, content and tool calls.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qwen3 import kernels
from qwen3.chat import THINK_OPEN, ToolCall, parse_output, render, soft_switch
from qwen3.checkpoint import load_model
from qwen3.engine.llm_engine import EngineConfig, LLMEngine, StepOutput
from qwen3.hub import resolve_model_dir
from qwen3.sampling import RECOMMENDED, SamplingParams
from qwen3.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Conversation = Sequence[Mapping[str, Any]]
DEFAULT_CPU_KV_BYTES = 4 << 30


def default_model_dir() -> Path:
    """The tiny Qwen3 shipped inside the package (used when no model is given)."""
    path = Path(__file__).parent / "default_model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            "no default model is shipped with this build of qwen3 yet; pass a model "
            "(a checkpoint folder or a Hugging Face Hub repo id)"
        )
    return path


def parse_memory(value: int | str | None) -> int | None:
    """``"2GiB"``, ``"512MB"``, ``1 << 30`` -> bytes."""
    if value is None or isinstance(value, int):
        return value
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    text = value.strip().lower()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


@dataclass
class Completion:
    """One generated continuation (a request with ``n > 1`` has several)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    # The first completion's fields, for the common n == 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list | None:
        return self.outputs[0].logprobs


@dataclass
class ChatOutput:
    reasoning: str | None
    content: str
    tool_calls: list[ToolCall]
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, int]
    text: str = ""  # the raw generated text the fields were parsed from


@dataclass
class ChatRequest:
    """A rendered chat prompt and how to read what comes back."""

    prompt_token_ids: list[int]
    params: SamplingParams
    thinking_budget: int | None
    reasoning_started: bool  # the prompt itself opened <think> (Thinking-2507 template)
    answer_prefix_ids: list[int] = field(default_factory=list)  # the engine inserts them after </think>
    parse_prefix: str = ""  # answer text the prompt already holds: the output parser reads it first


class LLM:
    """A Qwen3 model with its tokenizer and a serving engine, for offline use from Python."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        kv_cache_memory: int | str | None = None,
        block_size: int = 16,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        progress: bool = True,
    ) -> None:
        folder = default_model_dir() if model is None else resolve_model_dir(model)
        self.model_dir = folder
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(folder, dtype=dtype, device=device, progress=progress)
        if self.model.use_cpu_kernels():
            logger.info("using qwen3's CPU kernels (%s) for the linear layers", kernels.kernel_isa())
        self.tokenizer = Tokenizer.from_pretrained(folder)
        self.generation_config = _read_json(folder / "generation_config.json")
        config = self.model.config
        max_model_len = max_model_len or config.max_position_embeddings
        memory = parse_memory(kv_cache_memory)
        if memory is None:
            per_token = LLMEngine.num_blocks_for_memory(self.model, 1, 1 << 40)
            memory = min((1 << 40) // per_token * max_num_seqs * max_model_len, DEFAULT_CPU_KV_BYTES)
        num_blocks = LLMEngine.num_blocks_for_memory(self.model, block_size, memory)
        engine_config = EngineConfig(
            max_model_len=max_model_len,
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_num_batched_tokens, 1),
            enable_prefix_caching=enable_prefix_caching,
        )
        self.engine = LLMEngine(self.model, self.tokenizer, engine_config, self.eos_token_ids())
        # Held while anything steps the engine: offline calls and an AsyncLLM thread may share it.
        self.lock = threading.RLock()
        logger.info(
            "KV cache: %d blocks of %d tokens (%.0f MiB), max_model_len %d",
            num_blocks,
            block_size,
            memory / 2**20,
            max_model_len,
        )

    def eos_token_ids(self) -> set[int]:
        """Stop ids: generation_config's (151645 and 151643 for Qwen3), config.json's and the tokenizer's."""
        ids: set[int] = set()
        for value in (self.generation_config.get("eos_token_id"), self.model.config.eos_token_id):
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, with ``overrides`` on top."""
        return SamplingParams.from_generation_config(self.model_dir, **overrides)

    # --- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        sampling: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or token ids) and return the outputs in prompt order."""
        batch = _as_prompt_list(prompts)
        sampling = sampling or self.default_sampling_params()
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in batch]
        return self._run([ChatRequest(i, sampling, None, False) for i in ids], use_tqdm)

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        sampling: SamplingParams | None = None,
        enable_thinking: bool = True,
        thinking_budget: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        use_tqdm: bool = False,
        chat_template: str | None = None,
        answer_prefix: str = "",
        **template_kwargs: Any,
    ) -> ChatOutput | list[ChatOutput]:
        """Answer one conversation (returns a ChatOutput) or a list of them (returns a list).

        ``thinking_budget`` caps the tokens spent inside ``<think>``; 0 means non-thinking mode.
        Without ``sampling``, Qwen3's recommended settings for the mode are used. ``chat_template``
        replaces the checkpoint's template; ``template_kwargs`` become template variables.
        ``answer_prefix`` forces the start of the answer (see :meth:`prepare_chat`).
        """
        single = bool(conversations) and isinstance(conversations[0], Mapping)
        convs: list[Conversation] = [conversations] if single else list(conversations)  # type: ignore[list-item]
        options = dict(tools=tools, chat_template=chat_template, answer_prefix=answer_prefix)
        requests = [
            self.prepare_chat(c, sampling, enable_thinking, thinking_budget, **options, **template_kwargs)
            for c in convs
        ]
        results = self._run(requests, use_tqdm)
        outputs = [self._chat_output(res, req) for res, req in zip(results, requests, strict=True)]
        return outputs[0] if single else outputs

    def recommended_sampling(
        self, messages: Conversation, enable_thinking: bool = True, thinking_budget: int | None = None
    ) -> SamplingParams:
        """Qwen3's recommended sampling for the mode this conversation will run in.

        The mode is the hard switch (``enable_thinking``, budget 0 = off), then, when thinking is on,
        the latest ``/think`` or ``/no_think`` soft switch in the conversation: the model follows that
        flag, so a ``/no_think`` turn is sampled with the non-thinking settings.
        """
        thinking = enable_thinking and thinking_budget != 0 and soft_switch(messages) is not False
        return self.default_sampling_params(**RECOMMENDED[thinking])

    def prepare_chat(
        self,
        messages: Conversation,
        sampling: SamplingParams | None = None,
        enable_thinking: bool = True,
        thinking_budget: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        answer_prefix: str = "",
        **template_kwargs: Any,
    ) -> ChatRequest:
        """Render one conversation and choose its sampling: what :meth:`chat` and streaming both submit.

        ``answer_prefix`` is text the answer must start with (a server forcing a tool call puts
        ``<tool_call>`` here). In non-thinking mode it simply ends the prompt. In thinking mode the model
        thinks first: the prompt opens ``<think>`` (as the model itself would) and the engine inserts the
        prefix right after ``</think>``, whether the model closes its thinking or the budget does.
        """
        thinking = enable_thinking and thinking_budget != 0
        sampling = sampling or self.recommended_sampling(messages, enable_thinking, thinking_budget)
        prompt = render(
            messages,
            tools=tools,
            enable_thinking=thinking,
            template=chat_template or self.tokenizer.chat_template,
            **template_kwargs,
        )
        started = prompt.rstrip().endswith(THINK_OPEN)
        prefix_ids: list[int] = []
        parse_prefix = ""
        if answer_prefix and thinking:
            if not started:
                prompt, started = prompt + THINK_OPEN + "\n", True
            prefix_ids = self.tokenizer.encode(answer_prefix)
        elif answer_prefix:
            prompt, parse_prefix = prompt + answer_prefix, answer_prefix
        return ChatRequest(
            self.tokenizer.encode(prompt),
            sampling,
            thinking_budget if thinking else None,
            started,
            prefix_ids,
            parse_prefix,
        )

    def _chat_output(self, result: RequestOutput, request: ChatRequest) -> ChatOutput:
        started = request.reasoning_started
        reasoning, content, tool_calls = parse_output(request.parse_prefix + result.text, started)
        finish = result.finish_reason
        if tool_calls and finish == "stop":
            finish = "tool_calls"
        return ChatOutput(
            reasoning,
            content,
            tool_calls,
            result.token_ids,
            finish,
            self.usage(result.prompt_token_ids, result.token_ids, started),
            result.text,
        )

    def usage(
        self, prompt_ids: list[int], output_ids: list[int], reasoning_started: bool = False
    ) -> dict[str, int]:
        """Token counts; reasoning tokens run up to and including ``</think>`` (all, if it never closed)."""
        end_id = self.engine.think_end_id
        start_id = self.engine.think_start_id
        if end_id in output_ids:
            reasoning = output_ids.index(end_id) + 1
        elif reasoning_started or start_id in output_ids:
            reasoning = len(output_ids)
        else:
            reasoning = 0
        return {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(output_ids),
            "reasoning_tokens": reasoning,
            "total_tokens": len(prompt_ids) + len(output_ids),
        }

    def _run(self, jobs: list[ChatRequest], use_tqdm: bool) -> list[RequestOutput]:
        """Submit every job (``n`` sequences each), step the engine until all finish, collect in order."""
        with self.lock:
            if self.engine.has_unfinished():
                raise RuntimeError("the engine is serving streaming requests; submit through AsyncLLM.stream")
            return self._run_locked(jobs, use_tqdm)

    def _run_locked(self, jobs: list[ChatRequest], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        texts: dict[str, list[str]] = {}
        order: list[tuple[str, list[str]]] = []
        for job in jobs:
            request_id = uuid.uuid4().hex
            seq_ids = []
            params = job.params
            for i in range(params.n):
                seed = params.seed + i if params.seed is not None else None
                seq_id = f"{request_id}-{i}"
                engine.add_request(
                    seq_id,
                    job.prompt_token_ids,
                    params.replace(seed=seed, n=1),
                    job.thinking_budget,
                    job.reasoning_started,
                    job.answer_prefix_ids,
                )
                texts[seq_id] = []
                seq_ids.append(seq_id)
            order.append((request_id, seq_ids))
        seqs = {sid: engine.requests[sid].seq for sid in texts}
        bar = tqdm(total=len(seqs), desc="Generating", unit="seq", disable=not use_tqdm)
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    texts[out.request_id].append(out.new_text)
                    bar.update(out.finished)
        except BaseException:
            for sid in texts:
                engine.abort(sid)
            raise
        finally:
            bar.close()
        results = []
        for request_id, seq_ids in order:
            completions = []
            for i, sid in enumerate(seq_ids):
                seq = seqs[sid]
                completions.append(
                    Completion(
                        i,
                        "".join(texts[sid]),
                        seq.output_token_ids,
                        seq.finish_reason,
                        seq.stop_reason,
                        seq.logprobs if seq.params.logprobs is not None else None,
                    )
                )
            first = seqs[seq_ids[0]]
            results.append(
                RequestOutput(
                    request_id, first.prompt_token_ids, completions, first.num_prefix_cached, _metrics(first)
                )
            )
        return results

    def stats(self) -> dict[str, float]:
        blocks = self.engine.blocks
        return {
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_used": blocks.num_used,
            "prefix_cache_hit_rate": blocks.hit_rate,
            "preemptions": self.engine.scheduler.num_preemptions,
            "steps": self.engine.num_steps,
        }


def _metrics(seq) -> dict[str, float]:
    end = seq.finish_time or seq.arrival_time
    first = seq.first_token_time or end
    n = seq.num_output_tokens
    return {
        "time_to_first_token_s": first - seq.arrival_time,
        "total_time_s": end - seq.arrival_time,
        "decode_tokens_per_s": (n - 1) / (end - first) if n > 1 and end > first else 0.0,
        "preemptions": float(seq.num_preemptions),
    }


def _as_prompt_list(prompts: Any) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    return prompts


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


__all__ = ["LLM", "ChatOutput", "Completion", "RequestOutput", "StepOutput", "default_model_dir"]
