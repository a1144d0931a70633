"""``POST /v1/completions``: raw prompts (text or token ids, one or many) continued without a chat template.

Sampling starts from the checkpoint's generation_config and takes the client's fields on top; like
OpenAI's legacy endpoint, ``max_tokens`` defaults to 16. ``response_format``, ``structured_outputs`` and
``guided_*`` constrain the continuation from its first token (no chat, so no reasoning to leave free).
Choice ``p * n + i`` is choice ``i`` of prompt ``p``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from qwen3.async_llm import AsyncLLM
from qwen3.sampling import SamplingParams
from qwen3.server.errors import APIError
from qwen3.server.protocol import CompletionRequest
from qwen3.server.serving import (
    SSE_DONE,
    ServerState,
    TokenText,
    Usage,
    completion_logprobs,
    merge,
    new_id,
    sse,
)
from qwen3.structured import GrammarError

logger = logging.getLogger(__name__)


def prepare(state: ServerState, body: CompletionRequest) -> tuple[list[list[int]], SamplingParams]:
    """Tokenise the prompts and pick sampling; a bad field is a 400 naming it."""
    llm = state.llm
    try:
        constraint, where = body.constraint()
    except GrammarError as exc:
        raise APIError(400, str(exc), param=exc.field) from None
    overrides = {**body.sampling_overrides(), "n": body.n, "structured_outputs": constraint}
    params = state.sampling(llm.default_sampling_params(), overrides, body.param_name)
    prompts = []
    for i, prompt in enumerate(body.prompts()):
        try:
            prompts.append(llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt))
        except ValueError as exc:
            name = "prompt" if len(body.prompts()) == 1 else f"prompt[{i}]"
            raise APIError(400, f"{name}: {exc}", param=name) from None

    def param_name(field: str) -> str:
        return where if field == "structured_outputs" else body.param_name(field)

    for i, ids in enumerate(prompts):
        state.check_prompt(ids, params, "prompt" if len(prompts) == 1 else f"prompt[{i}]", param_name)
    return prompts, params


def _streams(
    state: ServerState,
    front: AsyncLLM,
    prompts: list[list[int]],
    params: SamplingParams,
    request_id: str,
    arrival: float,
) -> list[AsyncIterator]:
    n = params.n
    return [
        state.metrics.observe(
            front.stream(ids, params.for_choice(i), f"{request_id}-{p * n + i}"),
            arrival,
        )
        for p, ids in enumerate(prompts)
        for i in range(n)
    ]


def _usage(prompts: list[list[int]]) -> Usage:
    usage = Usage()
    usage.prompt = sum(len(ids) for ids in prompts)
    return usage


async def complete(
    state: ServerState,
    front: AsyncLLM,
    body: CompletionRequest,
    prompts: list[list[int]],
    params: SamplingParams,
    arrival: float,
) -> dict[str, Any]:
    request_id = new_id("cmpl")
    count = len(prompts) * params.n
    texts: list[list[str]] = [[] for _ in range(count)]
    ids: list[list[int]] = [[] for _ in range(count)]
    logprobs: list[list] = [[] for _ in range(count)]
    finish: list[str | None] = [None] * count
    usage = _usage(prompts)
    async for i, delta in merge(_streams(state, front, prompts, params, request_id, arrival)):
        texts[i].append(delta.text)
        ids[i] += delta.token_ids
        logprobs[i] += delta.logprobs
        if delta.finished:
            finish[i] = delta.finish_reason
            usage.add(delta)
    token_text = TokenText(state.llm.tokenizer)
    choices = [
        {
            "index": i,
            "text": "".join(texts[i]),
            "logprobs": completion_logprobs(ids[i], logprobs[i], token_text, 0)
            if body.logprobs is not None
            else None,
            "finish_reason": finish[i],
        }
        for i in range(count)
    ]
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": choices,
        "usage": usage.body(reasoning=False),
    }


async def stream(
    state: ServerState,
    front: AsyncLLM,
    body: CompletionRequest,
    prompts: list[list[int]],
    params: SamplingParams,
    arrival: float,
) -> AsyncIterator[str]:
    request_id = new_id("cmpl")
    created = int(time.time())
    include_usage = body.include_usage
    token_text = TokenText(state.llm.tokenizer)
    offsets = [0] * (len(prompts) * params.n)
    usage = _usage(prompts)

    def chunk(choice: dict[str, Any]) -> str:
        payload: dict[str, Any] = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": state.model_name,
            "choices": [choice],
        }
        if include_usage:
            payload["usage"] = None
        return sse(payload)

    try:
        async for i, delta in merge(_streams(state, front, prompts, params, request_id, arrival)):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(delta.token_ids, delta.logprobs, token_text, offsets[i])
                offsets[i] += sum(len(t) for t in logprobs["tokens"])
            if delta.finished:
                usage.add(delta)
            if delta.text or delta.finished or logprobs:
                reason = delta.finish_reason if delta.finished else None
                yield chunk({"index": i, "text": delta.text, "logprobs": logprobs, "finish_reason": reason})
        if include_usage:
            yield sse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": state.model_name,
                    "choices": [],
                    "usage": usage.body(reasoning=False),
                }
            )
    except Exception as exc:  # the engine failed mid-stream: report it in-band
        logger.exception("completion stream %s failed", request_id)
        yield sse(APIError(500, f"generation failed: {exc}").body())
    yield SSE_DONE
