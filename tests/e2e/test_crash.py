"""Crash faults: a real worker process SIGKILLs itself at an injected point, another takes over.

The gateway runs in the test process (``make_stack(with_worker=False)``); the worker is
``python -m tests.crashpoint --after N POINT worker``: the worker with the same settings and a
fault hook that SIGKILLs it. It runs with ``WORKER_CONCURRENCY=1`` so that messages are
handled one at a time in stream order and ``--after`` picks *which* call dies. The four
withdrawals are created before the worker starts, so the stream holds their first
``order.task.start`` messages in this order:

1. ``[sbx_sync_ok]``: freeze #1, create #1 (succeeded), commit = balance call #1,
   commits #1 (→ CREATING) and #2 (→ SUCCEEDED, queue COMPLETED);
2. ``[sbx_decline, sbx_ok]``: freeze #2, create #2 (declined), rollback = balance call #2,
   commits #3 (→ CREATING) and #4 (→ SKIPPED, with the next task's start in the outbox);
3. ``[sbx_accept_fail, sbx_sync_ok]`` and 4. ``[sbx_decline]``.

After the kill, a second worker (no fault) must finish everything: the ledger clean, one
commit per success, no freeze left open, every state entered once and audited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack, StackFactory
from tests.faultkit import (
    CrashAt,
    assert_settled,
    create_withdrawal,
    task_events,
    worker_process,
)
from tests.integration.test_webhook_intake import wait_consumed

pytestmark = pytest.mark.e2e

CASCADES: list[tuple[list[str], str]] = [
    (["sbx_sync_ok"], "succeeded"),
    (["sbx_decline", "sbx_ok"], "succeeded"),
    (["sbx_accept_fail", "sbx_sync_ok"], "succeeded"),
    (["sbx_decline"], "failed"),
]


async def _rows(stack: Stack, sql: str) -> list[dict[str, Any]]:
    async with stack.runtime.pool.acquire() as conn:
        return [dict(r) for r in await conn.fetch(sql)]


async def _creating(stack: Stack) -> list[dict[str, Any]]:
    return await _rows(stack, "SELECT * FROM order_tasks WHERE state = 'CREATING'")


async def _evidence(stack: Stack, point: str) -> None:
    """The kill left exactly the half-done work the point names (the window was really hit)."""
    ledger = (await stack.ledger())["operations"]
    creating = await _creating(stack)
    if point in ("after_freeze", "after_provider_create", "after_balance_call"):
        # The call happened, the transaction that would have recorded it did not commit.
        assert creating, "no task was caught mid-create"
        assert all(t["freeze_state"] == "none" for t in creating), creating
        ops = {str(t["task_id"]): ledger.get(str(t["task_id"])) for t in creating}
        if point == "after_balance_call":
            assert "committed" in ops.values() or "rolled_back" in ops.values(), ops
        else:
            assert "frozen" in ops.values(), ops
    if point == "after_provider_create":
        found = False
        for task in creating:
            response = await stack.client.get(
                f"/sandbox/providers/{task['provider_id']}/orders/{task['provider_order_id']}"
            )
            found = found or (response.status_code == 200 and task["provider_reference"] is None)
        assert found, "no provider order the record does not know of"
    if point == "after_state_write":
        # Committed with a message still in the outbox: only Postgres knows about it.
        outbox = await _rows(stack, "SELECT subject FROM outbox")
        assert any(row["subject"].endswith("order.task.start") for row in outbox), outbox


@pytest.mark.parametrize(
    ("point", "after"),
    [
        ("after_freeze", 0),
        ("after_provider_create", 0),
        ("after_balance_call", 0),  # the commit of withdrawal 1
        ("after_balance_call", 1),  # the rollback of withdrawal 2's decline
        ("after_state_write", 3),  # withdrawal 2's decline, next task's start in the outbox
        ("after_publish", 3),  # the same commit, published, the message not acked
    ],
)
async def test_worker_killed_at_a_fault_point_recovers(
    make_stack: StackFactory, tmp_path: Path, point: str, after: int
) -> None:
    stack = await make_stack(env={"JETSTREAM_ACK_WAIT_SECONDS": "2"}, with_worker=False)
    expected = {}
    for providers, status in CASCADES:
        expected[await create_withdrawal(stack, providers)] = status
    if (point, after) == ("after_balance_call", 1):
        # Withdrawal 2's decline is lost with the crash: it may have said stop, so it does.
        expected[list(expected)[1]] = "failed"

    async with worker_process(
        stack,
        tmp_path / "worker-faulty.log",
        crash=CrashAt(point, after),
        WORKER_CONCURRENCY="1",
    ) as faulty:
        code = await faulty.wait_exit(timeout=30)
    assert code == -9, f"worker exited with {code}, not SIGKILL; log:\n{faulty.log_tail()}"
    await _evidence(stack, point)
    stranded = await _creating(stack)

    async with worker_process(stack, tmp_path / "worker-healthy.log") as healthy:
        for wid in expected:
            await stack.wait_final(wid, timeout=30)

        # Stragglers (duplicate webhooks, redelivered starts) absorbed before reading.
        await wait_consumed(stack, timeout=20)
        await assert_settled(stack, expected)
        assert await healthy.stop() == 0, healthy.log_tail()
    if (point, after) == ("after_balance_call", 1):
        await _resumed_after_its_rollback(stack, stranded)


async def _resumed_after_its_rollback(stack: Stack, stranded: list[dict[str, Any]]) -> None:
    """The decline's rollback was made, its record was not: resumed, the freeze answers
    ``rolled_back`` and the attempt ends there — no second create, no second rollback."""
    (task,) = stranded
    events = [e["event"] for e in await task_events(stack, task["task_id"])]
    assert events[-1] == "freeze.rolled_back", events
    operations = (await stack.ledger())["operation_details"]
    operation = operations[str(task["task_id"])]
    history = operation["history"]
    assert [h["action"] for h in history] == ["freeze", "rollback", "freeze"], history
    assert history[-1]["result"] == "rolled_back", history
    # The cascade stopped there: its next provider (sbx_ok) was never asked.
    wid = operation["withdrawal_id"]
    withdrawal = await stack.withdrawal(wid)
    assert (withdrawal["status"], withdrawal["failure_code"]) == ("failed", "provider_error")
    assert withdrawal["provider_id"] == "sbx_decline"  # the one tried, not the one skipped
    providers = [d["provider_id"] for d in operations.values() if d["withdrawal_id"] == wid]
    assert providers == ["sbx_decline"], providers


@pytest.mark.parametrize(("point", "after"), [("after_balance_call", 3), ("after_state_write", 5)])
async def test_worker_killed_with_many_withdrawals_in_flight(
    make_stack: StackFactory, tmp_path: Path, point: str, after: int
) -> None:
    """Default concurrency: the kill takes down every handler that was mid-transaction."""
    stack = await make_stack(env={"JETSTREAM_ACK_WAIT_SECONDS": "2"}, with_worker=False)
    expected = {}
    for providers, status in CASCADES * 3:
        expected[await create_withdrawal(stack, providers)] = status

    async with worker_process(
        stack,
        tmp_path / "worker-faulty.log",
        crash=CrashAt(point, after),
    ) as faulty:
        code = await faulty.wait_exit(timeout=30)
    assert code == -9, f"worker exited with {code}, not SIGKILL; log:\n{faulty.log_tail()}"
    async with stack.runtime.pool.acquire() as conn:
        unfinished = await conn.fetchval("SELECT count(*) FROM order_queues WHERE state = 'ACTIVE'")
    assert unfinished > 0, "everything finished before the kill: nothing was tested"
    # A decline whose rollback was made but not recorded is lost with the crash; its resume
    # stops the cascade (the decline may have said so): that withdrawal fails.
    operations = (await stack.ledger())["operation_details"]
    for task in await _creating(stack):
        operation = operations.get(str(task["task_id"]))
        if operation is not None and operation["state"] == "rolled_back":
            expected[operation["withdrawal_id"]] = "failed"

    async with worker_process(stack, tmp_path / "worker-healthy.log") as healthy:
        for wid in expected:
            await stack.wait_final(wid, timeout=30)
        await wait_consumed(stack, timeout=20)
        await assert_settled(stack, expected)
        assert await healthy.stop() == 0, healthy.log_tail()
