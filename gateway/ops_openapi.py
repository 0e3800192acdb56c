"""The ops API's OpenAPI 3.1 document, served at ``/docs/ops-openapi.json``.

Schemas come from the Structs the handlers encode (:mod:`gateway.ops_wire`), through msgspec's
JSON Schema generator; the paths, parameters and statuses are written here, one entry per
route, and a test checks them against the app's ``/ops`` routes and the live API. The
legacy v1 API's document (``contracts/openapi.json``, ``/docs/openapi.json``) is a frozen
contract of its own and says nothing about ``/ops``.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from gateway import ops_providers, ops_recon
from gateway import ops_wire as wire

OPENAPI_PATH = "/docs/ops-openapi.json"
_REF = "#/components/schemas/{name}"


def _schema(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_schema("ErrorEnvelope"), description)


UNAUTHORIZED = _error("Missing or invalid ops bearer token (`unauthorized`).")
UNAVAILABLE = _error(
    "The database did not answer (`unavailable`); nothing was recorded: send the request again."
)

# A cohort of the report: the fields DESIGN fixes; the report adds more (see the README).
_COHORT = {
    "type": "object",
    "required": ["created", "succeeded", "failed", "cancelled", "processing", "success_rate"],
    "properties": {
        "created": {"type": "integer"},
        "succeeded": {"type": "integer"},
        "failed": {"type": "integer"},
        "cancelled": {"type": "integer"},
        "processing": {"type": "integer"},
        "success_rate": {"type": ["number", "null"]},
        "returned": {
            "type": "integer",
            "description": "Succeeded withdrawals whose payout the provider returned since"
            " (still counted in `succeeded`: the public status stays succeeded).",
        },
        "net_success_rate": {
            "type": ["number", "null"],
            "description": "(succeeded - returned) / finished.",
        },
    },
}
COHORT_REPORT = {
    "title": "CohortReport",
    "description": "The cohort comparison, as `cascade-gateway report --json` prints it.",
    "type": "object",
    "required": ["generated_at", "filters", "cohorts", "comparison", "merchants"],
    "properties": {
        "generated_at": {"type": "string", "format": "date-time"},
        "filters": {"type": "object"},
        "cohorts": {
            "type": "object",
            "required": ["legacy", "cascade"],
            "properties": {"legacy": _COHORT, "cascade": _COHORT},
        },
        "comparison": {"type": "object"},
        "sample_ratio": {"type": "object"},
        "merchants": {"type": "array", "items": {"type": "object"}},
    },
}

_SINCE_UNTIL = (
    "An ISO 8601 date/time with its zone (`2026-11-01T09:30:00+01:00`), or a date alone, which"
    " means midnight UTC (`2026-11-01`); a time without a zone is refused (400)."
)


def _paths() -> dict[str, Any]:
    bearer: list[dict[str, list[str]]] = [{"opsToken": []}]
    return {
        "/ops/manual-checks": {
            "get": {
                "operationId": "listManualChecks",
                "summary": "Tasks waiting in MANUAL_CHECK, the longest waiting first",
                "description": "Each with what support checks against a provider statement:"
                " the withdrawal, merchant, amount, masked destination, our order id and the"
                " provider's reference, how long it has waited and every answer of the"
                " provider. At most 1,000.",
                "security": bearer,
                "responses": {
                    "200": _json(_schema("ManualChecks"), "The waiting tasks."),
                    "401": UNAUTHORIZED,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/ops/tasks/{task_id}/resolve": {"post": _resolve_operation(bearer)},
        "/ops/withdrawals/{withdrawal_id}": {
            "get": {
                "operationId": "getWithdrawalDetail",
                "summary": "A withdrawal's queue, every attempt and the audit trail",
                "security": bearer,
                "parameters": [
                    {
                        "name": "withdrawal_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json(
                        _schema("WithdrawalDetail"), "The withdrawal, as support sees it."
                    ),
                    "401": UNAUTHORIZED,
                    "404": _error("No such withdrawal (`not_found`)."),
                    "503": UNAVAILABLE,
                },
            }
        },
        **_recon_paths(bearer),
        **_provider_paths(bearer),
        "/ops/cohorts": {
            "get": {
                "operationId": "getCohortReport",
                "summary": "The cohort comparison (legacy against cascade)",
                "security": bearer,
                "parameters": [
                    _query("since", "Inclusive lower bound on created_at. " + _SINCE_UNTIL),
                    _query("until", "Exclusive upper bound on created_at. " + _SINCE_UNTIL),
                    _query("merchant", "Only this merchant's withdrawals."),
                ],
                "responses": {
                    "200": _json(_schema("CohortReport"), "The report."),
                    "400": _error("A parameter cannot be read (`invalid_parameter`)."),
                    "401": UNAUTHORIZED,
                },
            }
        },
    }


def _query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


def _recon_paths(bearer: list[dict[str, list[str]]]) -> dict[str, Any]:
    return {
        "/ops/recon/alerts": {"get": _alerts_operation(bearer)},
        **{
            f"/ops/recon/alerts/{{alert_id}}/{action}": {"post": _alert_action(bearer, action)}
            for action in ("ack", "resolve", "accept")
        },
    }


def _alerts_operation(bearer: list[dict[str, list[str]]]) -> dict[str, Any]:
    return {
        "operationId": "listReconAlerts",
        "summary": "Reconciliation alerts, the newest first",
        "description": "Every finding of the reconciliation job, each with its frozen"
        " evidence (see the README's finance guide to the alerts).",
        "security": bearer,
        "parameters": [
            _query(
                "state",
                "Comma-separated: open, acknowledged, resolved, accepted (all when absent).",
            ),
            _query(
                "rule",
                "One rule: stale_freeze, double_success, success_after_final,"
                " ledger_parity, provider_parity, notification, alert_cap.",
            ),
            _query("limit", "At most this many, 1..1000 (default 200)."),
        ],
        "responses": {
            "200": _json(_schema("Alerts"), "The alerts."),
            "400": _error("A parameter is not one of its values (`invalid_parameter`)."),
            "401": UNAUTHORIZED,
            "503": UNAVAILABLE,
        },
    }


_ACTIONS = {
    "ack": ("ackReconAlert", "Acknowledge an open alert (someone is on it)", "open"),
    "resolve": (
        "resolveReconAlert",
        "Resolve an alert as fixed; `reference` (a ticket, a correction) is required",
        "open or acknowledged",
    ),
    "accept": (
        "acceptReconAlert",
        "Accept an alert as not to be fixed; `note` (why) is required",
        "open or acknowledged",
    ),
}


def _alert_action(bearer: list[dict[str, list[str]]], action: str) -> dict[str, Any]:
    operation_id, summary, allowed = _ACTIONS[action]
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": f"Allowed from {allowed}; the alert's log gets an event naming the"
        " operator. Changes the alert only, never a withdrawal, a task or a balance.",
        "security": bearer,
        "parameters": [
            {
                "name": "alert_id",
                "in": "path",
                "required": True,
                "description": "An alert id from the list; anything else is 404.",
                "schema": {"type": "string"},
            },
            {
                "name": "X-Operator",
                "in": "header",
                "required": True,
                "description": "Who acts (up to 64 characters). Missing or blank: 422.",
                "schema": {"type": "string"},
            },
        ],
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": _schema("AlertActionBody")}},
        },
        "responses": {
            "200": _json(_schema("Alert"), "The alert after the action, with its log."),
            "400": _error("The body is not JSON (`malformed_json`)."),
            "401": UNAUTHORIZED,
            "404": _error("No such alert (`not_found`)."),
            "409": _error("The alert's state does not allow this action (`illegal_transition`)."),
            "413": _error("The body is larger than the limit (`payload_too_large`)."),
            "422": _error(
                "The body does not match AlertActionBody, the reference or note is missing,"
                " or X-Operator is missing or blank (`validation_failed`)."
            ),
            "503": UNAVAILABLE,
        },
    }


_PROVIDER_ID = {
    "name": "provider_id",
    "in": "path",
    "required": True,
    "description": "A provider of the providers file; anything else is 404.",
    "schema": {"type": "string"},
}


def _provider_paths(bearer: list[dict[str, list[str]]]) -> dict[str, Any]:
    health = _json(_schema("ProviderHealthView"), "The provider's health as the workers see it.")
    return {
        "/ops/providers": {
            "get": {
                "operationId": "listProviders",
                "summary": "Every configured provider's breaker, window, work and limits",
                "description": "The fleet-wide breaker (state, the window the workers judge it"
                " by, the last transition, open until, the half-open probe), attempts in"
                " flight, withdrawals waiting to start, limits and breaker policy.",
                "security": bearer,
                "responses": {
                    "200": _json(_schema("Providers"), "The providers, by id."),
                    "401": UNAUTHORIZED,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/ops/providers/{provider_id}": {
            "get": {
                "operationId": "getProvider",
                "summary": "One provider's breaker, window, work and limits",
                "security": bearer,
                "parameters": [_PROVIDER_ID],
                "responses": {
                    "200": health,
                    "401": UNAUTHORIZED,
                    "404": _error("No such provider in the providers file (`not_found`)."),
                    "503": UNAVAILABLE,
                },
            }
        },
        "/ops/providers/{provider_id}/breaker": {"post": _override_operation(bearer, health)},
    }


def _override_operation(bearer: list[dict[str, list[str]]], health: Any) -> dict[str, Any]:
    return {
        "operationId": "overrideProviderBreaker",
        "summary": "Open (drain) or close a provider's breaker by hand",
        "description": "open: no new attempt goes to the provider for `seconds` (they are"
        " passed over, or held), then one half-open probe as after a trip. close: attempts go"
        " again, the window restarting now. Attempts in flight are never touched. Logged with"
        " the operator and the reason; every worker sees it within a second.",
        "security": bearer,
        "parameters": [
            _PROVIDER_ID,
            {
                "name": "X-Operator",
                "in": "header",
                "required": True,
                "description": "Who acts (up to 64 characters), logged as `ops:<name>`."
                " Missing or blank: 422 and nothing changes.",
                "schema": {"type": "string"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _schema("BreakerOverrideBody")}},
        },
        "responses": {
            "200": {**health, "description": "The provider's health after the override."},
            "400": _error("The body is not JSON (`malformed_json`)."),
            "401": UNAUTHORIZED,
            "404": _error("No such provider in the providers file (`not_found`)."),
            "409": _error("The provider has no breaker (`no_breaker`); nothing changed."),
            "413": _error("The body is larger than the limit (`payload_too_large`)."),
            "422": _error(
                "The body does not match BreakerOverrideBody (an open without seconds, or more"
                " than 7 days; a close with seconds; a blank reason), or X-Operator is missing"
                " or blank (`validation_failed`)."
            ),
            "503": UNAVAILABLE,
        },
    }


def _resolve_operation(bearer: list[dict[str, list[str]]]) -> dict[str, Any]:
    return {
        "operationId": "resolveTask",
        "summary": "Apply support's decision to a task in MANUAL_CHECK",
        "description": "positive: the provider paid, the frozen amount is committed. negative:"
        " it did not; the provider is asked first: `failed`, `cancelled` or never accepted"
        " applies it (the amount is rolled back, the cascade moves on); `succeeded` refuses it"
        " (409 `provider_paid`, the attempt is committed instead); `pending` cancels the order"
        " at the provider where it can, else 409 `provider_pending`; no answer is 409"
        " `provider_unreachable` unless sent again with `unverified: true`. Every decision,"
        " applied or refused, has its audit row naming the operator.",
        "security": bearer,
        "parameters": [
            {
                "name": "task_id",
                "in": "path",
                "required": True,
                "description": "A task id (a UUID) from the manual-check list; anything else"
                " is 404.",
                "schema": {"type": "string"},
            },
            {
                "name": "X-Operator",
                "in": "header",
                "required": True,
                "description": "Who decides (up to 64 characters), kept in the audit row as"
                " `ops:<name>`. Missing or blank: 422 and nothing changes.",
                "schema": {"type": "string"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _schema("ResolveBody")}},
        },
        "responses": {
            "200": _json(_schema("Resolved"), "The decision was applied."),
            "400": _error("The body is not JSON (`malformed_json`)."),
            "401": UNAUTHORIZED,
            "404": _error("No such task (`not_found`)."),
            "409": _error(
                "The decision was not applied: `not_in_manual_check` (a colleague's decision"
                " or the provider's answer came first), `provider_paid`, `provider_pending`,"
                " `provider_unreachable` (with the provider's answer in `evidence`), or"
                " `core_refused`."
            ),
            "413": _error("The body is larger than the limit (`payload_too_large`)."),
            "422": _error(
                "The body does not match ResolveBody, the reason is blank, or X-Operator is"
                " missing or blank (`validation_failed`)."
            ),
            "503": _error(
                "The database (`unavailable`) or cascade-core (`core_unavailable`) did not"
                " answer; nothing changed: send it again."
            ),
        },
    }


@functools.cache
def document() -> dict[str, Any]:
    """The whole document (built once)."""
    types = (
        wire.ManualChecks,
        wire.ResolveBody,
        wire.Resolved,
        wire.WithdrawalDetail,
        wire.ErrorEnvelope,
        ops_recon.Alerts,
        ops_recon.Alert,
        ops_recon.AlertActionBody,
        ops_providers.Providers,
        ops_providers.ProviderHealthView,
        ops_providers.BreakerOverrideBody,
    )
    _, schemas = msgspec.json.schema_components(types, ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cascade-gateway ops API",
            "version": "1",
            "description": "For support and operators: manual checks, a withdrawal's record,"
            " the cohort report, reconciliation alerts, provider health. Bearer tokens from"
            " OPS_API_TOKENS (separate from the"
            ' cascade-core tokens of the v1 API). Errors are `{"error": {"code", "message"}}`.'
            " The v1 API is described by /docs/openapi.json.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {
                "opsToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of the gateway's OPS_API_TOKENS.",
                }
            },
            "schemas": {**schemas, "CohortReport": COHORT_REPORT},
        },
        "paths": _paths(),
    }


@functools.cache
def document_bytes() -> bytes:
    return msgspec.json.encode(document())
