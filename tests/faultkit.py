"""What the fault tests share: a worker as a real process, raw bus messages, the invariants.

``WorkerProcess`` runs ``python -m gateway.cli worker`` with a stack's settings, so a test can
kill it and start another; with ``crash=CrashAt(point, after)`` it runs under
``tests.crashpoint``, which SIGKILLs it at that fault point. ``publish`` puts a message on a
stack's subject *without* ``Nats-Msg-Id``: JetStream's duplicate window must not hide the
duplicates the handlers are meant to absorb. ``assert_settled`` checks the money-safety
invariants of DESIGN.md on the record (Postgres) and on the sandbox ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import msgspec

from contracts.messages import TaskMessage, WebhookMessage
from contracts.provider import ProviderStatus
from tests.conftest import ROOT, Stack, new_id, withdrawal_body
from tests.waiting import wait_until

_T = TypeVar("_T")
FINAL_TASK_STATES = frozenset({"SUCCEEDED", "SKIPPED", "FAILED", "CANCELLED"})
CONSOLE_SCRIPT = Path(sys.executable).with_name("cascade-gateway")


# --- waiting ---------------------------------------------------------------------------------


async def wait_connected(stack: Stack, timeout: float = 15.0) -> None:
    """Until the stack's NATS client is connected again (after a server restart)."""

    async def connected() -> bool:
        return bool(stack.runtime.nc.is_connected)

    await wait_until(connected, timeout=timeout, what="the NATS client to reconnect")


# --- the worker as a process -------------------------------------------------------------------


def stack_env(stack: Stack, **extra: str) -> dict[str, str]:
    """The environment under which a ``cascade-gateway`` command sees the same stack."""
    settings = stack.settings
    assert settings.database_url is not None
    assert settings.nats_url is not None
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": settings.database_url,
            "NATS_URL": settings.nats_url,
            "NATS_NAMESPACE": settings.nats_namespace,
            "PROVIDERS_FILE": str(settings.providers_file),
            "FLAGS_FILE": str(settings.flags_file),
            "CORE_URL": stack.url + "/sandbox/core",
            "CORE_TOKEN": settings.core_token,
            "SANDBOX_ENABLED": "true",
            "SANDBOX_URL": stack.url + "/sandbox",
            "HTTP_PORT": str(settings.http_port),
            "JETSTREAM_ACK_WAIT_SECONDS": "2",
            "LOG_LEVEL": "INFO",
        }
    )
    env.update(extra)
    return env


class CrashAt(NamedTuple):
    """Where a worker SIGKILLs itself: the fault point, after letting it pass ``after`` times."""

    point: str
    after: int = 0


class WorkerProcess:
    """One ``cascade-gateway worker`` child; its output goes to ``log_path``."""

    def __init__(
        self, stack: Stack, log_path: Path, *, crash: CrashAt | None = None, **env: str
    ) -> None:
        self.log_path = log_path
        launcher = ["gateway.cli"]
        if crash is not None:
            launcher = ["tests.crashpoint", "--after", str(crash.after), crash.point]
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", *launcher, "worker"],
                env=stack_env(stack, **env),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def wait_exit(self, timeout: float) -> int:
        """The exit status once the process ended (negative: the signal that ended it)."""

        async def ended() -> bool:
            return self.popen.poll() is not None

        try:
            await wait_until(ended, timeout=timeout, what=f"worker {self.pid} to exit")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log tail:\n{self.log_tail()}") from None
        code = self.popen.returncode
        assert code is not None
        return code

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (a clean stop) and its exit status; SIGKILL if it does not stop in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return await self.wait_exit(timeout)
            except AssertionError:
                self.popen.kill()
                await asyncio.to_thread(self.popen.wait, 10)
                raise
        return self.popen.returncode


@contextlib.asynccontextmanager
async def worker_process(
    stack: Stack, log_path: Path, *, crash: CrashAt | None = None, **env: str
) -> AsyncIterator[WorkerProcess]:
    """A worker child that is always gone when the block ends, whatever happened inside."""
    proc = WorkerProcess(stack, log_path, crash=crash, **env)
    try:
        yield proc
    finally:
        if proc.popen.poll() is None:
            with contextlib.suppress(AssertionError):
                await proc.stop()


async def run_cli(stack: Stack, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run the ``cascade-gateway`` console script against the stack: (status, stdout, stderr)."""
    return await run_command(stack_env(stack), *args, timeout=timeout)


async def run_command(
    env: Mapping[str, str], *args: str, timeout: float = 60.0
) -> tuple[int, str, str]:
    """Run ``cascade-gateway ARGS`` with exactly ``env``: (status, stdout, stderr)."""
    command = (
        [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "gateway.cli"]
    )
    proc = await asyncio.create_subprocess_exec(
        *command,
        *args,
        env=dict(env),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- driving the stack -------------------------------------------------------------------------


async def create_withdrawal(stack: Stack, providers: list[str]) -> str:
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, providers)
    )
    assert response.status_code == 201, response.text
    return wid


async def set_core_faults(stack: Stack, **faults: float) -> None:
    """``PUT /sandbox/core/faults``: ratios of balance calls answered 500 or after a timeout."""
    body = {"fault_500_ratio": 0.0, "timeout_ratio": 0.0, **faults}
    response = await stack.client.put("/sandbox/core/faults", json=body)
    assert response.status_code == 200, response.text


async def publish(stack: Stack, subject: str, payload: bytes) -> None:
    """A raw message on one of the stack's subjects, with no ``Nats-Msg-Id`` (never deduped)."""
    names = stack.runtime.relay.names
    await stack.runtime.js.publish(names.subject(subject), payload, timeout=5)


def task_message(task: Mapping[str, Any], attempt: int = 0) -> bytes:
    return msgspec.json.encode(
        TaskMessage(task_id=task["task_id"], queue_id=task["queue_id"], attempt=attempt)
    )


def webhook_message(
    task: Mapping[str, Any], status: ProviderStatus, code: str | None = None
) -> bytes:
    """What the intake publishes for a verified webhook about ``task``'s provider order."""
    return msgspec.json.encode(
        WebhookMessage(
            provider_id=task["provider_id"],
            order_id=task["provider_order_id"],
            reference=task["provider_reference"],
            status=status,
            code=code,
            webhook_id=f"msg_{uuid.uuid4().hex}",
        )
    )


async def tasks_of(stack: Stack, withdrawal_id: str) -> list[dict[str, Any]]:
    """A withdrawal's task rows, in cascade order."""
    async with stack.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT t.* FROM order_tasks t JOIN order_queues q ON q.queue_id = t.queue_id"
            " WHERE q.withdrawal_id = $1 ORDER BY t.position",
            withdrawal_id,
        )
    return [dict(r) for r in rows]


async def wait_task_state(
    stack: Stack, withdrawal_id: str, position: int, state: str, timeout: float = 15.0
) -> dict[str, Any]:
    """Until task ``position`` of the withdrawal is in ``state``; returns its row."""

    async def probe() -> dict[str, Any] | None:
        task = (await tasks_of(stack, withdrawal_id))[position]
        return task if task["state"] == state else None

    return await wait_until(
        probe, timeout=timeout, what=f"{withdrawal_id} task {position} in {state}"
    )


async def task_events(stack: Stack, task_id: uuid.UUID) -> list[dict[str, Any]]:
    """A task's audit rows, oldest first."""
    async with stack.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT event, from_state, to_state, actor, details, created_at"
            " FROM order_task_events WHERE task_id = $1 ORDER BY event_id",
            task_id,
        )
    return [dict(r) for r in rows]


async def transitions(stack: Stack, withdrawal_ids: list[str]) -> Counter[tuple[uuid.UUID, str]]:
    """How many audit rows entered each (task, state)."""
    async with stack.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT task_id, to_state, count(*) AS n FROM order_task_events"
            " WHERE withdrawal_id = ANY($1::text[]) AND task_id IS NOT NULL"
            " AND to_state IS NOT NULL GROUP BY task_id, to_state",
            withdrawal_ids,
        )
    return Counter({(r["task_id"], r["to_state"]): r["n"] for r in rows})


async def metric_sum(stack: Stack, name: str, **labels: str) -> float:
    """The sum of a metric's series (those matching ``labels``) on the gateway's ``/metrics``."""
    response = await stack.client.get("/metrics")
    response.raise_for_status()
    total = 0.0
    for line in response.text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


# --- the invariants ----------------------------------------------------------------------------


def _operations(ledger: Mapping[str, Any], withdrawal_id: str) -> dict[str, dict[str, Any]]:
    return {
        op_id: d
        for op_id, d in ledger["operation_details"].items()
        if d["withdrawal_id"] == withdrawal_id
    }


async def assert_settled(stack: Stack, expected: Mapping[str, str]) -> None:
    """Every withdrawal final with the expected public status, and the money accounted for.

    - the sandbox ledger saw no invariant breach;
    - one commit per succeeded withdrawal, none for the others; no freeze left open;
    - every task final; its recorded ``freeze_state`` is what the ledger holds for it (no
      freeze the record does not know of);
    - every task entered each of its states exactly once, and its current state has its
      audit row;
    - one final-status notification per withdrawal, with the public status.
    """
    ledger = await stack.ledger()
    assert ledger["violations"] == [], ledger["violations"]
    wids = list(expected)
    entered = await transitions(stack, wids)
    repeated = {k: n for k, n in entered.items() if n != 1}
    assert repeated == {}, f"states entered more than once: {repeated}"
    async with stack.runtime.pool.acquire() as conn:
        notified = await conn.fetch(
            "SELECT withdrawal_id, status FROM notifications WHERE withdrawal_id = ANY($1::text[])",
            wids,
        )
    notifications: dict[str, list[str]] = {}
    for row in notified:
        notifications.setdefault(row["withdrawal_id"], []).append(row["status"])
    for wid, status in expected.items():
        view = await stack.withdrawal(wid)
        assert view["status"] == status, view
        ops = _operations(ledger, wid)
        states = sorted(d["state"] for d in ops.values())
        assert "frozen" not in states, (wid, ops)
        assert states.count("committed") == (1 if status == "succeeded" else 0), (wid, ops)
        assert notifications.get(wid) == [status], (wid, notifications.get(wid))
        for task in await tasks_of(stack, wid):
            where = (wid, task["provider_id"], task["state"], task["freeze_state"])
            assert task["state"] in FINAL_TASK_STATES, where
            op = ops.pop(str(task["task_id"]), None)
            if task["freeze_state"] == "none":
                assert op is None, (where, op)
            else:
                assert op is not None, where
                assert op["state"] == task["freeze_state"], (where, op)
            if task["state"] == "SUCCEEDED":
                assert task["freeze_state"] == "committed", where
            assert entered[(task["task_id"], task["state"])] == 1, where
        assert ops == {}, f"ledger operations of {wid} that no task owns: {ops}"
