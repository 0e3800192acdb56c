"""The queue row lock serialises a withdrawal's events: a handler that had to wait for it must
see the tasks exactly as the lock holder committed them.

In READ COMMITTED a ``SELECT … FOR UPDATE`` that waited re-reads the locked row at its newest
version, but any subquery of that statement keeps the snapshot taken before the wait. Loading
the tasks in the locking statement would hand the second of two racing webhooks the task as
it was before the first one's commit, and it would roll back a freeze the first had just
committed. Every loader is checked here with a real lock wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from orchestrator import store
from orchestrator.domain import OrderTask, QueueState, request_cancel
from orchestrator.store.uow import PostgresUnitOfWork
from tests.conftest import Stack, StackFactory
from tests.faultkit import create_withdrawal, task_events, tasks_of
from tests.waiting import wait_until

Loader = Callable[[store.Connection, uuid.UUID], Awaitable[tuple[str | None, ...]]]


async def _via_load_all(conn: store.Connection, queue_id: uuid.UUID) -> tuple[str | None, ...]:
    loaded = await store.load_all(conn, queue_id=queue_id, lock=True)
    assert loaded is not None
    return tuple(t.provider_code for t in loaded[1].queue.tasks)


async def _via_load_queue(conn: store.Connection, queue_id: uuid.UUID) -> tuple[str | None, ...]:
    loaded = await store.load_queue(conn, queue_id=queue_id, lock=True)
    assert loaded is not None
    return tuple(t.provider_code for t in loaded.queue.tasks)


async def _via_load_queues(conn: store.Connection, queue_id: uuid.UUID) -> tuple[str | None, ...]:
    loaded = await store.load_queues(conn, [queue_id], lock=True)
    return tuple(t.provider_code for t in loaded[queue_id].queue.tasks)


async def _waiting_on_a_lock(stack: Stack) -> bool:
    async with stack.runtime.pool.acquire() as conn:
        waiting: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    return waiting > 0


@pytest.mark.parametrize("load", [_via_load_all, _via_load_queue, _via_load_queues])
async def test_a_locking_load_that_waited_sees_the_holders_commit(
    make_stack: StackFactory, load: Loader
) -> None:
    stack = await make_stack(with_worker=False)
    wid = await create_withdrawal(stack, ["sbx_silent", "sbx_ok"])
    queue_id = (await tasks_of(stack, wid))[0]["queue_id"]
    pool = stack.runtime.pool

    async def waiter() -> tuple[str | None, ...]:
        async with pool.acquire() as conn, conn.transaction():
            return await load(conn, queue_id)

    async with pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT 1 FROM order_queues WHERE queue_id = $1 FOR UPDATE", queue_id)
        await holder.execute(
            "UPDATE order_tasks SET provider_code = 'written_by_holder', version = version + 1"
            " WHERE queue_id = $1",
            queue_id,
        )
        waiting = asyncio.create_task(waiter())
        await wait_until(
            lambda: _waiting_on_a_lock(stack), timeout=15, what="the loader blocked on the lock"
        )
        assert not waiting.done()
        await transaction.commit()
    assert await waiting == ("written_by_holder", "written_by_holder")


async def _pending_start(stack: Stack) -> tuple[store.QueueRecord, OrderTask]:
    """A cascade withdrawal nobody works on: its first task PENDING (no worker runs)."""
    wid = await create_withdrawal(stack, ["sbx_silent", "sbx_ok"])
    async with stack.runtime.pool.acquire() as conn:
        rec = await store.load_queue(conn, withdrawal_id=wid)
    assert rec is not None
    first = rec.queue.tasks[0]
    assert first.state == "PENDING"
    return rec, first


async def _cancel_in_one_unit(
    stack: Stack, rec: store.QueueRecord, *, stale_task: int = 0, stale_queue: int = 0
) -> None:
    """A queue cancel of a withdrawal nobody started (flag, both tasks, the queue's final
    state) through one unit of work, as if read with the versions shifted as given."""
    tasks = list(rec.queue.tasks)
    tasks[0] = dataclasses.replace(tasks[0], version=tasks[0].version + stale_task)
    queue = dataclasses.replace(
        rec.queue, version=rec.queue.version + stale_queue, tasks=tuple(tasks)
    )
    transition = request_cancel(queue, "test", datetime.now(UTC))
    assert transition.finished == QueueState.CANCELLED
    async with PostgresUnitOfWork(stack.runtime.pool, stack.runtime.relay) as uow:
        assert await uow.load(rec.queue.queue_id) is not None  # takes the lock, as handlers do
        uow.add(transition, withdrawal_id=rec.queue.withdrawal_id, actor="test", trace_id=None)
        await uow.commit()


async def test_a_unit_of_work_writes_all_its_changes_or_none(make_stack: StackFactory) -> None:
    stack = await make_stack(with_worker=False)
    rec, task = await _pending_start(stack)
    wid = rec.queue.withdrawal_id

    events_before = len(await task_events(stack, task.task_id))
    for stale_task, stale_queue in ((1, 0), (0, 1)):
        with pytest.raises(store.StaleVersion):
            await _cancel_in_one_unit(stack, rec, stale_task=stale_task, stale_queue=stale_queue)
        assert [t["state"] for t in await tasks_of(stack, wid)] == ["PENDING", "PENDING"]
        assert len(await task_events(stack, task.task_id)) == events_before
        async with stack.runtime.pool.acquire() as conn:
            after = await store.load_queue(conn, withdrawal_id=wid)
        assert after is not None
        assert (after.queue.state, after.queue.version) == ("ACTIVE", rec.queue.version)

    await _cancel_in_one_unit(stack, rec)
    rows = await tasks_of(stack, wid)
    assert [(r["state"], r["version"]) for r in rows] == [
        ("CANCELLED", task.version + 1),
        ("CANCELLED", rec.queue.tasks[1].version + 1),
    ]
    async with stack.runtime.pool.acquire() as conn:
        trail = await conn.fetch(
            "SELECT event, to_state FROM order_task_events WHERE queue_id = $1 ORDER BY event_id",
            rec.queue.queue_id,
        )
    # In the order they were decided: support reads the trail so, cause before effect.
    assert [(e["event"], e["to_state"]) for e in trail][-4:] == [
        ("queue.cancel_requested", None),
        ("cancel", "CANCELLED"),
        ("cancel", "CANCELLED"),
        ("queue.cancelled", "CANCELLED"),
    ]
