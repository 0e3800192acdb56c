"""What the chaos campaign checks once the run has settled: every count must be zero.

Read from the record (the gateway's tables), from the sandbox's own schema (its ledger, its
notifications and the provider orders it holds) and from JetStream (the DLQ). Each check is a
named query or a walk over rows; :func:`money_checks` returns ``{name: (count, examples)}``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import datetime
from typing import Any

import asyncpg
import nats

from orchestrator import bus
from orchestrator.domain import TASK_TRANSITIONS

FINAL_TASKS = ("SUCCEEDED", "SKIPPED", "FAILED", "CANCELLED", "RETURNED")
FINAL_QUEUES = ("COMPLETED", "FAILED", "CANCELLED")
PUBLIC_STATUS = {"COMPLETED": "succeeded", "FAILED": "failed", "CANCELLED": "cancelled"}

QUERIES = {
    "ledger violations": "SELECT kind || ': ' || detail FROM sandbox.violations",
    "double commits": """
        SELECT withdrawal_id FROM sandbox.operations WHERE state = 'committed'
        GROUP BY withdrawal_id HAVING count(*) > 1""",
    "provider orders paid without a commit": """
        SELECT o.provider_id || ' ' || o.order_id FROM sandbox.orders o
        JOIN order_tasks t ON t.provider_id = o.provider_id AND t.provider_order_id = o.order_id
        LEFT JOIN sandbox.operations op ON op.operation_id = t.task_id::text
        WHERE o.status IN ('succeeded', 'returned') AND op.state IS DISTINCT FROM 'committed'""",
    "two providers paid for one withdrawal": """
        SELECT q.withdrawal_id FROM sandbox.orders o
        JOIN order_tasks t ON t.provider_id = o.provider_id AND t.provider_order_id = o.order_id
        JOIN order_queues q ON q.queue_id = t.queue_id
        WHERE o.status = 'succeeded' GROUP BY q.withdrawal_id HAVING count(*) > 1""",
    # Run once every withdrawal is final: any freeze still open is a leak.
    "freezes left open": "SELECT operation_id FROM sandbox.operations WHERE state = 'frozen'",
    "commits without a payout": """
        SELECT op.operation_id FROM sandbox.operations op
        JOIN order_tasks t ON op.operation_id = t.task_id::text
        LEFT JOIN sandbox.orders o
            ON o.provider_id = t.provider_id AND o.order_id = t.provider_order_id
        WHERE op.state = 'committed' AND o.status IS DISTINCT FROM 'succeeded'
        AND o.status IS DISTINCT FROM 'returned'""",
    "attempts not final in final withdrawals": """
        SELECT t.task_id::text FROM order_tasks t JOIN order_queues q USING (queue_id)
        WHERE q.state IN {final_queues} AND t.state NOT IN {final_tasks}""",
    "orders pending at a provider for attempts ended without success": """
        SELECT o.provider_id || ' ' || o.order_id FROM sandbox.orders o
        JOIN order_tasks t ON t.provider_id = o.provider_id AND t.provider_order_id = o.order_id
        WHERE o.status = 'pending' AND t.state IN ('FAILED', 'CANCELLED', 'SKIPPED')""",
    "withdrawals neither final nor in MANUAL_CHECK": """
        SELECT q.withdrawal_id FROM order_queues q WHERE q.state NOT IN {final_queues}
        AND NOT EXISTS (SELECT 1 FROM order_tasks t
                        WHERE t.queue_id = q.queue_id AND t.state = 'MANUAL_CHECK')""",
    "final withdrawals without a notification": """
        SELECT q.withdrawal_id FROM order_queues q WHERE q.state IN {final_queues}
        AND NOT EXISTS (SELECT 1 FROM sandbox.final_statuses f
                        WHERE f.withdrawal_id = q.withdrawal_id)""",
    "conflicting notifications": """
        SELECT withdrawal_id FROM sandbox.final_statuses
        GROUP BY withdrawal_id HAVING count(*) > 1""",
    "notifications differing from the record": """
        SELECT q.withdrawal_id FROM order_queues q JOIN sandbox.final_statuses f USING
        (withdrawal_id) WHERE f.status <> CASE q.state WHEN 'COMPLETED' THEN 'succeeded'
        WHEN 'FAILED' THEN 'failed' WHEN 'CANCELLED' THEN 'cancelled' END""",
}


async def money_checks(database_url: str, accepted: list[str]) -> dict[str, tuple[int, list[str]]]:
    """Every query of :data:`QUERIES`, then the audit chains; ``accepted``: the withdrawal
    ids the gateway answered 200 or 201 for, each of which the record must hold."""
    conn = await asyncpg.connect(database_url)
    try:
        recorded = await conn.fetch(
            "SELECT withdrawal_id FROM withdrawals WHERE withdrawal_id = ANY($1::text[])", accepted
        )
        lost = sorted(set(accepted) - {r[0] for r in recorded})
        found: dict[str, tuple[int, list[str]]] = {
            "accepted withdrawals missing from the record": (len(lost), lost[:5])
        }
        for name, sql in QUERIES.items():
            # The state lists are this module's constants, written into the text as literals.
            text = sql.format(final_tasks=repr(FINAL_TASKS), final_queues=repr(FINAL_QUEUES))
            rows = [str(r[0]) for r in await conn.fetch(text)]
            found[name] = (len(rows), rows[:5])
        found["broken audit chains"] = await broken_audit_chains(conn)
        return found
    finally:
        await conn.close()


async def broken_audit_chains(conn: asyncpg.Connection) -> tuple[int, list[str]]:
    """Tasks whose audit rows do not walk, one allowed transition at a time, from their first
    state to the state the record holds, entering no state twice."""
    events = await conn.fetch(
        "SELECT task_id, from_state, to_state FROM order_task_events"
        " WHERE task_id IS NOT NULL AND to_state IS NOT NULL ORDER BY event_id"
    )
    chains: dict[Any, list[tuple[str | None, str]]] = defaultdict(list)
    for row in events:
        chains[row["task_id"]].append((row["from_state"], row["to_state"]))
    broken: list[str] = []
    for row in await conn.fetch("SELECT task_id, state FROM order_tasks"):
        if not _walks(chains.get(row["task_id"], []), row["state"]):
            broken.append(str(row["task_id"]))
    return len(broken), broken[:5]


def _walks(chain: list[tuple[str | None, str]], current: str) -> bool:
    state: str | None = None  # before its creation row
    seen: set[str] = set()
    for before, after in chain:
        if before != state or after in seen:
            return False
        if state is not None and after not in _allowed(state):
            return False
        seen.add(after)
        state = after
    return state == current


def _allowed(state: str) -> frozenset[str]:
    return frozenset(
        str(target.value)
        for source, targets in TASK_TRANSITIONS.items()
        if source.value == state
        for target in targets
    )


async def longest_stall(database_url: str, start: datetime, end: datetime) -> float:
    """The longest time, between ``start`` and ``end``, in which no withdrawal became final:
    how long the faults held the fleet up (a worker's ack wait, an election, a restart)."""
    conn = await asyncpg.connect(database_url)
    try:
        finished = await conn.fetch(
            "SELECT finished_at FROM order_queues WHERE finished_at BETWEEN $1 AND $2"
            " ORDER BY finished_at",
            start,
            end,
        )
    finally:
        await conn.close()
    moments: list[datetime] = [start, *(row[0] for row in finished), end]
    return max((b - a).total_seconds() for a, b in itertools.pairwise(moments))


async def dlq_size(nats_url: str, namespace: str) -> int:
    nc = await nats.connect(nats_url.split(","))
    try:
        return await bus.dlq_size(nc.jetstream(), bus.Names(namespace))
    finally:
        await nc.close()
