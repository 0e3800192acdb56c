"""The transactional outbox: messages written with the state change, published after commit.

``publish_now`` is the fast path right after a commit. ``run`` is the relay that publishes what
a crashed or disconnected process left behind. Each row is published with
``Nats-Msg-Id: ob-<id>`` (unless it carries its own), so a row published twice (fast path and
relay racing) is stored once by JetStream's duplicate window.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
from nats.js import JetStreamContext

from orchestrator import store
from orchestrator.bus import Names

log = logging.getLogger("cascade.outbox")


class OutboxRelay:
    def __init__(self, pool: store.Pool, js: JetStreamContext | None, names: Names) -> None:
        self.pool = pool
        self.js = js
        self.names = names

    async def publish_now(self, ids: Sequence[int]) -> None:
        """Publish these rows and delete them; failures are left for the relay."""
        if not ids or self.js is None:
            return
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, subject, payload, headers FROM outbox WHERE id = ANY($1::bigint[])"
                " ORDER BY id",
                list(ids),
            )
            done = await self._publish(rows)
            if done:
                await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", done)

    async def _publish(self, rows: Sequence[asyncpg.Record]) -> list[int]:
        assert self.js is not None
        done: list[int] = []
        for row in rows:
            headers = {"Nats-Msg-Id": f"ob-{row['id']}", **row["headers"]}
            try:
                await self.js.publish(
                    row["subject"], bytes(row["payload"]), headers=headers, timeout=5
                )
            except Exception as exc:  # noqa: BLE001 — the relay retries every failure
                log.warning(
                    "outbox publish failed", extra={"subject": row["subject"], "error": repr(exc)}
                )
                break  # keep order: later rows wait for this one
            done.append(row["id"])
        return done

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
            rows = await conn.fetch(
                "SELECT id, subject, payload, headers FROM outbox"
                " WHERE created_at < now() - make_interval(secs => $1)"
                " ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
                older_than_seconds,
                limit,
            )
            done = await self._publish(rows)
            if done:
                await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", done)
        return len(done)

    async def run(self, interval: float = 1.0) -> None:
        while True:
            try:
                await self.relay_once()
            except Exception:
                log.exception("outbox relay pass failed")
            await asyncio.sleep(interval)
