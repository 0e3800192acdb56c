"""The HTTP server's protocol: uvicorn's httptools protocol, with each answer sent in one piece.

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
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
    """uvicorn's httptools protocol writing through a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))


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
