"""The reconciliation's pure parts: the alert lifecycle table, the provider disagreement
table, a provider's freeze deadline."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from contracts.providers_file import ProviderConfig, RecheckPolicy, StatusPolling
from gateway.settings import SettingsError, load_settings
from orchestrator.reconciliation import (
    ALERT_STATES,
    ALERT_TRANSITIONS,
    DEFAULT_WAIT_SECONDS,
    IllegalAlertTransition,
    ReconPolicy,
    admit,
    freeze_deadline,
    next_state,
    plan_provider_checks,
    provider_disagreement,
)
from orchestrator.store.recon import Finding, ProviderCheck


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
        # A return of a SUCCEEDED attempt is rule 6's (a return alert), not a disagreement.
        ("SUCCEEDED", "returned", None),
        ("RETURNED", "returned", None),
        ("RETURNED", "succeeded", "warning"),
        ("RETURNED", "absent", "critical"),
        ("FAILED", "returned", "critical"),  # paid (then returned) while we rolled back
        ("EXECUTING", "returned", "warning"),
    ],
)
def test_provider_disagreements(ours: str, theirs: str, severity: str | None) -> None:
    assert provider_disagreement(ours, theirs) == severity


def test_a_freeze_deadline_is_the_rechecks_the_sla_and_the_polling() -> None:
    rechecks = RecheckPolicy(
        initial_delay_seconds=1, multiplier=2, max_delay_seconds=5, max_attempts=4
    )  # 1 + 2 + 4 + 5
    base = ProviderConfig(
        base_url="http://p", webhooks=False, webhook_sla_seconds=20, recheck=rechecks
    )
    assert freeze_deadline(base) == 12 + 20
    timed = StatusPolling(interval_seconds=5, max_polls=3, timeout_seconds=8)
    assert freeze_deadline(msgspec.structs.replace(base, status_polling=timed)) == 12 + 28
    counted = StatusPolling(interval_seconds=5, max_polls=3)
    assert freeze_deadline(msgspec.structs.replace(base, status_polling=counted)) == 12 + 35
    # Neither SLA nor polling (straight to manual check), or not configured: not 0.
    bare = msgspec.structs.replace(base, webhook_sla_seconds=None)
    assert freeze_deadline(bare) == 12 + DEFAULT_WAIT_SECONDS
    default_rechecks = 1 + 2 + 4 + 8 + 16 + 32 + 60 * 4
    assert freeze_deadline(None) == default_rechecks + DEFAULT_WAIT_SECONDS


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


_NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _check(provider_id: str, state: str, age: float) -> ProviderCheck:
    return ProviderCheck(
        task_id=uuid.uuid4(),
        withdrawal_id="w",
        provider_id=provider_id,
        provider_order_id="o",
        state=state,
        since=_NOW - timedelta(seconds=age),
    )


def test_recent_finals_do_not_starve_the_attempts_in_flight() -> None:
    config = ProviderConfig(base_url="http://p", webhooks=False, webhook_sla_seconds=60)
    configs = {"busy": config, "quiet": config}
    finals = [_check("busy", "SUCCEEDED", 10) for _ in range(50)]
    stuck = [_check("busy", "MANUAL_CHECK", 3600) for _ in range(3)]
    late = [_check("busy", "EXECUTING", 120) for _ in range(3)]
    within_sla = _check("busy", "EXECUTING", 30)
    quiet = [_check("quiet", "FAILED", 10)]
    unknown = _check("gone", "MANUAL_CHECK", 3600)
    candidates = [*finals, *quiet, *stuck, *late, within_sla, unknown]

    planned = plan_provider_checks(candidates, configs, 4, _NOW)
    busy = [c for c in planned if c.provider_id == "busy"]
    assert len(busy) == 4
    assert [c.state for c in busy].count("SUCCEEDED") == 2  # half each
    assert within_sla not in planned  # its webhook may still come
    assert unknown not in planned
    assert [c for c in planned if c.provider_id == "quiet"] == quiet

    # A share one kind leaves unused goes to the other.
    only_stuck = plan_provider_checks([*stuck, *late, finals[0]], configs, 4, _NOW)
    assert [c.state for c in only_stuck].count("SUCCEEDED") == 1
    assert len(only_stuck) == 4
    only_final = plan_provider_checks([*finals, stuck[0]], configs, 5, _NOW)
    assert [c.state for c in only_final].count("SUCCEEDED") == 4
    assert plan_provider_checks(candidates, configs, 0, _NOW) == []


def _finding(rule: str, severity: str, n: int) -> Finding:
    return Finding(fingerprint=f"{rule}:{n}", rule=rule, severity=severity, summary="", evidence={})


def test_the_cap_admits_critical_findings_before_warnings() -> None:
    warnings = [_finding("stale_freeze", "warning", n) for n in range(5)]
    critical = [_finding("ledger_parity", "critical", n) for n in range(2)]
    kept, held = admit([*warnings, *critical, _finding("notification", "warning", 0)], 3)
    assert kept == [*critical, warnings[0]]
    assert held == [*warnings[1:], _finding("notification", "warning", 0)]
    assert admit(critical, 200) == (critical, [])
