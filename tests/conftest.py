"""Session fixtures: a real nats-server and a real Postgres, started once by the suite.

Isolation between tests: every stack gets its own database (cloned from a migrated template)
and its own NATS namespace (stream names and subjects), and every test uses random ids.
``DATABASE_URL`` in the environment points the suite at an existing Postgres (it must allow
CREATE DATABASE); otherwise an embedded one is started. NATS is always our own nats-server:
the machine's may be too old for message schedules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

from devstack.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from gateway.app import create_app
from gateway.migrate import upgrade
from gateway.runtime import Runtime, open_runtime
from gateway.serving import server_config
from gateway.settings import Settings, load_settings
from orchestrator.worker import Worker
from sandbox.routes import Sandbox
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
# The frozen legacy API contract and its recorded exchanges: part of the repository.
LEGACY_API = ROOT / "docs" / "legacy-api"
API_TOKEN = "cascade-core-token"


@dataclass(frozen=True)
class Services:
    nats_url: str
    admin_dsn: str
    template: str
    workdir: Path
    nats: EmbeddedNats

    def dsn(self, database: str) -> str:
        base, _, _ = self.admin_dsn.rpartition("/")
        return f"{base}/{database}"


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    workdir = Path(tempfile.mkdtemp(prefix="cascade-tests-", dir="/tmp"))
    workdir.chmod(0o755)  # the embedded Postgres runs as nobody when we are root
    nats = EmbeddedNats(workdir / "nats")
    postgres: EmbeddedPostgres | None = None
    try:
        nats_url = nats.start()
        admin_dsn = os.environ.get("DATABASE_URL", "")
        if not admin_dsn:
            postgres = EmbeddedPostgres(workdir / "postgres", durable=False)
            admin_dsn = postgres.start()
        template = f"cg_template_{secrets.token_hex(4)}"
        asyncio.run(create_database(admin_dsn, template))
        base, _, _ = admin_dsn.rpartition("/")
        upgrade("postgresql+asyncpg://" + f"{base}/{template}".split("://", 1)[1])
        yield Services(
            nats_url=nats_url, admin_dsn=admin_dsn, template=template, workdir=workdir, nats=nats
        )
    finally:
        if postgres is not None:
            postgres.stop()
        nats.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def create_database(admin_dsn: str, name: str, template: str | None = None) -> None:
    conn = await asyncpg.connect(admin_dsn.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()


async def fresh_database(services: Services) -> str:
    """A new, migrated database; returns its DSN."""
    name = f"cg_{secrets.token_hex(6)}"
    await create_database(services.admin_dsn, name, services.template)
    return services.dsn(name)


@pytest.fixture(scope="session")
async def sandbox_dsn(services: Services) -> str:
    """One database for the sandbox's own tests; each sandbox takes a schema of its own in it."""
    return await fresh_database(services)


def sandbox_schema() -> str:
    """A fresh schema name for one sandbox (``SandboxConfig.schema``)."""
    return f"sbx_{secrets.token_hex(6)}"


def flags_document(
    *, enabled: bool, merchants: list[str] | None = None, rollout: int | None = None
) -> dict[str, Any]:
    """An Unleash ``/api/client/features`` document for ``withdrawals.cascade``."""
    strategies: list[dict[str, Any]] = []
    if merchants is not None:
        strategies.append(
            {
                "name": "default",
                "parameters": {},
                "constraints": [
                    {
                        "contextName": "merchantId",
                        "operator": "IN",
                        "values": merchants,
                        "inverted": False,
                        "caseInsensitive": False,
                    }
                ],
            }
        )
    if rollout is not None:
        strategies.append(
            {
                "name": "flexibleRollout",
                "parameters": {
                    "rollout": str(rollout),
                    "stickiness": "merchantId",
                    "groupId": "withdrawals.cascade",
                },
                "constraints": [],
            }
        )
    if not strategies:
        strategies.append({"name": "default", "parameters": {}, "constraints": []})
    return {
        "version": 1,
        "segments": [],
        "features": [
            {
                "name": "withdrawals.cascade",
                "type": "release",
                "enabled": enabled,
                "stale": False,
                "impressionData": False,
                "strategies": strategies,
                "variants": [],
            }
        ],
    }


def providers_document() -> dict[str, Any]:
    """The sandbox providers with test-speed timers."""
    doc: dict[str, Any] = json.loads((ROOT / "config" / "providers.sandbox.json").read_text())
    for provider in doc["providers"].values():
        provider["webhook_sla_seconds"] = 2
        provider["status_polling"] = {"interval_seconds": 1, "max_polls": 1}
        provider["recheck"] = {
            "initial_delay_seconds": 0.3,
            "multiplier": 2,
            "max_delay_seconds": 2,
            "max_attempts": 5,
        }
        provider["timeouts"] = {"connect_seconds": 1, "read_seconds": 1}
    return doc


@dataclass
class Stack:
    """One gateway + worker, served over real HTTP, on a fresh database and namespace."""

    url: str
    settings: Settings
    runtime: Runtime
    worker: Worker
    sandbox: Sandbox | None
    client: httpx.AsyncClient
    headers: dict[str, str] = field(
        default_factory=lambda: {"Authorization": f"Bearer {API_TOKEN}"}
    )

    async def ledger(self) -> dict[str, Any]:
        response = await self.client.get("/sandbox/core/ledger")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def withdrawal(self, withdrawal_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/withdrawals/{withdrawal_id}", headers=self.headers)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def wait_for(
        self,
        withdrawal_id: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 20.0,
        *,
        what: str = "to reach the awaited state",
    ) -> dict[str, Any]:
        """Poll the public API until ``predicate`` holds for the withdrawal; returns its body."""
        return await wait_until(
            lambda: self.withdrawal(withdrawal_id),
            done=predicate,
            timeout=timeout,
            interval=0.05,
            what=f"withdrawal {withdrawal_id} {what}",
        )

    async def wait_final(self, withdrawal_id: str, timeout: float = 20.0) -> dict[str, Any]:
        return await self.wait_for(
            withdrawal_id, lambda b: b["status"] != "processing", timeout, what="to be final"
        )


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(services: Services, tmp_path: Path) -> AsyncIterator[StackFactory]:
    """Factory: ``await make_stack(flags=flags_document(...))`` → a running :class:`Stack`."""
    started: list[tuple[Stack, uvicorn.Server, asyncio.Task[None]]] = []

    async def factory(
        *,
        flags: dict[str, Any] | None = None,
        providers: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        with_worker: bool = True,
    ) -> Stack:
        dsn = await fresh_database(services)
        port = free_port()
        flags_file = tmp_path / f"flags-{port}.json"
        flags_file.write_text(json.dumps(flags or flags_document(enabled=True)))
        providers_file = tmp_path / f"providers-{port}.json"
        providers_file.write_text(json.dumps(providers or providers_document()))
        settings = load_settings(
            {
                "DATABASE_URL": dsn,
                "NATS_URL": services.nats_url,
                "NATS_NAMESPACE": f"t{secrets.token_hex(4)}.",
                "HTTP_PORT": str(port),
                "SANDBOX_ENABLED": "true",
                "FLAGS_FILE": str(flags_file),
                "PROVIDERS_FILE": str(providers_file),
                "GATEWAY_API_TOKENS": f"{API_TOKEN},dev-token",
                "SANDBOX_WEBHOOK_DELAY_SECONDS": "0.1",
                "SANDBOX_FAIL_DELAY_SECONDS": "0.1",
                "SANDBOX_FLAKY_TIMEOUT_SECONDS": "1.5",
                "JETSTREAM_ACK_WAIT_SECONDS": "5",
                **(env or {}),
            }
        )
        runtime = await open_runtime(settings, name="test-gateway", with_router=True)
        app = create_app(settings, runtime=runtime)
        server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port))
        task = asyncio.create_task(server.serve())
        await wait_until(
            lambda: server.started or task.done(),
            timeout=60,
            interval=0.01,
            what="the gateway's HTTP server to start",
        )
        if task.done():
            task.result()  # the server stopped as it started: raise its error
            raise AssertionError("the gateway's HTTP server stopped as it started")
        worker = Worker(
            engine=runtime.engine,
            js=runtime.js,
            core=runtime.core,
            sweep_interval=0.5,
            stranded_after=3.0,
            timer_grace=1.0,
        )
        if with_worker:
            await worker.start()
        url = f"http://127.0.0.1:{port}"
        stack = Stack(
            url=url,
            settings=settings,
            runtime=runtime,
            worker=worker,
            sandbox=app.state.sandbox,
            client=httpx.AsyncClient(base_url=url, timeout=10),
        )
        started.append((stack, server, task))
        return stack

    yield factory
    for stack, server, task in reversed(started):
        # Every step bounded: a teardown that hangs would stall the whole suite.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stack.client.aclose(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stack.worker.stop(grace=3), 15)
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stack.runtime.close(), 15)


def new_id(prefix: str = "wd") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def withdrawal_body(
    withdrawal_id: str, providers: list[str], *, merchant: str = "m_1001", amount: str = "250.00"
) -> dict[str, Any]:
    return {
        "withdrawal_id": withdrawal_id,
        "merchant_id": merchant,
        "amount": amount,
        "currency": "EUR",
        "destination": {"type": "iban", "account": "DE89370400440532013000", "holder": "Jane Doe"},
        "cascade": [{"provider_id": p, "fee": "0.50"} for p in providers],
    }
