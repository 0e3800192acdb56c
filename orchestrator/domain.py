"""The cascade's state machine: pure data and functions, no I/O.

``OrderQueue`` is one withdrawal: an ordered list of ``OrderTask``s, one per cascade entry.
``OrderTask`` is one provider attempt. The transition tables below are the whole truth about
which state may follow which; :func:`decide` maps one event on one task to a :class:`Step`
that says what to change and which effects to run. Handlers (``orchestrator.engine``) only
load, call :func:`decide`, run the effects in the order the step prescribes, and persist.

Money-safety rules encoded here:
- a balance commit/rollback is a *precondition* of the transition that needs it
  (``Step.balance``): the handler performs it and persists the new state only after a 200;
- an ambiguous provider answer never leads to FAILED; only a definitive answer (a decline,
  a final status, a proven-absent order) moves the cascade on;
- a final task state is never left: every event on a final task is ignored.

Timers: a task has at most one pending timer (``Step.timer``), kept on its record and as one
JetStream schedule per (task, timer kind). RECHECKING waits on ``recheck``; EXECUTING on
``webhook_timeout`` (the provider's SLA), then, with status polling, on ``status_tick``
between polls and finally on ``status_timeout``: the polling deadline, armed instead of a tick
that would come at or after it. A timer's ``attempt`` is the generation it was armed for; a
firing whose generation or state no longer matches is stale and ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from contracts.providers_file import Decision, ProviderConfig


class TaskState(enum.StrEnum):
    PENDING = "PENDING"
    CREATING = "CREATING"
    EXECUTING = "EXECUTING"
    SUCCEEDED = "SUCCEEDED"
    NEGATIVE_EVAL = "NEGATIVE_EVAL"
    SKIPPED = "SKIPPED"
    RECHECKING = "RECHECKING"
    FAILED = "FAILED"
    MANUAL_CHECK = "MANUAL_CHECK"
    CANCELLED = "CANCELLED"


class QueueState(enum.StrEnum):
    ACTIVE = "ACTIVE"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


T = TaskState
TASK_TRANSITIONS: Mapping[TaskState, frozenset[TaskState]] = {
    T.PENDING: frozenset({T.CREATING, T.CANCELLED, T.SKIPPED}),
    T.CREATING: frozenset(
        {
            T.EXECUTING,
            T.SUCCEEDED,
            T.NEGATIVE_EVAL,
            T.RECHECKING,
            T.MANUAL_CHECK,
            T.FAILED,
            # A create resumed after a crash, for a withdrawal cancelled meanwhile, that the
            # provider answers failed or cancelled.
            T.CANCELLED,
        }
    ),
    T.NEGATIVE_EVAL: frozenset({T.SKIPPED}),
    T.RECHECKING: frozenset({T.EXECUTING, T.SUCCEEDED, T.FAILED, T.MANUAL_CHECK, T.CANCELLED}),
    T.EXECUTING: frozenset({T.SUCCEEDED, T.FAILED, T.MANUAL_CHECK, T.CANCELLED}),
    T.MANUAL_CHECK: frozenset({T.SUCCEEDED, T.FAILED, T.CANCELLED}),
    T.SUCCEEDED: frozenset(),
    T.SKIPPED: frozenset(),
    T.FAILED: frozenset(),
    T.CANCELLED: frozenset(),
}
"""Allowed task transitions. PENDING → SKIPPED is a cascade stopped before this task ran."""

QUEUE_TRANSITIONS: Mapping[QueueState, frozenset[QueueState]] = {
    QueueState.ACTIVE: frozenset({QueueState.COMPLETED, QueueState.FAILED, QueueState.CANCELLED}),
    QueueState.COMPLETED: frozenset(),
    QueueState.FAILED: frozenset(),
    QueueState.CANCELLED: frozenset(),
}

FINAL_TASK_STATES = frozenset(s for s, nxt in TASK_TRANSITIONS.items() if not nxt)
FINAL_QUEUE_STATES = frozenset(s for s, nxt in QUEUE_TRANSITIONS.items() if not nxt)
# States in which the provider may still pay out: a cancel must wait for the outcome there.
IN_FLIGHT_STATES = frozenset({T.CREATING, T.EXECUTING, T.RECHECKING, T.MANUAL_CHECK})

FreezeState = Literal["none", "frozen", "committed", "rolled_back"]
# The public failure codes of the legacy contract; an outcome is always one of these.
Outcome = Literal["declined", "provider_error", "timeout", "manual_rejected", "cancelled"]
TimerKind = Literal["recheck", "webhook_timeout", "status_tick", "status_timeout"]


# The event of a plain PENDING → CREATING (also written by a start that needs no read).
START_EVENT = "start"


class IllegalTransition(Exception):
    """A step would break the transition table: a bug, never a normal input."""


@dataclass(frozen=True, kw_only=True)
class OrderTask:
    """One provider attempt, as loaded from the record."""

    task_id: uuid.UUID
    queue_id: uuid.UUID
    position: int
    provider_id: str
    state: TaskState
    version: int
    provider_order_id: str
    provider_reference: str | None = None
    freeze_state: FreezeState = "none"
    outcome: Outcome | None = None
    provider_code: str | None = None
    recheck_attempts: int = 0
    status_polls: int = 0
    cancel_requested: bool = False
    state_entered_at: datetime | None = None
    # The one timer the task waits on (its schedule is pending at the broker), if any.
    timer_kind: TimerKind | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_TASK_STATES


@dataclass(frozen=True, kw_only=True)
class OrderQueue:
    """One withdrawal's cascade, as loaded from the record."""

    queue_id: uuid.UUID
    withdrawal_id: str
    state: QueueState
    version: int
    tasks: tuple[OrderTask, ...]
    cancel_requested: bool = False
    stop_requested: bool = False
    failure_code: Outcome | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_QUEUE_STATES

    def find_task(self, task_id: uuid.UUID) -> OrderTask | None:
        return next((task for task in self.tasks if task.task_id == task_id), None)

    def task(self, task_id: uuid.UUID) -> OrderTask:
        task = self.find_task(task_id)
        if task is None:
            raise KeyError(task_id)
        return task

    def active_task(self) -> OrderTask | None:
        """The task that left PENDING last and is not final, if any."""
        for task in self.tasks:
            if task.state not in FINAL_TASK_STATES and task.state != T.PENDING:
                return task
        return None

    def next_pending(self) -> OrderTask | None:
        return next((t for t in self.tasks if t.state == T.PENDING), None)


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Begin the attempt: freeze, then create the provider order.

    ``resume`` (the default): the task may already be CREATING from an earlier delivery that
    died mid-create. False: the handler that delivers it committed PENDING → CREATING a moment
    ago and goes on with the calls.
    """

    resume: bool = True


@dataclass(frozen=True)
class FreezeRefused:
    """cascade-core refused the freeze (the provider's float cannot cover it)."""

    code: str


@dataclass(frozen=True)
class FreezeRolledBack:
    """The freeze of a resumed create answered ``rolled_back``: this attempt's hold was
    already released, which this service does for a creating attempt only on a definitive
    non-payment (a decline, a failed or cancelled order) — the crash came between that
    rollback and its state write. No create may follow: nothing is held. What the provider
    said is lost with the crash, and the error table may have said ``stop_cascade`` (a closed
    account): so the cascade stops here rather than pay the destination elsewhere."""


@dataclass(frozen=True)
class FreezeCommitted:
    """The freeze of a resumed create answered ``committed``: this attempt was paid and its
    commit made before the crash that lost the record. It succeeded; no create is replayed
    (a provider that no longer honours the key could open a second order)."""


AnswerSource = Literal["create", "poll", "webhook", "cancel"]


@dataclass(frozen=True)
class ProviderAnswer:
    """A definitive provider view of our order (create response, status poll or webhook)."""

    status: Literal["pending", "succeeded", "failed", "cancelled", "absent"]
    reference: str | None = None
    code: str | None = None
    source: AnswerSource = "create"


@dataclass(frozen=True)
class Declined:
    """The provider refused the order at create with a code from its error table."""

    code: str


@dataclass(frozen=True)
class Ambiguous:
    """The outcome of a call is unknown: the order may or may not exist."""

    detail: str


@dataclass(frozen=True)
class TimerFired:
    kind: TimerKind
    attempt: int


@dataclass(frozen=True)
class Resolve:
    """Support resolved a manual check."""

    positive: bool
    reason: str
    actor: str


@dataclass(frozen=True)
class CancelRequested:
    reason: str | None = None


Event = (
    Start
    | FreezeRefused
    | FreezeRolledBack
    | FreezeCommitted
    | ProviderAnswer
    | Declined
    | Ambiguous
    | TimerFired
    | Resolve
    | CancelRequested
)


# --- steps ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Timer:
    kind: TimerKind
    due_at: datetime
    attempt: int


Call = Literal["freeze_and_create", "poll", "cancel_at_provider"]


@dataclass(frozen=True, kw_only=True)
class Step:
    """What one event does to one task. ``to is None`` means: ignore, nothing changes."""

    event: str
    to: TaskState | None = None
    changes: Mapping[str, object] = field(default_factory=dict)
    # Balance call that must return 200 before the transition may be persisted.
    balance: Literal["commit", "rollback"] | None = None
    # I/O whose answer is fed back to decide() as the next event.
    call: Call | None = None
    timer: Timer | None = None
    clear_timer: bool = False
    # The cascade must not try further providers (error table said stop).
    stop_cascade: bool = False
    # Write the step (version bump and audit row) even when it changes nothing.
    record: bool = True
    ignored_because: str | None = None

    @property
    def ignored(self) -> bool:
        return self.ignored_because is not None


def ignore(event: str, because: str) -> Step:
    return Step(event=event, ignored_because=because)


def recheck_delay(config: ProviderConfig, attempt: int) -> float:
    """Exponential backoff for the ``attempt``-th recheck (0-based)."""
    policy = config.recheck
    try:
        grown = policy.initial_delay_seconds * policy.multiplier**attempt
    except OverflowError:  # a float power past 1e308: long since capped
        return float(policy.max_delay_seconds)
    return float(min(policy.max_delay_seconds, grown))


def _polling_deadline(config: ProviderConfig, executing_since: datetime | None) -> datetime | None:
    """When status polling of an order executing since ``executing_since`` gives up, if ever.

    Polling starts when the webhook SLA expires (at once when there is no SLA) and lasts
    ``status_polling.timeout_seconds``. The nominal SLA expiry counts, not the moment its
    timer was handled: a late timer does not lengthen the wait.
    """
    polling = config.status_polling
    if polling is None or polling.timeout_seconds is None or executing_since is None:
        return None
    waited = (config.webhook_sla_seconds or 0) + polling.timeout_seconds
    return executing_since + timedelta(seconds=waited)


def _status_timer(
    config: ProviderConfig, executing_since: datetime | None, now: datetime, attempt: int
) -> Timer:
    """The next poll's tick, or the polling deadline if the tick would come at or after it."""
    assert config.status_polling is not None
    due = now + timedelta(seconds=config.status_polling.interval_seconds)
    deadline = _polling_deadline(config, executing_since)
    if deadline is not None and due >= deadline:
        return Timer(kind="status_timeout", due_at=deadline, attempt=attempt)
    return Timer(kind="status_tick", due_at=due, attempt=attempt)


def _executing(
    task: OrderTask, config: ProviderConfig, now: datetime, event: str, **changes: object
) -> Step:
    """Enter EXECUTING with the webhook SLA timer, or go to manual check when there is none.

    Without an SLA but with status polling, polling starts at once: the first timer is a
    status tick, or the polling deadline if that comes first.

    A cancel requested while the order was being created or rechecked is sent to the
    provider now that the order is known to exist (the SLA timer still guards the wait).
    """
    if config.webhook_sla_seconds is None and config.status_polling is None:
        return Step(event=event, to=T.MANUAL_CHECK, changes=changes, clear_timer=True)
    call: Call | None = (
        "cancel_at_provider" if task.cancel_requested and config.supports_cancel else None
    )
    if config.webhook_sla_seconds is None:
        # EXECUTING is entered now: the deadline counts from now.
        return Step(
            event=event,
            to=T.EXECUTING,
            changes=changes,
            call=call,
            timer=_status_timer(config, now, now, attempt=0),
        )
    due = now + timedelta(seconds=config.webhook_sla_seconds)
    return Step(
        event=event,
        to=T.EXECUTING,
        changes=changes,
        call=call,
        timer=Timer(kind="webhook_timeout", due_at=due, attempt=0),
    )


def _on_decision(
    task: OrderTask, decision: Decision, code: str, config: ProviderConfig, now: datetime
) -> Step:
    """Apply the provider error table to a definitive refusal at create."""
    frozen = task.freeze_state == "frozen"
    if decision == "recheck":
        due = now + timedelta(seconds=recheck_delay(config, task.recheck_attempts))
        return Step(
            event="create.declined.recheck",
            to=T.RECHECKING,
            changes={"provider_code": code},
            timer=Timer(kind="recheck", due_at=due, attempt=task.recheck_attempts),
        )
    if decision == "manual_check":
        return Step(
            event="create.declined.manual", to=T.MANUAL_CHECK, changes={"provider_code": code}
        )
    return Step(
        event="create.declined",
        to=T.NEGATIVE_EVAL,
        changes={"provider_code": code, "outcome": "declined"},
        balance="rollback" if frozen else None,
        stop_cascade=decision == "stop_cascade",
    )


def _final_answer(task: OrderTask, answer: ProviderAnswer, event: str) -> Step | None:
    """A final provider status, wherever it comes from; None if the answer is not final."""
    ref = {"provider_reference": answer.reference} if answer.reference else {}
    if answer.status == "succeeded":
        # Commit even when a cancel was requested: a success that won the race is kept.
        return Step(
            event=event + ".succeeded",
            to=T.SUCCEEDED,
            changes=ref,
            balance="commit",
            clear_timer=True,
        )
    if answer.status in ("failed", "cancelled", "absent"):
        if task.cancel_requested:
            to, outcome = T.CANCELLED, "cancelled"
        elif answer.status == "absent":
            to, outcome = T.FAILED, "provider_error"
        elif task.state == T.EXECUTING and answer.source == "poll" and task.status_polls > 0:
            to, outcome = T.FAILED, "timeout"
        else:
            to, outcome = T.FAILED, "declined"
        return Step(
            event=f"{event}.{answer.status}",
            to=to,
            changes={**ref, "outcome": outcome, "provider_code": answer.code},
            balance="rollback" if task.freeze_state == "frozen" else None,
            clear_timer=True,
        )
    return None


def decide(task: OrderTask, event: Event, config: ProviderConfig, now: datetime) -> Step:
    """The one function that applies an event to a task. Pure; see the module docstring."""
    if task.final:
        return ignore(type(event).__name__, f"task is final ({task.state})")
    match event:
        case Start(resume=resume):
            if task.state == T.PENDING:
                if task.cancel_requested:
                    return Step(
                        event="start.cancelled", to=T.CANCELLED, changes={"outcome": "cancelled"}
                    )
                return Step(event=START_EVENT, to=T.CREATING, call="freeze_and_create")
            if task.state == T.CREATING:
                if not resume:
                    # The handler's own PENDING → CREATING row already says what happens.
                    return Step(event="start.create", call="freeze_and_create", record=False)
                # Redelivery after a crash mid-create: both calls are idempotent, redo them.
                return Step(event="start.resume", call="freeze_and_create")
            return ignore("start", f"task already {task.state}")
        case FreezeRefused(code=code):
            if task.state != T.CREATING:
                return ignore("freeze.refused", f"task is {task.state}")
            return Step(
                event="freeze.refused",
                to=T.NEGATIVE_EVAL,
                changes={"provider_code": code, "outcome": "provider_error"},
            )
        case FreezeRolledBack():
            if task.state != T.CREATING:
                return ignore("freeze.rolled_back", f"task is {task.state}")
            cancelled = task.cancel_requested
            return Step(
                event="freeze.rolled_back",
                to=T.CANCELLED if cancelled else T.FAILED,
                changes={
                    "outcome": "cancelled" if cancelled else "provider_error",
                    "provider_code": "freeze_rolled_back",
                    "freeze_state": "rolled_back",
                },
                clear_timer=True,
                stop_cascade=not cancelled,
            )
        case FreezeCommitted():
            if task.state != T.CREATING:
                return ignore("freeze.committed", f"task is {task.state}")
            return Step(
                event="freeze.committed",
                to=T.SUCCEEDED,
                changes={"freeze_state": "committed"},
                clear_timer=True,
            )
        case Declined(code=code):
            if task.state != T.CREATING:
                return ignore("create.declined", f"task is {task.state}")
            return _on_decision(task, config.decision_for(code), code, config, now)
        case Ambiguous(detail=detail):
            if task.state == T.CREATING:
                due = now + timedelta(seconds=recheck_delay(config, 0))
                return Step(
                    event="create.ambiguous",
                    to=T.RECHECKING,
                    changes={"provider_code": detail[:200]},
                    timer=Timer(kind="recheck", due_at=due, attempt=0),
                )
            return ignore("ambiguous", f"task is {task.state}")
        case ProviderAnswer() as answer:
            return _decide_answer(task, answer, config, now)
        case TimerFired(kind=kind, attempt=attempt):
            return _decide_timer(task, kind, attempt, config, now)
        case Resolve(positive=positive, reason=reason, actor=actor):
            if task.state != T.MANUAL_CHECK:
                return ignore("manual.resolve", f"task is {task.state}, not MANUAL_CHECK")
            if positive:
                return Step(
                    event="manual.resolved.positive",
                    to=T.SUCCEEDED,
                    balance="commit",
                    changes={"resolution": reason, "resolved_by": actor},
                )
            return Step(
                event="manual.resolved.negative",
                to=T.FAILED,
                balance="rollback" if task.freeze_state == "frozen" else None,
                changes={"outcome": "manual_rejected", "resolution": reason, "resolved_by": actor},
            )
        case CancelRequested():
            if task.state == T.PENDING:
                return Step(event="cancel", to=T.CANCELLED, changes={"outcome": "cancelled"})
            if task.cancel_requested:
                return ignore("cancel", "cancel already requested")
            if task.state == T.EXECUTING and config.supports_cancel:
                return Step(
                    event="cancel.requested",
                    changes={"cancel_requested": True},
                    call="cancel_at_provider",
                )
            # The provider may still pay: remember the request, finish when the outcome is known.
            return Step(event="cancel.requested", changes={"cancel_requested": True})
    raise AssertionError(f"unhandled event {event!r}")  # pragma: no cover


def _decide_answer(
    task: OrderTask, answer: ProviderAnswer, config: ProviderConfig, now: datetime
) -> Step:
    source = answer.source
    if task.state == T.CREATING and source == "create":
        final = _final_answer(task, answer, "create")
        if final is not None:
            return final
        return _executing(task, config, now, "create.accepted", provider_reference=answer.reference)
    if task.state == T.RECHECKING:
        final = _final_answer(task, answer, "recheck")
        if final is not None:
            return final
        # Proven to exist and still pending: wait for it like any accepted order.
        return _executing(task, config, now, "recheck.found", provider_reference=answer.reference)
    if task.state in (T.EXECUTING, T.MANUAL_CHECK):
        if answer.status == "absent":
            # An order we saw accepted cannot be proven absent by a 404: keep waiting for a human.
            return ignore(f"{source}.absent", "order was accepted earlier; 404 is not proof")
        final = _final_answer(task, answer, source)
        if final is not None:
            return final
        return ignore(f"{source}.pending", "progress, not an outcome")
    return ignore(f"{source}.{answer.status}", f"task is {task.state}")


def _decide_timer(
    task: OrderTask, kind: TimerKind, attempt: int, config: ProviderConfig, now: datetime
) -> Step:
    event = f"timer.{kind}"
    if kind == "recheck":
        if task.state != T.RECHECKING or attempt != task.recheck_attempts:
            return ignore(event, "stale recheck timer")
        return Step(event=event, call="poll")
    if kind == "webhook_timeout":
        if task.state != T.EXECUTING or task.status_polls != 0 or attempt != 0:
            return ignore(event, "stale webhook timer")
        if config.status_polling is None:
            return Step(event="webhook.sla_expired", to=T.MANUAL_CHECK, clear_timer=True)
        return Step(event=event, call="poll")
    if kind == "status_tick":
        if task.state != T.EXECUTING or attempt != task.status_polls:
            return ignore(event, "stale status timer")
        return Step(event=event, call="poll")
    if kind == "status_timeout":
        if task.state != T.EXECUTING or attempt != task.status_polls:
            return ignore(event, "stale status timeout")
        # Polled for as long as the provider's settings allow and still pending: a human
        # decides; never FAILED, the provider may still pay.
        return Step(event="status.timeout", to=T.MANUAL_CHECK, clear_timer=True)
    raise AssertionError(kind)  # pragma: no cover


def after_poll_pending(task: OrderTask, config: ProviderConfig, now: datetime) -> Step:
    """A poll found the order still pending (EXECUTING) or still unknown (RECHECKING)."""
    if task.state == T.RECHECKING:
        attempts = task.recheck_attempts + 1
        if attempts >= config.recheck.max_attempts:
            return Step(
                event="recheck.exhausted",
                to=T.MANUAL_CHECK,
                changes={"recheck_attempts": attempts},
                clear_timer=True,
            )
        due = now + timedelta(seconds=recheck_delay(config, attempts))
        return Step(
            event="recheck.unknown",
            changes={"recheck_attempts": attempts},
            timer=Timer(kind="recheck", due_at=due, attempt=attempts),
        )
    polls = task.status_polls + 1
    polling = config.status_polling
    if polling is None or polls >= polling.max_polls:
        return Step(
            event="status.exhausted",
            to=T.MANUAL_CHECK,
            changes={"status_polls": polls},
            clear_timer=True,
        )
    deadline = _polling_deadline(config, task.state_entered_at)
    if deadline is not None and now >= deadline:
        # The poll itself came late (a late timer, a slow provider): no further wait.
        return Step(
            event="status.timeout",
            to=T.MANUAL_CHECK,
            changes={"status_polls": polls},
            clear_timer=True,
        )
    return Step(
        event="status.pending",
        changes={"status_polls": polls},
        timer=_status_timer(config, task.state_entered_at, now, attempt=polls),
    )


def apply_changes(task: OrderTask, step: Step) -> OrderTask:
    """The task as it is after ``step`` (the record's view; checks the transition table)."""
    if (
        step.to is not None
        and step.to != task.state
        and step.to not in TASK_TRANSITIONS[task.state]
    ):
        raise IllegalTransition(f"{task.state} → {step.to} ({step.event})")
    changes = {k: v for k, v in step.changes.items() if k in _TASK_FIELDS}
    # As the record keeps it: a new timer replaces the old, a state change or a clear ends it.
    if step.timer is not None:
        changes["timer_kind"] = step.timer.kind
    elif step.clear_timer or (step.to is not None and step.to != task.state):
        changes["timer_kind"] = None
    if step.balance == "commit":
        changes["freeze_state"] = "committed"
    elif step.balance == "rollback":
        changes["freeze_state"] = "rolled_back"
    if step.to is not None:
        changes["state"] = step.to
    if not changes:
        return task
    return dataclasses.replace(task, **changes)  # type: ignore[arg-type]


_TASK_FIELDS = frozenset(f.name for f in dataclasses.fields(OrderTask))


# --- the queue --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QueueStep:
    """What happens to the queue after one of its tasks changed."""

    to: QueueState | None = None
    start_task: uuid.UUID | None = None
    skip_tasks: tuple[uuid.UUID, ...] = ()
    cancel_tasks: tuple[uuid.UUID, ...] = ()
    failure_code: Outcome | None = None


def may_start(queue: OrderQueue, task: OrderTask) -> bool:
    """Whether ``task`` is the queue's next attempt: active queue, every earlier task final.

    A start message for any other task (replayed from the DLQ, published by hand) must not
    create a second live order at another provider: that is how withdrawals get paid twice.
    """
    if queue.final or queue.cancel_requested or queue.stop_requested:
        return False
    return all(t.final for t in queue.tasks if t.position < task.position)


def advance_queue(queue: OrderQueue) -> QueueStep:
    """Queue rules: a success completes it; otherwise the next task runs; none left → FAILED."""
    if queue.final:
        return QueueStep()
    tasks = queue.tasks
    if any(t.state == T.SUCCEEDED for t in tasks):
        rest = tuple(t.task_id for t in tasks if t.state == T.PENDING)
        return QueueStep(to=QueueState.COMPLETED, skip_tasks=rest)
    if queue.active_task() is not None:
        return QueueStep()
    pending = tuple(t.task_id for t in tasks if t.state == T.PENDING)
    if queue.cancel_requested:
        return QueueStep(to=QueueState.CANCELLED, cancel_tasks=pending, failure_code="cancelled")
    if queue.stop_requested or not pending:
        last = next((t for t in reversed(tasks) if t.outcome is not None), None)
        code: Outcome = last.outcome if last and last.outcome else "provider_error"
        if code == "cancelled":
            return QueueStep(to=QueueState.CANCELLED, skip_tasks=pending, failure_code="cancelled")
        return QueueStep(to=QueueState.FAILED, skip_tasks=pending, failure_code=code)
    return QueueStep(start_task=pending[0])


# --- the public view --------------------------------------------------------------------

PublicStatus = Literal["processing", "succeeded", "failed", "cancelled"]


@dataclass(frozen=True, kw_only=True)
class PublicState:
    status: PublicStatus
    provider_id: str
    provider_reference: str | None
    failure_code: Outcome | None


def _attempted(task: OrderTask) -> bool:
    """Whether the task's provider was tried: not one skipped or cancelled while pending (no
    freeze, no outcome of its own, or only the cancellation's)."""
    return not (
        task.state in (T.SKIPPED, T.CANCELLED)
        and task.freeze_state == "none"
        and task.outcome in (None, "cancelled")
    )


def public_state(queue: OrderQueue) -> PublicState:
    """The only mapping from internal states to the legacy API's four statuses.

    Total over every combination: manual checks, rechecks and skipped providers all read
    ``processing`` while the queue is active; the failure code appears only when final.
    """
    tasks = queue.tasks
    shown = next((t for t in tasks if t.state == T.SUCCEEDED), None)
    if shown is None:
        started = [t for t in tasks if t.state != T.PENDING and t.provider_reference is not None]
        touched = [t for t in tasks if t.state != T.PENDING and _attempted(t)]
        shown = (started or touched or list(tasks[:1]))[-1]
    reference = shown.provider_reference
    if queue.state == QueueState.ACTIVE:
        return PublicState(
            status="processing",
            provider_id=shown.provider_id,
            provider_reference=reference,
            failure_code=None,
        )
    if queue.state == QueueState.COMPLETED:
        return PublicState(
            status="succeeded",
            provider_id=shown.provider_id,
            provider_reference=reference,
            failure_code=None,
        )
    if queue.state == QueueState.CANCELLED:
        return PublicState(
            status="cancelled",
            provider_id=shown.provider_id,
            provider_reference=reference,
            failure_code="cancelled",
        )
    return PublicState(
        status="failed",
        provider_id=shown.provider_id,
        provider_reference=reference,
        failure_code=queue.failure_code or "provider_error",
    )


def transition_table() -> str:
    """The task and queue transition tables as text (``cascade-gateway transitions``)."""
    lines = ["OrderTask:"]
    for state, targets in TASK_TRANSITIONS.items():
        shown = ", ".join(sorted(targets)) if targets else "(final)"
        lines.append(f"  {state:<14} → {shown}")
    lines.append("OrderQueue:")
    for qstate, qtargets in QUEUE_TRANSITIONS.items():
        shown = ", ".join(sorted(qtargets)) if qtargets else "(final)"
        lines.append(f"  {qstate:<14} → {shown}")
    return "\n".join(lines)
