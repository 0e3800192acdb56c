"""The queries of the worker's periodic passes, which look for work that is due.

- the gauges: how many tasks wait in each state (:func:`tasks_per_state`);
- the sweeper: timers whose due time passed unhandled (:func:`overdue_timers`) and tasks left
  unstarted or cut off mid-create (:func:`stranded_tasks`);
- the notifier: notifications to send again (:func:`due_notifications`) and their outcome;
- the outbox relay: rows the fast path did not publish (:func:`unpublished_outbox`);
- the worker's failure paths: which withdrawal a failed message was about
  (:func:`withdrawal_of_queue`, :func:`withdrawal_of_order`), for its log lines and dead letter;
- the deferred bookkeeping writes (:mod:`orchestrator.deferred`): published outbox rows
  deleted, acknowledged notifications marked, in batches.

States in these queries come from the domain's constants, passed as parameters.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from orchestrator.domain import FINAL_TASK_STATES, QueueState, TaskState, TimerKind
from orchestrator.store import Connection, OutboxMessage

_FINAL_TASK_STATES = sorted(state.value for state in FINAL_TASK_STATES)


@dataclass(frozen=True, slots=True)
class TasksInState:
    """How many tasks are in one non-final state, and since when the oldest is."""

    state: TaskState
    count: int
    oldest_seconds: float


async def tasks_per_state(conn: Connection) -> list[TasksInState]:
    """Tasks per non-final state; states with no task are absent."""
    rows = await conn.fetch(
        "SELECT state, count(*) AS n,"
        " extract(epoch FROM now() - min(state_entered_at)) AS oldest"
        " FROM order_tasks WHERE state <> ALL($1::text[]) GROUP BY state",
        _FINAL_TASK_STATES,
    )
    return [TasksInState(TaskState(r["state"]), r["n"], float(r["oldest"])) for r in rows]


@dataclass(frozen=True, slots=True)
class OverdueTimer:
    """A timer the record says is due: the broker may have lost its schedule."""

    task_id: uuid.UUID
    queue_id: uuid.UUID
    kind: TimerKind
    attempt: int
    due_at: datetime


async def overdue_timers(
    conn: Connection, due_before: datetime, *, limit: int = 500
) -> list[OverdueTimer]:
    """Timers due before ``due_before``, the longest overdue first."""
    rows = await conn.fetch(
        "SELECT task_id, queue_id, timer_kind, timer_attempt, timer_due_at"
        " FROM order_tasks WHERE timer_due_at < $1 ORDER BY timer_due_at LIMIT $2",
        due_before,
        limit,
    )
    return [
        OverdueTimer(
            task_id=r["task_id"],
            queue_id=r["queue_id"],
            kind=r["timer_kind"],
            attempt=r["timer_attempt"],
            due_at=r["timer_due_at"],
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class StrandedTask:
    task_id: uuid.UUID
    queue_id: uuid.UUID


async def stranded_tasks(
    conn: Connection, untouched_since: datetime, *, limit: int = 500
) -> list[StrandedTask]:
    """Tasks of active queues not updated since ``untouched_since`` and waiting on no timer:
    an attempt stuck in CREATING, or a queue's next attempt (its first pending task, nothing
    running: domain.may_start) that never started. A task provider health passed over stays
    pending while a later one runs: it is not stranded."""
    rows = await conn.fetch(
        "SELECT t.task_id, t.queue_id FROM order_tasks t"
        " JOIN order_queues q ON q.queue_id = t.queue_id"
        " WHERE q.state = $2 AND t.updated_at < $1 AND t.timer_kind IS NULL"
        " AND (t.state = $3 OR (t.state = $4 AND NOT EXISTS (SELECT 1 FROM order_tasks e"
        "  WHERE e.queue_id = t.queue_id AND e.task_id <> t.task_id"
        # Another task running, or an earlier one pending.
        "  AND e.state <> ALL($5::text[]) AND (e.state <> $4 OR e.position < t.position))))"
        " LIMIT $6",
        untouched_since,
        QueueState.ACTIVE.value,
        TaskState.CREATING.value,
        TaskState.PENDING.value,
        _FINAL_TASK_STATES,
        limit,
    )
    return [StrandedTask(r["task_id"], r["queue_id"]) for r in rows]


@dataclass(frozen=True, slots=True)
class DueNotification:
    """A final-status notification to cascade-core not acknowledged yet."""

    withdrawal_id: str
    status: str
    body: bytes
    attempts: int


async def due_notifications(conn: Connection, *, limit: int = 100) -> list[DueNotification]:
    """Unacknowledged notifications whose next attempt is due, locked until the caller's
    transaction ends (other workers skip them)."""
    rows = await conn.fetch(
        "SELECT withdrawal_id, status, body, attempts FROM notifications"
        " WHERE acked_at IS NULL AND next_attempt_at <= now()"
        " ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )
    return [
        DueNotification(r["withdrawal_id"], r["status"], bytes(r["body"]), r["attempts"])
        for r in rows
    ]


async def notification_failed(
    conn: Connection, withdrawal_id: str, status: str, *, error: str, retry_in: float
) -> None:
    """Count a failed attempt and schedule the next one ``retry_in`` seconds from now."""
    await conn.execute(
        "UPDATE notifications SET attempts = attempts + 1, last_error = $3,"
        " next_attempt_at = now() + make_interval(secs => $4)"
        " WHERE withdrawal_id = $1 AND status = $2",
        withdrawal_id,
        status,
        error,
        retry_in,
    )


async def notification_acked(conn: Connection, withdrawal_id: str, status: str) -> None:
    """Count the attempt cascade-core acknowledged and stop sending."""
    await conn.execute(
        "UPDATE notifications SET attempts = attempts + 1, acked_at = now()"
        " WHERE withdrawal_id = $1 AND status = $2",
        withdrawal_id,
        status,
    )


async def notifications_acked(conn: Connection, acked: Sequence[tuple[str, str]]) -> None:
    """Mark (withdrawal id, status) pairs acknowledged, each counted once: a pair already
    marked is left as it is."""
    await conn.execute(
        "UPDATE notifications n SET acked_at = now(), attempts = n.attempts + 1"
        " FROM unnest($1::text[], $2::text[]) AS a(withdrawal_id, status)"
        " WHERE n.withdrawal_id = a.withdrawal_id AND n.status = a.status"
        " AND n.acked_at IS NULL",
        [withdrawal_id for withdrawal_id, _ in acked],
        [status for _, status in acked],
    )


async def unpublished_outbox(
    conn: Connection, *, older_than_seconds: float, limit: int
) -> list[OutboxMessage]:
    """Outbox rows older than ``older_than_seconds``, in order, locked until the caller's
    transaction ends (another relay skips them)."""
    rows = await conn.fetch(
        "SELECT id, subject, payload, headers FROM outbox"
        " WHERE created_at < now() - make_interval(secs => $1)"
        " ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        older_than_seconds,
        limit,
    )
    return [OutboxMessage(r["id"], r["subject"], bytes(r["payload"]), r["headers"]) for r in rows]


async def delete_outbox(conn: Connection, ids: Sequence[int]) -> None:
    """Forget outbox rows JetStream has stored."""
    await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", ids)


async def withdrawal_of_queue(conn: Connection, queue_id: uuid.UUID) -> str | None:
    """The withdrawal whose queue is ``queue_id``, or None when there is no such queue. Read
    only when a message failed (never on the hot path)."""
    withdrawal_id: str | None = await conn.fetchval(
        "SELECT withdrawal_id FROM order_queues WHERE queue_id = $1", queue_id
    )
    return withdrawal_id


async def withdrawal_of_order(conn: Connection, provider_id: str, order_id: str) -> str | None:
    """The withdrawal of the task with this provider order, or None when there is none. Read
    only when a webhook message failed (never on the hot path)."""
    withdrawal_id: str | None = await conn.fetchval(
        "SELECT q.withdrawal_id FROM order_tasks t"
        " JOIN order_queues q ON q.queue_id = t.queue_id"
        " WHERE t.provider_id = $1 AND t.provider_order_id = $2 LIMIT 1",
        provider_id,
        order_id,
    )
    return withdrawal_id
