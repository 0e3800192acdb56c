"""End-to-end cascade throughput: withdrawals per second reaching a final state.

Everything co-located on this machine, as child processes: ``cascade-gateway serve`` (sandbox
on: it is also cascade-core's ledger and the sandbox providers), ``BENCH_WORKERS``
``cascade-gateway worker`` processes (``WORKER_CONCURRENCY=BENCH_WORKER_CONCURRENCY``; one
worker with 32 handlers by default: see below), embedded nats-server and Postgres. Postgres
runs with ``durable=False`` (fsync, synchronous_commit and full_page_writes off): a bench
stack, not a production one; JetStream keeps its default (page cache, fsync every 2 minutes).
The flags file routes every merchant to the cascade.

Per round, up to ``BENCH_CASCADE_WITHDRAWALS`` withdrawals are created over HTTP
(``POST /v1/withdrawals``, every answer must be 201) on ``BENCH_CONCURRENCY`` keep-alive
connections, and the clock runs from the first create to the moment the database counts all of
them final (``SELECT count(*) FROM order_queues WHERE state <> 'ACTIVE'``, polled every
50 ms). Scenarios: (a) every withdrawal on ``[sbx_sync_ok]``, (b) a mixed cascade
``[sbx_decline, sbx_sync_ok]`` (one declined attempt, one success: twice the task work).
Each scenario runs ``BENCH_ROUNDS`` times and the best round is reported; the baselines
(asyncpg transactions, JetStream publish, the HTTP client) are measured on the same servers
first. So that the benchmark stays under two minutes on a slow or busy machine, a round is
sized from the warm-up's rate to last about ``ROUND_BUDGET`` seconds (never fewer than 300
withdrawals); the count actually used is printed.

``sbx_sync_ok`` also sends its success webhook after ``SANDBOX_WEBHOOK_DELAY_SECONDS`` (1 s),
which the intake verifies and the worker absorbs as a duplicate: part of the load, as with a
real synchronous provider. Afterwards every withdrawal must be ``COMPLETED`` and the sandbox
ledger must report no invariant violation. A round that makes no progress for
``STALL_SECONDS`` fails at once, saying so.

Where the time goes, per round: CPU seconds of every process (``/proc/<pid>/stat``: gateway,
each worker, Postgres with its backends, nats-server, this client) divided by the withdrawals,
next to what the target allows (all cores for 1/300 s: 6.67 CPU ms on two cores), and the
work done per withdrawal: Postgres transactions (``pg_stat_database.xact_commit``: every
autocommit statement counts; backends report within about a second, so these are close, not
exact), rows inserted and updated, JetStream messages stored, and messages sent by the
gateway, each worker and nats-server (``write`` syscalls from ``/proc/<pid>/io``: an HTTP
request or answer, a Postgres query, a NATS frame to another process each; a count that does
not depend on how fast the machine is that day, unlike CPU time). The work counters are read
``COUNTER_SETTLE`` seconds after the last withdrawal is final, so the duplicate webhooks count.

Why one worker process with 32 handlers (``BENCH_WORKERS=1``, ``BENCH_WORKER_CONCURRENCY=32``):
on two cores shared with the gateway, Postgres and nats-server, a second worker process adds
no CPU, only another event loop, pool and set of connections; measured in the same session,
one worker × 32 handlers finished ~15 % more withdrawals per second than two × 16. Set the
two variables to compare layouts.

``BENCH_PROFILE=worker|gateway|all`` runs those processes under cProfile and prints the top
functions (profiling slows them several-fold: the rates of such a run mean nothing).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import uvloop

from bench import baselines
from bench.load import LoadResult, http_post, run_load
from bench.registry import Report, benchmark
from bench.stack import HOST, BenchStack, Server
from bench.workers import (
    CpuMeter,
    flags_everyone,
    orchestrator_env,
    process_argv,
    profile_path,
    profile_summary,
    profiled,
    start_worker,
    stop_process,
    work_counters,
)
from devstack.embedded import free_port

TARGET = 300.0  # final withdrawals/s, issue 5
NAME = "cascade"
FINAL_TIMEOUT = 110.0
STALL_SECONDS = 20.0
COUNTER_SETTLE = 2.0
WARMUP = 300
ROUND_BUDGET = 15.0  # seconds per measured round, to keep the benchmark under 2 minutes
SCENARIOS: dict[str, list[str]] = {
    "sync_ok": ["sbx_sync_ok"],
    "mixed": ["sbx_decline", "sbx_sync_ok"],
}


def _setting(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value < 1:
        raise ValueError(f"{name} must be at least 1")
    return value


def withdrawal_requests(port: int, count: int, providers: list[str], run: str) -> list[bytes]:
    headers = {"Content-Type": "application/json", "Authorization": "Bearer dev-token"}
    requests = []
    for i in range(count):
        body = msgspec.json.encode(
            {
                "withdrawal_id": f"bw-{run}-{i}",
                "merchant_id": f"m_bench_{i % 50}",
                "amount": "10.00",
                "currency": "EUR",
                "destination": {"type": "iban", "account": "DE89370400440532013000"},
                "cascade": [{"provider_id": p, "fee": "0.50"} for p in providers],
            }
        )
        requests.append(http_post(HOST, port, "/v1/withdrawals", body, headers))
    return requests


def _created(status: int, body: bytes) -> bool:
    return status == 201 and b'"withdrawal_id"' in body


@dataclass
class Round:
    scenario: str
    count: int
    seconds: float  # first create → last final
    create: LoadResult
    cpu: dict[str, float]
    final_p50_s: float
    final_p99_s: float
    outcomes: dict[str, int] = field(default_factory=dict)
    work: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "count": self.count,
            "seconds": round(self.seconds, 3),
            "final_rate": round(self.rate, 1),
            "create_rate": round(self.create.rate, 1),
            "create_p50_ms": round(self.create.percentile_ms(0.5), 2),
            "create_p99_ms": round(self.create.percentile_ms(0.99), 2),
            "time_to_final_p50_s": round(self.final_p50_s, 3),
            "time_to_final_p99_s": round(self.final_p99_s, 3),
            "cpu_seconds": self.cpu,
            "cpu_ms_per_withdrawal": {
                k: round(v * 1000 / self.count, 3) for k, v in self.cpu.items() if k != "wall"
            },
            "outcomes": self.outcomes,
            "per_withdrawal": self.work,
        }


async def _final_count(conn: asyncpg.Connection, prefix: str) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM order_queues WHERE state <> 'ACTIVE' AND withdrawal_id LIKE $1",
        prefix + "%",
    )
    return count


async def run_round(
    stack: BenchStack,
    gateway: Server,
    meter: CpuMeter,
    scenario: str,
    count: int,
    concurrency: int,
) -> Round:
    run = secrets.token_hex(3)
    prefix = f"bw-{run}-"
    requests = withdrawal_requests(gateway.port, count, SCENARIOS[scenario], run)
    conn = await asyncpg.connect(stack.database_url)
    try:
        work_before = await work_counters(conn, stack.nats_url) | meter.writes()
        meter.start()
        started = time.perf_counter()
        load = asyncio.create_task(
            run_load(
                HOST,
                gateway.port,
                requests,
                concurrency=concurrency,
                timeout=FINAL_TIMEOUT,
                check=_created,
            )
        )
        deadline = started + FINAL_TIMEOUT
        final = 0
        progressed = started
        while final < count:
            now = time.perf_counter()
            if now > deadline or now - progressed > STALL_SECONDS:
                why = "no progress for" if now <= deadline else "timeout after"
                raise RuntimeError(
                    f"{scenario}: {final} of {count} withdrawals final, {why} "
                    f"{min(now - progressed, FINAL_TIMEOUT):.0f} s; last log lines:\n"
                    f"{stack.servers[-1].log_tail()}"
                )
            if load.done() and load.exception() is not None:
                raise RuntimeError(f"{scenario}: load failed") from load.exception()
            await asyncio.sleep(0.05)
            latest = await _final_count(conn, prefix)
            if latest > final:
                final, progressed = latest, time.perf_counter()
        seconds = time.perf_counter() - started
        cpu = meter.stop()
        created = await load
        if created.statuses != {201: count} or created.rejected_bodies:
            raise RuntimeError(f"{scenario}: creates answered {dict(created.statuses)}")
        rows = await conn.fetch(
            "SELECT state, count(*) FROM order_queues WHERE withdrawal_id LIKE $1 GROUP BY state",
            prefix + "%",
        )
        outcomes: dict[str, int] = {row["state"]: row["count"] for row in rows}
        durations = [
            r[0]
            for r in await conn.fetch(
                "SELECT extract(epoch FROM finished_at - created_at)::float8 FROM order_queues"
                " WHERE withdrawal_id LIKE $1 ORDER BY 1",
                prefix + "%",
            )
        ]
        # The duplicate webhooks of the last withdrawals arrive ~1 s after they are final, and
        # backends report their statistics within a second or so of going idle.
        await asyncio.sleep(COUNTER_SETTLE)
        work_after = await work_counters(conn, stack.nats_url) | meter.writes()
    finally:
        await conn.close()
    if outcomes != {"COMPLETED": count}:
        raise RuntimeError(f"{scenario}: expected {count} COMPLETED, got {outcomes}")
    return Round(
        scenario=scenario,
        count=count,
        seconds=seconds,
        create=created,
        cpu=cpu,
        final_p50_s=durations[len(durations) // 2],
        final_p99_s=durations[min(len(durations) - 1, int(0.99 * len(durations)))],
        outcomes=outcomes,
        work={k: round((work_after[k] - work_before[k]) / count, 2) for k in work_after},
    )


def start_gateway(stack: BenchStack, extra_env: dict[str, str]) -> Server:
    """``cascade-gateway serve`` (under cProfile with ``BENCH_PROFILE=gateway``)."""
    port = free_port()
    env = orchestrator_env(stack, port, extra_env)
    profile = profile_path(NAME, "gateway") if profiled("gateway") else None
    server = Server("gateway", process_argv("serve", profile), env, port, stack.workdir / "gw.log")
    stack.servers.append(server)
    server.wait_ready("/readyz")
    return server


def _ledger_violations(gateway: Server) -> int:
    url = f"http://{HOST}:{gateway.port}/sandbox/core/ledger"
    with urllib.request.urlopen(url, timeout=30) as response:
        return len(json.loads(response.read())["violations"])


@benchmark(NAME, "final withdrawals/s end to end (gateway + workers + sandbox), vs baselines")
def cascade() -> Report:
    count = _setting("BENCH_CASCADE_WITHDRAWALS", 3000)
    concurrency = _setting("BENCH_CONCURRENCY", 32)
    workers = _setting("BENCH_WORKERS", 1)
    handlers = _setting("BENCH_WORKER_CONCURRENCY", 32)
    rounds = _setting("BENCH_ROUNDS", 2)
    stack = BenchStack()
    profiles = []
    try:
        stack.start()
        env = {
            "FLAGS_FILE": str(flags_everyone(stack.workdir / "flags.json")),
            "WORKER_CONCURRENCY": str(handlers),
        }
        gateway = start_gateway(stack, env)
        bare = stack.bare_litestar()
        worker_servers = []
        for i in range(workers):
            profile = profile_path(NAME, f"worker{i}") if profiled("worker") else None
            if profile:
                profiles.append(profile)
            worker_servers.append(
                start_worker(
                    stack,
                    gateway_port=gateway.port,
                    extra_env=env,
                    name=f"worker{i}",
                    profile=profile,
                )
            )
        meter = CpuMeter(
            groups={
                "gateway": [gateway.process.pid],
                **{f"worker{i}": [w.process.pid] for i, w in enumerate(worker_servers)},
                "postgres": [stack.postgres.pid],
                "nats-server": [stack.nats.pid],
            }
        )

        async def measure() -> tuple[baselines.Baselines, list[Round]]:
            base = await baselines.measure(
                stack.database_url, stack.nats_url, bare_port=bare.port, scale=0.3
            )
            # Warm-up: connections, pools, first-call costs; and the rate that sizes the rounds.
            warm = await run_round(stack, gateway, meter, "sync_ok", WARMUP, concurrency)
            results = []
            for scenario, providers in SCENARIOS.items():
                # The mixed cascade does about twice the work per withdrawal.
                budget = warm.rate * ROUND_BUDGET / len(providers)
                size = max(WARMUP, min(count, int(budget)))
                for _ in range(rounds):
                    results.append(
                        await run_round(stack, gateway, meter, scenario, size, concurrency)
                    )
            return base, results

        base, results = uvloop.run(measure())
        violations = _ledger_violations(gateway)
        if profiled("gateway"):
            stop_process(gateway)
    finally:
        stack.close()
    if violations:
        raise RuntimeError(f"the sandbox ledger reports {violations} invariant violations")
    report = Report()
    best: dict[str, Round] = {}
    for r in results:
        if r.scenario not in best or r.rate > best[r.scenario].rate:
            best[r.scenario] = r
    for scenario, r in best.items():
        label = " → ".join(SCENARIOS[scenario])
        report.add(f"{scenario}_final_rate", f"final withdrawals/s [{label}]", r.rate, "/s")
        report.add(f"{scenario}_create_rate", "  creates/s over HTTP", r.create.rate, "/s")
        report.add(
            f"{scenario}_create_p99_ms", "  create p99 latency", r.create.percentile_ms(0.99), "ms"
        )
        report.add(f"{scenario}_final_p50_s", "  time to final p50", r.final_p50_s, "s")
        report.add(f"{scenario}_final_p99_s", "  time to final p99", r.final_p99_s, "s")
        report.add(f"{scenario}_vs_target", f"  / target {TARGET:.0f}/s", r.rate / TARGET, "x")
        report.add(
            f"{scenario}_vs_pg",
            "  / asyncpg tx/s baseline",
            100 * r.rate / base.pg_tx_rate,
            "%",
        )
        report.add(
            f"{scenario}_vs_js",
            "  / JetStream publish baseline",
            100 * r.rate / base.js_publish_rate,
            "%",
        )
        for key, label in (
            ("pg_xact_commit", "Postgres transactions"),
            ("pg_tup_inserted", "rows inserted"),
            ("pg_tup_updated", "rows updated"),
            ("jetstream_messages", "JetStream messages stored"),
        ):
            report.add(
                f"{scenario}_per_withdrawal_{key}", f"    {label} per withdrawal", r.work[key], ""
            )
        for key in sorted(k for k in r.work if k.startswith("writes_")):
            report.add(
                f"{scenario}_per_withdrawal_{key}",
                f"    messages sent per withdrawal: {key.removeprefix('writes_')}",
                r.work[key],
                "",
            )
        busy = sum(v for k, v in r.cpu.items() if k != "wall")
        cores = os.cpu_count() or 1
        report.add(
            f"{scenario}_cpu_busy",
            f"  CPU busy (of {cores} cores)",
            busy / r.cpu["wall"] / cores,
            "x",
        )
        report.add(
            f"{scenario}_cpu_ms_total",
            "    CPU ms per withdrawal: all",
            busy * 1000 / r.count,
            "ms",
        )
        report.add(
            f"{scenario}_cpu_ms_budget",
            f"    CPU ms a withdrawal may cost for {TARGET:.0f}/s",
            1000 * cores / TARGET,
            "ms",
        )
        for group, seconds in r.cpu.items():
            if group != "wall":
                report.add(
                    f"{scenario}_cpu_ms_{group.replace(' ', '_')}",
                    f"    CPU ms per withdrawal: {group}",
                    seconds * 1000 / r.count,
                    "ms",
                )
    baselines.add_figures(report, base)
    met = all(r.rate >= TARGET for r in best.values())
    report.notes.append(
        f"target ≥ {TARGET:.0f} final withdrawals/s: {'met' if met else 'NOT met'} "
        f"({', '.join(f'{s} {r.rate:.0f}/s' for s, r in best.items())})"
    )
    report.notes.append(
        f"{', '.join(f'{s} {r.count}' for s, r in best.items())} withdrawals per round "
        f"(at most {count}, sized to ~{ROUND_BUDGET:.0f} s), {concurrency} HTTP connections, "
        f"{workers} worker "
        f"process(es) × {handlers} handlers, best of {rounds} rounds per scenario after a "
        "300-withdrawal warm-up; "
        "clock from first create to last final (DB poll every 50 ms); every withdrawal "
        "COMPLETED, ledger without violations"
    )
    report.notes.append(
        "Postgres durable=False (fsync/synchronous_commit off) for the bench; JetStream file "
        "storage with default fsync; all processes on this machine with the load client"
    )
    report.notes.append(baselines.NOISE_NOTE)
    for path in profiles + ([profile_path(NAME, "gateway")] if profiled("gateway") else []):
        report.notes.extend(profile_summary(path))
    report.details = {
        "rounds": [r.as_json() for r in results],
        "baselines": base.as_json(),
        "workers": workers,
        "worker_concurrency": handlers,
        "concurrency": concurrency,
    }
    return report
