"""The providers file loader: the status polling settings and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from contracts.providers_file import ProvidersFileError, StatusPolling, load_providers


def providers_file(status_polling: dict[str, Any] | None) -> bytes:
    provider: dict[str, Any] = {"base_url": "https://psp.example", "webhook_sla_seconds": 900}
    if status_polling is not None:
        provider["status_polling"] = status_polling
    return json.dumps({"providers": {"psp_a": provider}}).encode()


def test_timeout_seconds_is_optional_and_read_when_given() -> None:
    without = load_providers(providers_file({"interval_seconds": 60, "max_polls": 5}), {})
    assert without.providers["psp_a"].status_polling == StatusPolling(
        interval_seconds=60, max_polls=5, timeout_seconds=None
    )
    timed = load_providers(
        providers_file({"interval_seconds": 60, "max_polls": 5, "timeout_seconds": 1800}), {}
    )
    polling = timed.providers["psp_a"].status_polling
    assert polling is not None
    assert polling.timeout_seconds == 1800


@pytest.mark.parametrize(
    ("status_polling", "message"),
    [
        (
            {"timeout_seconds": 0},
            "PROVIDERS_FILE: psp_a.status_polling.timeout_seconds must be greater than 0",
        ),
        (
            {"timeout_seconds": -5},
            "PROVIDERS_FILE: psp_a.status_polling.timeout_seconds must be greater than 0",
        ),
        (
            {"interval_seconds": 0},
            "PROVIDERS_FILE: psp_a.status_polling.interval_seconds must be greater than 0",
        ),
        (
            {"interval_seconds": -1, "timeout_seconds": 60},
            "PROVIDERS_FILE: psp_a.status_polling.interval_seconds must be greater than 0",
        ),
        (
            {"max_polls": 0},
            "PROVIDERS_FILE: psp_a.status_polling.max_polls must be at least 1",
        ),
    ],
)
def test_bad_status_polling_is_refused_in_one_line(
    status_polling: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProvidersFileError) as raised:
        load_providers(providers_file(status_polling), {})
    assert str(raised.value) == message
    assert "\n" not in str(raised.value)


def test_timeout_seconds_of_the_wrong_type_is_refused_in_one_line() -> None:
    with pytest.raises(ProvidersFileError) as raised:
        load_providers(providers_file({"timeout_seconds": "30m"}), {}, source="PROVIDERS_FILE x")
    message = str(raised.value)
    assert message.startswith("PROVIDERS_FILE x: ")
    assert "status_polling.timeout_seconds" in message
    assert "\n" not in message


def test_every_shipped_sandbox_provider_has_a_polling_deadline() -> None:
    raw = (Path(__file__).resolve().parents[2] / "config" / "providers.sandbox.json").read_bytes()
    loaded = load_providers(raw, {"SANDBOX_URL": "http://sandbox.invalid"})
    for provider_id, config in loaded.providers.items():
        assert config.status_polling is not None, provider_id
        assert config.status_polling.timeout_seconds is not None, provider_id
