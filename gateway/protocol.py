"""HTTP plumbing shared by every route: request ids, error envelopes, auth, bounded bodies.

Every response — including the ones the framework produces before a handler runs (unknown
path, wrong method) — carries ``X-Request-Id`` and, for errors, the contract's envelope.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import Message, Scope

from contracts.legacy import ApiError, check_request_id, encode_api_error

log = logging.getLogger("cascade.http")

MAX_BODY = 65536
JSON = "application/json"


class ApiProblem(Exception):
    """Raised by handlers to answer with one of the contract's errors."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.code)
        self.error = error


def request_id_of(scope: Scope) -> str:
    state = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        raw = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                raw = value.decode("latin-1")
                break
        rid = check_request_id(raw)
        state["request_id"] = rid
    return str(rid)


async def stamp_request_id(message: Message, scope: Scope) -> None:
    """``before_send`` hook: every HTTP response carries ``X-Request-Id``.

    An app-level hook rather than a middleware because route middleware never sees the
    404/405 answers the router gives before any route matched.
    """
    if message["type"] != "http.response.start":
        return
    rid = request_id_of(scope).encode()
    headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
    headers.append((b"x-request-id", rid))
    message["headers"] = headers


def json_response(
    body: bytes, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response[bytes]:
    return Response(content=body, status_code=status, media_type=JSON, headers=dict(headers or {}))


def error_response(request: Request[Any, Any, Any], error: ApiError) -> Response[bytes]:
    return json_response(encode_api_error(error, request_id_of(request.scope)), error.status)


def on_problem(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    assert isinstance(exc, ApiProblem)
    return error_response(request, exc.error)


_FRAMEWORK_ERRORS = {
    404: ApiError.ROUTE_NOT_FOUND,
    405: ApiError.METHOD_NOT_ALLOWED,
    413: ApiError.PAYLOAD_TOO_LARGE,
    415: ApiError.UNSUPPORTED_MEDIA_TYPE,
    401: ApiError.UNAUTHORIZED,
    503: ApiError.UNAVAILABLE,
}


def on_http_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Framework-raised errors (routing, limits) in the contract's envelope."""
    assert isinstance(exc, HTTPException)
    error = _FRAMEWORK_ERRORS.get(exc.status_code)
    if error is None:
        if exc.status_code >= 500:
            log.error("framework error", extra={"status": exc.status_code, "detail": exc.detail})
            error = ApiError.INTERNAL_ERROR
        else:
            error = ApiError.MALFORMED_JSON if exc.status_code == 400 else ApiError.ROUTE_NOT_FOUND
    return error_response(request, error)


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Anything unexpected is a 500 with no detail leaked; the log has the traceback."""
    log.exception(
        "unhandled error",
        exc_info=exc,
        extra={"path": request.url.path, "request_id": request_id_of(request.scope)},
    )
    return error_response(request, ApiError.INTERNAL_ERROR)


def bearer_ok(request: Request[Any, Any, Any], tokens: Iterable[str]) -> bool:
    """Constant-time check of ``Authorization: Bearer <token>`` against the accepted tokens."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    presented = token.strip().encode()
    ok = False
    for accepted in tokens:
        ok |= hmac.compare_digest(presented, accepted.encode())
    return ok


async def read_body(request: Request[Any, Any, Any], limit: int = MAX_BODY) -> bytes:
    """The request body, refusing (413) before reading more than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiProblem(ApiError.PAYLOAD_TOO_LARGE)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiProblem(ApiError.PAYLOAD_TOO_LARGE)
        chunks.append(chunk)
    return b"".join(chunks)


def is_json_media_type(value: str | None) -> bool:
    """``application/json``, optionally with ``charset=utf-8`` (the contract's only variant)."""
    if not value:
        return False
    media, _, params = value.partition(";")
    if media.strip().lower() != JSON:
        return False
    params = params.strip().lower().replace(" ", "")
    return params in ("", "charset=utf-8", 'charset="utf-8"')
