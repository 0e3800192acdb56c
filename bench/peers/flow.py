"""What both peers share: the withdrawal input, the sandbox's HTTP calls and the webhook check.

The calls are the ones our worker makes (``orchestrator/core_client.py``,
``orchestrator/provider_client.py``): the same paths, bodies, bearer token and idempotency
keys, each derived from ids (the operation id from the withdrawal and the cascade position, the
provider order id from the operation id), so a retried step after a crash is the same call.
Errors are classified where they are caught, as ours are: :class:`Retryable` (timeouts,
connection errors, 5xx at cascade-core), :class:`Refused` (a definitive 4xx at cascade-core),
and a create answers ``declined`` or ``ambiguous`` instead of raising.

Pure asyncio + aiohttp (already a runtime dependency): no Temporal or DBOS import here, so the
Temporal workflow sandbox never sees it and both peers run the exact same calls.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from contracts.provider import ProviderOrder, ProviderWebhook
from contracts.signatures import SignatureError, verify


@dataclass(frozen=True)
class Withdrawal:
    """One withdrawal as the load generator creates it (the gateway's public request)."""

    withdrawal_id: str
    amount: str
    currency: str
    account: str
    providers: list[str]
    # The providers file's waits (the bench shortens them as the chaos fleet does): webhook
    # SLA, then a status poll every ``poll_interval`` seconds, ``max_polls`` times.
    sla_seconds: float = 3.0
    poll_interval: float = 1.0
    max_polls: int = 3


@dataclass(frozen=True)
class Attempt:
    """One provider of the cascade: what every step of it needs (one input per step)."""

    withdrawal_id: str
    provider_id: str
    operation_id: str
    order_id: str
    amount: str
    currency: str
    account: str


def attempt(w: Withdrawal, index: int) -> Attempt:
    """Ids derived from the withdrawal and the cascade position, never from time."""
    operation_id = f"{w.withdrawal_id}.{index}"
    return Attempt(
        withdrawal_id=w.withdrawal_id,
        provider_id=w.providers[index],
        operation_id=operation_id,
        order_id=operation_id,
        amount=w.amount,
        currency=w.currency,
        account=w.account,
    )


def withdrawal_of_order(order_id: str) -> str:
    """The withdrawal (workflow id) an order id belongs to: the inverse of :func:`attempt`."""
    return order_id.rpartition(".")[0]


class Retryable(Exception):
    """No definitive answer (timeout, connection error, 5xx): the step may be retried."""


class Refused(Exception):
    """cascade-core answered 4xx: retrying the same call cannot help."""


@dataclass(frozen=True)
class Created:
    """What a create at the provider answered: ``pending``/``succeeded``/``failed`` (the
    provider's status), ``declined`` (422) or ``ambiguous`` (the order may exist)."""

    outcome: str
    code: str = ""


class Sandbox:
    """The sandbox's cascade-core and provider endpoints, as our worker calls them."""

    def __init__(self, sandbox_url: str, core_token: str, providers_file: Path) -> None:
        self._core = sandbox_url.rstrip("/") + "/core"
        document = json.loads(providers_file.read_text())
        self.providers: dict[str, dict[str, Any]] = document["providers"]
        self._base = {
            pid: cfg["base_url"].replace("${SANDBOX_URL}", sandbox_url.rstrip("/"))
            for pid, cfg in self.providers.items()
        }
        self._headers = {
            "Authorization": f"Bearer {core_token}",
            "Content-Type": "application/json",
        }
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256),
                timeout=aiohttp.ClientTimeout(sock_connect=1, sock_read=3),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _core_post(self, path: str, body: dict[str, Any], key: str | None = None) -> bytes:
        headers = dict(self._headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        try:
            async with self.session.post(
                self._core + path, data=msgspec.json.encode(body), headers=headers
            ) as answer:
                payload = await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Retryable(f"cascade-core {path}: {exc!r}") from exc
        if 200 <= status < 300:
            return payload
        if 400 <= status < 500 and status not in (408, 429):
            raise Refused(f"cascade-core {path}: HTTP {status} {payload[:200]!r}")
        raise Retryable(f"cascade-core {path}: HTTP {status}")

    async def freeze(self, a: Attempt) -> str:
        """The operation's state after the freeze: frozen, committed or rolled_back."""
        answer = await self._core_post(
            "/v1/balances/freeze",
            {
                "operation_id": a.operation_id,
                "withdrawal_id": a.withdrawal_id,
                "provider_id": a.provider_id,
                "amount": a.amount,
                "currency": a.currency,
            },
        )
        state: str = msgspec.json.decode(answer)["state"]
        return state

    async def commit(self, a: Attempt) -> None:
        await self._core_post("/v1/balances/commit", {"operation_id": a.operation_id})

    async def rollback(self, a: Attempt) -> None:
        await self._core_post("/v1/balances/rollback", {"operation_id": a.operation_id})

    async def notify(self, withdrawal_id: str, status: str, provider_id: str) -> None:
        body = {"withdrawal_id": withdrawal_id, "status": status, "provider_id": provider_id}
        await self._core_post("/v1/withdrawal-notifications", body, key=f"{withdrawal_id}:{status}")

    async def create(self, a: Attempt) -> Created:
        order = {
            "order_id": a.order_id,
            "amount": a.amount,
            "currency": a.currency,
            "destination": {"type": "iban", "account": a.account},
        }
        try:
            async with self.session.post(
                f"{self._base[a.provider_id]}/orders",
                data=msgspec.json.encode(order),
                headers={"Idempotency-Key": a.order_id, "Content-Type": "application/json"},
            ) as answer:
                payload = await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError):
            # The order may exist: a recheck decides, never a failure.
            return Created("ambiguous")
        if status in (200, 201):
            try:
                return Created(msgspec.json.decode(payload, type=ProviderOrder).status)
            except msgspec.MsgspecError:
                return Created("ambiguous")
        if status == 422:
            return Created("declined", msgspec.json.decode(payload).get("code", ""))
        return Created("ambiguous")

    async def status(self, a: Attempt) -> str:
        """The provider's status of the order, ``absent`` on 404; raises Retryable otherwise."""
        try:
            async with self.session.get(f"{self._base[a.provider_id]}/orders/{a.order_id}") as r:
                payload = await r.read()
                code = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Retryable(f"status {a.order_id}: {exc!r}") from exc
        if code == 404:
            return "absent"
        if code == 200:
            return msgspec.json.decode(payload, type=ProviderOrder).status
        raise Retryable(f"status {a.order_id}: HTTP {code}")


def verified_webhook(
    providers: dict[str, dict[str, Any]], provider_id: str, headers: Any, body: bytes
) -> ProviderWebhook:
    """The webhook, once its Standard Webhooks signature checks out; raises otherwise."""
    config = providers.get(provider_id)
    if config is None:
        raise SignatureError("unknown_provider", f"no provider {provider_id!r}")
    verify(
        config["webhook_secrets"],
        headers.get("webhook-id"),
        headers.get("webhook-timestamp"),
        headers.get("webhook-signature"),
        body,
        time.time(),
    )
    return msgspec.json.decode(body, type=ProviderWebhook)


FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def withdrawal_from_request(body: bytes, providers: dict[str, dict[str, Any]]) -> Withdrawal:
    """The gateway's ``POST /v1/withdrawals`` body, as the load generator sends it."""
    doc = msgspec.json.decode(body)
    first = providers[doc["cascade"][0]["provider_id"]]
    return Withdrawal(
        sla_seconds=first["webhook_sla_seconds"],
        poll_interval=first["status_polling"]["interval_seconds"],
        max_polls=first["status_polling"]["max_polls"],
        withdrawal_id=doc["withdrawal_id"],
        amount=doc["amount"],
        currency=doc["currency"],
        account=doc["destination"]["account"],
        providers=[c["provider_id"] for c in doc["cascade"]],
    )


def env_path(name: str) -> Path:
    return Path(os.environ[name])
