"""The legacy v1 API, byte-for-byte as ``legacy-api/README.md`` specifies it.

Checks run in the contract's order: path and method (the router), authentication, size,
media type, JSON, validation, then idempotency and duplicates. Both cohorts answer through the
same code and the same encoder; only what happens after the withdrawal is stored differs.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from litestar import Request, Response, get, post, route
from litestar.params import FromPath

from contracts.legacy import (
    ApiError,
    CreateWithdrawal,
    MalformedJson,
    check_idempotency_key,
    encode_metadata,
    encode_validation_error,
    encode_withdrawal,
    parse_cancel,
    parse_create_withdrawal,
)
from contracts.provider import provider_order_id
from gateway.http import (
    ApiProblem,
    bearer_ok,
    is_json_media_type,
    json_response,
    read_body,
    request_id_of,
)
from gateway.runtime import Runtime
from orchestrator import bus, store
from orchestrator import metrics as m
from orchestrator.domain import OrderQueue, OrderTask, QueueState, TaskState, public_state
from orchestrator.engine import withdrawal_view

log = logging.getLogger("cascade.api")

AnyRequest = Request[Any, Any, Any]
# Errors that mean "the database is unreachable right now": answered 503, nothing persisted.
_DB_DOWN = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


def runtime_of(request: AnyRequest) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


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


async def _view_bytes(conn: store.Connection, withdrawal_id: str) -> bytes | None:
    loaded = await store.load_all(conn, withdrawal_id=withdrawal_id)
    return None if loaded is None else encode_withdrawal(withdrawal_view(*loaded))


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
    digest = hashlib.sha256(body).digest()
    try:
        return await _create(request, rt, parsed, key, digest)
    except _DB_DOWN as exc:
        log.warning("database unavailable", extra={"error": repr(exc)})
        raise ApiProblem(ApiError.UNAVAILABLE) from exc


async def _replay_or_conflict(
    conn: store.Connection, key: str, digest: bytes
) -> Response[bytes] | None:
    existing = await store.find_by_idempotency_key(conn, key)
    if existing is None:
        return None
    if bytes(existing["request_sha256"]) != digest:
        raise ApiProblem(ApiError.IDEMPOTENCY_CONFLICT)
    view = await _view_bytes(conn, existing["withdrawal_id"])
    assert view is not None
    return json_response(view, 200, {"Idempotent-Replayed": "true"})


async def _create(
    request: AnyRequest, rt: Runtime, parsed: CreateWithdrawal, key: str | None, digest: bytes
) -> Response[bytes]:
    # Accepting needs the broker (to drive the withdrawal) as much as the database; a replay
    # or a duplicate is still answered without it.
    if not rt.nats_up:
        async with rt.pool.acquire() as conn:
            answer = await _existing(conn, parsed.withdrawal_id, key, digest)
        if answer is not None:
            return answer
        raise ApiProblem(ApiError.UNAVAILABLE)
    assert rt.router is not None
    decision = rt.router.decide(parsed.merchant_id)
    entries = parsed.cascade if decision.cohort == "cascade" else parsed.cascade[:1]
    queue_id = uuid.uuid4()
    tasks = []
    for position, entry in enumerate(entries):
        task_id = uuid.uuid4()
        config = rt.settings.providers.get(entry.provider_id)
        limit = config.idempotency_key_max_length if config else 64
        tasks.append(
            OrderTask(
                task_id=task_id,
                queue_id=queue_id,
                position=position,
                provider_id=entry.provider_id,
                state=TaskState.PENDING,
                version=1,
                provider_order_id=provider_order_id(task_id, limit),
            )
        )
    trace_id = trace_id_of(request)
    record = store.WithdrawalRecord(
        withdrawal_id=parsed.withdrawal_id,
        merchant_id=parsed.merchant_id,
        amount=parsed.amount,
        currency=parsed.currency,
        destination=msgspec.to_builtins(parsed.destination),
        metadata=encode_metadata(parsed.metadata),
        cascade=[{"provider_id": e.provider_id, "fee": f"{e.fee:.2f}"} for e in parsed.cascade],
        idempotency_key=key,
        request_sha256=digest,
        cohort=decision.cohort,
        routing_reason=decision.reason,
        flag_state=decision.flag_state,
        trace_id=trace_id,
        created_at=datetime.now(UTC),
    )
    start = None
    if decision.cohort == "cascade":
        start = store.NewMessage(
            subject=rt.relay.names.subject(bus.TASK_START),
            payload=msgspec.json.encode(
                rt.engine.start_message(
                    # As the insert leaves them: versions are the columns' default, 1.
                    OrderQueue(
                        queue_id=queue_id,
                        withdrawal_id=parsed.withdrawal_id,
                        state=QueueState.ACTIVE,
                        version=1,
                        tasks=tuple(tasks),
                    ),
                    tasks[0],
                )
            ),
            headers={"Nats-Msg-Id": f"start-{tasks[0].task_id.hex}", **bus.trace_headers(trace_id)},
        )
    async with rt.pool.acquire() as conn:
        written = await store.insert_withdrawal(
            conn, record, queue_id, tasks, [e.fee for e in entries], start=start
        )
        if written is False:
            # The id or the key exists (perhaps a concurrent request's, which was waited for).
            answer = await _existing(conn, parsed.withdrawal_id, key, digest)
            if answer is not None:
                return answer
            log.error("insert refused, yet neither the id nor the key exists")
            raise ApiProblem(ApiError.UNAVAILABLE)
    # Counted only for a new withdrawal: a replay or a duplicate asked the router for nothing.
    m.routing_decisions.labels(cohort=decision.cohort, reason=decision.reason).inc()
    m.withdrawals_created.labels(cohort=decision.cohort).inc()
    log.info(
        "withdrawal accepted",
        extra={
            "withdrawal_id": parsed.withdrawal_id,
            "queue_id": str(queue_id),
            "cohort": decision.cohort,
            "reason": decision.reason,
            "trace_id": trace_id,
        },
    )
    if decision.cohort == "cascade":
        assert isinstance(written, store.OutboxMessage)
        await rt.relay.publish_now([written])
        # The answer describes the withdrawal as accepted, built from what was just written
        # (whatever a fast worker did since is for GET to show).
        queue = OrderQueue(
            queue_id=queue_id,
            withdrawal_id=record.withdrawal_id,
            state=QueueState.ACTIVE,
            version=1,
            tasks=tuple(tasks),
        )
        accepted = store.QueueRecord(
            queue=queue,
            created_at=record.created_at,
            updated_at=record.created_at,
            finished_at=None,
        )
        return json_response(encode_withdrawal(withdrawal_view(record, accepted)), 201)
    # Legacy single-shot: one create inside the request; its answer decides the response.
    try:
        await rt.engine.start_task(
            queue_id, tasks[0].task_id, actor="api:legacy", trace_id=trace_id
        )
    except Exception as exc:  # noqa: BLE001 — the task stays CREATING; the sweeper resumes it
        log.warning(
            "legacy create did not finish in the request",
            extra={"withdrawal_id": parsed.withdrawal_id, "error": repr(exc)},
        )
    async with rt.pool.acquire() as conn:
        view = await _view_bytes(conn, parsed.withdrawal_id)
    assert view is not None
    return json_response(view, 201)


async def _existing(
    conn: store.Connection, withdrawal_id: str, key: str | None, digest: bytes
) -> Response[bytes] | None:
    """The answer to a request whose id or key is taken: the replay (200), or raises the
    conflict or duplicate (409); None when neither exists."""
    # One read for both questions: asked separately, a concurrent winner committing in
    # between would turn this request's replay into a duplicate_withdrawal.
    rows = await conn.fetch(
        "SELECT withdrawal_id, idempotency_key FROM withdrawals"
        " WHERE withdrawal_id = $1 OR idempotency_key = $2",
        withdrawal_id,
        key,
    )
    if key is not None and any(r["idempotency_key"] == key for r in rows):
        replay = await _replay_or_conflict(conn, key, digest)
        if replay is not None:
            return replay
    if rows:
        raise ApiProblem(ApiError.DUPLICATE_WITHDRAWAL)
    return None


@get("/v1/withdrawals/{withdrawal_id:str}")
async def get_withdrawal(request: AnyRequest, withdrawal_id: FromPath[str]) -> Response[bytes]:
    rt = runtime_of(request)
    _authenticate(request, rt)
    _known_shape(withdrawal_id)
    try:
        async with rt.pool.acquire() as conn:
            view = await _view_bytes(conn, withdrawal_id)
    except _DB_DOWN as exc:
        raise ApiProblem(ApiError.UNAVAILABLE) from exc
    if view is None:
        raise ApiProblem(ApiError.NOT_FOUND)
    return json_response(view)


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
    try:
        _known_shape(withdrawal_id)
        async with rt.pool.acquire() as conn:
            queue = await store.load_queue(conn, withdrawal_id=withdrawal_id)
        if queue is None:
            raise ApiProblem(ApiError.NOT_FOUND)
        status = withdrawal_status(queue)
        if status in ("succeeded", "failed"):
            raise ApiProblem(ApiError.NOT_CANCELLABLE)
        if status == "processing":
            await rt.engine.cancel_queue(
                queue.queue.queue_id,
                reason=reason,
                actor="api:cancel",
                trace_id=trace_id_of(request),
            )
        async with rt.pool.acquire() as conn:
            view = await _view_bytes(conn, withdrawal_id)
    except _DB_DOWN as exc:
        raise ApiProblem(ApiError.UNAVAILABLE) from exc
    assert view is not None
    return json_response(view)


def withdrawal_status(queue: store.QueueRecord) -> str:
    return public_state(queue.queue).status


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
