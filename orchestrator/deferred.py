"""Bookkeeping writes that may lag behind: batched, and written a few milliseconds later.

Two writes follow every state change and carry no decision: deleting outbox rows once JetStream
has stored them, and marking a notification acknowledged once cascade-core answered 2xx. Done
one by one they were about a fifth of the Postgres transactions per withdrawal; here they are
collected and written together, at most every ``interval`` seconds, in one transaction.

Losing a batch (a crash before the flush) is harmless by construction, which is why these
two and nothing else are deferred:

- an outbox row still present is published again by the relay under the same
  ``Nats-Msg-Id: ob-<id>``, and JetStream's duplicate window stores it once; a timer message
  re-sent after the window only re-arms a timer whose handler ignores it as stale;
- a notification not marked acknowledged is sent again by the notifier with the same
  ``Idempotency-Key``, which cascade-core answers as a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from orchestrator import store
from orchestrator.store import sweeps

log = logging.getLogger("cascade.deferred")


class DeferredWrites:
    """Collects outbox deletions and notification acks; one flusher task per process."""

    def __init__(self, pool: store.Pool, *, interval: float = 0.02) -> None:
        self._pool = pool
        self._interval = interval
        self._published: list[int] = []
        self._acked: list[tuple[str, str]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def outbox_published(self, ids: Iterable[int]) -> None:
        self._published.extend(ids)
        self._kick()

    def notification_acked(self, withdrawal_id: str, status: str) -> None:
        self._acked.append((withdrawal_id, status))
        self._kick()

    @property
    def pending(self) -> int:
        return len(self._published) + len(self._acked)

    def _kick(self) -> None:
        if self._closed:
            # Past close (a handler finishing during shutdown): the relay and the notifier
            # will redo the work, as after a crash.
            self._published.clear()
            self._acked.clear()
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="deferred")
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self._interval)  # let a batch gather
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 — kept for the next pass
                log.warning("deferred writes failed, will retry", extra={"error": repr(exc)})
                await asyncio.sleep(1.0)
                self._wake.set()

    async def flush(self) -> None:
        """Write everything collected so far (on failure it stays collected)."""
        published, self._published = self._published, []
        acked, self._acked = self._acked, []
        if not published and not acked:
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if published:
                    await sweeps.delete_outbox(conn, published)
                if acked:
                    await sweeps.notifications_acked(conn, acked)
        except BaseException:
            self._published[:0] = published
            self._acked[:0] = acked
            raise

    async def close(self) -> None:
        """Flush what is left (bounded) and stop the flusher."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        try:
            async with asyncio.timeout(3):
                await self.flush()
        except Exception as exc:  # noqa: BLE001 — the relay and notifier redo it
            log.warning("deferred writes not flushed at close", extra={"error": repr(exc)})
        self._published.clear()
        self._acked.clear()
