"""The provider protocol's payloads: what is decoded before anything is stored."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from contracts.provider import ProviderDecline, ProviderWebhook
from orchestrator.domain import Ambiguous, ProviderAnswer
from orchestrator.provider_client import _answer

VALID: dict[str, Any] = {
    "order_id": "cg-0123456789abcdef",
    "reference": "sbx_ok-42",
    "status": "failed",
    "code": "declined",
}


@pytest.mark.parametrize("field", ProviderWebhook.__struct_fields__)
def test_no_field_holds_nul(field: str) -> None:
    """Every field lands in a Postgres ``text`` column, which cannot hold U+0000: a new field
    is covered here the day it is added."""
    payload = {**VALID, field: "ab\x00cd"}
    with pytest.raises(msgspec.ValidationError, match=rf"at `\$\.{field}`"):
        msgspec.json.decode(msgspec.json.encode(payload), type=ProviderWebhook)


def test_other_text_is_taken_as_it_is() -> None:
    """Only NUL is refused: other control characters and any script are valid text."""
    payload = {**VALID, "reference": "réf\t\x01\n—支付", "code": "\x7f"}
    decoded = msgspec.json.decode(msgspec.json.encode(payload), type=ProviderWebhook)
    assert (decoded.reference, decoded.code) == (payload["reference"], payload["code"])


def test_a_missing_code_stays_optional() -> None:
    payload = {k: v for k, v in VALID.items() if k != "code"}
    decoded = msgspec.json.decode(msgspec.json.encode(payload), type=ProviderWebhook)
    assert decoded.code is None


@pytest.mark.parametrize("field", ["reference", "code"])
def test_a_provider_answer_with_nul_is_ambiguous_not_stored(field: str) -> None:
    """A create or status answer that could not be stored (NUL in a text field) proves
    nothing either way: the order may exist, so it is an ambiguous answer of the call made."""
    body = {"order_id": "cg-0123456789abcdef", "reference": "r-1", "status": "succeeded"}
    answer = _answer(msgspec.json.encode({**body, field: "r\x00"}), "poll")
    assert isinstance(answer, Ambiguous)
    assert answer.source == "poll"
    assert isinstance(_answer(msgspec.json.encode(body), "poll"), ProviderAnswer)


def test_a_decline_code_with_nul_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"at `\$\.code`"):
        msgspec.json.decode(b'{"code": "closed\\u0000"}', type=ProviderDecline)
