"""The baseline every HTTP figure is read against: Litestar doing almost nothing.

It decodes a JSON body and answers a small JSON object, under the same server stack as the
gateway (uvicorn, uvloop, httptools), so "intake / bare" says what verification, decoding and
a JetStream publish cost on this machine.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, get, post


@post("/echo", status_code=200)
async def echo(data: dict[str, Any]) -> dict[str, str]:
    return {"result": "accepted", "message": "accepted"}


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


app = Litestar(route_handlers=[echo, healthz], openapi_config=None, logging_config=None)
