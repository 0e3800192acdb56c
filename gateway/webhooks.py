"""Provider webhook intake: ``POST /webhooks/{provider_id}``.

Verified before anything touches state (Standard Webhooks HMAC over the raw bytes, ±5 min,
several secrets for rotation), then handed to the orchestrator on JetStream by the application
service (:meth:`gateway.service.WithdrawalService.accept_webhook`) and acknowledged. Malformed
input is always a 4xx, never a 500.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, post, route
from litestar.params import FromPath

from contracts.legacy import ApiError
from contracts.provider import ProviderWebhook
from contracts.signatures import SignatureError, verify
from gateway.api import service_of, trace_id_of
from gateway.protocol import ApiProblem, json_response, read_body
from gateway.runtime import Runtime
from gateway.service import WebhookReceipt
from orchestrator import metrics as m

MAX_WEBHOOK_BODY = 65536
_STATUS_OF_REASON = {
    "missing_headers": 400,
    "bad_timestamp": 400,
    "stale_timestamp": 400,
    "bad_signature": 400,
    "invalid_signature": 401,
}


# How each fate of a verified webhook is answered; the provider retries a 503.
_RECEIPTS: dict[WebhookReceipt, tuple[int, str]] = {
    "progress": (200, "not an outcome; timers keep running"),
    "accepted": (200, "accepted"),
    "duplicate": (200, "already received"),
    "unavailable": (503, "try again later"),
}


def _answer(provider: str, result: str, status: int, message: str) -> Response[bytes]:
    m.webhooks.labels(provider=provider, result=result).inc()
    body = msgspec.json.encode({"result": result, "message": message})
    return json_response(body, status)


@route("/webhooks/{provider_id:str}", http_method=["OPTIONS"])
async def options_not_allowed() -> Response[bytes]:
    """405 in JSON like any other method but POST (Litestar would answer 204, empty).

    Listed before :func:`receive_webhook`: a path's first handler decides whether Litestar
    adds its own OPTIONS.
    """
    raise ApiProblem(ApiError.METHOD_NOT_ALLOWED)


@post("/webhooks/{provider_id:str}", status_code=200)
async def receive_webhook(
    request: Request[Any, Any, Any], provider_id: FromPath[str]
) -> Response[bytes]:
    rt: Runtime = request.app.state.runtime
    config = rt.settings.providers.get(provider_id)
    if config is None:
        # Unknown ids share one label: a scanner must not blow up metric cardinality.
        return _answer("unknown", "unknown_provider", 404, "unknown provider")
    try:
        body = await read_body(request, MAX_WEBHOOK_BODY)
    except ApiProblem:
        return _answer(provider_id, "too_large", 413, f"body exceeds {MAX_WEBHOOK_BODY} bytes")
    headers = request.headers
    try:
        verify(
            list(config.webhook_secrets),
            headers.get("webhook-id"),
            headers.get("webhook-timestamp"),
            headers.get("webhook-signature"),
            body,
            time.time(),
        )
    except SignatureError as exc:
        return _answer(provider_id, exc.reason, _STATUS_OF_REASON[exc.reason], str(exc))
    try:
        event = msgspec.json.decode(body, type=ProviderWebhook)
    except msgspec.ValidationError as exc:
        return _answer(provider_id, "invalid_body", 422, f"body does not match the schema: {exc}")
    except (msgspec.DecodeError, UnicodeDecodeError):
        return _answer(provider_id, "invalid_body", 400, "body is not valid UTF-8 JSON")
    receipt = await service_of(request).accept_webhook(
        provider_id,
        event,
        webhook_id=headers.get("webhook-id", ""),
        trace_id=trace_id_of(request),
    )
    status, message = _RECEIPTS[receipt]
    return _answer(provider_id, receipt, status, message)
