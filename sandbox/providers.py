"""Sandbox providers: the protocol of :mod:`contracts.provider`, with scripted behaviours.

A provider's behaviour is chosen by its id: one of :data:`BEHAVIOURS` exactly, or
``<behaviour>-<suffix>`` (``sbx_ok-eur``, ``sbx_decline-2``) so a cascade can hold several
providers that behave alike, or ``sbx_scn_<name>`` for a provider of the sandbox's scenario
(:mod:`sandbox.scenarios`), or one of :data:`ALIASES` (``sbx_a``, ``sbx_b``: like ``sbx_ok``).
Ids other than the exact :data:`BEHAVIOURS` need their own entry in the providers file for their
webhook secret.

Every protocol request (create, status, cancel) meets the provider's outage first, if one is in
force, and is counted (:mod:`sandbox.outages`).

Orders, and the webhooks still to be sent with their due times, are kept in the sandbox's
Postgres schema (:mod:`sandbox.database`), so that they outlive the process.

Webhooks are signed with the provider's first configured secret and delivered to
``{gateway_url}/webhooks/{provider_id}`` by :class:`WebhookSender`, which retries like a real
provider does: a few attempts with exponential backoff on connection errors, timeouts, 429 and
5xx, keeping the same ``webhook-id`` for every attempt of one event.

``sbx_rate_limited`` declines the first :data:`RATE_LIMITED_DECLINES` creates of each order id
with ``422 {"code": "rate_limited"}`` (no order is kept), then accepts it as ``sbx_ok`` does:
the provider of a same-provider retry (the error table's ``retry``).

``sbx_flaky`` decides each create in two independent draws:

- *was the order created?* — the next queued outcome from ``POST .../script`` if any, otherwise
  a seeded RNG with probability ``flaky_created_ratio``;
- *how does the create fail?* — the next queued error from the script if any, otherwise it
  alternates per provider: first ``503`` at once, then a hang of ``flaky_timeout_seconds``
  followed by ``504``, then ``503`` …

A created order exists before the failure is answered (GET shows it during a hang) and
succeeds ``flaky_success_delay_seconds`` later; an absent one is 404 and a retry of the same
create is a fresh, again flaky, attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import asyncpg
import msgspec
from litestar import Request, Response, Router, get, post
from litestar.params import FromPath

from contracts.provider import (
    CreateOrder,
    ProviderDecline,
    ProviderOrder,
    ProviderStatus,
    ProviderWebhook,
)
from contracts.signatures import sign
from orchestrator.http_client import HttpClient, Timeouts, TransportFailure
from sandbox.core import error_response, json_response
from sandbox.database import SandboxDb
from sandbox.outages import OutageBook, RequestCounts, RequestKind
from sandbox.scenarios import Scenario, draw_attempt

log = logging.getLogger("sandbox.providers")

Behaviour = Literal[
    "sbx_ok",
    "sbx_sync_ok",
    "sbx_decline",
    "sbx_accept_fail",
    "sbx_silent",
    "sbx_flaky",
    "sbx_no_funds",
    "sbx_rate_limited",
    "sbx_scn",
]
BEHAVIOURS: tuple[Behaviour, ...] = (
    "sbx_ok",
    "sbx_sync_ok",
    "sbx_decline",
    "sbx_accept_fail",
    "sbx_silent",
    "sbx_flaky",
    "sbx_no_funds",
    "sbx_rate_limited",
)
CANCELLABLE: frozenset[str] = frozenset(
    {"sbx_ok", "sbx_silent", "sbx_accept_fail", "sbx_rate_limited"}
)
ALIASES: Mapping[str, Behaviour] = {"sbx_a": "sbx_ok", "sbx_b": "sbx_ok"}
"""Plain providers under neutral names, behaving like ``sbx_ok``: a pair whose only difference
is what a test or bench does to one of them (an outage of ``sbx_a`` in ``[sbx_a, sbx_b]``)."""
RATE_LIMITED_DECLINES = 2
"""How many creates of one order ``sbx_rate_limited`` declines before it accepts one."""
FlakyOutcome = Literal["created", "absent"]
FlakyError = Literal["503", "timeout"]


def behaviour_of(provider_id: str) -> Behaviour | None:
    """The behaviour a provider id selects, or ``None`` for an id the sandbox does not serve."""
    if provider_id in ALIASES:
        return ALIASES[provider_id]
    base = provider_id.split("-", 1)[0]
    for behaviour in BEHAVIOURS:
        if behaviour == base:
            return behaviour
    return None


def _order_response(status: int, order: SandboxOrder) -> Response[bytes]:
    return Response(
        content=msgspec.json.encode(order.view()),
        status_code=status,
        media_type="application/json",
    )


@dataclass
class SandboxOrder:
    """One order held by a sandbox provider."""

    provider_id: str
    order_id: str
    reference: str
    request: CreateOrder
    status: ProviderStatus
    code: str | None = None

    def view(self) -> ProviderOrder:
        return ProviderOrder(
            order_id=self.order_id, reference=self.reference, status=self.status, code=self.code
        )

    def webhook(self) -> ProviderWebhook:
        return ProviderWebhook(
            order_id=self.order_id, reference=self.reference, status=self.status, code=self.code
        )


@dataclass(frozen=True)
class DeliveryResult:
    """How one webhook event's delivery ended: the gateway's last status, or why none."""

    webhook_id: str
    status: int | None
    attempts: int
    error: str | None = None


class WebhookSender:
    """Signs and delivers provider webhooks; owns the HTTP client and the delayed-send tasks."""

    def __init__(
        self,
        *,
        gateway_url: str,
        secrets_by_provider: Mapping[str, str],
        attempts: int = 4,
        backoff_seconds: float = 0.5,
        timeout_seconds: float = 5.0,
    ) -> None:
        self._url = gateway_url.rstrip("/")
        self._secrets = dict(secrets_by_provider)
        self._attempts = max(1, attempts)
        self._backoff = backoff_seconds
        self._timeout = timeout_seconds
        self._client: HttpClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pending_tasks(self) -> int:
        return len(self._tasks)

    @property
    def longest_delivery_seconds(self) -> float:
        """An upper bound of one :meth:`deliver`: every attempt timing out, every backoff."""
        per_attempt = min(2.0, self._timeout) + self._timeout
        backoffs = sum(self._backoff * 2.0**i for i in range(self._attempts - 1))
        return self._attempts * per_attempt + backoffs + 1.0

    async def start(self) -> None:
        self._closed = False
        self._ensure_client()

    def _ensure_client(self) -> HttpClient:
        if self._client is None:
            self._client = HttpClient(
                timeouts=Timeouts(connect=min(2.0, self._timeout), read=self._timeout)
            )
        return self._client

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` as a tracked task, cancelled by :meth:`close`."""
        if self._closed:
            work.close()
            log.warning("sandbox is closed; dropped background work %s", name)
            return
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "sandbox background task %s failed", task.get_name(), exc_info=task.exception()
            )

    async def deliver(
        self, provider_id: str, webhook: ProviderWebhook, webhook_id: str | None = None
    ) -> DeliveryResult:
        """Send one webhook event, retrying transient failures with the same ``webhook-id``."""
        webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
        secret = self._secrets.get(provider_id)
        if secret is None:
            log.warning("no webhook secret for %s; webhook %s not sent", provider_id, webhook_id)
            return DeliveryResult(webhook_id, None, 0, "no webhook secret configured")
        body = msgspec.json.encode(webhook)
        url = f"{self._url}/webhooks/{provider_id}"
        client = self._ensure_client()
        status: int | None = None
        error: str | None = None
        for attempt in range(1, self._attempts + 1):
            # Re-signed per attempt: a late retry still falls inside the receiver's tolerance.
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(secret, webhook_id, timestamp, body),
            }
            try:
                answer = await client.request("POST", url, body=body, headers=headers)
            except TransportFailure as exc:
                status, error = None, str(exc)
            else:
                status, error = answer.status, None
                if status < 500 and status != 429:
                    if status >= 400:
                        log.warning(
                            "gateway refused webhook %s for %s %s: %s",
                            webhook_id,
                            provider_id,
                            webhook.order_id,
                            status,
                        )
                    return DeliveryResult(webhook_id, status, attempt)
            if attempt < self._attempts:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
        log.warning(
            "gave up on webhook %s for %s %s after %d attempts (last: %s)",
            webhook_id,
            provider_id,
            webhook.order_id,
            self._attempts,
            error or status,
        )
        return DeliveryResult(webhook_id, status, self._attempts, error)


RETURN_CODE = "R01"
"""The return code set-status ``returned`` reports when the body names none (ACH's R01-style
codes are what payout providers pass on; any string is accepted)."""
_DEFAULT_CODES = {"failed": "declined", "returned": RETURN_CODE}


class _SetStatusBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    status: ProviderStatus
    # Default: ``declined`` for failed, ``R01`` (account closed) for returned.
    code: str | None = None
    # Lets a test replay one delivery event (same webhook-id) to exercise dedup.
    webhook_id: str | None = None


class _ScriptBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    outcomes: list[FlakyOutcome] = []
    errors: list[FlakyError] = []


@dataclass
class _FlakyState:
    outcomes: deque[FlakyOutcome] = field(default_factory=deque)
    errors: deque[FlakyError] = field(default_factory=deque)
    attempts: int = 0


@dataclass(frozen=True)
class _Scheduled:
    """A webhook to send at ``delay`` seconds from now, moving a pending order to ``status``."""

    status: ProviderStatus
    code: str | None
    delay: float


class OrderExistsError(Exception):
    """A concurrent create with the same key opened the order first: answer it as a replay."""


def _order_of(row: asyncpg.Record) -> SandboxOrder:
    return SandboxOrder(
        provider_id=row["provider_id"],
        order_id=row["order_id"],
        reference=row["reference"],
        request=msgspec.json.decode(row["request"], type=CreateOrder),
        status=row["status"],
        code=row["code"],
    )


POLL_SECONDS = 1.0
"""How often the delivery loop looks for webhooks other processes scheduled (this process's
own schedules wake it at once)."""


class ProviderSimulator:
    """All sandbox providers: their orders, behaviours and webhooks.

    Orders and the webhooks still to send live in the sandbox's schema. A scheduled webhook is
    a row with its due time; :meth:`run_deliveries` claims due rows (a lease, so that another
    process does not send them too), moves the order and sends, then deletes the row. A
    process killed mid-send leaves the row: the next start sends it again under the same
    ``webhook-id``, which the receiver deduplicates — a duplicate is harmless, a loss is not.
    """

    def __init__(
        self,
        *,
        db: SandboxDb,
        sender: WebhookSender,
        webhook_delay_seconds: float = 1.0,
        fail_delay_seconds: float = 2.0,
        flaky_created_ratio: float = 0.5,
        flaky_timeout_seconds: float = 5.0,
        flaky_success_delay_seconds: float = 2.0,
        seed: int = 0,
        scenario: Scenario | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.sender = sender
        self.scenario = scenario
        # Fresh creates per scenario order: a retry after an absent order is a new draw.
        self._scenario_draws: dict[tuple[str, str], int] = {}
        self.webhook_delay_seconds = webhook_delay_seconds
        self.fail_delay_seconds = fail_delay_seconds
        self.flaky_created_ratio = flaky_created_ratio
        self.flaky_timeout_seconds = flaky_timeout_seconds
        self.flaky_success_delay_seconds = flaky_success_delay_seconds
        # Seeded on purpose: a run must be reproducible; nothing here is a secret.
        self._flaky_rng = random.Random(f"{seed}:sbx_flaky")  # noqa: S311
        self._flaky: dict[str, _FlakyState] = {}
        self._clock = clock
        self._wake = asyncio.Event()
        self._next_wake = math.inf  # when the delivery loop looks next (clock seconds)
        self._running = False
        self.outages = OutageBook(
            db, default_timeout_seconds=flaky_timeout_seconds, seed=seed, clock=clock
        )
        self.requests = RequestCounts(db)

    def behaviour(self, provider_id: str) -> Behaviour | None:
        """The behaviour behind a provider id, scenario providers included."""
        if self.scenario is not None and self.scenario.provider(provider_id) is not None:
            return "sbx_scn"
        return behaviour_of(provider_id)

    # -- order book ------------------------------------------------------------------------

    async def order(self, provider_id: str, order_id: str) -> SandboxOrder | None:
        row = await self.db.pool.fetchrow(
            "SELECT * FROM orders WHERE provider_id = $1 AND order_id = $2",
            provider_id,
            order_id,
        )
        return None if row is None else _order_of(row)

    async def has_reference(self, provider_id: str, reference: str) -> bool:
        found = await self.db.pool.fetchval(
            "SELECT true FROM orders WHERE reference = $1 AND provider_id = $2",
            reference,
            provider_id,
        )
        return bool(found)

    async def orders(self) -> list[SandboxOrder]:
        """Every order of every provider, oldest first."""
        rows = await self.db.pool.fetch("SELECT * FROM orders ORDER BY seq")
        return [_order_of(row) for row in rows]

    async def pending_webhooks(self) -> int:
        """Webhooks scheduled and neither sent nor given up on yet."""
        count: int = await self.db.pool.fetchval("SELECT count(*) FROM webhooks")
        return count

    async def _open(
        self,
        provider_id: str,
        request: CreateOrder,
        status: ProviderStatus,
        then: _Scheduled | None = None,
    ) -> SandboxOrder:
        """Open an order and, in the same statement, schedule its webhook ``then``."""
        order = SandboxOrder(
            provider_id=provider_id,
            order_id=request.order_id,
            reference=f"{provider_id}-{secrets.token_hex(6)}",
            request=request,
            status=status,
        )
        due = None if then is None else self._clock() + then.delay
        opened = await self.db.pool.fetchval(
            "WITH opened AS (INSERT INTO orders (provider_id, order_id, reference, request, status)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING provider_id, order_id),"
            " scheduled AS (INSERT INTO webhooks (provider_id, order_id, status, code, webhook_id,"
            " due_at) SELECT provider_id, order_id, $6, $7, $8, $9 FROM opened"
            " WHERE $9::double precision IS NOT NULL)"
            " SELECT count(*) FROM opened",
            provider_id,
            request.order_id,
            order.reference,
            msgspec.json.encode(request).decode(),
            status,
            None if then is None else then.status,
            None if then is None else then.code,
            f"msg_{uuid.uuid4().hex}",
            due,
        )
        if not opened:
            raise OrderExistsError(request.order_id)
        if due is not None and due < self._next_wake:
            self._wake.set()  # sooner than the delivery loop planned to look
        return order

    # -- webhook deliveries ----------------------------------------------------------------

    def start(self) -> None:
        """Start the delivery loop (idempotent); the sender's :meth:`~WebhookSender.close`
        stops it."""
        if not self._running:
            self._running = True
            self.sender.spawn(self.run_deliveries(), name="sandbox-webhook-deliveries")

    async def run_deliveries(self) -> None:
        """Send every scheduled webhook when it is due, those of earlier processes too."""
        try:
            # Claims of a process that died are released: see the class docstring.
            await self.db.pool.execute("UPDATE webhooks SET claimed_until = NULL")
            while True:
                self._wake.clear()
                try:
                    for row in await self._claim_due():
                        name = f"sandbox-settle-{row['order_id']}"
                        self.sender.spawn(self._settle(row), name=name)
                    wait = await self._until_next_due()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    # Postgres restarting: the rows wait for it, and so does the loop.
                    log.warning("sandbox webhook deliveries: database unavailable (%s)", exc)
                    wait = POLL_SECONDS
                self._next_wake = self._clock() + wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                # Awake: a schedule made before the next wait may be missed by this turn's
                # queries, so it wakes the next wait at once.
                self._next_wake = math.inf
        finally:
            self._running = False

    async def _claim_due(self) -> list[Mapping[str, Any]]:
        now = self._clock()
        rows = await self.db.pool.fetch(
            "UPDATE webhooks SET claimed_until = $2 WHERE id IN (SELECT id FROM webhooks"
            " WHERE due_at <= $1 AND (claimed_until IS NULL OR claimed_until < $1)"
            " ORDER BY due_at LIMIT 100 FOR UPDATE SKIP LOCKED)"
            " RETURNING id, provider_id, order_id, status, code, webhook_id",
            now,
            now + self.sender.longest_delivery_seconds,
        )
        return [dict(row) for row in rows]

    async def _until_next_due(self) -> float:
        due = await self.db.pool.fetchval(
            # greatest() skips NULLs: an unclaimed row is due at due_at.
            "SELECT min(greatest(due_at, claimed_until)) FROM webhooks"
        )
        if due is None:
            return POLL_SECONDS
        return max(0.0, min(POLL_SECONDS, float(due) - self._clock()))

    async def _settle(self, row: Mapping[str, Any]) -> None:
        """A due webhook: a still-pending order takes its status, then the webhook goes out."""
        status: ProviderStatus = row["status"]
        order_row = await self.db.pool.fetchrow(
            "UPDATE orders SET status = CASE WHEN status = 'pending' THEN $3 ELSE status END,"
            " code = CASE WHEN status = 'pending' THEN $4 ELSE code END"
            " WHERE provider_id = $1 AND order_id = $2 RETURNING *",
            row["provider_id"],
            row["order_id"],
            status,
            row["code"],
        )
        order = None if order_row is None else _order_of(order_row)
        if order is None or order.status != status:
            # Cancelled or moved by set-status meanwhile: that outcome won, this one is void.
            log.info("order %s is %s; scheduled %s dropped", row["order_id"], order, status)
        else:
            await self.sender.deliver(order.provider_id, order.webhook(), row["webhook_id"])
        # Only once sent (or given up on): a crash before this line sends it again.
        await self.db.pool.execute("DELETE FROM webhooks WHERE id = $1", row["id"])

    # -- flaky -----------------------------------------------------------------------------

    def script(
        self, provider_id: str, outcomes: list[FlakyOutcome], errors: list[FlakyError]
    ) -> _FlakyState:
        state = self._flaky.setdefault(provider_id, _FlakyState())
        state.outcomes.extend(outcomes)
        state.errors.extend(errors)
        return state

    def _flaky_draw(self, provider_id: str) -> tuple[FlakyOutcome, FlakyError]:
        state = self._flaky.setdefault(provider_id, _FlakyState())
        if state.outcomes:
            outcome = state.outcomes.popleft()
        else:
            created = self._flaky_rng.random() < self.flaky_created_ratio
            outcome = "created" if created else "absent"
        if state.errors:
            error = state.errors.popleft()
        else:
            error = "503" if state.attempts % 2 == 0 else "timeout"
        state.attempts += 1
        return outcome, error

    # -- protocol --------------------------------------------------------------------------

    async def create(
        self, provider_id: str, behaviour: Behaviour, request: CreateOrder
    ) -> Response[bytes]:
        """``POST {base}/orders`` once the request is valid and not a replay."""
        match behaviour:
            case "sbx_decline":
                # No order is kept: a decline is definitive and GET must answer 404.
                decline = ProviderDecline(code="declined", message="sandbox provider declines")
                return json_response(422, decline)
            case "sbx_sync_ok":
                # Real synchronous providers still send the webhook, and the gateway must absorb
                # the duplicate. Sent after the usual delay rather than at once, so it does not
                # race the create response in every run (that race is sbx_ok's to exercise).
                then = _Scheduled("succeeded", None, self.webhook_delay_seconds)
                order = await self._open(provider_id, request, "succeeded", then)
                return _order_response(201, order)
            case "sbx_ok" | "sbx_no_funds":
                then = _Scheduled("succeeded", None, self.webhook_delay_seconds)
                order = await self._open(provider_id, request, "pending", then)
                return _order_response(201, order)
            case "sbx_rate_limited":
                if await self._create_try(provider_id, request.order_id) <= RATE_LIMITED_DECLINES:
                    # No order is kept: the decline is definitive, and GET must answer 404.
                    decline = ProviderDecline(code="rate_limited", message="too many requests")
                    return json_response(422, decline)
                then = _Scheduled("succeeded", None, self.webhook_delay_seconds)
                order = await self._open(provider_id, request, "pending", then)
                return _order_response(201, order)
            case "sbx_accept_fail":
                then = _Scheduled("failed", "declined", self.fail_delay_seconds)
                order = await self._open(provider_id, request, "pending", then)
                return _order_response(201, order)
            case "sbx_silent":
                order = await self._open(provider_id, request, "pending")
                return _order_response(201, order)
            case "sbx_flaky":
                outcome, error = self._flaky_draw(provider_id)
                if outcome == "created":
                    # Created before the failure is answered: the order exists whatever the
                    # client sees, which is exactly what makes the answer ambiguous.
                    then = _Scheduled("succeeded", None, self.flaky_success_delay_seconds)
                    await self._open(provider_id, request, "pending", then)
                log.info("sbx_flaky create %s: %s, answering %s", request.order_id, outcome, error)
                if error == "timeout":
                    await asyncio.sleep(self.flaky_timeout_seconds)
                    return error_response(504, "gateway_timeout", "sandbox provider timed out")
                return error_response(503, "unavailable", "sandbox provider unavailable")
            case "sbx_scn":
                return await self._scenario_create(provider_id, request)

    async def _create_try(self, provider_id: str, order_id: str) -> int:
        """Count a create of ``order_id`` (a replay of an accepted one is answered before
        this); returns which try it is, from 1."""
        tries: int = await self.db.pool.fetchval(
            "INSERT INTO create_tries (provider_id, order_id, tries) VALUES ($1, $2, 1)"
            " ON CONFLICT (provider_id, order_id) DO UPDATE"
            " SET tries = create_tries.tries + 1 RETURNING tries",
            provider_id,
            order_id,
        )
        return tries

    async def _scenario_create(self, provider_id: str, request: CreateOrder) -> Response[bytes]:
        """A create on an ``sbx_scn_<name>`` provider, decided by :func:`draw_attempt`.

        The draw is seeded by (scenario seed, provider, order id, fresh-create count): the same
        order ids give the same outcomes run after run, whatever the interleaving.
        """
        assert self.scenario is not None
        profile = self.scenario.provider(provider_id)
        assert profile is not None
        key = (provider_id, request.order_id)
        draw = self._scenario_draws.get(key, 0)
        self._scenario_draws[key] = draw + 1
        rng = random.Random(  # noqa: S311 - seeded on purpose: reproducible runs
            f"{self.scenario.seed}:{provider_id}:{request.order_id}:{draw}"
        )
        attempt = draw_attempt(provider_id, profile, rng)
        delay = attempt.webhook_delay_ms / 1000
        order: SandboxOrder | None = None
        if attempt.order_exists:
            # Opened before the latency: a concurrent retry finds it, as at a real provider.
            then = None
            if attempt.outcome == "succeeded":
                then = _Scheduled("succeeded", None, delay)
            elif attempt.outcome == "failed":
                then = _Scheduled("failed", attempt.code, delay)
            order = await self._open(provider_id, request, "pending", then)
        await asyncio.sleep(attempt.latency_ms / 1000)
        match attempt.answer:
            case "declined":
                decline = ProviderDecline(code=attempt.code or "declined", message="scenario")
                return json_response(422, decline)
            case "accepted":
                assert order is not None
                return _order_response(201, order)
            case "timeout":
                await asyncio.sleep(attempt.timeout_ms / 1000)
                return error_response(504, "gateway_timeout", "sandbox provider timed out")
            case "503":
                return error_response(503, "unavailable", "sandbox provider unavailable")

    async def set_status(
        self,
        provider_id: str,
        reference: str,
        body: _SetStatusBody,
    ) -> tuple[SandboxOrder, DeliveryResult] | None:
        """Move an order to a status and send its webhook through the real intake; ``None``
        when the provider has no order with this reference (or, for ``returned``, none that
        was paid: only a succeeded order can come back)."""
        code = body.code if body.code is not None else _DEFAULT_CODES.get(body.status)
        row = await self.db.pool.fetchrow(
            "UPDATE orders SET status = $3, code = $4 WHERE reference = $2 AND provider_id = $1"
            " AND ($3 <> 'returned' OR status IN ('succeeded', 'returned')) RETURNING *",
            provider_id,
            reference,
            body.status,
            code,
        )
        if row is None:
            return None
        order = _order_of(row)
        result = await self.sender.deliver(provider_id, order.webhook(), body.webhook_id)
        return order, result

    async def cancel(self, provider_id: str, order_id: str) -> tuple[int, SandboxOrder] | None:
        """Cancel a pending order: ``200`` and the order, ``409`` with the final one that won,
        ``None`` when there is no such order."""
        cancelled = await self.db.pool.fetchrow(
            "UPDATE orders SET status = 'cancelled', code = NULL"
            " WHERE provider_id = $1 AND order_id = $2 AND status = 'pending'"
            " RETURNING *",
            provider_id,
            order_id,
        )
        if cancelled is not None:
            return 200, _order_of(cancelled)
        order = await self.order(provider_id, order_id)
        if order is None:
            return None
        # Cancelled already: the same call again gets the same answer, not a conflict.
        return (200 if order.status == "cancelled" else 409), order

    async def replay(self, provider_id: str, body: CreateOrder) -> Response[bytes] | None:
        """The answer to a create whose key already has an order, or ``None`` when it has none."""
        existing = await self.order(provider_id, body.order_id)
        if existing is None:
            return None
        if existing.request != body:
            return error_response(
                409,
                "idempotency_conflict",
                "Idempotency-Key was already used with a different request body",
            )
        return _order_response(200, existing)

    # -- HTTP ------------------------------------------------------------------------------

    async def serve(
        self,
        provider_id: str,
        kind: RequestKind,
        answer: Callable[[], Coroutine[Any, Any, Response[bytes]]],
    ) -> Response[bytes]:
        """One protocol request: an outage answers it first if it can, else ``answer``; then
        it is counted either way."""
        response = await self.outages.disrupt(provider_id)
        if response is None:
            response = await answer()
        # Every handler here sets its status; 200 is what Litestar would send otherwise.
        await self.requests.add(provider_id, kind, response.status_code or 200)
        return response

    def router(self) -> Router:
        """The ``/providers`` routes, closed over this simulator."""
        sim = self

        @post("/{provider_id:str}/orders")
        async def create_order(
            request: Request[Any, Any, Any], provider_id: FromPath[str]
        ) -> Response[bytes]:
            behaviour = sim.behaviour(provider_id)
            if behaviour is None:
                return error_response(404, "unknown_provider", f"no sandbox provider {provider_id}")
            return await sim.serve(
                provider_id, "create", lambda: answer_create(request, provider_id, behaviour)
            )

        async def answer_create(
            request: Request[Any, Any, Any], provider_id: str, behaviour: Behaviour
        ) -> Response[bytes]:
            key = request.headers.get("idempotency-key")
            if not key:
                return error_response(400, "missing_idempotency_key", "Idempotency-Key is required")
            try:
                body = msgspec.json.decode(await request.body(), type=CreateOrder)
            except msgspec.ValidationError as exc:
                return error_response(400, "invalid_request", str(exc))
            except msgspec.DecodeError:
                return error_response(400, "malformed_json", "request body is not valid JSON")
            if body.order_id != key:
                return error_response(400, "invalid_request", "Idempotency-Key must equal order_id")
            try:
                amount = Decimal(body.amount)
            except InvalidOperation:
                amount = Decimal(0)
            if not amount.is_finite() or amount <= 0:
                return error_response(400, "invalid_request", "amount must be a positive decimal")
            replayed = await sim.replay(provider_id, body)
            if replayed is not None:
                return replayed
            try:
                return await sim.create(provider_id, behaviour, body)
            except OrderExistsError:
                # A concurrent create with this key won: this one is its replay.
                replayed = await sim.replay(provider_id, body)
                assert replayed is not None  # orders are never deleted
                return replayed

        @get("/{provider_id:str}/orders/{order_id:str}")
        async def get_order(provider_id: FromPath[str], order_id: FromPath[str]) -> Response[bytes]:
            if sim.behaviour(provider_id) is None:
                return error_response(404, "unknown_provider", f"no sandbox provider {provider_id}")
            return await sim.serve(provider_id, "status", lambda: answer_get(provider_id, order_id))

        async def answer_get(provider_id: str, order_id: str) -> Response[bytes]:
            order = await sim.order(provider_id, order_id)
            if order is None:
                return error_response(404, "not_found", "no such order")
            return _order_response(200, order)

        @post("/{provider_id:str}/orders/{order_id:str}/cancel")
        async def cancel_order(
            provider_id: FromPath[str], order_id: FromPath[str]
        ) -> Response[bytes]:
            behaviour = sim.behaviour(provider_id)
            if behaviour is None:
                return error_response(404, "unknown_provider", f"no sandbox provider {provider_id}")
            return await sim.serve(
                provider_id, "cancel", lambda: answer_cancel(provider_id, order_id, behaviour)
            )

        async def answer_cancel(
            provider_id: str, order_id: str, behaviour: Behaviour
        ) -> Response[bytes]:
            if behaviour not in CANCELLABLE:
                return error_response(501, "not_supported", f"{provider_id} cannot cancel orders")
            outcome = await sim.cancel(provider_id, order_id)
            if outcome is None:
                return error_response(404, "not_found", "no such order")
            return _order_response(*outcome)

        @post("/{provider_id:str}/orders/{reference:str}/status")
        async def set_status(
            request: Request[Any, Any, Any], provider_id: FromPath[str], reference: FromPath[str]
        ) -> Response[bytes]:
            if sim.behaviour(provider_id) is None:
                return error_response(404, "unknown_provider", f"no sandbox provider {provider_id}")
            missing = error_response(404, "not_found", "no order with this reference")
            if not await sim.has_reference(provider_id, reference):
                return missing
            try:
                body = msgspec.json.decode(await request.body(), type=_SetStatusBody)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                return error_response(422, "validation_failed", f"bad set-status body: {exc}")
            moved = await sim.set_status(provider_id, reference, body)
            if moved is None and body.status == "returned":
                return error_response(409, "not_paid", "only a succeeded order can be returned")
            if moved is None:
                return missing
            order, result = moved
            return json_response(
                200,
                {
                    "order": order.view(),
                    "webhook_status": result.status,
                    "webhook_id": result.webhook_id,
                    "webhook_attempts": result.attempts,
                    "webhook_error": result.error,
                },
            )

        @post("/{provider_id:str}/script")
        async def script(
            request: Request[Any, Any, Any], provider_id: FromPath[str]
        ) -> Response[bytes]:
            if sim.behaviour(provider_id) != "sbx_flaky":
                return error_response(404, "not_scriptable", f"{provider_id} takes no script")
            try:
                body = msgspec.json.decode(await request.body(), type=_ScriptBody)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                return error_response(422, "validation_failed", f"bad script body: {exc}")
            state = sim.script(provider_id, body.outcomes, body.errors)
            return json_response(
                200, {"outcomes": list(state.outcomes), "errors": list(state.errors)}
            )

        return Router(
            path="/providers",
            route_handlers=[create_order, get_order, cancel_order, set_status, script],
        )
