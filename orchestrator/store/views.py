"""What the v1 API and the ops API read: who holds a request's ids, manual checks (with every
answer their provider gave), a task's state, a withdrawal's full record for support.

Reads only, each one statement on a connection the caller holds; states inside the SQL are
the domain's constants passed as parameters.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import msgspec

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
class ProviderAnswerRow:
    """One answer of a provider about one attempt (create, recheck, status poll, webhook,
    support's check), as its audit row keeps it: what support compares with a statement."""

    at: datetime
    event: str
    details: dict[str, object]


# An audit row holds a provider's answer when its details carry one of these keys
# (``orchestrator.domain.event_details``: a definitive answer, or one that proved nothing).
ANSWER_KEYS = ("provider_status", "ambiguous")


def is_provider_answer(details: object) -> bool:
    """Whether an audit row's details hold a provider's answer (:data:`ANSWER_KEYS`)."""
    return isinstance(details, dict) and any(key in details for key in ANSWER_KEYS)


@dataclass(frozen=True, slots=True, kw_only=True)
class ManualCheck:
    """A task waiting in MANUAL_CHECK for support, with what they need to decide."""

    task_id: uuid.UUID
    queue_id: uuid.UUID
    withdrawal_id: str
    merchant_id: str
    provider_id: str
    provider_order_id: str
    provider_reference: str | None
    amount: Decimal
    currency: str
    destination: dict[str, object]
    cohort: str
    waiting_since: datetime
    waited_seconds: float
    last_provider_code: str | None
    rechecks: int
    status_polls: int
    # Every answer the provider gave about this attempt, oldest first.
    provider_answers: list[ProviderAnswerRow]


async def manual_checks(conn: Connection, *, limit: int = 1000) -> list[ManualCheck]:
    """Tasks waiting in MANUAL_CHECK, the longest waiting first, with their provider's
    answers."""
    rows = await conn.fetch(
        "SELECT t.task_id, t.queue_id, q.withdrawal_id, t.provider_id, t.provider_order_id,"
        " t.provider_reference, t.state_entered_at,"
        " extract(epoch FROM now() - t.state_entered_at)::float8 AS waited,"
        " w.cohort, w.merchant_id, w.amount, w.currency, w.destination,"
        " t.provider_code, t.recheck_attempts, t.status_polls"
        " FROM order_tasks t JOIN order_queues q ON q.queue_id = t.queue_id"
        " JOIN withdrawals w ON w.withdrawal_id = q.withdrawal_id"
        " WHERE t.state = $1 ORDER BY t.state_entered_at LIMIT $2",
        TaskState.MANUAL_CHECK.value,
        limit,
    )
    answers = await provider_answers(conn, [row["task_id"] for row in rows])
    return [
        ManualCheck(
            task_id=row["task_id"],
            queue_id=row["queue_id"],
            withdrawal_id=row["withdrawal_id"],
            merchant_id=row["merchant_id"],
            provider_id=row["provider_id"],
            provider_order_id=row["provider_order_id"],
            provider_reference=row["provider_reference"],
            amount=row["amount"],
            currency=row["currency"],
            destination=msgspec.json.decode(row["destination"]),
            cohort=row["cohort"],
            waiting_since=row["state_entered_at"],
            waited_seconds=max(0.0, row["waited"]),
            last_provider_code=row["provider_code"],
            rechecks=row["recheck_attempts"],
            status_polls=row["status_polls"],
            provider_answers=answers.get(row["task_id"], []),
        )
        for row in rows
    ]


async def provider_answers(
    conn: Connection, task_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[ProviderAnswerRow]]:
    """Every provider answer recorded for these tasks, per task, oldest first."""
    rows = await conn.fetch(
        "SELECT task_id, created_at, event, details FROM order_task_events"
        " WHERE task_id = ANY($1::uuid[]) AND details ?| $2::text[] ORDER BY event_id",
        task_ids,
        list(ANSWER_KEYS),
    )
    answers: dict[uuid.UUID, list[ProviderAnswerRow]] = {}
    for row in rows:
        answer = ProviderAnswerRow(at=row["created_at"], event=row["event"], details=row["details"])
        answers.setdefault(row["task_id"], []).append(answer)
    return answers


async def refusal_details(
    conn: Connection, task_id: uuid.UUID, actor: str
) -> dict[str, object] | None:
    """The audit details of ``actor``'s latest refused decision on a task (what the provider
    answered when it was asked), or None."""
    details: dict[str, object] | None = await conn.fetchval(
        "SELECT details FROM order_task_events WHERE task_id = $1 AND actor = $2"
        " AND event LIKE $3 ORDER BY event_id DESC LIMIT 1",
        task_id,
        actor,
        "manual.refused.%",
    )
    return details


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
