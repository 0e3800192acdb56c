"""An operator's override of a breaker (orchestrator.breaker.forced), and what the workers'
rules make of it next."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from contracts.providers_file import BreakerPolicy
from orchestrator.breaker import Breaker, Window, forced, on_probe, on_window

NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
POLICY = BreakerPolicy()
PROBE = uuid.uuid4()


def half_open() -> Breaker:
    return Breaker(
        provider_id="p",
        state="half_open",
        changed_at=NOW - timedelta(minutes=1),
        probe_task=PROBE,
        probe_until=NOW + timedelta(seconds=10),
        probe_successes=1,
        version=7,
    )


def test_open_by_hand_drains_until_its_time_then_the_usual_probe_follows() -> None:
    window = Window(ok=3, technical=1)
    opened = forced(
        half_open(), "open", NOW, window, operator="ops:kim", reason="PSP maintenance",
        open_seconds=600,
    )  # fmt: skip
    assert (opened.state, opened.changed_at, opened.open_until) == (
        "open",
        NOW,
        NOW + timedelta(seconds=600),
    )
    # The probe lease is dropped: its outcome no longer decides anything.
    assert (opened.probe_task, opened.probe_until, opened.probe_successes) == (None, None, 0)
    assert (opened.failure_rate, opened.calls, opened.version) == (0.25, 4, 8)
    assert (opened.change_cause, opened.changed_by, opened.change_reason) == (
        "operator",
        "ops:kim",
        "PSP maintenance",
    )
    assert on_probe(opened, PROBE, False, POLICY, NOW) is None
    assert on_window(opened, Window(), POLICY, NOW + timedelta(seconds=599)) is None
    later = on_window(opened, Window(), POLICY, NOW + timedelta(seconds=600))
    assert later is not None
    # The breaker's own transition afterwards: its cause, and no operator any more.
    assert (later.state, later.change_cause, later.changed_by, later.change_reason) == (
        "half_open",
        "open_time_up",
        None,
        None,
    )


def test_close_by_hand_restarts_the_window_and_stays_closed_on_old_failures() -> None:
    tripping = Window(ok=0, technical=40)
    closed = forced(half_open(), "closed", NOW, tripping, operator="ops:kim", reason="fixed")
    assert (closed.state, closed.changed_at, closed.open_until, closed.probe_task) == (
        "closed",
        NOW,
        None,
        None,
    )
    # Its window now counts from NOW (store.breakers.load_breakers): a fresh one, empty.
    assert on_window(closed, Window(), POLICY, NOW + timedelta(seconds=1)) is None
