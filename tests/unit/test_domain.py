"""The pure state machine: its tables, and properties over random event sequences.

The simulation below drives ``decide_in_queue``/``settle``/``request_cancel`` the way the
engine does (balance call before the state change, calls answered by the provider, a crash
between the calls and their record), with a model ledger, and checks the money-safety
invariants after every step.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.providers_file import ProviderConfig, RetryPolicy, StatusPolling, load_providers
from orchestrator.domain import (
    FINAL_QUEUE_STATES,
    FINAL_TASK_STATES,
    NO_CHANGES,
    QUEUE_TRANSITIONS,
    TASK_TRANSITIONS,
    Ambiguous,
    CancelRequested,
    Changes,
    Declined,
    Event,
    FreezeCommitted,
    FreezeRefused,
    FreezeRolledBack,
    IllegalTransition,
    OrderQueue,
    OrderTask,
    Outcome,
    ProviderAnswer,
    ProviderChecked,
    QueueState,
    Resolve,
    Start,
    Step,
    TaskChange,
    TaskState,
    Timer,
    TimerFired,
    TimerKind,
    Transition,
    after_poll_pending,
    apply_changes,
    decide,
    decide_in_queue,
    public_state,
    request_cancel,
    settle,
    transition_table,
)

T = TaskState
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
CONFIG = ProviderConfig(
    base_url="http://provider.invalid",
    webhook_sla_seconds=60,
    status_polling=StatusPolling(interval_seconds=5, max_polls=2),
    errors={"closed": "stop_cascade", "slow": "recheck", "review": "manual_check"},
)
NO_SLA = msgspec.structs.replace(CONFIG, webhook_sla_seconds=None, status_polling=None)
# Polling with a deadline: the SLA expires at +60 s, polling ends at +72 s at the latest.
TIMED = msgspec.structs.replace(
    CONFIG, status_polling=StatusPolling(interval_seconds=5, max_polls=10, timeout_seconds=12)
)
# No SLA: polling starts when EXECUTING is entered and ends 12 s later at the latest.
POLL_ONLY = msgspec.structs.replace(TIMED, webhook_sla_seconds=None)
# "busy" is created again at the same provider, three creates in all.
RETRYING = msgspec.structs.replace(
    CONFIG,
    errors={**CONFIG.errors, "busy": RetryPolicy(decision="retry", max_attempts=3)},
)

DESIGN_EDGES = {
    (T.PENDING, T.CREATING),
    (T.CREATING, T.EXECUTING),
    (T.EXECUTING, T.SUCCEEDED),
    (T.CREATING, T.NEGATIVE_EVAL),
    (T.NEGATIVE_EVAL, T.SKIPPED),
    (T.CREATING, T.RECHECKING),
    (T.RECHECKING, T.EXECUTING),
    (T.RECHECKING, T.FAILED),
    (T.EXECUTING, T.MANUAL_CHECK),
    (T.MANUAL_CHECK, T.SUCCEEDED),
    (T.MANUAL_CHECK, T.FAILED),
}


def task(state: TaskState = T.PENDING, **changes: object) -> OrderTask:
    base = OrderTask(
        task_id=uuid.uuid4(),
        queue_id=uuid.uuid4(),
        position=0,
        provider_id="p",
        state=state,
        version=1,
        provider_order_id="cg-x",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_tables_cover_every_state_and_finals_have_no_exit() -> None:
    assert set(TASK_TRANSITIONS) == set(TaskState)
    assert set(QUEUE_TRANSITIONS) == set(QueueState)
    assert {T.SUCCEEDED, T.SKIPPED, T.FAILED, T.CANCELLED, T.RETURNED} == FINAL_TASK_STATES
    # The one exit from a final state: a paid order returned by its provider.
    exits = {(a, b) for a in FINAL_TASK_STATES for b in TASK_TRANSITIONS[a]}
    assert exits == {(T.SUCCEEDED, T.RETURNED)}
    assert {QueueState.COMPLETED, QueueState.FAILED, QueueState.CANCELLED} == FINAL_QUEUE_STATES


def test_every_edge_of_the_design_is_allowed() -> None:
    allowed = {(a, b) for a, targets in TASK_TRANSITIONS.items() for b in targets}
    assert allowed >= DESIGN_EDGES
    # "any non-final → CANCELLED" except where a provider may not be asked yet to stop.
    for state in (T.PENDING, T.EXECUTING, T.RECHECKING, T.MANUAL_CHECK):
        assert T.CANCELLED in TASK_TRANSITIONS[state]


def test_transition_table_prints_every_state() -> None:
    text = transition_table()
    assert all(state.value in text for state in TaskState)
    assert "OrderQueue:" in text


def test_final_tasks_ignore_everything() -> None:
    events: list[Event] = [
        Start(),
        ProviderAnswer("succeeded", "r"),
        TimerFired("recheck", 0),
        Resolve(positive=True, reason="x", actor="a"),
        CancelRequested(),
        Declined("declined"),
        Ambiguous("x", "create"),
        FreezeRefused("x"),
        FreezeRolledBack(),
        FreezeCommitted(),
    ]
    for state in FINAL_TASK_STATES:
        for event in events:
            assert decide(task(state), event, CONFIG, NOW).ignored


RETURNED = ProviderAnswer("returned", "r", code="R01", source="webhook")


@pytest.mark.parametrize("source", ["webhook", "poll"])
def test_a_verified_return_moves_a_succeeded_attempt_to_returned(source: str) -> None:
    paid = task(T.SUCCEEDED, freeze_state="committed", provider_reference="r")
    answer = dataclasses.replace(RETURNED, source=source)  # type: ignore[arg-type]
    step = decide(paid, answer, CONFIG, NOW)
    assert (step.event, step.to) == (f"{source}.returned", T.RETURNED)
    assert step.balance is None, "cascade-core has no reversal: no balance call"
    assert (step.call, step.timer, step.then) == (None, None, None)
    assert step.changes == Changes(provider_code="R01")
    assert step.details["provider_status"] == "returned"
    queue = OrderQueue(
        queue_id=paid.queue_id,
        withdrawal_id="w",
        state=QueueState.COMPLETED,
        version=3,
        tasks=(paid,),
    )
    transition = settle(queue, paid.task_id, step, NOW)
    (change,) = transition.changes
    assert isinstance(change, TaskChange)
    assert change.after.state == T.RETURNED
    assert change.after.freeze_state == "committed"
    assert transition.queue.state == QueueState.COMPLETED
    assert (transition.finished, transition.start) == (None, None)
    public = public_state(transition.queue)
    assert (public.status, public.provider_reference) == ("succeeded", "r")


# A return told about an attempt still in flight: the provider paid, then the money came back.
_IN_FLIGHT_RETURNS = {
    (T.CREATING, "create"),
    (T.RECHECKING, "webhook"),
    (T.RECHECKING, "poll"),
    (T.EXECUTING, "webhook"),
    (T.EXECUTING, "poll"),
}


@pytest.mark.parametrize(
    ("state", "source"),
    [
        (state, source)
        for state in TaskState
        for source in ("webhook", "poll", "create", "cancel")
        if state != T.SUCCEEDED and (state, source) not in _IN_FLIGHT_RETURNS
    ],
)
def test_a_return_for_any_other_attempt_changes_nothing(state: TaskState, source: str) -> None:
    answer = dataclasses.replace(RETURNED, source=source)  # type: ignore[arg-type]
    step = decide(task(state, freeze_state="frozen"), answer, CONFIG, NOW)
    assert step.ignored, (state, source, step)
    assert step.balance is None


@pytest.mark.parametrize(("state", "source"), sorted(_IN_FLIGHT_RETURNS))
def test_a_return_for_an_attempt_in_flight_waits_for_a_person_with_the_freeze_held(
    state: TaskState, source: str
) -> None:
    """Not FAILED (the provider paid), not SUCCEEDED (the money came back): a person
    decides, and its timer chain ends here instead of waiting for an answer that came."""
    answer = dataclasses.replace(RETURNED, source=source)  # type: ignore[arg-type]
    step = decide(task(state, freeze_state="frozen"), answer, CONFIG, NOW)
    assert (step.to, step.balance, step.clear_timer) == (T.MANUAL_CHECK, None, True)
    assert step.changes.provider_code == RETURNED.code


def test_a_return_told_by_the_create_or_a_cancel_does_not_move_a_succeeded_attempt() -> None:
    paid = task(T.SUCCEEDED, freeze_state="committed")
    for source in ("create", "cancel"):
        answer = dataclasses.replace(RETURNED, source=source)
        assert decide(paid, answer, CONFIG, NOW).ignored


def test_returned_is_final() -> None:
    returned = task(T.RETURNED, freeze_state="committed")
    for event in (RETURNED, ProviderAnswer("succeeded", "r", source="webhook"), Start()):
        assert decide(returned, event, CONFIG, NOW).ignored


def test_a_negative_decision_is_not_confirmed_by_a_returned_order() -> None:
    waiting = task(T.MANUAL_CHECK, freeze_state="frozen", provider_reference="r")
    resolve = Resolve(positive=False, reason="r", actor="a")
    answer = ProviderAnswer("returned", "r", code="R01", source="poll")
    step = decide(waiting, ProviderChecked(resolve=resolve, answer=answer), CONFIG, NOW)
    assert step.to is None
    assert step.balance is None
    assert step.refusal is not None
    assert step.refusal.code == "provider_unreachable"
    unverified = dataclasses.replace(resolve, unverified=True)
    step = decide(waiting, ProviderChecked(resolve=unverified, answer=answer), CONFIG, NOW)
    assert (step.to, step.balance) == (T.FAILED, "rollback")  # on the operator's word only


def test_a_start_records_a_resume_but_not_its_own_continuation() -> None:
    creating = task(T.CREATING)
    resumed = decide(creating, Start(), CONFIG, NOW)
    assert (resumed.event, resumed.call, resumed.record) == (
        "start.resume",
        "freeze_and_create",
        True,
    )
    continued = decide(creating, Start(resume=False), CONFIG, NOW)
    assert (continued.to, continued.call, continued.record) == (None, "freeze_and_create", False)
    assert continued.changes == NO_CHANGES
    pending = task(T.PENDING)
    assert decide(pending, Start(resume=False), CONFIG, NOW) == decide(
        pending, Start(), CONFIG, NOW
    )


def test_ambiguous_create_rechecks_and_never_fails() -> None:
    step = decide(
        task(T.CREATING, freeze_state="frozen"), Ambiguous("timeout", "create"), CONFIG, NOW
    )
    assert step.to == T.RECHECKING
    assert step.balance is None
    assert step.timer is not None
    assert step.timer.kind == "recheck"
    exhausted = after_poll_pending(task(T.RECHECKING, recheck_attempts=9), CONFIG, NOW)
    assert exhausted.to == T.MANUAL_CHECK


def test_error_table_decides_declines() -> None:
    creating = task(T.CREATING, freeze_state="frozen")
    assert decide(creating, Declined("declined"), CONFIG, NOW).to == T.NEGATIVE_EVAL
    stop = decide(creating, Declined("closed"), CONFIG, NOW)
    assert (stop.to, stop.stop_cascade, stop.balance) == (T.NEGATIVE_EVAL, True, "rollback")
    assert decide(creating, Declined("slow"), CONFIG, NOW).to == T.RECHECKING
    assert decide(creating, Declined("review"), CONFIG, NOW).to == T.MANUAL_CHECK


def test_no_sla_and_no_polling_means_manual_check() -> None:
    step = decide(
        task(T.CREATING, freeze_state="frozen"), ProviderAnswer("pending", "r"), NO_SLA, NOW
    )
    assert step.to == T.MANUAL_CHECK


def test_stale_timers_are_ignored() -> None:
    executing = task(T.EXECUTING, status_polls=1)
    assert decide(executing, TimerFired("webhook_timeout", 0), CONFIG, NOW).ignored
    assert decide(executing, TimerFired("status_tick", 0), CONFIG, NOW).ignored
    assert decide(
        task(T.RECHECKING, recheck_attempts=2), TimerFired("recheck", 1), CONFIG, NOW
    ).ignored


# --- the status polling deadline (status_polling.timeout_seconds) ----------------------


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def polling(state: TaskState = T.EXECUTING, polls: int = 0, **changes: object) -> OrderTask:
    """A task that entered EXECUTING at NOW and has been polled ``polls`` times."""
    fields: dict[str, object] = {"freeze_state": "frozen", "state_entered_at": NOW, **changes}
    return task(state, status_polls=polls, **fields)


def test_a_poll_before_the_deadline_arms_a_tick() -> None:
    step = after_poll_pending(polling(polls=1), TIMED, at(65))
    assert step.timer is not None
    assert (step.event, step.to, step.changes) == ("status.pending", None, Changes(status_polls=2))
    assert (step.timer.kind, step.timer.due_at, step.timer.attempt) == ("status_tick", at(70), 2)


@pytest.mark.parametrize("poll_at", [67, 70, 71.9])
def test_the_deadline_is_armed_instead_of_a_tick_at_or_after_it(poll_at: float) -> None:
    step = after_poll_pending(polling(polls=2), TIMED, at(poll_at))
    assert step.timer is not None
    assert (step.event, step.to, step.changes) == ("status.pending", None, Changes(status_polls=3))
    # Due at the deadline itself (SLA expiry + timeout_seconds), not at the tick's time.
    assert (step.timer.kind, step.timer.due_at, step.timer.attempt) == ("status_timeout", at(72), 3)


def test_the_deadline_firing_moves_to_manual_check() -> None:
    executing = polling(polls=3)
    step = decide(executing, TimerFired("status_timeout", 3), TIMED, at(72))
    assert (step.event, step.to, step.clear_timer) == ("status.timeout", T.MANUAL_CHECK, True)
    # Not a failure: the provider may still pay; no balance call, nothing more to ask.
    assert (step.balance, step.call, step.timer, step.changes) == (None, None, None, NO_CHANGES)
    assert apply_changes(executing, step).freeze_state == "frozen"


@pytest.mark.parametrize(
    "executing",
    [
        polling(polls=3),  # a generation that never was armed
        polling(polls=1),  # an earlier generation
        polling(T.MANUAL_CHECK, polls=2),  # moved on already (e.g. this very timer, twice)
        polling(T.SUCCEEDED, polls=2, freeze_state="committed"),
        polling(T.FAILED, polls=2, freeze_state="rolled_back"),
        polling(T.CANCELLED, polls=2, freeze_state="rolled_back"),
        polling(T.RECHECKING, polls=2),
    ],
    ids=["future", "earlier", "manual", "succeeded", "failed", "cancelled", "rechecking"],
)
def test_a_stale_deadline_is_ignored(executing: OrderTask) -> None:
    assert decide(executing, TimerFired("status_timeout", 2), TIMED, at(100)).ignored


@pytest.mark.parametrize("poll_at", [72, 95])
def test_a_poll_at_or_past_the_deadline_goes_to_manual_check_at_once(poll_at: float) -> None:
    step = after_poll_pending(polling(polls=2), TIMED, at(poll_at))
    assert (step.event, step.to, step.changes) == (
        "status.timeout",
        T.MANUAL_CHECK,
        Changes(status_polls=3),
    )
    assert (step.timer, step.clear_timer, step.balance) == (None, True, None)


def test_max_polls_still_bounds_polling_before_the_deadline() -> None:
    few = msgspec.structs.replace(
        TIMED, status_polling=StatusPolling(interval_seconds=5, max_polls=2, timeout_seconds=12)
    )
    step = after_poll_pending(polling(polls=1), few, at(65))
    assert (step.event, step.to) == ("status.exhausted", T.MANUAL_CHECK)


@pytest.mark.parametrize("poll_at", [65, 70, 500])
def test_without_timeout_seconds_polling_is_unchanged(poll_at: float) -> None:
    """CONFIG has no timeout_seconds: ticks every interval until max_polls, however long."""
    step = after_poll_pending(polling(polls=0), CONFIG, at(poll_at))
    assert step == Step(
        event="status.pending",
        changes=Changes(status_polls=1),
        timer=Timer(kind="status_tick", due_at=at(poll_at + 5), attempt=1),
    )
    exhausted = after_poll_pending(polling(polls=1), CONFIG, at(poll_at))
    assert (exhausted.event, exhausted.to) == ("status.exhausted", T.MANUAL_CHECK)


def test_without_a_known_entry_time_polling_falls_back_to_plain_ticks() -> None:
    unknown = polling(polls=2, state_entered_at=None)
    step = after_poll_pending(unknown, TIMED, at(500))
    assert step.timer is not None
    assert (step.event, step.timer.kind, step.timer.due_at) == (
        "status.pending",
        "status_tick",
        at(505),
    )


def test_with_an_sla_entering_executing_still_waits_for_the_webhook_first() -> None:
    step = decide(
        task(T.CREATING, freeze_state="frozen"), ProviderAnswer("pending", "r"), TIMED, NOW
    )
    assert step.timer == Timer(kind="webhook_timeout", due_at=at(60), attempt=0)


@pytest.mark.parametrize(
    ("timeout", "first"),
    [
        (12, Timer(kind="status_tick", due_at=at(5), attempt=0)),
        (5, Timer(kind="status_timeout", due_at=at(5), attempt=0)),
        (3, Timer(kind="status_timeout", due_at=at(3), attempt=0)),
    ],
)
def test_without_an_sla_the_deadline_counts_from_entering_executing(
    timeout: float, first: Timer
) -> None:
    config = msgspec.structs.replace(
        POLL_ONLY,
        status_polling=StatusPolling(interval_seconds=5, max_polls=10, timeout_seconds=timeout),
    )
    for creating in (task(T.CREATING, freeze_state="frozen"), task(T.RECHECKING)):
        answer = ProviderAnswer(
            "pending", "r", source="create" if creating.state == T.CREATING else "poll"
        )
        step = decide(creating, answer, config, NOW)
        assert (step.to, step.timer) == (T.EXECUTING, first)


def silent_provider(config: ProviderConfig) -> list[tuple[float, str]]:
    """Drive one order the provider never answers for, the way the engine does: enter
    EXECUTING at NOW, fire each armed timer at its due time, every poll finds it pending.
    Returns (seconds after NOW, event) for each recorded step."""
    current = task(T.CREATING, freeze_state="frozen")
    step = decide(current, ProviderAnswer("pending", "r"), config, NOW)
    current = dataclasses.replace(apply_changes(current, step), state_entered_at=NOW)
    trail = [(0.0, step.event)]
    while step.timer is not None or step.call is not None:
        assert step.timer is not None
        now = step.timer.due_at
        fired = decide(current, TimerFired(step.timer.kind, step.timer.attempt), config, now)
        assert not fired.ignored, fired
        step = fired
        if fired.call == "poll":
            step = after_poll_pending(current, config, now)
        current = apply_changes(current, step)
        trail.append(((now - NOW).total_seconds(), step.event))
        assert len(trail) < 100
    assert current.state == T.MANUAL_CHECK
    return trail


def test_a_silent_provider_is_polled_until_the_deadline() -> None:
    assert silent_provider(TIMED) == [
        (0, "create.accepted"),
        (60, "status.pending"),  # the SLA expired: polled
        (65, "status.pending"),
        (70, "status.pending"),  # the next tick (75) would be past the deadline
        (72, "status.timeout"),
    ]
    assert silent_provider(POLL_ONLY) == [
        (0, "create.accepted"),
        (5, "status.pending"),
        (10, "status.pending"),
        (12, "status.timeout"),
    ]
    assert silent_provider(CONFIG)[-1] == (65, "status.exhausted")


def test_sbx_silent_reaches_manual_check_by_the_deadline_within_a_minute() -> None:
    """DESIGN.md: in ``make run`` a withdrawal whose only provider is sbx_silent reaches
    MANUAL_CHECK within 60 s. With the shipped sandbox settings that is the polling deadline."""
    raw = (Path(__file__).resolve().parents[2] / "config" / "providers.sandbox.json").read_bytes()
    config = load_providers(raw, {"SANDBOX_URL": "http://sandbox.invalid"}).providers["sbx_silent"]
    trail = silent_provider(config)
    assert trail[-1][1] == "status.timeout"
    assert trail[-1][0] < 60, trail


def test_success_that_wins_a_cancel_race_is_committed() -> None:
    step = decide(
        task(T.EXECUTING, freeze_state="frozen", cancel_requested=True),
        ProviderAnswer("succeeded", "r", source="webhook"),
        CONFIG,
        NOW,
    )
    assert (step.to, step.balance) == (T.SUCCEEDED, "commit")


def test_accepted_order_is_not_declared_absent_by_a_404() -> None:
    absent = ProviderAnswer("absent", source="poll")
    polled = decide(task(T.EXECUTING), absent, CONFIG, NOW)
    # A poll that proved nothing: polling goes on, never FAILED, nothing released.
    assert (polled.event, polled.to, polled.balance) == ("status.pending", None, None)
    assert decide(task(T.MANUAL_CHECK), absent, CONFIG, NOW).ignored


def test_the_record_keeps_the_one_timer_a_task_waits_on() -> None:
    accepted = decide(
        task(T.CREATING, freeze_state="frozen"), ProviderAnswer("pending", "r"), CONFIG, NOW
    )
    executing = apply_changes(task(T.CREATING, freeze_state="frozen"), accepted)
    assert (executing.state, executing.timer_kind) == (T.EXECUTING, "webhook_timeout")
    progress = decide(executing, ProviderAnswer("pending", "r", source="webhook"), CONFIG, NOW)
    assert apply_changes(executing, progress).timer_kind == "webhook_timeout"
    settled = decide(executing, ProviderAnswer("succeeded", "r", source="webhook"), CONFIG, NOW)
    assert apply_changes(executing, settled).timer_kind is None


def test_apply_changes_refuses_illegal_transitions() -> None:
    with pytest.raises(IllegalTransition):
        apply_changes(task(T.SUCCEEDED), Step(event="x", to=T.FAILED))


# --- simulation -------------------------------------------------------------------------

provider_outcome = st.sampled_from(
    [
        "refused",
        "declined",
        "closed",
        "slow",
        "review",
        "busy",
        "ambiguous",
        "pending",
        "succeeded",
        "failed",
    ]
)
poll_outcome = st.sampled_from(["pending", "succeeded", "failed", "absent", "ambiguous"])
external = st.sampled_from(
    [
        "webhook_ok",
        "webhook_fail",
        "webhook_pending",
        "webhook_returned",
        "timer",
        "resolve+",
        "resolve-",
        "cancel",
        "start_dup",
        "crash",
        "resume",
    ]
)


TIMER_KINDS: list[TimerKind] = [
    "recheck",
    "webhook_timeout",
    "status_tick",
    "status_timeout",
    "retry",
]
ANY_TIMER = st.sampled_from(TIMER_KINDS)


@dataclasses.dataclass
class Ledger:
    states: dict[uuid.UUID, str] = dataclasses.field(default_factory=dict)
    commits: int = 0
    crashed: set[uuid.UUID] = dataclasses.field(default_factory=set)
    """Operations whose settling call was made by a worker that died before recording it."""

    def apply(self, operation: str, task_id: uuid.UUID) -> None:
        current = self.states.get(task_id)
        settled = "committed" if operation == "commit" else "rolled_back"
        if current == settled and task_id in self.crashed:
            return  # its replay after the crash: cascade-core answers the same, nothing moves
        assert current == "frozen", f"{operation} of a {current} freeze"
        self.states[task_id] = settled
        self.commits += operation == "commit"


class Crash(Exception):
    """The worker died after its calls and before the transaction that records them."""


class Sim:
    def __init__(
        self,
        providers: int,
        config: ProviderConfig,
        data: st.DataObject,
        *,
        outcomes: st.SearchStrategy[str] = provider_outcome,
        timers: st.SearchStrategy[TimerKind] = ANY_TIMER,
    ) -> None:
        queue_id = uuid.uuid4()
        tasks = tuple(
            OrderTask(
                task_id=uuid.uuid4(),
                queue_id=queue_id,
                position=i,
                provider_id=f"p{i}",
                state=T.PENDING,
                version=1,
                provider_order_id=f"cg-{i}",
            )
            for i in range(providers)
        )
        self.queue = OrderQueue(
            queue_id=queue_id, withdrawal_id="w", state=QueueState.ACTIVE, version=1, tasks=tasks
        )
        self.ledger = Ledger()
        self.config = config
        self.data = data
        self.outcomes = outcomes
        self.timers = timers
        self.now = NOW
        self.seen_final: dict[uuid.UUID, TaskState] = {}
        self.crash_armed = False
        self.stop_after = providers  # position of an attempt whose decline stops the cascade

    def record(self, transition: Transition) -> None:
        """What the unit of work would write; a final task must never change."""
        for change in transition.changes:
            if isinstance(change, TaskChange):
                if change.before.task_id in self.seen_final:
                    raise AssertionError(
                        f"final task changed: {change.before.state} → {change.after.state}"
                    )
                if change.after.final:
                    self.seen_final[change.after.task_id] = change.after.state
        self.queue = transition.queue
        if transition.start is not None:
            self.apply(transition.start.task_id, Start())

    def answer(self, call: str, current: OrderTask) -> Event:
        if call == "freeze_and_create":
            # A declined create is made again only while the withdrawal is not cancelled;
            # but a create cut off by a crash is replayed (the same key): it may have been
            # accepted, and only its answer can tell.
            replay = current.task_id in self.ledger.crashed
            assert replay or not (current.create_retries and self.queue.cancel_requested), (
                "retry after cancel"
            )
            held = self.ledger.states.get(current.task_id)
            if held == "rolled_back":
                return FreezeRolledBack()  # cascade-core answers the settled state
            if held == "committed":
                return FreezeCommitted()  # paid and committed before the crash
            outcome = self.data.draw(self.outcomes)
            if outcome == "closed":
                # The provider's word, whether or not a crash loses it: stop the cascade.
                self.stop_after = min(self.stop_after, current.position)
            if outcome == "refused":
                if held is None:
                    return FreezeRefused("insufficient_balance")
                outcome = "pending"  # a replay never refuses its own hold; the create answers
            self.ledger.states.setdefault(current.task_id, "frozen")
            if outcome in ("declined", "closed", "slow", "review", "busy"):
                return Declined(outcome)
            if outcome == "ambiguous":
                return Ambiguous("timeout", "create")
            return ProviderAnswer(outcome, "ref", source="create")  # type: ignore[arg-type]
        if call == "cancel_at_provider":
            return ProviderAnswer(
                self.data.draw(st.sampled_from(["cancelled", "succeeded"])), "ref", source="cancel"
            )
        outcome = self.data.draw(poll_outcome)
        if outcome == "ambiguous":
            return Ambiguous("timeout", "poll")
        return ProviderAnswer(outcome, "ref", source="poll")  # type: ignore[arg-type]

    def apply(self, task_id: uuid.UUID, event: Event) -> None:
        try:
            self._apply(task_id, event)
        except Crash:
            # The record is as the last commit left it: the task stays CREATING, its freeze
            # (and any balance call made after the create) done at cascade-core only.
            self.queue, self.seen_final = self.committed

    def _apply(self, task_id: uuid.UUID, event: Event) -> None:
        """As the engine drives an event: decide, balance call, record, call, and again."""
        self.committed = (self.queue, dict(self.seen_final))
        fired = event.kind if isinstance(event, TimerFired) else None
        in_create = False
        while True:
            step = decide_in_queue(self.queue, task_id, event, self.config, self.now)
            if step.ignored:
                return
            if step.balance is not None:
                self.ledger.apply(step.balance, task_id)
            if in_create and self.crash_armed:
                self.crash_armed = False
                self.ledger.crashed.add(task_id)
                raise Crash
            self.record(settle(self.queue, task_id, step, self.now, fired=fired))
            if step.then is not None:
                # Committed on its own before the calls: what a crash falls back to.
                self.committed = (self.queue, dict(self.seen_final))
                event, in_create = step.then, False
                continue
            if step.call is None:
                return
            answer = self.answer(step.call, self.queue.task(task_id))
            if step.awaiting is not None:  # support's decision waits for the provider's answer
                assert isinstance(answer, ProviderAnswer | Ambiguous)
                answer = ProviderChecked(resolve=step.awaiting, answer=answer)
            event = answer
            in_create = step.call == "freeze_and_create"

    def external(self, kind: str) -> None:
        active = self.queue.active_task()
        target = active or self.queue.tasks[0]
        self.now += timedelta(seconds=30)
        if kind == "crash":
            self.crash_armed = True  # the next create dies before its answer is recorded
            return
        if kind == "resume":
            for t in self.queue.tasks:
                if t.state == T.CREATING:  # the sweeper restarts a stranded create
                    self.apply(t.task_id, Start(resume=True))
            return
        if kind == "cancel":
            self.record(request_cancel(self.queue, None, self.now))
            active = self.queue.active_task()
            if active is not None and not active.cancel_requested:
                self.apply(active.task_id, CancelRequested())
            return
        events: dict[str, Event] = {
            "webhook_ok": ProviderAnswer("succeeded", "ref", source="webhook"),
            "webhook_fail": ProviderAnswer("failed", "ref", source="webhook"),
            "webhook_pending": ProviderAnswer("pending", "ref", source="webhook"),
            "webhook_returned": ProviderAnswer("returned", "ref", code="R01", source="webhook"),
            "timer": TimerFired(self.data.draw(self.timers), _generation(target)),
            "resolve+": Resolve(positive=True, reason="r", actor="a"),
            "resolve-": Resolve(positive=False, reason="r", actor="a"),
            "start_dup": Start(),
        }
        self.apply(target.task_id, events[kind])

    def check(self) -> None:
        assert self.ledger.commits <= 1, "two commits for one withdrawal"
        for t in self.queue.tasks:
            if t.timer_kind == "retry":
                # Waiting to create again: declined, so nothing else runs, the freeze held
                # (unless a worker settled it and died before recording it: the freeze's
                # answer then tells the retry).
                assert t.state == T.CREATING
                held = self.ledger.states.get(t.task_id)
                assert held == "frozen" or t.task_id in self.ledger.crashed
        for t in self.queue.tasks:
            if t.position > self.stop_after:
                assert t.task_id not in self.ledger.states, "tried a provider after a stop"
        public = public_state(self.queue)
        assert public.status in ("processing", "succeeded", "failed", "cancelled")
        if self.queue.final:
            assert "frozen" not in self.ledger.states.values(), "freeze left open"
            assert (self.queue.state == QueueState.COMPLETED) == (self.ledger.commits == 1)
            assert all(t.final for t in self.queue.tasks)


def _generation(task: OrderTask) -> int:
    """The generation of the timer ``task`` waits on (what a firing of it carries)."""
    if task.state == T.RECHECKING:
        return task.recheck_attempts
    if task.timer_kind == "retry":
        return task.create_retries
    return task.status_polls


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    providers=st.integers(1, 4),
    config=st.sampled_from([CONFIG, NO_SLA, TIMED, POLL_ONLY, RETRYING]),
    events=st.lists(external, max_size=25),
)
def test_no_sequence_breaks_money_safety(
    data: st.DataObject, providers: int, config: ProviderConfig, events: list[str]
) -> None:
    sim = Sim(providers, config, data)
    sim.crash_armed = data.draw(st.booleans(), label="the first create crashes")
    sim.apply(sim.queue.tasks[0].task_id, Start())
    sim.check()
    for kind in events:
        if sim.queue.final:
            break
        sim.external(kind)
        sim.check()


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    providers=st.integers(1, 3),
    events=st.lists(
        st.sampled_from(["timer", "timer", "cancel", "crash", "resume", "start_dup", "webhook_ok"]),
        max_size=20,
    ),
)
def test_no_sequence_of_retried_creates_breaks_money_safety(
    data: st.DataObject, providers: int, events: list[str]
) -> None:
    """As above, where most creates are declined with a code that is retried: retries,
    stale and duplicate retry timers, cancels and crashes while a create waits to be retried."""
    sim = Sim(
        providers,
        RETRYING,
        data,
        outcomes=st.sampled_from(["busy", "busy", "busy", "pending", "succeeded", "ambiguous"]),
        timers=st.sampled_from(["retry", "retry", "retry", "recheck", "webhook_timeout"]),
    )
    sim.crash_armed = data.draw(st.booleans(), label="the first create crashes")
    sim.apply(sim.queue.tasks[0].task_id, Start())
    sim.check()
    for kind in events:
        if sim.queue.final:
            break
        sim.external(kind)
        sim.check()


# --- the public view --------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    queue_state=st.sampled_from(list(QueueState)),
    states=st.lists(st.sampled_from(list(TaskState)), min_size=1, max_size=5),
    refs=st.lists(st.one_of(st.none(), st.just("ref")), min_size=5, max_size=5),
    failure=st.sampled_from(
        [None, "declined", "provider_error", "timeout", "manual_rejected", "cancelled"]
    ),
)
def test_public_state_is_total(
    queue_state: QueueState,
    states: list[TaskState],
    refs: list[str | None],
    failure: Outcome | None,
) -> None:
    queue_id = uuid.uuid4()
    tasks = tuple(
        OrderTask(
            task_id=uuid.uuid4(),
            queue_id=queue_id,
            position=i,
            provider_id=f"p{i}",
            state=s,
            version=1,
            provider_order_id="x",
            provider_reference=refs[i],
        )
        for i, s in enumerate(states)
    )
    queue = OrderQueue(
        queue_id=queue_id,
        withdrawal_id="w",
        state=queue_state,
        version=1,
        tasks=tasks,
        failure_code=failure,
    )
    public = public_state(queue)
    assert public.status in ("processing", "succeeded", "failed", "cancelled")
    assert public.provider_id in {t.provider_id for t in tasks}
    if public.status in ("processing", "succeeded"):
        assert public.failure_code is None
    else:
        assert public.failure_code in (
            "declined",
            "provider_error",
            "timeout",
            "manual_rejected",
            "cancelled",
        )
    if public.status == "cancelled":
        assert public.failure_code == "cancelled"


def test_cancel_requested_during_create_reaches_the_provider_once_the_order_exists() -> None:
    creating = task(T.CREATING, freeze_state="frozen", cancel_requested=True)
    cancellable = msgspec.structs.replace(CONFIG, supports_cancel=True)
    step = decide(creating, ProviderAnswer("pending", "r"), cancellable, NOW)
    assert (step.to, step.call) == (T.EXECUTING, "cancel_at_provider")
    assert step.timer is not None  # the SLA still guards an unanswered cancel
    plain = decide(creating, ProviderAnswer("pending", "r"), CONFIG, NOW)
    assert (plain.to, plain.call) == (T.EXECUTING, None)


def test_a_resumed_create_whose_hold_was_released_ends_without_a_create() -> None:
    """The crash came between a rollback and its record: the attempt has not paid, and with
    nothing held no create may follow."""
    step = decide(task(T.CREATING), FreezeRolledBack(), CONFIG, NOW)
    assert (step.to, step.call, step.balance) == (T.FAILED, None, None)
    assert step.stop_cascade  # the decline lost with the crash may have said so
    assert apply_changes(task(T.CREATING), step).freeze_state == "rolled_back"
    cancelled = decide(task(T.CREATING, cancel_requested=True), FreezeRolledBack(), CONFIG, NOW)
    assert (cancelled.to, cancelled.changes.outcome) == (T.CANCELLED, "cancelled")
    for state in (T.PENDING, T.EXECUTING, T.RECHECKING, T.MANUAL_CHECK):
        assert decide(task(state), FreezeRolledBack(), CONFIG, NOW).ignored


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_resumed_create_of_a_cancelled_withdrawal_that_did_not_pay_is_cancelled(
    status: str,
) -> None:
    creating = task(T.CREATING, freeze_state="frozen", cancel_requested=True)
    step = decide(creating, ProviderAnswer(status, "r", source="create"), CONFIG, NOW)  # type: ignore[arg-type]
    assert (step.to, step.balance) == (T.CANCELLED, "rollback")
    assert apply_changes(creating, step).state == T.CANCELLED


def test_a_resumed_create_already_committed_succeeds_without_a_create() -> None:
    step = decide(task(T.CREATING), FreezeCommitted(), CONFIG, NOW)
    assert (step.to, step.call, step.balance) == (T.SUCCEEDED, None, None)
    assert apply_changes(task(T.CREATING), step).freeze_state == "committed"
    assert decide(task(T.EXECUTING), FreezeCommitted(), CONFIG, NOW).ignored


@pytest.mark.parametrize(
    ("second", "outcome"),
    [(T.SKIPPED, None), (T.CANCELLED, "cancelled")],  # stopped, or cancelled, before its turn
)
def test_the_public_provider_is_one_that_was_tried(second: TaskState, outcome: str | None) -> None:
    queue_id = uuid.uuid4()
    declined = task(T.SKIPPED, outcome="declined", freeze_state="rolled_back")
    untried = task(second, outcome=outcome)
    queue = OrderQueue(
        queue_id=queue_id,
        withdrawal_id="w",
        state=QueueState.FAILED,
        version=1,
        tasks=(
            dataclasses.replace(declined, queue_id=queue_id, position=0, provider_id="p0"),
            dataclasses.replace(untried, queue_id=queue_id, position=1, provider_id="p1"),
        ),
        failure_code="declined",
    )
    assert public_state(queue).provider_id == "p0"
