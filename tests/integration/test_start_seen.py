"""A start carries the versions it was decided on, and lands without a read while they hold.

The create and the queue's move to its next task publish the start with the queue and task
versions ``decide()`` approved it on; the worker's PENDING → CREATING is then one conditional
statement, and only the create's own transaction reads the withdrawal. When anything changed
in between, the start takes the locked path, which reads and decides as usual.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from contracts.messages import StartSeen, TaskMessage
from orchestrator import bus, store
from tests.conftest import Stack, StackFactory
from tests.faultkit import create_withdrawal, task_events, tasks_of, wait_task_state


async def _published_start(stack: Stack, task_id: uuid.UUID) -> TaskMessage:
    names = stack.runtime.relay.names
    message = await stack.runtime.js.get_last_msg(names.stream, names.subject(bus.TASK_START))
    start = msgspec.json.decode(message.data or b"", type=TaskMessage)
    assert start.task_id == task_id
    return start


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[uuid.UUID]:
    """Every locked read of a withdrawal (``store.load_all``, a unit of work's load) from now
    on: a start without versions needs one before its own write, the create one after it."""
    reads: list[uuid.UUID] = []
    load_all: Callable[..., Awaitable[Any]] = store.load_all

    async def counting(*args: Any, **kwargs: Any) -> Any:
        reads.append(kwargs["queue_id"])
        return await load_all(*args, **kwargs)

    monkeypatch.setattr(store, "load_all", counting)
    return reads


async def _created(make_stack: StackFactory) -> tuple[Stack, str, dict[str, Any], TaskMessage]:
    """A ``[sbx_silent, sbx_ok]`` withdrawal no worker picked up: its first task and start."""
    stack = await make_stack(with_worker=False)
    wid = await create_withdrawal(stack, ["sbx_silent", "sbx_ok"])
    first = (await tasks_of(stack, wid))[0]
    return stack, wid, first, await _published_start(stack, first["task_id"])


async def test_a_created_withdrawals_start_lands_without_a_read(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack, wid, first, start = await _created(make_stack)
    async with stack.runtime.pool.acquire() as conn:
        queue_version = await conn.fetchval(
            "SELECT version FROM order_queues WHERE queue_id = $1", first["queue_id"]
        )
    assert start.seen == StartSeen(queue_version=queue_version, task_version=first["version"])

    reads = _count_reads(monkeypatch)
    await stack.runtime.engine.start_task(
        start.queue_id, start.task_id, actor="test", seen=start.seen
    )
    assert reads == [start.queue_id], "one read: the create's, after the start was written"
    assert (await tasks_of(stack, wid))[0]["state"] == "EXECUTING"
    events = [(e["event"], e["to_state"]) for e in await task_events(stack, start.task_id)]
    assert events == [
        ("task.created", "PENDING"),
        ("start", "CREATING"),
        ("create.accepted", "EXECUTING"),
    ]


async def test_a_start_whose_versions_moved_on_reads_and_decides_again(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack, wid, _first, start = await _created(make_stack)
    cancelled = await stack.client.post(f"/v1/withdrawals/{wid}/cancel", headers=stack.headers)
    assert cancelled.status_code == 200, cancelled.text

    reads = _count_reads(monkeypatch)
    await stack.runtime.engine.start_task(
        start.queue_id, start.task_id, actor="test", seen=start.seen
    )
    assert reads == [start.queue_id], "the locked path read and decided"
    assert (await tasks_of(stack, wid))[0]["state"] == "CANCELLED"
    events = [e["event"] for e in await task_events(stack, start.task_id)]
    assert "start" not in events
    ledger = await stack.ledger()
    assert str(start.task_id) not in ledger["operations"], "no freeze for a cancelled start"


async def test_the_next_tasks_start_also_lands_without_a_read(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a decline the queue publishes the next start with the versions it decided on."""
    reads = _count_reads(monkeypatch)
    stack = await make_stack()
    wid = await create_withdrawal(stack, ["sbx_decline", "sbx_silent"])
    second = await wait_task_state(stack, wid, 1, "EXECUTING")
    assert reads == [second["queue_id"]] * 2, "one read per attempt: its create's"
    start = await _published_start(stack, second["task_id"])
    assert start.seen is not None
    events = [e["event"] for e in await task_events(stack, second["task_id"])]
    assert events[:2] == ["task.created", "start"]


async def test_a_start_with_versions_out_of_turn_writes_nothing(make_stack: StackFactory) -> None:
    """A start for the second task, replayed or published by hand with the versions it had at
    the create, while the first attempt is executing: not its turn, so nothing is written and
    no second provider is asked."""
    stack, wid, first, start = await _created(make_stack)
    await stack.runtime.engine.start_task(
        start.queue_id, start.task_id, actor="test", seen=start.seen
    )
    second = (await tasks_of(stack, wid))[1]
    assert first["state"] == "PENDING"
    assert (await tasks_of(stack, wid))[0]["state"] == "EXECUTING"
    assert start.seen is not None
    out_of_turn = StartSeen(queue_version=start.seen.queue_version, task_version=second["version"])
    await stack.runtime.engine.start_task(
        start.queue_id, second["task_id"], actor="test", seen=out_of_turn
    )
    rows = await tasks_of(stack, wid)
    assert [r["state"] for r in rows] == ["EXECUTING", "PENDING"]
    assert str(second["task_id"]) not in (await stack.ledger())["operations"]
