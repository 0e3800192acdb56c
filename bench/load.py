"""A small closed-loop HTTP/1.1 load generator on raw asyncio streams.

Pure Python so ``make bench`` installs nothing, and lean on purpose: requests are pre-built
bytes and responses are parsed only as far as the status and ``Content-Length``, so the client
costs a fraction of what httpx would. It still shares the machine with the server, which is
why every figure is read against a baseline measured with this same client in the same run.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    requests: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    rejected_bodies: int = 0
    """Responses whose body failed the caller's check."""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies) * 1000 if self.latencies else 0.0


def http_post(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One HTTP/1.1 keep-alive POST as bytes on the wire."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    length = None
    for line in header_block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:
        raise RuntimeError("the load generator needs Content-Length responses")
    return status, await reader.readexactly(length)


async def run_load(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    timeout: float,
    check: Callable[[int, bytes], bool] | None = None,
) -> LoadResult:
    """Send every request once over ``concurrency`` keep-alive connections, one in flight each."""
    pending: Iterator[bytes] = iter(requests)
    result = LoadResult(requests=len(requests), seconds=0.0)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for request in pending:
                sent = time.perf_counter()
                writer.write(request)
                status, body = await _read_response(reader)
                result.latencies.append(time.perf_counter() - sent)
                result.statuses[status] += 1
                if check is not None and not check(status, body):
                    result.rejected_bodies += 1
        finally:
            writer.close()

    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        await asyncio.gather(*(connection() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result
