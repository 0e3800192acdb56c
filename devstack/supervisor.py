"""``make run``: the whole stack on embedded defaults, stopped cleanly by Ctrl-C or SIGTERM.

Starts nats-server (unless ``NATS_URL``) and Postgres (unless ``DATABASE_URL``) with their data
under ``.data/`` (``DATA_DIR``), applies migrations, then runs ``cascade-gateway serve`` and
``cascade-gateway worker`` as child processes with the sandbox enabled. Every child gets a
parent-death signal, so even a SIGKILL of this supervisor leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devstack.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServiceError,
    already_running_message,
    running_postmaster,
)
from gateway import stackfile
from gateway.listen import port_free
from gateway.settings import REPO_ROOT, SettingsError, load_settings

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _say(message: str) -> None:
    print(f"[cascade-gateway] {message}", flush=True)  # noqa: T201


def _fail(message: str) -> int:
    print(f"cascade-gateway: {message}", file=sys.stderr, flush=True)  # noqa: T201
    return 2


def run_dev() -> int:
    """Supervise the dev stack until interrupted; returns the exit status."""
    env = dict(os.environ)
    env.setdefault("SANDBOX_ENABLED", "true")
    data_dir = Path(env.get("DATA_DIR") or REPO_ROOT / ".data")
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        settings = load_settings(env)
    except SettingsError as exc:
        return _fail(str(exc))
    if not env.get("DATABASE_URL"):
        # Before the port check: a second `make run` on this folder is the likelier story.
        holder = running_postmaster(data_dir / "postgres" / "pgdata")
        if holder is not None:
            return _fail(already_running_message(data_dir, *holder))
    if not port_free(settings.http_host, settings.http_port):
        return _fail(f"HTTP_PORT {settings.http_port} on {settings.http_host} is already in use")

    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    stack = _Stack(env, data_dir)
    try:
        return stack.run(settings.http_port, lambda: stopping)
    except EmbeddedServiceError as exc:
        return _fail(str(exc))
    finally:
        stack.stop()
        if stopping:
            _say("stopped")


class _Stack:
    """The processes of one dev stack: the embedded servers it had to start, migrations, the
    gateway and the worker."""

    def __init__(self, env: dict[str, str], data_dir: Path) -> None:
        self.env = env
        self.data_dir = data_dir
        self.nats: EmbeddedNats | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.children: list[subprocess.Popen[bytes]] = []

    def run(self, http_port: int, stopping: Callable[[], bool]) -> int:
        started = time.monotonic()
        self._start_servers()
        migrate = self._spawn("migrate")
        self.children = [self._spawn(role) for role in ("serve", "worker")]
        _, migrate_errors = migrate.communicate()
        if migrate.returncode != 0:
            lines = [line for line in migrate_errors.splitlines() if line.startswith("cascade")]
            return _fail(lines[-1] if lines else "migrations failed")
        url = f"http://127.0.0.1:{http_port}"
        if not _wait_healthy(url, self.children, stopping):
            if not stopping():
                return _fail("the gateway did not become healthy; see the log lines above")
            return 0
        self._announce(url, time.monotonic() - started)
        stackfile.write(self.data_dir, {**self.env, "GATEWAY_URL": url})
        while not stopping():
            for child in self.children:
                if child.poll() is not None:
                    return _fail(
                        f"a child process exited with status {child.returncode}; stopping the stack"
                    )
            time.sleep(0.2)
        return 0

    def _start_servers(self) -> None:
        """nats-server and Postgres unless NATS_URL and DATABASE_URL name running ones."""
        env = self.env
        if not env.get("NATS_URL"):
            self.nats = EmbeddedNats(self.data_dir / "nats")
            env["NATS_URL"] = self.nats.start()
        if not env.get("DATABASE_URL"):
            self.postgres = EmbeddedPostgres(self.data_dir / "postgres")
            env["DATABASE_URL"] = self.postgres.start()
        metrics_dir = self.data_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        # Migrations run while the gateway and worker import and connect: they wait for the
        # schema (WAIT_FOR_SCHEMA_SECONDS) instead of starting after it. Saves seconds.
        env["WAIT_FOR_SCHEMA_SECONDS"] = "60"

    def _spawn(self, role: str) -> subprocess.Popen[Any]:
        """``cascade-gateway ROLE``; migrate's errors are read back, the others log through."""
        quiet = role == "migrate"
        return subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "gateway.cli", role],
            env=self.env,
            stdout=subprocess.DEVNULL if quiet else None,
            stderr=subprocess.PIPE if quiet else None,
            text=quiet,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 — no threads yet; prctl only
        )

    def _announce(self, url: str, seconds: float) -> None:
        env = self.env
        _say(f"ready in {seconds:.1f}s")
        _say(
            f"gateway      {url}  (API tokens: {env.get('GATEWAY_API_TOKENS', 'dev-token')},"
            f" ops tokens: {env.get('OPS_API_TOKENS', 'ops-token')})"
        )
        _say(f"sandbox      {url}/sandbox  (ledger: {url}/sandbox/core/ledger)")
        _say(f"metrics      {url}/metrics")
        _say(f"nats         {env['NATS_URL']}" + (" (embedded)" if self.nats else ""))
        _say(f"postgres     {env['DATABASE_URL']}" + (" (embedded)" if self.postgres else ""))
        _say(f"data         {self.data_dir}")
        _say("press Ctrl-C to stop")

    def stop(self) -> None:
        stackfile.remove(self.data_dir)
        _stop_children(self.children)
        if self.postgres is not None:
            self.postgres.stop()
        if self.nats is not None:
            self.nats.stop()


def _wait_healthy(
    url: str, children: list[subprocess.Popen[bytes]], stopping: Callable[[], bool]
) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if stopping():
            return False
        if any(child.poll() is not None for child in children):
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
