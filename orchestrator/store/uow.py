"""The engine's unit of work on Postgres, and the few reads it makes outside one.

A :class:`PostgresUnitOfWork` is one transaction: it takes the queue row lock when it loads a
withdrawal (so the events of one withdrawal are applied one at a time, by whichever process
holds it), collects what the handler decided (task and queue changes with their audit rows,
messages to publish, timers to cancel, the final notification) and writes all of it at
:meth:`~PostgresUnitOfWork.commit`, then publishes. Leaving the block without a commit rolls
back: nothing the handler decided is written. Each write is version-checked: under the lock
a mismatch is a bug, and it fails the transaction (:class:`~orchestrator.store.StaleVersion`)
instead of corrupting the record.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Self

from orchestrator import store
from orchestrator.domain import START_EVENT, OrderQueue, TaskChange, Transition
from orchestrator.faults import fault_point
from orchestrator.store import breakers

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy
    from asyncpg.transaction import Transaction

    from orchestrator.outbox import OutboxRelay


class PostgresUnitOfWork:
    """One engine transaction (see the module docstring)."""

    def __init__(self, pool: store.Pool, relay: OutboxRelay) -> None:
        self._pool = pool
        self._relay = relay
        self._conn: PoolConnectionProxy[asyncpg.Record] | None = None
        self._tx: Transaction | None = None
        self._writes: list[store.TaskWrite | store.QueueWrite] = []
        self._messages: list[store.NewMessage] = []
        self._purges: list[str] = []

    async def __aenter__(self) -> Self:
        conn = await self._pool.acquire()
        try:
            tx = conn.transaction()
            await tx.start()
        except BaseException:
            await self._pool.release(conn)
            raise
        self._conn, self._tx = conn, tx
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._conn is None:
            return
        try:
            if self._tx is not None:
                await self._tx.rollback()
        finally:
            await self._release()

    @property
    def conn(self) -> store.Connection:
        assert self._conn is not None, "the unit of work is not open"
        return self._conn

    async def load(self, queue_id: uuid.UUID) -> store.Loaded | None:
        """A withdrawal with its queue, the queue row locked until the end."""
        return await store.load_all(self.conn, queue_id=queue_id, lock=True)

    async def load_queues(self, queue_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, OrderQueue]:
        """Many queues, locked in queue_id order; queues another transaction holds are left out
        (a batch must not wait on one slow handler)."""
        records = await store.load_queues(self.conn, queue_ids, lock=True, skip_locked=True)
        return {queue_id: record.queue for queue_id, record in records.items()}

    async def in_flight(self, provider_id: str, *, lock: bool = True) -> int:
        return await breakers.in_flight(self.conn, provider_id, lock=lock)

    async def take_rate(
        self, provider_id: str, per_second: float, burst: int, now: datetime, horizon: float
    ) -> float:
        return await breakers.take_rate(
            self.conn, provider_id, per_second, burst, now=now, horizon=horizon
        )

    async def take_probe(
        self, provider_id: str, task_id: uuid.UUID, now: datetime, until: datetime
    ) -> bool:
        return await breakers.take_probe(self.conn, provider_id, task_id, now, until)

    def add(
        self,
        transition: Transition,
        *,
        withdrawal_id: str,
        actor: str,
        trace_id: str | None,
        notification: store.Notification | None = None,
    ) -> None:
        """Collect the writes of ``transition``; ``notification`` goes with the queue's final
        state."""
        for change in transition.changes:
            if isinstance(change, TaskChange):
                self._writes.append(
                    store.TaskWrite(
                        before=change.before,
                        after=change.after,
                        withdrawal_id=withdrawal_id,
                        event=change.event,
                        actor=actor,
                        trace_id=trace_id,
                        details=change.details,
                        now=transition.at,
                        timer=change.timer,
                        clear_timer=change.clear_timer,
                    )
                )
            else:
                self._writes.append(
                    store.QueueWrite(
                        before=change.before,
                        after=change.after,
                        event=change.event,
                        actor=actor,
                        trace_id=trace_id,
                        now=transition.at,
                        cancel_reason=change.cancel_reason,
                        notification=notification,
                    )
                )

    def publish(self, message: store.NewMessage) -> None:
        """Publish ``message`` once the transaction committed (outbox)."""
        self._messages.append(message)

    def purge(self, subject: str) -> None:
        """Cancel the timer on ``subject`` once the transaction committed. A timer this
        transaction armed there earlier is dropped: it was never armed."""
        self._purges.append(subject)
        self._messages = [m for m in self._messages if m.subject != subject]

    async def commit(self) -> None:
        """Write everything collected, commit, hand the connection back, then publish."""
        conn = self.conn
        writes = self._writes
        n = 0
        while n < len(writes):
            write, following = writes[n], writes[n + 1] if n + 1 < len(writes) else None
            if isinstance(write, store.QueueWrite):
                await store.save_queue(conn, write)
                n += 1
            elif isinstance(following, store.QueueWrite) and following.final:
                # The task write that makes the queue final travels in the queue's final
                # statement: one round-trip less per withdrawal (with one task copy per
                # change, sync_ok 0.85x -> 1.05x the commit before the redesign; README).
                await store.save_queue(conn, following, task=write)
                n += 2
            elif len(run := _plain_run(writes, n)) > 1:
                # A burst of timer firings: their plain moves in one statement (timers bench:
                # 5.5-6.0k -> 8.2-10.6k timers/s against a statement each).
                await store.save_transitions(conn, run)
                n += len(run)
            else:
                await store.save_task(conn, write)
                n += 1
        outbox = [
            await store.enqueue(conn, m.subject, m.payload, m.headers) for m in self._messages
        ]
        assert self._tx is not None
        await self._tx.commit()
        self._tx = None
        fault_point("after_state_write")
        # The connection is back in the pool first: publishing takes its own, and a handler
        # holding two at once deadlocks a busy pool.
        await self._release()
        # Purge before publishing: a timer this transaction re-armed on a purged subject (armed
        # after the purge) survives.
        purges = list(dict.fromkeys(self._purges))
        if purges:
            await asyncio.gather(*(self._relay.purge(subject) for subject in purges))
        await self._relay.publish_now(outbox)

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.release(conn)


class PostgresEngineStore:
    """What the engine reads and writes in Postgres: units of work, and single statements that
    need no transaction of their own."""

    def __init__(self, pool: store.Pool, relay: OutboxRelay) -> None:
        self._pool = pool
        self._relay = relay

    def unit_of_work(self) -> PostgresUnitOfWork:
        return PostgresUnitOfWork(self._pool, self._relay)

    async def match_webhook(
        self, provider_id: str, order_id: str, reference: str, status: str
    ) -> tuple[uuid.UUID, uuid.UUID] | str:
        async with self._pool.acquire() as conn:
            return await store.match_webhook(conn, provider_id, order_id, reference, status)

    async def start_pending(
        self,
        *,
        queue_id: uuid.UUID,
        queue_version: int,
        task_id: uuid.UUID,
        task_version: int,
        actor: str,
        trace_id: str | None,
        now: datetime,
        providers: Sequence[str],
    ) -> store.Started | None:
        async with self._pool.acquire() as conn:
            return await store.start_pending(
                conn,
                queue_id=queue_id,
                queue_version=queue_version,
                task_id=task_id,
                task_version=task_version,
                event=START_EVENT,
                actor=actor,
                trace_id=trace_id,
                now=now,
                providers=providers,
            )

    async def queue_of_task(self, task_id: uuid.UUID) -> uuid.UUID | None:
        async with self._pool.acquire() as conn:
            return await store.queue_of_task(conn, task_id)

    async def load_queue(self, queue_id: uuid.UUID) -> OrderQueue | None:
        async with self._pool.acquire() as conn:
            record = await store.load_queue(conn, queue_id=queue_id)
        return record.queue if record else None


def _plain_run(
    writes: Sequence[store.TaskWrite | store.QueueWrite], start: int
) -> list[store.TaskWrite]:
    """The plain task state changes from ``writes[start]`` on that one statement can write
    (:func:`store.save_transitions`): each of another task, no timer armed, at one time, and
    none that a final queue write should carry."""
    run: list[store.TaskWrite] = []
    seen: set[object] = set()
    for n in range(start, len(writes)):
        write = writes[n]
        following = writes[n + 1] if n + 1 < len(writes) else None
        if (
            not isinstance(write, store.TaskWrite)
            or not write.changed
            or write.timer is not None
            or write.now != writes[start].now
            or write.before.task_id in seen
            or (isinstance(following, store.QueueWrite) and following.final)
        ):
            break
        seen.add(write.before.task_id)
        run.append(write)
    return run
