"""``python -m bench peers``: ours, Temporal and DBOS on one sandbox, one after the other.

The environment, started once: a Postgres for the sandbox alone, a ``cascade-gateway sandbox``
process on it (cascade-core simulator and the sandbox providers; webhooks to one fixed port),
and a second Postgres that ours and DBOS use in turn (separate databases). Then, per system
(``PEERS_SYSTEMS``, default ``ours,temporal,dbos``): start its processes with that port as its
front door, warm it up, and measure

* saturation: ``PEERS_WITHDRAWALS`` withdrawals created as fast as it takes them on
  ``PEERS_CONCURRENCY`` keep-alive connections (:mod:`bench.load`), on ``[sbx_sync_ok]`` and on
  ``[sbx_decline, sbx_ok]``; final withdrawals/s from the first create to the last final;
* CPU ms per withdrawal of the system's process trees (``/proc/<pid>/stat``, children
  included: Postgres backends) over the saturation runs, and their peak RSS (sampled);
* latency: ``PEERS_LATENCY_WITHDRAWALS`` on ``[sbx_sync_ok]`` offered at ``PEERS_RATE``/s
  (open loop); p50/p99 from each create's send to its final;
* crash: ``PEERS_CRASH_WITHDRAWALS`` on ``[sbx_decline, sbx_ok]`` at ``PEERS_RATE``/s, the
  worker process(es) ``kill -9``-ed when 40 % are sent and started again a second later (the
  load client retries a create refused meanwhile); every withdrawal must reach its final, and
  the sandbox ledger must show exactly one commit per withdrawal, no open freeze, no violation.

"Final" is the same clock for all three: the withdrawal's notification arriving at the
simulated cascade-core (its ``notifications`` table, polled every 20 ms), which every system
sends right after the commit. The sandbox and the load client are excluded from CPU and RSS.
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
    system: str
    rate: dict[str, float] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    cpu_split: dict[str, dict[str, float]] = field(default_factory=dict)
    p50_s: float = 0.0
    p99_s: float = 0.0
    peak_rss_mib: float = 0.0
    peak_split: dict[str, float] = field(default_factory=dict)
    crash: str = ""
    crash_ok: bool = False


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
    started = time.perf_counter()
    load = asyncio.create_task(
        run_load(HOST, system.port, requests, concurrency=concurrency, timeout=FINAL_TIMEOUT)
    )
    last = await finals.wait(ids, sample, started)
    after = cpu_seconds(roots)
    created = await load
    if set(created.statuses) != {201}:
        raise RuntimeError(f"{system.name} {key}: creates answered {dict(created.statuses)}")
    sample()
    result.rate[key] = count / (last - started)
    split = {n: 1000 * (after[n] - before[n]) / count for n in roots}
    result.cpu_split[key] = split
    result.cpu_ms[key] = sum(split.values())


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


async def latency(system: System, finals: Finals, count: int, rate: float, result: Result) -> None:
    ids, sent = await offered(system, finals, SYNC, count, rate)
    durations = [finals.seen[i] - sent[i] for i in ids]
    result.p50_s = _percentile(durations, 0.5)
    result.p99_s = _percentile(durations, 0.99)


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


async def measure(system: System, sandbox_url: str, sandbox_dsn: str) -> Result:
    result = Result(system.name)
    finals = Finals(sandbox_dsn)
    count = _int("PEERS_WITHDRAWALS", 600)
    concurrency = _int("PEERS_CONCURRENCY", 32)
    rate = float(os.environ.get("PEERS_RATE", "50"))
    try:
        warm = Result(system.name)
        await saturate(system, finals, SYNC, _int("PEERS_WARMUP", 150), concurrency, warm, "sync")
        await saturate(system, finals, SYNC, count, concurrency, result, "sync")
        await saturate(system, finals, MIXED, count, concurrency, result, "mixed")
        await latency(system, finals, _int("PEERS_LATENCY_WITHDRAWALS", 250), rate, result)
        await crash(system, finals, sandbox_url, _int("PEERS_CRASH_WITHDRAWALS", 250), rate, result)
    finally:
        await finals.close()
    return result


# --- the run ---------------------------------------------------------------------------------


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"


def run() -> Report:
    ensure_peer_group()
    wanted = os.environ.get("PEERS_SYSTEMS", "ours,temporal,dbos").split(",")
    workdir = Path(tempfile.mkdtemp(prefix="cascade-peers-", dir="/tmp"))
    workdir.chmod(0o755)  # the embedded Postgres runs as nobody when we are root
    env_pg = EmbeddedPostgres(workdir / "sandbox-postgres", durable=False)
    sut_pg = EmbeddedPostgres(workdir / "postgres", durable=False)
    front = free_port()
    sandbox_port = free_port()
    sandbox_url = f"http://{HOST}:{sandbox_port}/sandbox"
    providers = workdir / "providers.json"
    providers.write_text(json.dumps(providers_document()))
    results: list[Result] = []
    loads = [load_note()]
    sandbox: Server | None = None
    try:
        admin = env_pg.start()
        asyncio.run(create_database(admin, "sandbox"))
        sandbox_dsn = admin.rpartition("/")[0] + "/sandbox"
        sandbox = Server(
            "sandbox",
            [sys.executable, "-m", "gateway.cli", "sandbox"],
            {
                **os.environ,
                "DATABASE_URL": sandbox_dsn,
                "SANDBOX_PORT": str(sandbox_port),
                "PUBLIC_URL": f"http://{HOST}:{front}",
                "PROVIDERS_FILE": str(providers),
                "SANDBOX_URL": sandbox_url,
                "CORE_TOKEN": CORE_TOKEN,
                "SANDBOX_WEBHOOK_DELAY_SECONDS": "0.3",
                "SANDBOX_FAIL_DELAY_SECONDS": "0.3",
                "LOG_LEVEL": "WARNING",
            },
            sandbox_port,
            workdir / "sandbox.log",
        )
        sandbox.wait_ready("/sandbox")
        sut_admin = sut_pg.start()
        for name in wanted:
            folder = workdir / name
            folder.mkdir()
            folder.chmod(0o755)
            system: System
            if name == "ours":
                system = Ours(folder, front, sandbox_url, providers, sut_pg, sut_admin)
            elif name == "temporal":
                system = Temporal(folder, front, sandbox_url, providers)
            elif name == "dbos":
                system = Dbos(folder, front, sandbox_url, providers, sut_pg, sut_admin)
            else:
                raise ValueError(f"unknown system {name!r} in PEERS_SYSTEMS")
            print(f"  {name}: starting", flush=True)
            try:
                system.start()
                print(f"  {name}: measuring", flush=True)
                results.append(asyncio.run(measure(system, sandbox_url, sandbox_dsn)))
            except Exception as exc:
                tails = "\n".join(f"--- {s.name}\n{s.log_tail(20)}" for s in system.servers)
                raise RuntimeError(f"{name} failed: {exc}\n{tails}") from exc
            finally:
                system.stop()
            loads.append(load_note())
            print(f"  {name}: done ({loads[-1]})", flush=True)
    finally:
        if sandbox is not None:
            sandbox.stop()
        for pg in (sut_pg, env_pg):
            with contextlib.suppress(Exception):  # best effort at the end
                pg.stop()
        if os.environ.get("PEERS_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(results, loads)
    from bench.peers.document import write  # noqa: PLC0415

    write(report, results, loads, DOC, CHART)
    return report


FIGURES = (
    # key, label, unit, higher is better
    ("rate_sync", "final withdrawals/s at saturation [sbx_sync_ok]", "/s", True),
    ("rate_mixed", "final withdrawals/s at saturation [sbx_decline, sbx_ok]", "/s", True),
    ("p50", "time to final p50 at {rate}/s [sbx_sync_ok]", "ms", False),
    ("p99", "time to final p99 at {rate}/s [sbx_sync_ok]", "ms", False),
    ("cpu_sync", "CPU ms per withdrawal [sbx_sync_ok]", "ms", False),
    ("cpu_mixed", "CPU ms per withdrawal [sbx_decline, sbx_ok]", "ms", False),
    ("rss", "peak memory of the system (PSS)", "MiB", False),
)


def values(r: Result) -> dict[str, float]:
    return {
        "rate_sync": r.rate["sync"],
        "rate_mixed": r.rate["mixed"],
        "p50": r.p50_s * 1000,
        "p99": r.p99_s * 1000,
        "cpu_sync": r.cpu_ms["sync"],
        "cpu_mixed": r.cpu_ms["mixed"],
        "rss": r.peak_rss_mib,
    }


def build_report(results: list[Result], loads: list[str]) -> Report:
    rate = os.environ.get("PEERS_RATE", "50")
    report = Report()
    by_name = {r.system: values(r) for r in results}
    for r in results:
        for key, label, unit, _ in FIGURES:
            report.add(
                f"{r.system}_{key}",
                f"{r.system}: {label.format(rate=rate)}",
                by_name[r.system][key],
                unit,
            )
        report.notes.append(
            f"{r.system} crash check: {'PASS' if r.crash_ok else 'FAIL'} — {r.crash}"
        )
        for scenario, split in r.cpu_split.items():
            parts = ", ".join(f"{k} {v:.2f}" for k, v in split.items())
            report.notes.append(f"{r.system} CPU ms per withdrawal [{scenario}]: {parts}")
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r.peak_split.items())
        report.notes.append(f"{r.system} memory (PSS MiB) at its peak: {parts}")
    if "ours" in by_name:
        for peer in (r.system for r in results if r.system != "ours"):
            for key, label, _unit, _ in FIGURES:
                report.add(
                    f"ours_vs_{peer}_{key}",
                    f"ours ÷ {peer}: {label.format(rate=rate)}",
                    by_name["ours"][key] / by_name[peer][key],
                    "x",
                )
    report.notes.extend(f"machine: {n}" for n in loads)
    report.notes.append(
        "a shared 2-core machine: figures are noisy, read them against each other, not alone"
    )
    report.details = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "results": [r.__dict__ for r in results],
        "settings": {k: v for k, v in os.environ.items() if k.startswith("PEERS_")},
    }
    return report
