"""JSON string literals with the legacy v1 API's minimal escaping, as UTF-8 bytes.

The frozen contract escapes only ``"``, ``\\`` and the C0 controls U+0000-U+001F: ``\\n``,
``\\t``, ``\\"`` and ``\\\\`` in short form, every other control as ``\\u00XX`` with lowercase
hex. Everything else (``/``, DEL, U+2028, non-BMP characters) is written as raw UTF-8.

msgspec escapes ``\\b``, ``\\f`` and ``\\r`` in short form, so its output is not the contract's
whenever one of those appears. It is still the fastest way to turn a ``str`` into UTF-8 bytes,
and JSON's only escape mechanism is the backslash: a msgspec literal without one is exactly
``"`` + raw UTF-8 + ``"``, whatever msgspec's escaping policy. So msgspec does the common case
and every string that needs any escape is escaped here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import msgspec

_NEEDS_ESCAPE: Final = re.compile(r'[\x00-\x1f"\\]')

_ESCAPES: Final[dict[str, str]] = {
    **{chr(code): f"\\u{code:04x}" for code in range(0x20)},
    "\n": "\\n",
    "\t": "\\t",
    '"': '\\"',
    "\\": "\\\\",
}

_to_json: Final = msgspec.json.Encoder().encode


def _escape(match: re.Match[str]) -> str:
    return _ESCAPES[match.group()]


def encode_json_string(text: str) -> bytes:
    """``text`` as a quoted JSON string literal in UTF-8, escaped as the contract says.

    Raises ``UnicodeEncodeError`` (a ``ValueError``) for a lone surrogate, which UTF-8 cannot
    carry; the request parser never produces one.
    """
    literal = _to_json(text)
    if b"\\" not in literal:
        return literal
    return b'"' + _NEEDS_ESCAPE.sub(_escape, text).encode() + b'"'


def encode_json_object(pairs: Iterable[tuple[str, str]]) -> bytes:
    """A JSON object of string values, keys in the given order, written compactly.

    Keys are written as given: a caller that must not emit a repeated key checks for it.
    """
    return (
        b"{"
        + b",".join(
            encode_json_string(key) + b":" + encode_json_string(value) for key, value in pairs
        )
        + b"}"
    )
