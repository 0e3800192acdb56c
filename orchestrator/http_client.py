"""The outbound HTTP client: cascade-core, providers, and the sandbox's webhook deliveries.

One pooled, keep-alive HTTP/1.1 client per process on aiohttp. It was httpx at first; the
``baselines`` benchmark measured httpx at about 2.8 ms of client CPU per call with 16 calls in
flight (httpcore's pool re-checks every connection's idleness, with a ``poll`` syscall each,
for every queued request) against about 0.14 ms for aiohttp on the same server; with four
calls per withdrawal that was half of a worker's CPU.

The one thing callers need besides the answer is *whether the request may have reached the
server*: a provider create that failed to connect proved nothing was sent, a timeout after
sending proves nothing at all. :class:`TransportFailure` says which.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp


class TransportFailure(Exception):
    """No HTTP answer. ``sent`` is False only when the connection was never established."""

    def __init__(self, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        self.sent = sent


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to connect, and to wait for each read of the answer."""

    connect: float
    read: float

    def client_timeout(self) -> aiohttp.ClientTimeout:
        # total bounds a server that trickles bytes just inside the per-read timeout.
        return aiohttp.ClientTimeout(
            total=self.connect + 2 * self.read, sock_connect=self.connect, sock_read=self.read
        )


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


class HttpClient:
    """A shared connection pool; the aiohttp session is created on first use, in the loop."""

    def __init__(self, *, timeouts: Timeouts, max_connections: int = 200) -> None:
        self._default = timeouts.client_timeout()
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._default,
                # No proxy or .netrc from the environment: these are service-to-service calls.
                trust_env=False,
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeouts: Timeouts | None = None,
    ) -> Answer:
        """Send one request and read the whole answer; raises :class:`TransportFailure`."""
        timeout = None
        if timeouts is not None:
            timeout = self._timeouts.get(timeouts)
            if timeout is None:
                timeout = self._timeouts.setdefault(timeouts, timeouts.client_timeout())
        session = self._ensure_session()
        try:
            async with session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=timeout or self._default,
                allow_redirects=False,
            ) as response:
                return Answer(response.status, await response.read())
        except aiohttp.ClientConnectorError as exc:
            raise TransportFailure(f"connect failed: {exc}", sent=False) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise TransportFailure("connect timed out", sent=False) from exc
        except TimeoutError as exc:  # aiohttp.ServerTimeoutError is one too
            raise TransportFailure(f"timed out: {type(exc).__name__}", sent=True) from exc
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            raise TransportFailure(f"{type(exc).__name__}: {exc}", sent=True) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
