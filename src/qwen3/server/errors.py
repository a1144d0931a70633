"""Errors in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``.

Clients (the official SDKs included) read ``error.message`` and ``error.param``, so every refusal —
validation, auth, unknown model, a full queue — goes out in that shape with the offending field named
the way the client wrote it (``messages[0].role``, ``tools[1].function.name``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_error",
}
RETRY_AFTER_SECONDS = (
    1  # a full queue drains in about a step or a few; clients (the openai SDK too) honour it
)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every refusal's body (documented in the OpenAPI schema for each status a route can answer)."""

    error: ErrorDetail


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI error response with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        """The JSON response; a 503 says when to retry (``Retry-After``)."""
        if self.status == 503:
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS), **(headers or {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def param_path(loc: Sequence[str | int]) -> str | None:
    """pydantic's error location as the client's field path: ``("messages", 0, "role")`` -> ``messages[0].role``.

    Union members and validator wrappers that pydantic puts in the location (``str``,
    ``list[TextPart]``, ``function-after[...]``, a model's class name such as ``NamedToolChoice``) are not
    fields and are dropped: request fields are snake_case, so a capitalised part is a class name.
    """
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif (
            part.isidentifier()
            and not part[0].isupper()
            and part not in ("str", "int", "float", "bool", "list", "dict")
        ):
            path += f".{part}" if path else part
    return path or None


def from_validation_error(exc: ValidationError | RequestValidationError, strip: int = 0) -> APIError:
    """A 400 naming one problem pydantic found (``strip`` drops leading location parts, e.g. "body").

    The deepest location wins: for a union such as ``content: str | list[TextPart]`` given a list with a
    bad part, pydantic reports both "not a string" and the bad part; the part is what the client got wrong.
    """
    first = max(exc.errors(), key=lambda error: len(error.get("loc", ())))
    loc = tuple(first.get("loc", ()))[strip:]
    if first.get("type") == "json_invalid":
        return APIError(400, f"invalid JSON body: {first.get('msg')}", code="invalid_json")
    if first.get("type") == "model_type" and not loc:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    param = param_path(loc)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "is required"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def _endpoints(app: FastAPI) -> list[str]:
    """``METHOD /path`` of every route (documentation pages last), for the 404 of an unknown path."""
    found = []
    for route in app.routes:
        methods = sorted(getattr(route, "methods", None) or []) or ["GET"]
        path = getattr(route, "path", "")
        found += [f"{method} {path}" for method in methods if method != "HEAD"]
    docs = ("/docs", "/redoc", "/openapi")
    return sorted(found, key=lambda entry: (entry.split()[1].startswith(docs), entry.split()[1]))


def install_handlers(app: FastAPI) -> None:
    """Route every error the app can raise into the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc, strip=1).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404 and exc.detail == "Not Found":  # no route matched: say which exist
            served = ", ".join(_endpoints(app))
            message = f"no endpoint {request.method} {request.url.path}; this server serves {served}"
            return APIError(404, message, code="unknown_endpoint").response()
        return APIError(exc.status_code, str(exc.detail)).response(exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return APIError(500, f"internal error: {type(exc).__name__}").response()
