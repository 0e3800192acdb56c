"""The Litestar application: legacy v1 API, webhook intake, ops API, health, metrics, sandbox.

The sandbox (``sandbox/``, the simulators) is imported only when ``SANDBOX_ENABLED`` is true,
which production refuses, and is not in the wheel or the image: a production process never
loads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from litestar import Litestar, Request, Response, get
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.types import (
    HTTPScope,
    LifeSpanReceive,
    LifeSpanScope,
    LifeSpanSend,
    Receive,
    Scope,
    Send,
)
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import api, cohorts, ops, ops_openapi, ops_providers, ops_recon, webhooks
from gateway.protocol import (
    ApiProblem,
    json_response,
    on_http_exception,
    on_problem,
    on_unexpected,
    stamp_request_id,
)
from gateway.runtime import Runtime, open_runtime
from gateway.settings import Settings, SettingsError
from orchestrator.metrics import SECOND_REGISTRY

if TYPE_CHECKING:
    from sandbox.routes import Sandbox

log = logging.getLogger("cascade.app")

OPENAPI_FILE = Path(__file__).resolve().parents[1] / "contracts" / "openapi.json"


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Ready only when the database and NATS answer and the flags are loaded."""
    rt: Runtime = request.app.state.runtime
    db = await rt.database_up()
    nats_ok = rt.nats_up
    flags = rt.router is not None and rt.router.ready
    ok = db and nats_ok and flags
    body = b'{"status":"%s","database":%s,"nats":%s,"flags":%s}' % (
        b"ready" if ok else b"not_ready",
        _b(db),
        _b(nats_ok),
        _b(flags),
    )
    return json_response(body, 200 if ok else 503)


def _b(value: bool) -> bytes:
    return b"true" if value else b"false"


@get("/metrics")
async def metrics() -> Response[bytes]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
        data = generate_latest(registry)
    else:
        data = generate_latest(REGISTRY) + generate_latest(SECOND_REGISTRY)
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)


@get("/docs/openapi.json")
async def openapi_document() -> Response[bytes]:
    """The v1 API as it is on the wire (hand-written, checked against the contract)."""
    return json_response(OPENAPI_FILE.read_bytes())


@get(ops_openapi.OPENAPI_PATH)
async def ops_openapi_document() -> Response[bytes]:
    """The ops API (``/ops``), generated from the Structs its handlers encode."""
    return json_response(ops_openapi.document_bytes())


UNROUTABLE = "/\x00"
"""A path no route has (NUL never appears in one): where a non-literal path is sent."""


def is_literal_path(path: str) -> bool:
    """No empty segment: no trailing slash (except the root) and no repeated slash."""
    return path == "/" or (path.startswith("/") and not path.endswith("/") and "//" not in path)


class Gateway(Litestar):
    """Litestar, with paths taken literally.

    Litestar's router strips trailing slashes and merges repeated ones before matching, so
    ``POST /v1/withdrawals/`` would create a withdrawal and ``…/cancel/`` cancel one. The
    contract has only its exact paths; any other is an unknown path: 404, before the method
    is looked at. Such a request is routed to :data:`UNROUTABLE`, so its answer is the very
    404 of every unknown path (envelope, ``X-Request-Id``).
    """

    async def __call__(
        self,
        scope: Scope | LifeSpanScope,
        receive: Receive | LifeSpanReceive,
        send: Send | LifeSpanSend,
    ) -> None:
        if scope["type"] == ScopeType.HTTP:
            http = cast("HTTPScope", scope)  # mypy does not narrow a TypedDict union by a key
            if not is_literal_path(http["path"]):
                http["path"] = UNROUTABLE
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> Litestar:
    """Build the app; ``runtime`` is opened at startup unless one is given (tests)."""
    sandbox = _sandbox(settings) if settings.sandbox_enabled else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        rt = runtime or await open_runtime(settings, name="gateway", with_router=True)
        app.state.runtime = rt
        app.state.sandbox = sandbox
        if sandbox is not None:
            await sandbox.start()
        try:
            yield
        finally:
            if sandbox is not None:
                await sandbox.close()
            if runtime is None:
                await rt.close()

    handlers: list[object] = [
        # First: a path's first handler decides whether Litestar adds its own OPTIONS (204).
        api.options_not_allowed,
        api.create_withdrawal,
        api.get_withdrawal,
        api.cancel_withdrawal,
        api.healthz,
        webhooks.options_not_allowed,
        webhooks.receive_webhook,
        ops.manual_checks,
        ops.resolve_task,
        ops.withdrawal_detail,
        ops_recon.list_alerts,
        ops_recon.ack_alert,
        ops_recon.resolve_alert,
        ops_recon.accept_alert,
        ops_providers.list_providers,
        ops_providers.show_provider,
        ops_providers.override_breaker,
        cohorts.cohorts,
        readyz,
        metrics,
        openapi_document,
        ops_openapi_document,
    ]
    if sandbox is not None:
        handlers.append(sandbox.router)
    return Gateway(
        route_handlers=handlers,  # type: ignore[arg-type]
        lifespan=[lifespan],
        before_send=[stamp_request_id],
        exception_handlers={
            ApiProblem: on_problem,
            HTTPException: on_http_exception,
            Exception: on_unexpected,
        },
        openapi_config=None,
        logging_config=None,
        request_max_body_size=None,
        debug=False,
    )


def _sandbox(settings: Settings) -> Sandbox:
    """The simulators, imported here and only here: nothing else in the app needs them."""
    try:
        from sandbox.routes import Sandbox, config_from_settings  # noqa: PLC0415 — dev and test only
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != "sandbox":
            raise
        raise SettingsError(
            "SANDBOX_ENABLED is true but this installation has no sandbox: it runs from a"
            " repository checkout, not from the wheel or the image"
        ) from exc
    return Sandbox(config_from_settings(settings))
