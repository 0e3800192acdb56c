"""The process's live dependencies, built once at start and closed at stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import asyncpg
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError

from flags.router import CohortRouter
from gateway.settings import Settings
from orchestrator import bus, store
from orchestrator.core_client import HttpCascadeCore
from orchestrator.engine import Engine
from orchestrator.http_client import HttpClient, Timeouts
from orchestrator.outbox import OutboxRelay
from orchestrator.provider_client import HttpProviderAdapter
from orchestrator.store import probes

log = logging.getLogger("cascade.runtime")
# How long a starting process waits for a JetStream that does not answer yet (a cluster's
# leader election after a lost server takes seconds) before it gives up with one line.
JETSTREAM_START_SECONDS = 30.0
# Likewise for a Postgres that is there but not ready (crash recovery takes seconds).
DATABASE_START_SECONDS = 30.0
START_RETRY_PAUSE = 1.0


class DependencyError(Exception):
    """A dependency needed at start is unusable; the message is one line for the operator."""


@dataclass
class Runtime:
    settings: Settings
    pool: store.Pool
    nc: NatsClient
    js: JetStreamContext
    relay: OutboxRelay
    engine: Engine
    core: HttpCascadeCore
    provider_adapter: HttpProviderAdapter
    http: HttpClient
    router: CohortRouter | None = None

    @property
    def nats_up(self) -> bool:
        return bool(self.nc.is_connected)

    async def database_up(self) -> bool:
        return await probes.ping(self.pool)

    async def close(self) -> None:
        """Release everything within a few seconds, whatever state the peers are in."""
        if self.router is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(self.router.close), 5)
        await self.http.aclose()
        await self.relay.deferred.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.close(), 3)
        try:
            await asyncio.wait_for(self.pool.close(), 5)
        except TimeoutError:
            self.pool.terminate()


async def _wait_for_schema(pool: store.Pool, seconds: float) -> bool:
    """True if the schema is still missing after waiting up to ``seconds`` for migrations."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        async with asyncio.timeout(10):
            missing = not await probes.schema_present(pool)
        if not missing or loop.time() >= deadline:
            return missing
        await asyncio.sleep(0.1)


async def open_runtime(settings: Settings, *, name: str, with_router: bool) -> Runtime:
    """Connect to Postgres and NATS, ensure the streams, load flags (in a thread)."""
    if settings.database_url is None:
        raise DependencyError("DATABASE_URL is not set")
    if settings.nats_url is None:
        raise DependencyError("NATS_URL is not set")
    if settings.core_url is None:
        raise DependencyError("CORE_URL is required when SANDBOX_ENABLED is false")
    pool = await _open_database(settings)
    names = bus.Names(settings.nats_namespace)
    try:
        streams, nc = await _open_broker(settings, names, name)
    except DependencyError:
        await pool.close()
        raise
    js = streams.js
    http = HttpClient(timeouts=Timeouts(connect=2.0, read=5.0), max_connections=200)
    core = HttpCascadeCore(settings.core_url, settings.core_token, client=http)
    adapter = HttpProviderAdapter(client=http)
    relay = OutboxRelay(pool, js, names, streams=streams)
    engine = Engine(
        pool=pool, relay=relay, core=core, providers=adapter, provider_configs=settings.providers
    )
    runtime = Runtime(
        settings=settings,
        pool=pool,
        nc=nc,
        js=js,
        relay=relay,
        engine=engine,
        core=core,
        provider_adapter=adapter,
        http=http,
    )
    if with_router:
        router = CohortRouter(
            flags_file=settings.flags_file,
            unleash_url=settings.unleash_url,
            unleash_token=settings.unleash_api_token,
            refresh_interval=settings.unleash_refresh_seconds,
        )
        await asyncio.to_thread(router.start)
        runtime.router = router
    return runtime


async def _create_pool(settings: Settings) -> store.Pool:
    """The pool, waiting up to :data:`DATABASE_START_SECONDS` for a server that is there but
    not ready (starting, recovering after a crash, out of connections). A server that cannot
    be reached at all, or refuses the credentials, fails at once: that is a setting to fix."""
    deadline = asyncio.get_running_loop().time() + DATABASE_START_SECONDS
    while True:
        try:
            async with asyncio.timeout(10):
                return await store.create_pool(
                    settings.asyncpg_dsn, max_size=settings.database_pool_size
                )
        except (asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("the database is not accepting connections yet; retrying")
            await asyncio.sleep(START_RETRY_PAUSE)


async def _open_database(settings: Settings) -> store.Pool:
    """A pool on a migrated database (waiting ``WAIT_FOR_SCHEMA_SECONDS`` for migrations)."""
    try:
        pool = await _create_pool(settings)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise DependencyError(
            f"cannot connect to DATABASE_URL ({type(exc).__name__}: {exc})".replace("\n", " ")
        ) from exc
    try:
        missing = await _wait_for_schema(pool, settings.wait_for_schema_seconds)
    except (asyncpg.PostgresError, TimeoutError) as exc:
        await pool.close()
        raise DependencyError(f"database check failed: {exc}") from exc
    if missing:
        await pool.close()
        raise DependencyError(
            f"the database schema is missing or older than this version needs (migration"
            f" {probes.SCHEMA_REVISION}): run `cascade-gateway migrate` first"
        )
    return pool


async def _open_broker(
    settings: Settings, names: bus.Names, name: str
) -> tuple[bus.Streams, NatsClient]:
    """A NATS connection (named ``name``) with the streams of ``names`` ensured; the
    :class:`~orchestrator.bus.Streams` recreate them if the broker loses them later."""
    assert settings.nats_url is not None
    try:
        nc = await bus.connect(settings.nats_url, name=name)
    except Exception as exc:
        raise DependencyError(f"cannot connect to NATS_URL {settings.nats_url} ({exc!r})") from exc
    streams = bus.Streams(
        nc.jetstream(),
        names,
        ack_wait_seconds=settings.ack_wait_seconds,
        replicas=settings.jetstream_replicas,
    )
    try:
        await _ensure_streams(streams, name)
    except Exception as exc:
        await nc.close()
        raise DependencyError(
            f"JetStream setup failed on {settings.nats_url} (needs nats-server >= 2.12 with "
            f"JetStream enabled): {exc!r}"
        ) from exc
    return streams, nc


async def _ensure_streams(streams: bus.Streams, name: str) -> None:
    """Create or update the streams, waiting out a JetStream that cannot answer yet (a
    cluster electing its leader after losing a server, a server still starting) for up to
    :data:`JETSTREAM_START_SECONDS`; any other refusal fails at once."""
    deadline = asyncio.get_running_loop().time() + JETSTREAM_START_SECONDS
    unanswered = (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError)
    while True:
        try:
            await streams.ensure()
        except unanswered:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("JetStream not answering yet; retrying", extra={"client": name})
            await asyncio.sleep(START_RETRY_PAUSE)
        else:
            return
