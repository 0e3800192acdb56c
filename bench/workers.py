"""The orchestrator side of a bench stack: worker processes, config files, CPU accounting.

Shared by the cascade, memory and timer benchmarks. Workers are ``cascade-gateway worker``
child processes (``python -m gateway.cli worker``), as in production; each one serves its
Prometheus port (``WORKER_METRICS_PORT``), which doubles as the readiness probe.
``BENCH_PROFILE=worker`` (or ``gateway``, or ``all``) runs them under ``cProfile`` with a CPU
clock (``bench/cpuprofile.py``) and keeps the stats in ``bench/results/<benchmark>-<process>.prof``.
"""

from __future__ import annotations

import json
import os
import pstats
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats

from bench.stack import HOST, NAMESPACE, ROOT, BenchStack, Server
from devstack.embedded import free_port
from orchestrator import bus

RESULTS = ROOT / "bench" / "results"
SANDBOX_PROVIDERS = ROOT / "config" / "providers.sandbox.json"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def flags_everyone(path: Path) -> Path:
    """An offline flags file whose toggle sends every merchant to the cascade."""
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "features": [
                    {
                        "name": "withdrawals.cascade",
                        "enabled": True,
                        "strategies": [
                            {
                                "name": "flexibleRollout",
                                "parameters": {
                                    "rollout": "100",
                                    "stickiness": "merchantId",
                                    "groupId": "withdrawals.cascade",
                                },
                                "constraints": [],
                            }
                        ],
                    }
                ],
                "segments": [],
            }
        )
    )
    return path


def providers_file(path: Path, overrides: Mapping[str, Mapping[str, Any]]) -> Path:
    """The sandbox providers file with some providers' settings replaced (``None`` removes)."""
    doc = json.loads(SANDBOX_PROVIDERS.read_text())
    for provider_id, changes in overrides.items():
        config = doc["providers"][provider_id]
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
    path.write_text(json.dumps(doc, indent=2))
    return path


def profiled(role: str) -> bool:
    wanted = os.environ.get("BENCH_PROFILE", "")
    return wanted in (role, "all")


def process_argv(role: str, profile: Path | None) -> list[str]:
    """``python -m gateway.cli ROLE``, under cProfile (CPU clock) when ``profile`` is given."""
    if profile is None:
        return [sys.executable, "-m", "gateway.cli", role]
    return [sys.executable, "-m", "bench.cpuprofile", str(profile), "gateway.cli", role]


def orchestrator_env(
    stack: BenchStack, gateway_port: int, extra: Mapping[str, str]
) -> dict[str, str]:
    """What a worker needs: the stack, the gateway's sandbox (cascade-core and providers)."""
    env = {
        **os.environ,
        "DATABASE_URL": stack.database_url,
        "NATS_URL": stack.nats_url,
        "NATS_NAMESPACE": NAMESPACE,
        # The worker reaches the sandbox core and providers through the gateway's port.
        "HTTP_PORT": str(gateway_port),
        "SANDBOX_ENABLED": "true",
        "LOG_LEVEL": "WARNING",
        **extra,
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def start_worker(
    stack: BenchStack,
    *,
    gateway_port: int,
    extra_env: Mapping[str, str],
    name: str,
    profile: Path | None = None,
) -> Server:
    """Start one ``cascade-gateway worker`` and wait until its metrics port answers."""
    port = free_port()
    env = orchestrator_env(stack, gateway_port, {**extra_env, "WORKER_METRICS_PORT": str(port)})
    server = Server(name, process_argv("worker", profile), env, port, stack.workdir / f"{name}.log")
    stack.servers.append(server)
    server.wait_ready("/metrics")
    return server


def stop_process(server: Server) -> None:
    """Stop a process so that a cProfile dump gets written.

    ``cascade-gateway serve`` re-raises SIGTERM after uvicorn's graceful shutdown (uvicorn's
    signal capture), which kills the interpreter before cProfile writes; SIGINT ends in a
    KeyboardInterrupt the CLI absorbs. Workers handle SIGTERM themselves.
    """
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.stop()


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime, stime are fields 14 and 15 of stat; index 11 and 12 after the command name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _write_syscalls(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("syscw:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


@dataclass
class CpuMeter:
    """CPU seconds per process group between :meth:`start` and :meth:`stop`.

    Groups: the gateway, each worker, Postgres (postmaster and its backends), nats-server and
    this process (the load client). On a 2-core machine the sum over wall time says how
    saturated it was, and the split says who spent the time.
    """

    groups: dict[str, list[int]]
    include_children: frozenset[str] = frozenset({"postgres"})
    _before: dict[str, float] | None = None
    _started: float = 0.0

    def _sample(self) -> dict[str, float]:
        sample = {}
        for name, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                total += _cpu_seconds(pid)
                if name in self.include_children:
                    total += sum(_cpu_seconds(child) for child in _children(pid))
            sample[name] = total
        sample["bench client"] = time.process_time()
        return sample

    def writes(self) -> dict[str, float]:
        """``write`` syscalls so far per group (``/proc/<pid>/io``): each one a message (an
        HTTP request or answer, a NATS frame, a Postgres query) sent to another process. Only
        for the Python processes and nats-server: Postgres answers with ``send``, not counted."""
        return {
            f"writes_{name}": float(sum(_write_syscalls(pid) for pid in pids))
            for name, pids in self.groups.items()
            if name != "postgres"
        }

    def start(self) -> None:
        self._before = self._sample()
        self._started = time.perf_counter()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group since start, plus ``wall`` seconds."""
        assert self._before is not None
        after = self._sample()
        used = {name: round(after[name] - self._before[name], 3) for name in after}
        used["wall"] = round(time.perf_counter() - self._started, 3)
        return used


async def work_counters(conn: asyncpg.Connection, nats_url: str) -> dict[str, float]:
    """Database-wide Postgres counters and the JetStream message count, for per-withdrawal work."""
    row = await conn.fetchrow(
        "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted,"
        " tup_updated, tup_deleted FROM pg_stat_database WHERE datname = current_database()"
    )
    if row is None:
        raise RuntimeError("pg_stat_database has no row for the current database")
    counters = {f"pg_{k}": float(v) for k, v in row.items()}
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(bus.Names(NAMESPACE).stream)
        counters["jetstream_messages"] = float(info.state.last_seq)
    finally:
        await nc.close()
    return counters


def profile_path(benchmark: str, process: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    return RESULTS / f"{benchmark}-{process}.prof"


_PACKAGES = (
    # (label, path fragments) — first match wins; own time of each function is summed.
    ("HTTP client (httpx/httpcore/anyio/h11)", ("/httpx/", "/httpcore/", "/anyio/", "/h11/")),
    ("HTTP server (litestar/uvicorn)", ("/litestar/", "/uvicorn/", "/httptools/")),
    ("Postgres client (asyncpg)", ("/asyncpg/",)),
    ("NATS client (nats-py)", ("/nats/",)),
    ("metrics (prometheus_client)", ("/prometheus_client/",)),
    ("logging", ("/logging/", "gateway/logs.py")),
    ("flags (Unleash)", ("/UnleashClient/", "/yggdrasil", "flags/")),
    ("orchestrator (engine, store, domain...)", ("orchestrator/",)),
    ("gateway (api, webhooks...)", ("gateway/",)),
    ("sandbox (core ledger, providers)", ("sandbox/",)),
    ("contracts (codecs)", ("contracts/",)),
    ("asyncio / event loop", ("/asyncio/", "uvloop")),
)


def _package(file: str) -> str:
    for label, fragments in _PACKAGES:
        if any(f in file for f in fragments):
            return label
    if file == "~":
        return "builtins / C extensions called directly"
    return "other Python"


def profile_summary(path: Path, limit: int = 15) -> list[str]:
    """A cProfile dump summarised: own time by package, then the top functions."""
    if not path.exists():
        return [f"{path.name}: no profile written (process did not exit cleanly)"]
    stats = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values()) or 1.0
    by_package: dict[str, float] = {}
    rows = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in raw.items():
        by_package[_package(file)] = by_package.get(_package(file), 0.0) + tt
        rows.append((tt, ct, nc, file, line, name))
    lines = [f"{path.name}: {total:.1f} CPU s profiled (main thread), own time by package:"]
    for label, seconds in sorted(by_package.items(), key=lambda kv: -kv[1]):
        if seconds / total >= 0.01:
            lines.append(f"  {100 * seconds / total:5.1f} %  {label}")
    rows.sort(reverse=True)
    lines.append(f"{path.name}: top {limit} functions by own time (own s, cumulative s, calls)")
    for tt, ct, nc, file, line, name in rows[:limit]:
        short = file.replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "")
        lines.append(f"  {tt:7.2f} {ct:7.2f} {nc:8d}  {name}  {short}:{line}")
    return lines


def gateway_url(server: Server) -> str:
    return f"http://{HOST}:{server.port}"
