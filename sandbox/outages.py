"""Provider health in the sandbox: scripted outages, and the requests each provider received.

An **outage** makes one sandbox provider answer a share of every request it gets (create,
status, cancel) with ``503``, and hold another share past the client's read timeout before a
``504`` (as ``sbx_flaky`` and cascade-core's fault injection do), from its start until its end.
Nothing reaches the provider's order book during an outage: an order is neither created nor
cancelled by a request the outage answered, so a recheck after the outage finds it absent.
Webhooks already scheduled are still sent (a provider's API being down does not stop its
outbound queue).

Outages are rows of the sandbox schema (``outages``, times in the sandbox clock's seconds),
because the sandbox may run as several processes over one schema (several gateways mounting
it, ``cascade-gateway sandbox`` processes, the chaos fleet): every one of them must refuse the
same requests. Each process reads the rows not yet ended at most every
:data:`CACHE_SECONDS` and decides start and end against its clock per request, so an outage
starts and ends on time everywhere, while a ``PUT`` or ``DELETE`` made through another process
is seen here at most :data:`CACHE_SECONDS` later (at once through this one).

**Request counts** are one row per (provider, kind, answer) in ``provider_requests``, bumped by
one UPSERT per request, so the counts of every process add up in one place and outlive them.
``answer`` is ``ok`` (any 2xx/3xx), ``timeout`` (a ``504`` after a hold) or the HTTP status
(``503``, ``404``, ``422`` …).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import msgspec
from litestar import Request, Response, Router, delete, get, put
from litestar.params import FromPath

from sandbox.core import error_response, json_response
from sandbox.database import SandboxDb
from sandbox.scenarios import Scenario, outage_problem

log = logging.getLogger("sandbox.outages")

RequestKind = Literal["create", "status", "cancel"]
CACHE_SECONDS = 0.5
"""How stale a process's copy of the outage rows may be: one small query per process per
half second, instead of one per provider request, for a lag no test or bench can tell."""
_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


class OutageBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``PUT /sandbox/providers/{id}/outage``."""

    duration_seconds: float
    error_ratio: float = 0.0
    timeout_ratio: float = 0.0
    timeout_seconds: float | None = None


def _iso(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, kw_only=True)
class Outage:
    """One outage of one provider, from ``starts_at`` to ``ends_at`` (clock seconds)."""

    provider_id: str
    error_ratio: float
    timeout_ratio: float
    timeout_seconds: float
    starts_at: float
    ends_at: float
    source: str
    """``api`` (``PUT``) or ``scenario:<name>``."""

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def view(self, now: float) -> dict[str, Any]:
        return {
            "provider_id": self.provider_id,
            "error_ratio": self.error_ratio,
            "timeout_ratio": self.timeout_ratio,
            "timeout_seconds": self.timeout_seconds,
            "starts_at": _iso(self.starts_at),
            "ends_at": _iso(self.ends_at),
            "active": self.active(now),
            "remaining_seconds": round(max(0.0, self.ends_at - max(now, self.starts_at)), 3),
            "source": self.source,
        }


def _outage_of(row: asyncpg.Record) -> Outage:
    return Outage(
        provider_id=row["provider_id"],
        error_ratio=row["error_ratio"],
        timeout_ratio=row["timeout_ratio"],
        timeout_seconds=row["timeout_seconds"],
        starts_at=row["starts_at"],
        ends_at=row["ends_at"],
        source=row["source"],
    )


_INSERT_OUTAGE = (
    "INSERT INTO outages (provider_id, error_ratio, timeout_ratio, timeout_seconds,"
    " starts_at, ends_at, source) VALUES ($1, $2, $3, $4, $5, $6, $7)"
)


class OutageBook:
    """The outages of every provider: stored in the schema, read through a short cache."""

    def __init__(
        self,
        db: SandboxDb,
        *,
        default_timeout_seconds: float,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.default_timeout_seconds = default_timeout_seconds
        self._clock = clock
        # Seeded on purpose: a run must be reproducible; nothing here is a secret.
        self._rng = random.Random(f"{seed}:outages")  # noqa: S311
        self._cached: dict[str, list[Outage]] = {}
        self._cached_at = -math.inf  # time.monotonic() of the last read
        self._refresh = asyncio.Lock()

    def now(self) -> float:
        """The sandbox clock the outages are timed by."""
        return self._clock()

    def _forget(self) -> None:
        self._cached_at = -math.inf

    async def _not_ended(self) -> dict[str, list[Outage]]:
        if time.monotonic() - self._cached_at < CACHE_SECONDS:
            return self._cached
        async with self._refresh:
            # Requests queued behind the one that read find the copy fresh: one query in all.
            if time.monotonic() - self._cached_at >= CACHE_SECONDS:
                rows = await self.db.pool.fetch(
                    "SELECT * FROM outages WHERE ends_at > $1", self._clock()
                )
                fresh: dict[str, list[Outage]] = {}
                for row in rows:
                    fresh.setdefault(row["provider_id"], []).append(_outage_of(row))
                self._cached, self._cached_at = fresh, time.monotonic()
        return self._cached

    async def current(self, provider_id: str) -> Outage | None:
        """The provider's outage in force now, if any (from the cached copy)."""
        now = self._clock()
        active = [o for o in (await self._not_ended()).get(provider_id, ()) if o.active(now)]
        return max(active, key=lambda o: o.starts_at, default=None)

    async def disrupt(self, provider_id: str) -> Response[bytes] | None:
        """The outage's answer to one request, or ``None`` to let the provider answer it."""
        outage = await self.current(provider_id)
        if outage is None:
            return None
        roll = self._rng.random()
        if roll < outage.error_ratio:
            return error_response(503, "unavailable", f"sandbox outage of {provider_id}")
        if roll < outage.error_ratio + outage.timeout_ratio:
            # Held past the gateway's read timeout: the client gives up first, as at a provider
            # whose load balancer still accepts connections while nothing behind it answers.
            await asyncio.sleep(outage.timeout_seconds)
            return error_response(504, "gateway_timeout", f"sandbox outage of {provider_id}")
        return None

    async def schedule(self, provider_id: str | None = None) -> list[Outage]:
        """Outages in force or still to come, from the database (not the cache)."""
        rows = await self.db.pool.fetch(
            "SELECT * FROM outages WHERE ends_at > $1 AND ($2::text IS NULL OR provider_id = $2)"
            " ORDER BY provider_id, starts_at",
            self._clock(),
            provider_id,
        )
        return [_outage_of(row) for row in rows]

    async def put(self, provider_id: str, body: OutageBody) -> Outage:
        """Start an outage now, replacing the provider's outages in force or still to come."""
        now = self._clock()
        outage = Outage(
            provider_id=provider_id,
            error_ratio=body.error_ratio,
            timeout_ratio=body.timeout_ratio,
            timeout_seconds=(
                self.default_timeout_seconds
                if body.timeout_seconds is None
                else body.timeout_seconds
            ),
            starts_at=now,
            ends_at=now + body.duration_seconds,
            source="api",
        )
        async with self.db.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM outages WHERE provider_id = $1 AND ends_at > $2", provider_id, now
            )
            await conn.execute(
                _INSERT_OUTAGE,
                provider_id,
                outage.error_ratio,
                outage.timeout_ratio,
                outage.timeout_seconds,
                outage.starts_at,
                outage.ends_at,
                outage.source,
            )
        self._forget()
        return outage

    async def end(self, provider_id: str) -> int:
        """End the provider's outage now and drop the ones still to come; how many there were."""
        ended: int = await self.db.pool.fetchval(
            "WITH ended AS (DELETE FROM outages WHERE provider_id = $1 AND ends_at > $2"
            " RETURNING 1) SELECT count(*) FROM ended",
            provider_id,
            self._clock(),
        )
        self._forget()
        return ended

    async def arm_scenario(self, scenario: Scenario) -> bool:
        """Schedule the scenario's outages from its first start on this schema; ``False`` when
        a process (this one before a restart, or another) did already.

        The start is anchored in ``scenario_runs`` in the same transaction as the outages, so
        processes sharing the schema, and a restarted one, agree on when each outage is.
        """
        if not scenario.outages:
            return False
        async with self.db.pool.acquire() as conn, conn.transaction():
            started = await conn.fetchval(
                "INSERT INTO scenario_runs (name, started_at) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING started_at",
                f"{scenario.name}:{scenario.seed}",
                self._clock(),
            )
            if started is None:
                return False
            for outage in scenario.outages:
                starts_at = started + outage.start_after_seconds
                await conn.execute(
                    _INSERT_OUTAGE,
                    outage.provider,
                    outage.error_ratio,
                    outage.timeout_ratio,
                    (
                        self.default_timeout_seconds
                        if outage.timeout_seconds is None
                        else outage.timeout_seconds
                    ),
                    starts_at,
                    starts_at + outage.duration_seconds,
                    f"scenario:{scenario.name}",
                )
        self._forget()
        return True


def answer_label(status: int) -> str:
    """How a request is counted: ``ok``, ``timeout`` (a held request's 504), or the status."""
    if status < 400:
        return "ok"
    if status == 504:
        return "timeout"
    return str(status)


class RequestCounts:
    """The requests each provider received, by kind and answer, summed over every process."""

    def __init__(self, db: SandboxDb) -> None:
        self.db = db

    async def add(self, provider_id: str, kind: RequestKind, status: int) -> None:
        """Count one request. A database error is logged, never raised: the count is a
        diagnostic, and the provider's answer (an order created, say) must not be lost to it."""
        try:
            await self.db.pool.execute(
                "INSERT INTO provider_requests (provider_id, kind, answer, count)"
                " VALUES ($1, $2, $3, 1) ON CONFLICT (provider_id, kind, answer)"
                " DO UPDATE SET count = provider_requests.count + 1",
                provider_id,
                kind,
                answer_label(status),
            )
        except _DATABASE_ERRORS as exc:
            log.warning("request to %s not counted: %s", provider_id, exc)

    async def read(self, provider_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Per provider: ``total``, ``by_kind``, ``by_answer`` and ``by_kind_and_answer``."""
        rows = await self.db.pool.fetch(
            "SELECT provider_id, kind, answer, count FROM provider_requests"
            " WHERE $1::text IS NULL OR provider_id = $1 ORDER BY provider_id, kind, answer",
            provider_id,
        )
        views: dict[str, dict[str, Any]] = {}
        if provider_id is not None:
            views[provider_id] = _empty_counts()
        for row in rows:
            view = views.setdefault(row["provider_id"], _empty_counts())
            count: int = row["count"]
            kind, answer = row["kind"], row["answer"]
            view["total"] += count
            view["by_kind"][kind] = view["by_kind"].get(kind, 0) + count
            view["by_answer"][answer] = view["by_answer"].get(answer, 0) + count
            view["by_kind_and_answer"].setdefault(kind, {})[answer] = count
        return views

    async def reset(self, provider_id: str | None = None) -> int:
        """Forget the counts (of one provider, or of all); how many rows were dropped."""
        dropped: int = await self.db.pool.fetchval(
            "WITH dropped AS (DELETE FROM provider_requests"
            " WHERE $1::text IS NULL OR provider_id = $1 RETURNING 1) SELECT count(*) FROM dropped",
            provider_id,
        )
        return dropped


def _empty_counts() -> dict[str, Any]:
    return {"total": 0, "by_kind": {}, "by_answer": {}, "by_kind_and_answer": {}}


def health_router(
    outages: OutageBook, counts: RequestCounts, known: Callable[[str], bool]
) -> Router:
    """``/providers/{id}/outage``, ``/providers/outages`` and the request counts."""

    def unknown(provider_id: str) -> Response[bytes]:
        return error_response(404, "unknown_provider", f"no sandbox provider {provider_id}")

    @put("/{provider_id:str}/outage")
    async def put_outage(
        request: Request[Any, Any, Any], provider_id: FromPath[str]
    ) -> Response[bytes]:
        if not known(provider_id):
            return unknown(provider_id)
        try:
            body = msgspec.json.decode(await request.body(), type=OutageBody)
        except msgspec.ValidationError as exc:
            return error_response(400, "invalid_outage", f"bad outage body: {exc}")
        except msgspec.DecodeError:
            return error_response(400, "malformed_json", "request body is not valid JSON")
        problem = outage_problem(
            error_ratio=body.error_ratio,
            timeout_ratio=body.timeout_ratio,
            duration_seconds=body.duration_seconds,
            timeout_seconds=body.timeout_seconds,
        )
        if problem is not None:
            return error_response(400, "invalid_outage", problem)
        outage = await outages.put(provider_id, body)
        return json_response(200, {"outage": outage.view(outage.starts_at)})

    @get("/{provider_id:str}/outage")
    async def get_outage(provider_id: FromPath[str]) -> Response[bytes]:
        if not known(provider_id):
            return unknown(provider_id)
        now = outages.now()
        planned = await outages.schedule(provider_id)
        active = [o for o in planned if o.active(now)]
        return json_response(
            200,
            {
                "provider_id": provider_id,
                "outage": active[-1].view(now) if active else None,
                "scheduled": [o.view(now) for o in planned if not o.active(now)],
            },
        )

    @delete("/{provider_id:str}/outage", status_code=200)
    async def end_outage(provider_id: FromPath[str]) -> Response[bytes]:
        if not known(provider_id):
            return unknown(provider_id)
        ended = await outages.end(provider_id)
        return json_response(200, {"provider_id": provider_id, "ended": ended})

    @get("/outages")
    async def list_outages() -> Response[bytes]:
        now = outages.now()
        return json_response(200, {"outages": [o.view(now) for o in await outages.schedule()]})

    @get("/{provider_id:str}/requests")
    async def provider_requests(provider_id: FromPath[str]) -> Response[bytes]:
        if not known(provider_id):
            return unknown(provider_id)
        views = await counts.read(provider_id)
        return json_response(200, {"provider_id": provider_id, **views[provider_id]})

    @delete("/{provider_id:str}/requests", status_code=200)
    async def reset_provider_requests(provider_id: FromPath[str]) -> Response[bytes]:
        if not known(provider_id):
            return unknown(provider_id)
        await counts.reset(provider_id)
        return json_response(200, {"provider_id": provider_id, "reset": True})

    @get("/requests")
    async def all_requests() -> Response[bytes]:
        return json_response(200, {"providers": await counts.read()})

    @delete("/requests", status_code=200)
    async def reset_all_requests() -> Response[bytes]:
        await counts.reset()
        return json_response(200, {"reset": True})

    return Router(
        path="/providers",
        route_handlers=[
            put_outage,
            get_outage,
            end_outage,
            list_outages,
            provider_requests,
            reset_provider_requests,
            all_requests,
            reset_all_requests,
        ],
    )
