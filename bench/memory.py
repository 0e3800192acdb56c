"""Worker memory with 1,000 and with 100,000 withdrawals parked waiting on webhooks.

The seed's promise: a withdrawal waiting 15 minutes for a webhook costs one row and one
scheduled message, nothing in a worker's memory. Target (issue 5): the worker's RSS grows by
less than 5 % from 1,000 to 100,000 parked withdrawals.

Setup: the bench stack, ``cascade-gateway serve`` (sandbox on), and a providers file whose
``sbx_silent`` (accepts, never calls back) has ``webhook_sla_seconds: 900``. Parked
withdrawals are written directly (``bench/parked.py``: the rows and the schedule message the
orchestrator itself leaves behind, timers due in 15 minutes), because creating 100,000 over
HTTP would not fit the time budget. Then, per level, twice: a *fresh* ``cascade-gateway
worker`` starts, ``FRESH_CREATES`` more withdrawals on ``[sbx_silent]`` go through HTTP and
this worker (so its code paths, pools and caches are warm, and it really parks work), the
worker settles for three sweeper passes (the sweeper queries due timers and stranded tasks
every 2 s), and ``/proc/<pid>/status`` VmRSS is read. Each level's lower reading is reported
(the machine is noisy); both are in the JSON. The worker is stopped before the next one starts.

Levels: ``LEVELS[0]`` and ``LEVELS[1]`` parked withdrawals at the time of the reading,
counting the ones created through HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import uvloop

from bench.cascade import _created, start_gateway, withdrawal_requests
from bench.load import run_load
from bench.parked import park, whole_second
from bench.registry import Report, benchmark
from bench.stack import HOST, BenchStack, Server
from bench.workers import flags_everyone, providers_file, rss_kib, start_worker

LEVELS = (1_000, 100_000)
FRESH_CREATES = 100
READINGS = 2  # fresh workers per level
SETTLE = 7.0  # three sweeper passes (sweep_interval 2 s) and a margin
TARGET_GROWTH = 0.05
SLA = 900


async def _executing(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM order_tasks WHERE state = 'EXECUTING'"
            " AND timer_kind = 'webhook_timeout'"
        )
        return count
    finally:
        await conn.close()


async def _create_and_park(stack: BenchStack, gateway: Server, expected: int) -> float:
    """``FRESH_CREATES`` withdrawals over HTTP; wait until ``expected`` tasks are parked."""
    run = secrets.token_hex(3)
    requests = withdrawal_requests(gateway.port, FRESH_CREATES, ["sbx_silent"], f"m{run}")
    result = await run_load(HOST, gateway.port, requests, concurrency=8, timeout=60, check=_created)
    if result.statuses != {201: FRESH_CREATES}:
        raise RuntimeError(f"creates answered {dict(result.statuses)}")
    started = time.perf_counter()
    while (parked := await _executing(stack.database_url)) < expected:
        if time.perf_counter() - started > 60:
            raise RuntimeError(f"only {parked} of {expected} tasks parked after 60 s")
        await asyncio.sleep(0.2)
    return result.rate


def _reading(stack: BenchStack, gateway: Server, env: dict[str, str], expected: int, n: int) -> int:
    """RSS (KiB) of a fresh worker after it parked FRESH_CREATES withdrawals and settled."""
    worker = start_worker(
        stack, gateway_port=gateway.port, extra_env=env, name=f"mem-worker-{expected}-{n}"
    )
    try:
        uvloop.run(_create_and_park(stack, gateway, expected))
        time.sleep(SETTLE)
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker exited:\n{worker.log_tail()}")
        return rss_kib(worker.process.pid)
    finally:
        worker.stop()
        stack.servers.remove(worker)


@benchmark("memory", "worker RSS with 1,000 vs 100,000 withdrawals parked on webhooks (15 min)")
def memory() -> Report:
    stack = BenchStack()
    readings: dict[int, list[int]] = {}
    nats_rss: dict[int, int] = {}
    park_seconds: dict[int, float] = {}
    try:
        stack.start()
        env = {
            "FLAGS_FILE": str(flags_everyone(stack.workdir / "flags.json")),
            "PROVIDERS_FILE": str(
                providers_file(
                    stack.workdir / "providers.json", {"sbx_silent": {"webhook_sla_seconds": SLA}}
                )
            ),
            "WORKER_CONCURRENCY": "16",
        }
        gateway = start_gateway(stack, env)
        due = whole_second(datetime.now(UTC) + timedelta(seconds=SLA))
        parked_so_far = 0
        for level in LEVELS:
            direct = level - parked_so_far - READINGS * FRESH_CREATES
            _, park_seconds[level] = uvloop.run(
                park(stack.database_url, stack.nats_url, direct, due)
            )
            parked_so_far += direct
            readings[level] = []
            for n in range(READINGS):
                parked_so_far += FRESH_CREATES
                readings[level].append(_reading(stack, gateway, env, parked_so_far, n))
            nats_rss[level] = rss_kib(stack.nats.pid)
        if parked_so_far != LEVELS[-1]:
            raise AssertionError(f"parked {parked_so_far}, expected {LEVELS[-1]}")
    finally:
        stack.close()
    low, high = (min(readings[level]) for level in LEVELS)
    growth = high / low - 1
    report = Report()
    report.add("rss_low_mib", f"worker RSS, {LEVELS[0]:,} parked", low / 1024, "MiB")
    report.add("rss_high_mib", f"worker RSS, {LEVELS[1]:,} parked", high / 1024, "MiB")
    report.add("rss_growth_pct", "  growth", 100 * growth, "%")
    report.add(
        "rss_growth_vs_target", f"  / target {TARGET_GROWTH:.0%}", growth / TARGET_GROWTH, "x"
    )
    report.add(
        "rss_per_parked_bytes",
        "  worker bytes per extra parked withdrawal",
        (high - low) * 1024 / (LEVELS[1] - LEVELS[0]),
        "B",
    )
    report.add(
        "nats_rss_low_mib",
        f"nats-server RSS, {LEVELS[0]:,} parked",
        nats_rss[LEVELS[0]] / 1024,
        "MiB",
    )
    report.add(
        "nats_rss_high_mib",
        f"nats-server RSS, {LEVELS[1]:,} parked",
        nats_rss[LEVELS[1]] / 1024,
        "MiB",
    )
    met = growth < TARGET_GROWTH
    report.notes.append(
        f"target RSS growth < {TARGET_GROWTH:.0%}: {'met' if met else 'NOT met'} "
        f"({100 * growth:+.1f} %)"
    )
    report.notes.append(
        f"parked = EXECUTING sbx_silent tasks with a webhook_timeout timer due in {SLA} s; all "
        f"but {READINGS * FRESH_CREATES} per level written directly to Postgres (COPY) and "
        "JetStream (one schedule each), as bench/parked.py documents; "
        f"{FRESH_CREATES} per reading created over HTTP and parked by the measured worker"
    )
    report.notes.append(
        f"each reading: a fresh worker (16 handlers), {FRESH_CREATES} creates, {SETTLE:.0f} s "
        "settle (3 sweeper passes), VmRSS from /proc; lower of "
        f"{READINGS} readings per level; nats-server RSS shown for the broker side"
    )
    report.notes.append(
        "the machine (2 cores) is shared with test runs: each level was read twice and the "
        "lower RSS is reported"
    )
    report.details = {
        "rss_kib": {str(level): values for level, values in readings.items()},
        "nats_rss_kib": {str(level): value for level, value in nats_rss.items()},
        "park_seconds": {str(level): round(s, 2) for level, s in park_seconds.items()},
    }
    return report
