"""Wire format of the frozen legacy v1 withdrawal API (``legacy-api/README.md``).

Pure: no I/O and no framework. :func:`parse_create_withdrawal` and :func:`parse_cancel` turn a
request body into a typed request or into the complete list of field errors in the contract's
order; the ``encode_*`` functions produce the exact response bytes.

The contract leaves some cases open. They are decided here, once:

- **JSON null is an absent field.** A required field that is ``null`` gives ``required``; an
  optional one (``destination.holder``, ``metadata``, cancel's ``reason``) that is ``null`` is
  accepted as not sent, and ``metadata: null`` echoes as ``{}``. This is about object fields
  only: a ``null`` cascade entry is ``cascade[i]``/``invalid_type`` and a ``null`` metadata
  value is ``metadata.<key>``/``invalid_type``.
- **One reason per field; length before characters.** An id longer than 64 characters is
  ``too_long`` even when it also holds characters outside ``[A-Za-z0-9_-]``; an empty id is
  ``invalid_format``. An amount is checked for format first and for zero only when well formed.
- **Duplicates among well-formed ids only.** ``duplicate`` is reported on a later cascade entry
  whose ``provider_id`` is well formed and equal (case-sensitively) to an earlier well-formed
  one; a malformed id already has its own error.
- **Over-long cascades are still checked entry by entry**: ``cascade``/``too_many`` comes
  first, then every entry's own errors, since all violations are reported.
- **Metadata errors on the object come before errors on its values**, in the table's order:
  ``metadata``/``too_many`` (more than 20 distinct keys), then ``metadata``/``invalid_format``
  once however many keys are bad, then ``metadata.<key>`` errors in request order. The value
  under a bad key is not checked: the key is already reported, and a path built from an empty
  or over-long key would mislead.
- **Repeated JSON keys: the last value wins, at the position of the first occurrence** (what
  Python's and JavaScript's JSON parsers do). This applies to every object, metadata included,
  so metadata echoes each key once.
- **What counts as not valid JSON** (``MalformedJson``, answered with 400): bad syntax, an empty
  body, trailing bytes after the value, bytes that are not UTF-8, a UTF-8 byte order mark, an
  escaped lone surrogate (``"\\ud800"``: no Unicode text can hold it, so it could never be echoed
  back), ``NaN``/``Infinity``, and nesting deeper than the decoder can recurse (roughly the
  interpreter's recursion limit; no valid request nests deeper than three).
- **Numbers are never strings**: ``250.0``, ``250`` and huge values like ``1e400`` are all valid
  JSON and give ``invalid_type`` where a string is required; booleans likewise.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Context, Decimal, Inexact, InvalidOperation
from enum import Enum
from typing import Any, Final

import msgspec

from contracts.jsonbytes import encode_json_object, encode_json_string

__all__ = [
    "ERRORS",
    "FAILURE_CODES",
    "FIELD_ERROR_REASONS",
    "HEALTHZ_BODY",
    "STATUSES",
    "WITHDRAWAL_KEYS",
    "ApiError",
    "CancelRequest",
    "CascadeEntry",
    "CreateWithdrawal",
    "Destination",
    "FieldError",
    "MalformedJson",
    "WithdrawalView",
    "check_idempotency_key",
    "check_request_id",
    "decode_metadata",
    "encode_api_error",
    "encode_error",
    "encode_json_string",
    "encode_metadata",
    "encode_validation_error",
    "encode_withdrawal",
    "format_amount",
    "format_timestamp",
    "parse_cancel",
    "parse_create_withdrawal",
]

# --- vocabulary -------------------------------------------------------------------------

STATUSES: Final = ("processing", "succeeded", "failed", "cancelled")
"""The only statuses the Withdrawal object may show."""

FAILURE_CODES: Final = ("declined", "provider_error", "timeout", "manual_rejected", "cancelled")
"""The only failure codes the Withdrawal object may show (when ``failed`` or ``cancelled``)."""

FIELD_ERROR_REASONS: Final = (
    "required",
    "invalid_type",
    "invalid_format",
    "too_long",
    "out_of_range",
    "invalid_value",
    "too_many",
    "duplicate",
)
"""Every ``reason`` a field error can carry."""

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
"""Keys of the Withdrawal object, in wire order."""

HEALTHZ_BODY: Final = b'{"status":"ok"}'

_DESTINATION_TYPES: Final = frozenset({"iban", "card", "wallet"})
_MAX_ID_LENGTH: Final = 64
_MAX_ACCOUNT_LENGTH: Final = 64
_MAX_HOLDER_LENGTH: Final = 128
_MAX_CASCADE_ENTRIES: Final = 32
_MAX_METADATA_KEYS: Final = 20
_MAX_METADATA_KEY_LENGTH: Final = 40
_MAX_METADATA_VALUE_LENGTH: Final = 500
_MAX_CANCEL_REASON_LENGTH: Final = 200

# fullmatch everywhere: ``$`` would also accept a trailing newline. ``[0-9]`` rather than
# ``\d``, which matches every Unicode digit.
_ID: Final = re.compile(r"[A-Za-z0-9_-]+")
_AMOUNT: Final = re.compile(r"(?:0|[1-9][0-9]{0,11})(?:\.[0-9]{1,2})?")
_CURRENCY: Final = re.compile(r"[A-Z]{3}")
_IDEMPOTENCY_KEY: Final = re.compile(r"[\x20-\x7e]{1,255}")
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")

_CENT: Final = Decimal("0.01")
# Money is never rounded: a value that does not fit in whole cents is a bug upstream, so
# quantizing traps instead. Own precision, so a changed thread-local context cannot interfere.
_MONEY: Final = Context(prec=40, traps=[Inexact, InvalidOperation])


# --- requests ---------------------------------------------------------------------------


class Destination(msgspec.Struct, frozen=True, kw_only=True):
    """Where the money goes, as the request sent it."""

    type: str
    account: str
    holder: str | None = None


class CascadeEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One provider to try, with its fee; entries come cheapest first."""

    provider_id: str
    fee: Decimal


class CreateWithdrawal(msgspec.Struct, frozen=True, kw_only=True):
    """A valid ``POST /v1/withdrawals`` body. Amounts carry exactly two decimal places."""

    withdrawal_id: str
    merchant_id: str
    amount: Decimal
    currency: str
    destination: Destination
    cascade: tuple[CascadeEntry, ...]
    metadata: tuple[tuple[str, str], ...]
    """Key/value pairs in request order; empty when the request had none."""


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A valid ``POST /v1/withdrawals/{id}/cancel`` body (or an empty one)."""

    reason: str | None = None


class FieldError(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a 422's ``fields`` array."""

    field: str
    reason: str


class MalformedJson(ValueError):
    """The request body is not valid JSON: answer 400 ``malformed_json``."""


_decoder: Final = msgspec.json.Decoder(float_hook=Decimal)
"""Untyped, so every violation can be reported; ``float_hook`` so ``1e400`` is a number too."""


def _decode(body: bytes) -> Any:
    try:
        return _decoder.decode(body)
    # DecodeError (syntax, truncation, lone surrogate escape) and UnicodeDecodeError (bytes that
    # are not UTF-8) are both ValueErrors; RecursionError is nesting deeper than the decoder goes.
    except (ValueError, RecursionError) as exc:
        raise MalformedJson("request body is not valid JSON") from exc


def parse_create_withdrawal(body: bytes) -> CreateWithdrawal | list[FieldError]:
    """Validate a ``POST /v1/withdrawals`` body against every rule of the contract's table.

    Returns the request, or all violations in the table's order (see the module docstring for
    the cases the table leaves open). Raises :class:`MalformedJson` for a body that is not JSON.
    """
    document = _decode(body)
    if not isinstance(document, dict):
        return [FieldError(field="$", reason="invalid_type")]
    errors: list[FieldError] = []
    withdrawal_id = _identifier(document, "withdrawal_id", "withdrawal_id", errors)
    merchant_id = _identifier(document, "merchant_id", "merchant_id", errors)
    amount = _money(document, "amount", "amount", errors, zero_allowed=False)
    currency = _currency(document, errors)
    destination = _destination(document, errors)
    cascade = _cascade(document, errors)
    metadata = _metadata(document, errors)
    if (
        errors
        or withdrawal_id is None
        or merchant_id is None
        or amount is None
        or currency is None
        or destination is None
        or cascade is None
        or metadata is None
    ):
        assert errors, "every rejected value records a field error"
        return errors
    return CreateWithdrawal(
        withdrawal_id=withdrawal_id,
        merchant_id=merchant_id,
        amount=amount,
        currency=currency,
        destination=destination,
        cascade=cascade,
        metadata=metadata,
    )


def parse_cancel(body: bytes) -> CancelRequest | list[FieldError]:
    """Validate a non-empty JSON cancel body; raises :class:`MalformedJson` if it is not JSON."""
    document = _decode(body)
    if not isinstance(document, dict):
        return [FieldError(field="$", reason="invalid_type")]
    errors: list[FieldError] = []
    reason = _string(document, "reason", "reason", errors, required=False)
    if reason is not None and len(reason) > _MAX_CANCEL_REASON_LENGTH:
        errors.append(FieldError(field="reason", reason="too_long"))
    if errors:
        return errors
    return CancelRequest(reason=reason)


def check_idempotency_key(value: str | None) -> FieldError | None:
    """The error for a malformed ``Idempotency-Key`` header; ``None`` when absent or valid."""
    if value is None or _IDEMPOTENCY_KEY.fullmatch(value):
        return None
    return FieldError(field="Idempotency-Key", reason="invalid_format")


def check_request_id(value: str | None) -> str:
    """The request id to answer with: the caller's if well formed, else a fresh 32-hex one."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return secrets.token_hex(16)


def _string(
    parent: Mapping[str, Any],
    key: str,
    path: str,
    errors: list[FieldError],
    *,
    required: bool = True,
) -> str | None:
    """``parent[key]`` if it is a string; records ``required``/``invalid_type`` otherwise."""
    value = parent.get(key)
    if value is None:
        if required:
            errors.append(FieldError(field=path, reason="required"))
        return None
    if not isinstance(value, str):
        errors.append(FieldError(field=path, reason="invalid_type"))
        return None
    return value


def _identifier(
    parent: Mapping[str, Any], key: str, path: str, errors: list[FieldError]
) -> str | None:
    value = _string(parent, key, path, errors)
    if value is None:
        return None
    if len(value) > _MAX_ID_LENGTH:
        errors.append(FieldError(field=path, reason="too_long"))
        return None
    if _ID.fullmatch(value) is None:
        errors.append(FieldError(field=path, reason="invalid_format"))
        return None
    return value


def _money(
    parent: Mapping[str, Any],
    key: str,
    path: str,
    errors: list[FieldError],
    *,
    zero_allowed: bool,
) -> Decimal | None:
    text = _string(parent, key, path, errors)
    if text is None:
        return None
    if _AMOUNT.fullmatch(text) is None:
        errors.append(FieldError(field=path, reason="invalid_format"))
        return None
    # Exact: the pattern allows at most two decimals and fourteen digits.
    amount = Decimal(text).quantize(_CENT, context=_MONEY)
    if not zero_allowed and amount.is_zero():
        errors.append(FieldError(field=path, reason="out_of_range"))
        return None
    return amount


def _currency(document: Mapping[str, Any], errors: list[FieldError]) -> str | None:
    value = _string(document, "currency", "currency", errors)
    if value is not None and _CURRENCY.fullmatch(value) is None:
        errors.append(FieldError(field="currency", reason="invalid_format"))
        return None
    return value


def _destination(document: Mapping[str, Any], errors: list[FieldError]) -> Destination | None:
    value = document.get("destination")
    if value is None:
        errors.append(FieldError(field="destination", reason="required"))
        return None
    if not isinstance(value, dict):
        errors.append(FieldError(field="destination", reason="invalid_type"))
        return None
    before = len(errors)
    kind = _string(value, "type", "destination.type", errors)
    if kind is not None and kind not in _DESTINATION_TYPES:
        errors.append(FieldError(field="destination.type", reason="invalid_value"))
    account = _string(value, "account", "destination.account", errors)
    if account is not None:
        if len(account) > _MAX_ACCOUNT_LENGTH:
            errors.append(FieldError(field="destination.account", reason="too_long"))
        elif not account:
            errors.append(FieldError(field="destination.account", reason="invalid_format"))
    holder = _string(value, "holder", "destination.holder", errors, required=False)
    if holder is not None and len(holder) > _MAX_HOLDER_LENGTH:
        errors.append(FieldError(field="destination.holder", reason="too_long"))
    if len(errors) > before or kind is None or account is None:
        return None
    return Destination(type=kind, account=account, holder=holder)


def _cascade(
    document: Mapping[str, Any], errors: list[FieldError]
) -> tuple[CascadeEntry, ...] | None:
    value = document.get("cascade")
    if value is None:
        errors.append(FieldError(field="cascade", reason="required"))
        return None
    if not isinstance(value, list):
        errors.append(FieldError(field="cascade", reason="invalid_type"))
        return None
    before = len(errors)
    if not value:
        errors.append(FieldError(field="cascade", reason="out_of_range"))
    elif len(value) > _MAX_CASCADE_ENTRIES:
        errors.append(FieldError(field="cascade", reason="too_many"))
    seen: set[str] = set()
    entries: list[CascadeEntry] = []
    for index, entry in enumerate(value):
        path = f"cascade[{index}]"
        if not isinstance(entry, dict):
            errors.append(FieldError(field=path, reason="invalid_type"))
            continue
        provider_id = _identifier(entry, "provider_id", f"{path}.provider_id", errors)
        if provider_id is not None:
            if provider_id in seen:
                errors.append(FieldError(field=f"{path}.provider_id", reason="duplicate"))
            seen.add(provider_id)
        fee = _money(entry, "fee", f"{path}.fee", errors, zero_allowed=True)
        if provider_id is not None and fee is not None:
            entries.append(CascadeEntry(provider_id=provider_id, fee=fee))
    if len(errors) > before:
        return None
    return tuple(entries)


def _metadata(
    document: Mapping[str, Any], errors: list[FieldError]
) -> tuple[tuple[str, str], ...] | None:
    value = document.get("metadata")
    if value is None:
        return ()
    if not isinstance(value, dict):
        errors.append(FieldError(field="metadata", reason="invalid_type"))
        return None
    before = len(errors)
    if len(value) > _MAX_METADATA_KEYS:
        errors.append(FieldError(field="metadata", reason="too_many"))
    if not all(_metadata_key_ok(key) for key in value):
        errors.append(FieldError(field="metadata", reason="invalid_format"))
    pairs: list[tuple[str, str]] = []
    for key, item in value.items():
        if not _metadata_key_ok(key):
            continue
        if not isinstance(item, str):
            errors.append(FieldError(field=f"metadata.{key}", reason="invalid_type"))
        elif len(item) > _MAX_METADATA_VALUE_LENGTH:
            errors.append(FieldError(field=f"metadata.{key}", reason="too_long"))
        else:
            pairs.append((key, item))
    if len(errors) > before:
        return None
    return tuple(pairs)


def _metadata_key_ok(key: str) -> bool:
    return 0 < len(key) <= _MAX_METADATA_KEY_LENGTH


# --- responses --------------------------------------------------------------------------


class WithdrawalView(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the Withdrawal object shows, already in the contract's vocabulary.

    Construction rejects (``ValueError``) a status or failure code the contract does not
    allow, so an internal state can never leak onto the wire: ``failure_code`` is one of
    :data:`FAILURE_CODES` when the status is ``failed`` or ``cancelled`` and ``None`` otherwise.
    ``metadata`` keys are expected to be unique, as :func:`parse_create_withdrawal` and
    :func:`decode_metadata` give them.
    """

    withdrawal_id: str
    merchant_id: str
    status: str
    amount: Decimal
    currency: str
    provider_id: str
    provider_reference: str | None
    failure_code: str | None
    metadata: tuple[tuple[str, str], ...]
    created_at: datetime
    updated_at: datetime

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")
        if self.status in {"failed", "cancelled"}:
            if self.failure_code not in FAILURE_CODES:
                raise ValueError(
                    f"a {self.status} withdrawal needs a failure code from {FAILURE_CODES},"
                    f" not {self.failure_code!r}"
                )
        elif self.failure_code is not None:
            raise ValueError(f"a {self.status} withdrawal has no failure code")


# Both are fixed ASCII words, so their literals are computed once.
_STATUS_LITERALS: Final = {status: encode_json_string(status) for status in STATUSES}
_FAILURE_CODE_LITERALS: Final[dict[str | None, bytes]] = {
    None: b"null",
    **{code: encode_json_string(code) for code in FAILURE_CODES},
}


class _WireWithdrawal(msgspec.Struct, frozen=True):
    """The Withdrawal object with every value in wire form; field order is the key order."""

    withdrawal_id: str
    merchant_id: str
    status: str
    amount: str
    currency: str
    provider_id: str
    provider_reference: str | None
    failure_code: str | None
    metadata: dict[str, str]
    created_at: str
    updated_at: str


_wire_encoder: Final = msgspec.json.Encoder()


def encode_withdrawal(view: WithdrawalView) -> bytes:
    """The exact bytes of the Withdrawal object.

    Raises ``ValueError`` for a naive timestamp, for an amount that is negative or does not fit
    in whole cents, and for a repeated metadata key.
    """
    amount = format_amount(view.amount)
    created_at = format_timestamp(view.created_at)
    updated_at = format_timestamp(view.updated_at)
    metadata = dict(view.metadata)
    if len(metadata) != len(view.metadata):
        raise ValueError("metadata keys must be unique")
    encoded = _wire_encoder.encode(
        _WireWithdrawal(
            view.withdrawal_id,
            view.merchant_id,
            view.status,
            amount,
            view.currency,
            view.provider_id,
            view.provider_reference,
            view.failure_code,
            metadata,
            created_at,
            updated_at,
        )
    )
    # The common case, in one C call. Without a backslash nothing was escaped, so every string
    # is raw UTF-8 and these are the contract's bytes (see contracts.jsonbytes); msgspec's escape
    # style differs from the contract's, so anything escaped is written piece by piece instead.
    if b"\\" not in encoded:
        return encoded
    reference = view.provider_reference
    return b"".join(
        (
            b'{"withdrawal_id":',
            encode_json_string(view.withdrawal_id),
            b',"merchant_id":',
            encode_json_string(view.merchant_id),
            b',"status":',
            _STATUS_LITERALS[view.status],
            b',"amount":"',
            amount.encode(),
            b'","currency":',
            encode_json_string(view.currency),
            b',"provider_id":',
            encode_json_string(view.provider_id),
            b',"provider_reference":',
            b"null" if reference is None else encode_json_string(reference),
            b',"failure_code":',
            _FAILURE_CODE_LITERALS[view.failure_code],
            b',"metadata":',
            encode_json_object(view.metadata),
            b',"created_at":"',
            created_at.encode(),
            b'","updated_at":"',
            updated_at.encode(),
            b'"}',
        )
    )


def format_amount(amount: Decimal) -> str:
    """``amount`` with exactly two decimals and no exponent: ``Decimal("250")`` → ``"250.00"``.

    Raises ``ValueError`` for a negative or non-finite amount or one with a fraction of a cent:
    money is never rounded on the way out.
    """
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"amount {amount!r} cannot be shown on the wire")
    try:
        # copy_abs turns -0 into 0, which would otherwise print as "-0.00".
        cents = amount.copy_abs().quantize(_CENT, context=_MONEY)
    except (Inexact, InvalidOperation) as exc:
        raise ValueError(f"amount {amount!r} is not a whole number of cents") from exc
    return f"{cents:f}"


def format_timestamp(moment: datetime) -> str:
    """``moment`` in UTC as ``YYYY-MM-DDTHH:MM:SS.mmmZ``, microseconds truncated.

    Raises ``ValueError`` for a naive datetime: its instant is unknown.
    """
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError("a naive datetime has no instant to put on the wire")
    if offset:
        moment -= offset  # same instant, UTC wall time; skipped in the usual UTC case (hot path)
    # isoformat truncates (never rounds) to milliseconds and writes four year digits, so the
    # first 23 characters are exactly YYYY-MM-DDTHH:MM:SS.mmm, before the "+00:00" suffix.
    return moment.isoformat(timespec="milliseconds")[:23] + "Z"


def encode_metadata(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Metadata as stored in a text column: the wire's JSON object, keys in order.

    Raises ``ValueError`` for a repeated key, which a JSON object cannot carry back.
    """
    pairs = tuple(pairs)
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("metadata keys must be unique")
    return encode_json_object(pairs)


_metadata_decoder: Final = msgspec.json.Decoder(dict[str, str])


def decode_metadata(raw: bytes | str) -> tuple[tuple[str, str], ...]:
    """The pairs :func:`encode_metadata` stored, in their order; ``ValueError`` if corrupt."""
    # msgspec fills the dict in document order, so the pairs come back in request order.
    return tuple(_metadata_decoder.decode(raw).items())


# --- errors -----------------------------------------------------------------------------


class ApiError(Enum):
    """Every error response of the v1 API: HTTP status, wire code and message, together.

    ``NOT_FOUND`` is an unknown withdrawal and ``ROUTE_NOT_FOUND`` an unknown path; both have
    the wire code ``not_found``.
    """

    MALFORMED_JSON = (400, "malformed_json", "Request body is not valid JSON.")
    UNAUTHORIZED = (401, "unauthorized", "Missing or invalid bearer token.")
    NOT_FOUND = (404, "not_found", "Withdrawal not found.")
    ROUTE_NOT_FOUND = (404, "not_found", "Resource not found.")
    METHOD_NOT_ALLOWED = (405, "method_not_allowed", "Method not allowed.")
    IDEMPOTENCY_CONFLICT = (
        409,
        "idempotency_conflict",
        "Idempotency-Key was already used with a different request body.",
    )
    DUPLICATE_WITHDRAWAL = (
        409,
        "duplicate_withdrawal",
        "A withdrawal with this withdrawal_id already exists.",
    )
    NOT_CANCELLABLE = (409, "not_cancellable", "Withdrawal is already final.")
    PAYLOAD_TOO_LARGE = (413, "payload_too_large", "Request body exceeds 65536 bytes.")
    UNSUPPORTED_MEDIA_TYPE = (
        415,
        "unsupported_media_type",
        "Content-Type must be application/json.",
    )
    VALIDATION_FAILED = (422, "validation_failed", "Request validation failed.")
    INTERNAL_ERROR = (500, "internal_error", "Internal error.")
    UNAVAILABLE = (503, "unavailable", "Service temporarily unavailable.")

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message


ERRORS: Final[dict[str, ApiError]] = {error.name.lower(): error for error in ApiError}
"""Every :class:`ApiError` by name: the wire code, except ``route_not_found``."""


def encode_error(code: str, message: str, request_id: str) -> bytes:
    """An error body without field errors; :func:`encode_api_error` picks code and message."""
    return b"".join(
        (
            b'{"error":{"code":',
            encode_json_string(code),
            b',"message":',
            encode_json_string(message),
            b',"request_id":',
            encode_json_string(request_id),
            b"}}",
        )
    )


def encode_api_error(error: ApiError, request_id: str) -> bytes:
    """The body of ``error``, with its own code and message.

    A 422 lists its field errors, so ``VALIDATION_FAILED`` goes through
    :func:`encode_validation_error` instead (``ValueError`` here).
    """
    if error is ApiError.VALIDATION_FAILED:
        raise ValueError("a validation error lists its fields: use encode_validation_error")
    return encode_error(error.code, error.message, request_id)


_VALIDATION_PREFIX: Final = (
    b'{"error":{"code":'
    + encode_json_string(ApiError.VALIDATION_FAILED.code)
    + b',"message":'
    + encode_json_string(ApiError.VALIDATION_FAILED.message)
    + b',"fields":['
)


def encode_validation_error(fields: Sequence[FieldError], request_id: str) -> bytes:
    """The 422 ``validation_failed`` body; ``fields`` sit between message and request_id.

    Raises ``ValueError`` for an empty list: a 422 always says what was wrong.
    """
    if not fields:
        raise ValueError("a validation error needs at least one field error")
    return b"".join(
        (
            _VALIDATION_PREFIX,
            b",".join(
                b'{"field":'
                + encode_json_string(error.field)
                + b',"reason":'
                + encode_json_string(error.reason)
                + b"}"
                for error in fields
            ),
            b'],"request_id":',
            encode_json_string(request_id),
            b"}}",
        )
    )
