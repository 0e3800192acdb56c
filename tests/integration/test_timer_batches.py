"""Timer bursts: many firings applied in one transaction (``Engine.timers_fired``).

The batch must be indistinguishable from handling each firing alone: one transition and one
audit row per task, stale and duplicate firings ignored, firings that need a provider call
handed back, and a version conflict anywhere leaving nothing written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter
from typing import Any

import pytest

from contracts.messages import TaskMessage
from orchestrator import bus, store
from orchestrator.domain import Step, TaskState, settle
from orchestrator.engine import TimerDue
from orchestrator.store.uow import PostgresUnitOfWork
from tests.conftest import Stack, StackFactory, providers_document
from tests.faultkit import (
    create_withdrawal,
    publish,
    task_events,
    task_message,
    tasks_of,
    wait_task_state,
)
from tests.integration.test_webhook_intake import wait_consumed

SILENT = "sbx_silent"
POLLED = "sbx_silent-polled"
DEADLINE = "sbx_silent-deadline"


def _providers() -> dict[str, Any]:
    """``sbx_silent``: SLA, no polling (expiry is a plain move to MANUAL_CHECK); a silent
    provider with SLA then polling (expiry needs a provider call); a silent provider with no
    SLA whose polling deadline comes before its first tick (the deadline is its first timer)."""
    doc = providers_document()
    silent = doc["providers"][SILENT]
    silent["webhook_sla_seconds"] = 600
    silent["status_polling"] = None
    doc["providers"][POLLED] = {
        **silent,
        "status_polling": {"interval_seconds": 600, "max_polls": 3},
    }
    doc["providers"][DEADLINE] = {
        **silent,
        "webhook_sla_seconds": None,
        "status_polling": {"interval_seconds": 600, "max_polls": 3, "timeout_seconds": 300},
    }
    return doc


async def _executing(stack: Stack, provider: str, count: int) -> list[tuple[str, dict[str, Any]]]:
    wids = [await create_withdrawal(stack, [provider]) for _ in range(count)]
    tasks = [await wait_task_state(stack, wid, 0, "EXECUTING") for wid in wids]
    await wait_consumed(stack)
    return list(zip(wids, tasks, strict=True))


def _due(task: dict[str, Any], kind: str = "webhook_timeout", attempt: int = 0) -> TimerDue:
    return TimerDue(
        message=TaskMessage(task_id=task["task_id"], queue_id=task["queue_id"], attempt=attempt),
        kind=kind,  # type: ignore[arg-type]
        trace_id="0" * 31 + "1",
    )


async def test_a_batch_moves_each_task_once_and_hands_back_the_rest(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(providers=_providers())
    silent = await _executing(stack, SILENT, 6)
    polled = await _executing(stack, POLLED, 1)
    (stale_wid, stale) = (await _executing(stack, SILENT, 1))[0]
    first = silent[0][1]
    unknown = {"task_id": uuid.uuid4(), "queue_id": uuid.uuid4()}
    batch = [
        *(_due(task) for _wid, task in silent),
        _due(first),  # the same queue again: handed back, its own handler finds it stale
        _due(stale, "status_tick", 3),  # a stale generation: ignored
        _due(polled[0][1]),  # the SLA of a polled provider: needs a status call
        _due(unknown),  # no such queue: handed back, ignored one by one
    ]
    versions = {task["task_id"]: task["version"] for _wid, task in silent}

    rest = await stack.runtime.engine.timers_fired(batch)

    assert [(d.message.task_id, d.kind) for d in rest] == [
        (first["task_id"], "webhook_timeout"),
        (polled[0][1]["task_id"], "webhook_timeout"),
        (unknown["task_id"], "webhook_timeout"),
    ]
    stamps = set()
    for wid, task in silent:
        row = (await tasks_of(stack, wid))[0]
        assert (row["state"], row["version"]) == ("MANUAL_CHECK", versions[task["task_id"]] + 1)
        assert (row["timer_kind"], row["timer_due_at"]) == (None, None)
        moved = [
            e for e in await task_events(stack, task["task_id"]) if e["event"] != "task.created"
        ]
        assert [(e["event"], e["from_state"], e["to_state"], e["actor"]) for e in moved][-1] == (
            "webhook.sla_expired",
            "EXECUTING",
            "MANUAL_CHECK",
            "timer",
        )
        assert Counter(e["to_state"] for e in moved)["MANUAL_CHECK"] == 1
        assert moved[-1]["details"] == {"timer": "webhook_timeout", "attempt": 0}
        async with stack.runtime.pool.acquire() as conn:
            updated = await conn.fetchval(
                "SELECT updated_at FROM order_queues WHERE withdrawal_id = $1", wid
            )
        assert updated == row["updated_at"] == moved[-1]["created_at"]
        stamps.add(moved[-1]["created_at"])
    assert len(stamps) == 1, "one transaction, one clock reading"
    assert (await tasks_of(stack, polled[0][0]))[0]["state"] == "EXECUTING"
    assert (await tasks_of(stack, stale_wid))[0]["version"] == stale["version"]

    # Handed back and applied one by one, as the worker does: nothing more changes for the
    # duplicate and the unknown queue; the polled provider's SLA makes its status call.
    for due in rest:
        await stack.runtime.engine.timer_fired(due.message, due.kind, due.trace_id)
    assert (await tasks_of(stack, silent[0][0]))[0]["version"] == versions[first["task_id"]] + 1
    after = (await tasks_of(stack, polled[0][0]))[0]
    assert (after["state"], after["status_polls"], after["timer_kind"]) == (
        "EXECUTING",
        1,
        "status_tick",
    )


async def test_a_version_conflict_writes_nothing(make_stack: StackFactory) -> None:
    stack = await make_stack(providers=_providers())
    executing = await _executing(stack, SILENT, 3)
    rows = [(await tasks_of(stack, wid))[0] for wid, _task in executing]
    expired = Step(event="webhook.sla_expired", to=TaskState.MANUAL_CHECK, clear_timer=True)
    async with PostgresUnitOfWork(stack.runtime.pool, stack.runtime.relay) as uow:
        queues = await uow.load_queues([r["queue_id"] for r in rows])
        for n, row in enumerate(rows):
            queue = queues[row["queue_id"]]
            if n == 2:  # read before someone else's write
                stale = dataclasses.replace(queue.task(row["task_id"]), version=99)
                queue = dataclasses.replace(queue, tasks=(stale, *queue.tasks[1:]))
            transition = settle(queue, row["task_id"], expired, row["updated_at"])
            uow.add(transition, withdrawal_id=queue.withdrawal_id, actor="test", trace_id=None)
        with pytest.raises(store.StaleVersion):
            await uow.commit()
    for wid, task in executing:
        row = (await tasks_of(stack, wid))[0]
        assert (row["state"], row["version"]) == ("EXECUTING", task["version"])
        assert [e["event"] for e in await task_events(stack, task["task_id"])][-1] != (
            "webhook.sla_expired"
        )


async def test_the_worker_applies_a_burst_of_expired_slas_in_batches(
    make_stack: StackFactory,
) -> None:
    """Through the broker and the real worker: every SLA twice in one burst."""
    stack = await make_stack(providers=_providers())
    executing = await _executing(stack, SILENT, 40)
    messages = [
        (bus.WEBHOOK_TIMEOUT, task_message(task)) for _wid, task in executing for _ in range(2)
    ]
    await asyncio.gather(*(publish(stack, subject, payload) for subject, payload in messages))
    await wait_consumed(stack, timeout=30)
    stamps = set()
    for wid, task in executing:
        assert (await tasks_of(stack, wid))[0]["state"] == "MANUAL_CHECK"
        moved = [
            e for e in await task_events(stack, task["task_id"]) if e["to_state"] == "MANUAL_CHECK"
        ]
        assert len(moved) == 1, moved
        stamps.add(moved[0]["created_at"])
    # A transaction per firing would give every transition its own timestamp.
    assert len(stamps) < len(executing), "no firing was applied in a batch"


async def test_a_batch_does_not_wait_for_a_queue_a_handler_holds(make_stack: StackFactory) -> None:
    """A slow handler holding one queue's lock must not hold up the other firings."""
    stack = await make_stack(providers=_providers())
    executing = await _executing(stack, SILENT, 3)
    (held_wid, held), others = executing[0], executing[1:]
    async with stack.runtime.pool.acquire() as holder, holder.transaction():
        await holder.execute(
            "SELECT 1 FROM order_queues WHERE queue_id = $1 FOR UPDATE", held["queue_id"]
        )
        # Bounded only so that a regression fails instead of hanging the suite.
        rest = await asyncio.wait_for(
            stack.runtime.engine.timers_fired([_due(task) for _wid, task in executing]), 30
        )
        assert [d.message.task_id for d in rest] == [held["task_id"]]
        for wid, _task in others:
            assert (await tasks_of(stack, wid))[0]["state"] == "MANUAL_CHECK"
    assert (await tasks_of(stack, held_wid))[0]["state"] == "EXECUTING"


async def test_polling_deadlines_in_a_batch_are_plain_moves(make_stack: StackFactory) -> None:
    """No SLA, polling for at most five minutes: entering EXECUTING arms the deadline (the
    first tick would come after it). Its firing needs no call: written by the batch."""
    stack = await make_stack(providers=_providers())
    executing = await _executing(stack, DEADLINE, 3)
    (stale_wid, stale), *due = executing
    for wid, _task in executing:
        row = (await tasks_of(stack, wid))[0]
        assert (row["timer_kind"], row["timer_attempt"], row["status_polls"]) == (
            "status_timeout",
            0,
            0,
        )
        armed_for = row["timer_due_at"] - row["state_entered_at"]
        assert abs(armed_for.total_seconds() - 300) < 1, armed_for
    versions = {task["task_id"]: task["version"] for _wid, task in executing}

    rest = await stack.runtime.engine.timers_fired(
        [*(_due(task, "status_timeout", 0) for _wid, task in due), _due(stale, "status_timeout", 1)]
    )

    assert rest == []
    for wid, task in due:
        row = (await tasks_of(stack, wid))[0]
        assert (row["state"], row["version"]) == ("MANUAL_CHECK", versions[task["task_id"]] + 1)
        assert (row["timer_kind"], row["timer_due_at"]) == (None, None)
        last = (await task_events(stack, task["task_id"]))[-1]
        assert (last["event"], last["from_state"], last["to_state"], last["details"]) == (
            "status.timeout",
            "EXECUTING",
            "MANUAL_CHECK",
            {"timer": "status_timeout", "attempt": 0},
        )
    row = (await tasks_of(stack, stale_wid))[0]
    assert (row["state"], row["version"]) == ("EXECUTING", versions[stale["task_id"]])
