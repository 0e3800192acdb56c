"""Postgres, the system of record: withdrawals, queues, tasks, audit rows, outbox, notifications.

Runtime queries use asyncpg directly (measured on these machines: ~2× the transaction rate of
the same statements through SQLAlchemy Core); SQLAlchemy serves Alembic's migrations.

Every task write is ``UPDATE … WHERE version = $expected`` plus an ``order_task_events`` row in
the same transaction; callers hold the queue row lock (``SELECT … FOR UPDATE``) for the whole
handler, so events of one withdrawal are applied one at a time, and the version check is the
safety net that turns any lost update into an error instead of silent corruption.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeAlias

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from orchestrator.domain import (
    OrderQueue,
    OrderTask,
    Outcome,
    QueueState,
    TaskState,
    Timer,
)

# A pooled connection or a plain one: the store works with both.
# asyncpg's classes are generic only in the stubs: string aliases keep runtime happy.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"


class StaleVersion(Exception):
    """A write found another version than the one it read: someone else won."""


async def _init_connection(conn: Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=_json_text, decoder=msgspec.json.decode, schema="pg_catalog"
    )


def _json_text(value: object) -> str:
    return msgspec.json.encode(_no_nul(value)).decode()


def _no_nul(value: object) -> object:
    """Postgres text and jsonb cannot hold U+0000: free text (reasons, audit details) gets
    U+FFFD in its place. Request data that must round-trip exactly is stored as JSON text."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {k: _no_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nul(v) for v in value]
    return value


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Release without asyncpg's default reset (one extra round-trip per release).

    Safe here: the store never leaves session state behind — no advisory locks, LISTEN,
    cursors or SET outside a transaction — and transactions are always closed by their
    context managers before a connection goes back to the pool.
    """


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 20) -> Pool:
    """A connection pool with the JSON codecs the store relies on."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=30,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


@dataclass(frozen=True, kw_only=True)
class WithdrawalRecord:
    """The stored request and routing decision of one withdrawal."""

    withdrawal_id: str
    merchant_id: str
    amount: Decimal
    currency: str
    destination: dict[str, Any]
    metadata: bytes
    cascade: list[dict[str, str]]
    idempotency_key: str | None
    request_sha256: bytes
    cohort: str
    routing_reason: str
    flag_state: dict[str, Any]
    trace_id: str | None
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class QueueRecord:
    """A queue with its timestamps, as the API shows it."""

    queue: OrderQueue
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


_TASK_COLUMNS = (
    "task_id, queue_id, position, provider_id, state, version, provider_order_id, "
    "provider_reference, freeze_state, outcome, provider_code, recheck_attempts, status_polls, "
    "cancel_requested, state_entered_at"
)


def _task(row: asyncpg.Record | Mapping[str, Any]) -> OrderTask:
    return OrderTask(
        task_id=row["task_id"],
        queue_id=row["queue_id"],
        position=row["position"],
        provider_id=row["provider_id"],
        state=TaskState(row["state"]),
        version=row["version"],
        provider_order_id=row["provider_order_id"],
        provider_reference=row["provider_reference"],
        freeze_state=row["freeze_state"],
        outcome=row["outcome"],
        provider_code=row["provider_code"],
        recheck_attempts=row["recheck_attempts"],
        status_polls=row["status_polls"],
        cancel_requested=row["cancel_requested"],
        state_entered_at=row["state_entered_at"],
    )


async def insert_withdrawal(
    conn: Connection,
    record: WithdrawalRecord,
    queue_id: uuid.UUID,
    tasks: Sequence[OrderTask],
    fees: Sequence[Decimal],
) -> None:
    """Persist a new withdrawal with its queue and PENDING tasks (raises UniqueViolationError)."""
    now = record.created_at
    await conn.execute(
        "INSERT INTO withdrawals (withdrawal_id, merchant_id, amount, currency, destination,"
        " metadata, cascade, idempotency_key, request_sha256, cohort, routing_reason,"
        " flag_state, trace_id, created_at)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)",
        record.withdrawal_id,
        record.merchant_id,
        record.amount,
        record.currency,
        # Exact JSON text, not jsonb: jsonb refuses U+0000, which the contract allows here.
        msgspec.json.encode(record.destination).decode(),
        record.metadata.decode(),
        record.cascade,
        record.idempotency_key,
        record.request_sha256,
        record.cohort,
        record.routing_reason,
        record.flag_state,
        record.trace_id,
        now,
    )
    await conn.execute(
        "INSERT INTO order_queues (queue_id, withdrawal_id, state, created_at, updated_at)"
        " VALUES ($1, $2, 'ACTIVE', $3, $3)",
        queue_id,
        record.withdrawal_id,
        now,
    )
    await conn.executemany(
        "INSERT INTO order_tasks (task_id, queue_id, position, provider_id, fee, state,"
        " provider_order_id, state_entered_at, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, 'PENDING', $6, $7, $7, $7)",
        [
            (t.task_id, queue_id, t.position, t.provider_id, fee, t.provider_order_id, now)
            for t, fee in zip(tasks, fees, strict=True)
        ],
    )
    await conn.executemany(
        "INSERT INTO order_task_events (queue_id, task_id, withdrawal_id, from_state, to_state,"
        " event, actor, trace_id, details, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
        [
            (
                queue_id,
                None,
                record.withdrawal_id,
                None,
                "ACTIVE",
                "queue.created",
                "api",
                record.trace_id,
                {"cohort": record.cohort, "reason": record.routing_reason},
                now,
            )
        ]
        + [
            (
                queue_id,
                t.task_id,
                record.withdrawal_id,
                None,
                "PENDING",
                "task.created",
                "api",
                record.trace_id,
                {"provider_id": t.provider_id},
                now,
            )
            for t in tasks
        ],
    )


async def find_by_idempotency_key(conn: Connection, key: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT withdrawal_id, request_sha256 FROM withdrawals WHERE idempotency_key = $1", key
    )
    return row


async def load_withdrawal(conn: Connection, withdrawal_id: str) -> WithdrawalRecord | None:
    row = await conn.fetchrow("SELECT * FROM withdrawals WHERE withdrawal_id = $1", withdrawal_id)
    if row is None:
        return None
    return WithdrawalRecord(
        withdrawal_id=row["withdrawal_id"],
        merchant_id=row["merchant_id"],
        amount=row["amount"],
        currency=row["currency"],
        destination=msgspec.json.decode(row["destination"]),
        metadata=row["metadata"].encode(),
        cascade=row["cascade"],
        idempotency_key=row["idempotency_key"],
        request_sha256=row["request_sha256"],
        cohort=row["cohort"],
        routing_reason=row["routing_reason"],
        flag_state=row["flag_state"],
        trace_id=row["trace_id"],
        created_at=row["created_at"],
    )


async def load_queue(
    conn: Connection,
    *,
    queue_id: uuid.UUID | None = None,
    withdrawal_id: str | None = None,
    lock: bool = False,
) -> QueueRecord | None:
    """Load a queue and its tasks; ``lock`` takes the queue row lock for the transaction."""
    where = "queue_id = $1" if queue_id is not None else "withdrawal_id = $1"
    key: object = queue_id if queue_id is not None else withdrawal_id
    suffix = " FOR UPDATE" if lock else ""
    q = await conn.fetchrow(f"SELECT * FROM order_queues WHERE {where}{suffix}", key)  # noqa: S608
    if q is None:
        return None
    rows = await conn.fetch(
        f"SELECT {_TASK_COLUMNS} FROM order_tasks WHERE queue_id = $1 ORDER BY position",  # noqa: S608
        q["queue_id"],
    )
    queue = OrderQueue(
        queue_id=q["queue_id"],
        withdrawal_id=q["withdrawal_id"],
        state=QueueState(q["state"]),
        version=q["version"],
        tasks=tuple(_task(r) for r in rows),
        cancel_requested=q["cancel_requested"],
        stop_requested=q["stop_requested"],
        failure_code=q["failure_code"],
    )
    return QueueRecord(
        queue=queue,
        created_at=q["created_at"],
        updated_at=q["updated_at"],
        finished_at=q["finished_at"],
    )


async def find_task_for_provider_order(
    conn: Connection, provider_id: str, order_id: str, reference: str
) -> tuple[uuid.UUID, uuid.UUID, TaskState] | None:
    """(queue_id, task_id, state) of the task owning a provider order, by our id or theirs."""
    row = await conn.fetchrow(
        "SELECT queue_id, task_id, state FROM order_tasks WHERE provider_id = $1"
        " AND (provider_order_id = $2 OR provider_reference = $3) LIMIT 1",
        provider_id,
        order_id,
        reference,
    )
    return None if row is None else (row["queue_id"], row["task_id"], TaskState(row["state"]))


async def record_unapplied_webhook(
    conn: Connection,
    provider_id: str,
    order_id: str,
    reference: str,
    status: str,
    *,
    reason: str,
) -> None:
    """Keep a webhook that changed nothing (unknown order, task already final) for support."""
    await conn.execute(
        "INSERT INTO unmatched_webhooks (provider_id, order_id, reference, status, reason)"
        " VALUES ($1, $2, $3, $4, $5)",
        provider_id,
        order_id,
        reference,
        status,
        reason,
    )


async def save_task(
    conn: Connection,
    before: OrderTask,
    after: OrderTask,
    *,
    withdrawal_id: str,
    event: str,
    actor: str,
    trace_id: str | None,
    details: Mapping[str, object],
    now: datetime,
    timer: Timer | None,
    clear_timer: bool,
) -> None:
    """Write one task transition: version-checked update and its audit row, one transaction."""
    timer_sql = ""
    args: list[object] = [
        after.state.value,
        after.provider_reference,
        after.freeze_state,
        after.outcome,
        after.provider_code,
        after.recheck_attempts,
        after.status_polls,
        after.cancel_requested,
        now,
        before.task_id,
        before.version,
    ]
    if timer is not None:
        timer_sql = ", timer_kind = $12, timer_attempt = $13, timer_due_at = $14"
        args += [timer.kind, timer.attempt, timer.due_at]
    elif clear_timer or after.state != before.state:
        timer_sql = ", timer_kind = NULL, timer_attempt = NULL, timer_due_at = NULL"
    entered = ", state_entered_at = $9" if after.state != before.state else ""
    # Only fixed fragments are interpolated; every value is a bind parameter.
    sql = (
        "UPDATE order_tasks SET state = $1, provider_reference = $2, freeze_state = $3,"  # noqa: S608
        " outcome = $4, provider_code = $5, recheck_attempts = $6, status_polls = $7,"
        f" cancel_requested = $8, updated_at = $9, version = version + 1{entered}{timer_sql}"
        " WHERE task_id = $10 AND version = $11"
    )
    status = await conn.execute(sql, *args)
    if status != "UPDATE 1":
        raise StaleVersion(f"task {before.task_id} is no longer at version {before.version}")
    await audit(
        conn,
        queue_id=before.queue_id,
        task_id=before.task_id,
        withdrawal_id=withdrawal_id,
        from_state=before.state.value,
        to_state=after.state.value if after.state != before.state else None,
        event=event,
        actor=actor,
        trace_id=trace_id,
        details=details,
        now=now,
    )


async def audit(
    conn: Connection,
    *,
    queue_id: uuid.UUID,
    task_id: uuid.UUID | None,
    withdrawal_id: str,
    from_state: str | None,
    to_state: str | None,
    event: str,
    actor: str,
    trace_id: str | None,
    details: Mapping[str, object],
    now: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO order_task_events (queue_id, task_id, withdrawal_id, from_state, to_state,"
        " event, actor, trace_id, details, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
        queue_id,
        task_id,
        withdrawal_id,
        from_state,
        to_state,
        event,
        actor,
        trace_id,
        dict(details),
        now,
    )


async def save_queue(
    conn: Connection,
    before: OrderQueue,
    *,
    state: QueueState | None = None,
    cancel_requested: bool | None = None,
    cancel_reason: str | None = None,
    stop_requested: bool | None = None,
    failure_code: Outcome | None = None,
    event: str,
    actor: str,
    trace_id: str | None,
    now: datetime,
) -> None:
    """Write a queue change with its audit row (version-checked)."""
    new_state = state or before.state
    status = await conn.execute(
        "UPDATE order_queues SET state = $1::text,"
        " cancel_requested = cancel_requested OR $2::boolean,"
        " cancel_reason = COALESCE($3::text, cancel_reason),"
        " stop_requested = stop_requested OR $4::boolean,"
        " failure_code = COALESCE($5::text, failure_code), updated_at = $6::timestamptz,"
        " finished_at = CASE WHEN $1::text <> 'ACTIVE' THEN $6::timestamptz END,"
        " version = version + 1"
        " WHERE queue_id = $7 AND version = $8",
        new_state.value,
        bool(cancel_requested),
        _no_nul(cancel_reason),
        bool(stop_requested),
        failure_code,
        now,
        before.queue_id,
        before.version,
    )
    if status != "UPDATE 1":
        raise StaleVersion(f"queue {before.queue_id} is no longer at version {before.version}")
    await audit(
        conn,
        queue_id=before.queue_id,
        task_id=None,
        withdrawal_id=before.withdrawal_id,
        from_state=before.state.value,
        to_state=new_state.value if new_state != before.state else None,
        event=event,
        actor=actor,
        trace_id=trace_id,
        details={"failure_code": failure_code} if failure_code else {},
        now=now,
    )


async def touch_queue(conn: Connection, queue_id: uuid.UUID, now: datetime) -> None:
    """Bump the queue's updated_at (the API's ``updated_at``) when one of its tasks changed."""
    await conn.execute("UPDATE order_queues SET updated_at = $1 WHERE queue_id = $2", now, queue_id)


async def enqueue(
    conn: Connection, subject: str, payload: bytes, headers: Mapping[str, str] | None = None
) -> int:
    """Add a message to the outbox, in the caller's transaction."""
    ident: int = await conn.fetchval(
        "INSERT INTO outbox (subject, payload, headers) VALUES ($1, $2, $3) RETURNING id",
        subject,
        payload,
        dict(headers or {}),
    )
    return ident


async def add_notification(
    conn: Connection, withdrawal_id: str, status: str, body: bytes, first_attempt_at: datetime
) -> None:
    await conn.execute(
        "INSERT INTO notifications (withdrawal_id, status, body, next_attempt_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        withdrawal_id,
        status,
        body,
        first_attempt_at,
    )
