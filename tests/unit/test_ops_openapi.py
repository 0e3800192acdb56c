"""The ops API's OpenAPI document: valid OpenAPI 3.1, and every ``/ops`` route of the app in it.

Its schemas are generated from the Structs the handlers encode; the live check that the
answers match them is ``tests/contract/test_ops_openapi_conformance.py``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import schemathesis
from litestar.routes import HTTPRoute

from gateway.app import create_app
from gateway.ops_openapi import OPENAPI_PATH, document
from gateway.settings import load_settings

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def _app_ops_routes() -> set[tuple[str, str]]:
    app = create_app(load_settings({}))
    routes: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, HTTPRoute) and route.path.startswith("/ops/"):
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
            routes |= {(str(method), path) for method in route.methods if method != "OPTIONS"}
    return routes


def test_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"] == "3.1.0"
    schema: Any = schemathesis.openapi.from_dict(doc)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    assert all(result.ok() for result in schema.get_all_operations())


def test_an_invalid_document_is_caught() -> None:
    """The validation above is not vacuous."""
    broken = document() | {"paths": {"/ops/x": {"get": {"responses": {"200": {}}}}}}
    with pytest.raises(Exception, match="description"):
        schemathesis.openapi.from_dict(broken).validate()


def test_every_ops_route_of_the_app_is_documented_and_nothing_else() -> None:
    documented = set(_operations(document()))
    assert documented == _app_ops_routes()
    assert all(path.startswith("/ops/") for _, path in documented)


def test_every_operation_needs_the_ops_token_and_documents_its_refusal() -> None:
    doc = document()
    assert doc["components"]["securitySchemes"]["opsToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the gateway's OPS_API_TOKENS.",
    }
    for key, operation in _operations(doc).items():
        assert operation["security"] == [{"opsToken": []}], key
        assert "401" in operation["responses"], key
        for status, response in operation["responses"].items():
            schema = response["content"]["application/json"]["schema"]
            if int(status) >= 400:
                assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}, (key, status)


def test_resolve_documents_the_operator_header_and_the_refusals() -> None:
    doc = document()
    resolve = doc["paths"]["/ops/tasks/{task_id}/resolve"]["post"]
    [operator] = [p for p in resolve["parameters"] if p["in"] == "header"]
    assert (operator["name"], operator["required"]) == ("X-Operator", True)
    assert set(resolve["responses"]) == {"200", "400", "401", "404", "409", "413", "422", "503"}
    for code in ("provider_paid", "provider_pending", "provider_unreachable"):
        assert code in resolve["responses"]["409"]["description"]
    body = doc["components"]["schemas"]["ResolveBody"]
    assert set(body["required"]) == {"decision", "reason"}
    assert set(body["properties"]["decision"]["enum"]) == {"positive", "negative"}
    assert body["properties"]["unverified"]["default"] is False
    evidence = doc["components"]["schemas"]["Error"]["properties"]["evidence"]
    assert "provider_status" in str(evidence)


def test_the_manual_check_schema_has_what_support_checks() -> None:
    item = document()["components"]["schemas"]["ManualCheckItem"]
    for field in (
        "withdrawal_id",
        "merchant_id",
        "amount",
        "currency",
        "destination",
        "provider_id",
        "provider_order_id",
        "provider_reference",
        "waiting_since",
        "waited_seconds",
        "provider_answers",
    ):
        assert field in item["required"], field


def test_served_path() -> None:
    assert OPENAPI_PATH == "/docs/ops-openapi.json"
