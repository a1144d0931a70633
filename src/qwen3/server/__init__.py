"""``qwen3 serve``: an OpenAI-compatible HTTP server on top of the engine.

Modules, one job each: ``protocol`` (request bodies, validated field by field), ``errors`` (OpenAI's error
shape), ``serving`` (state, admission, merged streams, SSE, logprobs), ``chat_completions`` and
``completions`` (the generation endpoints), ``responses`` (the Responses API, on the chat path),
``tokenize`` (vLLM's /tokenize and /detokenize), ``metrics`` (Prometheus), ``app`` (routes, auth, CORS,
lifespan, uvicorn). Dependencies point one way: server -> ``AsyncLLM``/``LLM`` -> engine -> model.
"""

from qwen3.server.app import create_app, serve
from qwen3.server.serving import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]
