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
from pathlib import Path

from devstack.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedServiceError
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
    if not port_free(settings.http_host, settings.http_port):
        return _fail(f"HTTP_PORT {settings.http_port} on {settings.http_host} is already in use")

    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    nats: EmbeddedNats | None = None
    postgres: EmbeddedPostgres | None = None
    children: list[subprocess.Popen[bytes]] = []
    try:
        started = time.monotonic()
        if not env.get("NATS_URL"):
            nats = EmbeddedNats(data_dir / "nats")
            env["NATS_URL"] = nats.start()
        if not env.get("DATABASE_URL"):
            postgres = EmbeddedPostgres(data_dir / "postgres")
            env["DATABASE_URL"] = postgres.start()
        metrics_dir = data_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        # Migrations run while the gateway and worker import and connect: they wait for the
        # schema (WAIT_FOR_SCHEMA_SECONDS) instead of starting after it. Saves seconds.
        env["WAIT_FOR_SCHEMA_SECONDS"] = "60"
        migrate = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "migrate"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 — no threads yet; prctl only
        )
        for role in ("serve", "worker"):
            children.append(
                subprocess.Popen(  # noqa: S603
                    [sys.executable, "-m", "gateway.cli", role],
                    env=env,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 — no threads yet; prctl only
                )
            )
        _, migrate_errors = migrate.communicate()
        if migrate.returncode != 0:
            lines = [line for line in migrate_errors.splitlines() if line.startswith("cascade")]
            return _fail(lines[-1] if lines else "migrations failed")
        url = f"http://127.0.0.1:{settings.http_port}"
        if not _wait_healthy(url, children, lambda: stopping):
            if not stopping:
                return _fail("the gateway did not become healthy; see the log lines above")
            return 0
        _say(f"ready in {time.monotonic() - started:.1f}s")
        _say(
            f"gateway      {url}  (API tokens: {env.get('GATEWAY_API_TOKENS', 'dev-token')},"
            f" ops tokens: {env.get('OPS_API_TOKENS', 'ops-token')})"
        )
        _say(f"sandbox      {url}/sandbox  (ledger: {url}/sandbox/core/ledger)")
        _say(f"metrics      {url}/metrics")
        _say(f"nats         {env['NATS_URL']}" + (" (embedded)" if nats else ""))
        _say(f"postgres     {env['DATABASE_URL']}" + (" (embedded)" if postgres else ""))
        _say(f"data         {data_dir}")
        _say("press Ctrl-C to stop")
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    return _fail(
                        f"a child process exited with status {child.returncode}; stopping the stack"
                    )
            time.sleep(0.2)
    except EmbeddedServiceError as exc:
        return _fail(str(exc))
    finally:
        _stop_children(children)
        if postgres is not None:
            postgres.stop()
        if nats is not None:
            nats.stop()
        if stopping:
            _say("stopped")
    return 0


def _wait_healthy(url: str, children: list[subprocess.Popen[bytes]], stopping: object) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if callable(stopping) and stopping():
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
