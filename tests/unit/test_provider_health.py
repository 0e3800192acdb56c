"""Provider health in the engine, on fakes: which attempt starts when a breaker is open or
half-open, holding a withdrawal whose every remaining provider is open, and the fleet-wide
rate and in-flight limits (the fakes keep them as Postgres does: tests/unit/fakes.py).

The money-safety invariants of ``test_engine`` hold after every scenario: one live attempt at
a time, one commit at most, every freeze settled, an audit row per write.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from contracts.providers_file import BreakerPolicy, ProviderConfig, RateLimit
from orchestrator.breaker import Breaker
from orchestrator.domain import Ambiguous, Declined, OrderQueue, ProviderAnswer, public_state
from tests.unit.test_engine import (
    CONFIGS,
    NOW,
    Harness,
    Q,
    T,
    _config,
    accepted,
    check_money_safety,
    harness,
    paid,
)

HEALTH_CONFIGS: dict[str, ProviderConfig] = {
    **CONFIGS,
    "p_slot": _config("p_slot", max_in_flight=1),
    "p_rate": _config("p_rate", rate_limit=RateLimit(per_second=1, burst=1)),
    "p_hold": _config("p_hold", hold_seconds=120),
    "p_nobreaker": _config("p_nobreaker", breaker=None),
}


def health_harness() -> Harness:
    return harness(HEALTH_CONFIGS)


def open_breaker(h: Harness, provider_id: str, seconds: float = 30) -> None:
    h.engine.health.seen(
        Breaker(
            provider_id=provider_id,
            state="open",
            changed_at=h.clock(),
            open_until=h.clock() + timedelta(seconds=seconds),
        )
    )


def half_open(h: Harness, provider_id: str) -> None:
    h.engine.health.seen(Breaker(provider_id=provider_id, state="half_open", changed_at=h.clock()))


def close_breaker(h: Harness, provider_id: str) -> None:
    h.engine.health.seen(Breaker(provider_id=provider_id, state="closed", changed_at=h.clock()))


def details(h: Harness, queue: OrderQueue, position: int, event: str) -> dict[str, object]:
    task = h.task(queue, position)
    found = [e.details for e in h.store.audit if e.task_id == task.task_id and e.event == event]
    assert found, (event, h.events(task))
    return dict(found[-1])


async def test_an_open_provider_is_passed_over_and_comes_back_when_it_closes() -> None:
    h = health_harness()
    open_breaker(h, "p_a")
    queue = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_b", Declined("declined"))
    await h.start(queue)
    # p_b went first and declined.
    assert h.states(queue) == (Q.ACTIVE, (T.PENDING, T.SKIPPED))
    assert details(h, queue, 0, "start.passed_over")["reason"] == "breaker_open"
    # p_a's turn comes again, but it is still open: the queue holds.
    await h.start(queue)
    held = details(h, queue, 0, "start.held")
    assert held["until"] == (NOW + timedelta(seconds=30)).isoformat()
    assert [kind for kind, _, _ in h.armed(h.task(queue, 0))] == ["hold"]
    # It closes; the hold fires as the task's start, and p_a carries the attempt.
    h.clock.advance(30)
    close_breaker(h, "p_a")
    h.providers.on_create("p_a", paid())
    await h.start(queue, seen=False)
    assert h.states(queue) == (Q.COMPLETED, (T.SUCCEEDED, T.SKIPPED))
    check_money_safety(h)


async def test_a_passed_over_task_cannot_be_started_while_another_runs() -> None:
    h = health_harness()
    open_breaker(h, "p_a")
    queue = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_b", accepted())
    await h.start(queue)
    assert h.states(queue) == (Q.ACTIVE, (T.PENDING, T.EXECUTING))
    # A start for p_a (replayed from the DLQ, the sweeper, its closed breaker): ignored.
    close_breaker(h, "p_a")
    await h.start(queue, seen=False)
    assert h.states(queue) == (Q.ACTIVE, (T.PENDING, T.EXECUTING))
    assert h.creates() == [h.task(queue, 1).provider_order_id]
    await h.webhook(h.task(queue, 1), "succeeded")
    assert h.states(queue) == (Q.COMPLETED, (T.SKIPPED, T.SUCCEEDED))
    check_money_safety(h)


async def test_a_withdrawal_held_past_hold_seconds_makes_its_next_attempt_anyway() -> None:
    h = health_harness()
    open_breaker(h, "p_hold", seconds=600)
    queue = h.withdrawal("p_hold")
    await h.start(queue)
    assert h.states(queue) == (Q.ACTIVE, (T.PENDING,))
    # Held until the breaker may turn half-open, at the latest hold_seconds after creation.
    assert details(h, queue, 0, "start.held")["until"] == (NOW + timedelta(seconds=120)).isoformat()
    h.clock.advance(120)
    h.providers.on_create("p_hold", Ambiguous("HTTP 503 at create", "create"))
    await h.start(queue, seen=False)
    # The usual rules from here: an ambiguous create is rechecked, never failed.
    assert h.states(queue) == (Q.ACTIVE, (T.RECHECKING,))
    assert "start.hold_expired" in h.events(h.task(queue))
    check_money_safety(h, scripts_used=False)


async def test_a_half_open_provider_takes_one_probe_and_passes_the_others_over() -> None:
    h = health_harness()
    half_open(h, "p_a")
    first, second = h.withdrawal("p_a", "p_b"), h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", accepted())
    await h.start(first)
    assert "start.probe" in h.events(h.task(first))
    h.providers.on_create("p_b", accepted())
    await h.start(second)
    assert details(h, second, 0, "start.passed_over")["reason"] == "breaker_half_open"
    assert h.states(second) == (Q.ACTIVE, (T.PENDING, T.EXECUTING))
    check_money_safety(h)


async def test_an_attempt_in_flight_is_never_touched_by_its_breaker() -> None:
    h = health_harness()
    queue = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", accepted())
    await h.start(queue)
    open_breaker(h, "p_a")
    await h.webhook(h.task(queue), "succeeded")
    assert h.states(queue) == (Q.COMPLETED, (T.SUCCEEDED, T.SKIPPED))
    check_money_safety(h)


async def test_without_a_breaker_the_cascade_order_is_followed() -> None:
    h = health_harness()
    queue = h.withdrawal("p_nobreaker")
    h.providers.on_create("p_nobreaker", paid())
    await h.start(queue)
    assert h.states(queue) == (Q.COMPLETED, (T.SUCCEEDED,))
    check_money_safety(h)


async def test_an_attempt_waits_for_an_in_flight_slot_and_is_never_failed_for_it() -> None:
    h = health_harness()
    first, second = h.withdrawal("p_slot", "p_b"), h.withdrawal("p_slot", "p_b")
    h.providers.on_create("p_slot", Ambiguous("read timeout", "create"))
    await h.start(first)
    assert h.states(first) == (Q.ACTIVE, (T.RECHECKING, T.PENDING))
    await h.start(second)
    # Not passed over to p_b: a limit is a queue, not an outage.
    assert h.states(second) == (Q.ACTIVE, (T.PENDING, T.PENDING))
    waiting = details(h, second, 0, "start.waiting")
    assert waiting["providers"] == [
        {
            "provider_id": "p_slot",
            "gate": "wait",
            "reason": "in_flight",
            "retry_at": (NOW + timedelta(seconds=1)).isoformat(),
        }
    ]
    # The first order is proven: the slot frees, the second starts when its hold fires.
    h.providers.on_status("p_slot", accepted())
    await h.fire(h.task(first), "recheck")
    assert h.states(first) == (Q.ACTIVE, (T.EXECUTING, T.PENDING))
    h.clock.advance(1)
    h.providers.on_create("p_slot", accepted())
    await h.start(second, seen=False)
    assert h.states(second) == (Q.ACTIVE, (T.EXECUTING, T.PENDING))
    check_money_safety(h)


async def test_a_rate_limited_start_beyond_the_horizon_waits_on_its_hold_timer() -> None:
    h = health_harness()
    queues = [h.withdrawal("p_rate") for _ in range(3)]
    h.providers.on_create("p_rate", accepted(), accepted())
    await h.start(queues[0])  # the slot now
    await h.start(queues[1])  # the slot 1 s on: taken, paced in-process
    await h.start(queues[2])  # 2 s on: beyond the 1 s horizon, nothing taken
    assert [h.states(q)[1] for q in queues] == [(T.EXECUTING,), (T.EXECUTING,), (T.PENDING,)]
    waiting = details(h, queues[2], 0, "start.waiting")
    assert waiting["until"] == (NOW + timedelta(seconds=1)).isoformat()
    check_money_safety(h)


async def test_cancelling_a_held_withdrawal_cancels_its_hold() -> None:
    h = health_harness()
    open_breaker(h, "p_a")
    queue = h.withdrawal("p_a")
    await h.start(queue)
    await h.cancel(queue)
    assert h.states(queue) == (Q.CANCELLED, (T.CANCELLED,))
    assert h.purged(h.task(queue)) == ["hold"]
    check_money_safety(h)


@pytest.mark.parametrize("state", ["open", "half_open"])
def test_only_a_closed_breaker_lets_a_start_skip_the_gate(state: str) -> None:
    h = health_harness()
    assert h.engine.health.unguarded("p_a")
    assert not h.engine.health.unguarded("p_slot")
    assert not h.engine.health.unguarded("p_rate")
    open_breaker(h, "p_a") if state == "open" else half_open(h, "p_a")
    assert not h.engine.health.unguarded("p_a")


def test_breaker_policy_defaults_are_the_documented_ones() -> None:
    assert HEALTH_CONFIGS["p_a"].breaker == BreakerPolicy(
        failure_rate=0.5, min_calls=20, window_seconds=60, open_seconds=30, half_open_probes=1
    )
    assert HEALTH_CONFIGS["p_a"].hold_seconds == 900


async def test_a_limit_wait_outlasts_hold_seconds_and_asks_less_often() -> None:
    h = health_harness()
    first = h.withdrawal("p_slot", "p_b")
    h.providers.on_create("p_slot", Ambiguous("read timeout", "create"))
    await h.start(first)
    second = h.withdrawal("p_slot", "p_b")
    h.clock.advance(901)  # past p_slot's hold_seconds, counted from the second's creation
    await h.start(second)
    assert h.states(second) == (Q.ACTIVE, (T.PENDING, T.PENDING))
    waiting = details(h, second, 0, "start.waiting")
    # A quarter of the wait so far, at most 15 s: not capped by the hold, not a 1 s loop.
    assert waiting["until"] == (h.clock() + timedelta(seconds=15)).isoformat()
    check_money_safety(h, scripts_used=False)


async def test_a_half_open_provider_with_no_free_slot_is_passed_over_not_waited_for() -> None:
    h = health_harness()
    stuck = h.withdrawal("p_slot")
    h.providers.on_create("p_slot", Ambiguous("read timeout", "create"))
    await h.start(stuck)
    half_open(h, "p_slot")
    queue = h.withdrawal("p_slot", "p_b")
    h.providers.on_create("p_b", accepted())
    await h.start(queue)
    assert h.states(queue) == (Q.ACTIVE, (T.PENDING, T.EXECUTING))
    assert details(h, queue, 0, "start.passed_over")["reason"] == "breaker_half_open"
    assert h.store.probes == {}  # no lease taken for an attempt that could not go
    check_money_safety(h, scripts_used=False)


async def test_the_public_view_shows_the_last_attempt_made_not_the_last_in_cascade_order() -> None:
    h = health_harness()
    open_breaker(h, "p_a")
    queue = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_b", accepted("ref-b"))
    await h.start(queue)  # p_a passed over, p_b accepts...
    h.clock.advance(1)
    await h.webhook(h.task(queue, 1), "failed", reference="ref-b")  # ...and fails: declined
    h.clock.advance(30)
    close_breaker(h, "p_a")
    h.providers.on_create("p_a", accepted("ref-a"))
    await h.start(queue)
    view = public_state(h.queue(queue))
    assert (view.status, view.provider_id, view.provider_reference) == (
        "processing",
        "p_a",
        "ref-a",
    )
    h.clock.advance(60)
    await h.fire(h.task(queue), "webhook_timeout")
    h.providers.on_status("p_a", ProviderAnswer(status="failed", reference="ref-a"))
    await h.resolve(h.task(queue), positive=False)
    view = public_state(h.queue(queue))
    # The last attempt made was p_a's, after p_b's: its outcome is the withdrawal's.
    assert (view.status, view.provider_id, view.failure_code) == (
        "failed",
        "p_a",
        "manual_rejected",
    )
    check_money_safety(h)


async def test_each_start_publication_has_an_id_of_its_own() -> None:
    """A task started again after a pass-over must not look like a duplicate of its first
    start to the broker's deduplication window."""
    h = health_harness()
    open_breaker(h, "p_a")
    queue = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_b", Declined("declined"))
    await h.start(queue)
    ids = [m.headers["Nats-Msg-Id"] for m in h.store.published if m.subject.endswith("task.start")]
    first_id = h.engine.start_message(queue, queue.tasks[0]).headers["Nats-Msg-Id"]
    assert ids, "no start published for p_a after p_b's decline"
    assert first_id not in ids
    assert len(set(ids)) == len(ids)
