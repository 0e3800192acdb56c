"""Same-provider retries by failure class: the error table's retry policies, in the providers
file and in the pure state machine.

Only a decline at create (the provider's definitive "not created") is retried, in CREATING,
with the freeze held, on a ``retry`` timer; once the policy's creates are spent its ``then``
decides; a cancel while waiting ends the attempt at once.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from contracts.providers_file import (
    ProviderConfig,
    ProvidersFileError,
    RetryPolicy,
    load_providers,
)
from orchestrator.domain import (
    RETRY_EVENT,
    Ambiguous,
    CancelRequested,
    Changes,
    Declined,
    OrderQueue,
    OrderTask,
    QueueState,
    Start,
    TaskChange,
    TaskState,
    TimerFired,
    decide,
    decide_in_queue,
    request_cancel,
    settle,
)

T = TaskState
NOW = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
BUSY = RetryPolicy(
    decision="retry",
    max_attempts=5,
    backoff="exponential",
    base_delay_seconds=5,
    max_delay_seconds=30,
    then="next_provider",
)
CONFIG = ProviderConfig(
    base_url="http://provider.invalid",
    errors={
        "busy": BUSY,
        "busy_fixed": msgspec.structs.replace(BUSY, backoff="fixed", max_attempts=3),
        "busy_stop": msgspec.structs.replace(BUSY, max_attempts=2, then="stop_cascade"),
        "busy_review": msgspec.structs.replace(BUSY, max_attempts=2, then="manual_check"),
        "busy_once": msgspec.structs.replace(BUSY, max_attempts=1),
        "closed": "stop_cascade",
    },
)


def task(state: TaskState = T.CREATING, **changes: object) -> OrderTask:
    base = OrderTask(
        task_id=uuid.uuid4(),
        queue_id=uuid.uuid4(),
        position=0,
        provider_id="p",
        state=state,
        version=3,
        provider_order_id="cg-x",
        freeze_state="frozen",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def waiting(retries: int = 1, **changes: object) -> OrderTask:
    """A task whose create was declined ``retries`` times, waiting on its retry timer."""
    fields: dict[str, object] = {"timer_kind": "retry", "provider_code": "busy", **changes}
    state = fields.pop("state", T.CREATING)
    assert isinstance(state, TaskState)
    return task(state, create_retries=retries, **fields)


def queue_of(*tasks: OrderTask, **changes: object) -> OrderQueue:
    queue_id = tasks[0].queue_id
    placed = tuple(
        dataclasses.replace(t, queue_id=queue_id, position=i) for i, t in enumerate(tasks)
    )
    base = OrderQueue(
        queue_id=queue_id,
        withdrawal_id="w",
        state=QueueState.ACTIVE,
        version=2,
        tasks=placed,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# --- the providers file ---------------------------------------------------------------------


def provider_file(errors: dict[str, Any]) -> bytes:
    provider = {"base_url": "https://psp.example", "webhooks": False, "errors": errors}
    return json.dumps({"providers": {"psp_a": provider}}).encode()


def test_an_error_entry_is_a_decision_or_a_retry_policy() -> None:
    loaded = load_providers(
        provider_file(
            {
                "rate_limited": {
                    "decision": "retry",
                    "max_attempts": 5,
                    "backoff": "exponential",
                    "base_delay_seconds": 5,
                    "max_delay_seconds": 300,
                    "then": "stop_cascade",
                },
                "busy": {"decision": "retry"},
                "closed": "stop_cascade",
            }
        ),
        {},
    )
    config = loaded.providers["psp_a"]
    assert config.retry_for("rate_limited") == RetryPolicy(
        decision="retry",
        max_attempts=5,
        backoff="exponential",
        base_delay_seconds=5,
        max_delay_seconds=300,
        then="stop_cascade",
    )
    # The defaults: three creates in all, 1 s doubling up to 60 s, then the next provider.
    assert config.retry_for("busy") == RetryPolicy(decision="retry")
    assert config.retry_for("busy").delay(0) == 1  # type: ignore[union-attr]
    # decision_for keeps answering for every code: a retried one's decision once spent.
    assert config.decision_for("rate_limited") == "stop_cascade"
    assert config.decision_for("busy") == "next_provider"
    assert config.decision_for("closed") == "stop_cascade"
    assert config.decision_for("unknown") == "next_provider"
    assert config.retry_for("closed") is None
    assert config.retry_for("unknown") is None


def test_backoff_doubles_up_to_its_cap_or_stays_fixed() -> None:
    assert [BUSY.delay(n) for n in range(5)] == [5, 10, 20, 30, 30]
    fixed = msgspec.structs.replace(BUSY, backoff="fixed")
    assert [fixed.delay(n) for n in range(3)] == [5, 5, 5]
    assert BUSY.delay(10_000) == 30  # no float overflow


BOUND = "must be greater than 0 and at most 31536000 (365 days)"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"decision": "retry", "max_attempts": 0},
            "psp_a.errors.rl.max_attempts must be at least 1 and at most 100, not 0",
        ),
        (
            {"decision": "retry", "max_attempts": 1000},
            "psp_a.errors.rl.max_attempts must be at least 1 and at most 100, not 1000",
        ),
        (
            {"decision": "retry", "base_delay_seconds": 0},
            f"psp_a.errors.rl.base_delay_seconds {BOUND}, not 0",
        ),
        (
            {"decision": "retry", "max_delay_seconds": 1e9},
            f"psp_a.errors.rl.max_delay_seconds {BOUND}, not 1e+09",
        ),
        (
            {"decision": "retry", "base_delay_seconds": 10, "max_delay_seconds": 5},
            "psp_a.errors.rl.max_delay_seconds must be at least errors.rl.base_delay_seconds",
        ),
        (
            {"decision": "retry", "then": "retry"},
            "Invalid enum value 'retry' - at `$.providers[...].errors[...].then`",
        ),
        (
            {"decision": "retry", "backoff": "linear"},
            "Invalid enum value 'linear' - at `$.providers[...].errors[...].backoff`",
        ),
        (
            {"decision": "next_provider"},
            "Invalid enum value 'next_provider' - at `$.providers[...].errors[...].decision`",
        ),
        (
            "retry",
            "Invalid enum value 'retry' - at `$.providers[...].errors[...]` (a retry is an"
            ' object: {"decision": "retry", "max_attempts": 3, …})',
        ),
    ],
)
def test_a_bad_retry_policy_is_refused_in_one_line(entry: object, message: str) -> None:
    with pytest.raises(ProvidersFileError) as raised:
        load_providers(provider_file({"rl": entry}), {})
    assert str(raised.value) == f"PROVIDERS_FILE: {message}"


# --- a retried decline ----------------------------------------------------------------------


def test_a_retried_decline_waits_in_creating_with_its_freeze_held() -> None:
    step = decide(task(), Declined("busy"), CONFIG, NOW)
    assert (step.event, step.to, step.balance, step.call) == (RETRY_EVENT, None, None, None)
    assert step.changes == Changes(provider_code="busy", create_retries=1, freeze_state="frozen")
    assert step.timer is not None
    assert (step.timer.kind, step.timer.due_at, step.timer.attempt) == (
        "retry",
        NOW + timedelta(seconds=5),
        1,
    )


@pytest.mark.parametrize(
    ("code", "retries", "delay"),
    [("busy", 1, 10), ("busy", 2, 20), ("busy", 3, 30), ("busy_fixed", 1, 5)],
)
def test_each_retry_waits_its_backoff(code: str, retries: int, delay: float) -> None:
    step = decide(waiting(retries, timer_kind=None), Declined(code), CONFIG, NOW)
    assert step.timer is not None
    assert (step.timer.due_at, step.timer.attempt) == (NOW + timedelta(seconds=delay), retries + 1)
    assert step.changes.create_retries == retries + 1


def test_spent_retries_take_the_policys_then() -> None:
    spent = waiting(4, timer_kind=None)  # the fifth create of five, declined
    step = decide(spent, Declined("busy"), CONFIG, NOW)
    assert (step.event, step.to, step.balance, step.stop_cascade, step.timer) == (
        "create.declined",
        T.NEGATIVE_EVAL,
        "rollback",
        False,
        None,
    )
    stop = decide(waiting(1, timer_kind=None), Declined("busy_stop"), CONFIG, NOW)
    assert (stop.to, stop.balance, stop.stop_cascade) == (T.NEGATIVE_EVAL, "rollback", True)
    review = decide(waiting(1, timer_kind=None), Declined("busy_review"), CONFIG, NOW)
    assert (review.to, review.balance) == (T.MANUAL_CHECK, None)
    once = decide(task(), Declined("busy_once"), CONFIG, NOW)
    assert (once.to, once.timer) == (T.NEGATIVE_EVAL, None)


def test_only_a_decline_is_retried_never_an_ambiguous_create() -> None:
    step = decide(task(), Ambiguous("timeout", "create"), CONFIG, NOW)
    assert step.to == T.RECHECKING
    assert step.timer is not None
    assert step.timer.kind == "recheck"


def test_the_retry_timer_creates_again_in_a_transaction_of_its_own() -> None:
    """The firing is committed before the calls (``then``), as PENDING → CREATING is: a task
    waiting on a retry timer has no create in flight, which is what lets a cancel end it at
    once and roll its freeze back."""
    step = decide(waiting(2), TimerFired("retry", 2), CONFIG, NOW)
    assert (step.event, step.call, step.to, step.clear_timer, step.then) == (
        "timer.retry",
        None,
        None,
        True,
        Start(resume=False),
    )
    assert step.details == {"timer": "retry", "attempt": 2}
    calls = decide(waiting(2, timer_kind=None), Start(resume=False), CONFIG, NOW)
    assert (calls.event, calls.call, calls.record) == ("start.create", "freeze_and_create", False)


@pytest.mark.parametrize(
    "stale",
    [
        waiting(2),  # an earlier generation (fired twice: broker and sweeper)
        waiting(1, timer_kind=None),  # its create is being made again
        waiting(1, state=T.RECHECKING, timer_kind="recheck"),  # the retry's create was ambiguous
        waiting(1, state=T.EXECUTING, timer_kind="webhook_timeout"),
        waiting(1, state=T.CANCELLED, freeze_state="rolled_back", timer_kind=None),
    ],
    ids=["earlier", "creating", "rechecking", "executing", "cancelled"],
)
def test_a_stale_retry_timer_is_ignored(stale: OrderTask) -> None:
    assert decide(stale, TimerFired("retry", 1), CONFIG, NOW).ignored


def test_a_start_does_not_cut_the_backoff_short() -> None:
    for start in (Start(), Start(resume=False)):
        step = decide(waiting(1), start, CONFIG, NOW)
        assert step.ignored
        assert step.ignored_because == "waiting to retry the create"


def test_a_cancel_while_waiting_ends_the_attempt_with_its_freeze_released() -> None:
    first = waiting(1)
    queue = queue_of(first, task(T.PENDING, freeze_state="none"))
    flagged = request_cancel(queue, "merchant asked", NOW)
    # The attempt runs: the queue is only flagged, the task is told separately.
    assert flagged.finished is None
    first = flagged.queue.tasks[0]
    step = decide_in_queue(flagged.queue, first.task_id, CancelRequested(), CONFIG, NOW)
    assert (step.event, step.to, step.balance, step.call, step.clear_timer) == (
        "cancel.retry_dropped",
        T.CANCELLED,
        "rollback",
        None,
        True,
    )
    assert step.changes.outcome == "cancelled"
    transition = settle(flagged.queue, first.task_id, step, NOW)
    change = transition.changes[0]
    assert isinstance(change, TaskChange)
    assert change.purge == "retry"  # the pending schedule is cancelled
    assert change.after.timer_kind is None
    assert change.after.freeze_state == "rolled_back"
    assert transition.finished == QueueState.CANCELLED


def test_a_retry_timer_after_the_withdrawals_cancel_cancels_instead_of_creating() -> None:
    # The cancel flagged the queue, and the worker died before telling the task.
    first = waiting(1)
    queue = queue_of(first, cancel_requested=True)
    step = decide_in_queue(queue, first.task_id, TimerFired("retry", 1), CONFIG, NOW)
    assert (step.to, step.balance, step.call) == (T.CANCELLED, "rollback", None)
    stale = decide_in_queue(queue, first.task_id, TimerFired("retry", 0), CONFIG, NOW)
    assert stale.ignored


def test_a_decline_after_a_cancel_request_is_not_retried() -> None:
    step = decide(task(cancel_requested=True), Declined("busy"), CONFIG, NOW)
    assert (step.event, step.to, step.balance, step.timer) == (
        "create.declined.cancelled",
        T.CANCELLED,
        "rollback",
        None,
    )
    assert step.changes.provider_code == "busy"
