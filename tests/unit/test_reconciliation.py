"""The reconciliation's pure parts: the alert lifecycle table, the provider disagreement
table, a provider's freeze deadline."""

from __future__ import annotations

import msgspec
import pytest

from contracts.providers_file import ProviderConfig, StatusPolling
from gateway.settings import SettingsError, load_settings
from orchestrator.reconciliation import (
    ALERT_STATES,
    ALERT_TRANSITIONS,
    IllegalAlertTransition,
    ReconPolicy,
    freeze_deadline,
    next_state,
    provider_disagreement,
)


def test_the_lifecycle_moves_forward_only_and_ends_in_resolved_or_accepted() -> None:
    assert set(ALERT_TRANSITIONS) == set(ALERT_STATES)
    assert next_state("open", "ack") == "acknowledged"
    assert next_state("acknowledged", "resolve") == "resolved"
    assert next_state("open", "accept") == "accepted"
    for final in ("resolved", "accepted"):
        for action in ("ack", "resolve", "accept"):
            with pytest.raises(IllegalAlertTransition, match=f"state {final}"):
                next_state(final, action)
    with pytest.raises(IllegalAlertTransition, match="allowed: resolve, accept"):
        next_state("acknowledged", "ack")


@pytest.mark.parametrize(
    ("ours", "theirs", "severity"),
    [
        ("SUCCEEDED", "succeeded", None),
        ("SUCCEEDED", "failed", "critical"),
        ("SUCCEEDED", "absent", "critical"),
        ("SUCCEEDED", "pending", "warning"),
        ("FAILED", "succeeded", "critical"),
        ("CANCELLED", "pending", "critical"),
        ("SKIPPED", "failed", None),
        ("EXECUTING", "pending", None),
        ("EXECUTING", "succeeded", "warning"),
        ("MANUAL_CHECK", "failed", "warning"),
    ],
)
def test_provider_disagreements(ours: str, theirs: str, severity: str | None) -> None:
    assert provider_disagreement(ours, theirs) == severity


def test_a_freeze_deadline_is_the_sla_plus_the_polling() -> None:
    base = ProviderConfig(base_url="http://p", webhooks=False, webhook_sla_seconds=20)
    assert freeze_deadline(base) == 20
    timed = StatusPolling(interval_seconds=5, max_polls=3, timeout_seconds=8)
    assert freeze_deadline(msgspec.structs.replace(base, status_polling=timed)) == 28
    counted = StatusPolling(interval_seconds=5, max_polls=3)
    assert freeze_deadline(msgspec.structs.replace(base, status_polling=counted)) == 35
    assert freeze_deadline(None) == 0


def test_the_recon_settings_default_and_refuse_bad_values() -> None:
    assert load_settings({}).recon == ReconPolicy()
    tuned = load_settings({"RECON_INTERVAL_SECONDS": "60", "RECON_LEDGER_BUDGET": "0"}).recon
    assert (tuned.interval, tuned.ledger_budget) == (60, 0)
    for name, value in (
        ("RECON_INTERVAL_SECONDS", "0"),
        ("RECON_WINDOW_SECONDS", "soon"),
        ("RECON_MAX_NEW_ALERTS", "0"),
        ("RECON_PROVIDER_BUDGET", "-1"),
    ):
        with pytest.raises(SettingsError, match=name):
            load_settings({name: value})
