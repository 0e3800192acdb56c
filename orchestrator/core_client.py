"""cascade-core client: balance operations and withdrawal notifications.

Every balance call is idempotent on ``operation_id`` (the task id), so a retry after a crash
is the same call. Errors tell the caller what to do: :class:`CoreUnavailable` (timeouts,
connection errors, 5xx — retry later, the task must not move) apart from
:class:`CoreRefused` (a definitive 4xx answer such as ``insufficient_balance``).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Literal, Protocol

import msgspec

from orchestrator.http_client import HttpClient, Timeouts, TransportFailure


class CoreUnavailable(Exception):
    """cascade-core did not give a definitive answer; retry, never advance."""


class CoreRefused(Exception):
    """cascade-core answered 4xx; ``code`` says why (e.g. ``insufficient_balance``)."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"cascade-core refused: {code} (HTTP {status})")
        self.code = code
        self.status = status


class CascadeCore(Protocol):
    async def freeze(
        self,
        operation_id: str,
        withdrawal_id: str,
        provider_id: str,
        amount: Decimal,
        currency: str,
    ) -> FreezeState: ...
    async def commit(self, operation_id: str) -> None: ...
    async def rollback(self, operation_id: str) -> None: ...
    async def notify(self, withdrawal_id: str, status: str, body: bytes) -> None: ...


FreezeState = Literal["frozen", "committed", "rolled_back"]
"""What a freeze answered: ``frozen`` for a hold in place (new, or this operation's own
earlier one); an operation already settled answers its settled state."""


class _Operation(msgspec.Struct):
    state: FreezeState


class _Error(msgspec.Struct):
    code: str = "unknown"


class _ErrorEnvelope(msgspec.Struct):
    error: _Error = msgspec.field(default_factory=_Error)


def _error_code(body: bytes) -> str:
    try:
        return msgspec.json.decode(body, type=_ErrorEnvelope).error.code
    except msgspec.MsgspecError:
        return "unknown"


class HttpCascadeCore:
    """The real client (bounded timeouts, a few quick retries per call)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 5.0,
        attempts: int = 3,
        client: HttpClient | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._attempts = attempts
        self._timeouts = Timeouts(connect=min(2.0, timeout), read=timeout)
        self._client = client or HttpClient(timeouts=self._timeouts)
        self._owns_client = client is None

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _post(self, path: str, body: bytes, extra: dict[str, str] | None = None) -> bytes:
        headers = {**self._headers, **(extra or {})}
        last = "no attempt"
        for attempt in range(self._attempts):
            try:
                answer = await self._client.request(
                    "POST", self._base + path, body=body, headers=headers, timeouts=self._timeouts
                )
            except TransportFailure as exc:
                last = str(exc)
            else:
                if 200 <= answer.status < 300:
                    return answer.body
                if 400 <= answer.status < 500 and answer.status not in (408, 429):
                    raise CoreRefused(_error_code(answer.body), answer.status)
                last = f"HTTP {answer.status}"
            if attempt + 1 < self._attempts:
                await asyncio.sleep(0.05 * 2**attempt)
        raise CoreUnavailable(f"cascade-core {path}: {last}")

    async def freeze(
        self,
        operation_id: str,
        withdrawal_id: str,
        provider_id: str,
        amount: Decimal,
        currency: str,
    ) -> FreezeState:
        """The operation's state after the freeze; see :data:`FreezeState`."""
        body = msgspec.json.encode(
            {
                "operation_id": operation_id,
                "withdrawal_id": withdrawal_id,
                "provider_id": provider_id,
                "amount": f"{amount:.2f}",
                "currency": currency,
            }
        )
        answer = await self._post("/v1/balances/freeze", body)
        try:
            return msgspec.json.decode(answer, type=_Operation).state
        except msgspec.MsgspecError as exc:
            # Without the state nobody knows whether a hold is in place: retry, never create.
            raise CoreUnavailable(f"cascade-core freeze: unexpected answer ({exc})") from exc

    async def commit(self, operation_id: str) -> None:
        await self._post("/v1/balances/commit", msgspec.json.encode({"operation_id": operation_id}))

    async def rollback(self, operation_id: str) -> None:
        await self._post(
            "/v1/balances/rollback", msgspec.json.encode({"operation_id": operation_id})
        )

    async def operation(self, operation_id: str) -> FreezeState | None:
        """cascade-core's view of one balance operation: its state, or None when it knows no
        such operation (404). Read-only: reconciliation compares it with our record."""
        last = "no attempt"
        for attempt in range(self._attempts):
            try:
                answer = await self._client.request(
                    "GET",
                    f"{self._base}/v1/balances/operations/{operation_id}",
                    headers=self._headers,
                    timeouts=self._timeouts,
                )
            except TransportFailure as exc:
                last = str(exc)
            else:
                if answer.status == 404:
                    return None
                if answer.status == 200:
                    try:
                        return msgspec.json.decode(answer.body, type=_Operation).state
                    except msgspec.MsgspecError as exc:
                        raise CoreUnavailable(f"cascade-core operation: {exc}") from exc
                if 400 <= answer.status < 500 and answer.status not in (408, 429):
                    raise CoreRefused(_error_code(answer.body), answer.status)
                last = f"HTTP {answer.status}"
            if attempt + 1 < self._attempts:
                await asyncio.sleep(0.05 * 2**attempt)
        raise CoreUnavailable(f"cascade-core operation {operation_id}: {last}")

    async def notify(self, withdrawal_id: str, status: str, body: bytes) -> None:
        await self._post(
            "/v1/withdrawal-notifications",
            body,
            {"Idempotency-Key": f"{withdrawal_id}:{status}"},
        )
