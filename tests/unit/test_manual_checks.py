"""``cascade-gateway manual-checks`` without a gateway: configuration, masking, formatting.

The command against a live gateway: tests/integration/test_manual_checks_cli.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway.manual_checks import OpsClient, OpsError, Refused, _refusal, duration
from gateway.ops_wire import mask_account, mask_holder, masked_destination, provider_answer
from orchestrator.store.views import ProviderAnswerRow, is_provider_answer


@pytest.mark.parametrize(
    ("env", "url", "token"),
    [
        ({}, "http://127.0.0.1:8080", "ops-token"),
        ({"OPS_API_TOKENS": " first , second"}, "http://127.0.0.1:8080", "first"),
        ({"OPS_API_TOKENS": ",,"}, "http://127.0.0.1:8080", "ops-token"),
        ({"OPS_API_TOKEN": "mine", "OPS_API_TOKENS": "first"}, "http://127.0.0.1:8080", "mine"),
        ({"GATEWAY_URL": "https://gw.example/"}, "https://gw.example", "ops-token"),
    ],
)
def test_the_gateway_and_the_token_come_from_the_environment(
    env: dict[str, str], url: str, token: str
) -> None:
    assert OpsClient.from_env(env) == OpsClient(url=url, token=token)


def test_a_gateway_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(OpsError, match="GATEWAY_URL must be an http:// or https:// URL"):
        OpsClient.from_env({"GATEWAY_URL": "file:///etc/passwd"})


def _envelope(code: str, message: str, **extra: object) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, **extra}}).encode()


def test_http_errors_become_one_line() -> None:
    assert str(_refusal(404, _envelope("not_found", "No such task."))) == (
        "No such task. (404 not_found)"
    )
    assert "set OPS_API_TOKEN" in str(_refusal(401, _envelope("unauthorized", "Missing.")))
    assert "without an ops API error" in str(_refusal(502, b"<html>bad gateway</html>"))
    refused = _refusal(409, _envelope("provider_paid", "paid", evidence={"source": "poll"}))
    assert isinstance(refused, Refused)
    assert (refused.code, refused.exit_status) == ("provider_paid", 3)
    assert refused.envelope["error"]["evidence"] == {"source": "poll"}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (192, "3m12s"), (7500, "2h05m"), (97200, "1d03h"), (-3, "0s")],
)
def test_durations_read_at_a_glance(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(
    ("account", "masked"),
    [
        ("DE89370400440532013000", "DE89**************3000"),
        ("4111111111111111", "4111********1111"),
        ("12345678", "****5678"),
        ("1234567", "*******"),
        ("", ""),
    ],
)
def test_accounts_show_only_their_ends(account: str, masked: str) -> None:
    assert mask_account(account) == masked


def test_the_destination_is_masked_holder_included() -> None:
    assert mask_holder("Jane  van Doe") == "J. v. D."
    shown = masked_destination({"type": "card", "account": "4111111111111111", "holder": " "})
    assert (shown.type, shown.account, shown.holder) == ("card", "4111********1111", None)


def test_a_provider_answer_as_support_reads_it() -> None:
    at = datetime(2026, 12, 6, 6, 30, tzinfo=UTC)
    definitive: dict[str, object] = {
        "provider_status": "pending",
        "reference": "r-1",
        "code": None,
        "source": "poll",
    }
    unclear: dict[str, object] = {"ambiguous": "timeout after 10s", "timer": "status_tick"}
    assert is_provider_answer(definitive)
    assert is_provider_answer(unclear)
    assert not is_provider_answer({"timer": "status_tick"})
    answer = provider_answer(ProviderAnswerRow(at=at, event="status.pending", details=definitive))
    assert (answer.source, answer.status, answer.reference, answer.detail) == (
        "poll",
        "pending",
        "r-1",
        None,
    )
    assert answer.at == "2026-12-06T06:30:00+00:00"
    none = provider_answer(ProviderAnswerRow(at=at, event="recheck.unknown", details=unclear))
    assert (none.source, none.status, none.detail) == (None, "no_answer", "timeout after 10s")
