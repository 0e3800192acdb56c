"""Ops API for support and operators (bearer tokens from ``OPS_API_TOKENS``).

- ``GET /ops/manual-checks`` — tasks waiting for a human, oldest first, each with what support
  checks against a provider statement (masked destination, our order id and the provider's
  reference, how long it has waited, every answer of the provider).
- ``POST /ops/tasks/{task_id}/resolve`` ``{"decision":"positive"|"negative","reason":"…"}`` —
  with ``X-Operator: <name>`` (required: 422 without it), a typed, audited resolution:
  positive commits the frozen amount (the provider paid), negative rolls it back and the
  cascade moves on.
- ``GET /ops/withdrawals/{withdrawal_id}`` — the queue, every task (with its provider's
  answers) and the audit trail.

Handlers parse, call the application service (:mod:`gateway.service`) and encode the Structs
of :mod:`gateway.ops_wire`, from which the ops API's OpenAPI document is generated
(:mod:`gateway.ops_openapi`, served at ``/docs/ops-openapi.json``).
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath
from litestar.types import ExceptionHandlersMap

from gateway import ops_wire as wire
from gateway.api import runtime_of, service_of
from gateway.protocol import bearer_ok, json_response, read_body
from gateway.service import (
    NotInManualCheck,
    ResolutionConflict,
    Unavailable,
    UnknownTask,
    UnknownWithdrawal,
)
from orchestrator.core_client import CoreRefused, CoreUnavailable
from orchestrator.store.views import ProviderAnswerRow, WithdrawalDetail, is_provider_answer

AnyRequest = Request[Any, Any, Any]


def _error(
    status: int, code: str, message: str, evidence: dict[str, Any] | None = None
) -> Response[bytes]:
    envelope = wire.ErrorEnvelope(error=wire.Error(code=code, message=message, evidence=evidence))
    return json_response(msgspec.json.encode(envelope), status)


def _denied(request: AnyRequest) -> Response[bytes] | None:
    """The 401 for a request without an ops token; None when it may proceed."""
    if not bearer_ok(request, runtime_of(request).settings.ops_tokens):
        return _error(401, "unauthorized", "Missing or invalid ops bearer token.")
    return None


def _unavailable(_request: AnyRequest, _exc: Exception) -> Response[bytes]:
    return _error(
        503,
        "unavailable",
        "The database did not answer; nothing was recorded. Send the request again: it is safe"
        " to repeat.",
    )


# Every ops route answers a database that is down (restarting, failing over) with a 503.
_OPS_ERRORS: ExceptionHandlersMap = {Unavailable: _unavailable}


def _operator(request: AnyRequest) -> str | None:
    """Who resolves, from ``X-Operator``; None when the header is missing or blank.

    The token says who may act; the operator header says who did (kept in the audit row), so
    a resolution without one is refused rather than audited as nobody in particular."""
    name = (request.headers.get("x-operator") or "").strip()
    return name[:64] or None


@get("/ops/manual-checks", exception_handlers=_OPS_ERRORS)
async def manual_checks(request: AnyRequest) -> Response[bytes]:
    denied = _denied(request)
    if denied:
        return denied
    checks = await service_of(request).manual_checks()
    page = wire.ManualChecks(manual_checks=[wire.manual_check_item(c) for c in checks])
    return json_response(msgspec.json.encode(page))


@post("/ops/tasks/{task_id:str}/resolve", status_code=200, exception_handlers=_OPS_ERRORS)
async def resolve_task(request: AnyRequest, task_id: FromPath[str]) -> Response[bytes]:
    denied = _denied(request)
    if denied:
        return denied
    try:
        ident = uuid.UUID(task_id)
    except ValueError:
        return _error(404, "not_found", "No such task.")
    try:
        body = msgspec.json.decode(await read_body(request), type=wire.ResolveBody)
    except msgspec.ValidationError as exc:
        return _error(422, "validation_failed", str(exc))
    except msgspec.DecodeError:
        return _error(400, "malformed_json", "Request body is not valid JSON.")
    if not body.reason.strip():
        return _error(422, "validation_failed", "reason must not be empty")
    operator = _operator(request)
    if operator is None:
        return _error(
            422,
            "validation_failed",
            "X-Operator header is required: name who resolves (it is kept in the audit row)",
        )
    try:
        task = await service_of(request).resolve(
            ident,
            positive=body.decision == "positive",
            reason=body.reason[:500],
            actor="ops:" + operator,
            unverified=body.unverified,
        )
    except UnknownTask:
        return _error(404, "not_found", "No such task.")
    except NotInManualCheck as exc:
        return _error(409, "not_in_manual_check", str(exc))
    except ResolutionConflict as exc:
        return _error(409, exc.code, f"{exc}; the decision was not applied.", exc.evidence)
    except CoreUnavailable:
        return _error(
            503, "core_unavailable", "cascade-core did not answer; nothing changed, try again."
        )
    except CoreRefused as exc:
        return _error(409, "core_refused", f"cascade-core refused: {exc.code}; nothing changed.")
    return json_response(
        msgspec.json.encode(wire.Resolved(task_id=task_id, state=task.state.value))
    )


@get("/ops/withdrawals/{withdrawal_id:str}", exception_handlers=_OPS_ERRORS)
async def withdrawal_detail(request: AnyRequest, withdrawal_id: FromPath[str]) -> Response[bytes]:
    denied = _denied(request)
    if denied:
        return denied
    if "\x00" in withdrawal_id:
        return _error(404, "not_found", "Withdrawal not found.")
    try:
        found = await service_of(request).withdrawal_detail(withdrawal_id)
    except UnknownWithdrawal:
        return _error(404, "not_found", "Withdrawal not found.")
    return json_response(msgspec.json.encode(_detail(withdrawal_id, found)))


def _detail(withdrawal_id: str, found: WithdrawalDetail) -> wire.WithdrawalDetail:
    record, queue = found.record, found.queue
    answers: dict[object, list[wire.ProviderAnswer]] = {}
    for event in found.events:
        if is_provider_answer(event["details"]):
            row = ProviderAnswerRow(
                at=event["created_at"],  # type: ignore[arg-type]  # a timestamptz column
                event=str(event["event"]),
                details=event["details"],  # type: ignore[arg-type]  # checked just above
            )
            answers.setdefault(event["task_id"], []).append(wire.provider_answer(row))
    return wire.WithdrawalDetail(
        withdrawal_id=withdrawal_id,
        merchant_id=record.merchant_id,
        cohort=record.cohort,
        routing_reason=record.routing_reason,
        flag_state=record.flag_state,
        amount=f"{record.amount:.2f}",
        currency=record.currency,
        destination=wire.masked_destination(record.destination),
        cascade=record.cascade,
        queue=wire.QueueView(
            queue_id=str(queue.queue.queue_id),
            state=queue.queue.state.value,
            cancel_requested=queue.queue.cancel_requested,
            failure_code=queue.queue.failure_code,
            created_at=queue.created_at.isoformat(),
            updated_at=queue.updated_at.isoformat(),
        ),
        tasks=[{**_row(t), "provider_answers": answers.get(t["task_id"], [])} for t in found.tasks],
        events=[_row(e) for e in found.events],
    )


def _row(row: dict[str, object]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, uuid.UUID):
            out[key] = str(value)
        elif hasattr(value, "isoformat"):
            out[key] = value.isoformat()
        elif hasattr(value, "as_tuple"):
            out[key] = f"{value:.2f}"
        else:
            out[key] = value
    return out
