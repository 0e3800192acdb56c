"""The three systems under test, each a set of processes behind one HTTP port.

Every system answers ``POST /v1/withdrawals`` (the gateway's public request) and receives the
sandbox's webhooks at ``/webhooks/{provider_id}`` on the same port, so one sandbox process
(``PUBLIC_URL`` fixed to that port) and one load generator serve all three in turn.
:meth:`System.measured` names the process trees whose CPU and memory count as the system's:
its own processes, its database and its broker, never the sandbox or the load client.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.chaos.fleet import FLAGS
from bench.stack import HOST, ROOT, Server, _die_with_parent, create_database
from devstack.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from gateway.migrate import upgrade

API_TOKEN = "dev-token"
CORE_TOKEN = "peers-core"


def _dsn(admin: str, database: str) -> str:
    return admin.rpartition("/")[0] + "/" + database


class System:
    """One system under test; ``port`` is its front door and webhook receiver."""

    name = ""

    def __init__(self, workdir: Path, port: int, sandbox_url: str, providers: Path) -> None:
        # Every turn of the bench starts a fresh instance: its own folder, and (Postgres-backed
        # systems) a database named after the folder, so no turn inherits another's state.
        self.database = workdir.name.replace("-", "_")
        self.workdir = workdir
        self.port = port
        self.sandbox_url = sandbox_url
        self.providers = providers
        self.workers: list[Server] = []
        self.servers: list[Server] = []

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "SANDBOX_URL": self.sandbox_url,
            "CORE_TOKEN": CORE_TOKEN,
            "PROVIDERS_FILE": str(self.providers),
            "LOG_LEVEL": "WARNING",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return env

    def start(self) -> None:
        raise NotImplementedError

    def start_workers(self) -> None:
        raise NotImplementedError

    def measured(self) -> dict[str, int]:
        """Process-tree roots counted as this system's: name → pid."""
        raise NotImplementedError

    def kill_workers(self) -> None:
        """kill -9 every worker process; :meth:`start_workers` brings them back."""
        for worker in self.workers:
            worker.process.send_signal(signal.SIGKILL)
            worker.process.wait()
        self.servers = [s for s in self.servers if s not in self.workers]
        self.workers = []

    def _server(self, name: str, argv: list[str], env: dict[str, str], port: int) -> Server:
        server = Server(name, argv, env, port, self.workdir / f"{name}.log")
        self.servers.append(server)
        return server

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers = []
        self.workers = []


class Ours(System):
    """cascade-gateway serve + worker processes, Postgres and nats-server (as the chaos fleet)."""

    name = "ours"

    def __init__(
        self,
        workdir: Path,
        port: int,
        sandbox_url: str,
        providers: Path,
        postgres: EmbeddedPostgres,
        admin_dsn: str,
    ) -> None:
        super().__init__(workdir, port, sandbox_url, providers)
        self.postgres = postgres
        self.admin_dsn = admin_dsn
        self.nats = EmbeddedNats(workdir / "nats")
        self.database_url = ""
        self.worker_count = int(os.environ.get("PEERS_OURS_WORKERS", "1"))

    def env(self) -> dict[str, str]:
        (self.workdir / "flags.json").write_text(json.dumps(FLAGS))
        return {
            **super().env(),
            "DATABASE_URL": self.database_url,
            "NATS_URL": self.nats.url,
            "NATS_NAMESPACE": "peers.",
            "SANDBOX_ENABLED": "false",
            "CORE_URL": f"{self.sandbox_url}/core",
            "FLAGS_FILE": str(self.workdir / "flags.json"),
            "GATEWAY_API_TOKENS": API_TOKEN,
            "WORKER_CONCURRENCY": os.environ.get("PEERS_OURS_HANDLERS", "32"),
            "WAIT_FOR_SCHEMA_SECONDS": "30",
        }

    def start(self) -> None:
        self.nats.start()
        asyncio.run(create_database(self.admin_dsn, self.database))
        self.database_url = _dsn(self.admin_dsn, self.database)
        upgrade("postgresql+asyncpg://" + self.database_url.split("://", 1)[1])
        gateway = self._server(
            "ours-gateway",
            [sys.executable, "-m", "gateway.cli", "serve"],
            {**self.env(), "HTTP_PORT": str(self.port)},
            self.port,
        )
        gateway.wait_ready("/readyz")
        self.start_workers()

    def start_workers(self) -> None:
        for index in range(self.worker_count):
            port = free_port()
            worker = self._server(
                f"ours-worker-{index}",
                [sys.executable, "-m", "gateway.cli", "worker"],
                {**self.env(), "HTTP_PORT": str(self.port), "WORKER_METRICS_PORT": str(port)},
                port,
            )
            worker.wait_ready("/metrics")
            self.workers.append(worker)

    def measured(self) -> dict[str, int]:
        return {
            "gateway": self.servers[0].process.pid,
            **{w.name: w.process.pid for w in self.workers},
            "postgres": self.postgres.pid,
            "nats-server": self.nats.pid,
        }

    def stop(self) -> None:
        super().stop()
        self.nats.stop()


class Temporal(System):
    """``temporal server start-dev --db-filename`` (durable SQLite), an API process (starts
    workflows, turns webhooks into signals) and a worker process (workflows + activities).

    The dev server keeps its one history shard: ``start-dev`` has no flag for the shard count
    (``persistence.numHistoryShards`` is static configuration, not a dynamic-config key that
    ``--dynamic-config-value`` could set), and its SQLite store takes one writer at a time, so
    more shards would add parallelism in front of a serial store.
    """

    name = "temporal"

    def __init__(self, workdir: Path, port: int, sandbox_url: str, providers: Path) -> None:
        super().__init__(workdir, port, sandbox_url, providers)
        self.frontend = free_port()
        self.server: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {**super().env(), "TEMPORAL_ADDRESS": f"{HOST}:{self.frontend}"}

    def start(self) -> None:
        binary = shutil.which("temporal", path=str(Path(sys.executable).parent)) or "temporal"
        with (self.workdir / "temporal-server.log").open("ab") as log:
            self.server = subprocess.Popen(
                [
                    binary,
                    "server",
                    "start-dev",
                    "--headless",
                    "--ip",
                    HOST,
                    "--port",
                    str(self.frontend),
                    "--http-port",
                    str(free_port()),
                    "--metrics-port",
                    str(free_port()),
                    "--db-filename",
                    str(self.workdir / "temporal.db"),
                    "--log-level",
                    "error",
                    # Equal footing with the bench's Postgres (durable=False: fsync and
                    # synchronous_commit off): WAL journal, no fsync at commit.
                    "--sqlite-pragma",
                    "journal_mode=wal",
                    "--sqlite-pragma",
                    "synchronous=off",
                ],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 — prctl only
            )
        api = self._server(
            "temporal-api",
            [sys.executable, "-m", "bench.peers.temporal_app", "api"],
            {**self.env(), "HTTP_PORT": str(self.port)},
            self.port,
        )
        api.wait_ready("/readyz", timeout=90)  # it connects once the server answers
        self.start_workers()

    def start_workers(self) -> None:
        worker = self._server(
            "temporal-worker",
            [sys.executable, "-m", "bench.peers.temporal_app", "worker"],
            self.env(),
            0,
        )
        self.workers.append(worker)
        time.sleep(2)  # the worker has no port: give it time to poll its task queue
        if worker.process.poll() is not None:
            raise RuntimeError(f"temporal worker exited:\n{worker.log_tail()}")

    def measured(self) -> dict[str, int]:
        assert self.server is not None
        return {
            "api": self.servers[0].process.pid,
            **{w.name: w.process.pid for w in self.workers},
            "temporal-server": self.server.pid,
        }

    def stop(self) -> None:
        super().stop()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.server.kill()


class Dbos(System):
    """DBOS laid out as ours is: an ``api`` process (front door, enqueues, turns webhooks into
    messages) and ``PEERS_OURS_WORKERS`` worker processes dequeuing the ``withdrawals`` queue,
    each with its own executor id; state on the same Postgres as ours."""

    name = "dbos"

    def __init__(
        self,
        workdir: Path,
        port: int,
        sandbox_url: str,
        providers: Path,
        postgres: EmbeddedPostgres,
        admin_dsn: str,
    ) -> None:
        super().__init__(workdir, port, sandbox_url, providers)
        self.postgres = postgres
        self.admin_dsn = admin_dsn
        self.worker_count = int(os.environ.get("PEERS_OURS_WORKERS", "1"))

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "DBOS_DATABASE_URL": _dsn(self.admin_dsn, self.database),
            "DBOS_WORKER_CONCURRENCY": os.environ.get("PEERS_DBOS_WORKER_CONCURRENCY", "100"),
            "DBOS_QUEUE_POLL_SECONDS": os.environ.get("PEERS_DBOS_QUEUE_POLL_SECONDS", "0.1"),
        }

    def start(self) -> None:
        asyncio.run(create_database(self.admin_dsn, self.database))
        api = self._server(
            "dbos-api",
            [sys.executable, "-m", "bench.peers.dbos_app", "api"],
            {**self.env(), "DBOS_EXECUTOR_ID": "dbos-api", "HTTP_PORT": str(self.port)},
            self.port,
        )
        api.wait_ready("/readyz", timeout=90)
        self.start_workers()

    def start_workers(self) -> None:
        # The same executor id after a kill -9: DBOS.launch recovers that executor's workflows.
        for index in range(self.worker_count):
            port = free_port()
            worker = self._server(
                f"dbos-worker-{index}",
                [sys.executable, "-m", "bench.peers.dbos_app", "worker"],
                {**self.env(), "DBOS_EXECUTOR_ID": f"dbos-worker-{index}", "HTTP_PORT": str(port)},
                port,
            )
            worker.wait_ready("/readyz", timeout=90)
            self.workers.append(worker)

    def measured(self) -> dict[str, int]:
        return {
            "dbos-api": self.servers[0].process.pid,
            **{w.name: w.process.pid for w in self.workers},
            "postgres": self.postgres.pid,
        }


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


__all__ = ["API_TOKEN", "CORE_TOKEN", "ROOT", "Dbos", "Ours", "System", "Temporal"]
