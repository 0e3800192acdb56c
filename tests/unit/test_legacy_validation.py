"""Request parsing and validation of the legacy v1 API, against the contract's table."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.legacy import (
    FIELD_ERROR_REASONS,
    CancelRequest,
    CascadeEntry,
    CreateWithdrawal,
    Destination,
    FieldError,
    MalformedJson,
    check_idempotency_key,
    check_request_id,
    parse_cancel,
    parse_create_withdrawal,
)

EXCHANGES = Path(__file__).resolve().parents[2] / "docs" / "legacy-api" / "exchanges"

_ABSENT = object()


def valid_body() -> dict[str, Any]:
    return {
        "withdrawal_id": "wd_1",
        "merchant_id": "m_1001",
        "amount": "250.00",
        "currency": "EUR",
        "destination": {"type": "iban", "account": "DE89370400440532013000", "holder": "Jane"},
        "cascade": [
            {"provider_id": "sbx_ok", "fee": "0.50"},
            {"provider_id": "sbx_decline", "fee": "1.50"},
        ],
    }


def encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode()


def with_value(path: str, value: Any) -> dict[str, Any]:
    """A valid body with the dotted ``path`` set to ``value`` (or removed for ``_ABSENT``)."""
    body = valid_body()
    *parents, last = path.split(".")
    target: Any = body
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if value is _ABSENT:
        target.pop(last, None)
    else:
        target[last] = value
    return body


def errors(document: Any) -> list[tuple[str, str]]:
    result = parse_create_withdrawal(encode(document))
    assert isinstance(result, list), f"expected field errors, got {result!r}"
    return [(error.field, error.reason) for error in result]


def accepted(document: Any) -> CreateWithdrawal:
    result = parse_create_withdrawal(encode(document))
    assert isinstance(result, CreateWithdrawal), f"expected a request, got {result!r}"
    return result


# --- the recorded exchanges -------------------------------------------------------------


# Answered before the body is parsed (authentication, size, media type come first).
_BEFORE_PARSING = {401, 413, 415}


def _steps(method: str, path_pattern: str) -> list[Any]:
    """Steps whose body the parser sees: a body is sent and no earlier check answered."""
    steps = []
    for file in sorted(EXCHANGES.glob("*.json")):
        exchange = json.loads(file.read_text(encoding="utf-8"))
        for number, step in enumerate(exchange["steps"]):
            request = step["request"]
            if (
                request["method"] == method
                and re.fullmatch(path_pattern, request["path"])
                and request["body"] is not None
                and step["response"]["status"] not in _BEFORE_PARSING
            ):
                steps.append(pytest.param(step, id=f"{exchange['name']}-{number}"))
    return steps


CREATE_STEPS = _steps("POST", "/v1/withdrawals")
CANCEL_STEPS = _steps("POST", "/v1/withdrawals/[^/]+/cancel")


def _expected_fields(step: Any) -> list[dict[str, str]]:
    body = json.loads(step["response"]["body"].replace("{{rid}}", "rid"))
    fields: list[dict[str, str]] = body["error"]["fields"]
    return fields


def test_the_exchanges_are_there() -> None:
    assert len(CREATE_STEPS) >= 15
    assert any(step.values[0]["response"]["status"] == 422 for step in CREATE_STEPS)
    assert any(step.values[0]["response"]["status"] == 422 for step in CANCEL_STEPS)


@pytest.mark.parametrize("step", CREATE_STEPS)
def test_create_exchange(step: Any) -> None:
    status = step["response"]["status"]
    body = step["request"]["body"]
    if status == 400:
        with pytest.raises(MalformedJson):
            parse_create_withdrawal(body.encode())
        return
    result = parse_create_withdrawal(body.encode())
    if status == 422:
        assert isinstance(result, list)
        assert [{"field": e.field, "reason": e.reason} for e in result] == _expected_fields(step)
    else:
        # 200, 201 and 409 all come after validation passed.
        assert status in {200, 201, 409}
        assert isinstance(result, CreateWithdrawal)


@pytest.mark.parametrize("step", CANCEL_STEPS)
def test_cancel_exchange(step: Any) -> None:
    result = parse_cancel(step["request"]["body"].encode())
    if step["response"]["status"] == 422:
        assert isinstance(result, list)
        assert [{"field": e.field, "reason": e.reason} for e in result] == _expected_fields(step)
    else:
        assert isinstance(result, CancelRequest)


# --- a valid request --------------------------------------------------------------------


def test_valid_request_is_typed() -> None:
    body = valid_body()
    body["metadata"] = {"note": "José — 山田", "ref": 'a"b\\c\nline'}
    assert accepted(body) == CreateWithdrawal(
        withdrawal_id="wd_1",
        merchant_id="m_1001",
        amount=Decimal("250.00"),
        currency="EUR",
        destination=Destination(type="iban", account="DE89370400440532013000", holder="Jane"),
        cascade=(
            CascadeEntry(provider_id="sbx_ok", fee=Decimal("0.50")),
            CascadeEntry(provider_id="sbx_decline", fee=Decimal("1.50")),
        ),
        metadata=(("note", "José — 山田"), ("ref", 'a"b\\c\nline')),
    )


@pytest.mark.parametrize(
    ("sent", "parsed"),
    [("250", "250.00"), ("250.5", "250.50"), ("0.01", "0.01"), ("999999999999.99", None)],
)
def test_amount_is_exact_with_two_places(sent: str, parsed: str | None) -> None:
    amount = accepted(with_value("amount", sent)).amount
    assert amount == Decimal(sent)
    assert amount.as_tuple().exponent == -2
    if parsed is not None:
        assert str(amount) == parsed


def test_fee_may_be_zero() -> None:
    for fee in ("0", "0.0", "0.00"):
        assert accepted(with_value("cascade.0.fee", fee)).cascade[0].fee == 0


def test_whitespace_around_the_document_is_json() -> None:
    assert isinstance(
        parse_create_withdrawal(b" \n\t" + encode(valid_body()) + b"\r\n "), CreateWithdrawal
    )


def test_unknown_fields_are_ignored() -> None:
    body = valid_body()
    body["extra"] = {"anything": [1, 2]}
    body["destination"]["bank"] = "x"
    body["cascade"][0]["weight"] = 3
    assert accepted(body) == accepted(valid_body())


def test_metadata_keeps_request_order() -> None:
    keys = ["zeta", "alpha", "Mid", "é", "0"]
    body = with_value("metadata", {key: f"v-{key}" for key in keys})
    assert accepted(body).metadata == tuple((key, f"v-{key}") for key in keys)


@pytest.mark.parametrize("absent", [_ABSENT, None, {}])
def test_metadata_absent_null_or_empty_is_empty(absent: Any) -> None:
    assert accepted(with_value("metadata", absent)).metadata == ()


@pytest.mark.parametrize("absent", [_ABSENT, None])
def test_holder_absent_or_null_is_none(absent: Any) -> None:
    assert accepted(with_value("destination.holder", absent)).destination.holder is None


def test_repeated_json_key_last_value_wins_at_first_position() -> None:
    body = encode(valid_body())[:-1] + b',"metadata":{"a":"1","b":"2","a":"3"}}'
    result = parse_create_withdrawal(body)
    assert isinstance(result, CreateWithdrawal)
    assert result.metadata == (("a", "3"), ("b", "2"))


def test_lengths_count_code_points_not_bytes() -> None:
    smiley = "\U0001f600"
    body = with_value("destination.account", smiley * 64)
    body["destination"]["holder"] = smiley * 128
    body["metadata"] = {smiley * 40: smiley * 500}
    parsed = accepted(body)
    assert parsed.destination.account == smiley * 64
    assert parsed.metadata == ((smiley * 40, smiley * 500),)


# --- not JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"   ", id="only-whitespace"),
        pytest.param(b'{"withdrawal_id":', id="truncated"),
        pytest.param(b"{} x", id="trailing-garbage"),
        pytest.param(b"{}{}", id="two-documents"),
        pytest.param(b'{"a":"\xff"}', id="invalid-utf8-in-string"),
        pytest.param(b'{"a":"\xc0\xaf"}', id="overlong-utf8"),
        pytest.param(b"\xff{}", id="invalid-utf8-outside-string"),
        pytest.param(b"\xef\xbb\xbf{}", id="byte-order-mark"),
        pytest.param(b'{"a":"\\ud800"}', id="lone-surrogate-escape"),
        pytest.param(b'{"a":"x\ny"}', id="raw-control-in-string"),
        pytest.param(b"NaN", id="nan"),
        pytest.param(b'{"a":Infinity}', id="infinity"),
        pytest.param(b"{'a':1}", id="single-quotes"),
        pytest.param(b'{"a":1,}', id="trailing-comma"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="absurdly-deep"),
    ],
)
def test_malformed_json(body: bytes) -> None:
    with pytest.raises(MalformedJson):
        parse_create_withdrawal(body)
    with pytest.raises(MalformedJson):
        parse_cancel(body)


def test_malformed_json_is_a_value_error_with_its_cause() -> None:
    with pytest.raises(ValueError, match="not valid JSON") as caught:
        parse_create_withdrawal(b"{")
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("document", [[], [valid_body()], "x", 1, 1.5, True, None])
def test_top_level_not_an_object(document: Any) -> None:
    assert errors(document) == [("$", "invalid_type")]


# --- one rule at a time -----------------------------------------------------------------

ID_FIELDS = ["withdrawal_id", "merchant_id", "cascade.0.provider_id"]


def field_path(path: str) -> str:
    """``cascade.0.provider_id`` → ``cascade[0].provider_id``."""
    return re.sub(r"\.(\d+)", r"[\1]", path)


@pytest.mark.parametrize("path", [*ID_FIELDS, "amount", "currency", "cascade.0.fee"])
@pytest.mark.parametrize("missing", [_ABSENT, None], ids=["absent", "null"])
def test_required_string(path: str, missing: Any) -> None:
    assert errors(with_value(path, missing)) == [(field_path(path), "required")]


@pytest.mark.parametrize(
    "path", [*ID_FIELDS, "amount", "currency", "cascade.0.fee", "destination.type"]
)
@pytest.mark.parametrize("value", [7, 250.0, -0.0, True, False, [], {}, ["wd_1"]], ids=repr)
def test_string_of_wrong_type(path: str, value: Any) -> None:
    assert errors(with_value(path, value)) == [(field_path(path), "invalid_type")]


def test_huge_json_number_is_invalid_type_not_malformed() -> None:
    body = encode(with_value("amount", "X")).replace(b'"X"', b"1e400")
    result = parse_create_withdrawal(body)
    assert result == [FieldError(field="amount", reason="invalid_type")]


@pytest.mark.parametrize("path", ID_FIELDS)
@pytest.mark.parametrize("value", ["a", "A-z_0-9", "x" * 64, "-", "_"])
def test_identifier_accepted(path: str, value: str) -> None:
    accepted(with_value(path, value))


@pytest.mark.parametrize("path", ID_FIELDS)
@pytest.mark.parametrize(
    "value", ["", "wd bad!", "wd.1", "wd/1", "é", "wd_1\n", "\nwd_1", "\uff57\uff44", "wd_1\x00"]
)
def test_identifier_invalid_format(path: str, value: str) -> None:
    assert errors(with_value(path, value)) == [(field_path(path), "invalid_format")]


@pytest.mark.parametrize("path", ID_FIELDS)
@pytest.mark.parametrize("value", ["x" * 65, "x" * 1000, "!" * 65, "é" * 65])
def test_identifier_too_long_wins_over_bad_characters(path: str, value: str) -> None:
    assert errors(with_value(path, value)) == [(field_path(path), "too_long")]


@pytest.mark.parametrize(
    "value",
    [
        "12.345",
        "01",
        "00",
        "1.",
        ".5",
        "+1",
        "-1",
        "1e3",
        " 1",
        "1 ",
        "1,00",
        "1000000000000",
        "250\n",
        "٣",
        "",
        "NaN",
    ],
)
@pytest.mark.parametrize("path", ["amount", "cascade.0.fee"])
def test_money_invalid_format(path: str, value: str) -> None:
    assert errors(with_value(path, value)) == [(field_path(path), "invalid_format")]


@pytest.mark.parametrize("value", ["0", "0.0", "0.00"])
def test_amount_zero_out_of_range(value: str) -> None:
    assert errors(with_value("amount", value)) == [("amount", "out_of_range")]


@pytest.mark.parametrize("value", ["eur", "EU", "EURO", "", "E1R", "ÉUR", "EUR\n"])
def test_currency_invalid_format(value: str) -> None:
    assert errors(with_value("currency", value)) == [("currency", "invalid_format")]


@pytest.mark.parametrize("missing", [_ABSENT, None], ids=["absent", "null"])
def test_destination_required(missing: Any) -> None:
    assert errors(with_value("destination", missing)) == [("destination", "required")]


@pytest.mark.parametrize("value", ["DE89", 1, True, [], [{"type": "iban"}]], ids=repr)
def test_destination_invalid_type_hides_children(value: Any) -> None:
    assert errors(with_value("destination", value)) == [("destination", "invalid_type")]


@pytest.mark.parametrize("missing", [_ABSENT, None], ids=["absent", "null"])
@pytest.mark.parametrize("path", ["destination.type", "destination.account"])
def test_destination_children_required(path: str, missing: Any) -> None:
    assert errors(with_value(path, missing)) == [(path, "required")]


@pytest.mark.parametrize("value", ["iban", "card", "wallet"])
def test_destination_type_accepted(value: str) -> None:
    assert accepted(with_value("destination.type", value)).destination.type == value


@pytest.mark.parametrize("value", ["bank", "IBAN", "", "iban "])
def test_destination_type_invalid_value(value: str) -> None:
    assert errors(with_value("destination.type", value)) == [("destination.type", "invalid_value")]


def test_destination_account_empty_is_invalid_format() -> None:
    assert errors(with_value("destination.account", "")) == [
        ("destination.account", "invalid_format")
    ]


def test_destination_account_length() -> None:
    accepted(with_value("destination.account", "x" * 64))
    accepted(with_value("destination.account", " \n\x00/"))
    assert errors(with_value("destination.account", "x" * 65)) == [
        ("destination.account", "too_long")
    ]


def test_destination_holder_length() -> None:
    accepted(with_value("destination.holder", ""))
    accepted(with_value("destination.holder", "x" * 128))
    assert errors(with_value("destination.holder", "x" * 129)) == [
        ("destination.holder", "too_long")
    ]


@pytest.mark.parametrize("path", ["destination.account", "destination.holder"])
def test_destination_strings_invalid_type(path: str) -> None:
    assert errors(with_value(path, 5)) == [(path, "invalid_type")]


@pytest.mark.parametrize("missing", [_ABSENT, None], ids=["absent", "null"])
def test_cascade_required(missing: Any) -> None:
    assert errors(with_value("cascade", missing)) == [("cascade", "required")]


@pytest.mark.parametrize("value", [{"provider_id": "x"}, "sbx_ok", 1, True], ids=repr)
def test_cascade_invalid_type_hides_children(value: Any) -> None:
    assert errors(with_value("cascade", value)) == [("cascade", "invalid_type")]


def test_cascade_empty_is_out_of_range() -> None:
    assert errors(with_value("cascade", [])) == [("cascade", "out_of_range")]


def _providers(count: int) -> list[dict[str, str]]:
    return [{"provider_id": f"p{index}", "fee": "0.10"} for index in range(count)]


def test_cascade_length() -> None:
    assert len(accepted(with_value("cascade", _providers(32))).cascade) == 32
    assert errors(with_value("cascade", _providers(33))) == [("cascade", "too_many")]


def test_too_many_entries_are_still_checked_one_by_one() -> None:
    entries = _providers(33)
    entries[32]["fee"] = "x"
    assert errors(with_value("cascade", entries)) == [
        ("cascade", "too_many"),
        ("cascade[32].fee", "invalid_format"),
    ]


@pytest.mark.parametrize("entry", ["sbx_ok", None, 1, [], True], ids=repr)
def test_cascade_entry_invalid_type(entry: Any) -> None:
    body = with_value("cascade", [{"provider_id": "a", "fee": "1"}, entry])
    assert errors(body) == [("cascade[1]", "invalid_type")]


def test_duplicate_provider_on_every_later_entry() -> None:
    body = with_value(
        "cascade",
        [
            {"provider_id": "a", "fee": "1"},
            {"provider_id": "b", "fee": "1"},
            {"provider_id": "a", "fee": "2"},
            {"provider_id": "A", "fee": "1"},
            {"provider_id": "a", "fee": "3"},
        ],
    )
    assert errors(body) == [
        ("cascade[2].provider_id", "duplicate"),
        ("cascade[4].provider_id", "duplicate"),
    ]


def test_duplicate_only_among_well_formed_ids() -> None:
    body = with_value(
        "cascade", [{"provider_id": "a b", "fee": "1"}, {"provider_id": "a b", "fee": "1"}]
    )
    assert errors(body) == [
        ("cascade[0].provider_id", "invalid_format"),
        ("cascade[1].provider_id", "invalid_format"),
    ]


def test_duplicate_counts_an_entry_whose_fee_is_bad() -> None:
    body = with_value(
        "cascade", [{"provider_id": "a", "fee": "bad"}, {"provider_id": "a", "fee": "1"}]
    )
    assert errors(body) == [
        ("cascade[0].fee", "invalid_format"),
        ("cascade[1].provider_id", "duplicate"),
    ]


@pytest.mark.parametrize("value", [[], "x", 1, True, [["a", "b"]]], ids=repr)
def test_metadata_invalid_type(value: Any) -> None:
    assert errors(with_value("metadata", value)) == [("metadata", "invalid_type")]


def test_metadata_key_count() -> None:
    twenty = {f"k{index}": "v" for index in range(20)}
    assert len(accepted(with_value("metadata", twenty)).metadata) == 20
    assert errors(with_value("metadata", {**twenty, "k20": "v"})) == [("metadata", "too_many")]


@pytest.mark.parametrize("key", ["", "k" * 41, "é" * 41])
def test_metadata_key_invalid_format(key: str) -> None:
    assert errors(with_value("metadata", {"ok": "v", key: "v"})) == [("metadata", "invalid_format")]


def test_metadata_key_limits_accept() -> None:
    accepted(with_value("metadata", {"k" * 40: "v", "k": "", " ": "v", "a.b[0]": "v"}))


def test_metadata_bad_keys_reported_once_and_their_values_skipped() -> None:
    body = with_value("metadata", {"": 5, "k" * 41: None, "ok": "v"})
    assert errors(body) == [("metadata", "invalid_format")]


@pytest.mark.parametrize("value", [5, 1.5, True, None, [], {}, ["v"]], ids=repr)
def test_metadata_value_invalid_type(value: Any) -> None:
    assert errors(with_value("metadata", {"ok": "v", "n": value})) == [
        ("metadata.n", "invalid_type")
    ]


def test_metadata_value_length() -> None:
    accepted(with_value("metadata", {"note": "v" * 500}))
    assert errors(with_value("metadata", {"note": "v" * 501})) == [("metadata.note", "too_long")]


def test_metadata_errors_in_table_then_request_order() -> None:
    metadata: dict[str, Any] = {f"k{index}": "v" for index in range(19)}
    metadata.update({"z": 1, "": "v", "a": "v" * 501, "m": None})
    assert errors(with_value("metadata", metadata)) == [
        ("metadata", "too_many"),
        ("metadata", "invalid_format"),
        ("metadata.z", "invalid_type"),
        ("metadata.a", "too_long"),
        ("metadata.m", "invalid_type"),
    ]


def test_every_violation_in_table_order() -> None:
    body = {
        "cascade": [
            {"fee": "1", "provider_id": "p 1"},
            7,
            {"provider_id": "p" * 65},
            {"provider_id": "ok", "fee": "1.001"},
        ],
        "metadata": {"x": 1},
        "destination": {"holder": "h" * 129, "account": "a" * 65, "type": 3},
        "currency": None,
        "amount": "0",
        "merchant_id": "m" * 65,
        "withdrawal_id": True,
    }
    assert errors(body) == [
        ("withdrawal_id", "invalid_type"),
        ("merchant_id", "too_long"),
        ("amount", "out_of_range"),
        ("currency", "required"),
        ("destination.type", "invalid_type"),
        ("destination.account", "too_long"),
        ("destination.holder", "too_long"),
        ("cascade[0].provider_id", "invalid_format"),
        ("cascade[1]", "invalid_type"),
        ("cascade[2].provider_id", "too_long"),
        ("cascade[2].fee", "required"),
        ("cascade[3].fee", "invalid_format"),
        ("metadata.x", "invalid_type"),
    ]


def test_empty_object_lists_every_required_field() -> None:
    assert errors({}) == [
        ("withdrawal_id", "required"),
        ("merchant_id", "required"),
        ("amount", "required"),
        ("currency", "required"),
        ("destination", "required"),
        ("cascade", "required"),
    ]


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.sampled_from(["", "0", "1.5", "EUR", "iban", "x" * 65, "wd_1", "sbx_ok"]),
)
_json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
_field_values = st.one_of(
    _json_values,
    st.lists(
        st.fixed_dictionaries({}, optional={"provider_id": _scalars, "fee": _scalars}), max_size=4
    ),
    st.fixed_dictionaries({}, optional={"type": _scalars, "account": _scalars, "holder": _scalars}),
)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "withdrawal_id",
                "merchant_id",
                "amount",
                "currency",
                "destination",
                "cascade",
                "metadata",
                "other",
            ]
        ),
        _field_values,
    )
)
def test_any_json_object_gets_a_request_or_reasons(document: dict[str, Any]) -> None:
    result = parse_create_withdrawal(encode(document))
    if isinstance(result, list):
        assert result, "a rejection always says why"
        assert all(error.reason in FIELD_ERROR_REASONS for error in result)
        assert len(set(result)) == len(result), "no error is listed twice"
    else:
        assert isinstance(result, CreateWithdrawal)


# --- cancel -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{}", None),
        (b'{"reason":null}', None),
        (b'{"reason":""}', ""),
        (b'{"reason":"changed my mind","other":1}', "changed my mind"),
        (encode({"reason": "r" * 200}), "r" * 200),
        (encode({"reason": "\U0001f600" * 200}), "\U0001f600" * 200),
    ],
)
def test_cancel_accepted(body: bytes, reason: str | None) -> None:
    assert parse_cancel(body) == CancelRequest(reason=reason)


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"1", b"null", b"true"])
def test_cancel_top_level_not_an_object(body: bytes) -> None:
    assert parse_cancel(body) == [FieldError(field="$", reason="invalid_type")]


@pytest.mark.parametrize("reason", [5, 1.5, True, [], {}], ids=repr)
def test_cancel_reason_invalid_type(reason: Any) -> None:
    assert parse_cancel(encode({"reason": reason})) == [
        FieldError(field="reason", reason="invalid_type")
    ]


def test_cancel_reason_too_long() -> None:
    assert parse_cancel(encode({"reason": "r" * 201})) == [
        FieldError(field="reason", reason="too_long")
    ]


# --- headers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", [None, "k", " ", "k-basic-1", "~" * 255, "".join(map(chr, range(0x20, 0x7F)))]
)
def test_idempotency_key_accepted(key: str | None) -> None:
    assert check_idempotency_key(key) is None


@pytest.mark.parametrize("key", ["", "k" * 256, "k\x7f", "é", "k\t", "k\n", "\x00", "k\u2028"])
def test_idempotency_key_invalid_format(key: str) -> None:
    assert check_idempotency_key(key) == FieldError(
        field="Idempotency-Key", reason="invalid_format"
    )


@pytest.mark.parametrize("value", ["abc-123.XYZ_9", "a", "x" * 128, "..", "-_."])
def test_request_id_echoed(value: str) -> None:
    assert check_request_id(value) == value


@pytest.mark.parametrize("value", [None, "", "bad id!", "x" * 129, "abc\n", "é", "a/b"])
def test_request_id_replaced_by_fresh_hex(value: str | None) -> None:
    fresh = check_request_id(value)
    assert re.fullmatch(r"[0-9a-f]{32}", fresh)
    assert fresh != check_request_id(value)
