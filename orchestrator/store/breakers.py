"""Provider health in Postgres: the breakers, the calls they count, the fleet-wide limits.

Every statement here is one round-trip except :func:`in_flight` (a lock, then a count read
after it). The limits run inside the start transaction of the attempt they admit: a start
that rolls back gives its rate token and its slot back.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from orchestrator.breaker import Breaker, Window
from orchestrator.domain import TaskState
from orchestrator.store import Connection

if TYPE_CHECKING:
    from asyncpg import Record

# The states of an attempt whose order is being created or proven (max_in_flight).
IN_FLIGHT_STATES = (TaskState.CREATING.value, TaskState.RECHECKING.value)

_BREAKER_FIELDS = tuple(f.name for f in dataclasses.fields(Breaker))
# The last transition's cause, read only if it was written with the row's version: a writer
# of the previous release moves the version and leaves an older cause behind (migration 0005).
_CAUSE_FIELDS = ("change_cause", "changed_by", "change_reason")
_BREAKER_COLUMNS = ", ".join(
    f"CASE WHEN b.cause_version = b.version THEN b.{name} END AS {name}"
    if name in _CAUSE_FIELDS
    else f"b.{name}"
    for name in _BREAKER_FIELDS
)


def _breaker(row: Record) -> Breaker:
    return Breaker(**{name: row[name] for name in _BREAKER_FIELDS})


async def ensure_breakers(conn: Connection, provider_ids: Sequence[str], now: datetime) -> None:
    """A closed breaker and a rate row for every provider that has none yet."""
    await conn.execute(
        "INSERT INTO provider_breakers (provider_id, changed_at)"
        " SELECT unnest($1::text[]), $2 ON CONFLICT DO NOTHING",
        list(provider_ids),
        now,
    )
    await conn.execute(
        "INSERT INTO provider_rates (provider_id, tat)"
        " SELECT unnest($1::text[]), $2 ON CONFLICT DO NOTHING",
        list(provider_ids),
        now,
    )


async def load_breakers(
    conn: Connection, windows: Sequence[tuple[str, datetime]]
) -> list[tuple[Breaker, Window]]:
    """The breakers of the providers given, each with its calls since the window start
    given for it (for a closed breaker, since it closed if that is later)."""
    rows = await conn.fetch(
        f"SELECT {_BREAKER_COLUMNS},"  # noqa: S608 — fixed fragments only
        " coalesce(sum(c.ok), 0) AS ok, coalesce(sum(c.technical), 0) AS technical"
        " FROM unnest($1::text[], $2::timestamptz[]) AS w(provider_id, since)"
        " JOIN provider_breakers b ON b.provider_id = w.provider_id"
        " LEFT JOIN provider_calls c ON c.provider_id = w.provider_id AND c.second >= CASE"
        # A closed breaker counts from when it closed at the earliest.
        " WHEN b.state = 'closed' THEN greatest(w.since, b.changed_at) ELSE w.since END"
        " GROUP BY b.provider_id",
        [provider_id for provider_id, _ in windows],
        [since for _, since in windows],
    )
    return [(_breaker(r), Window(ok=r["ok"], technical=r["technical"])) for r in rows]


async def save_breaker(conn: Connection, before: Breaker, after: Breaker) -> bool:
    """Write a transition, if the breaker is still as ``before`` (version and probe): False
    when another worker moved it first."""
    status = await conn.execute(
        "UPDATE provider_breakers SET state = $3, changed_at = $4, open_until = $5,"
        " probe_task = $6, probe_until = $7, probe_successes = $8, failure_rate = $9,"
        " calls = $10, version = $11, change_cause = $13, changed_by = $14, change_reason = $15,"
        " cause_version = $11"
        " WHERE provider_id = $1 AND version = $2 AND probe_task IS NOT DISTINCT FROM $12",
        before.provider_id,
        before.version,
        after.state,
        after.changed_at,
        after.open_until,
        after.probe_task,
        after.probe_until,
        after.probe_successes,
        after.failure_rate,
        after.calls,
        after.version,
        before.probe_task,
        after.change_cause,
        after.changed_by,
        after.change_reason,
    )
    return status == "UPDATE 1"


async def add_calls(conn: Connection, counts: Sequence[tuple[str, datetime, int, int]]) -> None:
    """Add (provider, second, ok, technical) call counts to the window table."""
    await conn.execute(
        "INSERT INTO provider_calls AS c (provider_id, second, ok, technical)"
        " SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int[], $4::int[])"
        " ON CONFLICT (provider_id, second)"
        " DO UPDATE SET ok = c.ok + excluded.ok, technical = c.technical + excluded.technical",
        [c[0] for c in counts],
        [c[1] for c in counts],
        [c[2] for c in counts],
        [c[3] for c in counts],
    )


async def prune_calls(conn: Connection, before: datetime) -> None:
    await conn.execute("DELETE FROM provider_calls WHERE second < $1", before)


async def take_probe(
    conn: Connection, provider_id: str, task_id: uuid.UUID, now: datetime, until: datetime
) -> bool:
    """Take the half-open breaker's one probe lease for ``task_id`` (free, expired, or
    already its own)."""
    status = await conn.execute(
        "UPDATE provider_breakers SET probe_task = $2, probe_until = $4"
        " WHERE provider_id = $1 AND state = 'half_open'"
        # Its own lease too: a probe that waited for a rate slot comes back for it.
        " AND (probe_task IS NULL OR probe_until < $3 OR probe_task = $2)",
        provider_id,
        task_id,
        now,
        until,
    )
    return status == "UPDATE 1"


async def take_rate(
    conn: Connection,
    provider_id: str,
    per_second: float,
    burst: int,
    *,
    now: datetime,
    horizon: float,
) -> float:
    """One slot of a provider's rate limit (GCRA: one theoretical arrival time per provider).
    Returns the seconds until the slot: up to ``horizon``, the slot is taken (reserved for
    then); beyond it nothing is taken, ask again then."""
    period = 1.0 / per_second
    tolerance = period * (burst - 1)
    row = await conn.fetchrow(
        "WITH cur AS (SELECT greatest(tat, $2::timestamptz) AS t FROM provider_rates"
        " WHERE provider_id = $1 FOR UPDATE),"
        " upd AS (UPDATE provider_rates r SET tat = cur.t + make_interval(secs => $3::float8)"
        " FROM cur WHERE r.provider_id = $1"
        " AND cur.t - $2 <= make_interval(secs => $4::float8 + $5::float8) RETURNING 1)"
        " SELECT extract(epoch FROM cur.t - $2)::float8 - $4 AS wait FROM cur",
        provider_id,
        now,
        period,
        tolerance,
        horizon,
    )
    if row is None:  # a provider configured since the breakers were ensured
        await ensure_breakers(conn, [provider_id], now)
        return await take_rate(conn, provider_id, per_second, burst, now=now, horizon=horizon)
    return max(float(row["wait"]), 0.0)


async def in_flight(conn: Connection, provider_id: str, *, lock: bool = True) -> int:
    """The provider's attempts being created or rechecked; ``lock``: counted under a
    transaction lock of the provider's that the caller's start holds until it commits, so
    no two starts decide on the same count (without it: a glance, deciding nothing)."""
    if lock:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('cascade.in_flight.' || $1, 0))",
            provider_id,
        )
    # A statement of its own: its snapshot is taken after the lock is held.
    count = await conn.fetchval(
        "SELECT count(*) FROM order_tasks WHERE provider_id = $1 AND state = ANY($2::text[])",
        provider_id,
        list(IN_FLIGHT_STATES),
    )
    return int(count)


async def breaker_for_update(conn: Connection, provider_id: str) -> Breaker | None:
    """The provider's breaker, its row locked until the caller's transaction ends (an
    operator's override: a worker's transition in between waits, then loses its version)."""
    row = await conn.fetchrow(
        f"SELECT {_BREAKER_COLUMNS} FROM provider_breakers b"  # noqa: S608 — fixed fragments
        " WHERE b.provider_id = $1 FOR UPDATE",
        provider_id,
    )
    return None if row is None else _breaker(row)


async def waiting_work(conn: Connection, provider_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Per provider: its attempts in flight (being created or rechecked), and the withdrawals
    whose next attempt at it waits on a hold timer (breaker held, or a rate or in-flight
    limit reached)."""
    rows = await conn.fetch(
        "SELECT p.provider_id,"
        " (SELECT count(*) FROM order_tasks t WHERE t.provider_id = p.provider_id"
        "  AND t.state = ANY($2::text[])) AS in_flight,"
        " (SELECT count(*) FROM order_tasks t WHERE t.provider_id = p.provider_id"
        "  AND t.state = $3 AND t.timer_kind = 'hold' AND t.timer_due_at IS NOT NULL) AS held"
        " FROM unnest($1::text[]) AS p(provider_id)",
        list(provider_ids),
        list(IN_FLIGHT_STATES),
        TaskState.PENDING.value,
    )
    return {r["provider_id"]: (int(r["in_flight"]), int(r["held"])) for r in rows}


async def bring_holds_forward(conn: Connection, provider_id: str, due_at: datetime) -> int:
    """Move the hold timers of the withdrawals that may still try the provider (a pending
    attempt at it) to ``due_at`` where they are later: an operator closed its breaker, or
    opened it for less time than they wait for. The sweeper fires a timer once the record
    says it is due (the broker's schedule fires too, later: a start that finds its task
    started is ignored). Returns how many moved."""
    status = await conn.execute(
        "UPDATE order_tasks SET timer_due_at = $2"
        " WHERE state = $3 AND timer_kind = 'hold' AND timer_due_at > $2"
        " AND queue_id IN (SELECT queue_id FROM order_tasks"
        "  WHERE provider_id = $1 AND state = $3)",
        provider_id,
        due_at,
        TaskState.PENDING.value,
    )
    return int(status.split()[-1])
