"""Schemathesis over ``contracts/openapi.json``, plus the wire rules a schema cannot express.

Schemathesis generates the cases (positive and negative data for every operation) and runs its
response checks against the document. :func:`wire_problems` adds what the OpenAPI document can
only describe in prose, each rule taken from ``docs/legacy-api/README.md`` (the oracle here is the
contract, not the app's own encoder): ``Content-Type`` exactly ``application/json``,
``X-Request-Id`` echoed or freshly generated, compact minimally escaped UTF-8 bodies, key order,
the error envelope with the status's code and message, and ``request_id`` equal to the header.

The generated cases are adjusted before they are sent, so that they reach the interesting code:

- authentication is chosen by the test (the real token most of the time, otherwise none, a wrong
  token or a non-bearer scheme), since random bearer tokens would only ever meet 401;
- a well-formed generated ``withdrawal_id`` or ``Idempotency-Key`` gets a unique suffix, so that
  positive creates are 201s rather than 409s from collisions between random values (the tests
  reach every 409 on purpose instead: follow-ups after a 201, and seeded final withdrawals);
- read and cancel are pointed at existing withdrawals part of the time (seeded ones in every
  final and non-final status, and the ones the run itself created);
- a positive create sometimes names a sandbox provider first, so that it is executed for real.
"""

from __future__ import annotations

import json
import re
import secrets
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

import jsonschema
import schemathesis
from schemathesis import CheckFunction
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import API_TOKEN, ROOT

if TYPE_CHECKING:
    from schemathesis.specs.openapi.schemas import OpenApiCase

OPENAPI_PATH: Final = ROOT / "contracts" / "openapi.json"
DOCUMENT: Final[dict[str, Any]] = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))

CHECKS: Final[tuple[CheckFunction, ...]] = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)

# How the test authenticates a generated /v1 case (schemathesis' own bearer values are random).
TOKEN_HEADER: Final = f"Bearer {API_TOKEN}"
AUTH_CHOICES: Final = ("token", "token", "token", "token", "token", "none", "wrong", "basic")
SANDBOX_PROVIDERS: Final = ("sbx_ok", "sbx_sync_ok", "sbx_decline", "sbx_silent", "sbx_no_funds")

IDENTIFIER: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
IDEMPOTENCY_KEY: Final = re.compile(r"[\x20-\x7e]{1,255}")
HEX32: Final = re.compile(r"[0-9a-f]{32}")

WITHDRAWAL_KEYS: Final = (
    "withdrawal_id",
    "merchant_id",
    "status",
    "amount",
    "currency",
    "provider_id",
    "provider_reference",
    "failure_code",
    "metadata",
    "created_at",
    "updated_at",
)

# The README's error table: status -> the (code, message) pairs that status may carry.
ERRORS: Final[dict[int, set[tuple[str, str]]]] = {
    400: {("malformed_json", "Request body is not valid JSON.")},
    401: {("unauthorized", "Missing or invalid bearer token.")},
    404: {("not_found", "Withdrawal not found."), ("not_found", "Resource not found.")},
    405: {("method_not_allowed", "Method not allowed.")},
    409: {
        (
            "idempotency_conflict",
            "Idempotency-Key was already used with a different request body.",
        ),
        ("duplicate_withdrawal", "A withdrawal with this withdrawal_id already exists."),
        ("not_cancellable", "Withdrawal is already final."),
    },
    413: {("payload_too_large", "Request body exceeds 65536 bytes.")},
    415: {("unsupported_media_type", "Content-Type must be application/json.")},
    422: {("validation_failed", "Request validation failed.")},
    500: {("internal_error", "Internal error.")},
    503: {("unavailable", "Service temporarily unavailable.")},
}


def load_schema() -> Any:
    """The document as a schemathesis schema (4.x API)."""
    return schemathesis.openapi.from_path(OPENAPI_PATH)


def unrouted_problems(response: Response, sent_rid: str | None) -> list[str]:
    """``response`` to an unknown path or method, against the document's
    ``x-unrouted-responses`` (which no operation carries, so schemathesis cannot check it)."""
    entry = DOCUMENT["x-unrouted-responses"].get(str(response.status_code))
    if entry is None:
        return [f"status {response.status_code} is not in x-unrouted-responses (404, 405)"]
    problems = wire_problems(response, sent_rid)
    definition = DOCUMENT["components"]["responses"][entry["$ref"].rsplit("/", 1)[1]]
    for name in definition.get("headers", {}):  # their values are checked by wire_problems
        if name.lower() not in response.headers:
            problems.append(f"documented header {name} is missing")
    schema = definition["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**schema, "components": DOCUMENT["components"]})
    try:
        body = json.loads(response.content)
    except ValueError:
        return problems
    problems += [f"body violates the document: {e.message}" for e in validator.iter_errors(body)]
    return problems


# --- the contract's bytes --------------------------------------------------------------------


def _contract_string(text: str) -> str:
    out = []
    for char in text:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def contract_bytes(value: Any) -> bytes:
    """``value`` written as the README's transport rules say (compact, raw UTF-8, minimal
    escapes); object keys in the order given."""

    def encode(v: Any) -> str:
        if v is None:
            return "null"
        if v is True:
            return "true"
        if v is False:
            return "false"
        if isinstance(v, str):
            return _contract_string(v)
        if isinstance(v, int | float):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ",".join(encode(x) for x in v) + "]"
        assert isinstance(v, dict)
        return "{" + ",".join(f"{_contract_string(k)}:{encode(x)}" for k, x in v.items()) + "}"

    return encode(value).encode("utf-8")


# --- adjusting generated cases ---------------------------------------------------------------


def auth_header(choice: str) -> str | None:
    """The ``Authorization`` value for one of :data:`AUTH_CHOICES` (``None``: no header)."""
    return {
        "token": TOKEN_HEADER,
        "wrong": "Bearer not-the-token",
        "basic": f"Basic {API_TOKEN}",
    }.get(choice)


def _unique(value: str, limit: int) -> str:
    suffix = "-" + secrets.token_hex(6)
    return value[: limit - len(suffix)] + suffix


def make_unique(case: OpenApiCase) -> None:
    """A well-formed ``withdrawal_id`` and ``Idempotency-Key`` get a unique suffix (still well
    formed), so positive creates are 201 and not 409; malformed ones are left as generated."""
    body = case.body
    if isinstance(body, dict):
        wid = body.get("withdrawal_id")
        if isinstance(wid, str) and IDENTIFIER.fullmatch(wid):
            body["withdrawal_id"] = _unique(wid, 64)
    key = case.headers.get("Idempotency-Key")
    if isinstance(key, str) and IDEMPOTENCY_KEY.fullmatch(key):
        case.headers["Idempotency-Key"] = _unique(key, 255)


def use_sandbox_provider(case: OpenApiCase, provider: str) -> None:
    body = case.body
    if isinstance(body, dict):
        cascade = body.get("cascade")
        if isinstance(cascade, list) and cascade and isinstance(cascade[0], dict):
            cascade[0]["provider_id"] = provider


# --- what the README says about every response -----------------------------------------------


def wire_problems(
    response: Response, sent_rid: str | None, *, may_replay: bool = False
) -> list[str]:
    """Every way ``response`` breaks the README's transport rules and error envelope.

    ``may_replay``: the request was a create, whose 200 (and only that) carries
    ``Idempotent-Replayed: true``.
    """
    problems: list[str] = []
    replayed = response.headers.get("idempotent-replayed")
    if may_replay and response.status_code == 200:
        if replayed != ["true"]:
            problems.append(f"a create's 200 must carry Idempotent-Replayed: true, got {replayed}")
    elif replayed is not None:
        problems.append(f"Idempotent-Replayed must be absent on this response, got {replayed}")
    content_types = response.headers.get("content-type", [])
    if content_types != ["application/json"]:
        problems.append(f"Content-Type is {content_types}, must be exactly ['application/json']")
    rids = response.headers.get("x-request-id", [])
    if len(rids) != 1:
        problems.append(f"X-Request-Id must be present once, got {rids}")
        rid = None
    else:
        rid = rids[0]
        if sent_rid is not None and REQUEST_ID.fullmatch(sent_rid):
            if rid != sent_rid:
                problems.append(f"X-Request-Id {rid!r} must echo the request's {sent_rid!r}")
        elif not HEX32.fullmatch(rid):
            problems.append(f"X-Request-Id {rid!r} must be a fresh 32-hex id (sent {sent_rid!r})")
    raw = response.content
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        return [*problems, f"body is not UTF-8 JSON ({exc}): {raw[:200]!r}"]
    if raw != contract_bytes(body):
        problems.append(
            f"body bytes are not compact/minimally escaped JSON: {raw[:300]!r}"
            f" (expected {contract_bytes(body)[:300]!r})"
        )
    status = response.status_code
    if status >= 400:
        problems += _envelope_problems(status, body, rid)
    elif isinstance(body, dict) and "withdrawal_id" in body and tuple(body) != WITHDRAWAL_KEYS:
        problems.append(f"Withdrawal keys {list(body)} must be {list(WITHDRAWAL_KEYS)}")
    return problems


def _envelope_problems(status: int, body: Any, rid: str | None) -> list[str]:
    if not isinstance(body, dict) or list(body) != ["error"] or not isinstance(body["error"], dict):
        return [f"error body must be {{'error': {{...}}}}, got {body!r}"]
    error = body["error"]
    problems = []
    keys = ["code", "message", "fields", "request_id"] if status == 422 else None
    keys = keys or ["code", "message", "request_id"]
    if list(error) != keys:
        problems.append(f"error keys {list(error)} must be {keys}")
    pair = (error.get("code"), error.get("message"))
    if pair not in ERRORS.get(status, set()):
        problems.append(f"{status} must not carry code/message {pair}")
    if rid is not None and error.get("request_id") != rid:
        problems.append(f"request_id {error.get('request_id')!r} != X-Request-Id {rid!r}")
    if status == 422:
        fields = error.get("fields")
        if not isinstance(fields, list) or not fields:
            problems.append(f"422 fields must be a non-empty list, got {fields!r}")
        else:
            for item in fields:
                if not isinstance(item, dict) or list(item) != ["field", "reason"]:
                    problems.append(f"field error {item!r} must be {{field, reason}} in order")
    return problems


def created_problems(sent: Any, body: Any) -> list[str]:
    """A 201/200 answer to a create echoes what was sent, as the README's table says."""
    if not isinstance(sent, dict) or not isinstance(body, dict):
        return []
    problems = []
    for key in ("withdrawal_id", "merchant_id", "currency"):
        if body.get(key) != sent.get(key):
            problems.append(f"{key} {body.get(key)!r} must be as sent: {sent.get(key)!r}")
    amount = sent.get("amount")
    if isinstance(amount, str) and body.get("amount") != f"{Decimal(amount):.2f}":
        problems.append(f"amount {body.get('amount')!r} must normalise {amount!r}")
    metadata = sent.get("metadata") or {}
    if list((body.get("metadata") or {}).items()) != list(metadata.items()):
        problems.append(f"metadata {body.get('metadata')!r} must echo {metadata!r} in order")
    cascade = sent.get("cascade")
    if isinstance(cascade, list):
        providers = [e.get("provider_id") for e in cascade if isinstance(e, dict)]
        if body.get("provider_id") not in providers:
            problems.append(f"provider_id {body.get('provider_id')!r} is not in the cascade")
    return problems
