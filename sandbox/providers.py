"""Sandbox providers: the protocol of :mod:`contracts.provider`, with scripted behaviours.

A provider's behaviour is chosen by its id: one of :data:`BEHAVIOURS` exactly, or
``<behaviour>-<suffix>`` (``sbx_ok-eur``, ``sbx_decline-2``) so a cascade can hold several
providers that behave alike, or ``sbx_scn_<name>`` for a provider of the sandbox's scenario
(:mod:`sandbox.scenarios`). Ids other than the exact :data:`BEHAVIOURS` need their own entry in
the providers file for their webhook secret.

Webhooks are signed with the provider's first configured secret and delivered to
``{gateway_url}/webhooks/{provider_id}`` by :class:`WebhookSender`, which retries like a real
provider does: a few attempts with exponential backoff on connection errors, timeouts, 429 and
5xx, keeping the same ``webhook-id`` for every attempt of one event.

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
import logging
import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

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
)
CANCELLABLE: frozenset[str] = frozenset({"sbx_ok", "sbx_silent", "sbx_accept_fail"})
FlakyOutcome = Literal["created", "absent"]
FlakyError = Literal["503", "timeout"]


def behaviour_of(provider_id: str) -> Behaviour | None:
    """The behaviour a provider id selects, or ``None`` for an id the sandbox does not serve."""
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


class _SetStatusBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    status: ProviderStatus
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


class ProviderSimulator:
    """All sandbox providers: their orders, behaviours and webhooks."""

    def __init__(
        self,
        *,
        sender: WebhookSender,
        webhook_delay_seconds: float = 1.0,
        fail_delay_seconds: float = 2.0,
        flaky_created_ratio: float = 0.5,
        flaky_timeout_seconds: float = 5.0,
        flaky_success_delay_seconds: float = 2.0,
        seed: int = 0,
        scenario: Scenario | None = None,
    ) -> None:
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
        self.orders: dict[tuple[str, str], SandboxOrder] = {}
        self.by_reference: dict[str, SandboxOrder] = {}

    def behaviour(self, provider_id: str) -> Behaviour | None:
        """The behaviour behind a provider id, scenario providers included."""
        if self.scenario is not None and self.scenario.provider(provider_id) is not None:
            return "sbx_scn"
        return behaviour_of(provider_id)

    # -- order book ------------------------------------------------------------------------

    def order(self, provider_id: str, order_id: str) -> SandboxOrder | None:
        return self.orders.get((provider_id, order_id))

    def _open(
        self,
        provider_id: str,
        request: CreateOrder,
        status: ProviderStatus,
    ) -> SandboxOrder:
        order = SandboxOrder(
            provider_id=provider_id,
            order_id=request.order_id,
            reference=f"{provider_id}-{secrets.token_hex(6)}",
            request=request,
            status=status,
        )
        self.orders[(provider_id, request.order_id)] = order
        self.by_reference[order.reference] = order
        return order

    def _settle_later(
        self, order: SandboxOrder, status: ProviderStatus, code: str | None, delay: float
    ) -> None:
        self.sender.spawn(
            self._settle(order, status, code, delay),
            name=f"sandbox-settle-{order.reference}",
        )

    async def _settle(
        self, order: SandboxOrder, status: ProviderStatus, code: str | None, delay: float
    ) -> None:
        """After ``delay``: a still-pending order takes ``status``, then its webhook goes out."""
        if delay > 0:
            await asyncio.sleep(delay)
        if order.status == "pending":
            order.status, order.code = status, code
        if order.status != status:
            # Cancelled or moved by set-status meanwhile: that outcome won, this one is void.
            log.info("order %s is %s; scheduled %s dropped", order.reference, order.status, status)
            return
        await self.sender.deliver(order.provider_id, order.webhook())

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
                order = self._open(provider_id, request, "succeeded")
                # Real synchronous providers still send the webhook, and the gateway must absorb
                # the duplicate. Sent after the usual delay rather than at once, so it does not
                # race the create response in every run (that race is sbx_ok's to exercise).
                self._settle_later(order, "succeeded", None, self.webhook_delay_seconds)
                return _order_response(201, order)
            case "sbx_ok" | "sbx_no_funds":
                order = self._open(provider_id, request, "pending")
                self._settle_later(order, "succeeded", None, self.webhook_delay_seconds)
                return _order_response(201, order)
            case "sbx_accept_fail":
                order = self._open(provider_id, request, "pending")
                self._settle_later(order, "failed", "declined", self.fail_delay_seconds)
                return _order_response(201, order)
            case "sbx_silent":
                order = self._open(provider_id, request, "pending")
                return _order_response(201, order)
            case "sbx_flaky":
                outcome, error = self._flaky_draw(provider_id)
                if outcome == "created":
                    # Created before the failure is answered: the order exists whatever the
                    # client sees, which is exactly what makes the answer ambiguous.
                    order = self._open(provider_id, request, "pending")
                    self._settle_later(order, "succeeded", None, self.flaky_success_delay_seconds)
                log.info("sbx_flaky create %s: %s, answering %s", request.order_id, outcome, error)
                if error == "timeout":
                    await asyncio.sleep(self.flaky_timeout_seconds)
                    return error_response(504, "gateway_timeout", "sandbox provider timed out")
                return error_response(503, "unavailable", "sandbox provider unavailable")
            case "sbx_scn":
                return await self._scenario_create(provider_id, request)

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
            order = self._open(provider_id, request, "pending")
            if attempt.outcome == "succeeded":
                self._settle_later(order, "succeeded", None, delay)
            elif attempt.outcome == "failed":
                self._settle_later(order, "failed", attempt.code, delay)
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
        order: SandboxOrder,
        status: ProviderStatus,
        code: str | None,
        webhook_id: str | None,
    ) -> DeliveryResult:
        """Move an order to ``status`` and send its webhook through the real intake."""
        if status == "failed" and code is None:
            code = "declined"
        order.status, order.code = status, code
        return await self.sender.deliver(order.provider_id, order.webhook(), webhook_id)

    # -- HTTP ------------------------------------------------------------------------------

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
            existing = sim.order(provider_id, key)
            if existing is not None:
                if existing.request != body:
                    return error_response(
                        409,
                        "idempotency_conflict",
                        "Idempotency-Key was already used with a different request body",
                    )
                return _order_response(200, existing)
            return await sim.create(provider_id, behaviour, body)

        @get("/{provider_id:str}/orders/{order_id:str}")
        async def get_order(provider_id: FromPath[str], order_id: FromPath[str]) -> Response[bytes]:
            if sim.behaviour(provider_id) is None:
                return error_response(404, "unknown_provider", f"no sandbox provider {provider_id}")
            order = sim.order(provider_id, order_id)
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
            if behaviour not in CANCELLABLE:
                return error_response(501, "not_supported", f"{provider_id} cannot cancel orders")
            order = sim.order(provider_id, order_id)
            if order is None:
                return error_response(404, "not_found", "no such order")
            if order.status == "pending":
                order.status, order.code = "cancelled", None
                return _order_response(200, order)
            if order.status == "cancelled":
                # The same call again: the same answer, not a conflict.
                return _order_response(200, order)
            return _order_response(409, order)

        @post("/{provider_id:str}/orders/{reference:str}/status")
        async def set_status(
            request: Request[Any, Any, Any], provider_id: FromPath[str], reference: FromPath[str]
        ) -> Response[bytes]:
            if sim.behaviour(provider_id) is None:
                return error_response(404, "unknown_provider", f"no sandbox provider {provider_id}")
            order = sim.by_reference.get(reference)
            if order is None or order.provider_id != provider_id:
                return error_response(404, "not_found", "no order with this reference")
            try:
                body = msgspec.json.decode(await request.body(), type=_SetStatusBody)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                return error_response(422, "validation_failed", f"bad set-status body: {exc}")
            result = await sim.set_status(order, body.status, body.code, body.webhook_id)
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
