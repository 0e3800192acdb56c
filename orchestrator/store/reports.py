"""The cohort report's reads (``cascade-gateway report``, ``GET /ops/cohorts``).

Every query reads the same filtered set, withdrawals with their queue (:class:`Window`), and
returns rows of counts; the statistics over them are the report's business. States inside the
SQL are the domain's constants passed as parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from orchestrator.domain import FINAL_QUEUE_STATES, QueueState, TaskState
from orchestrator.store import Connection


@dataclass(frozen=True, slots=True)
class Window:
    """The withdrawals a report covers: created in [``since``, ``until``), of ``merchant``;
    None is no bound."""

    since: datetime | None = None
    until: datetime | None = None
    merchant: str | None = None

    def args(self) -> tuple[datetime | None, datetime | None, str | None]:
        """The bind parameters $1-$3 of :data:`_BASE`."""
        return self.since, self.until, self.merchant


_BASE = """
WITH base AS (
    SELECT w.merchant_id, w.cohort, w.routing_reason, w.flag_state, w.created_at,
           q.queue_id, q.state, q.finished_at
    FROM withdrawals w JOIN order_queues q ON q.withdrawal_id = w.withdrawal_id
    WHERE ($1::timestamptz IS NULL OR w.created_at >= $1)
      AND ($2::timestamptz IS NULL OR w.created_at < $2)
      AND ($3::text IS NULL OR w.merchant_id = $3)
)
"""

# The queue states counted as the report's outcomes, bound to $4-$7 in this order.
_OUTCOME_STATES = (
    QueueState.COMPLETED,
    QueueState.FAILED,
    QueueState.CANCELLED,
    QueueState.ACTIVE,
)
_OUTCOME_COUNTS = """
       count(*) AS created,
       count(*) FILTER (WHERE state = $4) AS succeeded,
       count(*) FILTER (WHERE state = $5) AS failed,
       count(*) FILTER (WHERE state = $6) AS cancelled,
       count(*) FILTER (WHERE state = $7) AS processing"""

# Tasks that never reached a provider: still pending, cancelled while pending, or skipped
# before their turn (no reference, no outcome). Bound to $9 and $10.
_NEVER_TRIED = (TaskState.PENDING, TaskState.CANCELLED)

_COHORT_COUNTS = f"""{_BASE}SELECT cohort, routing_reason AS reason,{_OUTCOME_COUNTS},
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM order_task_events e
            WHERE e.queue_id = base.queue_id AND e.to_state = $8)) AS manual_checked,
       coalesce(sum((SELECT count(*) FROM order_tasks t WHERE t.queue_id = base.queue_id
            AND t.state <> ALL($9::text[])
            AND NOT (t.state = $10 AND t.provider_reference IS NULL
                     AND t.outcome IS NULL)))
           FILTER (WHERE state <> $7), 0)::bigint AS attempts,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM order_tasks t
            WHERE t.queue_id = base.queue_id AND t.state = $11)) AS returned,
       min(created_at) AS first_created, max(created_at) AS last_created
FROM base
GROUP BY cohort, routing_reason
"""  # noqa: S608 — constant fragments, every value is a bind parameter

_TIME_TO_FINAL = f"""{_BASE}SELECT cohort,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
           AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
           AS p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
           AS p99
FROM base
WHERE state = ANY($4::text[]) AND finished_at IS NOT NULL
GROUP BY cohort
"""  # noqa: S608 — constant fragments, every value is a bind parameter

_MERCHANT_COUNTS = f"""{_BASE}SELECT merchant_id, cohort,{_OUTCOME_COUNTS}
FROM base
GROUP BY merchant_id, cohort
ORDER BY count(*) DESC, merchant_id, cohort
"""  # noqa: S608 — constant fragments, every value is a bind parameter

_ROLLOUT_SPLIT = f"""{_BASE}SELECT cohort,
       (flag_state -> 'strategies' -> 0 ->> 'rollout')::int AS rollout,
       flag_state -> 'strategies' -> 0 ->> 'stickiness' AS stickiness,
       count(*) AS withdrawals,
       count(DISTINCT merchant_id) AS merchants
FROM base
WHERE routing_reason = ANY($4::text[])
  AND flag_state ->> 'enabled' = 'true'
  AND CASE WHEN jsonb_typeof(flag_state -> 'strategies') = 'array'
           THEN jsonb_array_length(flag_state -> 'strategies') END = 1
  AND flag_state -> 'strategies' -> 0 ->> 'kind' = 'rollout'
GROUP BY 1, 2, 3
"""  # noqa: S608 — constant fragments, every value is a bind parameter


def _values(states: Iterable[QueueState | TaskState]) -> list[str]:
    return [state.value for state in states]


async def cohort_counts(conn: Connection, window: Window) -> list[asyncpg.Record]:
    """Per cohort and routing reason: created, succeeded, failed, cancelled, processing,
    manual-checked withdrawals, provider attempts of the finished ones, succeeded ones whose
    payout the provider returned since (``returned``, counted among ``succeeded``), and the
    first and last ``created_at``."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _COHORT_COUNTS,
        *window.args(),
        *_values(_OUTCOME_STATES),
        TaskState.MANUAL_CHECK.value,
        _values(_NEVER_TRIED),
        TaskState.SKIPPED.value,
        TaskState.RETURNED.value,
    )
    return rows


async def time_to_final(conn: Connection, window: Window) -> list[asyncpg.Record]:
    """Per cohort: p50, p95 and p99 seconds from creation to a final queue state."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _TIME_TO_FINAL, *window.args(), _values(FINAL_QUEUE_STATES)
    )
    return rows


async def merchant_counts(conn: Connection, window: Window) -> list[asyncpg.Record]:
    """Per merchant and cohort: created, succeeded, failed, cancelled, processing; the
    busiest merchants first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _MERCHANT_COUNTS, *window.args(), *_values(_OUTCOME_STATES)
    )
    return rows


async def rollout_split(
    conn: Connection, window: Window, *, reasons: Iterable[str]
) -> list[asyncpg.Record]:
    """Withdrawals routed for one of ``reasons`` while the toggle was a pure
    ``flexibleRollout`` (one strategy, no constraints), per cohort and the rollout percentage
    and stickiness stored with each decision: withdrawals and distinct merchants."""
    rows: list[asyncpg.Record] = await conn.fetch(_ROLLOUT_SPLIT, *window.args(), list(reasons))
    return rows
