"""Provider health on the real Postgres and nats-server: the half-open probe lease, the
in-flight count under its provider lock, and a rate limit held across two worker processes.

The breaker's rules are unit-tested (tests/unit/test_breaker.py) and the engine's choices on
fakes (tests/unit/test_provider_health.py); here the fleet-wide parts are checked where they
live: several connections, several processes, one database.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from orchestrator.store import breakers
from tests.conftest import StackFactory, providers_document
from tests.faultkit import create_withdrawal, tasks_of, worker_process
from tests.waiting import wait_until


async def test_exactly_one_of_many_concurrent_takers_gets_the_probe_lease(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(with_worker=False)
    pool = stack.runtime.pool
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await breakers.ensure_breakers(conn, ["sbx_ok"], now)
        await conn.execute(
            "UPDATE provider_breakers SET state = 'half_open' WHERE provider_id = 'sbx_ok'"
        )

    async def take() -> bool:
        async with pool.acquire() as conn, conn.transaction():
            return await breakers.take_probe(
                conn, "sbx_ok", uuid.uuid4(), now, now + timedelta(seconds=10)
            )

    taken = await asyncio.gather(*(take() for _ in range(12)))
    assert sorted(taken) == [False] * 11 + [True]
    # Once its lease has run out, another attempt may probe.
    async with pool.acquire() as conn:
        later = now + timedelta(seconds=11)
        assert await breakers.take_probe(conn, "sbx_ok", uuid.uuid4(), later, later)


async def test_two_starts_never_decide_on_the_same_in_flight_count(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(with_worker=False)
    withdrawal_id = await create_withdrawal(stack, ["sbx_ok"])
    (task,) = await tasks_of(stack, withdrawal_id)
    pool = stack.runtime.pool
    first_counted = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> int:
        async with pool.acquire() as conn, conn.transaction():
            seen = await breakers.in_flight(conn, "sbx_ok")
            first_counted.set()
            await conn.execute(
                "UPDATE order_tasks SET state = 'CREATING' WHERE task_id = $1", task["task_id"]
            )
            await release_first.wait()
            return seen

    async def second() -> int:
        await first_counted.wait()
        async with pool.acquire() as conn, conn.transaction():
            return await breakers.in_flight(conn, "sbx_ok")

    running = asyncio.gather(first(), second())

    async def second_waits_for_the_lock() -> bool:
        async with pool.acquire() as conn:
            waiting: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        return waiting > 0

    await wait_until(
        second_waits_for_the_lock, timeout=10, what="the second start to wait for the lock"
    )
    release_first.set()
    assert list(await running) == [0, 1]


async def test_a_rate_limit_holds_across_two_worker_processes(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    rate, count = 10.0, 40
    providers: dict[str, Any] = providers_document()
    providers["providers"]["sbx_sync_ok"]["rate_limit"] = {"per_second": rate, "burst": 1}
    stack = await make_stack(providers=providers, with_worker=False)
    async with (
        worker_process(stack, tmp_path / "w1.log"),
        worker_process(stack, tmp_path / "w2.log"),
    ):
        ids = await asyncio.gather(
            *(create_withdrawal(stack, ["sbx_sync_ok"]) for _ in range(count))
        )
        for withdrawal_id in ids:
            body = await stack.wait_final(withdrawal_id, timeout=60)
            assert body["status"] == "succeeded"
    async with stack.runtime.pool.acquire() as conn:
        answered = await conn.fetch(
            "SELECT created_at FROM order_task_events WHERE withdrawal_id = ANY($1::text[])"
            " AND event = 'create.succeeded' ORDER BY created_at",
            ids,
        )
        waited = await conn.fetchval(
            "SELECT count(*) FROM order_task_events WHERE withdrawal_id = ANY($1::text[])"
            " AND event = 'start.waiting'",
            ids,
        )
    assert len(answered) == count
    span = (answered[-1]["created_at"] - answered[0]["created_at"]).total_seconds()
    measured = (count - 1) / span
    assert abs(measured - rate) <= 0.1 * rate, f"{measured:.2f}/s against a limit of {rate}/s"
    assert waited > 0  # the limit was reached, not merely unused
