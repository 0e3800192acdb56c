"""Provider webhook intake: ``POST /webhooks/{provider_id}``.

Verified before anything touches state (Standard Webhooks HMAC over the raw bytes, ±5 min,
several secrets for rotation), then handed to the orchestrator on JetStream and acknowledged.
The ``Nats-Msg-Id`` of provider + reference + status absorbs a provider's quick retries;
the state machine absorbs everything later. Malformed input is always a 4xx, never a 500.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.params import FromPath

from contracts.messages import WebhookMessage
from contracts.provider import FINAL_PROVIDER_STATUSES, ProviderWebhook
from contracts.webhooks import SignatureError, verify
from gateway.api import trace_id_of
from gateway.http import ApiProblem, json_response, read_body
from gateway.runtime import Runtime
from orchestrator import bus
from orchestrator import metrics as m

MAX_WEBHOOK_BODY = 65536
_STATUS_OF_REASON = {
    "missing_headers": 400,
    "bad_timestamp": 400,
    "stale_timestamp": 400,
    "bad_signature": 400,
    "invalid_signature": 401,
}


def _answer(provider: str, result: str, status: int, message: str) -> Response[bytes]:
    m.webhooks.labels(provider=provider, result=result).inc()
    body = msgspec.json.encode({"result": result, "message": message})
    return json_response(body, status)


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
    if event.status not in FINAL_PROVIDER_STATUSES:
        return _answer(provider_id, "progress", 200, "not an outcome; timers keep running")
    if not rt.nats_up:
        return _answer(provider_id, "unavailable", 503, "try again later")
    message = WebhookMessage(
        provider_id=provider_id,
        order_id=event.order_id,
        reference=event.reference,
        status=event.status,
        code=event.code,
        webhook_id=headers.get("webhook-id", ""),
    )
    msg_id = f"wh:{provider_id}:{event.reference}:{event.status}"
    try:
        ack = await rt.js.publish(
            rt.relay.names.subject(bus.WEBHOOK_RECEIVED),
            msgspec.json.encode(message),
            headers={"Nats-Msg-Id": msg_id, **bus.trace_headers(trace_id_of(request))},
            timeout=5,
        )
    except Exception:  # noqa: BLE001 — any broker failure: the provider retries later
        return _answer(provider_id, "unavailable", 503, "try again later")
    if ack.duplicate:
        return _answer(provider_id, "duplicate", 200, "already received")
    return _answer(provider_id, "accepted", 200, "accepted")
