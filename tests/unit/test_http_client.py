"""The outbound HTTP client against real sockets: answers, and whether a failure was sent.

"Sent" decides money: a provider create that never reached the provider proves nothing, a
create that timed out after sending may have created the order. Both must be told apart.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from decimal import Decimal

import msgspec
import pytest

from contracts.provider import CreateOrder, ProviderDestination
from contracts.providers_file import ProviderConfig
from orchestrator.core_client import CoreUnavailable, HttpCascadeCore
from orchestrator.domain import Ambiguous
from orchestrator.http_client import HttpClient, Timeouts, TransportFailure
from orchestrator.provider_client import HttpProviderAdapter
from tests.conftest import providers_document

FAST = Timeouts(connect=1.0, read=0.3)


async def _server(
    answer: bytes | None, *, close: bool = False
) -> tuple[asyncio.Server, list[bytes], int]:
    """A raw HTTP/1.1 server: reads each request's head and body and answers ``answer`` (or
    never); ``close`` hangs up right after the first answer."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve(reader, writer)
        finally:  # also when the test ends first: an open socket would leak to the next test
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            seen.append(head + await reader.readexactly(length))
            if answer is None:
                await asyncio.sleep(30)  # a server that takes the request and never answers
                return
            writer.write(answer)
            await writer.drain()
            if close:
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, seen, port


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient(timeouts=FAST)
    yield http
    await http.aclose()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_answers_any_status_with_its_body_on_a_kept_alive_connection(
    client: HttpClient,
) -> None:
    reply = b"HTTP/1.1 422 Unprocessable\r\nContent-Length: 17\r\n\r\n" + b'{"code":"nope"} \n'
    server, seen, port = await _server(reply)
    async with server:
        for _ in range(3):
            answer = await client.request(
                "POST",
                f"http://127.0.0.1:{port}/orders",
                body=b'{"a":1}',
                headers={"Idempotency-Key": "k1"},
            )
            assert (answer.status, answer.body) == (422, b'{"code":"nope"} \n')
    assert len(seen) == 3
    assert all(b"idempotency-key: k1" in request.lower() for request in seen)
    assert all(request.endswith(b'{"a":1}') for request in seen)


async def test_refused_connection_was_not_sent(client: HttpClient) -> None:
    with pytest.raises(TransportFailure) as failure:
        await client.request("POST", f"http://127.0.0.1:{_closed_port()}/orders", body=b"{}")
    assert failure.value.sent is False
    assert str(failure.value).startswith("connect failed")


async def test_no_answer_after_sending_was_sent(client: HttpClient) -> None:
    server, seen, port = await _server(None)
    async with server:
        with pytest.raises(TransportFailure) as failure:
            await client.request("POST", f"http://127.0.0.1:{port}/orders", body=b"{}")
    assert failure.value.sent is True
    assert len(seen) == 1, "the request reached the server"


async def test_connection_closed_mid_answer_was_sent(client: HttpClient) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"
    server, _seen, port = await _server(answer, close=True)
    slow = Timeouts(connect=1.0, read=30.0)  # the hang-up, not a timeout, must end it
    async with server:
        with pytest.raises(TransportFailure) as failure:
            await client.request("GET", f"http://127.0.0.1:{port}/orders/x", timeouts=slow)
    assert failure.value.sent is True
    assert "timed out" not in str(failure.value)


async def test_provider_create_without_an_answer_is_ambiguous_never_a_decline() -> None:
    """Through the adapter: both kinds of failure leave the order's fate open."""
    doc = providers_document()["providers"]["sbx_ok"]
    order = CreateOrder(
        order_id="cg-1",
        amount="1.00",
        currency="EUR",
        destination=ProviderDestination(type="iban", account="DE89370400440532013000"),
    )
    server, _seen, port = await _server(None)
    adapter = HttpProviderAdapter()
    try:
        async with server:
            for base in (f"http://127.0.0.1:{_closed_port()}", f"http://127.0.0.1:{port}"):
                config = msgspec.convert(
                    {
                        **doc,
                        "base_url": base,
                        "timeouts": {"connect_seconds": 1, "read_seconds": 0.3},
                    },
                    ProviderConfig,
                )
                result = await adapter.create(config, order)
                assert isinstance(result, Ambiguous), result
    finally:
        await adapter.aclose()


def _json_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


@pytest.mark.parametrize("state", ["frozen", "committed", "rolled_back"])
async def test_a_freeze_says_what_state_the_operation_is_in(client: HttpClient, state: str) -> None:
    """A freeze repeated for a settled operation answers 200 with that state: not a hold."""
    body = b'{"operation_id":"op-1","state":"%s"}' % state.encode()
    server, _seen, port = await _server(_json_answer(body))
    core = HttpCascadeCore(f"http://127.0.0.1:{port}", "t", client=client, attempts=1)
    try:
        assert await core.freeze("op-1", "wd-1", "p", Decimal("10.00"), "EUR") == state
    finally:
        server.close()


@pytest.mark.parametrize("body", [b"{}", b'{"state":"held"}', b"not json"])
async def test_a_freeze_answer_without_a_known_state_is_not_a_hold(
    client: HttpClient, body: bytes
) -> None:
    server, _seen, port = await _server(_json_answer(body))
    core = HttpCascadeCore(f"http://127.0.0.1:{port}", "t", client=client, attempts=1)
    try:
        with pytest.raises(CoreUnavailable, match="unexpected answer"):
            await core.freeze("op-1", "wd-1", "p", Decimal("10.00"), "EUR")
    finally:
        server.close()
