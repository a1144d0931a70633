"""``qwen3.LLM``: offline batched generation and chat, the shape users know from vLLM.

``LLM`` loads a checkpoint and its tokenizer, sizes the paged KV cache, and drives the engine until
every submitted request is done. Chat renders conversations with the checkpoint's template, applies
Qwen3's recommended sampling for the mode when the caller gives none, and splits the output into
reasoning, content and tool calls.
"""

from __future__ import annotations

import dataclasses
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
from qwen3.chat import (
    CONTENT_TAGS,
    THINK_OPEN,
    ToolCall,
    parse_output,
    reasoning_opened,
    render,
    soft_switch,
)
from qwen3.checkpoint import load_config, load_model
from qwen3.config import parse_dtype
from qwen3.distributed import TensorParallel, Workers, launched_rank, local_ranks, rank_device, serve_rank
from qwen3.engine.attention import DECODE_GATHER_KEYS
from qwen3.engine.llm_engine import STOP_THINKING_TEXT, EngineConfig, LLMEngine, ThinkingTokens
from qwen3.engine.memory import default_budget, plan_kv_cache
from qwen3.gguf_checkpoint import GGUFCheckpoint, is_gguf, load_gguf_model, resolve_gguf
from qwen3.hub import CheckpointError, read_json, resolve_model_dir
from qwen3.jinja_sandbox import RenderLimits
from qwen3.layers import NoCache
from qwen3.output_processor import RequestState
from qwen3.sampling import RECOMMENDED, SamplingError, SamplingParams
from qwen3.structured import GrammarBackend
from qwen3.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Conversation = Sequence[Mapping[str, Any]]


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
    error: str | None = None  # why the engine failed this sequence (finish_reason "error")


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)  # of the first completion (reasoning counted)

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
    thinking: bool = False  # thinking mode: the model may reason first (a grammar applies after it)


class LLM:
    """A Qwen3 model with its tokenizer and a serving engine, for offline use from Python."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        kv_cache_memory: int | str | None = None,
        kv_cache_fraction: float | None = None,
        block_size: int = 16,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        attention_backend: str | None = None,
        batch_invariant: bool = False,
        skip_tokenizer_init: bool = False,
        progress: bool = True,
        tensor_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
    ) -> None:
        """Load ``model`` (a folder, Hub repo id, GGUF file or ``owner/repo:FILE.gguf``; None: the shipped
        tiny Qwen3) and size its engine.

        ``tokenizer`` reads the tokenizer from another folder or repo; ``skip_tokenizer_init`` runs
        without one (token-id prompts only, no chat, no stop strings, as vLLM's option). The KV cache takes
        ``kv_cache_memory`` bytes ("8GiB") if given, else ``kv_cache_fraction`` of the memory free after the
        weights (defaults: half the available RAM on CPU, 0.9 of the GPU; see ``qwen3.engine.memory``);
        ``max_model_len`` defaults to the checkpoint's context, lowered with a warning if it does not fit.
        ``attention_backend``: "kernel" (qwen3's CPU kernel), "torch", or None for the best that runs.
        On the CPU kernels results never depend on the batch; ``batch_invariant`` makes the torch path
        (CUDA) so too, at a cost (fixed-shape steps; see ``qwen3.engine.model_runner``).
        ``tensor_parallel_size`` N > 1 spawns N - 1 worker processes, each holding its shard of the weights
        and of the KV cache (``qwen3.distributed``); this process is rank 0. Call :meth:`close` to stop them.
        Under a launcher (``torchrun``, one process per rank, on one machine or several) nothing is spawned:
        rank 0's constructor returns, and on every other rank it serves rank 0's steps until rank 0 closes,
        then exits the process (``SystemExit(0)``), so the same script or ``qwen3 serve`` runs on every rank.
        ``enable_expert_parallel`` (MoE): each rank holds E / N whole experts rather than a slice of each.
        The KV-cache budget (``kv_cache_memory``) is per rank; the default one is shared by the ranks on
        this machine.
        """
        gguf = GGUFCheckpoint(resolve_gguf(model)) if model is not None and is_gguf(model) else None
        folder = default_model_dir() if model is None else gguf.path if gguf else resolve_model_dir(model)
        self.model_dir = folder  # the folder, or the GGUF file
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tp = None
        if tensor_parallel_size > 1:  # refuses a config it cannot split, before anything starts
            config = gguf.config() if gguf else load_config(folder)
            tp = TensorParallel(0, tensor_parallel_size, config, expert_parallel=enable_expert_parallel)
            if launched_rank() not in (None, 0):  # a launcher's rank > 0: a worker, never an LLM
                serve_rank(tensor_parallel_size, str(folder), dtype, str(device), enable_expert_parallel)
                raise SystemExit(0)
            device = rank_device(device, 0)
        elif enable_expert_parallel:
            raise ValueError("enable_expert_parallel needs tensor_parallel_size > 1")
        max_num_batched_tokens = max(max_num_batched_tokens, 1)
        memory = parse_memory(kv_cache_memory)
        plan = None
        kv_heads = tp.num_kv_heads if tp else None
        if memory is not None:  # sized by the caller: check it before spending time on the weights
            config = gguf.config() if gguf else load_config(folder)
            cache_dtype = (
                parse_dtype(dtype) or config.torch_dtype or (torch.bfloat16 if gguf else torch.float32)
            )
            plan = plan_kv_cache(
                config, cache_dtype, memory, "kv_cache_memory", block_size, max_num_seqs, max_model_len,
                kv_heads,
            )  # fmt: skip
        # The small files first, so a broken tokenizer or generation config fails before the weights load.
        self.tokenizer = None
        if not skip_tokenizer_init:
            self.tokenizer = (
                gguf.tokenizer()
                if gguf and tokenizer is None
                else Tokenizer.from_pretrained(tokenizer or folder)
            )
        self.generation_config = (
            gguf.generation_config() if gguf else self._generation_config(folder / "generation_config.json")
        )
        self.workers: Workers | None = None
        if tp is not None:
            self.workers = Workers(tensor_parallel_size, str(folder), dtype, device, enable_expert_parallel)
            try:
                tp = dataclasses.replace(tp, group=self.workers.group)
                if gguf:
                    self.model = load_gguf_model(gguf, dtype=dtype, device=device, progress=progress, tp=tp)
                else:
                    self.model = load_model(folder, dtype=dtype, device=device, progress=progress, tp=tp)
            except BaseException:
                self.workers.close()
                raise
        elif gguf:
            self.model = load_gguf_model(gguf, dtype=dtype, device=device, progress=progress)
        else:
            self.model = load_model(folder, dtype=dtype, device=device, progress=progress)
        if self.model.use_cpu_kernels():
            logger.info("using qwen3's CPU kernels (%s)", kernels.kernel_isa())
        if plan is None:  # a share of what is free now that the weights are in
            peak = self._activation_peak(max_num_batched_tokens, max_num_seqs) if device.type == "cuda" else 0
            budget, source = default_budget(device, kv_cache_fraction, peak)
            if tp is not None and device.type == "cpu":  # one RAM for the ranks on this machine
                ranks = local_ranks(tensor_parallel_size)
                budget, source = budget // ranks, f"{source}, shared by {ranks} ranks"
            plan = plan_kv_cache(
                self.model.config, self.model.dtype, budget, source, block_size, max_num_seqs, max_model_len,
                kv_heads,
            )  # fmt: skip
        engine_config = EngineConfig(
            max_model_len=plan.max_model_len,
            num_blocks=plan.num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            eos_token_ids=frozenset(self.eos_token_ids()),
            thinking=self._thinking_tokens(),
            grammars=self._grammar_backend(),
            attention_backend=attention_backend,
            batch_invariant=batch_invariant,
        )
        self.engine = LLMEngine(self.model, engine_config, self.workers)
        # Held while anything steps the engine: offline calls and an AsyncLLM thread may share it.
        self.lock = threading.RLock()
        logger.info(
            "KV cache: %d blocks of %d tokens (%.0f MiB; %s), max_model_len %d, attention: %s",
            plan.num_blocks, block_size, plan.memory_bytes / 2**20, plan.budget_source, plan.max_model_len,
            type(self.engine.runner.backend).__name__,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (the LLM cannot generate afterwards)."""
        if self.workers is not None:
            self.workers.close()

    def refresh_weights(self) -> None:
        """Take up changes made in place to ``self.model``'s weights (a trainer that updates this model, as
        GRPO does between rollouts): repack them for the CPU kernels, whose copies would be stale, and drop
        the prefix cache, whose keys and values the old weights computed. No request may be running."""
        if self.workers is not None:
            raise ValueError("refresh_weights: not with tensor_parallel_size > 1 (the ranks hold shards)")
        with self.lock:
            if self.engine.has_unfinished():
                raise RuntimeError("refresh_weights: requests are running")
            self.model.use_cpu_kernels()
            self.engine.blocks.reset_prefix_cache()

    @torch.inference_mode()
    def _activation_peak(self, tokens: int, rows: int) -> int:
        """Bytes a forward pass of the largest step adds on CUDA (vLLM's profile run, before the cache exists),
        plus what the torch attention backend's decode gathers can add (bounded by DECODE_GATHER_KEYS)."""
        torch.cuda.synchronize(self.model.device)
        torch.cuda.reset_peak_memory_stats(self.model.device)
        before = torch.cuda.memory_allocated(self.model.device)
        ids = torch.zeros(1, tokens, dtype=torch.long, device=self.model.device)
        hidden = self.model.hidden_states(ids, backend=NoCache())
        self.model.compute_logits(hidden[0, : min(rows, tokens)]).float().softmax(-1)
        peak = torch.cuda.max_memory_allocated(self.model.device) - before
        del hidden
        torch.cuda.empty_cache()
        c = self.model.config
        element = torch.empty((), dtype=self.model.dtype).element_size()
        # keys and values gathered, and SDPA's grouped-query expansion of them to every query head
        gather = (
            2 * DECODE_GATHER_KEYS * c.head_dim * element * (c.num_key_value_heads + c.num_attention_heads)
        )
        return int(peak) + gather

    def _thinking_tokens(self) -> ThinkingTokens | None:
        tok = self.tokenizer
        if tok is None:
            return None
        start, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
        if start is None or end is None:
            return None
        return ThinkingTokens(start, end, tok.encode(STOP_THINKING_TEXT), tok.encode("\n\n"))

    def _grammar_backend(self) -> GrammarBackend | None:
        """Structured outputs over this tokenizer and the model's vocabulary (its logits' width)."""
        tok = self.tokenizer
        if tok is None:
            return None
        eos = self.eos_token_ids()
        return GrammarBackend(
            tok.backend.to_str(), self.model.config.vocab_size, eos, tok.token_to_id("<think>")
        )

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer; this LLM was made with skip_tokenizer_init=True")
        return self.tokenizer

    def eos_token_ids(self) -> set[int]:
        """Stop ids: generation_config's (151645 and 151643 for Qwen3), config.json's and the tokenizer's."""
        ids: set[int] = set()
        for value in (self.generation_config.get("eos_token_id"), self.model.config.eos_token_id):
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @staticmethod
    def _generation_config(path: Path) -> dict[str, Any]:
        """generation_config.json, its values checked (a bad one fails before the weights load)."""
        generation_config = read_json(path)
        try:
            SamplingParams.from_generation_config(generation_config)
            check_token_ids(generation_config.get("eos_token_id"))
        except (SamplingError, ValueError) as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return generation_config

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, with ``overrides`` on top."""
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    # --- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or token ids) and return the outputs in prompt order.

        ``sampling`` is one SamplingParams for every prompt, or one per prompt (as vLLM takes them)."""
        batch = _as_prompt_list(prompts)
        params = _per_prompt(sampling, len(batch), self.default_sampling_params)
        ids = [
            self._require_tokenizer("a text prompt").encode(p) if isinstance(p, str) else list(p)
            for p in batch
        ]
        return self.run_requests(
            [ChatRequest(i, p, None, False) for i, p in zip(ids, params, strict=True)], use_tqdm
        )

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        enable_thinking: bool = True,
        thinking_budget: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        use_tqdm: bool = False,
        chat_template: str | None = None,
        answer_prefix: str = "",
        plain_text_messages: bool = False,
        **template_kwargs: Any,
    ) -> ChatOutput | list[ChatOutput]:
        """Answer one conversation (returns a ChatOutput) or a list of them (returns a list).

        ``thinking_budget`` caps the tokens spent inside ``<think>``; 0 means non-thinking mode.
        Without ``sampling``, Qwen3's recommended settings for the mode are used; a list gives one per
        conversation. ``SamplingParams(structured_outputs=...)`` holds the answer to a schema, regex, choice
        or grammar, applied after the reasoning (see :mod:`qwen3.structured`). ``chat_template``
        replaces the checkpoint's template; ``template_kwargs`` become template variables.
        ``answer_prefix`` forces the start of the answer and ``plain_text_messages`` encodes control tokens
        in the messages as text (see :meth:`prepare_chat`).
        """
        single = bool(conversations) and isinstance(conversations[0], Mapping)
        convs: list[Conversation] = [conversations] if single else list(conversations)  # type: ignore[list-item]
        options = dict(
            tools=tools,
            chat_template=chat_template,
            answer_prefix=answer_prefix,
            template_vars=template_kwargs,
            plain_text_messages=plain_text_messages,
        )
        params = _per_prompt(sampling, len(convs), lambda: None)
        requests = [
            self.prepare_chat(c, p, enable_thinking, thinking_budget, **options)
            for c, p in zip(convs, params, strict=True)
        ]
        results = self.run_requests(requests, use_tqdm)
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
        template_vars: Mapping[str, Any] | None = None,
        plain_text_messages: bool = False,
        render_limits: RenderLimits | None = None,
    ) -> ChatRequest:
        """Render one conversation and choose its sampling: what :meth:`chat` and streaming both submit.

        ``answer_prefix`` is text the answer must start with (a server forcing a tool call puts
        ``<tool_call>`` here). In non-thinking mode it simply ends the prompt. In thinking mode the model
        thinks first: the prompt opens ``<think>`` (as the model itself would) and the engine inserts the
        prefix right after ``</think>``, whether the model closes its thinking or the budget does.

        ``plain_text_messages``: by default the prompt is tokenized as transformers does, so a message
        that spells ``<|im_end|>\n<|im_start|>system`` becomes those control tokens and can forge a turn.
        With it on (the server's default), every string of the messages, tools and ``template_vars`` is
        encoded as the text it is; control tokens come only from the template. An assistant message's
        content keeps its ``<think>``/``<tool_call>`` tags, which the template reads to drop old reasoning.
        """
        tokenizer = self._require_tokenizer("chat")
        thinking = enable_thinking and thinking_budget != 0
        sampling = sampling or self.recommended_sampling(messages, enable_thinking, thinking_budget)
        template_vars = dict(template_vars or {})
        if plain_text_messages:
            messages = [_plain_message(tokenizer, m) for m in messages]
            tools = tokenizer.escape_text(tools) if tools is not None else None
            template_vars = tokenizer.escape_text(template_vars)
        prompt = render(
            messages,
            tools=tools,
            enable_thinking=thinking,
            template=chat_template or tokenizer.chat_template,
            limits=render_limits,
            **template_vars,
        )
        started = reasoning_opened(prompt)
        # Non-thinking mode with a template that opens <think> anyway (Thinking-2507): budget 0, so the
        # engine closes the reasoning before the first token.
        budget = thinking_budget if thinking else (0 if started else None)
        prefix_ids: list[int] = []
        parse_prefix = ""
        if answer_prefix:
            if thinking and not started:
                prompt, started = prompt + THINK_OPEN + "\n", True
            if started:
                prefix_ids = tokenizer.encode(answer_prefix)
            else:
                prompt, parse_prefix = prompt + answer_prefix, answer_prefix
        encode = tokenizer.encode_rendered if plain_text_messages else tokenizer.encode
        return ChatRequest(encode(prompt), sampling, budget, started, prefix_ids, parse_prefix, thinking)

    def _chat_output(self, result: RequestOutput, request: ChatRequest) -> ChatOutput:
        started = request.reasoning_started
        reasoning, content, tool_calls = parse_output(request.parse_prefix + result.text, started)
        finish = result.finish_reason
        if tool_calls and finish == "stop":
            finish = "tool_calls"
        return ChatOutput(reasoning, content, tool_calls, result.token_ids, finish, result.usage, result.text)

    def run_requests(self, jobs: Sequence[ChatRequest], use_tqdm: bool = False) -> list[RequestOutput]:
        """Submit every job (``n`` sequences each), step the engine until all finish, collect in order.

        The raw outputs (token ids, logprobs) of requests made by :meth:`prepare_chat`, with their thinking
        budgets: what training rollouts need, where :meth:`chat` returns parsed replies."""
        with self.lock:
            if self.engine.has_unfinished():
                raise RuntimeError("the engine is serving streaming requests; submit through AsyncLLM.stream")
            return self._run_locked(list(jobs), use_tqdm)

    def _run_locked(self, jobs: list[ChatRequest], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        states: dict[str, RequestState] = {}
        order: list[tuple[str, list[str]]] = []
        try:
            for job in jobs:
                request_id = uuid.uuid4().hex
                seq_ids = []
                params = job.params
                for i in range(params.n):
                    seq_id = f"{request_id}-{i}"
                    seq_params = params.for_choice(i)
                    states[seq_id] = RequestState(
                        seq_id,
                        job.prompt_token_ids,
                        seq_params,
                        self.tokenizer,
                        reasoning_started=job.reasoning_started,
                    )
                    engine.add_request(
                        seq_id, job.prompt_token_ids, seq_params, job.thinking_budget, job.reasoning_started,
                        job.answer_prefix_ids, job.thinking,
                    )  # fmt: skip
                    seq_ids.append(seq_id)
                order.append((request_id, seq_ids))
            with tqdm(total=len(states), desc="Generating", unit="seq", disable=not use_tqdm) as bar:
                while engine.has_unfinished():
                    for out in engine.step():
                        state = states[out.request_id]
                        delta = state.process(out)
                        if state.finished and not out.finished:  # a stop string: the engine has not seen it
                            engine.abort(out.request_id)
                        if delta is not None and delta.error:
                            logger.error("request %s failed: %s", out.request_id, delta.error)
                        bar.update(int(delta is not None and delta.finished))
        except BaseException:
            for sid in states:
                engine.abort(sid)
            raise
        results = []
        for request_id, seq_ids in order:
            completions = []
            for i, sid in enumerate(seq_ids):
                st = states[sid]
                completions.append(
                    Completion(
                        i, st.text, st.token_ids, st.finish_reason, st.stop_reason,
                        st.logprobs if st.params.logprobs is not None else None,
                        st.error,
                    )
                )  # fmt: skip
            first = states[seq_ids[0]]
            results.append(
                RequestOutput(
                    request_id, jobs[len(results)].prompt_token_ids, completions, first.num_cached_tokens,
                    first.metrics, first.usage(),
                )
            )  # fmt: skip
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


def _as_prompt_list(prompts: Any) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    return prompts


def _per_prompt(sampling: Any, count: int, default: Any) -> list[Any]:
    """``sampling`` as one entry per prompt: a list as given (its length checked), else repeated."""
    if isinstance(sampling, Sequence):
        if len(sampling) != count:
            raise ValueError(f"sampling: {len(sampling)} SamplingParams for {count} prompts")
        return list(sampling)
    sampling = sampling if sampling is not None else default()
    return [sampling] * count


def _plain_message(tokenizer: Tokenizer, message: Any) -> Any:
    """A message with its strings marked as plain text (the role is the template's to read). The content
    keeps the tags the template itself reads there: an assistant's reasoning and tool-call tags, and the
    ``<tool_response>`` wrapping of a tool result sent as a user message."""
    if not isinstance(message, Mapping):
        return message  # render names what is wrong with it
    tags = CONTENT_TAGS.get(message.get("role"), ())
    plain = {}
    for key, value in message.items():
        if key == "tool_calls" and isinstance(value, list):
            value = [call.to_openai() if isinstance(call, ToolCall) else call for call in value]
        plain[key] = (
            value if key == "role" else tokenizer.escape_text(value, tags if key == "content" else ())
        )
    return plain


def check_token_ids(value: Any) -> None:
    """An ``eos_token_id`` as generation_config.json gives it: None, an id, or a list of ids."""
    ids = value if isinstance(value, list) else [value] if value is not None else []
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a token id or a list of them, got {value!r}")


__all__ = ["LLM", "ChatOutput", "Completion", "RequestOutput", "default_model_dir"]
