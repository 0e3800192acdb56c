"""``cascade-gateway sandbox``: the sandbox as an HTTP process of its own.

The same router the gateway mounts with ``SANDBOX_ENABLED``, served on ``SANDBOX_PORT``, with
its state in the sandbox schema of ``DATABASE_URL``. A gateway then uses it as cascade-core
(``CORE_URL={sandbox}/sandbox/core``) and as its providers (``SANDBOX_URL={sandbox}/sandbox``
in the providers file's base URLs); the sandbox sends webhooks to the gateway's ``PUBLIC_URL``.
Killing it loses nothing: a new process on the same database carries on.
"""

from __future__ import annotations

import asyncpg
import uvicorn
from litestar import Litestar

from gateway.serving import server_config
from gateway.settings import Settings
from sandbox.routes import Sandbox, config_from_settings


class SandboxUnavailableError(Exception):
    """The sandbox cannot start; the message is one line naming the cause."""


def create_sandbox_app(sandbox: Sandbox) -> Litestar:
    """An app serving only the sandbox (``/sandbox``); the caller starts and closes it."""
    return Litestar(
        route_handlers=[sandbox.router],
        openapi_config=None,
        logging_config=None,
        debug=False,
    )


async def serve_sandbox(settings: Settings) -> int:
    """Open the sandbox's database, then serve until SIGTERM or SIGINT; the exit status."""
    sandbox = Sandbox(config_from_settings(settings))
    try:
        await sandbox.start()
    except (OSError, asyncpg.PostgresError) as exc:
        await sandbox.close()
        raise SandboxUnavailableError(
            f"cannot open the sandbox's database at DATABASE_URL ({type(exc).__name__}: {exc})"
        ) from exc
    app = create_sandbox_app(sandbox)
    server = uvicorn.Server(server_config(app, host=settings.http_host, port=settings.sandbox_port))
    try:
        await server.serve()
    finally:
        await sandbox.close()
    return 0
