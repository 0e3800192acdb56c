"""Deferred bookkeeping writes on a real Postgres: batched, retried, never half-done.

Outbox deletions and notification acks are written a moment after the fact
(``orchestrator/deferred.py``). They must land; a failed flush must keep them for the next
one; and whatever is lost at a crash must only mean work done again (the row stays, so the
relay or the notifier repeats an idempotent step), never work skipped.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from orchestrator import store
from orchestrator.deferred import DeferredWrites
from tests.conftest import Stack, StackFactory
from tests.faultkit import create_withdrawal
from tests.waiting import wait_until


async def _rows(stack: Stack, count: int) -> tuple[list[int], list[str]]:
    """``count`` outbox rows and ``count`` pending notifications."""
    ids, wids = [], []
    later = datetime.now(UTC) + timedelta(hours=1)  # the notifier leaves them alone
    for _ in range(count):
        wids.append(await create_withdrawal(stack, ["sbx_ok"]))
    async with stack.runtime.pool.acquire() as conn:
        for i, wid in enumerate(wids):
            message = await store.enqueue(conn, "test.deferred", b"{}", {"k": str(i)})
            ids.append(message.id)
            await conn.execute(
                "INSERT INTO notifications (withdrawal_id, status, body, next_attempt_at)"
                " VALUES ($1, 'succeeded', '\\x7b7d', $2)",
                wid,
                later,
            )
    return ids, wids


async def _state(stack: Stack, ids: list[int], wids: list[str]) -> tuple[int, int]:
    """(outbox rows left, notifications acked)."""
    async with stack.runtime.pool.acquire() as conn:
        left = await conn.fetchval("SELECT count(*) FROM outbox WHERE id = ANY($1::bigint[])", ids)
        acked = await conn.fetchval(
            "SELECT count(*) FROM notifications WHERE withdrawal_id = ANY($1::text[])"
            " AND acked_at IS NOT NULL AND attempts = 1",
            wids,
        )
    return left, acked


async def test_collected_writes_land_together(make_stack: StackFactory) -> None:
    stack = await make_stack(with_worker=False)
    ids, wids = await _rows(stack, 20)
    deferred = DeferredWrites(stack.runtime.pool, interval=0.01)
    try:
        deferred.outbox_published(ids)
        for wid in wids:
            deferred.notification_acked(wid, "succeeded")
            deferred.notification_acked(wid, "succeeded")  # a second ack changes nothing

        await wait_until(
            lambda: _state(stack, ids, wids),
            done=lambda state: state == (0, 20),
            timeout=15,
            interval=0.05,
            what="outbox rows deleted and notifications acked",
        )
        assert deferred.pending == 0
    finally:
        await deferred.close()


async def test_a_failed_flush_keeps_everything_and_close_flushes(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(with_worker=False)
    ids, wids = await _rows(stack, 3)
    broken = await store.create_pool(stack.settings.database_url or "", min_size=1, max_size=1)
    await broken.close()
    deferred = DeferredWrites(broken, interval=3600)  # flushed by hand only
    deferred.outbox_published(ids)
    deferred.notification_acked(wids[0], "succeeded")
    with pytest.raises(asyncpg.InterfaceError, match="pool is clos"):
        await deferred.flush()
    assert deferred.pending == 4, "a failed flush must keep what it could not write"
    assert await _state(stack, ids, wids) == (3, 0), "nothing half-written"

    # The same writes through a working pool; close() writes what is left before returning.
    working = DeferredWrites(stack.runtime.pool, interval=3600)
    working.outbox_published(ids)
    working.notification_acked(wids[0], "succeeded")
    await working.close()
    assert await _state(stack, ids, wids) == (0, 1)
    # Past close nothing is collected: the relay and the notifier redo such work.
    working.outbox_published([10**12])
    assert working.pending == 0
    await deferred.close()  # cannot flush: warns, drops (the rows stay for the relay)
    assert deferred.pending == 0
