"""The fleet-wide breaker's pure rules (orchestrator.breaker)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from contracts.providers_file import BreakerPolicy
from orchestrator.breaker import Breaker, Window, on_probe, on_window, tripped

NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
POLICY = BreakerPolicy()  # 50 % of at least 20 calls in 60 s; open 30 s; one probe


def closed() -> Breaker:
    return Breaker(provider_id="p", changed_at=NOW - timedelta(hours=1))


def test_it_trips_on_the_share_of_technical_failures_among_enough_calls() -> None:
    assert tripped(Window(ok=10, technical=10), POLICY)
    assert not tripped(Window(ok=11, technical=9), POLICY)  # 45 %
    assert not tripped(Window(ok=0, technical=19), POLICY)  # 100 %, but 19 calls
    assert tripped(Window(ok=0, technical=20), POLICY)


def test_a_closed_breaker_opens_for_open_seconds_and_keeps_what_tripped_it() -> None:
    opened = on_window(closed(), Window(ok=5, technical=15), POLICY, NOW)
    assert opened is not None
    assert (opened.state, opened.changed_at, opened.open_until) == (
        "open",
        NOW,
        NOW + timedelta(seconds=30),
    )
    assert (opened.failure_rate, opened.calls, opened.version) == (0.75, 20, 2)
    assert (opened.change_cause, opened.changed_by) == ("tripped", None)
    assert on_window(closed(), Window(ok=15, technical=5), POLICY, NOW) is None


def test_an_open_breaker_turns_half_open_when_its_time_is_up_and_not_before() -> None:
    opened = Breaker(
        provider_id="p", state="open", changed_at=NOW, open_until=NOW + timedelta(seconds=30)
    )
    assert on_window(opened, Window(), POLICY, NOW + timedelta(seconds=29)) is None
    half = on_window(opened, Window(), POLICY, NOW + timedelta(seconds=30))
    assert half is not None
    assert (half.state, half.probe_task, half.probe_successes) == ("half_open", None, 0)
    assert half.change_cause == "open_time_up"


def test_a_half_open_breaker_ignores_its_window() -> None:
    half = Breaker(provider_id="p", state="half_open", changed_at=NOW)
    assert on_window(half, Window(technical=100), POLICY, NOW) is None


def test_the_probe_closes_it_or_opens_it_again() -> None:
    probe = uuid.uuid4()
    half = Breaker(provider_id="p", state="half_open", changed_at=NOW, probe_task=probe)
    later = NOW + timedelta(seconds=2)
    closed_again = on_probe(half, probe, False, POLICY, later)
    assert closed_again is not None
    assert (closed_again.state, closed_again.changed_at) == ("closed", later)
    assert closed_again.change_cause == "probes_succeeded"
    reopened = on_probe(half, probe, True, POLICY, later)
    assert reopened is not None
    assert (reopened.state, reopened.open_until) == ("open", later + timedelta(seconds=30))
    assert reopened.change_cause == "probe_failed"


def test_several_probes_in_a_row_must_succeed_one_at_a_time() -> None:
    policy = BreakerPolicy(half_open_probes=2)
    first, second = uuid.uuid4(), uuid.uuid4()
    half = Breaker(provider_id="p", state="half_open", changed_at=NOW, probe_task=first)
    after_one = on_probe(half, first, False, policy, NOW)
    assert after_one is not None
    assert (after_one.state, after_one.probe_task, after_one.probe_successes) == (
        "half_open",
        None,
        1,
    )
    leased = Breaker(
        provider_id="p", state="half_open", changed_at=NOW, probe_task=second, probe_successes=1
    )
    after_two = on_probe(leased, second, False, policy, NOW)
    assert after_two is not None
    assert after_two.state == "closed"


def test_an_outcome_of_an_attempt_that_is_not_the_probe_changes_nothing() -> None:
    half = Breaker(provider_id="p", state="half_open", changed_at=NOW, probe_task=uuid.uuid4())
    assert on_probe(half, uuid.uuid4(), True, POLICY, NOW) is None
    assert on_probe(closed(), uuid.uuid4(), True, POLICY, NOW) is None
