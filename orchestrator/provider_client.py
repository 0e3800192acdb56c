"""Provider adapters: the port the orchestrator calls, and the generic HTTP implementation.

Errors are classified where they are caught: a ``422`` at create is a definitive
:class:`~orchestrator.domain.Declined`; a timeout, a 5xx or a connection error after sending
is :class:`~orchestrator.domain.Ambiguous` — the order may exist, so it is never a failure.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from contracts.provider import CreateOrder, ProviderDecline, ProviderOrder
from contracts.providers_file import ProviderConfig
from orchestrator.domain import Ambiguous, AnswerSource, Declined, ProviderAnswer
from orchestrator.http_client import HttpClient, Timeouts, TransportFailure

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
        return Ambiguous(f"unreadable provider answer: {exc}", source)
    return ProviderAnswer(
        status=order.status, reference=order.reference, code=order.code, source=source
    )


class HttpProviderAdapter:
    """Speaks the protocol documented in :mod:`contracts.provider`."""

    def __init__(self, client: HttpClient | None = None) -> None:
        self._client = client or HttpClient(timeouts=Timeouts(connect=2.0, read=10.0))
        self._owns_client = client is None

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    @staticmethod
    def _timeouts(config: ProviderConfig) -> Timeouts:
        t = config.timeouts
        return Timeouts(connect=t.connect_seconds, read=t.read_seconds)

    async def create(self, config: ProviderConfig, order: CreateOrder) -> CreateResult:
        try:
            answer = await self._client.request(
                "POST",
                f"{config.base_url}/orders",
                body=msgspec.json.encode(order),
                headers={"Idempotency-Key": order.order_id, "Content-Type": "application/json"},
                timeouts=self._timeouts(config),
            )
        except TransportFailure as exc:
            # Even when nothing was sent the answer stays ambiguous: the recheck proves
            # absence fast, and a retried create is safe on the idempotency key.
            return Ambiguous(str(exc) if not exc.sent else f"{exc} after sending", "create")
        if answer.status in (200, 201):
            return _answer(answer.body, "create")
        if answer.status == 422:
            try:
                decline = msgspec.json.decode(answer.body, type=ProviderDecline)
            except msgspec.MsgspecError:
                return Ambiguous("422 without a readable decline code", "create")
            return Declined(decline.code)
        return Ambiguous(f"HTTP {answer.status} at create", "create")

    async def status(self, config: ProviderConfig, order_id: str) -> StatusResult:
        try:
            answer = await self._client.request(
                "GET", f"{config.base_url}/orders/{order_id}", timeouts=self._timeouts(config)
            )
        except TransportFailure as exc:
            return Ambiguous(f"{exc} at status", "poll")
        if answer.status == 404:
            return ProviderAnswer(status="absent", source="poll")
        if answer.status == 200:
            return _answer(answer.body, "poll")
        return Ambiguous(f"HTTP {answer.status} at status", "poll")

    async def cancel(self, config: ProviderConfig, order_id: str) -> StatusResult:
        try:
            answer = await self._client.request(
                "POST",
                f"{config.base_url}/orders/{order_id}/cancel",
                timeouts=self._timeouts(config),
            )
        except TransportFailure as exc:
            return Ambiguous(f"{exc} at cancel", "cancel")
        if answer.status in (200, 409):
            return _answer(answer.body, "cancel")
        return Ambiguous(f"HTTP {answer.status} at cancel", "cancel")
