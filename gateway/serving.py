"""The HTTP server's protocol: uvicorn's httptools protocol, each answer sent in one piece.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, and the body as a second write when ``http.response.body`` follows.
Each write is a syscall and, on loopback or a LAN, a packet of its own; the peer wakes up for
the headers, parses them, and waits again for the body. The cascade benchmark counted about
six answers per withdrawal in the gateway (the create, the sandbox's balance and provider
calls, the webhook intake), so twelve writes where six carry the same bytes.

:class:`CoalescingTransport` keeps what is written during one pass of the event loop and
hands it to the real transport as one write at the end of that pass (``loop.call_soon``):
a Litestar answer sends its start and body messages back to back, so they leave together.
Nothing waits on a timer, and a close or EOF flushes first, so ordering and delivery are
those of the real transport.

The protocol also answers a method the HTTP parser does not know with the contract's 405
(:class:`CoalescingHttpToolsProtocol`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from contracts.legacy import ApiError, check_request_id, encode_api_error

WriteData = bytes | bytearray | memoryview


class CoalescingTransport(asyncio.Transport):
    """A transport whose writes of one event-loop pass reach ``transport`` as one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: WriteData) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, list_of_data: Iterable[WriteData]) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand what is pending to the real transport now (one write)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(d) for d in self._pending)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a :class:`CoalescingTransport`.

    Also answers a request whose method the HTTP parser does not know (``FOO /healthz``) as
    the contract answers any method it does not serve: ``405 method_not_allowed`` in the
    error envelope, after the answers to the requests before it on the connection, which
    then closes (nothing after it can be parsed). uvicorn would drop those answers and send a
    plain-text 400 with no ``X-Request-Id``.
    """

    _refusal: bytes | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))
        self.parser = _MethodCheckingParser(self.parser, self._refuse_method)  # type: ignore[assignment]

    def _refuse_method(self, data: bytes) -> None:
        request_id = check_request_id(_header(data, b"x-request-id"))
        body = encode_api_error(ApiError.METHOD_NOT_ALLOWED, request_id)
        head = [b"HTTP/1.1 405 Method Not Allowed\r\n"]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: " + request_id.encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self._refusal = b"".join(head) + body
        self._send_refusal_when_answered()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._send_refusal_when_answered()

    def _send_refusal_when_answered(self) -> None:
        answered = self.cycle is None or self.cycle.response_complete
        if self._refusal is None or not answered or self.pipeline:
            return
        self.transport.write(self._refusal)
        self.transport.close()


class _MethodCheckingParser:
    """httptools' request parser, calling ``on_unknown_method`` instead of raising when a
    request's method is not one it knows; everything else is the parser's own."""

    def __init__(
        self, parser: httptools.HttpRequestParser, on_unknown_method: Callable[[bytes], None]
    ):
        self._parser = parser
        self._on_unknown_method = on_unknown_method
        self._refused = False

    def feed_data(self, data: bytes) -> None:
        if self._refused:
            return  # the parser stopped at the refused method; the connection is closing
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            self._refused = True
            self._on_unknown_method(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


# A request line; group 1 is the method. The parser knows these and more; a refused request's
# method is not among them.
_REQUEST_LINE = re.compile(rb"(?:\A|\r\n)([^\s:]+) \S+ HTTP/\d\.\d\r\n")
_STANDARD_METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
)


def _header(data: bytes, name: bytes) -> str | None:
    """A header of the refused request, read from the bytes the parser stopped in: the headers
    after the first request line whose method is not a standard one, up to the blank line."""
    for line in _REQUEST_LINE.finditer(data):
        if line.group(1) not in _STANDARD_METHODS:
            head = data[line.end() :].split(b"\r\n\r\n", 1)[0]
            for field in head.split(b"\r\n"):
                key, sep, value = field.partition(b":")
                if sep and key.strip().lower() == name:
                    return value.strip().decode("latin-1")
            return None
    return None


def server_config(app: Any, *, host: str, port: int) -> uvicorn.Config:
    """The uvicorn configuration ``cascade-gateway serve`` runs ``app`` with (the tests too).

    ``loop="none"``: the caller's loop (uvloop in ``serve``). No access log: requests are
    logged by the app, with their ids.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http=CoalescingHttpToolsProtocol,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
