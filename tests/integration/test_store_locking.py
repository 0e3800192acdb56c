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
from orchestrator.domain import OrderTask, QueueState, TaskState
from tests.conftest import Stack, StackFactory
from tests.faultkit import create_withdrawal, task_events, tasks_of, wait_until

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
        await wait_until(lambda: _waiting_on_a_lock(stack), "the loader blocked on the lock")
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


async def _start(stack: Stack, rec: store.QueueRecord, task: OrderTask) -> bool:
    async with stack.runtime.pool.acquire() as conn:
        started = await store.start_pending(
            conn,
            queue_id=rec.queue.queue_id,
            queue_version=rec.queue.version,
            task_id=task.task_id,
            task_version=task.version,
            event="start",
            actor="test",
            trace_id=None,
            details={},
            now=datetime.now(UTC),
        )
    if started is not None:
        assert started.provider_id == task.provider_id
        assert started.pending_since == task.state_entered_at
    return started is not None


async def test_an_unlocked_start_lands_only_on_what_it_read(make_stack: StackFactory) -> None:
    stack = await make_stack(with_worker=False)
    rec, task = await _pending_start(stack)
    stale_queue = dataclasses.replace(rec, queue=dataclasses.replace(rec.queue, version=0))
    assert not await _start(stack, stale_queue, task)
    assert not await _start(stack, rec, dataclasses.replace(task, version=task.version + 1))
    assert (await tasks_of(stack, rec.queue.withdrawal_id))[0]["state"] == "PENDING"

    assert await _start(stack, rec, task)
    row = (await tasks_of(stack, rec.queue.withdrawal_id))[0]
    assert (row["state"], row["version"]) == ("CREATING", task.version + 1)
    events = await task_events(stack, task.task_id)
    assert [(e["event"], e["from_state"], e["to_state"]) for e in events] == [
        ("task.created", None, "PENDING"),
        ("start", "PENDING", "CREATING"),
    ]
    assert not await _start(stack, rec, task), "a second start of the same read changes nothing"


async def test_an_unlocked_start_waits_for_the_lock_and_yields_to_a_cancel(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(with_worker=False)
    rec, task = await _pending_start(stack)
    async with stack.runtime.pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute(
            "UPDATE order_queues SET cancel_requested = true, version = version + 1"
            " WHERE queue_id = $1",
            rec.queue.queue_id,
        )
        starting = asyncio.create_task(_start(stack, rec, task))
        await wait_until(lambda: _waiting_on_a_lock(stack), "the start blocked on the lock")
        await transaction.commit()
    assert await starting is False
    assert (await tasks_of(stack, rec.queue.withdrawal_id))[0]["state"] == "PENDING"


def _final_write(rec: store.QueueRecord, task: OrderTask, version: int) -> store.TaskWrite:
    """PENDING → CANCELLED for ``task`` as if read at ``version``."""
    before = dataclasses.replace(task, version=version)
    return store.TaskWrite(
        before=before,
        after=dataclasses.replace(before, state=TaskState.CANCELLED, outcome="cancelled"),
        withdrawal_id=rec.queue.withdrawal_id,
        event="cancel",
        actor="test",
        trace_id=None,
        details={},
        now=datetime.now(UTC),
    )


async def _finish_with(
    stack: Stack, rec: store.QueueRecord, write: store.TaskWrite, *, queue_version: int = 0
) -> None:
    """The queue's final write carrying ``write``, in autocommit: the statement alone must
    write both or neither."""
    queue = dataclasses.replace(rec.queue, version=queue_version or rec.queue.version)
    async with stack.runtime.pool.acquire() as conn:
        await store.save_queue(
            conn,
            queue,
            state=QueueState.CANCELLED,
            failure_code="cancelled",
            event="queue.cancelled",
            actor="test",
            trace_id=None,
            now=datetime.now(UTC),
            task=write,
        )


async def test_a_queue_write_carrying_a_task_write_lands_both_or_neither(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(with_worker=False)
    rec, task = await _pending_start(stack)
    wid = rec.queue.withdrawal_id

    events_before = len(await task_events(stack, task.task_id))
    for stale_task, stale_queue in ((1, 0), (0, 1)):
        with pytest.raises(store.StaleVersion):
            await _finish_with(
                stack,
                rec,
                _final_write(rec, task, task.version + stale_task),
                queue_version=rec.queue.version + stale_queue,
            )
        assert [t["state"] for t in await tasks_of(stack, wid)] == ["PENDING", "PENDING"]
        assert len(await task_events(stack, task.task_id)) == events_before
        async with stack.runtime.pool.acquire() as conn:
            after = await store.load_queue(conn, withdrawal_id=wid)
        assert after is not None
        assert (after.queue.state, after.queue.version) == ("ACTIVE", rec.queue.version)

    await _finish_with(stack, rec, _final_write(rec, task, task.version))
    rows = await tasks_of(stack, wid)
    assert (rows[0]["state"], rows[0]["version"]) == ("CANCELLED", task.version + 1)
    events = await task_events(stack, task.task_id)
    assert [(e["event"], e["from_state"], e["to_state"]) for e in events][-1] == (
        "cancel",
        "PENDING",
        "CANCELLED",
    )
    async with stack.runtime.pool.acquire() as conn:
        trail = await conn.fetch(
            "SELECT event, to_state FROM order_task_events WHERE queue_id = $1 ORDER BY event_id",
            rec.queue.queue_id,
        )
    # The task's row first: support reads the trail in this order, cause before effect.
    assert [(e["event"], e["to_state"]) for e in trail][-2:] == [
        ("cancel", "CANCELLED"),
        ("queue.cancelled", "CANCELLED"),
    ]
