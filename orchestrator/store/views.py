"""What the v1 API and the ops API read: who holds a request's ids, manual checks, a task's
state, a withdrawal's full record for support.

Reads only, each one statement on a connection the caller holds; states inside the SQL are
the domain's constants passed as parameters.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from orchestrator.domain import TaskState
from orchestrator.store import Connection, QueueRecord, WithdrawalRecord, load_all


@dataclass(frozen=True, slots=True)
class Claim:
    """A stored withdrawal that holds a new request's withdrawal id or idempotency key."""

    withdrawal_id: str
    idempotency_key: str | None
    request_sha256: bytes


async def claims(
    conn: Connection, *, withdrawal_id: str, idempotency_key: str | None
) -> list[Claim]:
    """The withdrawals holding ``withdrawal_id`` or ``idempotency_key``, in one read: asked
    separately, a concurrent winner committing in between would turn a replay into a
    duplicate."""
    rows = await conn.fetch(
        "SELECT withdrawal_id, idempotency_key, request_sha256 FROM withdrawals"
        " WHERE withdrawal_id = $1 OR idempotency_key = $2",
        withdrawal_id,
        idempotency_key,
    )
    return [
        Claim(
            withdrawal_id=row["withdrawal_id"],
            idempotency_key=row["idempotency_key"],
            request_sha256=bytes(row["request_sha256"]),
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class ManualCheck:
    """A task waiting in MANUAL_CHECK for support, with what they need to decide."""

    task_id: uuid.UUID
    queue_id: uuid.UUID
    withdrawal_id: str
    merchant_id: str
    provider_id: str
    provider_reference: str | None
    amount: Decimal
    currency: str
    cohort: str
    waiting_since: datetime
    last_provider_code: str | None
    rechecks: int
    status_polls: int


async def manual_checks(conn: Connection, *, limit: int = 1000) -> list[ManualCheck]:
    """Tasks waiting in MANUAL_CHECK, the longest waiting first."""
    rows = await conn.fetch(
        "SELECT t.task_id, t.queue_id, q.withdrawal_id, t.provider_id, t.provider_reference,"
        " t.state_entered_at, w.cohort, w.merchant_id, w.amount, w.currency,"
        " t.provider_code, t.recheck_attempts, t.status_polls"
        " FROM order_tasks t JOIN order_queues q ON q.queue_id = t.queue_id"
        " JOIN withdrawals w ON w.withdrawal_id = q.withdrawal_id"
        " WHERE t.state = $1 ORDER BY t.state_entered_at LIMIT $2",
        TaskState.MANUAL_CHECK.value,
        limit,
    )
    return [
        ManualCheck(
            task_id=row["task_id"],
            queue_id=row["queue_id"],
            withdrawal_id=row["withdrawal_id"],
            merchant_id=row["merchant_id"],
            provider_id=row["provider_id"],
            provider_reference=row["provider_reference"],
            amount=row["amount"],
            currency=row["currency"],
            cohort=row["cohort"],
            waiting_since=row["state_entered_at"],
            last_provider_code=row["provider_code"],
            rechecks=row["recheck_attempts"],
            status_polls=row["status_polls"],
        )
        for row in rows
    ]


async def task_state(conn: Connection, task_id: uuid.UUID) -> TaskState | None:
    """The state a task is in; None for an unknown task."""
    state = await conn.fetchval("SELECT state FROM order_tasks WHERE task_id = $1", task_id)
    return None if state is None else TaskState(state)


@dataclass(frozen=True, slots=True)
class WithdrawalDetail:
    """A withdrawal as support sees it: the record, the queue, every task row and every audit
    row (all columns, in position and event order)."""

    record: WithdrawalRecord
    queue: QueueRecord
    tasks: list[dict[str, object]]
    events: list[dict[str, object]]


async def withdrawal_detail(conn: Connection, withdrawal_id: str) -> WithdrawalDetail | None:
    """The full record of one withdrawal; None for an unknown one."""
    loaded = await load_all(conn, withdrawal_id=withdrawal_id)
    if loaded is None:
        return None
    record, queue = loaded
    queue_id = queue.queue.queue_id
    tasks = await conn.fetch(
        "SELECT * FROM order_tasks WHERE queue_id = $1 ORDER BY position", queue_id
    )
    events = await conn.fetch(
        "SELECT * FROM order_task_events WHERE queue_id = $1 ORDER BY event_id", queue_id
    )
    return WithdrawalDetail(
        record=record,
        queue=queue,
        tasks=[dict(row) for row in tasks],
        events=[dict(row) for row in events],
    )
