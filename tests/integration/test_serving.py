"""The gateway's HTTP protocol sends each answer in one write, and serves as uvicorn does."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.serving import CoalescingTransport
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
