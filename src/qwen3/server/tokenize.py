"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: the server's own tokenizer, for clients that count
tokens or check a prompt's size before they send it.

``/tokenize`` takes a ``prompt`` (encoded as ``/v1/completions`` encodes it) or ``messages`` (rendered
exactly as ``/v1/chat/completions`` renders them, tools, ``tool_choice`` and thinking controls included, so
the count is what that request's ``usage.prompt_tokens`` will say). Qwen3 adds no special tokens to a
prompt (no BOS), so ``add_special_tokens`` changes nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from qwen3.server import chat_completions
from qwen3.server.errors import APIError
from qwen3.server.protocol import ChatCompletionRequest, ChatMessage, _Body
from qwen3.server.serving import ServerState, TokenText

MAX_DETOKENIZE_TOKENS = 2**20  # ids in one /detokenize body (the body limit bounds it too)


class TokenizeRequest(ChatCompletionRequest):
    """vLLM's two tokenize bodies in one: ``{"prompt"}`` or ``{"messages", ...chat fields}``."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)  # type: ignore[assignment]
    prompt: str | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give a prompt or messages")
        if not self.add_generation_prompt:
            raise ValueError(
                "add_generation_prompt: false is not supported (the chat endpoint always adds it)"
            )
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


def tokenize(state: ServerState, body: TokenizeRequest) -> dict[str, Any]:
    """The prompt's token ids, their count and the context length (blocking: run off the event loop)."""
    llm = state.llm
    if body.messages is not None:
        ids = chat_completions.prepare(state, body, check=False).prompt_token_ids
    else:
        try:
            ids = llm.tokenizer.encode(body.prompt or "")
        except ValueError as exc:
            raise APIError(400, f"prompt: {exc}", param="prompt") from None
    strs = None
    if body.return_token_strs:
        token_text = TokenText(llm.tokenizer)
        strs = [token_text(i)[0] for i in ids]
    return {
        "count": len(ids),
        "max_model_len": llm.engine.config.max_model_len,
        "tokens": ids,
        "token_strs": strs,
    }


def detokenize(state: ServerState, body: DetokenizeRequest) -> dict[str, Any]:
    """The text of ``tokens``; an id outside the vocabulary is a 400 naming it."""
    tokenizer = state.llm.tokenizer
    vocab = tokenizer.vocab_size
    for i, token in enumerate(body.tokens):
        if not 0 <= token < vocab:
            raise APIError(
                400, f"tokens[{i}]: {token} is not a token id (0..{vocab - 1})", param=f"tokens[{i}]"
            )
    return {"prompt": tokenizer.decode(body.tokens)}
