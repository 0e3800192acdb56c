"""The providers file loader: its settings, their bounds and their one-line errors."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from contracts.providers_file import ProvidersFileError, StatusPolling, load_providers
from orchestrator.bus import schedule_headers
from orchestrator.domain import (
    OrderTask,
    TaskState,
    TimerFired,
    after_poll_pending,
    decide,
    recheck_delay,
)

SECRET = "whsec_dGVzdA=="


def providers_file(status_polling: dict[str, Any] | None) -> bytes:
    if status_polling is None:
        return provider_file(webhook_sla_seconds=900)
    return provider_file(webhook_sla_seconds=900, status_polling=status_polling)


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


BOUND = "must be greater than 0 and at most 31536000 (365 days)"


@pytest.mark.parametrize(
    ("status_polling", "message"),
    [
        (
            {"timeout_seconds": 0},
            f"PROVIDERS_FILE: psp_a.status_polling.timeout_seconds {BOUND}, not 0",
        ),
        (
            {"timeout_seconds": -5},
            f"PROVIDERS_FILE: psp_a.status_polling.timeout_seconds {BOUND}, not -5",
        ),
        (
            {"timeout_seconds": 1e12},
            f"PROVIDERS_FILE: psp_a.status_polling.timeout_seconds {BOUND}, not 1e+12",
        ),
        (
            {"interval_seconds": 0},
            f"PROVIDERS_FILE: psp_a.status_polling.interval_seconds {BOUND}, not 0",
        ),
        (
            {"interval_seconds": -1, "timeout_seconds": 60},
            f"PROVIDERS_FILE: psp_a.status_polling.interval_seconds {BOUND}, not -1",
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


def provider_file(**settings: Any) -> bytes:
    provider = {"base_url": "https://psp.example", "webhook_secrets": [SECRET], **settings}
    return json.dumps({"providers": {"psp_a": provider}}).encode()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"webhook_sla_seconds": 0}, f"psp_a.webhook_sla_seconds {BOUND}, not 0"),
        # Past date arithmetic: such a timer could never be armed (it used to end in the DLQ).
        ({"webhook_sla_seconds": 1e15}, f"psp_a.webhook_sla_seconds {BOUND}, not 1e+15"),
        (
            {"recheck": {"initial_delay_seconds": -1}},
            f"psp_a.recheck.initial_delay_seconds {BOUND}, not -1",
        ),
        (
            {"recheck": {"max_delay_seconds": 4e7}},
            f"psp_a.recheck.max_delay_seconds {BOUND}, not 4e+07",
        ),
        (
            {"recheck": {"initial_delay_seconds": 30, "max_delay_seconds": 10}},
            "psp_a.recheck.max_delay_seconds must be at least recheck.initial_delay_seconds",
        ),
        ({"recheck": {"multiplier": 0.5}}, "psp_a.recheck.multiplier must be at least 1"),
        ({"recheck": {"max_attempts": 0}}, "psp_a.recheck.max_attempts must be at least 1"),
        ({"timeouts": {"read_seconds": 0}}, f"psp_a.timeouts.read_seconds {BOUND}, not 0"),
        (
            {"timeouts": {"connect_seconds": -2}},
            f"psp_a.timeouts.connect_seconds {BOUND}, not -2",
        ),
        (
            {"idempotency_key_max_length": 12},
            "psp_a.idempotency_key_max_length must be at least 16",
        ),
    ],
)
def test_bad_durations_and_counts_are_refused_in_one_line(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProvidersFileError) as raised:
        load_providers(provider_file(**settings), {})
    assert str(raised.value) == f"PROVIDERS_FILE: {message}"


def test_the_longest_durations_allowed_still_arm_timers() -> None:
    year = 365 * 86400
    loaded = load_providers(
        provider_file(
            webhook_sla_seconds=year,
            status_polling={"interval_seconds": year, "timeout_seconds": year},
            recheck={"initial_delay_seconds": 1, "multiplier": 1000, "max_delay_seconds": year},
        ),
        {},
    )
    config = loaded.providers["psp_a"]
    now = datetime.now(UTC)
    executing = OrderTask(
        task_id=uuid.uuid4(),
        queue_id=uuid.uuid4(),
        position=0,
        provider_id="psp_a",
        state=TaskState.EXECUTING,
        version=3,
        provider_order_id="cg-x",
        freeze_state="frozen",
        state_entered_at=now,
    )
    # The SLA fires: the next timer is the polling deadline (SLA + timeout), the latest these
    # settings can ask for; the domain computes it and the broker's schedule header takes it.
    step = decide(executing, TimerFired("webhook_timeout", 0), config, now + timedelta(days=365))
    assert step.call == "poll"
    polled = after_poll_pending(executing, config, now + timedelta(days=365))
    assert polled.timer is not None
    assert polled.timer.due_at == now + timedelta(seconds=2 * year)
    header = schedule_headers("t", polled.timer.due_at)["Nats-Schedule"]
    assert header.startswith(f"@at {polled.timer.due_at.year}-")
    # The backoff's power overflows a float long before max_attempts could stop it: capped.
    assert recheck_delay(config, 5000) == year


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


def test_a_provider_whose_webhooks_cannot_be_verified_is_refused() -> None:
    with pytest.raises(ProvidersFileError) as raised:
        load_providers(provider_file(webhook_secrets=[]), {})
    assert str(raised.value) == (
        "PROVIDERS_FILE: psp_a has no webhook_secrets, so its webhooks could not be verified:"
        ' add its signing secrets, or set "webhooks": false if it sends none'
    )


def test_a_provider_without_webhooks_needs_no_secrets() -> None:
    loaded = load_providers(provider_file(webhook_secrets=[], webhooks=False), {})
    assert loaded.providers["psp_a"].webhooks is False
    with pytest.raises(ProvidersFileError, match="remove one of the two"):
        load_providers(provider_file(webhooks=False), {})


def test_the_readmes_providers_file_example_loads_as_it_says() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### The providers file (`PROVIDERS_FILE`)", 1)[1]
    example = section.split("```json\n", 1)[1].split("```", 1)[0]
    config = load_providers(example.encode(), {}).providers["acme_pay"]
    policy = config.retry_for("rate_limited")
    assert policy is not None
    # "tried 5 times in all, 5 s, 10 s, 20 s and 40 s apart, then the next provider"
    assert [policy.delay(n) for n in range(policy.max_attempts - 1)] == [5, 10, 20, 40]
    assert policy.then == "next_provider"
