"""Timer lateness: 10,000 webhook-SLA timers due in the same second.

Per round, ``BENCH_TIMERS`` parked withdrawals (``bench/parked.py``: EXECUTING ``sbx_silent``
tasks, each with its ``webhook_timeout`` JetStream schedule) are written with one due time
``D``, a whole second ``LEAD`` seconds ahead. At ``D`` nats-server fires every schedule onto
``order.task.webhook.timeout``; ``BENCH_WORKERS`` ``cascade-gateway worker`` processes
(``BENCH_WORKER_CONCURRENCY`` handlers each, as in the cascade benchmark) consume them. The
providers file gives ``sbx_silent`` no status polling, so each timer's handler moves its task
EXECUTING → MANUAL_CHECK (``webhook.sla_expired``) with no provider or cascade-core call: the
timer path itself, not a provider, is measured.

Lateness of one timer = the ``created_at`` of its ``webhook.sla_expired`` audit row (stamped
by the handler inside its transaction, just before commit) − ``D``. It includes the
server's schedule tick (up to ~250 ms, DESIGN.md), the queue in the consumer, and the handler.
Reported: p50/p99/max of the best of ``BENCH_ROUNDS`` rounds (by p99), and the handled rate.
Messages the sweeper added (a timer more than 3 s overdue in Postgres is re-fired by the
sweeper with its own message id) are counted from the stream. No gateway runs: nothing on this
path calls it. Baselines (asyncpg transactions, JetStream pull-consume + ack) are measured on
the same servers first.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import nats
import uvloop

from bench import baselines
from bench.parked import park, whole_second
from bench.registry import Report, benchmark
from bench.stack import NAMESPACE, BenchStack
from bench.workers import (
    CpuMeter,
    profile_path,
    profile_summary,
    profiled,
    providers_file,
    start_worker,
    work_counters,
)
from devstack.embedded import free_port
from orchestrator import bus

NAME = "timers"
LEAD = 7.0  # seconds between writing the timers and their due time (writing 10,000 takes ~4 s)
TIMEOUT = 90.0
TARGET_P99 = 2.0
COUNTER_SETTLE = 2.0


def _setting(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value < 1:
        raise ValueError(f"{name} must be at least 1")
    return value


@dataclass
class Round:
    count: int
    lateness: list[float]  # seconds, sorted
    park_seconds: float
    sweeper_messages: int
    cpu: dict[str, float]
    work: dict[str, float]

    def q(self, p: float) -> float:
        return self.lateness[min(len(self.lateness) - 1, int(p * len(self.lateness)))]

    @property
    def rate(self) -> float:
        """Timers handled per second, from the first handled to the last."""
        spread = self.lateness[-1] - self.lateness[0]
        return self.count / spread if spread > 0 else float("inf")

    def as_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "first_s": round(self.lateness[0], 3),
            "p50_s": round(self.q(0.5), 3),
            "p90_s": round(self.q(0.9), 3),
            "p99_s": round(self.q(0.99), 3),
            "max_s": round(self.lateness[-1], 3),
            "handled_per_s": round(self.rate, 1),
            "park_seconds": round(self.park_seconds, 2),
            "sweeper_messages": self.sweeper_messages,
            "cpu_seconds": self.cpu,
            "per_timer": self.work,
        }


async def _timeout_messages(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        names = bus.Names(NAMESPACE)
        subject = names.subject(bus.WEBHOOK_TIMEOUT)
        info = await nc.jetstream().stream_info(names.stream, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)
    finally:
        await nc.close()


async def run_round(stack: BenchStack, meter: CpuMeter, count: int) -> Round:
    due = whole_second(datetime.now(UTC) + timedelta(seconds=LEAD))
    before = await _timeout_messages(stack.nats_url)
    parked, park_seconds = await park(stack.database_url, stack.nats_url, count, due)
    if datetime.now(UTC) >= due - timedelta(seconds=1):
        raise RuntimeError(f"writing {count} timers took {park_seconds:.1f} s, LEAD is {LEAD} s")
    task_ids = [p.task_id for p in parked]
    conn = await asyncpg.connect(stack.database_url)
    try:
        await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds() - 1.5))
        work_before = await work_counters(conn, stack.nats_url)
        await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds() - 0.5))
        meter.start()
        deadline = time.perf_counter() + TIMEOUT
        done = 0
        while done < count:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{done} of {count} timers handled after {TIMEOUT:.0f} s")
            await asyncio.sleep(0.25)
            done = await conn.fetchval(
                "SELECT count(*) FROM order_tasks WHERE task_id = ANY($1::uuid[])"
                " AND state = 'MANUAL_CHECK'",
                task_ids,
            )
        cpu = meter.stop()
        await asyncio.sleep(COUNTER_SETTLE)  # backends report their statistics within ~1 s
        work_after = await work_counters(conn, stack.nats_url)
        rows = await conn.fetch(
            "SELECT extract(epoch FROM created_at - $2::timestamptz)::float8 AS late"
            " FROM order_task_events WHERE task_id = ANY($1::uuid[])"
            " AND event = 'webhook.sla_expired' ORDER BY 1",
            task_ids,
            due,
        )
    finally:
        await conn.close()
    if len(rows) != count:
        raise RuntimeError(f"{len(rows)} sla_expired audit rows for {count} timers")
    after = await _timeout_messages(stack.nats_url)
    return Round(
        count=count,
        lateness=[r["late"] for r in rows],
        park_seconds=park_seconds,
        sweeper_messages=after - before - count,
        cpu=cpu,
        work={k: round((work_after[k] - work_before[k]) / count, 2) for k in work_after},
    )


@benchmark(NAME, "lateness of 10,000 webhook-SLA timers due in the same second (p50/p99)")
def timers() -> Report:
    count = _setting("BENCH_TIMERS", 10_000)
    workers = _setting("BENCH_WORKERS", 2)
    handlers = _setting("BENCH_WORKER_CONCURRENCY", 16)
    rounds = _setting("BENCH_ROUNDS", 2)
    stack = BenchStack()
    profiles = []
    try:
        stack.start()
        env = {
            "PROVIDERS_FILE": str(
                providers_file(
                    stack.workdir / "providers.json",
                    {"sbx_silent": {"webhook_sla_seconds": 900, "status_polling": None}},
                )
            ),
            "WORKER_CONCURRENCY": str(handlers),
        }
        # No gateway: the timer path calls neither cascade-core nor a provider.
        nowhere = free_port()
        worker_servers = []
        for i in range(workers):
            profile = profile_path(NAME, f"worker{i}") if profiled("worker") else None
            if profile:
                profiles.append(profile)
            worker_servers.append(
                start_worker(
                    stack, gateway_port=nowhere, extra_env=env, name=f"worker{i}", profile=profile
                )
            )
        meter = CpuMeter(
            groups={
                **{f"worker{i}": [w.process.pid] for i, w in enumerate(worker_servers)},
                "postgres": [stack.postgres.pid],
                "nats-server": [stack.nats.pid],
            }
        )

        async def measure() -> tuple[baselines.Baselines, list[Round]]:
            base = await baselines.measure(stack.database_url, stack.nats_url, scale=0.3)
            return base, [await run_round(stack, meter, count) for _ in range(rounds)]

        base, results = uvloop.run(measure())
    finally:
        stack.close()
    best = min(results, key=lambda r: r.q(0.99))
    report = Report()
    report.add("p50_s", f"timer lateness p50 ({count:,} due at once)", best.q(0.5), "s")
    report.add("p99_s", "timer lateness p99", best.q(0.99), "s")
    report.add("max_s", "timer lateness max", best.lateness[-1], "s")
    report.add("first_s", "  first timer handled after", best.lateness[0], "s")
    report.add(
        "p99_vs_target", f"  p99 / target {TARGET_P99:.0f} s", best.q(0.99) / TARGET_P99, "x"
    )
    report.add("handled_rate", "timers handled per second", best.rate, "/s")
    report.add(
        "handled_vs_consume",
        "  / JetStream pull-consume + ack baseline",
        100 * best.rate / base.js_consume_rate,
        "%",
    )
    report.add("handled_vs_pg", "  / asyncpg tx/s baseline", 100 * best.rate / base.pg_tx_rate, "%")
    report.add("sweeper_messages", "  extra messages from the sweeper", best.sweeper_messages, "")
    report.add(
        "pg_xact_per_timer", "    Postgres transactions per timer", best.work["pg_xact_commit"], ""
    )
    for group, seconds in best.cpu.items():
        if group != "wall":
            report.add(
                f"cpu_ms_{group.replace(' ', '_').replace('-', '_')}",
                f"    CPU ms per timer: {group}",
                seconds * 1000 / best.count,
                "ms",
            )
    baselines.add_figures(report, base)
    met = best.q(0.99) < TARGET_P99
    report.notes.append(
        f"target p99 < {TARGET_P99:.0f} s: {'met' if met else 'NOT met'} (p99 {best.q(0.99):.2f} s)"
    )
    report.notes.append(
        f"{count} EXECUTING sbx_silent tasks + schedules written directly (bench/parked.py), "
        f"due {LEAD:.0f} s later at one whole second; {workers} worker(s) × {handlers} "
        "handlers; handler = webhook.sla_expired → MANUAL_CHECK (no status polling, no HTTP); "
        "lateness = audit row created_at − due; best of "
        f"{rounds} rounds by p99"
    )
    report.notes.append(baselines.NOISE_NOTE)
    for path in profiles:
        report.notes.extend(profile_summary(path))
    report.details = {
        "rounds": [r.as_json() for r in results],
        "baselines": base.as_json(),
        "workers": workers,
        "worker_concurrency": handlers,
    }
    return report
