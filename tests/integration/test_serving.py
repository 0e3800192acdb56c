"""The gateway's HTTP protocol sends each answer in one write, and serves as uvicorn does."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from litestar.types import Receive, Scope, Send
from uvicorn.server import ServerState

from gateway.serving import CoalescingHttpToolsProtocol, CoalescingTransport, server_config
from tests.conftest import API_TOKEN, StackFactory, flags_document, new_id, withdrawal_body
from tests.waiting import wait_until


class _Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0


async def test_writes_of_one_loop_pass_leave_as_one() -> None:
    real = _Recording()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"")
    transport.writelines([b"o", bytearray(b"k")])
    assert real.writes == []
    assert transport.get_write_buffer_size() == 40
    await asyncio.sleep(0)
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert real.writes[-1] == b"next"


async def test_close_flushes_first_and_abort_drops() -> None:
    real = _Recording()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"last words")
    transport.close()
    assert (real.writes, real.closed) == ([b"last words"], True)
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert real.writes == [b"last words"]

    dropped = _Recording()
    transport = CoalescingTransport(dropped, asyncio.get_running_loop())
    transport.write(b"never sent")
    transport.abort()
    await asyncio.sleep(0)
    assert (dropped.writes, dropped.aborted) == ([], True)


_SERVER = """
import sys
import uvicorn, uvloop
from litestar import Litestar, Request, post
from gateway.serving import server_config

@post("/echo", status_code=200)
async def echo(request: Request) -> dict:
    return {"n": int((await request.json())["n"]) + 1}

server = uvicorn.Server(server_config(Litestar([echo]), host="127.0.0.1", port=int(sys.argv[1])))
uvloop.run(server.serve())
"""


def _write_syscalls(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError(f"no syscw in /proc/{pid}/io")


async def _answer(reader: asyncio.StreamReader, n: int) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    body = await reader.readexactly(length)
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert body == b'{"n":%d}' % (n + 1), body
    return body


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/<pid>/io (Linux)")
async def test_a_served_answer_is_one_write(tmp_path: Path) -> None:
    """100 keep-alive requests to `serve`'s configuration on uvloop: 100 writes, not 200."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SERVER, str(port), stderr=subprocess.DEVNULL
    )

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return None  # not listening yet

    try:
        reader, writer = await wait_until(
            connect, timeout=15, what=f"the server to listen on port {port}"
        )
        writer.write(b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n{"n": 0}')
        await _answer(reader, 0)  # connection set up, first answer out of the way
        before = _write_syscalls(server.pid)
        for i in range(100):
            body = b'{"n": %d}' % i
            writer.write(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await _answer(reader, i)
        writes = _write_syscalls(server.pid) - before
        writer.close()
    finally:
        server.terminate()
        await server.wait()
    assert 100 <= writes < 150, f"{writes} writes for 100 answers"


# What the HTTP parser refuses, and what it takes for a switch of protocols, answered over a raw
# socket to the gateway as `serve` runs it.

_CLOSE = b"Connection: close\r\n"


async def _exchange(url: str, *writes: bytes) -> bytes:
    """Everything the server sends on one connection after ``writes``, until it closes it.

    An idle connection is closed after uvicorn's keep-alive timeout (5 s), so an answer that
    should close the connection is checked for ``Connection: close`` as well."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for data in writes:
            writer.write(data)
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


@dataclass(frozen=True)
class _Answer:
    status_line: bytes
    headers: dict[bytes, bytes]  # names lowercased
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])


def _answers(raw: bytes) -> list[_Answer]:
    """The answers in ``raw``, each framed by its Content-Length."""
    answers = []
    while raw:
        head, blank, rest = raw.partition(b"\r\n\r\n")
        assert blank, raw
        status_line, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        length = int(headers[b"content-length"])
        answers.append(_Answer(status_line, headers, rest[:length]))
        raw = rest[length:]
    return answers


def _request(method: bytes, target: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    head = b"%s %s HTTP/1.1\r\nHost: gateway\r\n" % (method, target) + b"".join(headers)
    if body:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


_HEALTHZ = _request(b"GET", b"/healthz")


def _create(key: bytes, request_id: bytes, *more: bytes) -> bytes:
    body = json.dumps(withdrawal_body(new_id(), ["sbx_ok"])).encode()
    return _request(
        b"POST",
        b"/v1/withdrawals",
        b"Authorization: Bearer %s\r\n" % API_TOKEN.encode(),
        b"Content-Type: application/json\r\n",
        b"Idempotency-Key: " + key + b"\r\n",
        b"X-Request-Id: " + request_id + b"\r\n",
        *more,
        body=body,
    )


def _assert_error(answer: _Answer, status: int, code: bytes) -> bytes:
    """``answer`` is the contract's error ``code`` with ``status``; returns its request id."""
    request_id = answer.headers[b"x-request-id"]
    assert answer.status == status, answer
    assert answer.headers[b"content-type"] == b"application/json", answer
    assert answer.body.startswith(b'{"error":{"code":"' + code + b'","message":"'), answer
    assert answer.body.endswith(b'"request_id":"' + request_id + b'"}}'), answer
    return request_id


async def test_a_control_character_in_the_idempotency_key_is_the_contracts_422(
    make_stack: StackFactory,
) -> None:
    """The parser refuses ``k\\x01`` (the app never sees it): still the 422 the app gives any
    other key it refuses, with the request's own X-Request-Id though it follows the key, after
    the answer owed to the request before it; then the connection closes."""
    stack = await make_stack(flags=flags_document(enabled=False), with_worker=False)
    # The app's own answer to a key that reaches it (the parser lets \x80 through).
    [reference] = _answers(await _exchange(stack.url, _create(b"k\x80", b"r-0", _CLOSE)))
    assert reference.status == 422, reference

    [healthz, refused] = _answers(await _exchange(stack.url, _HEALTHZ, _create(b"k\x01", b"r-1")))
    assert (healthz.status, healthz.body) == (200, b'{"status":"ok"}')
    assert refused.status_line == reference.status_line
    assert refused.headers[b"content-type"] == b"application/json"
    assert refused.headers[b"x-request-id"] == b"r-1"
    assert refused.headers[b"connection"] == b"close"
    assert refused.body == reference.body.replace(b'"r-0"', b'"r-1"')
    assert b'"fields":[{"field":"Idempotency-Key","reason":"invalid_format"}]' in refused.body


@pytest.mark.parametrize(
    ("writes", "status", "code", "request_id"),
    [
        # Any other header value with a control character: 400, the request's own id.
        ([_create(b"k-1", b"r-2", b"X-Note: a\x01b\r\n")], 400, b"malformed_json", b"r-2"),
        # The id itself refused: a fresh one.
        ([_create(b"k-1", b"r-\x013")], 400, b"malformed_json", None),
        # A request target the parser cannot read names no resource.
        (
            [_request(b"GET", b"/v1/with\x01drawals", b"X-Request-Id: r-5\r\n")],
            404,
            b"not_found",
            b"r-5",
        ),
        ([_request(b"GET", b"/caf\xc3\xa9", b"X-Request-Id: r-6\r\n")], 404, b"not_found", b"r-6"),
        # A body the parser cannot frame, after its head was read (the app is at work).
        (
            [
                _request(
                    b"POST",
                    b"/v1/withdrawals",
                    b"Authorization: Bearer %s\r\n" % API_TOKEN.encode(),
                    b"Content-Type: application/json\r\n",
                    b"Transfer-Encoding: chunked\r\n",
                    b"X-Request-Id: r-7\r\n",
                )
                + b"2\r\n{}\r\nzz\r\n"
            ],
            400,
            b"malformed_json",
            b"r-7",
        ),
    ],
)
async def test_whatever_the_parser_refuses_is_answered_in_the_envelope(
    make_stack: StackFactory,
    writes: list[bytes],
    status: int,
    code: bytes,
    request_id: bytes | None,
) -> None:
    stack = await make_stack(flags=flags_document(enabled=False), with_worker=False)
    [answer] = _answers(await _exchange(stack.url, *writes))
    answered_id = _assert_error(answer, status, code)
    assert answer.headers[b"connection"] == b"close"
    if request_id is None:
        assert re.fullmatch(rb"[0-9a-f]{32}", answered_id), answered_id
    else:
        assert answered_id == request_id


async def test_a_refused_head_is_read_again_from_every_read_it_came_in() -> None:
    """The parser refuses a head that came in three reads, the first of which also held a
    request before it: that request is answered first, then the refusal, which names the key
    and carries the request id that the reads split (no socket: the reads are the test's)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    config = server_config(app, host="127.0.0.1", port=0)
    protocol = CoalescingHttpToolsProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    real = _Recording()
    protocol.connection_made(real)
    for data in (
        _HEALTHZ + b"POST /v1/withdrawals HTTP/1.1\r\nX-Request-Id: r-1",
        b"0\r\nIdempotency-Key: k",
        b"\x01\r\nContent-Length: 2\r\n\r\n{}",
    ):
        protocol.data_received(data)
    await wait_until(lambda: real.closed, timeout=5, what="the connection to close")
    [answered, refused] = _answers(b"".join(real.writes))
    assert (answered.status, answered.body) == (200, b"ok")
    assert refused.status == 422
    assert refused.headers[b"x-request-id"] == b"r-10"
    assert refused.body == (
        b'{"error":{"code":"validation_failed","message":"Request validation failed.",'
        b'"fields":[{"field":"Idempotency-Key","reason":"invalid_format"}],"request_id":"r-10"}}'
    )


async def test_a_connect_is_answered_and_closes_the_connection(make_stack: StackFactory) -> None:
    """What follows a CONNECT is the client's tunnel, not requests: the CONNECT gets its 404
    with ``Connection: close`` after the answers owed before it, and the connection closes
    (uvicorn left requests pipelined after it unanswered on an open connection)."""
    stack = await make_stack(flags=flags_document(enabled=False), with_worker=False)
    connects = (
        _request(b"CONNECT", b"/nowhere", b"X-Request-Id: r-8\r\n"),
        _request(b"CONNECT", b"gateway:443", b"X-Request-Id: r-8\r\n"),
    )
    for connect in connects:
        answers = _answers(await _exchange(stack.url, _HEALTHZ, connect, _HEALTHZ, _HEALTHZ))
        assert [answer.status for answer in answers] == [200, 404], answers
        assert _assert_error(answers[1], 404, b"not_found") == b"r-8"
        assert answers[1].headers[b"connection"] == b"close"
        # Alone: answered and closed, without the client sending anything more.
        [answer] = _answers(await _exchange(stack.url, connect))
        assert (answer.status, answer.headers[b"connection"]) == (404, b"close")


async def test_an_upgrade_is_declined_and_the_connection_goes_on(make_stack: StackFactory) -> None:
    """``Upgrade: h2c`` is ignored (the answer is HTTP/1.1) and the requests after it are
    answered (uvicorn dropped the bytes after the request that asked for the switch). httptools
    reads no body after such a request, so one that has a body is refused, not answered as if
    it had none."""
    stack = await make_stack(flags=flags_document(enabled=False), with_worker=False)
    upgrade = (b"Connection: upgrade\r\n", b"Upgrade: h2c\r\n")
    last = _request(b"GET", b"/healthz", _CLOSE)
    answers = _answers(
        await _exchange(stack.url, _request(b"GET", b"/healthz", *upgrade), _HEALTHZ, last)
    )
    assert [(answer.status, answer.body) for answer in answers] == 3 * [(200, b'{"status":"ok"}')]

    with_body = _create(b"k-1", b"r-9", *upgrade)
    [healthz, refused] = _answers(await _exchange(stack.url, _HEALTHZ, with_body, _HEALTHZ))
    assert healthz.status == 200
    assert _assert_error(refused, 400, b"malformed_json") == b"r-9"
    assert refused.headers[b"connection"] == b"close"


async def test_an_answer_before_the_body_the_client_waits_to_send_closes_the_connection(
    make_stack: StackFactory,
) -> None:
    """A client that sends ``Expect: 100-continue`` sends the body only once told to. An answer
    that starts before (here the 404 of an unknown path, which reads no body) left the
    connection open while the parser still waited for the 9 declared bytes: the client's next
    request (``GET /healthz HTTP/1.1...``) was read as that body (``GET /heal``) and the rest
    (``thz HTTP/1.1...``) refused as a request, so the GET got a 405 meant for no request. Such
    an answer says ``Connection: close`` and the connection closes, the client sending nothing
    more. When the body came with the head, the framing holds and the connection stays open."""
    stack = await make_stack(flags=flags_document(enabled=False), with_worker=False)
    expect = (b"Expect: 100-continue\r\n", b"X-Request-Id: r-11\r\n")
    host, port = stack.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(_request(b"POST", b"/nowhere", *expect, b"Content-Length: 9\r\n"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        [length] = [
            line[15:] for line in head.split(b"\r\n") if line.startswith(b"content-length: ")
        ]
        [answer] = _answers(head + await reader.readexactly(int(length)))
        if answer.headers.get(b"connection") != b"close":
            writer.write(_HEALTHZ)  # the connection is open: the client goes on, body unsent
        after = _answers(await asyncio.wait_for(reader.read(-1), 10))
    finally:
        writer.close()
    assert after == [], after
    assert _assert_error(answer, 404, b"not_found") == b"r-11"
    assert answer.headers[b"connection"] == b"close"

    with_body = _request(b"POST", b"/nowhere", *expect, body=b"{not json")
    answers = _answers(await _exchange(stack.url, with_body, _request(b"GET", b"/healthz", _CLOSE)))
    assert [(answer.status, answer.headers.get(b"connection")) for answer in answers] == [
        (404, None),
        (200, b"close"),
    ]


def _post(*headers: bytes) -> bytes:
    return _request(
        b"POST",
        b"/v1/withdrawals",
        b"Authorization: Bearer %s\r\n" % API_TOKEN.encode(),
        b"Content-Type: application/json\r\n",
        b"X-Request-Id: r-12\r\n",
        *headers,
    )


@pytest.mark.parametrize(
    "refused",
    [
        # The refused request's head is read (its answer queued behind the create's), then its
        # body cannot be framed: a chunk size that is no number.
        _post(b"Transfer-Encoding: chunked\r\n") + b"2\r\n{}\r\nzz\r\n",
        # Refused in its head: a Content-Length that is no number, a control character.
        _post(b"Content-Length: 1x\r\n") + b"{}",
        _post(b"X-Note: a\x01b\r\n", b"Content-Length: 2\r\n") + b"{}",
    ],
    ids=["malformed-chunk", "bad-content-length", "control-character"],
)
@pytest.mark.parametrize("between", [[], [_HEALTHZ]], ids=["right-after", "after-a-healthz"])
async def test_a_refusal_after_a_create_in_flight_comes_after_the_creates_answer(
    make_stack: StackFactory, refused: bytes, between: list[bytes]
) -> None:
    """A create (which awaits Postgres) and, in the same write, a request the parser refuses:
    the create's answer comes first (and those of the requests between them), then the
    refusal's envelope with ``Connection: close``, then the connection closes. When the refused
    request's head had been read (a malformed chunk), the connection closed with none of them,
    and the client never learnt the create's outcome."""
    stack = await make_stack(flags=flags_document(enabled=False), with_worker=False)
    withdrawal_id = new_id()
    body = json.dumps(withdrawal_body(withdrawal_id, ["sbx_ok"])).encode()
    create = _request(
        b"POST",
        b"/v1/withdrawals",
        b"Authorization: Bearer %s\r\n" % API_TOKEN.encode(),
        b"Content-Type: application/json\r\n",
        b"Idempotency-Key: k-%s\r\n" % withdrawal_id.encode(),
        body=body,
    )
    answers = _answers(await _exchange(stack.url, b"".join([create, *between, refused])))
    assert [answer.status for answer in answers] == [201, *len(between) * [200], 400], answers
    created, *_, refusal = answers
    assert json.loads(created.body)["withdrawal_id"] == withdrawal_id
    assert (await stack.withdrawal(withdrawal_id))["withdrawal_id"] == withdrawal_id
    assert _assert_error(refusal, 400, b"malformed_json") == b"r-12"
    assert refusal.headers[b"connection"] == b"close"
