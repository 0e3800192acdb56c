"""The chaos campaign's processes: Postgres, nats-server, the sandbox, gateways and workers.

Every part is a real process the campaign can kill: the embedded Postgres and nats-server of
``devstack.embedded`` and ``cascade-gateway`` commands (``sandbox``, ``serve``, and ``worker``
under :mod:`bench.chaos.twice`). All bind 127.0.0.1 on free ports under one work directory;
every child gets SIGTERM should this process die.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.stack import HOST, ROOT, Server, _die_with_parent, create_database
from devstack.embedded import EmbeddedNats, EmbeddedNatsCluster, EmbeddedPostgres, free_port
from gateway.migrate import upgrade

NAMESPACE = "chaos."
API_TOKEN = "chaos-token"
OPS_TOKEN = "chaos-ops"
CORE_TOKEN = "chaos-core"
# A flags file that routes every merchant to the cascade: the campaign tests the cascade.
FLAGS = {
    "version": 1,
    "features": [
        {
            "name": "withdrawals.cascade",
            "type": "release",
            "enabled": True,
            "stale": False,
            "impressionData": False,
            "strategies": [{"name": "default", "parameters": {}, "constraints": []}],
            "variants": [],
        }
    ],
    "segments": [],
}


def providers_document() -> dict[str, Any]:
    """The sandbox's providers with the waits shortened, so a run settles in minutes: a
    webhook SLA of 3 s, status polls a second apart until 3 s past it, 1 s read timeouts."""
    document: dict[str, Any] = json.loads((ROOT / "config" / "providers.sandbox.json").read_text())
    for provider in document["providers"].values():
        provider["webhook_sla_seconds"] = 3
        provider["status_polling"] = {"interval_seconds": 1, "max_polls": 3, "timeout_seconds": 3}
        provider["timeouts"] = {"connect_seconds": 1, "read_seconds": 1}
    return document


class Fleet:
    """One stack of processes under ``workdir``; :meth:`close` stops what is left."""

    def __init__(
        self,
        workdir: Path,
        *,
        gateways: int,
        workers: int,
        nats_nodes: int,
        seed: int,
        providers: dict[str, Any] | None = None,
        twice: bool = True,
    ) -> None:
        """``providers``: the providers file (default: :func:`providers_document`);
        ``twice``: workers see every message twice (:mod:`bench.chaos.twice`)."""
        self.workdir = workdir
        self.providers = providers or providers_document()
        self.twice = twice
        self.rng = random.Random(f"{seed}:fleet")
        # Durable: with fsync and synchronous_commit off, an immediate stop loses commits the
        # gateway has already answered for, which a production Postgres never does.
        self.postgres = EmbeddedPostgres(workdir / "postgres")
        # One server, or a cluster whose streams keep a replica on every server.
        self.nats = (
            EmbeddedNatsCluster(workdir / "nats", nats_nodes)
            if nats_nodes > 1
            else EmbeddedNats(workdir / "nats")
        )
        self.replicas = nats_nodes
        self._next_node = 0
        self.database_url = ""
        self.sandbox: Server | None = None
        self.gateways: list[Server | None] = [None] * gateways
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * workers
        self._gateway_ports = [free_port() for _ in range(gateways)]
        self._sandbox_port = free_port()
        self.worker_kills = 0
        self.exits: list[tuple[int, str]] = []
        """Processes that exited by themselves, with their status. Status 2 is a start that
        found a dependency down and said so in one line: a supervisor (Kubernetes) starts it
        again, and so does :meth:`kill_a_worker`. Any other status is a crash."""

    # --- start -------------------------------------------------------------------------------

    def start(self) -> None:
        self.nats.start()
        admin = self.postgres.start()
        asyncio.run(create_database(admin, "chaos"))
        self.database_url = admin.rpartition("/")[0] + "/chaos"
        upgrade("postgresql+asyncpg://" + self.database_url.split("://", 1)[1])
        (self.workdir / "flags.json").write_text(json.dumps(FLAGS))
        (self.workdir / "providers.json").write_text(json.dumps(self.providers))
        self.sandbox = self._start_sandbox()
        for index in range(len(self.gateways)):
            self.start_gateway(index)
        for index in range(len(self.workers)):
            self.start_worker(index)

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://{HOST}:{port}" for port in self._gateway_ports]

    @property
    def sandbox_url(self) -> str:
        return f"http://{HOST}:{self._sandbox_port}/sandbox"

    def environment(self) -> dict[str, str]:
        """What every ``cascade-gateway`` process of the fleet reads."""
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "NATS_URL": self.nats.url,
            "NATS_NAMESPACE": NAMESPACE,
            "SANDBOX_ENABLED": "false",
            "SANDBOX_URL": self.sandbox_url,
            "CORE_URL": f"{self.sandbox_url}/core",
            "CORE_TOKEN": CORE_TOKEN,
            "FLAGS_FILE": str(self.workdir / "flags.json"),
            "PROVIDERS_FILE": str(self.workdir / "providers.json"),
            "GATEWAY_API_TOKENS": API_TOKEN,
            "OPS_API_TOKENS": OPS_TOKEN,
            "JETSTREAM_ACK_WAIT_SECONDS": "3",
            "JETSTREAM_REPLICAS": str(self.replicas),
            "WAIT_FOR_SCHEMA_SECONDS": "30",
            "LOG_LEVEL": "WARNING",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return env

    def _start_sandbox(self) -> Server:
        env = {
            **self.environment(),
            "SANDBOX_PORT": str(self._sandbox_port),
            # Webhooks go to the first gateway; while it is down the sandbox retries, then
            # gives up, and status polling finds the outcome, as with a real provider.
            "PUBLIC_URL": self.gateway_urls[0],
            "SANDBOX_WEBHOOK_DELAY_SECONDS": "0.3",
            "SANDBOX_FAIL_DELAY_SECONDS": "0.3",
            "SANDBOX_FLAKY_TIMEOUT_SECONDS": "1.5",
            "SANDBOX_FLAKY_SUCCESS_DELAY_SECONDS": "0.5",
        }
        server = Server(
            "sandbox",
            [sys.executable, "-m", "gateway.cli", "sandbox"],
            env,
            self._sandbox_port,
            self.workdir / "sandbox.log",
        )
        server.wait_ready("/sandbox")
        return server

    def start_gateway(self, index: int) -> None:
        port = self._gateway_ports[index]
        env = {**self.environment(), "HTTP_PORT": str(port)}
        server = Server(
            f"gateway-{index}",
            [sys.executable, "-m", "gateway.cli", "serve"],
            env,
            port,
            self.workdir / f"gateway-{index}.log",
        )
        self.gateways[index] = server
        server.wait_ready("/readyz")

    def start_worker(self, index: int) -> None:
        log = self.workdir / f"worker-{index}.log"
        with log.open("ab") as out:
            self.workers[index] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.chaos.twice" if self.twice else "gateway.cli",
                    "worker",
                ],
                env=self.environment(),
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 — prctl only
            )

    # --- faults ------------------------------------------------------------------------------

    def kill_a_worker(self) -> None:
        """SIGKILL one worker at random and start its replacement at once."""
        index = self.rng.randrange(len(self.workers))
        worker = self.workers[index]
        if worker is not None and worker.poll() is not None:
            self._exited(f"worker {index}", worker.returncode)
        elif worker is not None:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            self.worker_kills += 1
        self.start_worker(index)

    def kill_gateway(self, index: int, down_seconds: float = 1.0) -> None:
        """SIGKILL one gateway; a second later start it again on the same port."""
        gateway = self.gateways[index]
        assert gateway is not None
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait()
        time.sleep(down_seconds)
        self.start_gateway(index)

    def kill_nats(self, *, wipe_store: bool, down_seconds: float = 1.0) -> str:
        """kill -9 nats-server (and, with ``wipe_store``, lose its disk); start it again.
        On a cluster: one server at a time, in turn. Returns which server it was."""
        if isinstance(self.nats, EmbeddedNatsCluster):
            server = self.nats.servers[self._next_node % len(self.nats.servers)]
            self._next_node += 1
        else:
            server = self.nats
        server.kill()
        if wipe_store:
            server.delete_store()
        time.sleep(down_seconds)
        server.start()
        return server.data_dir.name

    def stop_postgres_immediately(self, down_seconds: float = 2.0) -> None:
        """Postgres's immediate shutdown (SIGQUIT: no checkpoint, crash recovery at start)."""
        self.postgres.stop_immediately()
        time.sleep(down_seconds)
        self.postgres.start()

    # --- stop --------------------------------------------------------------------------------

    def check_alive(self) -> None:
        """Record every worker and gateway that is not running (they all should be)."""
        for index, worker in enumerate(self.workers):
            if worker is not None and worker.poll() is not None:
                self._exited(f"worker {index}", worker.returncode)
        for server in [self.sandbox, *self.gateways]:
            if server is not None and server.process.poll() is not None:
                self._exited(server.name, server.process.returncode)

    def _exited(self, name: str, status: int) -> None:
        log = self.workdir / f"{name.replace(' ', '-')}.log"
        last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        self.exits.append((status, f"{name} exited by itself (status {status}): {last[-1:]}"))

    def logs_tail(self) -> str:
        servers = [s for s in [self.sandbox, *self.gateways] if s is not None]
        return "\n".join(f"--- {s.name}\n{s.log_tail(15)}" for s in servers)

    def close(self) -> None:
        for worker in self.workers:
            if worker is not None and worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()
        for server in [*self.gateways, self.sandbox]:
            if server is not None:
                server.stop()
        self.postgres.stop()
        self.nats.stop()
