"""The worker's small HTTP surface (``WORKER_METRICS_PORT``): liveness, readiness, metrics.

Answered from the worker's own event loop, so a wedged loop fails the liveness probe.
``/readyz`` is 200 only while Postgres answers and NATS is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator

import uvicorn
from litestar import Litestar, Response, get
from nats.aio.client import Client as NatsClient
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from orchestrator import store
from orchestrator.store import probes


def worker_app(pool: store.Pool, nc: NatsClient) -> Litestar:
    @get("/healthz")
    async def healthz() -> Response[bytes]:
        return Response(content=b'{"status":"ok"}', media_type="application/json")

    @get("/readyz")
    async def readyz() -> Response[bytes]:
        ok = await probes.ping(pool) and nc.is_connected
        body = b'{"status":"%s"}' % (b"ready" if ok else b"not_ready")
        return Response(content=body, status_code=200 if ok else 503, media_type="application/json")

    @get("/metrics")
    async def metrics() -> Response[bytes]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
            return Response(content=generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        return Response(content=generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return Litestar(
        route_handlers=[healthz, readyz, metrics], openapi_config=None, logging_config=None
    )


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the worker that hosts it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve_health(pool: store.Pool, nc: NatsClient, host: str, port: int) -> asyncio.Task[None]:
    """Start the health/metrics server in the running loop; cancel the task to stop it."""
    config = uvicorn.Config(
        worker_app(pool, nc),
        host=host,
        port=port,
        loop="none",
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    return asyncio.create_task(_Server(config).serve(), name="worker-health")
