"""The transactional outbox: messages written with the state change, published after commit.

``publish_now`` is the fast path right after a commit: it publishes the messages the
transaction wrote (kept in memory, not read back) and leaves deleting the rows to
:class:`~orchestrator.deferred.DeferredWrites`. ``run`` is the relay that publishes what a
crashed or disconnected process left behind. Each row is published with
``Nats-Msg-Id: ob-<id>`` (unless it carries its own), so a row published twice (fast path and
relay racing) is stored once by JetStream's duplicate window.

A publish the broker refuses for want of a stream (its store was lost) asks
:class:`~orchestrator.bus.Streams` to recreate the streams; the rows stay in the table until
a publish succeeds, so nothing written before or during the loss is lost with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from nats.js import JetStreamContext

from orchestrator import store
from orchestrator.bus import Names, Streams
from orchestrator.deferred import DeferredWrites
from orchestrator.store import sweeps

log = logging.getLogger("cascade.outbox")


class OutboxRelay:
    def __init__(
        self,
        pool: store.Pool,
        js: JetStreamContext | None,
        names: Names,
        deferred: DeferredWrites | None = None,
        streams: Streams | None = None,
    ) -> None:
        self.pool = pool
        self.js = js
        self.names = names
        self.deferred = deferred or DeferredWrites(pool)
        if streams is None and js is not None:
            streams = Streams(js, names)
        self.streams = streams

    async def publish_now(self, messages: Sequence[store.OutboxMessage]) -> None:
        """Publish what a transaction just committed; the rows are deleted a moment later.
        Failures are left for the relay (a lost stream is recreated first)."""
        if not messages or self.js is None:
            return
        done, failure = await self._publish(sorted(messages, key=_by_id))
        if done:
            self.deferred.outbox_published(done)
        if failure is not None:
            await self._heal(failure)

    async def _publish(
        self, messages: Sequence[store.OutboxMessage]
    ) -> tuple[list[int], Exception | None]:
        """The ids published, in order, and the error that stopped the rest (if one did)."""
        assert self.js is not None
        done: list[int] = []
        for message in messages:
            headers = {"Nats-Msg-Id": f"ob-{message.id}", **message.headers}
            try:
                await self.js.publish(message.subject, message.payload, headers=headers, timeout=5)
            except Exception as exc:  # noqa: BLE001 — the relay retries every failure
                log.warning(
                    "outbox publish failed", extra={"subject": message.subject, "error": repr(exc)}
                )
                return done, exc  # keep order: later rows wait for this one
            done.append(message.id)
        return done, None

    async def _heal(self, failure: Exception) -> None:
        if self.streams is not None:
            await self.streams.heal(failure)

    async def purge(self, subject: str) -> None:
        """Cancel a timer. Best effort: a timer that still fires is ignored as stale."""
        if self.js is None:
            return
        try:
            await self.js.purge_stream(self.names.stream, subject=subject)
        except Exception as exc:  # noqa: BLE001
            log.info("timer purge failed", extra={"subject": subject, "error": repr(exc)})

    async def relay_once(self, older_than_seconds: float = 2.0, limit: int = 500) -> int:
        """Publish rows the fast path did not (crash, NATS down). Returns how many."""
        if self.js is None:
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await sweeps.unpublished_outbox(
                conn, older_than_seconds=older_than_seconds, limit=limit
            )
            done, failure = await self._publish(rows)
            if done:
                await sweeps.delete_outbox(conn, done)
        if failure is not None:
            await self._heal(failure)  # outside the transaction: it holds no connection
        return len(done)

    async def run(self, interval: float = 1.0) -> None:
        while True:
            try:
                await self.relay_once()
            except Exception:
                log.exception("outbox relay pass failed")
            await asyncio.sleep(interval)


def _by_id(message: store.OutboxMessage) -> int:
    return message.id
