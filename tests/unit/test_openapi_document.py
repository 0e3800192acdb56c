"""contracts/openapi.json is hand-written; these tests hold it to contracts.legacy and back."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from contracts.legacy import (
    FAILURE_CODES,
    FIELD_ERROR_REASONS,
    STATUSES,
    WITHDRAWAL_KEYS,
    ApiError,
    CreateWithdrawal,
    FieldError,
    WithdrawalView,
    check_idempotency_key,
    encode_api_error,
    encode_validation_error,
    encode_withdrawal,
    parse_create_withdrawal,
)

DOCUMENT_PATH = Path(__file__).resolve().parents[2] / "contracts" / "openapi.json"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))
    return loaded


def resolve(document: dict[str, Any], node: Any) -> Any:
    """Follow local ``$ref``s until a node that is not one."""
    while isinstance(node, dict) and "$ref" in node:
        reference = node["$ref"]
        assert reference.startswith("#/"), reference
        node = document
        for part in reference[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def error_variants(document: dict[str, Any], response: dict[str, Any]) -> list[tuple[str, str]]:
    """The (code, message) pairs an error response's schema pins down with ``const``."""
    schema = resolve(document, response["content"]["application/json"]["schema"])
    variants = [resolve(document, s) for s in schema.get("oneOf", [schema])]
    return [
        (
            variant["properties"]["error"]["properties"]["code"]["const"],
            variant["properties"]["error"]["properties"]["message"]["const"],
        )
        for variant in variants
    ]


def documented_errors(document: dict[str, Any]) -> set[tuple[int, str, str]]:
    responses = [
        (status, response)
        for operation in operations(document).values()
        for status, response in operation["responses"].items()
    ]
    responses += list(document["x-unrouted-responses"].items())
    return {
        (int(status), code, message)
        for status, response in responses
        if int(status) >= 400
        for code, message in error_variants(document, resolve(document, response))
    }


def test_is_openapi_3_1(document: dict[str, Any]) -> None:
    assert re.fullmatch(r"3\.1\.\d+", document["openapi"])
    assert document["info"]["title"]
    assert document["info"]["version"]


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    references: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                references.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert references
    for reference in references:
        assert resolve(document, {"$ref": reference}) is not None


def test_the_four_operations_and_their_statuses(document: dict[str, Any]) -> None:
    statuses = {key: set(op["responses"]) for key, op in operations(document).items()}
    assert statuses == {
        ("POST", "/v1/withdrawals"): {
            "200", "201", "400", "401", "409", "413", "415", "422", "500", "503"
        },
        ("GET", "/v1/withdrawals/{withdrawal_id}"): {"200", "401", "404", "500", "503"},
        ("POST", "/v1/withdrawals/{withdrawal_id}/cancel"): {
            "200", "400", "401", "404", "409", "413", "415", "422", "500", "503"
        },
        ("GET", "/healthz"): {"200"},
    }  # fmt: skip


def test_bearer_on_v1_and_none_on_healthz(document: dict[str, Any]) -> None:
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for (_, path), operation in operations(document).items():
        security = operation.get("security", document["security"])
        if path.startswith("/v1/"):
            assert security == [{"bearer": []}], path
        else:
            assert security == [], path


def test_every_response_carries_a_request_id(document: dict[str, Any]) -> None:
    responses = [
        response
        for operation in operations(document).values()
        for response in operation["responses"].values()
    ]
    responses += list(document["x-unrouted-responses"].values())
    for response in responses:
        headers = resolve(document, response)["headers"]
        assert resolve(document, headers["X-Request-Id"])["required"] is True
        assert set(resolve(document, response)["content"]) == {"application/json"}


def test_idempotent_replayed_only_on_the_replay(document: dict[str, Any]) -> None:
    for (method, path), operation in operations(document).items():
        for status, response in operation["responses"].items():
            headers = resolve(document, response)["headers"]
            replay = (method, path, status) == ("POST", "/v1/withdrawals", "200")
            assert ("Idempotent-Replayed" in headers) is replay
            if replay:
                header = resolve(document, headers["Idempotent-Replayed"])
                assert header["schema"]["const"] == "true"


def test_every_api_error_is_documented_with_its_status(document: dict[str, Any]) -> None:
    assert documented_errors(document) == {(e.status, e.code, e.message) for e in ApiError}


def test_error_code_enum_is_every_non_422_code(document: dict[str, Any]) -> None:
    error = document["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error["properties"]["code"]["enum"]) == {
        e.code for e in ApiError if e is not ApiError.VALIDATION_FAILED
    }
    assert list(error["properties"]) == ["code", "message", "request_id"]


def test_error_examples_are_what_the_encoder_writes(document: dict[str, Any]) -> None:
    examples = []
    for response in document["components"]["responses"].values():
        media = response["content"]["application/json"]
        examples += [media["example"]] if "example" in media else []
        examples += [e["value"] for e in media.get("examples", {}).values()]
    error_examples = [example for example in examples if "error" in example]
    assert len(error_examples) == len(ApiError)
    for example in error_examples:
        body = example["error"]
        [error] = [e for e in ApiError if (e.code, e.message) == (body["code"], body["message"])]
        if error is ApiError.VALIDATION_FAILED:
            fields = [FieldError(field=f["field"], reason=f["reason"]) for f in body["fields"]]
            encoded = encode_validation_error(fields, body["request_id"])
        else:
            encoded = encode_api_error(error, body["request_id"])
        # Key order included: the encoder's bytes equal the example written compactly.
        assert encoded == json.dumps(example, separators=(",", ":"), ensure_ascii=False).encode()


def test_validation_error_schema(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    error = schemas["ValidationFailedError"]["properties"]["error"]
    assert list(error["properties"]) == ["code", "message", "fields", "request_id"]
    assert schemas["FieldError"]["properties"]["reason"]["enum"] == list(FIELD_ERROR_REASONS)
    assert list(schemas["FieldError"]["properties"]) == ["field", "reason"]


def _sample_view() -> WithdrawalView:
    moment = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    return WithdrawalView(
        withdrawal_id="wd_1",
        merchant_id="m_1",
        status="failed",
        amount=Decimal("1.5"),
        currency="EUR",
        provider_id="p",
        provider_reference="r",
        failure_code="declined",
        metadata=(("k", "v"),),
        created_at=moment,
        updated_at=moment,
    )


def test_withdrawal_schema_keys_in_encoder_order(document: dict[str, Any]) -> None:
    schema = document["components"]["schemas"]["Withdrawal"]
    encoder_order = list(json.loads(encode_withdrawal(_sample_view())))
    assert list(schema["properties"]) == encoder_order == list(WITHDRAWAL_KEYS)
    assert schema["required"] == encoder_order
    assert schema["additionalProperties"] is False


def test_withdrawal_schema_vocabulary(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    properties = schemas["Withdrawal"]["properties"]
    assert properties["status"]["enum"] == list(STATUSES)
    assert properties["failure_code"]["enum"] == [*FAILURE_CODES, None]
    assert schemas["Amount"]["pattern"] == r"^[0-9]+\.[0-9]{2}$"
    timestamp = re.compile(schemas["Timestamp"]["pattern"])
    assert timestamp.search(json.loads(encode_withdrawal(_sample_view()))["created_at"])


def _python(pattern: str) -> re.Pattern[str]:
    """An ECMA-262 ``^...$`` pattern as Python, where ``$`` would also match before ``\\n``."""
    assert pattern.startswith("^")
    assert pattern.endswith("$")
    return re.compile(pattern[:-1] + r"\Z")


MONEY_SAMPLES = [
    "0", "0.0", "0.00", "0.5", "1", "250", "250.5", "250.50", "999999999999.99",
    "1000000000000", "01", "1.", ".5", "1.234", "-1", "+1", "1e3", " 1", "250\n", "", "٣",
]  # fmt: skip
ID_SAMPLES = ["a", "wd_basic_1", "-", "x" * 64, "x" * 65, "", "wd bad!", "wd.1", "é", "a\n"]


def _create(**changes: str) -> CreateWithdrawal | list[FieldError]:
    body = {
        "withdrawal_id": "wd_1",
        "merchant_id": "m_1",
        "amount": "1",
        "currency": "EUR",
        "destination": {"type": "iban", "account": "x"},
        "cascade": [{"provider_id": "p", "fee": "1"}],
    }
    body.update(changes)
    return parse_create_withdrawal(json.dumps(body).encode())


@pytest.mark.parametrize("sample", MONEY_SAMPLES)
def test_request_amount_patterns_agree_with_the_parser(
    document: dict[str, Any], sample: str
) -> None:
    schemas = document["components"]["schemas"]
    fee_ok = bool(_python(schemas["RequestFee"]["pattern"]).search(sample))
    zero = bool(_python(schemas["RequestAmount"]["not"]["pattern"]).search(sample))
    assert (fee_ok and not zero) == isinstance(_create(amount=sample), CreateWithdrawal)


@pytest.mark.parametrize("sample", ID_SAMPLES)
def test_identifier_schema_agrees_with_the_parser(document: dict[str, Any], sample: str) -> None:
    schema = document["components"]["schemas"]["Identifier"]
    ok = (
        schema["minLength"] <= len(sample) <= schema["maxLength"]
        and _python(schema["pattern"]).search(sample) is not None
    )
    assert ok == isinstance(_create(withdrawal_id=sample), CreateWithdrawal)


@pytest.mark.parametrize("sample", ["EUR", "USD", "eur", "EURO", "EU", "", "EUR\n"])
def test_currency_schema_agrees_with_the_parser(document: dict[str, Any], sample: str) -> None:
    pattern = _python(document["components"]["schemas"]["Currency"]["pattern"])
    ok = pattern.search(sample) is not None
    assert ok == isinstance(_create(currency=sample), CreateWithdrawal)


@pytest.mark.parametrize("sample", ["k", " ", "~" * 255, "", "k" * 256, "k\x7f", "é", "k\n"])
def test_idempotency_key_schema_agrees(document: dict[str, Any], sample: str) -> None:
    schema = document["components"]["parameters"]["IdempotencyKey"]["schema"]
    ok = _python(schema["pattern"]).search(sample) is not None
    assert ok == (check_idempotency_key(sample) is None)


def test_request_limits_match_the_contract(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    request = schemas["CreateWithdrawalRequest"]
    assert list(request["properties"]) == [
        "withdrawal_id", "merchant_id", "amount", "currency", "destination", "cascade", "metadata",
    ]  # fmt: skip
    assert request["required"] == list(request["properties"])[:6]
    cascade = request["properties"]["cascade"]
    assert (cascade["minItems"], cascade["maxItems"]) == (1, 32)
    destination = schemas["Destination"]["properties"]
    assert destination["type"]["enum"] == ["iban", "card", "wallet"]
    assert (destination["account"]["minLength"], destination["account"]["maxLength"]) == (1, 64)
    assert destination["holder"]["maxLength"] == 128
    metadata = schemas["RequestMetadata"]
    assert metadata["maxProperties"] == 20
    assert metadata["propertyNames"] == {"minLength": 1, "maxLength": 40}
    assert metadata["additionalProperties"] == {"type": "string", "maxLength": 500}
    assert schemas["CancelRequest"]["properties"]["reason"]["maxLength"] == 200
