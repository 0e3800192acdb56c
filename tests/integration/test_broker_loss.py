"""A broker that loses its store while the gateway and the worker run.

nats-server is stopped, its JetStream store deleted and the server started again empty: no
stream, no consumer, no pending schedule, no dedup window. Postgres is the record, so the
running processes must recreate the streams and the consumer themselves and carry on — no
restart, no operator — and what was due (a start the broker held, a timer it held, the
outbox) is re-armed from Postgres by the sweeper and the outbox relay.

The test runs its own nats-server: deleting the store of the session's would take every other
stack's streams with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devstack.embedded import EmbeddedNats
from orchestrator import bus
from tests.conftest import Stack, StackFactory, providers_document
from tests.faultkit import (
    assert_settled,
    create_withdrawal,
    metric_sum,
    tasks_of,
    wait_connected,
    wait_task_state,
)
from tests.waiting import wait_until

OPS = {"Authorization": "Bearer ops-token", "X-Operator": "alice"}
SILENT = "sbx_silent"
# What settles by itself, on paths that use every kind of message: a start, a create answered
# at once, a decline moving the cascade on, a success webhook through the intake.
MIX: list[tuple[list[str], str]] = [
    (["sbx_sync_ok"], "succeeded"),
    (["sbx_decline", "sbx_sync_ok"], "succeeded"),
    (["sbx_ok"], "succeeded"),
    (["sbx_decline"], "failed"),
]
# A webhook SLA long enough to be pending in the store when it is lost, short enough for the
# sweeper to fire it (after its grace) within the test.
SLA_SECONDS = 8


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server of this test's own (requested before ``make_stack``: stopped after it)."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def parking_providers() -> dict[str, object]:
    doc = providers_document()
    doc["providers"][SILENT]["webhook_sla_seconds"] = SLA_SECONDS
    doc["providers"][SILENT]["status_polling"] = None  # SLA expiry goes to MANUAL_CHECK
    return doc


async def create_mix(stack: Stack, expected: dict[str, str], rounds: int = 2) -> None:
    for _ in range(rounds):
        for providers, outcome in MIX:
            expected[await create_withdrawal(stack, providers)] = outcome


async def wait_all_final(stack: Stack, expected: dict[str, str], timeout: float) -> None:
    for wid, outcome in expected.items():
        body = await stack.wait_final(wid, timeout=timeout)
        assert body["status"] == outcome, body


def streams_of(stack: Stack) -> bus.Streams:
    streams = stack.runtime.relay.streams
    assert streams is not None
    return streams


async def outbox_rows(stack: Stack) -> int:
    async with stack.runtime.pool.acquire() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM outbox")
    return count


async def lose_the_store(broker: EmbeddedNats) -> None:
    await asyncio.to_thread(broker.stop)
    await asyncio.to_thread(broker.delete_store)
    await asyncio.to_thread(broker.start)


async def test_a_broker_that_lost_its_store_is_repaired_while_everything_runs(
    broker: EmbeddedNats, make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """``running``: a gateway and its worker. ``idle``: a gateway whose worker is not running
    yet when the store is lost, so that its starts are lost with the store (published, and
    their outbox rows deleted) and that only its gateway can notice the loss."""
    caplog.set_level(logging.WARNING, logger="cascade.bus")
    env = {"NATS_URL": broker.url}
    running = await make_stack(providers=parking_providers(), env=env)
    idle = await make_stack(env=env, with_worker=False)
    heals_before = await metric_sum(running, "broker_heals_total")

    settled: dict[str, str] = {}
    await create_mix(running, settled)
    await wait_all_final(running, settled, timeout=20)
    parked = [await create_withdrawal(running, [SILENT]) for _ in range(2)]
    for wid in parked:
        await wait_task_state(running, wid, 0, "EXECUTING")
    stranded: dict[str, str] = {}
    await create_mix(idle, stranded, rounds=1)
    await wait_until(
        lambda: outbox_rows(idle),
        done=lambda rows: rows == 0,
        timeout=10,
        what="the idle stack's starts published and their outbox rows deleted",
    )

    await lose_the_store(broker)
    # The parked tasks' SLA timers were still pending in the store that is gone.
    now = datetime.now(UTC)
    for wid in parked:
        (task,) = await tasks_of(running, wid)
        assert task["state"] == "EXECUTING"
        assert task["timer_due_at"] > now, "the SLA timer fired before the store was lost"
    await wait_connected(running)
    await wait_connected(idle)
    # With no new traffic, the running worker notices on its own (its fetches go unanswered).
    repaired = streams_of(running)
    await wait_until(
        lambda: repaired.generation,
        done=lambda generation: generation == 1,
        timeout=15,
        what="the running worker to recreate its streams",
    )

    # New withdrawals are accepted and settle.
    after: dict[str, str] = {}
    await create_mix(running, after)
    # The idle gateway's own publish meets the missing stream and recreates it: no worker
    # of its namespace runs to do it.
    late: dict[str, str] = {}
    await create_mix(idle, late, rounds=1)
    assert await streams_of(idle).missing() == []

    await wait_all_final(running, after, timeout=30)
    # The lost SLA timers are fired from Postgres (timer_due_at) by the sweeper.
    manual = [await wait_task_state(running, wid, 0, "MANUAL_CHECK", timeout=30) for wid in parked]
    for task in manual:
        resolved = await running.client.post(
            f"/ops/tasks/{task['task_id']}/resolve",
            headers=OPS,
            json={"decision": "positive", "reason": "the provider's statement shows it paid"},
        )
        assert resolved.status_code == 200, resolved.text
    await wait_all_final(running, dict.fromkeys(parked, "succeeded"), timeout=20)

    # The idle stack's worker starts now: its relay publishes what its gateway could not, and
    # its sweeper restarts the tasks whose starts were lost with the store.
    await idle.worker.start()
    await wait_all_final(idle, {**stranded, **late}, timeout=30)

    await assert_settled(running, {**settled, **after, **dict.fromkeys(parked, "succeeded")})
    await assert_settled(idle, {**stranded, **late})
    # One repair per namespace, seen by the operator as a metric and one warning each.
    assert await metric_sum(running, "broker_heals_total") == heals_before + 2
    repairs = [r for r in caplog.records if r.getMessage().startswith("broker lost its streams")]
    assert len(repairs) == 2, [r.getMessage() for r in caplog.records]
