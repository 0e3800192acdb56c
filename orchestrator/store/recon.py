"""The reconciliation job's queries (:mod:`orchestrator.reconciliation`) and its alerts' lifecycle.

The job reads the engine's tables and writes only its own (``recon_alerts``, their append-only
``recon_alert_events``, ``recon_runs``): it never changes a withdrawal, a task or a balance.
Every query of a rule is bounded (a window, a limit) and served by an index of migration 0002;
``python -m bench recon`` prints their plans.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.store import Connection

# One runner per fleet: a run holds this session-level advisory lock on one connection for
# its whole length, while its reads and writes are short transactions of their own (no
# transaction stays open across its HTTP calls). The server releases it if the connection
# drops; the runner unlocks it, or terminates the connection, before handing it back.
RECON_LOCK_KEY = 0x7265636F6E  # "recon"
# The states of an attempt that was paid out (a returned one was paid first).
PAID_STATES = ("SUCCEEDED", "RETURNED")


async def try_lock(conn: Connection) -> bool:
    """Take the fleet-wide reconciliation lock for this session; False if another has it."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", RECON_LOCK_KEY))


async def unlock(conn: Connection) -> bool:
    """Release the lock :func:`try_lock` took on this session; False if it did not hold it."""
    return bool(await conn.fetchval("SELECT pg_advisory_unlock($1)", RECON_LOCK_KEY))


@dataclass(frozen=True, slots=True)
class OpenFreeze:
    """An attempt whose amount is frozen at cascade-core and not yet committed or rolled back."""

    task_id: uuid.UUID
    withdrawal_id: str
    provider_id: str
    state: str
    frozen_since: datetime
    amount: str
    currency: str


async def open_freezes(conn: Connection, *, limit: int) -> list[OpenFreeze]:
    """Every open freeze (the oldest first, at most ``limit``), with when it was placed: the
    task's first entry into CREATING, where the engine freezes."""
    # LATERAL … LIMIT 1 keeps the lookups per open freeze (index probes): a hash join would
    # read every queue and withdrawal of the table for a few hundred freezes.
    rows = await conn.fetch(
        "SELECT t.task_id, q.withdrawal_id, t.provider_id, t.state, w.amount, w.currency,"
        " coalesce((SELECT min(e.created_at) FROM order_task_events e"
        "   WHERE e.task_id = t.task_id AND e.to_state = 'CREATING'), t.created_at) AS since"
        " FROM (SELECT task_id, queue_id, provider_id, state, created_at, state_entered_at"
        "   FROM order_tasks WHERE freeze_state = 'frozen' ORDER BY state_entered_at LIMIT $1) t"
        " CROSS JOIN LATERAL (SELECT withdrawal_id FROM order_queues"
        "   WHERE queue_id = t.queue_id LIMIT 1) q"
        " CROSS JOIN LATERAL (SELECT amount, currency FROM withdrawals"
        "   WHERE withdrawal_id = q.withdrawal_id LIMIT 1) w"
        " ORDER BY t.state_entered_at",
        limit,
    )
    return [
        OpenFreeze(
            task_id=r["task_id"],
            withdrawal_id=r["withdrawal_id"],
            provider_id=r["provider_id"],
            state=r["state"],
            frozen_since=r["since"],
            amount=f"{r['amount']:.2f}",
            currency=r["currency"].strip(),
        )
        for r in rows
    ]


async def recent_success_queues(
    conn: Connection, since: datetime, *, limit: int
) -> list[uuid.UUID]:
    """The queue of each of up to ``limit`` attempts that SUCCEEDED since ``since`` (the
    previous run), the newest first: an index-only range scan of ``order_tasks_succeeded``."""
    rows = await conn.fetch(
        "SELECT queue_id FROM order_tasks WHERE state = 'SUCCEEDED' AND state_entered_at >= $1"
        " ORDER BY state_entered_at DESC LIMIT $2",
        since,
        limit,
    )
    return [r["queue_id"] for r in rows]


async def double_successes(
    conn: Connection, queue_ids: Sequence[uuid.UUID], *, limit: int
) -> list[dict[str, Any]]:
    """Of these queues (:func:`recent_success_queues`), those with more than one paid
    attempt: one probe of the ``(queue_id, position)`` index per queue, so a run reads at
    most its scan's worth whatever the table holds."""
    rows = await conn.fetch(
        "SELECT q.withdrawal_id, d.queue_id, d.task_ids, d.providers, d.references"
        " FROM unnest($1::uuid[]) AS recent(queue_id)"
        " CROSS JOIN LATERAL (SELECT recent.queue_id,"
        "   array_agg(o.task_id::text ORDER BY o.position) AS task_ids,"
        "   array_agg(o.provider_id ORDER BY o.position) AS providers,"
        "   array_agg(o.provider_reference ORDER BY o.position) AS references"
        "   FROM order_tasks o WHERE o.queue_id = recent.queue_id AND o.state = ANY($3::text[])"
        "   HAVING count(*) > 1) d"
        " CROSS JOIN LATERAL (SELECT withdrawal_id FROM order_queues"
        "   WHERE queue_id = d.queue_id LIMIT 1) q"
        " LIMIT $2",
        list(queue_ids),
        limit,
        list(PAID_STATES),
    )
    return [dict(r) for r in rows]


async def successes_after_final(
    conn: Connection, since: datetime, *, limit: int
) -> list[dict[str, Any]]:
    """Verified success webhooks for attempts that had already ended without success."""
    rows = await conn.fetch(
        "SELECT u.id, u.provider_id, u.order_id, u.reference, u.received_at,"
        " t.task_id, t.state, q.withdrawal_id"
        " FROM unmatched_webhooks u"
        " LEFT JOIN LATERAL (SELECT task_id, queue_id, state FROM order_tasks"
        "   WHERE provider_id = u.provider_id AND provider_order_id = u.order_id LIMIT 1) t"
        "   ON true"
        " LEFT JOIN order_queues q ON q.queue_id = t.queue_id"
        " WHERE u.received_at >= $1 AND u.reason = 'success_after_final'"
        " ORDER BY u.id LIMIT $2",
        since,
        limit,
    )
    return [dict(r) for r in rows]


@dataclass(frozen=True, slots=True)
class SettledAttempt:
    """An attempt whose freeze we recorded as committed or rolled back."""

    task_id: uuid.UUID
    withdrawal_id: str
    provider_id: str
    state: str
    freeze_state: str
    settled_at: datetime


async def settled_attempts(
    conn: Connection, *, recent_since: datetime, window_since: datetime, budget: int
) -> list[SettledAttempt]:
    """Up to ``budget`` settled attempts to compare with the ledger: those settled since
    ``recent_since`` first (the newest first), then a random sample of the rest of the window."""
    # The sample: ``budget`` random instants of the rest of the window, each the first
    # settlement at or after it: one index probe each (the instants are drawn in a subquery
    # of their own, so each is a constant to its probe). Not uniform per attempt — one after
    # a quiet spell weighs more — but each run looks at other attempts, none reads the window.
    rows = await conn.fetch(
        "(SELECT task_id, queue_id, provider_id, state, freeze_state, state_entered_at"
        "  FROM order_tasks WHERE freeze_state IN ('committed', 'rolled_back')"
        "  AND state_entered_at >= $1 ORDER BY state_entered_at DESC LIMIT $3)"
        " UNION"
        " (SELECT s.* FROM (SELECT $2::timestamptz"
        "   + random() * ($1::timestamptz - $2::timestamptz) AS at"
        "   FROM generate_series(1, $3)) AS g CROSS JOIN LATERAL"
        "  (SELECT task_id, queue_id, provider_id, state, freeze_state, state_entered_at"
        "   FROM order_tasks WHERE freeze_state IN ('committed', 'rolled_back')"
        "   AND state_entered_at >= g.at AND state_entered_at < $1"
        "   ORDER BY state_entered_at LIMIT 1) s)",
        recent_since,
        window_since,
        budget,
    )
    # The recent ones first, the newest first.
    rows = sorted(
        rows,
        key=lambda r: (r["state_entered_at"] < recent_since, -r["state_entered_at"].timestamp()),
    )
    queues = {r["queue_id"] for r in rows[:budget]}
    owners: dict[uuid.UUID, str] = {
        r["queue_id"]: r["withdrawal_id"]
        for r in await conn.fetch(
            "SELECT queue_id, withdrawal_id FROM order_queues WHERE queue_id = ANY($1::uuid[])",
            list(queues),
        )
    }
    return [
        SettledAttempt(
            task_id=r["task_id"],
            withdrawal_id=owners.get(r["queue_id"], ""),
            provider_id=r["provider_id"],
            state=r["state"],
            freeze_state=r["freeze_state"],
            settled_at=r["state_entered_at"],
        )
        for r in rows[:budget]
    ]


@dataclass(frozen=True, slots=True)
class ProviderCheck:
    """An attempt whose provider is asked for its view of the order."""

    task_id: uuid.UUID
    withdrawal_id: str
    provider_id: str
    provider_order_id: str
    state: str
    since: datetime
    provider_reference: str | None = None


async def provider_checks(
    conn: Connection, *, final_since: datetime, in_flight_before: datetime, limit: int
) -> list[ProviderCheck]:
    """Attempts to compare with their provider: those the provider accepted that became
    final since ``final_since`` (the newest first), then those waiting (EXECUTING,
    MANUAL_CHECK) since before ``in_flight_before`` (the oldest first); each part at most
    ``limit``."""
    rows = await conn.fetch(
        "(SELECT task_id, queue_id, provider_id, provider_order_id, provider_reference, state,"
        "  state_entered_at"
        "  FROM order_tasks WHERE freeze_state IN ('committed', 'rolled_back')"
        "  AND state_entered_at >= $1 AND provider_reference IS NOT NULL"
        "  ORDER BY state_entered_at DESC LIMIT $3)"
        " UNION ALL"
        " (SELECT task_id, queue_id, provider_id, provider_order_id, provider_reference, state,"
        "  state_entered_at"
        "  FROM order_tasks WHERE freeze_state = 'frozen'"
        "  AND state IN ('EXECUTING', 'MANUAL_CHECK') AND state_entered_at < $2"
        "  ORDER BY state_entered_at LIMIT $3)",
        final_since,
        in_flight_before,
        limit,
    )
    owners: dict[uuid.UUID, str] = {
        r["queue_id"]: r["withdrawal_id"]
        for r in await conn.fetch(
            "SELECT queue_id, withdrawal_id FROM order_queues WHERE queue_id = ANY($1::uuid[])",
            list({r["queue_id"] for r in rows}),
        )
    }
    return [
        ProviderCheck(
            task_id=r["task_id"],
            withdrawal_id=owners.get(r["queue_id"], ""),
            provider_id=r["provider_id"],
            provider_order_id=r["provider_order_id"],
            state=r["state"],
            since=r["state_entered_at"],
            provider_reference=r["provider_reference"],
        )
        for r in rows
    ]


async def returned_attempts(
    conn: Connection, since: datetime, *, limit: int
) -> list[dict[str, Any]]:
    """Attempts that became RETURNED since ``since`` (the oldest first, at most ``limit``),
    with their withdrawal, amount and the audit row of the return."""
    # Returns are rare: the state index finds them; the lookups per row are index probes.
    rows = await conn.fetch(
        "SELECT t.task_id, t.provider_id, t.provider_order_id, t.provider_reference,"
        " t.provider_code, t.state_entered_at, q.withdrawal_id, w.amount, w.currency,"
        " e.event_id, e.event, e.actor, e.trace_id, e.details, e.created_at AS event_at"
        " FROM (SELECT task_id, queue_id, provider_id, provider_order_id, provider_reference,"
        "   provider_code, state_entered_at FROM order_tasks"
        "   WHERE state = 'RETURNED' AND state_entered_at >= $1"
        "   ORDER BY state_entered_at LIMIT $2) t"
        " CROSS JOIN LATERAL (SELECT withdrawal_id FROM order_queues"
        "   WHERE queue_id = t.queue_id LIMIT 1) q"
        " CROSS JOIN LATERAL (SELECT amount, currency FROM withdrawals"
        "   WHERE withdrawal_id = q.withdrawal_id LIMIT 1) w"
        " LEFT JOIN LATERAL (SELECT event_id, event, actor, trace_id, details, created_at"
        "   FROM order_task_events WHERE task_id = t.task_id AND to_state = 'RETURNED'"
        "   ORDER BY event_id DESC LIMIT 1) e ON true"
        " ORDER BY t.state_entered_at",
        since,
        limit,
    )
    return [dict(r) for r in rows]


async def unacknowledged_notifications(
    conn: Connection, older_than: datetime, *, limit: int
) -> list[dict[str, Any]]:
    """Final-status notifications cascade-core has not acknowledged since before
    ``older_than``, the oldest first."""
    rows = await conn.fetch(
        "SELECT withdrawal_id, status, attempts, created_at, last_error, next_attempt_at"
        " FROM notifications WHERE acked_at IS NULL AND created_at < $1"
        " ORDER BY created_at LIMIT $2",
        older_than,
        limit,
    )
    return [dict(r) for r in rows]


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One detection of a rule: the alert it raises or updates is keyed by ``fingerprint``."""

    fingerprint: str
    rule: str
    severity: str
    summary: str
    evidence: dict[str, Any]
    withdrawal_id: str | None = None
    task_id: uuid.UUID | None = None
    # Whether a resolved alert opens again when this is seen again: only for a finding that
    # disappears from the record once fixed (a double success stays in it for good).
    reopens: bool = False


@dataclass(frozen=True, slots=True)
class Recorded:
    new: list[int]
    updated: int
    reopened: list[int]


async def existing_alerts(conn: Connection, fingerprints: Sequence[str]) -> dict[str, str]:
    """fingerprint → state of the alerts these fingerprints already have."""
    rows = await conn.fetch(
        "SELECT fingerprint, state FROM recon_alerts WHERE fingerprint = ANY($1::text[])",
        list(fingerprints),
    )
    return {r["fingerprint"]: r["state"] for r in rows}


async def raise_alerts(conn: Connection, findings: Sequence[Finding], now: datetime) -> list[int]:
    """Insert new alerts, each with its ``raised`` event; returns their ids."""
    if not findings:
        return []
    ids: list[int] = [
        r["alert_id"]
        for r in await conn.fetch(
            "INSERT INTO recon_alerts (fingerprint, rule, severity, withdrawal_id, task_id,"
            " summary, evidence, last_evidence, first_seen_at, last_seen_at, updated_at)"
            " SELECT f, r, s, w, t, m, e, e, $8, $8, $8"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::uuid[],"
            "   $6::text[], $7::jsonb[]) AS x(f, r, s, w, t, m, e)"
            " ON CONFLICT (fingerprint) DO NOTHING RETURNING alert_id",
            [f.fingerprint for f in findings],
            [f.rule for f in findings],
            [f.severity for f in findings],
            [f.withdrawal_id for f in findings],
            [f.task_id for f in findings],
            [f.summary for f in findings],
            [f.evidence for f in findings],
            now,
        )
    ]
    await _log(conn, ids, "raised", None, "open", actor="recon", now=now)
    return ids


async def update_alerts(conn: Connection, findings: Sequence[Finding], now: datetime) -> list[int]:
    """A re-detection: last seen, count, latest evidence and severity; a resolved alert whose
    finding ``reopens`` is open again. Returns the ids of the reopened ones."""
    if not findings:
        return []
    rows = await conn.fetch(
        "WITH x AS (SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::bool[])"
        "   AS x(f, s, e, reopens)),"
        " old AS (SELECT a.alert_id, a.state FROM recon_alerts a JOIN x ON a.fingerprint = x.f"
        "   FOR UPDATE OF a)"
        " UPDATE recon_alerts a SET last_seen_at = $5, detections = a.detections + 1,"
        " last_evidence = x.e, severity = x.s, updated_at = $5,"
        " state = CASE WHEN a.state = 'resolved' AND x.reopens THEN 'open' ELSE a.state END"
        " FROM x, old WHERE a.fingerprint = x.f AND old.alert_id = a.alert_id"
        " RETURNING a.alert_id, old.state AS was, a.state",
        [f.fingerprint for f in findings],
        [f.severity for f in findings],
        [f.evidence for f in findings],
        [f.reopens for f in findings],
        now,
    )
    reopened = [r["alert_id"] for r in rows if r["was"] != r["state"]]
    await _log(conn, reopened, "reopened", "resolved", "open", actor="recon", now=now)
    return reopened


async def _log(
    conn: Connection,
    alert_ids: Sequence[int],
    event: str,
    from_state: str | None,
    to_state: str,
    *,
    actor: str,
    now: datetime,
    details: dict[str, Any] | None = None,
) -> None:
    if not alert_ids:
        return
    await conn.execute(
        "INSERT INTO recon_alert_events (alert_id, event, from_state, to_state, actor,"
        " details, created_at) SELECT unnest($1::bigint[]), $2, $3, $4, $5, $6, $7",
        list(alert_ids),
        event,
        from_state,
        to_state,
        actor,
        details or {},
        now,
    )


async def record_run(
    conn: Connection,
    *,
    started_at: datetime,
    finished_at: datetime,
    new_alerts: int,
    detections: int,
    details: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO recon_runs (started_at, finished_at, seconds, new_alerts, detections,"
        " details) VALUES ($1, $2, $3, $4, $5, $6)",
        started_at,
        finished_at,
        (finished_at - started_at).total_seconds(),
        new_alerts,
        detections,
        details,
    )


async def last_success(conn: Connection) -> datetime | None:
    """When the last run anywhere in the fleet finished."""
    value: datetime | None = await conn.fetchval("SELECT max(finished_at) FROM recon_runs")
    return value


async def open_per_rule(conn: Connection) -> dict[str, int]:
    """Alerts not yet resolved or accepted (open or acknowledged), per rule."""
    rows = await conn.fetch(
        "SELECT rule, count(*) AS n FROM recon_alerts"
        " WHERE state IN ('open', 'acknowledged') GROUP BY rule"
    )
    return {r["rule"]: r["n"] for r in rows}


_ALERT_COLUMNS = (
    "alert_id, fingerprint, rule, severity, state, withdrawal_id, task_id::text AS task_id,"
    " summary, evidence, last_evidence, first_seen_at, last_seen_at, detections,"
    " resolution_reference, acceptance_note, operator, updated_at"
)


async def list_alerts(
    conn: Connection, *, states: Sequence[str], rule: str | None, limit: int
) -> list[dict[str, Any]]:
    """Alerts in ``states`` (all when empty), of ``rule`` when given, the newest first."""
    rows = await conn.fetch(
        f"SELECT {_ALERT_COLUMNS} FROM recon_alerts"  # noqa: S608 — a constant column list
        " WHERE (cardinality($1::text[]) = 0 OR state = ANY($1::text[]))"
        " AND ($2::text IS NULL OR rule = $2) ORDER BY alert_id DESC LIMIT $3",
        list(states),
        rule,
        limit,
    )
    return [dict(r) for r in rows]


async def alert_for_update(conn: Connection, alert_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {_ALERT_COLUMNS} FROM recon_alerts"  # noqa: S608 — a constant column list
        " WHERE alert_id = $1 FOR UPDATE",
        alert_id,
    )
    return None if row is None else dict(row)


async def move_alert(
    conn: Connection,
    alert_id: int,
    *,
    action: str,
    from_state: str,
    to_state: str,
    operator: str,
    reference: str | None,
    note: str | None,
    now: datetime,
) -> None:
    """Apply an operator's transition (checked by the caller) and append its event."""
    await conn.execute(
        "UPDATE recon_alerts SET state = $2, operator = $3, updated_at = $4,"
        " resolution_reference = coalesce($5, resolution_reference),"
        " acceptance_note = coalesce($6, acceptance_note) WHERE alert_id = $1",
        alert_id,
        to_state,
        operator,
        now,
        reference,
        note,
    )
    details = {k: v for k, v in (("reference", reference), ("note", note)) if v is not None}
    await _log(
        conn, [alert_id], action, from_state, to_state, actor=operator, now=now, details=details
    )


async def alert_events(conn: Connection, alert_id: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT event_id, event, from_state, to_state, actor, details, created_at"
        " FROM recon_alert_events WHERE alert_id = $1 ORDER BY event_id",
        alert_id,
    )
    return [dict(r) for r in rows]
