"""Ops API for support and operators (bearer tokens from ``OPS_API_TOKENS``).

- ``GET /ops/manual-checks`` — tasks waiting for a human, oldest first.
- ``POST /ops/tasks/{task_id}/resolve`` ``{"decision":"positive"|"negative","reason":"…"}`` —
  a typed, audited resolution: positive commits the frozen amount (the provider paid),
  negative rolls it back and the cascade moves on.
- ``GET /ops/withdrawals/{withdrawal_id}`` — the queue, every task and the audit trail.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath

from gateway.http import bearer_ok, json_response, read_body
from gateway.runtime import Runtime
from orchestrator import store
from orchestrator.core_client import CoreRefused, CoreUnavailable
from orchestrator.domain import TaskState

AnyRequest = Request[Any, Any, Any]


class ResolveBody(msgspec.Struct, forbid_unknown_fields=True):
    decision: Literal["positive", "negative"]
    reason: str


def _error(status: int, code: str, message: str) -> Response[bytes]:
    return json_response(msgspec.json.encode({"error": {"code": code, "message": message}}), status)


def _authorized(request: AnyRequest) -> tuple[Runtime, Response[bytes] | None]:
    rt: Runtime = request.app.state.runtime
    if not bearer_ok(request, rt.settings.ops_tokens):
        return rt, _error(401, "unauthorized", "Missing or invalid ops bearer token.")
    return rt, None


def _actor(request: AnyRequest) -> str:
    # The token says who may act; the operator header says who did (kept in the audit row).
    return "ops:" + (request.headers.get("x-operator") or "unknown")[:64]


@get("/ops/manual-checks")
async def manual_checks(request: AnyRequest) -> Response[bytes]:
    rt, denied = _authorized(request)
    if denied:
        return denied
    async with rt.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT t.task_id, t.queue_id, q.withdrawal_id, t.provider_id, t.provider_reference,"
            " t.state_entered_at, w.cohort, w.merchant_id, w.amount, w.currency,"
            " t.provider_code, t.recheck_attempts, t.status_polls"
            " FROM order_tasks t JOIN order_queues q ON q.queue_id = t.queue_id"
            " JOIN withdrawals w ON w.withdrawal_id = q.withdrawal_id"
            " WHERE t.state = 'MANUAL_CHECK' ORDER BY t.state_entered_at LIMIT 1000"
        )
    items = [
        {
            "task_id": str(r["task_id"]),
            "withdrawal_id": r["withdrawal_id"],
            "queue_id": str(r["queue_id"]),
            "merchant_id": r["merchant_id"],
            "provider_id": r["provider_id"],
            "provider_reference": r["provider_reference"],
            "amount": f"{r['amount']:.2f}",
            "currency": r["currency"],
            "cohort": r["cohort"],
            "waiting_since": r["state_entered_at"].isoformat(),
            "last_provider_code": r["provider_code"],
            "rechecks": r["recheck_attempts"],
            "status_polls": r["status_polls"],
        }
        for r in rows
    ]
    return json_response(msgspec.json.encode({"manual_checks": items}))


@post("/ops/tasks/{task_id:str}/resolve", status_code=200)
async def resolve_task(request: AnyRequest, task_id: FromPath[str]) -> Response[bytes]:
    rt, denied = _authorized(request)
    if denied:
        return denied
    try:
        ident = uuid.UUID(task_id)
    except ValueError:
        return _error(404, "not_found", "No such task.")
    try:
        body = msgspec.json.decode(await read_body(request), type=ResolveBody)
    except msgspec.ValidationError as exc:
        return _error(422, "validation_failed", str(exc))
    except msgspec.DecodeError:
        return _error(400, "malformed_json", "Request body is not valid JSON.")
    if not body.reason.strip():
        return _error(422, "validation_failed", "reason must not be empty")
    async with rt.pool.acquire() as conn:
        state = await conn.fetchval("SELECT state FROM order_tasks WHERE task_id = $1", ident)
    if state is None:
        return _error(404, "not_found", "No such task.")
    if state != TaskState.MANUAL_CHECK:
        return _error(409, "not_in_manual_check", f"Task is {state}, not MANUAL_CHECK.")
    try:
        task = await rt.engine.resolve(
            ident,
            positive=body.decision == "positive",
            reason=body.reason[:500],
            actor=_actor(request),
        )
    except CoreUnavailable:
        return _error(
            503, "core_unavailable", "cascade-core did not answer; nothing changed, try again."
        )
    except CoreRefused as exc:
        return _error(409, "core_refused", f"cascade-core refused: {exc.code}; nothing changed.")
    assert task is not None
    return json_response(msgspec.json.encode({"task_id": task_id, "state": task.state.value}))


@get("/ops/withdrawals/{withdrawal_id:str}")
async def withdrawal_detail(request: AnyRequest, withdrawal_id: FromPath[str]) -> Response[bytes]:
    rt, denied = _authorized(request)
    if denied:
        return denied
    if "\x00" in withdrawal_id:
        return _error(404, "not_found", "Withdrawal not found.")
    async with rt.pool.acquire() as conn:
        loaded = await store.load_all(conn, withdrawal_id=withdrawal_id)
        if loaded is None:
            return _error(404, "not_found", "Withdrawal not found.")
        record, queue = loaded
        tasks = await conn.fetch(
            "SELECT * FROM order_tasks WHERE queue_id = $1 ORDER BY position", queue.queue.queue_id
        )
        events = await conn.fetch(
            "SELECT * FROM order_task_events WHERE queue_id = $1 ORDER BY event_id",
            queue.queue.queue_id,
        )
    detail: dict[str, Any] = {
        "withdrawal_id": withdrawal_id,
        "merchant_id": record.merchant_id,
        "cohort": record.cohort,
        "routing_reason": record.routing_reason,
        "flag_state": record.flag_state,
        "amount": f"{record.amount:.2f}",
        "currency": record.currency,
        "cascade": record.cascade,
        "queue": {
            "queue_id": str(queue.queue.queue_id),
            "state": queue.queue.state.value,
            "cancel_requested": queue.queue.cancel_requested,
            "failure_code": queue.queue.failure_code,
            "created_at": queue.created_at.isoformat(),
            "updated_at": queue.updated_at.isoformat(),
        },
        "tasks": [_row(t) for t in tasks],
        "events": [_row(e) for e in events],
    }
    return json_response(msgspec.json.encode(detail))


def _row(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dict(row).items():
        if isinstance(value, uuid.UUID):
            out[key] = str(value)
        elif hasattr(value, "isoformat"):
            out[key] = value.isoformat()
        elif hasattr(value, "as_tuple"):
            out[key] = f"{value:.2f}"
        else:
            out[key] = value
    return out
