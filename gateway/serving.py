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

The protocol also answers what the HTTP parser refuses (an unknown method, a control
character in a header value, ...) in the contract's error envelope, and closes the connection
after a CONNECT (:class:`CoalescingHttpToolsProtocol`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn._types import (
    ASGI3Application,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from contracts.legacy import (
    ApiError,
    FieldError,
    check_idempotency_key,
    check_request_id,
    encode_api_error,
    encode_validation_error,
)

log = logging.getLogger("cascade.http")

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
    """uvicorn's httptools protocol writing through a :class:`CoalescingTransport`, answering
    what its HTTP parser refuses as the contract answers, and never reading a tunnel as requests.

    uvicorn answers a request its parser refuses (an unknown method, a control character in a
    header value, a body it cannot frame) with a plain-text 400 without ``X-Request-Id``, at
    once, dropping the answers still owed to earlier requests on the connection. Here the
    refused request gets the contract's error envelope (:func:`_refusal`), with the X-Request-Id
    rule applied to its own header (read again from its bytes: :func:`_refused_head`), after
    those answers; then the connection closes, as nothing after the refused bytes can be framed.

    After a request that asks to switch protocols the parser stops, and uvicorn dropped the rest
    of what it had read: requests pipelined after it were never answered. Here the app answers
    a CONNECT (404 or 405) with ``Connection: close``, and nothing after it is read: those bytes
    are the client's tunnel, not requests. Any other ``Upgrade`` is declined by answering in
    HTTP/1.1 (RFC 9110 section 7.8), and parsing goes on with the next request. The gateway
    serves no WebSocket (``ws="none"`` in :func:`server_config`), so no upgrade is ever taken.

    A request with ``Expect: 100-continue`` whose answer starts before its body came and before
    the client was told to send it (a 401, a 404, anything answered without reading the body)
    closes the connection after that answer (:func:`_closing_if_answered_first`). uvicorn kept
    it open while its parser still waited for the declared body, which such a client may never
    send: the next request's bytes were read as that body and the rest refused as a request, so
    the next request got an answer meant for no request of the client's (a 405).
    """

    _refusal: bytes | None = None
    # Nothing more is read as HTTP: after a refusal or a CONNECT the connection is closing.
    _stopped = False
    # Inside a request (between the parser's message begin and complete), and what was read since
    # the last point between two requests: the bytes a refused request's head is read again from,
    # and how many requests began in them (the refused one is the last).
    _in_request = False
    _unread: list[bytes] | None = None
    _unread_size = 0
    _begun = 0
    # The cycle before the last one uvicorn made: the newest earlier request still owed an answer
    # when the last request is refused in its body (see ``_refuse``).
    _earlier_cycle: RequestResponseCycle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the parser's refusals and upgrades handled here."""
        if self._stopped:
            return  # after a refusal or a CONNECT nothing more is read as requests
        self._unset_keepalive_if_required()
        while data:
            self._keep_unread(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                # The parser stopped after a request asking to switch protocols, which the app
                # answers in HTTP/1.1. After a CONNECT come the client's tunnel bytes; after any
                # other, the next request.
                if self.parser.get_method() == b"CONNECT":
                    self._stopped = True
                    return
                data = data[upgrade.args[0] :]
            except httptools.HttpParserError as refusal:
                self._refuse(refusal)
                return
            else:
                return

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_request = True
        self._begun += 1

    def on_headers_complete(self) -> None:
        upgrade = self.parser.should_upgrade() and self.parser.get_method() != b"CONNECT"
        if upgrade and _declares_body(self.headers):
            # httptools reads no body after a request that asks to switch protocols, so the app
            # would answer this one as if it had none: refused instead (a 400).
            raise _UnreadableBody
        self._earlier_cycle = self.cycle
        super().on_headers_complete()
        if self.scope["method"] == "CONNECT":
            self.cycle.keep_alive = False  # its answer says Connection: close, then closes

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_request = False

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if cycle.waiting_for_100_continue:
            app = _closing_if_answered_first(cycle, app)
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._send_refusal_when_answered()

    def _keep_unread(self, data: bytes) -> None:
        if not self._in_request:
            self._unread, self._unread_size, self._begun = [data], len(data), 0
        elif self._unread is not None:
            self._unread_size += len(data)
            if self._unread_size > _UNREAD_LIMIT:
                self._unread = None  # a refusal now reads no header: a fresh request id
            else:
                self._unread.append(data)

    def _refuse(self, refusal: httptools.HttpParserError) -> None:
        self._stopped = True
        cycle = self.cycle
        if self._in_request and cycle is not None and cycle.scope is self.scope:
            # The parser refused the body of the request whose head it read last, which the app
            # can never read.
            head = _RefusedHead(self.headers)
            if self.pipeline and self.pipeline[0][0] is cycle:
                # Its cycle waits in the pipeline (the newest, on the left) behind answers still
                # owed: it never runs, and the refusal is sent once those answers are, as for a
                # refusal in a head. Closing now dropped them: the client of a create before it
                # never learnt the outcome. ``self.cycle`` is the earlier cycle again, the last
                # that owes an answer, which ``_send_refusal_when_answered`` waits for.
                self.pipeline.popleft()
                self.cycle = self._earlier_cycle  # type: ignore[assignment]  # never None here
                self._refusal = self._refusal_bytes(refusal, head)
                self._send_refusal_when_answered()
                return
            # It is the one in flight (no earlier answer is owed): if the app has not begun
            # answering, the refusal is its answer; otherwise the connection just closes.
            if not cycle.response_started and not self.pipeline:
                self.transport.write(self._refusal_bytes(refusal, head))
            self.transport.close()
            return
        unread = b"".join(self._unread) if self._unread is not None else b""
        self._refusal = self._refusal_bytes(refusal, _refused_head(refusal, unread, self._begun))
        self._send_refusal_when_answered()

    def _refusal_bytes(self, refusal: httptools.HttpParserError, head: _RefusedHead) -> bytes:
        request_id = check_request_id(head.field(b"x-request-id"))
        status, body = _refusal(refusal, head, request_id)
        log.info(
            "request refused by the HTTP parser",
            extra={"status": status, "reason": str(refusal), "request_id": request_id},
        )
        lines = [STATUS_LINE[status]]
        lines += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        lines += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: " + request_id.encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        return b"".join(lines) + body

    def _send_refusal_when_answered(self) -> None:
        answered = self.cycle is None or self.cycle.response_complete
        if self._refusal is None or not answered or self.pipeline:
            return
        self.transport.write(self._refusal)
        self.transport.close()


def _closing_if_answered_first(
    cycle: RequestResponseCycle, app: ASGI3Application
) -> ASGI3Application:
    """``app``, its answer closing the connection when it starts while the client still waits
    for a 100 (Continue) to send a body that has not all come.

    The parser frames what follows that request by the body it declared, but the client may
    never send it (RFC 9110 section 10.1.1): what the client sends next would be read as that
    body, and the rest as a request, answered in the next request's place. The answer says
    ``Connection: close`` instead, as a server that answers before reading the whole body
    should say whether it goes on reading (ibid.), and nothing more is read. Once a 100 was
    sent, or the whole body came, the framing holds and the connection is kept alive.
    """

    async def answering(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        async def closing_send(message: ASGISendEvent) -> None:
            if (
                message["type"] == "http.response.start"
                and cycle.waiting_for_100_continue
                and cycle.more_body
            ):
                cycle.keep_alive = False
            await send(message)

        await app(scope, receive, closing_send)

    return answering


class _UnreadableBody(Exception):
    """A request's body the parser will not read (see ``on_headers_complete``)."""


def _declares_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
        for name, value in headers
    )


# How much is kept, from the last point between two requests on, to read a refused request's
# head again: as much as the largest body the API takes, with room for the heads around it.
_UNREAD_LIMIT = 2 * 65536


@dataclass(frozen=True)
class _RefusedHead:
    """The header fields of a refused request, as far as they could be read (names lowercased,
    values raw), and the one whose value the parser refused, when it refused one."""

    fields: list[tuple[bytes, bytes]]
    refused: tuple[bytes, bytes] | None = None

    def field(self, name: bytes) -> str | None:
        return next((value.decode("latin-1") for key, value in self.fields if key == name), None)

    def key_error(self) -> FieldError | None:
        """The contract's error on the ``Idempotency-Key``, when its value was refused."""
        if self.refused is None or self.refused[0] != b"idempotency-key":
            return None
        return check_idempotency_key(self.refused[1].decode("latin-1"))


def _refusal(
    refusal: httptools.HttpParserError, head: _RefusedHead, request_id: str
) -> tuple[int, bytes]:
    """Status and body of the contract's answer to a request the parser refused.

    In the contract's order of checks: a method it does not know is a 405, a request target it
    cannot read a 404 (no resource has that name); an ``Idempotency-Key`` value refused for a
    control character is the 422 the app gives any key it refuses (listing the key alone: the
    body is never read); anything else is the contract's one 400, the answer the app gives a
    request it cannot read.
    """
    if isinstance(refusal, httptools.HttpParserInvalidMethodError):
        error = ApiError.METHOD_NOT_ALLOWED
    elif isinstance(refusal, httptools.HttpParserInvalidURLError) or isinstance(
        # uvicorn reads the target when the head is complete: parse_url, then ASCII.
        refusal.__context__,
        httptools.HttpParserInvalidURLError | UnicodeDecodeError,
    ):
        error = ApiError.ROUTE_NOT_FOUND
    else:
        key_error = head.key_error()
        if key_error is not None:
            return 422, encode_validation_error([key_error], request_id)
        error = ApiError.MALFORMED_JSON
    return error.status, encode_api_error(error, request_id)


def _refused_head(refusal: httptools.HttpParserError, unread: bytes, begun: int) -> _RefusedHead:
    """The head of the refused request, read again from ``unread``: the bytes read since the
    last point between two requests, in which ``begun`` requests began, the refused one last.

    httptools tells neither where a request began nor where it refused one, so fresh parsers
    read prefixes of ``unread``, and bisection finds the shortest in which the refused request
    has begun and the shortest that is refused: a few passes at the parser's own speed. The
    head's lines are read as plain ``name: value`` fields, those after the refused byte too (for
    the request id). A refusal from one of uvicorn's callbacks is not the parser's own: it
    refuses no field.
    """
    if begun == 0:
        return _RefusedHead([])
    start = _shortest_prefix(len(unread), lambda size: _Replay(unread[:size]).begun >= begun)
    if start is None:
        return _RefusedHead([])
    head = unread[start - 1 :].split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    fields = [_field(line) for line in lines[1:] if b":" in line]
    if isinstance(refusal, httptools.HttpParserCallbackError):
        return _RefusedHead(fields)
    refused_at = _shortest_prefix(len(unread), lambda size: _Replay(unread[:size]).refused)
    if refused_at is None:
        return _RefusedHead(fields)
    at = refused_at - start  # the refused byte's offset in head
    index = head.count(b"\r\n", 0, at)  # its line's, in lines
    if index == 0 or at >= len(head):
        return _RefusedHead(fields)  # refused in the request line, or after the head
    in_line = at - sum(len(line) + 2 for line in lines[:index])
    if not 0 <= lines[index].find(b":") < in_line:
        return _RefusedHead(fields)  # refused in the field's name
    return _RefusedHead(fields, _field(lines[index]))


def _field(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.strip().lower(), value.strip()


class _Replay:
    """A fresh parser's reading of ``data``: how many requests began, and whether one was
    refused. Its leniency is uvicorn's, so it stops where the server's parser stopped."""

    def __init__(self, data: bytes) -> None:
        self.begun = 0
        self.refused = False
        parser = httptools.HttpRequestParser(self)
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:
            self.refused = True
        except httptools.HttpParserUpgrade:
            pass

    def on_message_begin(self) -> None:
        self.begun += 1


def _shortest_prefix(size: int, holds: Callable[[int], bool]) -> int | None:
    """The least ``n`` in 1..``size`` for which ``holds(n)``, which once true stays true."""
    if size == 0 or not holds(size):
        return None
    low, high = 1, size
    while low < high:
        middle = (low + high) // 2
        if holds(middle):
            high = middle
        else:
            low = middle + 1
    return low


def server_config(app: Any, *, host: str, port: int) -> uvicorn.Config:
    """The uvicorn configuration ``cascade-gateway serve`` runs ``app`` with (the tests too).

    ``loop="none"``: the caller's loop (uvloop in ``serve``). ``ws="none"``: the protocol
    declines every upgrade, whatever is installed. No access log: requests are logged by the
    app, with their ids.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http=CoalescingHttpToolsProtocol,
        ws="none",
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
