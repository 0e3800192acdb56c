"""``python -m bench chaos``: the whole stack as processes, under every fault at once.

A campaign offers ``withdrawals`` creates (mixed cascades of every sandbox behaviour, some
cancelled, the manual checks decided both ways by a support client) while, for the length of
the offer: a worker is SIGKILLed every 2-3 s (and replaced), the gateway is SIGKILLed twice,
nats-server is killed with -9 twice (the second time its store is deleted too), Postgres is
stopped immediately once, the sandbox's cascade-core answers 10 % 500s and 5 % timeouts, and
every JetStream message is delivered twice (:mod:`bench.chaos.twice`). Then it waits for
everything to settle and checks the money (:mod:`bench.chaos.checks`): every count must be
zero. ``CHAOS_WITHDRAWALS`` and ``CHAOS_RATE`` size a run (default 1,000 at 20/s); the test
suite runs a reduced campaign (``tests/e2e/test_chaos.py``).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg

from bench.chaos.checks import dlq_size, longest_stall, money_checks
from bench.chaos.fleet import NAMESPACE, Fleet
from bench.chaos.reconciliation_check import reconciliation_findings
from bench.chaos.traffic import Clients, Tally
from bench.registry import Report, benchmark

SETTLE_TIMEOUT = 300.0


@dataclass(frozen=True)
class Campaign:
    withdrawals: int = 1000
    rate: float = 20.0
    """Creates offered per second."""
    gateways: int = 1
    workers: int = 3
    nats_nodes: int = 1
    """1: one nats-server; 3: a cluster of three, streams with three replicas."""
    seed: int = 1
    core_500_ratio: float = 0.10
    core_timeout_ratio: float = 0.05

    @property
    def offer_seconds(self) -> float:
        return self.withdrawals / self.rate


@dataclass
class Outcome:
    """What a campaign saw: the checks (each must be 0), the clients' tally, the faults."""

    checks: dict[str, tuple[int, list[str]]]
    tally: Tally
    faults: list[str]
    settle_seconds: float
    worker_kills: int
    longest_stall: float
    """Seconds, while creates were offered, in which no withdrawal became final."""
    notes: list[str] = field(default_factory=list)
    """What went wrong besides the checks: any note fails the campaign."""
    info: list[str] = field(default_factory=list)
    """What a person may want to know, not a failure."""

    @property
    def failures(self) -> dict[str, tuple[int, list[str]]]:
        return {name: found for name, found in self.checks.items() if found[0]}


def run_campaign(campaign: Campaign, workdir: Path | None = None) -> Outcome:
    """Start the fleet, run the campaign, check, stop; the fleet's logs stay in ``workdir``."""
    own = workdir is None
    base = workdir or Path(tempfile.mkdtemp(prefix="cascade-chaos-", dir="/tmp"))
    base.chmod(0o755)  # the embedded Postgres runs as nobody when we are root
    fleet = Fleet(
        base,
        gateways=campaign.gateways,
        workers=campaign.workers,
        nats_nodes=campaign.nats_nodes,
        seed=campaign.seed,
    )
    faults = FaultSchedule(fleet, campaign)
    try:
        fleet.start()
        return asyncio.run(_campaign(campaign, fleet, faults))
    finally:
        fleet.close()
        faults.release()
        if own:
            shutil.rmtree(base, ignore_errors=True)


async def _campaign(campaign: Campaign, fleet: Fleet, faults: FaultSchedule) -> Outcome:
    await _core_faults(fleet, campaign.core_500_ratio, campaign.core_timeout_ratio)
    stop_support = asyncio.Event()
    async with Clients(fleet.gateway_urls, fleet.sandbox_url, seed=campaign.seed) as clients:
        support = asyncio.create_task(clients.work_manual_checks(stop_support))
        faults.start()
        offered_from = datetime.now(UTC)
        await clients.offer(campaign.withdrawals, campaign.rate, uuid.uuid4().hex[:8])
        offered_until = datetime.now(UTC)
        await asyncio.to_thread(faults.wait)
        started = time.monotonic()
        settled = await _settle(fleet.database_url)
        settle_seconds = time.monotonic() - started
        stop_support.set()
        await support
    checks = await money_checks(fleet.database_url, clients.tally.created)
    await _core_faults(fleet, 0.0, 0.0)  # the faults are over: cascade-core answers again
    checks["reconciliation findings once settled"], recon_lines = await reconciliation_findings(
        fleet
    )
    checks["5xx answers other than 503"] = (clients.tally.server_errors(), [])
    checks["requests that found no answer or a wrong one"] = (
        len(clients.tally.unexpected),
        clients.tally.unexpected[:5],
    )
    dead_letters = await dlq_size(fleet.nats.url, NAMESPACE)
    checks["messages in the DLQ (before the store wipe, and at the end)"] = (
        faults.dead_letters_before_wipe + dead_letters,
        [],
    )
    outcome = Outcome(
        checks,
        clients.tally,
        faults.done,
        settle_seconds,
        fleet.worker_kills,
        await longest_stall(fleet.database_url, offered_from, offered_until),
    )
    outcome.info.extend(recon_lines)
    fleet.check_alive()
    for status, line in fleet.exits:  # a crash fails the campaign; a refused start does not
        (outcome.info if status == 2 else outcome.notes).append(line)
    if faults.error:
        outcome.notes.append(faults.error)
    if settled is not None:
        outcome.notes.append(f"not settled after {SETTLE_TIMEOUT:.0f} s: {settled}")
    return outcome


async def _core_faults(fleet: Fleet, fault_500_ratio: float, timeout_ratio: float) -> None:
    body = {"fault_500_ratio": fault_500_ratio, "timeout_ratio": timeout_ratio}
    async with (
        aiohttp.ClientSession() as session,
        session.put(f"{fleet.sandbox_url}/core/faults", json=body) as response,
    ):
        response.raise_for_status()


class FaultSchedule:
    """The faults, in two threads of their own (the process faults in turn; a worker killed
    every 2-3 s throughout) while the clients run on the event loop.

    The threads stay alive until :meth:`release`: the processes they restart got a parent-
    death signal, which Linux sends when the *thread* that started them ends."""

    def __init__(self, fleet: Fleet, campaign: Campaign) -> None:
        self.fleet = fleet
        self.campaign = campaign
        self.done: list[str] = []
        self.error: str | None = None
        self.dead_letters_before_wipe = 0
        self._events_over = threading.Event()
        self._workers_over = threading.Event()
        self._released = threading.Event()
        self._threads = [
            threading.Thread(target=self._guarded, args=(self._events, self._events_over)),
            threading.Thread(target=self._guarded, args=(self._kill_workers, self._workers_over)),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def wait(self) -> None:
        """Until both threads have done their part."""
        self._events_over.wait()
        self._workers_over.wait()

    def release(self) -> None:
        """Let the threads end, once every process they started has been stopped."""
        self._released.set()

    def _guarded(self, part: Callable[[], None], over: threading.Event) -> None:
        try:
            part()
        except Exception as exc:  # noqa: BLE001 — reported as the campaign's failure
            self.error = f"the fault schedule stopped: {type(exc).__name__}: {exc}"
        finally:
            over.set()
            self._released.wait()

    def _events(self) -> None:
        """Each process fault at its share of the offer's length."""
        fleet, length = self.fleet, self.campaign.offer_seconds
        last = len(fleet.gateways) - 1
        events: list[tuple[float, str, Callable[[], object]]] = [
            (0.20 * length, "gateway 0 killed (-9)", lambda: fleet.kill_gateway(0)),
            (0.35 * length, "nats-server killed (-9)", lambda: fleet.kill_nats(wipe_store=False)),
            (0.50 * length, "Postgres stopped immediately", fleet.stop_postgres_immediately),
            (0.65 * length, f"gateway {last} killed (-9)", lambda: fleet.kill_gateway(last)),
            (0.80 * length, "nats-server killed (-9), its store deleted", self._wipe_nats),
        ]
        started = time.monotonic()
        for at, what, act in events:
            time.sleep(max(0.0, started + at - time.monotonic()))
            which = act()
            now = time.monotonic() - started
            self.done.append(f"{now:5.1f} s  {what}" + (f" ({which})" if which else ""))

    def _wipe_nats(self) -> str:
        """Count the dead letters the wipe is about to lose, then kill and wipe."""
        self.dead_letters_before_wipe = asyncio.run(dlq_size(self.fleet.nats.url, NAMESPACE))
        return self.fleet.kill_nats(wipe_store=True)

    def _kill_workers(self) -> None:
        rng = random.Random(f"{self.campaign.seed}:workers")
        deadline = time.monotonic() + self.campaign.offer_seconds
        while True:
            time.sleep(rng.uniform(2, 3))
            if time.monotonic() > deadline:
                return
            self.fleet.kill_a_worker()


async def _settle(database_url: str) -> str | None:
    """Until every withdrawal is final and notified (support keeps deciding manual checks);
    what was still open at the deadline, or ``None``."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    left = "the database did not answer"
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(database_url)
            try:
                open_queues = await conn.fetchval(
                    "SELECT count(*) FROM order_queues WHERE state = 'ACTIVE'"
                )
                unacked = await conn.fetchval(
                    "SELECT count(*) FROM notifications WHERE acked_at IS NULL"
                )
                # Webhooks the sandbox still has to send: an order's status changes with them.
                unsent = await conn.fetchval("SELECT count(*) FROM sandbox.webhooks")
            finally:
                await conn.close()
            if open_queues == 0 and unacked == 0 and unsent == 0:
                return None
            left = (
                f"{open_queues} withdrawals open, {unacked} notifications unacknowledged,"
                f" {unsent} sandbox webhooks unsent"
            )
        except (OSError, asyncpg.PostgresError):
            pass
        await asyncio.sleep(0.5)
    return left


def summary(campaign: Campaign, outcome: Outcome) -> list[str]:
    """The lines a person reads: the faults, what the clients saw, then every check."""
    lines = [
        f"{campaign.withdrawals} withdrawals at {campaign.rate:g}/s over"
        f" {campaign.gateways} gateway(s), {campaign.workers} workers and"
        f" {campaign.nats_nodes} nats-server(s);"
        f" {outcome.worker_kills} worker kills",
        *(f"fault at {line}" for line in outcome.faults),
        "answers: " + ", ".join(f"{k}: {n}" for k, n in sorted(outcome.tally.statuses.items())),
        "manual-check decisions: "
        + (", ".join(f"{k}: {n}" for k, n in sorted(outcome.tally.resolutions.items())) or "none"),
        f"longest time without a withdrawal becoming final while the load ran:"
        f" {outcome.longest_stall:.1f} s",
        f"settled in {outcome.settle_seconds:.1f} s after the last create",
    ]
    for name, (count, examples) in outcome.checks.items():
        lines.append(f"{name:<48} {count}" + (f"  e.g. {examples}" if examples else ""))
    return lines + outcome.info + outcome.notes


def _from_environment(**fixed: int) -> Campaign:
    return Campaign(
        withdrawals=int(os.environ.get("CHAOS_WITHDRAWALS", "1000")),
        rate=float(os.environ.get("CHAOS_RATE", "20")),
        **fixed,
    )


def _run_and_report(campaign: Campaign) -> Report:
    outcome = run_campaign(campaign)
    report = Report(notes=summary(campaign, outcome))
    for name, (count, _) in outcome.checks.items():
        report.add(name.replace(" ", "_"), name, count, "")
    report.add("longest_stall", "longest stall while loaded", outcome.longest_stall, "s")
    report.add(
        "settle_seconds", "time to settle after the last create", outcome.settle_seconds, "s"
    )
    if outcome.failures or outcome.notes:
        raise AssertionError("\n".join(summary(campaign, outcome)))
    return report


@benchmark("chaos", "every fault at once on the whole stack; every money check must be 0")
def chaos() -> Report:
    return _run_and_report(_from_environment())


@benchmark(
    "chaos-cluster",
    "the chaos campaign on a three-node NATS cluster, two gateways, three workers",
)
def chaos_cluster() -> Report:
    return _run_and_report(_from_environment(nats_nodes=3, gateways=2))
