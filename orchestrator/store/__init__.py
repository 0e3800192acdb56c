"""Postgres, the system of record: every query the project runs lives in this package.

This module: withdrawals, queues, tasks, audit rows, outbox, notifications (the engine's
reads and writes).

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
    FINAL_TASK_STATES,
    OrderQueue,
    OrderTask,
    QueueState,
    TaskState,
    Timer,
)

# A pooled connection or a plain one: the store works with both.
# asyncpg's classes are generic only in the stubs: string aliases keep runtime happy.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"


DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    TimeoutError,
    asyncpg.InterfaceError,  # the client's view: connection closed, in use, ...
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08: the connection is gone
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up, canceled
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, no disk
    asyncpg.TransactionRollbackError,  # class 40: deadlock, serialization: rolled back
    asyncpg.ReadOnlySQLTransactionError,  # 25006: a write sent to a demoted primary
)
"""Errors that mean the database cannot answer right now, by kind (SQLSTATE class or the
client's own), never by a list of cases: the transaction did not commit, and the same
request may simply be sent again (the API answers 503; a request that had already called
out — a resolution's balance call, say — repeats those calls idempotently)."""


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

    Safe here: the store never leaves session state behind — no LISTEN, cursors or SET
    outside a transaction, and the one session advisory lock (the reconciliation run's) is
    unlocked, or its connection terminated, before the connection goes back — and
    transactions are always closed by their context managers before a connection goes back
    to the pool.
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


Loaded: TypeAlias = "tuple[WithdrawalRecord, QueueRecord]"
"""A withdrawal as the engine loads it: the stored request and the queue with its tasks."""


_TASK_FIELDS = (
    "task_id",
    "queue_id",
    "position",
    "provider_id",
    "state",
    "version",
    "provider_order_id",
    "provider_reference",
    "freeze_state",
    "outcome",
    "provider_code",
    "recheck_attempts",
    "status_polls",
    "cancel_requested",
    "state_entered_at",
    "timer_kind",
    "create_retries",
)
_TASK_COLUMNS = ", ".join(_TASK_FIELDS)
# A queue's tasks as one column of the queue's row (an array of anonymous records, decoded by
# asyncpg as tuples in _TASK_FIELDS order): one round-trip for a plain read. Never in a locking
# read: a statement that waited for the queue row lock re-reads the locked row at its newest
# version, but a subquery keeps the snapshot taken before the wait, so it would return the
# tasks as they were before the lock holder's commit. Locking reads fetch the tasks with a
# second statement, whose snapshot is taken after the lock is held.
_TASKS_OF_QUEUE = (
    f"(SELECT array_agg(ROW({_TASK_COLUMNS}) ORDER BY position) FROM order_tasks t"  # noqa: S608
    " WHERE t.queue_id = q.queue_id) AS tasks"
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
        timer_kind=row["timer_kind"],
        create_retries=row["create_retries"],
    )


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message written to the outbox in a transaction, published after its commit."""

    id: int
    subject: str
    payload: bytes
    headers: Mapping[str, str]


# One statement, so one round-trip and no BEGIN/COMMIT: the withdrawal, its queue, its tasks,
# their audit rows and (cascade) the first task's start message. ON CONFLICT DO NOTHING covers
# both unique keys (withdrawal_id, idempotency_key): on a conflict nothing at all is written and
# the statement returns no row (a concurrent insert of the same key is waited for first).
_INSERT_WITHDRAWAL = """
WITH w AS (
    INSERT INTO withdrawals (withdrawal_id, merchant_id, amount, currency, destination,
        metadata, cascade, idempotency_key, request_sha256, cohort, routing_reason,
        flag_state, trace_id, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
    ON CONFLICT DO NOTHING
    RETURNING withdrawal_id
), q AS (
    INSERT INTO order_queues (queue_id, withdrawal_id, state, created_at, updated_at)
    SELECT $15, withdrawal_id, 'ACTIVE', $14, $14 FROM w
    RETURNING queue_id
), t AS (
    INSERT INTO order_tasks (task_id, queue_id, position, provider_id, fee, state,
        provider_order_id, state_entered_at, created_at, updated_at)
    SELECT u.task_id, q.queue_id, u.position, u.provider_id, u.fee, 'PENDING',
        u.provider_order_id, $14, $14, $14
    FROM q, unnest($16::uuid[], $17::int[], $18::text[], $19::numeric[], $20::text[])
        AS u(task_id, position, provider_id, fee, provider_order_id)
    RETURNING task_id, provider_id, position
), e AS (
    INSERT INTO order_task_events (queue_id, task_id, withdrawal_id, from_state, to_state,
        event, actor, trace_id, details, created_at)
    SELECT $15, NULL, $1, NULL, 'ACTIVE', 'queue.created', 'api', $13,
        jsonb_build_object('cohort', $10::text, 'reason', $11::text), $14 FROM q
    UNION ALL
    SELECT $15, task_id, $1, NULL, 'PENDING', 'task.created', 'api', $13,
        jsonb_build_object('provider_id', provider_id), $14 FROM t
), o AS (
    INSERT INTO outbox (subject, payload, headers)
    SELECT $21::text, $22::bytea, $23::jsonb FROM q WHERE $21::text IS NOT NULL
    RETURNING id
)
SELECT (SELECT id FROM o) AS outbox_id FROM q
"""


@dataclass(frozen=True, slots=True)
class NewMessage:
    """An outbox message not written yet."""

    subject: str
    payload: bytes
    headers: Mapping[str, str]


async def insert_withdrawal(
    conn: Connection,
    record: WithdrawalRecord,
    queue_id: uuid.UUID,
    tasks: Sequence[OrderTask],
    fees: Sequence[Decimal],
    *,
    start: NewMessage | None = None,
) -> OutboxMessage | bool | None:
    """Persist a new withdrawal with its queue, PENDING tasks and, optionally, the first task's
    start message, atomically. Returns False when the withdrawal id or the idempotency key
    already exists (nothing written), else the written start message (or None without one)."""
    now = record.created_at
    row = await conn.fetchrow(
        _INSERT_WITHDRAWAL,
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
        queue_id,
        [t.task_id for t in tasks],
        [t.position for t in tasks],
        [t.provider_id for t in tasks],
        list(fees),
        [t.provider_order_id for t in tasks],
        start.subject if start else None,
        start.payload if start else None,
        dict(start.headers) if start else None,
    )
    if row is None:
        return False
    if start is None:
        return None
    return OutboxMessage(row["outbox_id"], start.subject, start.payload, start.headers)


async def queue_of_task(conn: Connection, task_id: uuid.UUID) -> uuid.UUID | None:
    """The queue a task belongs to."""
    queue_id: uuid.UUID | None = await conn.fetchval(
        "SELECT queue_id FROM order_tasks WHERE task_id = $1", task_id
    )
    return queue_id


_WITHDRAWAL_COLUMNS = (
    "w.withdrawal_id, w.merchant_id, w.amount, w.currency, w.destination, w.metadata,"
    " w.cascade, w.idempotency_key, w.request_sha256, w.cohort, w.routing_reason, w.flag_state,"
    " w.trace_id, w.created_at"
)
_QUEUE_COLUMNS = (
    "q.queue_id, q.withdrawal_id, q.state, q.version, q.cancel_requested, q.stop_requested,"
    " q.failure_code, q.created_at AS q_created_at, q.updated_at AS q_updated_at,"
    " q.finished_at AS q_finished_at"
)


def _withdrawal(row: asyncpg.Record) -> WithdrawalRecord:
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


async def load_all(
    conn: Connection,
    *,
    queue_id: uuid.UUID | None = None,
    withdrawal_id: str | None = None,
    lock: bool = False,
) -> tuple[WithdrawalRecord, QueueRecord] | None:
    """A withdrawal with its queue and tasks; ``lock`` takes the queue row lock for the
    transaction (``FOR UPDATE OF q``: the withdrawal row is never locked)."""
    where = "q.queue_id = $1" if queue_id is not None else "q.withdrawal_id = $1"
    key: object = queue_id if queue_id is not None else withdrawal_id
    rows = await _load_queues(
        conn,
        f"SELECT {_WITHDRAWAL_COLUMNS}, {_QUEUE_COLUMNS}{{tasks}} FROM order_queues q"  # noqa: S608
        f" JOIN withdrawals w ON w.withdrawal_id = q.withdrawal_id WHERE {where}",
        key,
        lock=lock,
    )
    if not rows:
        return None
    row, record = rows[0]
    return _withdrawal(row), record


async def load_queue(
    conn: Connection,
    *,
    queue_id: uuid.UUID | None = None,
    withdrawal_id: str | None = None,
    lock: bool = False,
) -> QueueRecord | None:
    """Load a queue and its tasks; ``lock`` takes the queue row lock for the transaction."""
    where = "q.queue_id = $1" if queue_id is not None else "q.withdrawal_id = $1"
    key: object = queue_id if queue_id is not None else withdrawal_id
    rows = await _load_queues(
        conn,
        f"SELECT {_QUEUE_COLUMNS}{{tasks}} FROM order_queues q WHERE {where}",  # noqa: S608
        key,
        lock=lock,
    )
    return rows[0][1] if rows else None


async def load_queues(
    conn: Connection,
    queue_ids: Sequence[uuid.UUID],
    *,
    lock: bool = False,
    skip_locked: bool = False,
) -> dict[uuid.UUID, QueueRecord]:
    """Many queues with their tasks. ``lock`` takes their row locks in queue_id order, so two
    batches never wait on each other in a cycle; ``skip_locked`` leaves out the queues another
    transaction holds (a batch must not wait on one slow handler holding all the others)."""
    rows = await _load_queues(
        conn,
        f"SELECT {_QUEUE_COLUMNS}{{tasks}} FROM order_queues q"  # noqa: S608
        " WHERE q.queue_id = ANY($1::uuid[])",
        list(dict.fromkeys(queue_ids)),
        lock=lock,
        order=True,
        skip_locked=skip_locked,
    )
    return {record.queue.queue_id: record for _row, record in rows}


async def _load_queues(
    conn: Connection,
    select: str,
    key: object,
    *,
    lock: bool,
    order: bool = False,
    skip_locked: bool = False,
) -> list[tuple[asyncpg.Record, QueueRecord]]:
    """Run ``select`` (``{tasks}`` marks where the tasks column goes) and attach each queue's
    tasks: in the same statement for a plain read (one round-trip), with a second statement
    after the row locks are held for a locking read (see ``_TASKS_OF_QUEUE``)."""
    suffix = (" ORDER BY q.queue_id" if order else "") + (" FOR UPDATE OF q" if lock else "")
    if lock and skip_locked:
        suffix += " SKIP LOCKED"
    if not lock:
        rows = await conn.fetch(select.format(tasks=", " + _TASKS_OF_QUEUE) + suffix, key)
        return [(row, _queue_record(row, _task_tuples(row["tasks"]))) for row in rows]
    rows = await conn.fetch(select.format(tasks="") + suffix, key)
    if not rows:
        return []
    tasks: dict[uuid.UUID, list[OrderTask]] = {row["queue_id"]: [] for row in rows}
    for task_row in await conn.fetch(
        f"SELECT {_TASK_COLUMNS} FROM order_tasks WHERE queue_id = ANY($1::uuid[])"  # noqa: S608
        " ORDER BY queue_id, position",
        list(tasks),
    ):
        tasks[task_row["queue_id"]].append(_task(task_row))
    return [(row, _queue_record(row, tasks[row["queue_id"]])) for row in rows]


def _task_tuples(values: Sequence[Sequence[object]] | None) -> list[OrderTask]:
    return [_task(dict(zip(_TASK_FIELDS, v, strict=True))) for v in values or ()]


def _queue_record(row: asyncpg.Record, tasks: Sequence[OrderTask]) -> QueueRecord:
    """The queue of a row selected with ``_QUEUE_COLUMNS``, with its tasks."""
    queue = OrderQueue(
        queue_id=row["queue_id"],
        withdrawal_id=row["withdrawal_id"],
        state=QueueState(row["state"]),
        version=row["version"],
        tasks=tuple(tasks),
        cancel_requested=row["cancel_requested"],
        stop_requested=row["stop_requested"],
        failure_code=row["failure_code"],
    )
    return QueueRecord(
        queue=queue,
        created_at=row["q_created_at"],
        updated_at=row["q_updated_at"],
        finished_at=row["q_finished_at"],
    )


@dataclass(frozen=True, slots=True)
class Started:
    """A task :func:`start_pending` moved to CREATING: its provider and when it had entered
    PENDING (for the time-in-state metric)."""

    provider_id: str
    pending_since: datetime | None


async def start_pending(
    conn: Connection,
    *,
    queue_id: uuid.UUID,
    queue_version: int,
    task_id: uuid.UUID,
    task_version: int,
    event: str,
    actor: str,
    trace_id: str | None,
    now: datetime,
    providers: Sequence[str],
) -> Started | None:
    """PENDING → CREATING as one autocommit statement, if nothing changed since the versions
    given: the queue still ACTIVE at ``queue_version`` (a cancel or stop request, or a final
    state, bumps it) and the task still PENDING at ``task_version``, its turn (no other
    task running, no earlier one pending) and its provider one of ``providers`` (those the
    caller may start without a gate). The statement takes the queue row lock itself, so it is
    ordered with every locked handler exactly as a transaction holding the lock would be.
    None: something changed, nothing was written."""
    row = await conn.fetchrow(
        "WITH q AS (SELECT queue_id, withdrawal_id FROM order_queues WHERE queue_id = $1"  # noqa: S608 — fixed fragments only
        " AND version = $2 AND state = 'ACTIVE' AND NOT cancel_requested AND NOT stop_requested"
        " FOR UPDATE),"
        " before AS (SELECT provider_id, state_entered_at FROM order_tasks WHERE task_id = $3),"
        " t AS (UPDATE order_tasks o SET state = 'CREATING', updated_at = $5,"
        " version = o.version + 1, state_entered_at = $5, timer_kind = NULL,"
        " timer_attempt = NULL, timer_due_at = NULL"
        " WHERE o.task_id = $3 AND o.version = $4 AND o.state = 'PENDING'"
        " AND o.provider_id = ANY($9::text[]) AND EXISTS (SELECT 1 FROM q)"
        # Its turn (domain.may_start): no other task running, no earlier one pending.
        " AND NOT EXISTS (SELECT 1 FROM order_tasks e WHERE e.queue_id = o.queue_id"
        " AND e.task_id <> o.task_id AND e.state <> ALL($10::text[])"
        " AND (e.state <> 'PENDING' OR e.position < o.position))"
        " RETURNING o.queue_id),"
        " u AS (UPDATE order_queues SET updated_at = $5"
        " WHERE queue_id IN (SELECT queue_id FROM t)),"
        f" e AS ({_AUDIT_INSERT} SELECT t.queue_id, $3, q.withdrawal_id, 'PENDING', 'CREATING',"
        " $6::text, $7::text, $8::text, '{}'::jsonb, $5 FROM t, q RETURNING 1)"
        " SELECT provider_id, state_entered_at FROM before WHERE EXISTS (SELECT 1 FROM e)",
        queue_id,
        queue_version,
        task_id,
        task_version,
        now,
        event,
        actor,
        trace_id,
        list(providers),
        [state.value for state in FINAL_TASK_STATES],
    )
    if row is None:
        return None
    return Started(provider_id=row["provider_id"], pending_since=row["state_entered_at"])


async def match_webhook(
    conn: Connection,
    provider_id: str,
    order_id: str,
    reference: str,
    status: str,
) -> tuple[uuid.UUID, uuid.UUID] | str:
    """The (queue_id, task_id) a webhook applies to, in one round-trip; or, when no task owns
    the order or its task is final, the reason (``unknown_order``; ``task_final``; or
    ``success_after_final``, a provider paying out on an attempt that ended without success —
    also a ``returned`` report for one: it was paid before it came back), having kept the
    webhook in ``unmatched_webhooks`` for support. A ``returned`` report for a SUCCEEDED task
    applies to it (its one exit, to RETURNED)."""
    row = await conn.fetchrow(
        "WITH t AS (SELECT queue_id, task_id, state FROM order_tasks WHERE provider_id = $1"
        " AND (provider_order_id = $2 OR provider_reference = $3) LIMIT 1),"
        " u AS (INSERT INTO unmatched_webhooks (provider_id, order_id, reference, status, reason)"
        " SELECT $1, $2, $3, $4,"
        " CASE WHEN NOT EXISTS (SELECT 1 FROM t) THEN 'unknown_order'"
        " WHEN $4 IN ('succeeded', 'returned')"
        " AND (SELECT state FROM t) NOT IN ('SUCCEEDED', 'RETURNED')"
        " THEN 'success_after_final' ELSE 'task_final' END"
        " WHERE NOT EXISTS (SELECT 1 FROM t WHERE state <> ALL($5::text[])"
        " OR ($4 = 'returned' AND state = 'SUCCEEDED')) RETURNING reason)"
        " SELECT t.queue_id, t.task_id, (SELECT reason FROM u) AS unapplied"
        " FROM (SELECT 1) AS one LEFT JOIN t ON true",
        provider_id,
        order_id,
        reference,
        status,
        [state.value for state in FINAL_TASK_STATES],
    )
    assert row is not None
    if row["unapplied"] is not None:
        return str(row["unapplied"])
    return row["queue_id"], row["task_id"]


_AUDIT_INSERT = (
    "INSERT INTO order_task_events (queue_id, task_id, withdrawal_id, from_state, to_state,"
    " event, actor, trace_id, details, created_at)"
)


@dataclass(frozen=True, slots=True)
class TaskWrite:
    """One task transition to write: the version-checked update and its audit row."""

    before: OrderTask
    after: OrderTask
    withdrawal_id: str
    event: str
    actor: str
    trace_id: str | None
    details: Mapping[str, object]
    now: datetime
    timer: Timer | None = None
    clear_timer: bool = False

    @property
    def changed(self) -> bool:
        return self.after.state != self.before.state


def _task_write_sql(write: TaskWrite, first: int) -> tuple[str, str, list[object]]:
    """The pieces of a task write whose bind parameters start at ``$first``: the ``UPDATE``
    (for a CTE named ``t``, returning ``queue_id``), the ``SELECT`` of its audit row from ``t``,
    and the arguments. Only fixed fragments are interpolated; values are parameters."""
    before, after = write.before, write.after
    args: list[object] = [
        after.state.value,
        after.provider_reference,
        after.freeze_state,
        after.outcome,
        after.provider_code,
        after.recheck_attempts,
        after.status_polls,
        after.cancel_requested,
        write.now,
        before.task_id,
        before.version,
        write.withdrawal_id,
        before.state.value,
        after.state.value if write.changed else None,
        write.event,
        write.actor,
        write.trace_id,
        dict(write.details),
        after.create_retries,
    ]
    p = [f"${first + i}" for i in range(22)]
    timer_sql = ""
    if write.timer is not None:
        timer_sql = f", timer_kind = {p[19]}, timer_attempt = {p[20]}, timer_due_at = {p[21]}"
        args += [write.timer.kind, write.timer.attempt, write.timer.due_at]
    elif write.clear_timer or write.changed:
        timer_sql = ", timer_kind = NULL, timer_attempt = NULL, timer_due_at = NULL"
    entered = f", state_entered_at = {p[8]}" if write.changed else ""
    update = (
        f"UPDATE order_tasks SET state = {p[0]}, provider_reference = {p[1]},"  # noqa: S608
        f" freeze_state = {p[2]}, outcome = {p[3]}, provider_code = {p[4]},"
        f" recheck_attempts = {p[5]}, status_polls = {p[6]}, cancel_requested = {p[7]},"
        f" create_retries = {p[18]}, updated_at = {p[8]}, version = version + 1{entered}{timer_sql}"
        f" WHERE task_id = {p[9]} AND version = {p[10]} RETURNING queue_id"
    )
    audit = (  # placeholders only, as above
        f"SELECT queue_id, {p[9]}::uuid, {p[11]}::text, {p[12]}::text, {p[13]}::text,"  # noqa: S608
        f" {p[14]}::text, {p[15]}::text, {p[16]}::text, {p[17]}::jsonb, {p[8]}::timestamptz"
        " FROM t"
    )
    return update, audit, args


async def save_task(conn: Connection, write: TaskWrite) -> None:
    """Write one task transition in one statement: the version-checked update, its audit row
    and, on a state change, the queue's ``updated_at`` (the API's ``updated_at``)."""
    update, audit, args = _task_write_sql(write, 1)
    touch = (
        ", q AS (UPDATE order_queues SET updated_at = $9 WHERE queue_id = (SELECT queue_id FROM t))"
        if write.changed
        else ""
    )
    status = await conn.execute(f"WITH t AS ({update}){touch} {_AUDIT_INSERT} {audit}", *args)
    if status != "INSERT 0 1":
        raise StaleVersion(
            f"task {write.before.task_id} is no longer at version {write.before.version}"
        )


async def save_transitions(conn: Connection, moves: Sequence[TaskWrite]) -> None:
    """Write many plain task state changes (each of another task, no timer armed, all at the
    same time) in one statement, each as :func:`save_task` would: version-checked update
    (timer cleared), audit row (in the order given), queue ``updated_at``. Raises
    :class:`StaleVersion` if any task moved meanwhile (the caller's transaction then writes
    nothing)."""
    now = moves[0].now
    for move in moves:
        # create_retries is not among the columns written here: only a retry (which arms a
        # timer, so is never plain) changes it.
        if (
            not move.changed
            or move.timer is not None
            or move.now != now
            or move.after.create_retries != move.before.create_retries
        ):
            raise ValueError(f"task {move.before.task_id}: not a plain state change")
    status = await conn.execute(
        "WITH u AS (SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[],"  # noqa: S608 — fixed fragments only
        " $5::text[], $6::text[], $7::text[], $8::int[], $9::int[], $10::boolean[], $11::text[],"
        " $12::text[], $13::text[], $14::text[], $15::text[], $16::text[]) WITH ORDINALITY"
        " AS u(task_id, version, state, provider_reference, freeze_state, outcome,"
        " provider_code, recheck_attempts, status_polls, cancel_requested, withdrawal_id,"
        " from_state, event, actor, trace_id, details, ord)),"
        " t AS (UPDATE order_tasks o SET state = u.state,"
        " provider_reference = u.provider_reference, freeze_state = u.freeze_state,"
        " outcome = u.outcome, provider_code = u.provider_code,"
        " recheck_attempts = u.recheck_attempts, status_polls = u.status_polls,"
        " cancel_requested = u.cancel_requested, updated_at = $17, version = o.version + 1,"
        " state_entered_at = $17, timer_kind = NULL, timer_attempt = NULL, timer_due_at = NULL"
        " FROM u WHERE o.task_id = u.task_id AND o.version = u.version"
        " RETURNING o.task_id, o.queue_id),"
        " q AS (UPDATE order_queues SET updated_at = $17"
        " WHERE queue_id IN (SELECT queue_id FROM t))"
        f" {_AUDIT_INSERT} SELECT t.queue_id, t.task_id, u.withdrawal_id, u.from_state, u.state,"
        " u.event, u.actor, u.trace_id, u.details::jsonb, $17 FROM t JOIN u USING (task_id)"
        " ORDER BY u.ord",  # the audit rows in the order decided: cause before effect
        [m.before.task_id for m in moves],
        [m.before.version for m in moves],
        [m.after.state.value for m in moves],
        [m.after.provider_reference for m in moves],
        [m.after.freeze_state for m in moves],
        [m.after.outcome for m in moves],
        [m.after.provider_code for m in moves],
        [m.after.recheck_attempts for m in moves],
        [m.after.status_polls for m in moves],
        [m.after.cancel_requested for m in moves],
        [m.withdrawal_id for m in moves],
        [m.before.state.value for m in moves],
        [m.event for m in moves],
        [m.actor for m in moves],
        [m.trace_id for m in moves],
        [_json_text(dict(m.details)) for m in moves],
        now,
    )
    if status != f"INSERT 0 {len(moves)}":
        raise StaleVersion(f"{len(moves)} task transitions, written: {status}")


@dataclass(frozen=True, slots=True)
class Notification:
    """A final-status notification to cascade-core, kept until acknowledged."""

    status: str
    body: bytes
    first_attempt_at: datetime


@dataclass(frozen=True, slots=True)
class QueueWrite:
    """One queue change to write: the version-checked update from ``before`` to ``after`` (its
    state, flags only ever set, the failure code of a final state), its audit row and, with a
    final state, the notification to send."""

    before: OrderQueue
    after: OrderQueue
    event: str
    actor: str
    trace_id: str | None
    now: datetime
    cancel_reason: str | None = None
    notification: Notification | None = None

    @property
    def final(self) -> bool:
        return self.after.state != self.before.state


def _queue_write_args(write: QueueWrite) -> list[object]:
    before, after = write.before, write.after
    code = after.failure_code if write.final else None
    return [
        after.state.value,
        after.cancel_requested and not before.cancel_requested,
        _no_nul(write.cancel_reason),
        after.stop_requested and not before.stop_requested,
        code,
        write.now,
        before.queue_id,
        before.version,
        before.withdrawal_id,
        before.state.value,
        after.state.value if write.final else None,
        write.event,
        write.actor,
        write.trace_id,
        {"failure_code": code} if code else {},
    ]


async def save_queue(conn: Connection, write: QueueWrite, task: TaskWrite | None = None) -> None:
    """Write a queue change with its audit row (version-checked), and the notification of a
    final state, in one statement; with ``task``, that task write too, its audit row first (it
    caused the queue's). Run it in a transaction: a version mismatch on either raises
    :class:`StaleVersion` after the other may have been written."""
    args = _queue_write_args(write)
    notify = ""
    if write.notification is not None and write.final:
        notify = (
            ", n AS (INSERT INTO notifications (withdrawal_id, status, body, next_attempt_at)"
            " SELECT $9::text, $16::text, $17::bytea, $18::timestamptz FROM q"
            " ON CONFLICT DO NOTHING)"
        )
        n = write.notification
        args += [n.status, n.body, n.first_attempt_at]
    # The task's queue touch is left out: one statement cannot update the queue row twice,
    # and this one sets updated_at anyway.
    task_cte, task_audit, rows = "", "", 1
    if task is not None:
        update, audit, task_args = _task_write_sql(task, len(args) + 1)
        task_cte, task_audit, rows = f", t AS ({update})", f"{audit} UNION ALL ", 2
        args += task_args
    status = await conn.execute(
        "WITH q AS (UPDATE order_queues SET state = $1::text,"  # noqa: S608 — fixed fragments only
        " cancel_requested = cancel_requested OR $2::boolean,"
        " cancel_reason = COALESCE($3::text, cancel_reason),"
        " stop_requested = stop_requested OR $4::boolean,"
        " failure_code = COALESCE($5::text, failure_code), updated_at = $6::timestamptz,"
        " finished_at = CASE WHEN $1::text <> 'ACTIVE' THEN $6::timestamptz END,"
        " version = version + 1"
        f" WHERE queue_id = $7 AND version = $8 RETURNING queue_id){notify}{task_cte}"
        f" {_AUDIT_INSERT} {task_audit}SELECT queue_id, NULL, $9::text, $10::text, $11::text,"
        " $12::text, $13::text, $14::text, $15::jsonb, $6 FROM q",
        *args,
    )
    if status != f"INSERT 0 {rows}":
        what = f"queue {write.before.queue_id} at version {write.before.version}"
        if task is not None:
            what += f" or task {task.before.task_id} at version {task.before.version}"
        raise StaleVersion(f"{what} moved on")


async def enqueue(
    conn: Connection, subject: str, payload: bytes, headers: Mapping[str, str] | None = None
) -> OutboxMessage:
    """Add a message to the outbox, in the caller's transaction."""
    ident: int = await conn.fetchval(
        "INSERT INTO outbox (subject, payload, headers) VALUES ($1, $2, $3) RETURNING id",
        subject,
        payload,
        dict(headers or {}),
    )
    return OutboxMessage(ident, subject, payload, dict(headers or {}))
