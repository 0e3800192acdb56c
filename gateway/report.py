"""``cascade-gateway report``: compare the cohorts from the record (Postgres).

Per cohort: created, succeeded, failed, cancelled, processing, success rate (of final
withdrawals) with a Wilson 95 % interval, attempts per final withdrawal, manual-check rate.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from gateway.settings import Settings

Z95 = 1.959963984540054


def wilson(successes: int, total: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion; None without data."""
    if total == 0:
        return None
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


QUERY = """
SELECT w.cohort,
       count(*) AS created,
       count(*) FILTER (WHERE q.state = 'COMPLETED') AS succeeded,
       count(*) FILTER (WHERE q.state = 'FAILED') AS failed,
       count(*) FILTER (WHERE q.state = 'CANCELLED') AS cancelled,
       count(*) FILTER (WHERE q.state = 'ACTIVE') AS processing,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM order_task_events e
            WHERE e.queue_id = q.queue_id AND e.to_state = 'MANUAL_CHECK')) AS manual_checked,
       avg((SELECT count(*) FROM order_tasks t WHERE t.queue_id = q.queue_id
            AND t.state NOT IN ('PENDING', 'CANCELLED')
            AND NOT (t.state = 'SKIPPED' AND t.provider_reference IS NULL
                     AND t.outcome IS NULL)))
           FILTER (WHERE q.state <> 'ACTIVE') AS attempts
FROM withdrawals w JOIN order_queues q ON q.withdrawal_id = w.withdrawal_id
WHERE ($1::timestamptz IS NULL OR w.created_at >= $1)
  AND ($2::timestamptz IS NULL OR w.created_at < $2)
  AND ($3::text IS NULL OR w.merchant_id = $3)
GROUP BY w.cohort
"""


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} needs a time zone (e.g. 2026-11-01T00:00:00Z)")
    return moment


async def cohort_report(
    conn: asyncpg.Connection[asyncpg.Record],
    *,
    since: str | None = None,
    until: str | None = None,
    merchant: str | None = None,
) -> dict[str, Any]:
    rows = await conn.fetch(QUERY, _parse_time(since), _parse_time(until), merchant)
    cohorts: dict[str, Any] = {}
    for name in ("legacy", "cascade"):
        row = next((r for r in rows if r["cohort"] == name), None)
        created = row["created"] if row else 0
        succeeded = row["succeeded"] if row else 0
        failed = row["failed"] if row else 0
        cancelled = row["cancelled"] if row else 0
        final = succeeded + failed + cancelled
        interval = wilson(succeeded, final)
        cohorts[name] = {
            "created": created,
            "succeeded": succeeded,
            "failed": failed,
            "cancelled": cancelled,
            "processing": row["processing"] if row else 0,
            "success_rate": succeeded / final if final else None,
            "success_rate_ci95": list(interval) if interval else None,
            "attempts_per_withdrawal": float(row["attempts"])
            if row and row["attempts"] is not None
            else None,
            "manual_check_rate": (row["manual_checked"] / created) if row and created else None,
        }
    return {"cohorts": cohorts, "filters": {"since": since, "until": until, "merchant": merchant}}


async def run_report(
    settings: Settings, *, as_json: bool, since: str | None, until: str | None, merchant: str | None
) -> int:
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        report = await cohort_report(conn, since=since, until=until, merchant=merchant)
    finally:
        await conn.close()
    if as_json:
        print(msgspec.json.encode(report).decode())  # noqa: T201
        return 0
    header = (
        f"{'cohort':<8} {'created':>8} {'succ':>6} {'failed':>6} {'canc':>6} "
        f"{'proc':>6} {'success rate (95% CI)':>28}"
    )
    print(header)  # noqa: T201
    for name, c in report["cohorts"].items():
        rate = (
            "n/a"
            if c["success_rate"] is None
            else (
                f"{c['success_rate']:.1%} ({c['success_rate_ci95'][0]:.1%}–"
                f"{c['success_rate_ci95'][1]:.1%})"
            )
        )
        line = (
            f"{name:<8} {c['created']:>8} {c['succeeded']:>6} {c['failed']:>6} "
            f"{c['cancelled']:>6} {c['processing']:>6} {rate:>28}"
        )
        print(line)  # noqa: T201
    return 0
