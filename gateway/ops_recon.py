"""Ops API for reconciliation alerts (finance and operators; bearer tokens from
``OPS_API_TOKENS``).

- ``GET /ops/recon/alerts?state=open,acknowledged&rule=ledger_parity&limit=200`` — alerts,
  the newest first (every state and rule when not filtered).
- ``POST /ops/recon/alerts/{id}/ack`` — someone is on it.
- ``POST /ops/recon/alerts/{id}/resolve`` ``{"reference": "…"}`` — fixed; the reference
  (a ticket, a ledger correction) is required.
- ``POST /ops/recon/alerts/{id}/accept`` ``{"note": "…"}`` — not to be fixed, with why.

Each action needs ``X-Operator`` (422 without it), is allowed only from the states of
:data:`orchestrator.reconciliation.ALERT_TRANSITIONS` (409 otherwise) and appends an event to
the alert's log. These routes change alerts only, never a withdrawal, a task or a balance.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath

from gateway.api import runtime_of
from gateway.ops import _OPS_ERRORS, _denied, _error, _operator
from gateway.ops_wire import Timestamp
from gateway.protocol import json_response, read_body
from gateway.service import Unavailable
from orchestrator import store
from orchestrator.reconciliation import (
    ALERT_STATES,
    RULES,
    IllegalAlertTransition,
    next_state,
)
from orchestrator.store import recon

AnyRequest = Request[Any, Any, Any]
MAX_LIMIT = 1000
MAX_TEXT = 500


class AlertEvent(msgspec.Struct, frozen=True, kw_only=True):
    event: Annotated[str, msgspec.Meta(description="raised, reopened, ack, resolve, accept")]
    from_state: str | None
    to_state: str
    actor: Annotated[str, msgspec.Meta(description="recon, or ops:<operator>")]
    details: dict[str, Any]
    at: Timestamp


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    alert_id: int
    fingerprint: Annotated[
        str, msgspec.Meta(description="Rule and subject: the same finding keeps its alert.")
    ]
    rule: Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(RULES)})]
    severity: Annotated[str, msgspec.Meta(extra_json_schema={"enum": ["warning", "critical"]})]
    state: Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(ALERT_STATES)})]
    withdrawal_id: str | None
    task_id: str | None
    summary: str
    evidence: Annotated[
        dict[str, Any],
        msgspec.Meta(description="What was compared and both sides' answers, at first detection."),
    ]
    last_evidence: Annotated[
        dict[str, Any], msgspec.Meta(description="The same, at the latest detection.")
    ]
    first_seen_at: Timestamp
    last_seen_at: Timestamp
    detections: int
    resolution_reference: str | None
    acceptance_note: str | None
    operator: Annotated[str | None, msgspec.Meta(description="Who last acted on it.")]
    updated_at: Timestamp
    events: list[AlertEvent] | None = None


class Alerts(msgspec.Struct, frozen=True, kw_only=True):
    alerts: list[Alert]


class AlertActionBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``reference`` is required to resolve, ``note`` to accept; ack takes neither."""

    reference: str | None = None
    note: str | None = None


def _alert(row: dict[str, Any], events: list[dict[str, Any]] | None = None) -> Alert:
    return Alert(
        alert_id=row["alert_id"],
        fingerprint=row["fingerprint"],
        rule=row["rule"],
        severity=row["severity"],
        state=row["state"],
        withdrawal_id=row["withdrawal_id"],
        task_id=row["task_id"],
        summary=row["summary"],
        evidence=row["evidence"],
        last_evidence=row["last_evidence"],
        first_seen_at=row["first_seen_at"].isoformat(),
        last_seen_at=row["last_seen_at"].isoformat(),
        detections=row["detections"],
        resolution_reference=row["resolution_reference"],
        acceptance_note=row["acceptance_note"],
        operator=row["operator"],
        updated_at=row["updated_at"].isoformat(),
        events=None
        if events is None
        else [
            AlertEvent(
                event=e["event"],
                from_state=e["from_state"],
                to_state=e["to_state"],
                actor=e["actor"],
                details=e["details"],
                at=e["created_at"].isoformat(),
            )
            for e in events
        ],
    )


class _BadParameter(ValueError):
    pass


def _filters(request: AnyRequest) -> tuple[list[str], str | None, int]:
    params = request.query_params
    states = [s.strip() for s in (params.get("state") or "").split(",") if s.strip()]
    unknown = [s for s in states if s not in ALERT_STATES]
    if unknown:
        raise _BadParameter(f"state must be among {', '.join(ALERT_STATES)}, not {unknown[0]!r}")
    rule = params.get("rule") or None
    if rule is not None and rule not in RULES:
        raise _BadParameter(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    raw_limit = params.get("limit") or "200"
    if not raw_limit.isdecimal() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise _BadParameter(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return states, rule, int(raw_limit)


@get("/ops/recon/alerts", exception_handlers=_OPS_ERRORS)
async def list_alerts(request: AnyRequest) -> Response[bytes]:
    denied = _denied(request)
    if denied:
        return denied
    try:
        states, rule, limit = _filters(request)
    except _BadParameter as exc:
        return _error(400, "invalid_parameter", str(exc))
    try:
        async with runtime_of(request).pool.acquire() as conn:
            rows = await recon.list_alerts(conn, states=states, rule=rule, limit=limit)
    except store.DATABASE_UNAVAILABLE as exc:
        raise Unavailable from exc
    return json_response(msgspec.json.encode(Alerts(alerts=[_alert(r) for r in rows])))


async def _act(request: AnyRequest, alert_id: str, action: str) -> Response[bytes]:
    denied = _denied(request)
    if denied:
        return denied
    if not (alert_id.isascii() and alert_id.isdecimal()) or len(alert_id) > 18:
        return _error(404, "not_found", "No such alert.")
    raw = await read_body(request)
    try:
        body = msgspec.json.decode(raw or b"{}", type=AlertActionBody)
    except msgspec.ValidationError as exc:
        return _error(422, "validation_failed", str(exc))
    except msgspec.DecodeError:
        return _error(400, "malformed_json", "Request body is not valid JSON.")
    reference = (body.reference or "").strip()[:MAX_TEXT] or None
    note = (body.note or "").strip()[:MAX_TEXT] or None
    if action == "resolve" and reference is None:
        return _error(422, "validation_failed", "reference is required to resolve an alert")
    if action == "accept" and note is None:
        return _error(422, "validation_failed", "note is required to accept an alert")
    operator = _operator(request)
    if operator is None:
        return _error(
            422,
            "validation_failed",
            "X-Operator header is required: name who acts (it is kept in the alert's log)",
        )
    try:
        return await _apply(
            request, int(alert_id), action, actor="ops:" + operator, reference=reference, note=note
        )
    except store.DATABASE_UNAVAILABLE as exc:
        raise Unavailable from exc


async def _apply(
    request: AnyRequest,
    alert_id: int,
    action: str,
    *,
    actor: str,
    reference: str | None,
    note: str | None,
) -> Response[bytes]:
    async with runtime_of(request).pool.acquire() as conn, conn.transaction():
        row = await recon.alert_for_update(conn, alert_id)
        if row is None:
            return _error(404, "not_found", "No such alert.")
        try:
            target = next_state(row["state"], action)
        except IllegalAlertTransition as exc:
            return _error(409, "illegal_transition", f"{exc}; nothing changed.")
        await recon.move_alert(
            conn,
            alert_id,
            action=action,
            from_state=row["state"],
            to_state=target,
            operator=actor,
            reference=reference if action == "resolve" else None,
            note=note if action == "accept" else None,
            now=datetime.now(UTC),
        )
        moved = await recon.alert_for_update(conn, alert_id)
        events = await recon.alert_events(conn, alert_id)
    assert moved is not None
    return json_response(msgspec.json.encode(_alert(moved, events)))


@post("/ops/recon/alerts/{alert_id:str}/ack", status_code=200, exception_handlers=_OPS_ERRORS)
async def ack_alert(request: AnyRequest, alert_id: FromPath[str]) -> Response[bytes]:
    return await _act(request, alert_id, "ack")


@post("/ops/recon/alerts/{alert_id:str}/resolve", status_code=200, exception_handlers=_OPS_ERRORS)
async def resolve_alert(request: AnyRequest, alert_id: FromPath[str]) -> Response[bytes]:
    return await _act(request, alert_id, "resolve")


@post("/ops/recon/alerts/{alert_id:str}/accept", status_code=200, exception_handlers=_OPS_ERRORS)
async def accept_alert(request: AnyRequest, alert_id: FromPath[str]) -> Response[bytes]:
    return await _act(request, alert_id, "accept")
