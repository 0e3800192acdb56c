"""Provider health on the real Postgres and nats-server: the half-open probe lease, the
in-flight count under its provider lock, and a rate limit held across two worker processes.

The breaker's rules are unit-tested (tests/unit/test_breaker.py) and the engine's choices on
fakes (tests/unit/test_provider_health.py); here the fleet-wide parts are checked where they
live: several connections, several processes, one database.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from orchestrator.store import breakers
from tests.conftest import StackFactory, providers_document
from tests.faultkit import assert_settled, create_withdrawal, tasks_of, worker_process
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


async def test_an_outage_opens_the_breaker_fleet_wide_one_probe_at_a_time_then_traffic_returns(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    """Two worker processes, ``sbx_a`` answering 503 to everything for a few seconds: its
    breaker opens for the fleet (later withdrawals go to ``sbx_b`` first), each half-open
    period lets one probe through the whole fleet, and once the outage is over ``sbx_a``
    carries attempts again. Every withdrawal ends succeeded, paid once."""
    open_seconds, outage_seconds = 2.0, 6.0
    providers: dict[str, Any] = providers_document()
    sbx_a = providers["providers"]["sbx_a"]
    sbx_a["breaker"] = {"min_calls": 4, "open_seconds": open_seconds}
    # Rechecks outlast the outage: an attempt cut off by it is proven absent after it.
    sbx_a["recheck"] = {
        "initial_delay_seconds": 0.5,
        "multiplier": 2,
        "max_delay_seconds": 2,
        "max_attempts": 12,
    }
    stack = await make_stack(providers=providers, with_worker=False)
    outage = {"error_ratio": 1.0, "duration_seconds": outage_seconds}
    response = await stack.client.put("/sandbox/providers/sbx_a/outage", json=outage)
    assert response.status_code == 200, response.text
    ends_at = datetime.now(UTC) + timedelta(seconds=outage_seconds)
    ids: list[str] = []
    async with (
        worker_process(stack, tmp_path / "w1.log"),
        worker_process(stack, tmp_path / "w2.log"),
    ):
        # Creates at 5/s, until a few seconds past the outage.
        while datetime.now(UTC) < ends_at + timedelta(seconds=6):
            ids.append(await create_withdrawal(stack, ["sbx_a", "sbx_b"]))
            await asyncio.sleep(0.2)
        for withdrawal_id in ids:
            await stack.wait_final(withdrawal_id, timeout=60)
    async with stack.runtime.pool.acquire() as conn:
        events = await conn.fetch(
            "SELECT e.event, e.created_at, t.provider_id FROM order_task_events e"
            " JOIN order_tasks t ON t.task_id = e.task_id"
            " WHERE e.withdrawal_id = ANY($1::text[]) ORDER BY e.event_id",
            ids,
        )
    passed_over = [e for e in events if e["event"] == "start.passed_over"]
    assert passed_over, "the breaker never opened"
    assert {e["provider_id"] for e in passed_over} == {"sbx_a"}
    probes = sorted(e["created_at"] for e in events if e["event"] == "start.probe")
    assert probes, "no probe after the breaker opened"
    # One probe per half-open period: a failed probe opens the breaker for open_seconds.
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(probes)]
    assert all(gap >= open_seconds - 0.1 for gap in gaps), gaps
    back = [
        e
        for e in events
        if e["provider_id"] == "sbx_a"
        and e["event"] in ("create.accepted", "create.succeeded")
        and e["created_at"] > ends_at
    ]
    assert back, "sbx_a carried no attempt after its outage"
    # Attempts in flight when the breaker opened were not moved: no withdrawal started at
    # sbx_b before its sbx_a attempt, if it had one, was over.
    async with stack.runtime.pool.acquire() as conn:
        overlaps = await conn.fetchval(
            "SELECT count(*) FROM order_tasks a JOIN order_tasks b USING (queue_id)"
            " JOIN order_task_events ea ON ea.task_id = a.task_id"
            " JOIN order_task_events eb ON eb.task_id = b.task_id"
            " WHERE a.provider_id = 'sbx_a' AND b.provider_id = 'sbx_b'"
            " AND a.freeze_state <> 'none' AND b.freeze_state <> 'none'"
            " AND eb.to_state = 'CREATING' AND ea.to_state IN ('FAILED', 'SKIPPED', 'CANCELLED')"
            " AND eb.created_at < ea.created_at AND ea.withdrawal_id = ANY($1::text[])",
            ids,
        )
        cut_off = await conn.fetchval(
            "SELECT count(DISTINCT e.withdrawal_id) FROM order_task_events e"
            " JOIN order_tasks a ON a.task_id = e.task_id"
            " WHERE a.provider_id = 'sbx_a' AND a.freeze_state <> 'none'"
            " AND e.event = 'create.ambiguous' AND e.withdrawal_id = ANY($1::text[])",
            ids,
        )
    assert cut_off > 0, "no attempt was in flight at sbx_a when its outage began"
    assert overlaps == 0
    await assert_settled(stack, dict.fromkeys(ids, "succeeded"))
