"""``python -m bench outage``: one provider down for a minute, breaker on against breaker off.

Each run starts the whole stack as processes (:class:`bench.chaos.fleet.Fleet`: Postgres,
nats-server, the sandbox, a gateway, ``OUTAGE_WORKERS`` workers), scripts an outage of
``sbx_a`` (every request answered 503 for ``OUTAGE_SECONDS``, default 60) and offers
``OUTAGE_WITHDRAWALS`` (default 1,000) withdrawals on ``[sbx_a, sbx_b]`` at ``OUTAGE_RATE``
per second (default 10, so the offer outlasts the outage), then waits until every withdrawal
is final or waiting for a person (a manual check). The providers file is the sandbox's as
shipped, once as it is (breaker on, its defaults) and once with ``"breaker": null`` on both
providers.

Printed per run: requests ``sbx_a`` received during the outage (the sandbox counts what it
answered 503), attempts per final withdrawal (attempts that froze an amount), p50/p99 time
from create to final, the success rate of the final ones, the withdrawals left in a manual
check, and how long after the outage ended ``sbx_a`` accepted an order again. Then the
targets: at least 90 % fewer requests to the dead provider, no loss of success rate, traffic
back within 60 s of recovery.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.chaos.fleet import API_TOKEN, Fleet
from bench.registry import Report, benchmark
from bench.stack import ROOT

DEAD, ALIVE = "sbx_a", "sbx_b"
SETTLE_TIMEOUT = 300.0


@dataclass(frozen=True)
class OutageRun:
    withdrawals: int = 1000
    rate: float = 10.0
    outage_seconds: float = 60.0
    workers: int = 2

    @classmethod
    def from_env(cls) -> OutageRun:
        return cls(
            withdrawals=int(os.environ.get("OUTAGE_WITHDRAWALS", "1000")),
            rate=float(os.environ.get("OUTAGE_RATE", "10")),
            outage_seconds=float(os.environ.get("OUTAGE_SECONDS", "60")),
            workers=int(os.environ.get("OUTAGE_WORKERS", "2")),
        )


@dataclass(frozen=True)
class Observed:
    """What one run saw."""

    dead_requests: int
    """Requests the dead provider received (answered 503) during its outage."""
    attempts_per_final: float
    p50_seconds: float
    p99_seconds: float
    success_rate: float
    """Succeeded ÷ final."""
    final: int
    manual_checks: int
    recovery_seconds: float | None
    """From the outage's end to the first order the dead provider accepted after it."""
    unsettled: str | None


def providers_document(*, breaker: bool) -> dict[str, Any]:
    """The sandbox's providers file as shipped; without a breaker on the two providers."""
    document: dict[str, Any] = json.loads((ROOT / "config" / "providers.sandbox.json").read_text())
    if not breaker:
        for provider_id in (DEAD, ALIVE):
            document["providers"][provider_id]["breaker"] = None
    return document


def run_outage(run: OutageRun, *, breaker: bool, workdir: Path | None = None) -> Observed:
    """Start a fleet, run the outage, measure, stop."""
    base = workdir or Path(tempfile.mkdtemp(prefix="cascade-outage-", dir="/tmp"))
    base.chmod(0o755)  # the embedded Postgres runs as nobody when we are root
    fleet = Fleet(
        base,
        gateways=1,
        workers=run.workers,
        nats_nodes=1,
        seed=1,
        providers=providers_document(breaker=breaker),
        twice=False,
    )
    try:
        fleet.start()
        return asyncio.run(_outage(run, fleet))
    finally:
        fleet.close()
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)


async def _outage(run: OutageRun, fleet: Fleet) -> Observed:
    sandbox = fleet.sandbox_url
    async with aiohttp.ClientSession() as session:
        async with session.delete(f"{sandbox}/providers/requests") as response:
            response.raise_for_status()
        body = {"error_ratio": 1.0, "duration_seconds": run.outage_seconds}
        async with session.put(f"{sandbox}/providers/{DEAD}/outage", json=body) as response:
            response.raise_for_status()
        ends_at = datetime.now(UTC) + timedelta(seconds=run.outage_seconds)
        await _offer(session, fleet.gateway_urls[0], run)
        unsettled = await _settle(fleet.database_url)
        async with session.get(f"{sandbox}/providers/{DEAD}/requests") as response:
            response.raise_for_status()
            counts = await response.json()
    return await _observe(fleet.database_url, _answered(counts, "503"), ends_at, unsettled)


async def _offer(session: aiohttp.ClientSession, gateway: str, run: OutageRun) -> None:
    """``run.withdrawals`` creates at ``run.rate`` per second, each on its own task."""
    started = time.monotonic()
    prefix = f"wd_out_{os.getpid()}_{int(time.time())}"
    creates = []
    for index in range(run.withdrawals):
        pause = started + index / run.rate - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        creates.append(asyncio.create_task(_create(session, gateway, f"{prefix}_{index:05d}")))
    await asyncio.gather(*creates)


async def _create(session: aiohttp.ClientSession, gateway: str, withdrawal_id: str) -> None:
    body = {
        "withdrawal_id": withdrawal_id,
        "merchant_id": "m_outage",
        "amount": "25.00",
        "currency": "EUR",
        "destination": {"type": "iban", "account": "DE89370400440532013000", "holder": "J Doe"},
        "cascade": [{"provider_id": p, "fee": "0.50"} for p in (DEAD, ALIVE)],
    }
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    for _ in range(5):  # a 503 (the gateway shedding load) is retried, as a merchant would
        async with session.post(
            f"{gateway}/v1/withdrawals", json=body, headers=headers
        ) as response:
            if response.status in (200, 201):
                return
            if response.status != 503:
                raise AssertionError(f"create {withdrawal_id}: {response.status}")
        await asyncio.sleep(0.5)
    raise AssertionError(f"create {withdrawal_id}: still 503 after 5 tries")


def _answered(counts: dict[str, Any], answer: str) -> int:
    """How many requests the sandbox answered ``answer`` (its ``/requests`` view)."""
    return int(counts.get("by_answer", {}).get(answer, 0))


async def _settle(database_url: str) -> str | None:
    """Until every withdrawal is final or waits for a person; what was left at the deadline."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    left = "nothing read yet"
    while time.monotonic() < deadline:
        conn = await asyncpg.connect(database_url)
        try:
            moving = await conn.fetchval(
                "SELECT count(*) FROM order_queues q WHERE q.state = 'ACTIVE' AND NOT EXISTS"
                " (SELECT 1 FROM order_tasks t WHERE t.queue_id = q.queue_id"
                " AND t.state = 'MANUAL_CHECK')"
            )
        finally:
            await conn.close()
        if moving == 0:
            return None
        left = f"{moving} withdrawals still moving"
        await asyncio.sleep(1.0)
    return left


async def _observe(
    database_url: str, dead_requests: int, ends_at: datetime, unsettled: str | None
) -> Observed:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT q.state, extract(epoch FROM q.finished_at - w.created_at) AS seconds,"
            " (SELECT count(*) FROM order_tasks t WHERE t.queue_id = q.queue_id"
            "  AND t.freeze_state <> 'none') AS attempts,"
            " EXISTS (SELECT 1 FROM order_tasks t WHERE t.queue_id = q.queue_id"
            "  AND t.state = 'MANUAL_CHECK') AS manual"
            " FROM order_queues q JOIN withdrawals w USING (withdrawal_id)"
        )
        back = await conn.fetchval(
            "SELECT min(e.created_at) FROM order_task_events e"
            " JOIN order_tasks t ON t.task_id = e.task_id"
            " WHERE t.provider_id = $1 AND e.created_at >= $2"
            " AND e.event IN ('create.accepted', 'create.succeeded')",
            DEAD,
            ends_at,
        )
    finally:
        await conn.close()
    final = [r for r in rows if r["state"] != "ACTIVE"]
    times = sorted(float(r["seconds"]) for r in final)
    succeeded = sum(1 for r in final if r["state"] == "COMPLETED")
    return Observed(
        dead_requests=dead_requests,
        attempts_per_final=statistics.fmean(int(r["attempts"]) for r in final) if final else 0,
        p50_seconds=_quantile(times, 0.50),
        p99_seconds=_quantile(times, 0.99),
        success_rate=succeeded / len(final) if final else 0.0,
        final=len(final),
        manual_checks=sum(1 for r in rows if r["manual"]),
        recovery_seconds=(back - ends_at).total_seconds() if back is not None else None,
        unsettled=unsettled,
    )


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


@benchmark(
    "outage",
    "sbx_a down 60 s under 1,000 withdrawals on [sbx_a, sbx_b]: breaker on vs off",
    default=False,
)
def outage() -> Report:
    run = OutageRun.from_env()
    report = Report()
    seen = {mode: run_outage(run, breaker=mode == "on") for mode in ("on", "off")}
    for mode, observed in seen.items():
        _figures(report, mode, observed)
    on, off = seen["on"], seen["off"]
    fewer = 1 - on.dead_requests / off.dead_requests if off.dead_requests else 0.0
    report.add(
        "dead_fewer", "requests to the dead provider: fewer with the breaker", fewer * 100, "%"
    )
    report.notes.append(
        f"{run.withdrawals} withdrawals at {run.rate:g}/s on [{DEAD}, {ALIVE}], {DEAD} answering"
        f" 503 to everything for {run.outage_seconds:g} s, {run.workers} workers"
    )
    report.notes.extend(_verdicts(on, off, fewer))
    return report


def _figures(report: Report, mode: str, seen: Observed) -> None:
    label = f"breaker {mode}:"
    report.add(
        f"{mode}_dead", f"{label} requests to {DEAD} in its outage", seen.dead_requests, "req"
    )
    report.add(
        f"{mode}_attempts", f"{label} attempts per final withdrawal", seen.attempts_per_final, ""
    )
    report.add(f"{mode}_p50", f"{label} p50 create → final", seen.p50_seconds, "s")
    report.add(f"{mode}_p99", f"{label} p99 create → final", seen.p99_seconds, "s")
    report.add(f"{mode}_success", f"{label} success rate of final", seen.success_rate * 100, "%")
    report.add(f"{mode}_manual", f"{label} left in manual check", seen.manual_checks, "")
    if seen.recovery_seconds is not None:
        report.add(
            f"{mode}_back", f"{label} {DEAD} accepts again after", seen.recovery_seconds, "s"
        )
    if seen.unsettled:
        report.notes.append(f"breaker {mode}: not settled: {seen.unsettled}")


def _verdicts(on: Observed, off: Observed, fewer: float) -> list[str]:
    back = on.recovery_seconds
    checks = [
        (fewer >= 0.90, f"≥ 90 % fewer requests to the dead provider ({fewer:.1%})"),
        (
            on.success_rate >= off.success_rate and on.manual_checks <= off.manual_checks,
            f"no loss of success rate ({on.success_rate:.1%} vs {off.success_rate:.1%};"
            f" manual checks {on.manual_checks} vs {off.manual_checks})",
        ),
        (back is not None and back <= 60, f"traffic back within 60 s of recovery ({back} s)"),
    ]
    return [f"target {'met' if ok else 'MISSED'}: {what}" for ok, what in checks]
