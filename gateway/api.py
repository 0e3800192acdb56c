"""The legacy v1 API, byte-for-byte as ``legacy-api/README.md`` specifies it.

Checks run in the contract's order: path and method (the router), authentication, size,
media type, JSON, validation, then idempotency and duplicates. Both cohorts answer through the
same code and the same encoder; only what happens after the withdrawal is stored differs.
Handlers parse, call the application service (:mod:`gateway.service`) and encode.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

from litestar import Request, Response, get, post, route
from litestar.params import FromPath

from contracts.legacy import (
    ApiError,
    CreateWithdrawal,
    MalformedJson,
    check_idempotency_key,
    encode_validation_error,
    encode_withdrawal,
    parse_cancel,
    parse_create_withdrawal,
)
from gateway.protocol import (
    ApiProblem,
    bearer_ok,
    is_json_media_type,
    json_response,
    read_body,
    request_id_of,
)
from gateway.runtime import Runtime
from gateway.service import (
    DuplicateWithdrawal,
    IdempotencyConflict,
    NotCancellable,
    ServiceError,
    Unavailable,
    UnknownWithdrawal,
    WithdrawalService,
)

AnyRequest = Request[Any, Any, Any]
# The service's refusals as the contract's errors: the one place they are mapped.
_API_ERRORS: Mapping[type[ServiceError], ApiError] = {
    Unavailable: ApiError.UNAVAILABLE,
    UnknownWithdrawal: ApiError.NOT_FOUND,
    DuplicateWithdrawal: ApiError.DUPLICATE_WITHDRAWAL,
    IdempotencyConflict: ApiError.IDEMPOTENCY_CONFLICT,
    NotCancellable: ApiError.NOT_CANCELLABLE,
}


def runtime_of(request: AnyRequest) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def service_of(request: AnyRequest) -> WithdrawalService:
    """The application service over this app's runtime (a thin object: one per request)."""
    return WithdrawalService(runtime_of(request))


@contextlib.contextmanager
def _as_api_errors() -> Iterator[None]:
    try:
        yield
    except ServiceError as exc:
        raise ApiProblem(_API_ERRORS[type(exc)]) from exc


def trace_id_of(request: AnyRequest) -> str:
    """W3C trace id from ``traceparent`` when present, else a new one."""
    parent = request.headers.get("traceparent", "")
    parts = parent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return parts[1]
    return secrets.token_hex(16)


_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _known_shape(withdrawal_id: str) -> str:
    """A path id no create could have accepted is unknown: 404 before any query."""
    if not _ID.fullmatch(withdrawal_id):
        raise ApiProblem(ApiError.NOT_FOUND)
    return withdrawal_id


def _authenticate(request: AnyRequest, rt: Runtime) -> None:
    if not bearer_ok(request, rt.settings.api_tokens):
        raise ApiProblem(ApiError.UNAUTHORIZED)


@post("/v1/withdrawals", status_code=201)
async def create_withdrawal(request: AnyRequest) -> Response[bytes]:
    """Execute a withdrawal: legacy single-shot or cascade, by the stored routing decision."""
    rt = runtime_of(request)
    _authenticate(request, rt)
    body = await read_body(request)
    if not is_json_media_type(request.headers.get("content-type")):
        raise ApiProblem(ApiError.UNSUPPORTED_MEDIA_TYPE)
    key = request.headers.get("idempotency-key")
    key_error = check_idempotency_key(key)
    try:
        parsed = parse_create_withdrawal(body)
    except MalformedJson:
        raise ApiProblem(ApiError.MALFORMED_JSON) from None
    errors = ([key_error] if key_error else []) + (parsed if isinstance(parsed, list) else [])
    if errors:
        return json_response(encode_validation_error(errors, request_id_of(request.scope)), 422)
    assert isinstance(parsed, CreateWithdrawal)
    with _as_api_errors():
        created = await service_of(request).create(
            parsed,
            idempotency_key=key,
            request_sha256=hashlib.sha256(body).digest(),
            trace_id=trace_id_of(request),
        )
    if created.replayed:
        return json_response(encode_withdrawal(created.view), 200, {"Idempotent-Replayed": "true"})
    return json_response(encode_withdrawal(created.view), 201)


@get("/v1/withdrawals/{withdrawal_id:str}")
async def get_withdrawal(request: AnyRequest, withdrawal_id: FromPath[str]) -> Response[bytes]:
    rt = runtime_of(request)
    _authenticate(request, rt)
    _known_shape(withdrawal_id)
    with _as_api_errors():
        view = await service_of(request).view(withdrawal_id)
    return json_response(encode_withdrawal(view))


@post("/v1/withdrawals/{withdrawal_id:str}/cancel", status_code=200)
async def cancel_withdrawal(request: AnyRequest, withdrawal_id: FromPath[str]) -> Response[bytes]:
    rt = runtime_of(request)
    _authenticate(request, rt)
    body = await read_body(request)
    reason: str | None = None
    if body:
        if not is_json_media_type(request.headers.get("content-type")):
            raise ApiProblem(ApiError.UNSUPPORTED_MEDIA_TYPE)
        try:
            parsed = parse_cancel(body)
        except MalformedJson:
            raise ApiProblem(ApiError.MALFORMED_JSON) from None
        if isinstance(parsed, list):
            return json_response(encode_validation_error(parsed, request_id_of(request.scope)), 422)
        reason = parsed.reason
    _known_shape(withdrawal_id)
    with _as_api_errors():
        view = await service_of(request).cancel(
            withdrawal_id, reason=reason, trace_id=trace_id_of(request)
        )
    return json_response(encode_withdrawal(view))


@route(
    [
        "/v1/withdrawals",
        "/v1/withdrawals/{withdrawal_id:str}",
        "/v1/withdrawals/{withdrawal_id:str}/cancel",
        "/healthz",
    ],
    http_method=["OPTIONS"],
)
async def options_not_allowed() -> Response[bytes]:
    """The contract knows no OPTIONS: 405 like any other method (Litestar would answer 204)."""
    raise ApiProblem(ApiError.METHOD_NOT_ALLOWED)


@get("/healthz")
async def healthz() -> Response[bytes]:
    return json_response(b'{"status":"ok"}')
