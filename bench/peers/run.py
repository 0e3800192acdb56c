"""``python -m bench peers``: ours, Temporal and DBOS on one sandbox, in interleaved rounds.

The environment, started once: a Postgres for the sandbox alone, a ``cascade-gateway sandbox``
process on it (cascade-core simulator and the sandbox providers; webhooks to one fixed port),
and a second Postgres that ours and DBOS use (a fresh database per turn). Then
``PEERS_ROUNDS`` rounds (default 3); each round measures the asyncpg 4-round-trip baseline on
that second Postgres (:func:`bench.baselines.pg_transaction_rate`), then gives every system
(``PEERS_SYSTEMS``, default ``ours,temporal,dbos``; the order rotates one place per round) two
turns, each on a freshly started instance with that port as its front door and a warm-up
first:

* saturation turn: ``PEERS_WITHDRAWALS`` withdrawals created as fast as it takes them on
  ``PEERS_CONCURRENCY`` keep-alive connections (:mod:`bench.load`), on ``[sbx_sync_ok]`` and on
  ``[sbx_decline, sbx_ok]``; final withdrawals/s from the first create to the last final; CPU
  ms per withdrawal of the system's process trees (``/proc/<pid>/stat``, children included:
  Postgres backends), and their peak memory (PSS, sampled);
* latency turn, once every system's saturation turn of the round is done:
  ``PEERS_LATENCY_WITHDRAWALS`` on ``[sbx_sync_ok]`` offered at ``PEERS_RATE``/s (open loop), then
  as many at the round's sustainable rate (half the slowest system's ``[sbx_sync_ok]``
  saturation rate in that round, or ``PEERS_SUSTAINABLE_RATE``); p50/p99 from each create's send
  to its final. Then the crash check: ``PEERS_CRASH_WITHDRAWALS`` on ``[sbx_decline, sbx_ok]`` at
  ``PEERS_RATE``/s, the worker process(es) ``kill -9``-ed when 40 % are sent and started again a
  second later (the load client retries a create refused meanwhile); every withdrawal must
  reach its final, and the sandbox ledger must show exactly one commit per withdrawal, no open
  freeze, no violation.

Each figure is reported as its median over the rounds with the lowest and highest; every ratio
is of medians. The machine's load average is recorded before and after every turn.

"Final" is the same clock for all three: the withdrawal's notification arriving at the
simulated cascade-core (its ``notifications`` table, polled every 20 ms), which every system
sends right after the commit. The sandbox and the load client are excluded from CPU and RSS.

The environment's own CPU per withdrawal is measured in every saturation turn too (the sandbox
process, its Postgres, and this process alone: the load client, the finals poller, the memory
sampler): it shares the machine's cores with the system under test, so it bounds what *any*
system could reach here, the **ceiling** (:class:`Ceiling`). The report divides it by the
baseline as well: a ratio to the baseline above that ceiling's is out of every system's reach
on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.baselines import pg_transaction_rate
from bench.cascade import withdrawal_requests
from bench.chaos.fleet import providers_document
from bench.load import run_load
from bench.peers.systems import CORE_TOKEN, Dbos, Ours, System, Temporal
from bench.registry import Report
from bench.stack import HOST, ROOT, Server, create_database
from bench.workers import CLOCK_TICKS
from devstack.embedded import EmbeddedPostgres, free_port

SYNC = ["sbx_sync_ok"]
MIXED = ["sbx_decline", "sbx_ok"]
FINAL_TIMEOUT = 180.0
SEQ_WINDOW = 512
STALL_SECONDS = 30.0  # no withdrawal final for this long: stuck, say so
DOC = ROOT / "docs" / "performance.md"
CHART = ROOT / "docs" / "performance.png"


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def ensure_peer_group() -> None:
    """Install the ``peers`` dependency group into this environment unless it is there."""
    if all(importlib.util.find_spec(m) for m in ("temporalio", "dbos")):
        return
    uv = ROOT / ".tools" / "bin" / "uv"
    command = [
        str(uv) if uv.exists() else (shutil.which("uv") or "uv"),
        "sync",
        "--frozen",
        "--group",
        "peers",
        "--quiet",
    ]
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": sys.prefix, "UV_PYTHON_DOWNLOADS": "never"}
    print("installing the peers dependency group:", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)


# --- process trees ---------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    used = {}
    for name, root in roots.items():
        total = 0
        for pid in tree(root):
            fields = _stat(pid)
            if fields is not None:
                # utime + stime, and cutime + cstime: a child that exited and was reaped (a
                # Postgres backend whose connection closed) moved its CPU to its parent's.
                total += sum(int(f) for f in fields[11:15])
        used[name] = total / CLOCK_TICKS
    return used


def pss_mib(roots: dict[str, int]) -> dict[str, float]:
    """Proportional set size (PSS) of each tree, MiB: RSS would count Postgres's shared
    buffers once per backend; PSS shares them out, so the sum is the memory really used."""
    sizes = {}
    for name, root in roots.items():
        total = 0
        for pid in tree(root):
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        sizes[name] = total / 1024
    return sizes


# --- the clock: notifications at the simulated cascade-core ----------------------------------


class Finals:
    """First sight of each withdrawal's notification in the sandbox's database."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.seen: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self._seq = 0
        self._conn: asyncpg.Connection | None = None

    async def poll(self) -> None:
        if self._conn is None:
            self._conn = await asyncpg.connect(self.dsn)
            self._seq = await self._conn.fetchval(
                "SELECT coalesce(max(seq), 0) FROM sandbox.notifications"
            )
        # Identity values are taken at insert and committed out of order: a row with a lower
        # seq may become visible after a higher one. Re-read a window below the highest seen.
        rows = await self._conn.fetch(
            "SELECT seq, idempotency_key FROM sandbox.notifications WHERE seq > $1",
            self._seq - SEQ_WINDOW,
        )
        now = time.perf_counter()
        for row in rows:
            self._seq = max(self._seq, row["seq"])
            withdrawal_id, _, status = row["idempotency_key"].rpartition(":")
            self.seen.setdefault(withdrawal_id, now)
            self.status.setdefault(withdrawal_id, status)

    async def wait(self, ids: list[str], sample: Any = None, started: float = 0.0) -> float:
        """Until every id is final; the time of the last one."""
        deadline = time.perf_counter() + FINAL_TIMEOUT
        last_sample = 0.0
        progressed, left = time.perf_counter(), len(ids)
        while True:
            await self.poll()
            missing = [i for i in ids if i not in self.seen]
            if not missing:
                return max(self.seen[i] for i in ids)
            now = time.perf_counter()
            if len(missing) < left:
                progressed, left = now, len(missing)
            elif now - progressed > STALL_SECONDS:
                deadline = 0.0
            if sample is not None and now - last_sample > 0.5:
                sample()
                last_sample = now
            if now > deadline:
                raise RuntimeError(
                    f"{len(missing)} of {len(ids)} not final (stalled or past "
                    f"{FINAL_TIMEOUT:.0f} s), e.g. {missing[:3]}"
                )
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


# --- measurements ----------------------------------------------------------------------------


@dataclass
class Result:
    """One system in one round: its saturation turn and its latency turn."""

    system: str
    round: int = 0
    rate: dict[str, float] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    cpu_split: dict[str, dict[str, float]] = field(default_factory=dict)
    # the environment's CPU ms per withdrawal in the same saturation runs (sandbox, its
    # Postgres, the load client): what bounds every system on shared cores
    env_cpu_ms: dict[str, float] = field(default_factory=dict)
    env_split: dict[str, dict[str, float]] = field(default_factory=dict)
    # time to final, s: "fixed" at PEERS_RATE, "sustainable" at the round's sustainable rate
    p50_s: dict[str, float] = field(default_factory=dict)
    p99_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    peak_split: dict[str, float] = field(default_factory=dict)
    crash: str = ""
    crash_ok: bool = False
    # the machine's load average (1, 5, 15 min) before and after each turn ("saturation",
    # "latency")
    loads: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


def _body_ids(run: str, count: int) -> list[str]:
    return [f"bw-{run}-{i}" for i in range(count)]


async def saturate(
    system: System,
    finals: Finals,
    providers: list[str],
    count: int,
    concurrency: int,
    result: Result,
    key: str,
    environment: dict[str, int],
) -> None:
    run = secrets.token_hex(3)
    requests = withdrawal_requests(system.port, count, providers, run)
    ids = _body_ids(run, count)
    roots = system.measured()

    def sample() -> None:
        sizes = pss_mib(roots)
        if sum(sizes.values()) > result.peak_rss_mib:
            result.peak_rss_mib = sum(sizes.values())
            result.peak_split = sizes

    await finals.poll()
    before = cpu_seconds(roots)
    env_before = cpu_seconds(environment)
    # This process alone (its children are the servers, counted above or not at all).
    client_before = time.process_time()
    started = time.perf_counter()
    load = asyncio.create_task(
        run_load(HOST, system.port, requests, concurrency=concurrency, timeout=FINAL_TIMEOUT)
    )
    last = await finals.wait(ids, sample, started)
    after = cpu_seconds(roots)
    env_after = cpu_seconds(environment)
    client = time.process_time() - client_before
    created = await load
    if set(created.statuses) != {201}:
        raise RuntimeError(f"{system.name} {key}: creates answered {dict(created.statuses)}")
    sample()
    result.rate[key] = count / (last - started)
    split = {n: 1000 * (after[n] - before[n]) / count for n in roots}
    result.cpu_split[key] = split
    result.cpu_ms[key] = sum(split.values())
    env_split = {n: 1000 * (env_after[n] - env_before[n]) / count for n in environment}
    env_split["load client"] = 1000 * client / count
    result.env_split[key] = env_split
    result.env_cpu_ms[key] = sum(env_split.values())


async def offered(
    system: System,
    finals: Finals,
    providers: list[str],
    count: int,
    rate: float,
    on_progress: Any = None,
) -> tuple[list[str], dict[str, float]]:
    """``count`` creates at ``rate``/s (open loop, each retried until it is answered 2xx)."""
    run = secrets.token_hex(3)
    bodies = [
        json.dumps(
            {
                "withdrawal_id": f"bw-{run}-{i}",
                "merchant_id": f"m_bench_{i % 50}",
                "amount": "10.00",
                "currency": "EUR",
                "destination": {"type": "iban", "account": "DE89370400440532013000"},
                "cascade": [{"provider_id": p, "fee": "0.50"} for p in providers],
            }
        ).encode()
        for i in range(count)
    ]
    ids = _body_ids(run, count)
    sent: dict[str, float] = {}
    url = f"http://{HOST}:{system.port}/v1/withdrawals"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer dev-token"}

    # Polled from the first create on: a final is stamped when the poll first sees it.
    await finals.poll()
    watching = asyncio.create_task(finals.wait(ids))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def create(index: int) -> None:
            sent[ids[index]] = time.perf_counter()
            for _ in range(600):
                try:
                    async with session.post(url, data=bodies[index], headers=headers) as r:
                        if r.status in (200, 201):
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)
            raise RuntimeError(f"create {ids[index]} never answered")

        start = time.perf_counter()
        tasks = []
        for index in range(count):
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(create(index)))
            if on_progress is not None:
                await on_progress(index)
        await asyncio.gather(*tasks)
    await watching
    return ids, sent


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(
    system: System, finals: Finals, count: int, rate: float, result: Result, key: str
) -> None:
    ids, sent = await offered(system, finals, SYNC, count, rate)
    durations = [finals.seen[i] - sent[i] for i in ids]
    result.p50_s[key] = _percentile(durations, 0.5)
    result.p99_s[key] = _percentile(durations, 0.99)


def ledger(sandbox_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{sandbox_url}/core/ledger", timeout=60) as response:
        document: dict[str, Any] = json.loads(response.read())
        return document


async def crash(
    system: System, finals: Finals, sandbox_url: str, count: int, rate: float, result: Result
) -> None:
    kill_at = int(count * 0.4)

    async def progress(index: int) -> None:
        if index == kill_at:
            system.kill_workers()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(system.start_workers)

    ids, _ = await offered(system, finals, MIXED, count, rate, progress)
    book = await asyncio.to_thread(ledger, sandbox_url)
    wanted = set(ids)
    commits: dict[str, int] = {}
    frozen = 0
    for details in book["operation_details"].values():
        if details["withdrawal_id"] in wanted:
            if details["state"] == "committed":
                commits[details["withdrawal_id"]] = commits.get(details["withdrawal_id"], 0) + 1
            elif details["state"] == "frozen":
                frozen += 1
    succeeded = [i for i in ids if finals.status.get(i) == "succeeded"]
    bad = [i for i in succeeded if commits.get(i) != 1]
    extra = [i for i in ids if i not in succeeded and commits.get(i)]
    violations = len(book["violations"])
    result.crash_ok = not bad and not extra and not frozen and not violations
    others = {i: finals.status.get(i, "?") for i in ids if i not in succeeded}
    result.crash = (
        f"{len(ids)} final ({len(succeeded)} succeeded"
        + (f"; not succeeded: {others}" if others else "")
        + f"), commits≠1 on {len(bad) + len(extra)}, "
        f"{frozen} open freezes, {violations} ledger violations"
    )


async def measure_saturation(
    system: System, sandbox_dsn: str, environment: dict[str, int], result: Result
) -> None:
    """The saturation turn: warm-up, then both cascades as fast as the system takes them;
    ``environment``: the sandbox's process trees, measured beside the system's."""
    finals = Finals(sandbox_dsn)
    count = _int("PEERS_WITHDRAWALS", 600)
    concurrency = _int("PEERS_CONCURRENCY", 32)
    try:
        warm = Result(system.name)
        warmup = _int("PEERS_WARMUP", 150)
        await saturate(system, finals, SYNC, warmup, concurrency, warm, "sync", environment)
        await saturate(system, finals, SYNC, count, concurrency, result, "sync", environment)
        await saturate(system, finals, MIXED, count, concurrency, result, "mixed", environment)
    finally:
        await finals.close()


async def measure_latency(
    system: System, sandbox_url: str, sandbox_dsn: str, sustainable: float, result: Result
) -> None:
    """The latency turn: warm-up, time to final at PEERS_RATE and at the sustainable rate,
    then the crash check."""
    finals = Finals(sandbox_dsn)
    count = _int("PEERS_LATENCY_WITHDRAWALS", 250)
    rate = float(os.environ.get("PEERS_RATE", "50"))
    try:
        warm = Result(system.name)
        concurrency = _int("PEERS_CONCURRENCY", 32)
        warmup = _int("PEERS_WARMUP", 150)
        await saturate(system, finals, SYNC, warmup, concurrency, warm, "sync", environment={})
        await latency(system, finals, count, rate, result, "fixed")
        await latency(system, finals, count, sustainable, result, "sustainable")
        await crash(system, finals, sandbox_url, _int("PEERS_CRASH_WITHDRAWALS", 250), rate, result)
    finally:
        await finals.close()


# --- the run ---------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def load_text(load: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


@dataclass
class Round:
    """What one round measured besides the systems: the baseline and the sustainable rate."""

    number: int
    order: list[str]
    baseline_tx_s: float = 0.0
    sustainable_rate: float = 0.0


class Bench:
    """The environment shared by every turn, and the turns themselves."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env_pg = EmbeddedPostgres(workdir / "sandbox-postgres", durable=False)
        self.sut_pg = EmbeddedPostgres(workdir / "postgres", durable=False)
        self.front = free_port()
        self.sandbox_port = free_port()
        self.sandbox_url = f"http://{HOST}:{self.sandbox_port}/sandbox"
        self.providers = workdir / "providers.json"
        self.providers.write_text(json.dumps(providers_document()))
        self.sandbox: Server | None = None
        self.sandbox_dsn = ""
        self.sut_admin = ""

    def start(self) -> None:
        admin = self.env_pg.start()
        asyncio.run(create_database(admin, "sandbox"))
        self.sandbox_dsn = admin.rpartition("/")[0] + "/sandbox"
        self.sandbox = Server(
            "sandbox",
            [sys.executable, "-m", "gateway.cli", "sandbox"],
            {
                **os.environ,
                "DATABASE_URL": self.sandbox_dsn,
                "SANDBOX_PORT": str(self.sandbox_port),
                "PUBLIC_URL": f"http://{HOST}:{self.front}",
                "PROVIDERS_FILE": str(self.providers),
                "SANDBOX_URL": self.sandbox_url,
                "CORE_TOKEN": CORE_TOKEN,
                "SANDBOX_WEBHOOK_DELAY_SECONDS": "0.3",
                "SANDBOX_FAIL_DELAY_SECONDS": "0.3",
                "LOG_LEVEL": "WARNING",
            },
            self.sandbox_port,
            self.workdir / "sandbox.log",
        )
        self.sandbox.wait_ready("/sandbox")
        self.sut_admin = self.sut_pg.start()

    def environment(self) -> dict[str, int]:
        """The environment's process trees (name → pid), for its CPU per withdrawal."""
        assert self.sandbox is not None
        return {"sandbox": self.sandbox.process.pid, "sandbox postgres": self.env_pg.pid}

    def stop(self) -> None:
        if self.sandbox is not None:
            self.sandbox.stop()
        for pg in (self.sut_pg, self.env_pg):
            with contextlib.suppress(Exception):  # best effort at the end
                pg.stop()

    def system(self, name: str, folder: Path) -> System:
        if name == "ours":
            return Ours(
                folder, self.front, self.sandbox_url, self.providers, self.sut_pg, self.sut_admin
            )
        if name == "temporal":
            return Temporal(folder, self.front, self.sandbox_url, self.providers)
        if name == "dbos":
            return Dbos(
                folder, self.front, self.sandbox_url, self.providers, self.sut_pg, self.sut_admin
            )
        raise ValueError(f"unknown system {name!r} in PEERS_SYSTEMS")

    def turn(self, name: str, phase: str, result: Result, sustainable: float = 0.0) -> None:
        """Start a fresh instance of ``name``, measure one phase, stop it; the load average
        before and after goes into ``result``."""
        folder = self.workdir / f"{name}-r{result.round}-{phase}"
        folder.mkdir()
        folder.chmod(0o755)
        system = self.system(name, folder)
        before = load_average()
        print(f"  round {result.round} {name} {phase}: starting ({load_text(before)})", flush=True)
        try:
            system.start()
            if phase == "saturation":
                environment = self.environment()
                asyncio.run(measure_saturation(system, self.sandbox_dsn, environment, result))
            else:
                asyncio.run(
                    measure_latency(system, self.sandbox_url, self.sandbox_dsn, sustainable, result)
                )
        except Exception as exc:
            tails = "\n".join(f"--- {s.name}\n{s.log_tail(20)}" for s in system.servers)
            raise RuntimeError(f"{name} {phase} failed: {exc}\n{tails}") from exc
        finally:
            system.stop()
        after = load_average()
        result.loads[phase] = (before, after)
        print(f"  round {result.round} {name} {phase}: done ({load_text(after)})", flush=True)


def run() -> Report:
    ensure_peer_group()
    wanted = os.environ.get("PEERS_SYSTEMS", "ours,temporal,dbos").split(",")
    rounds = _int("PEERS_ROUNDS", 3)
    fixed_sustainable = os.environ.get("PEERS_SUSTAINABLE_RATE")
    workdir = Path(tempfile.mkdtemp(prefix="cascade-peers-", dir="/tmp"))
    workdir.chmod(0o755)  # the embedded Postgres runs as nobody when we are root
    bench = Bench(workdir)
    results: list[Result] = []
    done: list[Round] = []
    try:
        bench.start()
        for number in range(1, rounds + 1):
            # Interleaved, and each round starts one system later: no system always runs
            # first (a cold machine) or last (after the others heated it).
            shift = (number - 1) % len(wanted)
            this = Round(number, wanted[shift:] + wanted[:shift])
            this.baseline_tx_s = asyncio.run(pg_transaction_rate(bench.sut_admin))
            print(
                f"  round {number}: asyncpg baseline {this.baseline_tx_s:,.0f} tx/s; "
                f"order {', '.join(this.order)}",
                flush=True,
            )
            by_name = {name: Result(name, number) for name in this.order}
            for name in this.order:
                bench.turn(name, "saturation", by_name[name])
            # Half the slowest system's saturation rate of this round: a load every system
            # carries with room to spare, so its latency is the flow's, not a queue's.
            this.sustainable_rate = (
                float(fixed_sustainable)
                if fixed_sustainable
                else round(0.5 * min(r.rate["sync"] for r in by_name.values()), 1)
            )
            print(f"  round {number}: sustainable rate {this.sustainable_rate}/s", flush=True)
            for name in this.order:
                bench.turn(name, "latency", by_name[name], this.sustainable_rate)
            results.extend(by_name.values())
            done.append(this)
    finally:
        bench.stop()
        if os.environ.get("PEERS_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(wanted, results, done)
    from bench.peers.document import write  # noqa: PLC0415

    write(report, wanted, results, done, DOC, CHART)
    return report


FIGURES = (
    # key, label, unit, higher is better
    ("rate_sync", "final withdrawals/s at saturation [sbx_sync_ok]", "/s", True),
    ("rate_mixed", "final withdrawals/s at saturation [sbx_decline, sbx_ok]", "/s", True),
    ("p50", "time to final p50 at {rate}/s [sbx_sync_ok]", "ms", False),
    ("p99", "time to final p99 at {rate}/s [sbx_sync_ok]", "ms", False),
    ("p50_sustainable", "time to final p50 at a sustainable rate [sbx_sync_ok]", "ms", False),
    ("p99_sustainable", "time to final p99 at a sustainable rate [sbx_sync_ok]", "ms", False),
    ("cpu_sync", "CPU ms per withdrawal [sbx_sync_ok]", "ms", False),
    ("cpu_mixed", "CPU ms per withdrawal [sbx_decline, sbx_ok]", "ms", False),
    ("rss", "peak memory of the system (PSS)", "MiB", False),
)


def values(r: Result) -> dict[str, float]:
    return {
        "rate_sync": r.rate["sync"],
        "rate_mixed": r.rate["mixed"],
        "p50": r.p50_s["fixed"] * 1000,
        "p99": r.p99_s["fixed"] * 1000,
        "p50_sustainable": r.p50_s["sustainable"] * 1000,
        "p99_sustainable": r.p99_s["sustainable"] * 1000,
        "cpu_sync": r.cpu_ms["sync"],
        "cpu_mixed": r.cpu_ms["mixed"],
        "rss": r.peak_rss_mib,
    }


@dataclass(frozen=True)
class Spread:
    """A figure over the rounds: the median (what ratios use) and the lowest and highest."""

    median: float
    low: float
    high: float


def spread(samples: list[float]) -> Spread:
    return Spread(statistics.median(samples), min(samples), max(samples))


def summary(results: list[Result]) -> dict[str, dict[str, Spread]]:
    """system → figure key → its spread over the rounds."""
    samples: dict[str, dict[str, list[float]]] = {}
    for r in results:
        for key, value in values(r).items():
            samples.setdefault(r.system, {}).setdefault(key, []).append(value)
    return {s: {k: spread(v) for k, v in figures.items()} for s, figures in samples.items()}


@dataclass(frozen=True)
class Ceiling:
    """One cascade's environment cost over every saturation turn, and what it leaves.

    The environment's CPU is part per withdrawal (``per_withdrawal_ms``: the sandbox's
    answers, the load client's requests) and part per second (``per_second_ms``: the
    sandbox's loops, the bench's own polling for finals), so a slow system's turn charges it
    more per withdrawal. Fitted over every turn, env_ms = per_withdrawal + per_second ÷ rate
    (least squares in 1 ÷ rate), a system costing nothing could finish at most
    ``(cores × 1000 − per_second_ms) ÷ per_withdrawal_ms`` withdrawals/s: the ceiling. With
    fewer than three turns, or a fit that makes no sense (a cost below zero), the ceiling
    is cores × 1000 ÷ the lowest env_ms, which counts the per-second part against it."""

    env_ms: Spread  # the environment's CPU ms per withdrawal, over every system's turns
    per_withdrawal_ms: float
    per_second_ms: float
    fitted: bool
    rate: float  # final withdrawals/s no system can pass here


def ceilings(results: list[Result]) -> dict[str, Ceiling]:
    """``sync``/``mixed`` → the ceiling the co-located environment puts on every system."""
    budget = (os.cpu_count() or 1) * 1000.0
    out = {}
    for key in ("sync", "mixed"):
        turns = [(1 / r.rate[key], r.env_cpu_ms[key]) for r in results if key in r.env_cpu_ms]
        env = spread([ms for _, ms in turns])
        fit = _line(turns) if len(turns) >= 3 else None
        if fit is not None and fit[0] > 0 and 0 <= fit[1] < budget:
            a, b = fit
            out[key] = Ceiling(env, a, b, True, (budget - b) / a)
        else:
            out[key] = Ceiling(env, env.low, 0.0, False, budget / env.low)
    return out


def _line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = a + b·x: (a, b); None when every x is the same."""
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    b = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    return mean_y - b * mean_x, b


def labels(rounds: list[Round]) -> dict[str, str]:
    rate = os.environ.get("PEERS_RATE", "50")
    sustainable = spread([r.sustainable_rate for r in rounds])
    text = {key: label.format(rate=rate) for key, label, _unit, _ in FIGURES}
    for key in ("p50_sustainable", "p99_sustainable"):
        text[key] = text[key].replace(
            "a sustainable rate", f"a sustainable rate ({sustainable.median:g}/s)"
        )
    return text


def build_report(wanted: list[str], results: list[Result], rounds: list[Round]) -> Report:
    report = Report()
    table = summary(results)
    text = labels(rounds)
    names = [n for n in wanted if n in table]
    for name in names:
        for key, _label, unit, _ in FIGURES:
            s = table[name][key]
            report.add(
                f"{name}_{key}",
                f"{name}: {text[key]} [{s.low:.4g}–{s.high:.4g}]",
                s.median,
                unit,
            )
    baseline = spread([r.baseline_tx_s for r in rounds])
    report.add(
        "baseline_pg_tx_rate",
        f"asyncpg tx/s (4 round-trips, the systems' Postgres) [{baseline.low:.4g}–"
        f"{baseline.high:.4g}]",
        baseline.median,
        "tx/s",
    )
    if "ours" in table:
        for peer in (n for n in names if n != "ours"):
            for key, _label, _unit, _ in FIGURES:
                report.add(
                    f"ours_vs_{peer}_{key}",
                    f"ours ÷ {peer}: {text[key]}",
                    table["ours"][key].median / table[peer][key].median,
                    "x",
                )
        for key in ("rate_sync", "rate_mixed"):
            report.add(
                f"ours_vs_baseline_{key}",
                f"ours ÷ asyncpg baseline: {text[key]} (target ≥ 0.10)",
                table["ours"][key].median / baseline.median,
                "x",
            )
    for scenario, ceiling in ceilings(results).items():
        env = ceiling.env_ms
        report.add(
            f"environment_cpu_{scenario}",
            f"environment (sandbox, its Postgres, load client): CPU ms per withdrawal "
            f"[{scenario}] [{env.low:.4g}–{env.high:.4g}]",
            env.median,
            "ms",
        )
        report.add(
            f"environment_fit_{scenario}",
            f"  of which per withdrawal, and {ceiling.per_second_ms:.0f} ms per second "
            + ("(fitted over the turns)" if ceiling.fitted else "(too few turns to fit)"),
            ceiling.per_withdrawal_ms,
            "ms",
        )
        report.add(
            f"ceiling_{scenario}",
            f"ceiling on these {os.cpu_count()} cores beside it: final withdrawals/s [{scenario}]",
            ceiling.rate,
            "/s",
        )
        report.add(
            f"ceiling_vs_baseline_{scenario}",
            f"ceiling ÷ asyncpg baseline: the most any system can reach here [{scenario}]",
            ceiling.rate / baseline.median,
            "x",
        )
    for r in results:
        report.notes.append(
            f"round {r.round} {r.system} crash check: {'PASS' if r.crash_ok else 'FAIL'} — "
            f"{r.crash}"
        )
    for r in results:
        for scenario, split in r.cpu_split.items():
            parts = ", ".join(f"{k} {v:.2f}" for k, v in split.items())
            report.notes.append(
                f"round {r.round} {r.system} CPU ms per withdrawal [{scenario}]: {parts}"
            )
        for scenario, split in r.env_split.items():
            parts = ", ".join(f"{k} {v:.2f}" for k, v in split.items())
            report.notes.append(
                f"round {r.round} {r.system} turn, the environment's CPU ms per withdrawal "
                f"[{scenario}]: {parts}"
            )
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r.peak_split.items())
        report.notes.append(f"round {r.round} {r.system} memory (PSS MiB) at its peak: {parts}")
    for this in rounds:
        report.notes.append(
            f"round {this.number}: order {', '.join(this.order)}; asyncpg baseline "
            f"{this.baseline_tx_s:,.0f} tx/s; sustainable rate {this.sustainable_rate:g}/s"
        )
    for r in results:
        for phase, (before, after) in r.loads.items():
            report.notes.append(
                f"round {r.round} {r.system} {phase}: load average {load_text(before)} before, "
                f"{load_text(after)} after ({os.cpu_count()} CPUs)"
            )
    report.notes.append(
        f"{len(rounds)} round(s), systems interleaved: a figure is the median over the rounds "
        "[lowest–highest]; every ratio is of medians"
    )
    report.details = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "rounds": [r.__dict__ for r in rounds],
        "results": [r.__dict__ for r in results],
        "settings": {k: v for k, v in os.environ.items() if k.startswith("PEERS_")},
    }
    return report
