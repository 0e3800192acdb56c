"""Servers for benchmarks: embedded NATS + Postgres, the gateway and a bare Litestar app.

Everything binds to 127.0.0.1 on free ports, lives in a temporary directory and is stopped by
:meth:`BenchStack.close` (every child also gets SIGTERM should this process die).
Servers run as child processes, as in production (``cascade-gateway serve``: uvloop +
httptools), so the load generator in this process does not share their event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg

from devstack.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from gateway.migrate import upgrade

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
NAMESPACE = "bench."


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """One HTTP server child process, with its log kept for when it fails."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path):
        self.name = name
        self.port = port
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                argv,
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 — no threads yet; prctl only
            )

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{HOST}:{self.port}{path}"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class BenchStack:
    """Temporary NATS + Postgres, started once per benchmark that needs them."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="cascade-bench-", dir="/tmp"))
        self.workdir.chmod(0o755)  # the embedded Postgres runs as nobody when we are root
        self.nats = EmbeddedNats(self.workdir / "nats")
        self.postgres = EmbeddedPostgres(self.workdir / "postgres", durable=False)
        self.servers: list[Server] = []
        self.nats_url = ""
        self.database_url = ""

    def start(self) -> None:
        self.nats_url = self.nats.start()
        admin = self.postgres.start()
        asyncio.run(create_database(admin, "bench"))
        self.database_url = admin.rpartition("/")[0] + "/bench"
        upgrade("postgresql+asyncpg://" + self.database_url.split("://", 1)[1])

    def gateway(self, extra_env: dict[str, str] | None = None) -> Server:
        """``cascade-gateway serve`` with the sandbox enabled (its provider secrets)."""
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "NATS_URL": self.nats_url,
            "NATS_NAMESPACE": NAMESPACE,
            "HTTP_PORT": str(port),
            "SANDBOX_ENABLED": "true",
            "LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        server = Server(
            "gateway",
            [sys.executable, "-m", "gateway.cli", "serve"],
            env,
            port,
            self.workdir / "gateway.log",
        )
        self.servers.append(server)
        server.wait_ready("/readyz")
        return server

    def bare_litestar(self) -> Server:
        """The baseline: a trivial Litestar JSON POST under uvicorn with uvloop + httptools."""
        port = free_port()
        server = Server(
            "bare-litestar",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.bare_app:app",
                "--host",
                HOST,
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            dict(os.environ),
            port,
            self.workdir / "bare.log",
        )
        self.servers.append(server)
        server.wait_ready("/healthz")
        return server

    def close(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        with contextlib.suppress(Exception):
            self.postgres.stop()
        with contextlib.suppress(Exception):
            self.nats.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


async def create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
