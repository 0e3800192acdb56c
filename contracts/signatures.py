"""Standard Webhooks signatures: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``.

Secrets are ``whsec_<base64 key>`` (the Standard Webhooks form); a raw string without the
prefix is used as the key bytes as-is. The body is always the raw bytes received, never a
re-serialisation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

TOLERANCE_SECONDS = 300


class SignatureError(Exception):
    """A webhook failed verification; ``reason`` is a stable machine-readable label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def secret_key(secret: str) -> bytes:
    """The HMAC key of a configured secret."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error as exc:
            raise ValueError("webhook secret after 'whsec_' is not valid base64") from exc
    return secret.encode()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one secret."""
    mac = hmac.new(secret_key(secret), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify(  # noqa: PLR0917 — the scheme's own inputs, in the order the spec names them
    secrets: list[str],
    webhook_id: str | None,
    timestamp: str | None,
    signature_header: str | None,
    body: bytes,
    now: float,
) -> None:
    """Raise :class:`SignatureError` unless one signature matches one secret within tolerance."""
    if not webhook_id or not timestamp or not signature_header:
        raise SignatureError(
            "missing_headers", "webhook-id, webhook-timestamp and webhook-signature are required"
        )
    # isascii(): str.isdigit() also accepts digits like "²" that int() refuses.
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        raise SignatureError("bad_timestamp", "webhook-timestamp must be integer Unix seconds")
    ts = int(timestamp)
    if abs(now - ts) > TOLERANCE_SECONDS:
        raise SignatureError("stale_timestamp", "webhook-timestamp is outside the 5-minute window")
    offered: list[bytes] = []
    for part in signature_header.split(" "):
        version, _, value = part.partition(",")
        if version != "v1" or not value:
            continue
        try:
            offered.append(base64.b64decode(value.encode("ascii"), validate=True))
        except (binascii.Error, UnicodeEncodeError):
            raise SignatureError("bad_signature", "webhook-signature is not valid base64") from None
    if not offered:
        raise SignatureError("bad_signature", "webhook-signature has no v1 signature")
    signed = f"{webhook_id}.{ts}.".encode() + body
    for secret in secrets:
        expected = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
        # compare_digest on every candidate: timing does not reveal which one nearly matched.
        if any(hmac.compare_digest(expected, candidate) for candidate in offered):
            return
    raise SignatureError("invalid_signature", "no webhook-signature matches a configured secret")
