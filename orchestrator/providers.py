"""Provider adapters: the port the orchestrator calls, and the generic HTTP implementation.

Errors are classified where they are caught: a ``422`` at create is a definitive
:class:`~orchestrator.domain.Declined`; a timeout, a 5xx or a connection error after sending
is :class:`~orchestrator.domain.Ambiguous` — the order may exist, so it is never a failure.
"""

from __future__ import annotations

from typing import Protocol

import httpx
import msgspec

from contracts.provider import CreateOrder, ProviderDecline, ProviderOrder
from contracts.providers_file import ProviderConfig
from orchestrator.domain import Ambiguous, AnswerSource, Declined, ProviderAnswer

CreateResult = ProviderAnswer | Declined | Ambiguous
StatusResult = ProviderAnswer | Ambiguous


class ProviderAdapter(Protocol):
    async def create(self, config: ProviderConfig, order: CreateOrder) -> CreateResult: ...
    async def status(self, config: ProviderConfig, order_id: str) -> StatusResult: ...
    async def cancel(self, config: ProviderConfig, order_id: str) -> StatusResult: ...


def _answer(body: bytes, source: AnswerSource) -> ProviderAnswer | Ambiguous:
    try:
        order = msgspec.json.decode(body, type=ProviderOrder)
    except msgspec.MsgspecError as exc:
        return Ambiguous(f"unreadable provider answer: {exc}")
    return ProviderAnswer(
        status=order.status, reference=order.reference, code=order.code, source=source
    )


class HttpProviderAdapter:
    """Speaks the protocol documented in :mod:`contracts.provider`."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client or httpx.AsyncClient()
        self._owns_client = client is None

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    @staticmethod
    def _timeout(config: ProviderConfig) -> httpx.Timeout:
        t = config.timeouts
        return httpx.Timeout(t.read_seconds, connect=t.connect_seconds)

    async def create(self, config: ProviderConfig, order: CreateOrder) -> CreateResult:
        try:
            response = await self._client.post(
                f"{config.base_url}/orders",
                content=msgspec.json.encode(order),
                headers={"Idempotency-Key": order.order_id, "Content-Type": "application/json"},
                timeout=self._timeout(config),
            )
        except httpx.ConnectError as exc:
            # Nothing was sent: still classified ambiguous, the recheck will prove absence fast.
            return Ambiguous(f"connect failed: {exc}")
        except httpx.TransportError as exc:
            return Ambiguous(f"{type(exc).__name__} after sending")
        if response.status_code in (200, 201):
            return _answer(response.content, "create")
        if response.status_code == 422:
            try:
                decline = msgspec.json.decode(response.content, type=ProviderDecline)
            except msgspec.MsgspecError:
                return Ambiguous("422 without a readable decline code")
            return Declined(decline.code)
        return Ambiguous(f"HTTP {response.status_code} at create")

    async def status(self, config: ProviderConfig, order_id: str) -> StatusResult:
        try:
            response = await self._client.get(
                f"{config.base_url}/orders/{order_id}", timeout=self._timeout(config)
            )
        except httpx.TransportError as exc:
            return Ambiguous(f"{type(exc).__name__} at status")
        if response.status_code == 404:
            return ProviderAnswer(status="absent", source="poll")
        if response.status_code == 200:
            return _answer(response.content, "poll")
        return Ambiguous(f"HTTP {response.status_code} at status")

    async def cancel(self, config: ProviderConfig, order_id: str) -> StatusResult:
        try:
            response = await self._client.post(
                f"{config.base_url}/orders/{order_id}/cancel", timeout=self._timeout(config)
            )
        except httpx.TransportError as exc:
            return Ambiguous(f"{type(exc).__name__} at cancel")
        if response.status_code in (200, 409):
            return _answer(response.content, "cancel")
        return Ambiguous(f"HTTP {response.status_code} at cancel")
