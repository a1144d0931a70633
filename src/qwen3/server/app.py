"""The FastAPI app (routes, auth, lifespan) and :func:`serve`, which runs it under uvicorn.

The engine thread (:class:`qwen3.async_llm.AsyncLLM`) starts with the app and stops with it. On SIGTERM
or Ctrl+C uvicorn stops accepting connections, gives in-flight requests ``shutdown_timeout`` seconds to
finish, cancels what is left (which aborts those sequences), then the lifespan stops the engine and
:func:`serve` returns, so ``qwen3 serve`` exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import qwen3
from qwen3.async_llm import AsyncLLM, EngineDeadError
from qwen3.llm import LLM
from qwen3.server import chat_completions, completions, responses, tokenize
from qwen3.server.errors import APIError, ErrorResponse, from_validation_error, install_handlers
from qwen3.server.metrics import CONTENT_TYPE, Metrics
from qwen3.server.protocol import ChatCompletionRequest, CompletionRequest
from qwen3.server.responses import ResponsesRequest
from qwen3.server.serving import LARGE_REQUEST_BYTES, ServerConfig, ServerState, unless_disconnected
from qwen3.server.tokenize import DetokenizeRequest, TokenizeRequest
from qwen3.server.webui import install_web_ui, page_url

logger = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)
ENDPOINTS = (
    "/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
    "/health", "/metrics",
)  # fmt: skip
GUARDED = ("/v1/", "/tokenize", "/detokenize")  # paths the API key guards (vLLM guards /v1/ only)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RequestMiddleware:
    """Around every HTTP exchange: the API key check for ``/v1/`` and the tokenizer routes, the body size
    limit, the status count
    for ``/metrics``, and giving back the exchange's admitted sequences when it ends, however it ends.

    A plain ASGI middleware rather than ``BaseHTTPMiddleware``, so streaming responses pass through
    untouched and a client's disconnect still reaches the stream.
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.config.api_key
        self._key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_and_note)
                return
            await self.app(scope, self._bounded(receive), send_and_note)
        finally:
            self.state.release(scope)
            self.state.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        """A 401 for a missing or wrong key on ``/v1/``, a 413 for a declared body over the limit."""
        headers = dict(scope["headers"])
        if scope["path"].startswith(GUARDED) and not self._authorized(headers.get(b"authorization", b"")):
            error = APIError(
                401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )
            return error.response({"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.state.config.max_request_bytes:
            return self._too_large().response()
        return None

    def _authorized(self, given: bytes) -> bool:
        """``Bearer KEY`` with the scheme in any case (RFC 9110 11.1), the key compared in constant time."""
        if self._key is None:
            return True
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self._key)

    def _too_large(self) -> APIError:
        limit = self.state.config.max_request_bytes
        return APIError(
            413, f"the request body exceeds {limit} bytes (--max-request-bytes)", code="request_too_large"
        )

    def _bounded(self, receive: Receive) -> Receive:
        """``receive`` that refuses a body (chunked, or longer than declared) once it passes the limit."""
        received = 0
        limit = self.state.config.max_request_bytes

        async def bounded() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large()
            return message

        return bounded


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The JSON body as ``model``, parsed and validated in one strict pass by pydantic's own JSON parser
    (nesting depth capped, lone surrogates refused), whatever the content type says (curl -d sends form
    encoding)."""
    raw = await request.body()
    request.state.body_bytes = len(raw)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "qwen3",
        "root": str(state.llm.model_dir),
        "max_model_len": state.llm.engine.config.max_model_len,
    }


_ERROR_MEANINGS = {
    400: "a field is invalid (``error.param`` names it)",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "the body exceeds --max-request-bytes",
    503: "at capacity or the engine is down (see Retry-After)",
}
_SCHEMA_MODELS = (
    ChatCompletionRequest,
    ResponsesRequest,
    CompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERROR_MEANINGS[status]} for status in statuses}


def _documented(
    body: type[BaseModel], kind: str, streams: str | None = "chunks ending in data: [DONE]"
) -> dict[str, Any]:
    """Route options that publish the request body (parsed by hand, see :func:`parse_body`), the SSE
    alternative, and every error the route can answer, so /docs and schema-driven clients see it all."""
    ref = {"$ref": f"#/components/schemas/{body.__name__}"}
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        content["text/event-stream"] = {}
    description = f"a {kind} object" + (
        f", or with stream: true a text/event-stream of {streams}" if streams else ""
    )
    return {
        "openapi_extra": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}
        },
        "responses": {
            200: {"description": description, "content": content},
            **_errors(400, 401, 404, 413, 503),
        },
    }


def install_schema(app: FastAPI) -> None:
    """Add the request models (and the models they use) to the OpenAPI components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _SCHEMA_MODELS:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    """An OpenAI-compatible app serving ``llm``. The engine thread runs while the app's lifespan does."""
    state = ServerState(llm, config, Metrics())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.front = AsyncLLM(llm)
        state.workers = ThreadPoolExecutor(config.prepare_threads, thread_name_prefix="qwen3-prepare")
        state.metrics.watch_engine(state.front)
        logger.info("serving %s as %s", llm.model_dir, ", ".join(config.served_model_names))
        try:
            yield
        finally:
            logger.info("stopping the engine")
            state.workers.shutdown(wait=False, cancel_futures=True)
            state.front.shutdown()

    app = FastAPI(
        title="qwen3", summary="OpenAI-compatible Qwen3 server", version=qwen3.__version__, lifespan=lifespan
    )
    app.state.qwen3 = state
    install_schema(app)
    install_handlers(app)
    app.add_middleware(RequestMiddleware, state=state)
    if config.web_ui:
        install_web_ui(app)
    # Outermost, so a browser's preflight (which carries no API key) is answered before the key check,
    # and refusals carry the CORS headers too (the page can then read them). Credentials are never allowed
    # with "*" (the browser would send them to any origin's page); a list of origins allows them.
    origins = list(config.allowed_origins)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_credentials="*" not in origins,
        allow_methods=["*"],
        allow_headers=["*"],
    )

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: 200 while the engine thread runs."""
        alive = state.front is not None and state.front.is_alive()
        return JSONResponse(
            {"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", responses=_errors(401))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state, name) for name in config.served_model_names]}

    @app.get("/v1/models/{model_id:path}", responses=_errors(401, 404))
    async def model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return _model_card(state, model_id)

    async def generate(request: Request, model: type[BaseModel], endpoint: Any) -> Response:
        """A chat-shaped generation (chat completions, responses): parse, admit, prepare off the loop,
        then stream or answer whole. ``endpoint`` is the module with ``prepare``, ``stream``, ``complete``."""
        arrival = time.perf_counter()
        body: Any = await parse_body(request, model)
        state.check_model(body.model)
        front = state.engine_front()
        state.admit(request.scope, getattr(body, "n", 1))  # before the work: a full server refuses at once
        large = request.state.body_bytes >= LARGE_REQUEST_BYTES
        prepared = await state.off_loop(endpoint.prepare, state, body, large=large)
        state.metrics.prompt_tokens.inc(len(prepared.prompt_token_ids))
        if body.stream:
            events = endpoint.stream(state, front, body, prepared, arrival)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await unless_disconnected(request, endpoint.complete(state, front, body, prepared, arrival))
        return JSONResponse(result)

    @app.post("/v1/chat/completions", **_documented(ChatCompletionRequest, "chat.completion"))
    async def chat(request: Request) -> Response:
        return await generate(request, ChatCompletionRequest, chat_completions)

    @app.post(
        "/v1/responses",
        **_documented(ResponsesRequest, "response", "typed events (response.created ... response.completed)"),
    )
    async def respond(request: Request) -> Response:
        """OpenAI's Responses API, stateless (see :mod:`qwen3.server.responses`)."""
        return await generate(request, ResponsesRequest, responses)

    @app.get("/v1/responses/{response_id}", responses=_errors(401, 404), operation_id="get_response")
    @app.delete("/v1/responses/{response_id}", responses=_errors(401, 404), operation_id="delete_response")
    async def stored_response(response_id: str) -> Response:
        """Stored responses do not exist here: a clear 404 rather than a route-not-found."""
        raise APIError(
            404, f"response {response_id!r} not found: this server keeps no responses (stateless)",
            param="response_id", code="response_not_found",
        )  # fmt: skip

    @app.post("/tokenize", **_documented(TokenizeRequest, "tokenize result", None))
    async def tokenize_route(request: Request) -> JSONResponse:
        """vLLM's /tokenize: a prompt, or messages rendered as the chat endpoint renders them."""
        body = await parse_body(request, TokenizeRequest)
        state.check_model(body.model)
        large = request.state.body_bytes >= LARGE_REQUEST_BYTES
        return JSONResponse(await state.off_loop(tokenize.tokenize, state, body, large=large))

    @app.post("/detokenize", **_documented(DetokenizeRequest, "detokenize result", None))
    async def detokenize_route(request: Request) -> JSONResponse:
        body = await parse_body(request, DetokenizeRequest)
        state.check_model(body.model)
        return JSONResponse(await state.off_loop(tokenize.detokenize, state, body))

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": qwen3.__version__}

    @app.get("/ping", operation_id="ping_get")
    @app.post("/ping", operation_id="ping_post")
    async def ping() -> Response:
        """SageMaker's (and vLLM's) liveness probe: 200 while the engine runs, as /health."""
        return await health()

    @app.post("/v1/completions", **_documented(CompletionRequest, "text_completion"))
    async def complete(request: Request) -> Response:
        arrival = time.perf_counter()
        body = await parse_body(request, CompletionRequest)
        state.check_model(body.model)
        front = state.engine_front()
        state.admit(request.scope, len(body.prompts()) * body.n)
        large = request.state.body_bytes >= LARGE_REQUEST_BYTES
        prompts, params = await state.off_loop(completions.prepare, state, body, large=large)
        state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        if body.stream:
            events = completions.stream(state, front, body, prompts, params, arrival)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await unless_disconnected(
            request, completions.complete(state, front, body, prompts, params, arrival)
        )
        return JSONResponse(result)

    return app


def _after_shutdown(signum: int, _frame: Any) -> None:
    """uvicorn re-raises the signal it shut down on; by then the work is done, so exit normally."""
    logger.info("shut down on %s", signal.Signals(signum).name)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: when a shutdown starts, streams still running just before the graceful
    timeout are finished by the engine (``finish_reason`` "abort", then ``[DONE]``), so no client sees a
    cut chunked body; uvicorn then finds every exchange done and exits without cancelling any."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.dead_ticks = 0  # ticks since the engine was seen dead

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s: an engine that has died (a bug, a tensor-parallel rank gone) stops the server, after
        /health has said 503 for a tick; a supervisor (systemd, Kubernetes, torchrun) then sees it exit."""
        front = self.state.front
        if front is not None and front.error is not None and not self.should_exit:
            self.dead_ticks += 1
            if self.dead_ticks > 1:
                logger.error("the engine stopped (%s); shutting the server down", type(front.error).__name__)
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        timeout = self.config.timeout_graceful_shutdown or 0.0
        drain = asyncio.create_task(_finish_streams_before(self.state, timeout - min(1.0, timeout / 2)))
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()


async def _finish_streams_before(state: ServerState, seconds: float) -> None:
    await asyncio.sleep(max(seconds, 0.0))
    if state.front is not None and state.admitted:
        logger.info("shutdown timeout near: finishing %d sequence(s) in flight", state.admitted)
        state.front.finish_all("abort")


def serve(llm: LLM, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``llm`` until SIGTERM or Ctrl+C, then shut down gracefully and return; if the engine dies
    (see :meth:`DrainingServer.on_tick`) shut down the same way and raise :class:`EngineDeadError`."""
    app = create_app(llm, config)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,  # the qwen3 command's logging setup applies
            timeout_graceful_shutdown=config.shutdown_timeout,
        ),
        app.state.qwen3,
    )
    handled = (signal.SIGINT, signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()
    if config.web_ui:
        logger.info("chat page: open %s in a browser (--no-ui turns it off)", page_url(host, port))
    previous = {sig: signal.signal(sig, _after_shutdown) for sig in handled} if main_thread else {}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    error = app.state.qwen3.front.error if app.state.qwen3.front is not None else None
    if error is not None:
        raise EngineDeadError(f"the engine stopped: {type(error).__name__}: {error}") from error
