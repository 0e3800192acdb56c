"""Response bytes of the legacy v1 API: strings, amounts, timestamps, objects and errors."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from contracts.legacy import (
    ERRORS,
    FAILURE_CODES,
    HEALTHZ_BODY,
    STATUSES,
    WITHDRAWAL_KEYS,
    ApiError,
    CreateWithdrawal,
    FieldError,
    WithdrawalView,
    decode_metadata,
    encode_api_error,
    encode_error,
    encode_json_string,
    encode_metadata,
    encode_validation_error,
    encode_withdrawal,
    format_amount,
    format_timestamp,
    parse_create_withdrawal,
)

EXCHANGES = Path(__file__).resolve().parents[2] / "docs" / "legacy-api" / "exchanges"

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
AMOUNT = re.compile(r"[0-9]+\.[0-9]{2}")
CONTROLS = "".join(map(chr, range(0x20)))
# A JSON string literal, as a regex: anything but quote and backslash, or an escape.
STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')

# Text with everything the escaper must get right, at a higher rate than plain st.text().
any_text = st.text(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from([*CONTROLS, '"', "\\", "/", "\x7f", "\u2028", "\u2029", "\U0001f600"]),
    )
)


# --- JSON strings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "literal"),
    [
        ("", b'""'),
        ("wd_basic_1", b'"wd_basic_1"'),
        ("\n", b'"\\n"'),
        ("\t", b'"\\t"'),
        ('"', b'"\\""'),
        ("\\", b'"\\\\"'),
        ("\r", b'"\\u000d"'),
        ("\b", b'"\\u0008"'),
        ("\f", b'"\\u000c"'),
        ("\x00", b'"\\u0000"'),
        ("\x1f", b'"\\u001f"'),
        ("\x1b", b'"\\u001b"'),
        ("/", b'"/"'),
        ("\x7f", b'"\x7f"'),
        ("\u2028", '"\u2028"'.encode()),
        ("\U0001f600", '"\U0001f600"'.encode()),
        ("José Müller — 山田", '"José Müller — 山田"'.encode()),
        ('a"b\\c\nline', b'"a\\"b\\\\c\\nline"'),
        ("x\ty", b'"x\\ty"'),
    ],
)
def test_json_string_examples(text: str, literal: bytes) -> None:
    assert encode_json_string(text) == literal


def test_msgspec_escapes_differently_so_we_do_not_rely_on_it() -> None:
    # If this ever fails, msgspec changed; our encoder does not depend on its escape style.
    assert msgspec.json.encode("\r\b\f") == b'"\\r\\b\\f"'


@given(any_text)
@example('\x00\x01\x08\x09\x0a\x0c\x0d\x1f"\\/\x7f\u2028\U0001f600')
def test_json_string_round_trips(text: str) -> None:
    assert json.loads(encode_json_string(text)) == text


@given(any_text)
def test_json_string_escapes_only_what_the_contract_says(text: str) -> None:
    literal = encode_json_string(text).decode("utf-8")
    assert literal[0] == literal[-1] == '"'
    tokens = re.findall(r"\\u(....)|\\(.)|([^\\])", literal[1:-1], flags=re.DOTALL)
    for unicode_escape, short_escape, raw in tokens:
        if unicode_escape:
            assert re.fullmatch("00[01][0-9a-f]", unicode_escape), unicode_escape
            assert chr(int(unicode_escape, 16)) not in "\n\t"
        elif short_escape:
            assert short_escape in 'nt"\\'
        else:
            assert raw not in CONTROLS
            assert raw not in '"\\'
    assert len(tokens) == len(text)


@given(any_text)
def test_json_string_without_escapes_is_the_raw_utf8(text: str) -> None:
    literal = encode_json_string(text)
    if not any(char in CONTROLS or char in '"\\' for char in text):
        assert literal == b'"' + text.encode() + b'"'
    else:
        assert b"\\" in literal


@given(any_text.filter(lambda text: not any(char in "\b\f\r" for char in text)))
def test_json_string_matches_msgspec_except_for_b_f_r(text: str) -> None:
    assert encode_json_string(text) == msgspec.json.encode(text)


def test_json_string_rejects_lone_surrogates() -> None:
    with pytest.raises(ValueError, match="surrogates"):
        encode_json_string("a\ud800")


# --- amounts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        ("250", "250.00"),
        ("0.5", "0.50"),
        ("250.00", "250.00"),
        ("250.000", "250.00"),
        ("0", "0.00"),
        ("-0", "0.00"),
        ("-0.00", "0.00"),
        ("1E+2", "100.00"),
        ("1.0E+1", "10.00"),
        ("5E-1", "0.50"),
        ("999999999999.99", "999999999999.99"),
        ("123456789012345678901234567890.12", "123456789012345678901234567890.12"),
    ],
)
def test_format_amount(amount: str, text: str) -> None:
    assert format_amount(Decimal(amount)) == text


@pytest.mark.parametrize(
    "amount", ["0.001", "250.005", "-1", "-0.01", "NaN", "sNaN", "Infinity", "-Infinity"]
)
def test_format_amount_never_rounds_or_shows_what_cannot_be(amount: str) -> None:
    with pytest.raises(ValueError, match="amount"):
        format_amount(Decimal(amount))


@given(st.integers(min_value=0, max_value=10**14 - 1), st.integers(min_value=0, max_value=4))
def test_amounts_round_trip(cents: int, extra_zeros: int) -> None:
    # The same value written with any number of trailing zeros.
    amount = (
        Decimal(cents).scaleb(-2)
        if extra_zeros == 0
        else Decimal(cents * 10**extra_zeros).scaleb(-2 - extra_zeros)
    )
    text = format_amount(amount)
    assert AMOUNT.fullmatch(text)
    assert Decimal(text) == amount
    assert text == f"{cents // 100}.{cents % 100:02d}"


@given(st.integers(min_value=0, max_value=10**12 - 1), st.integers(min_value=0, max_value=99))
def test_request_amount_comes_back_normalised(units: int, cents: int) -> None:
    sent = f"{units}" if cents == 0 else f"{units}.{cents:02d}".rstrip("0")
    body = {
        "withdrawal_id": "wd_1",
        "merchant_id": "m_1",
        "amount": sent,
        "currency": "EUR",
        "destination": {"type": "iban", "account": "x"},
        "cascade": [{"provider_id": "p", "fee": sent}],
    }
    request = parse_create_withdrawal(json.dumps(body).encode())
    if units == 0 and cents == 0:
        assert isinstance(request, list)
        return
    assert isinstance(request, CreateWithdrawal)
    assert format_amount(request.amount) == f"{units}.{cents:02d}"
    assert format_amount(request.cascade[0].fee) == f"{units}.{cents:02d}"


# --- timestamps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2025, 1, 31, 12, 0, tzinfo=UTC), "2025-01-31T12:00:00.000Z"),
        (datetime(2025, 1, 31, 12, 0, 5, 999_999, tzinfo=UTC), "2025-01-31T12:00:05.999Z"),
        (datetime(2025, 1, 31, 12, 0, 5, 1_999, tzinfo=UTC), "2025-01-31T12:00:05.001Z"),
        (
            datetime(2025, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))),
            "2024-12-31T23:30:00.000Z",
        ),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000Z"),
        (datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), "9999-12-31T23:59:59.999Z"),
    ],
)
def test_format_timestamp(moment: datetime, text: str) -> None:
    assert format_timestamp(moment) == text


def test_format_timestamp_across_a_dst_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    assert format_timestamp(datetime(2025, 7, 1, 14, 0, 0, 987_654, tzinfo=berlin)) == (
        "2025-07-01T12:00:00.987Z"
    )
    assert (
        format_timestamp(datetime(2025, 1, 1, 0, 30, tzinfo=berlin)) == "2024-12-31T23:30:00.000Z"
    )


def test_format_timestamp_rejects_naive() -> None:
    with pytest.raises(ValueError, match="naive"):
        format_timestamp(datetime(2025, 1, 31, 12, 0))  # noqa: DTZ001 - naive on purpose


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),  # noqa: DTZ001 - bounds for aware values, by Hypothesis' rules
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.sampled_from(
            [
                UTC,
                timezone(timedelta(hours=5, minutes=30)),
                timezone(timedelta(hours=-11)),
                ZoneInfo("America/New_York"),
            ]
        ),
    )
)
def test_timestamps_are_utc_milliseconds(moment: datetime) -> None:
    text = format_timestamp(moment)
    assert TIMESTAMP.fullmatch(text)
    # Compared as naive UTC wall times: aware comparisons across zones are never equal for a
    # time in a DST fold or gap (PEP 495), which Hypothesis does generate.
    parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: DTZ007 - the Z is literal
    utc = moment.astimezone(UTC).replace(tzinfo=None)
    assert parsed == utc.replace(microsecond=utc.microsecond // 1000 * 1000)


# --- the Withdrawal object --------------------------------------------------------------


def view(**changes: Any) -> WithdrawalView:
    fields: dict[str, Any] = {
        "withdrawal_id": "wd_basic_1",
        "merchant_id": "m_1001",
        "status": "processing",
        "amount": Decimal("250.00"),
        "currency": "EUR",
        "provider_id": "sbx_ok",
        "provider_reference": None,
        "failure_code": None,
        "metadata": (),
        "created_at": datetime(2025, 1, 31, 12, 0, 0, 123_456, tzinfo=UTC),
        "updated_at": datetime(2025, 1, 31, 12, 0, 1, tzinfo=UTC),
    }
    fields.update(changes)
    return WithdrawalView(**fields)


def test_withdrawal_bytes() -> None:
    assert encode_withdrawal(view()) == (
        b'{"withdrawal_id":"wd_basic_1","merchant_id":"m_1001","status":"processing",'
        b'"amount":"250.00","currency":"EUR","provider_id":"sbx_ok","provider_reference":null,'
        b'"failure_code":null,"metadata":{},"created_at":"2025-01-31T12:00:00.123Z",'
        b'"updated_at":"2025-01-31T12:00:01.000Z"}'
    )


def test_withdrawal_bytes_when_final() -> None:
    encoded = encode_withdrawal(
        view(
            status="failed",
            failure_code="declined",
            provider_reference="ord-9/\u00e9",
            amount=Decimal("0.5"),
            metadata=(("z", "1"), ("a", "\r\n")),
        )
    )
    assert (
        b'"status":"failed","amount":"0.50","currency":"EUR","provider_id":"sbx_ok",'
        b'"provider_reference":"ord-9/\xc3\xa9","failure_code":"declined",'
        b'"metadata":{"z":"1","a":"\\u000d\\n"},'
    ) in encoded


@pytest.mark.parametrize(
    ("status", "failure_code"),
    [
        ("pending", None),
        ("PROCESSING", None),
        ("manual_check", None),
        ("processing", "declined"),
        ("succeeded", "cancelled"),
        ("failed", None),
        ("cancelled", None),
        ("failed", "insufficient_balance"),
    ],
)
def test_withdrawal_view_rejects_what_the_contract_cannot_show(
    status: str, failure_code: str | None
) -> None:
    with pytest.raises(ValueError, match=r"status|failure code"):
        view(status=status, failure_code=failure_code)


def test_withdrawal_rejects_naive_timestamps() -> None:
    naive = datetime(2025, 1, 31, 12, 0)  # noqa: DTZ001 - naive on purpose
    with pytest.raises(ValueError, match="naive"):
        encode_withdrawal(view(created_at=naive))
    with pytest.raises(ValueError, match="naive"):
        encode_withdrawal(view(updated_at=naive))


def test_withdrawal_rejects_fractional_cents() -> None:
    with pytest.raises(ValueError, match="amount"):
        encode_withdrawal(view(amount=Decimal("1.005")))


_final = st.sampled_from(
    [("processing", None), ("succeeded", None)]
    + [(status, code) for status in ("failed", "cancelled") for code in FAILURE_CODES]
)
_aware = st.datetimes(
    min_value=datetime(1, 1, 2),  # noqa: DTZ001 - bounds for aware values, by Hypothesis' rules
    max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    timezones=st.just(UTC),
)


@st.composite
def views(draw: st.DrawFn, text: st.SearchStrategy[str] = any_text) -> WithdrawalView:
    status, failure_code = draw(_final)
    metadata = draw(st.dictionaries(text, text, max_size=5))
    return WithdrawalView(
        withdrawal_id=draw(text),
        merchant_id=draw(text),
        status=status,
        amount=Decimal(draw(st.integers(min_value=0, max_value=10**14))).scaleb(-2),
        currency=draw(text),
        provider_id=draw(text),
        provider_reference=draw(st.none() | text),
        failure_code=failure_code,
        metadata=tuple(metadata.items()),
        created_at=draw(_aware),
        updated_at=draw(_aware),
    )


@given(views())
def test_withdrawal_decodes_to_its_fields_in_contract_order(shown: WithdrawalView) -> None:
    encoded = encode_withdrawal(shown)
    decoded = json.loads(encoded)
    assert tuple(decoded) == WITHDRAWAL_KEYS
    assert decoded == {
        "withdrawal_id": shown.withdrawal_id,
        "merchant_id": shown.merchant_id,
        "status": shown.status,
        "amount": format_amount(shown.amount),
        "currency": shown.currency,
        "provider_id": shown.provider_id,
        "provider_reference": shown.provider_reference,
        "failure_code": shown.failure_code,
        "metadata": dict(shown.metadata),
        "created_at": format_timestamp(shown.created_at),
        "updated_at": format_timestamp(shown.updated_at),
    }
    assert list(decoded["metadata"]) == [key for key, _ in shown.metadata]
    assert AMOUNT.fullmatch(decoded["amount"])
    assert TIMESTAMP.fullmatch(decoded["created_at"])
    assert TIMESTAMP.fullmatch(decoded["updated_at"])


def expected_withdrawal_bytes(shown: WithdrawalView) -> bytes:
    """The Withdrawal object assembled from separately tested pieces, key by key."""

    def literal(value: str | None) -> bytes:
        return b"null" if value is None else encode_json_string(value)

    values = {
        "withdrawal_id": literal(shown.withdrawal_id),
        "merchant_id": literal(shown.merchant_id),
        "status": literal(shown.status),
        "amount": literal(format_amount(shown.amount)),
        "currency": literal(shown.currency),
        "provider_id": literal(shown.provider_id),
        "provider_reference": literal(shown.provider_reference),
        "failure_code": literal(shown.failure_code),
        "metadata": b"{"
        + b",".join(literal(key) + b":" + literal(value) for key, value in shown.metadata)
        + b"}",
        "created_at": literal(format_timestamp(shown.created_at)),
        "updated_at": literal(format_timestamp(shown.updated_at)),
    }
    assert tuple(values) == WITHDRAWAL_KEYS
    return b"{" + b",".join(literal(key) + b":" + value for key, value in values.items()) + b"}"


plain_text = st.text(st.characters(codec="utf-8").filter(lambda c: c not in CONTROLS + '"\\'))


@given(st.one_of(views(any_text), views(plain_text)))
def test_withdrawal_bytes_exactly(shown: WithdrawalView) -> None:
    # Both encoder paths: views(plain_text) never needs an escape, views(any_text) mostly does.
    assert encode_withdrawal(shown) == expected_withdrawal_bytes(shown)


def test_withdrawal_refuses_repeated_metadata_keys() -> None:
    with pytest.raises(ValueError, match="unique"):
        encode_withdrawal(view(metadata=(("a", "1"), ("a", "2"))))


@given(views())
def test_withdrawal_has_no_whitespace_outside_strings(shown: WithdrawalView) -> None:
    encoded = encode_withdrawal(shown).decode("utf-8")
    structure = STRING_LITERAL.sub('""', encoded)
    assert not re.search(r"\s", structure)
    assert not encoded.endswith("\n")


# --- metadata storage -------------------------------------------------------------------


@given(st.dictionaries(any_text, any_text, max_size=25))
def test_metadata_storage_round_trips_in_order(metadata: dict[str, str]) -> None:
    pairs = tuple(metadata.items())
    stored = encode_metadata(pairs)
    assert decode_metadata(stored) == pairs
    assert decode_metadata(stored.decode("utf-8")) == pairs


def test_metadata_storage_is_the_wire_object() -> None:
    assert encode_metadata([]) == b"{}"
    assert encode_metadata([("b", "1"), ("a", "x\ty")]) == b'{"b":"1","a":"x\\ty"}'


def test_metadata_storage_refuses_repeated_keys() -> None:
    with pytest.raises(ValueError, match="unique"):
        encode_metadata([("a", "1"), ("a", "2")])


@pytest.mark.parametrize("raw", [b"", b"[]", b'{"a":1}', b'{"a":"b"', "{'a':'b'}"])
def test_corrupt_stored_metadata_is_a_value_error(raw: bytes | str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - msgspec's own messages vary by case
        decode_metadata(raw)


# --- errors -----------------------------------------------------------------------------

CONTRACT_ERRORS = {
    "malformed_json": (400, "malformed_json", "Request body is not valid JSON."),
    "unauthorized": (401, "unauthorized", "Missing or invalid bearer token."),
    "not_found": (404, "not_found", "Withdrawal not found."),
    "route_not_found": (404, "not_found", "Resource not found."),
    "method_not_allowed": (405, "method_not_allowed", "Method not allowed."),
    "idempotency_conflict": (
        409,
        "idempotency_conflict",
        "Idempotency-Key was already used with a different request body.",
    ),
    "duplicate_withdrawal": (
        409,
        "duplicate_withdrawal",
        "A withdrawal with this withdrawal_id already exists.",
    ),
    "not_cancellable": (409, "not_cancellable", "Withdrawal is already final."),
    "payload_too_large": (413, "payload_too_large", "Request body exceeds 65536 bytes."),
    "unsupported_media_type": (
        415,
        "unsupported_media_type",
        "Content-Type must be application/json.",
    ),
    "validation_failed": (422, "validation_failed", "Request validation failed."),
    "internal_error": (500, "internal_error", "Internal error."),
    "unavailable": (503, "unavailable", "Service temporarily unavailable."),
}


def test_errors_table_is_the_contracts() -> None:
    assert {
        name: (error.status, error.code, error.message) for name, error in ERRORS.items()
    } == CONTRACT_ERRORS
    assert set(ERRORS.values()) == set(ApiError)


def test_error_bytes() -> None:
    assert encode_error("not_found", "Withdrawal not found.", "abc-123.XYZ_9") == (
        b'{"error":{"code":"not_found","message":"Withdrawal not found.",'
        b'"request_id":"abc-123.XYZ_9"}}'
    )


@pytest.mark.parametrize("error", [e for e in ApiError if e is not ApiError.VALIDATION_FAILED])
def test_api_error_bytes(error: ApiError) -> None:
    assert encode_api_error(error, "r1") == encode_error(error.code, error.message, "r1")


def test_validation_failed_needs_its_fields() -> None:
    with pytest.raises(ValueError, match="encode_validation_error"):
        encode_api_error(ApiError.VALIDATION_FAILED, "r1")
    with pytest.raises(ValueError, match="at least one"):
        encode_validation_error([], "r1")


def test_validation_error_bytes_as_in_the_readme() -> None:
    fields = [FieldError(field="amount", reason="invalid_format")]
    assert encode_validation_error(fields, "<id>") == (
        b'{"error":{"code":"validation_failed","message":"Request validation failed.",'
        b'"fields":[{"field":"amount","reason":"invalid_format"}],"request_id":"<id>"}}'
    )


def test_validation_error_field_paths_are_escaped() -> None:
    fields = [FieldError(field='metadata.a"\r', reason="too_long")]
    encoded = encode_validation_error(fields, "r")
    assert b'"field":"metadata.a\\"\\u000d"' in encoded
    assert json.loads(encoded)["error"]["fields"] == [
        {"field": 'metadata.a"\r', "reason": "too_long"}
    ]


# --- against the recorded exchanges -----------------------------------------------------

PLACEHOLDERS = {
    "{{ts}}": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z",
    "{{rid}}": "RID",
    "{{hex32}}": "[0-9a-f]{32}",
    "{{status}}": "processing|succeeded|failed|cancelled",
    "{{any}}": r'[^"\\]*',
    "{{ref}}": r'(?:null|"(?:[^"\\]|\\.)*")',
    "{{code}}": '(?:null|"(?:' + "|".join(FAILURE_CODES) + ')")',
}


def template_regex(template: str, request_id: str) -> re.Pattern[bytes]:
    pieces = re.split(r"(\{\{\w+\}\})", template)
    pattern = "".join(
        "(?:" + PLACEHOLDERS[piece].replace("RID", re.escape(request_id)) + ")"
        if piece in PLACEHOLDERS
        else re.escape(piece)
        for piece in pieces
    )
    return re.compile(pattern.encode())


def _responses(statuses: set[int]) -> list[Any]:
    found = []
    for file in sorted(EXCHANGES.glob("*.json")):
        exchange = json.loads(file.read_text(encoding="utf-8"))
        for number, step in enumerate(exchange["steps"]):
            if step["response"]["status"] in statuses:
                found.append(pytest.param(step, id=f"{exchange['name']}-{number}"))
    return found


@pytest.mark.parametrize("step", _responses({201}))
def test_created_withdrawal_matches_the_exchange(step: Any) -> None:
    request = parse_create_withdrawal(step["request"]["body"].encode())
    assert isinstance(request, CreateWithdrawal)
    now = datetime.now(UTC)
    for status, failure_code in [("processing", None), ("succeeded", None), ("failed", "declined")]:
        shown = WithdrawalView(
            withdrawal_id=request.withdrawal_id,
            merchant_id=request.merchant_id,
            status=status,
            amount=request.amount,
            currency=request.currency,
            provider_id=request.cascade[0].provider_id,
            provider_reference=None if status == "processing" else "ref-1",
            failure_code=failure_code,
            metadata=request.metadata,
            created_at=now,
            updated_at=now,
        )
        assert template_regex(step["response"]["body"], "r").fullmatch(encode_withdrawal(shown))


@pytest.mark.parametrize("step", _responses({400, 401, 404, 405, 409, 413, 415, 422}))
def test_error_matches_the_exchange(step: Any) -> None:
    expected: dict[str, Any] = json.loads(step["response"]["body"].replace("{{rid}}", "RID"))
    body = expected["error"]
    [error] = [
        e
        for e in ApiError
        if (e.status, e.code, e.message)
        == (step["response"]["status"], body["code"], body["message"])
    ]
    request_id = "abc-123.XYZ_9"
    if error is ApiError.VALIDATION_FAILED:
        fields = [FieldError(field=f["field"], reason=f["reason"]) for f in body["fields"]]
        encoded = encode_validation_error(fields, request_id)
    else:
        encoded = encode_api_error(error, request_id)
    assert template_regex(step["response"]["body"], request_id).fullmatch(encoded)


def test_healthz_body_matches_the_exchange() -> None:
    [step] = [step for step in _responses({200}) if step.values[0]["request"]["path"] == "/healthz"]
    assert step.values[0]["response"]["body"].encode() == HEALTHZ_BODY


def test_statuses_are_the_contracts() -> None:
    assert STATUSES == ("processing", "succeeded", "failed", "cancelled")
    assert FAILURE_CODES == (
        "declined",
        "provider_error",
        "timeout",
        "manual_rejected",
        "cancelled",
    )
