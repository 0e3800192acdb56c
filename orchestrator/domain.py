"""The cascade's state machine: pure data and functions, no I/O.

``OrderQueue`` is one withdrawal: an ordered list of ``OrderTask``s, one per cascade entry.
``OrderTask`` is one provider attempt. The transition tables below are the whole truth about
which state may follow which. Two pure functions decide everything:

- :func:`decide` maps one event on one task to a :class:`Step`: the change to make, the
  balance call that must succeed first, the call whose answer is the next event, the timer to
  arm. :func:`decide_in_queue` adds what the queue knows (is it this task's turn, is its
  provider configured).
- :func:`settle` applies a step to the queue and the queue rules after it (NEGATIVE_EVAL →
  SKIPPED, a stopped cascade, the next attempt, the final state) and returns a
  :class:`Transition`: every task and queue change, each checked against its table, with the
  audit details and the timers to arm and cancel. :func:`request_cancel` does the same for a
  queue-level cancel.

Handlers (``orchestrator.engine``) only load, decide, run the effects in the order the step
prescribes, hand the transition to the unit of work, and commit.

Money-safety rules encoded here:
- a balance commit/rollback is a *precondition* of the transition that needs it
  (``Step.balance``): the handler performs it and persists the new state only after a 200;
- an ambiguous provider answer never leads to FAILED; only a definitive answer (a decline,
  a final status, a proven-absent order) moves the cascade on;
- a final task state is never left: every event on a final task is ignored, except the
  provider's verified report that a SUCCEEDED attempt was returned (SUCCEEDED → RETURNED,
  no balance call, the queue stays COMPLETED).

Timers: a task has at most one pending timer (``Step.timer``), kept on its record and as one
JetStream schedule per (task, timer kind). RECHECKING waits on ``recheck``; EXECUTING on
``webhook_timeout`` (the provider's SLA), then, with status polling, on ``status_tick``
between polls and finally on ``status_timeout``: the polling deadline, armed instead of a tick
that would come at or after it. A CREATING task whose create was declined with a code the error
table retries waits on ``retry`` (the policy's backoff), then creates again under the same
order id. A timer's ``attempt`` is the generation it was armed for; a firing whose generation
or state no longer matches is stale and ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from msgspec import UNSET, UnsetType

from contracts.providers_file import Decision, ProviderConfig, RetryPolicy


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
    RETURNED = "RETURNED"


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
            # provider answers failed or cancelled; a create waiting to be retried (declined:
            # proven not created) when the withdrawal is cancelled.
            T.CANCELLED,
        }
    ),
    T.NEGATIVE_EVAL: frozenset({T.SKIPPED}),
    T.RECHECKING: frozenset({T.EXECUTING, T.SUCCEEDED, T.FAILED, T.MANUAL_CHECK, T.CANCELLED}),
    T.EXECUTING: frozenset({T.SUCCEEDED, T.FAILED, T.MANUAL_CHECK, T.CANCELLED}),
    T.MANUAL_CHECK: frozenset({T.SUCCEEDED, T.FAILED, T.CANCELLED}),
    # A paid order the provider reports returned (verified webhook or status poll).
    T.SUCCEEDED: frozenset({T.RETURNED}),
    T.SKIPPED: frozenset(),
    T.FAILED: frozenset(),
    T.CANCELLED: frozenset(),
    T.RETURNED: frozenset(),
}
"""Allowed task transitions. PENDING → SKIPPED is a cascade stopped before this task ran."""

QUEUE_TRANSITIONS: Mapping[QueueState, frozenset[QueueState]] = {
    QueueState.ACTIVE: frozenset({QueueState.COMPLETED, QueueState.FAILED, QueueState.CANCELLED}),
    QueueState.COMPLETED: frozenset(),
    QueueState.FAILED: frozenset(),
    QueueState.CANCELLED: frozenset(),
}

# Final for the cascade: no provider or balance call, no timer, the queue's outcome is
# settled. SUCCEEDED's only exit is RETURNED, recorded from the provider's verified report
# of a return (:func:`_decide_returned`); it moves no money and leaves the queue COMPLETED.
FINAL_TASK_STATES = frozenset({T.SUCCEEDED, T.SKIPPED, T.FAILED, T.CANCELLED, T.RETURNED})
FINAL_QUEUE_STATES = frozenset(s for s, nxt in QUEUE_TRANSITIONS.items() if not nxt)

FreezeState = Literal["none", "frozen", "committed", "rolled_back"]
# The public failure codes of the legacy contract; an outcome is always one of these.
Outcome = Literal["declined", "provider_error", "timeout", "manual_rejected", "cancelled"]
TimerKind = Literal["recheck", "webhook_timeout", "status_tick", "status_timeout", "hold", "retry"]
"""``hold``: a withdrawal waiting to start its next attempt (every remaining provider's
breaker open, or the provider's rate or in-flight limit reached) waits on its first pending
task's hold timer, which fires as that task's start (:func:`plan_start`). ``retry``: a
CREATING task whose create was declined with a code the error table retries waits on it to
create again (its ``attempt``: the retry it is for, ``create_retries``)."""
Balance = Literal["commit", "rollback"]


# The event of a plain PENDING → CREATING (also written by a start that needs no read).
START_EVENT = "start"
# The event of a task skipped because its provider is not configured.
UNKNOWN_PROVIDER_EVENT = "provider.unknown"
# The event of a declined create that waits to be made again (the error table's retry).
RETRY_EVENT = "create.declined.retry"


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
    # Creates made again at this provider after a retried decline (the error table's retry).
    create_retries: int = 0
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


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Begin the attempt: freeze, then create the provider order.

    ``resume`` (the default): the task may already be CREATING from an earlier delivery that
    died mid-create. False: the handler that delivers it committed PENDING → CREATING a moment
    ago and goes on with the calls.
    """

    resume: bool = True
    # The rate-limit slot its create was admitted on (:class:`Gate`): not sent before it.
    not_before: datetime | None = None


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

    # ``returned``: paid, then returned by the provider (``code`` its return code).
    status: Literal["pending", "succeeded", "failed", "cancelled", "absent", "returned"]
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
    # The call that got no answer; no default: a poll's timeout read as a create's would
    # leave a recheck waiting for ever.
    source: AnswerSource


@dataclass(frozen=True)
class TimerFired:
    kind: TimerKind
    attempt: int


@dataclass(frozen=True)
class Resolve:
    """Support resolved a manual check. ``unverified``: apply a negative decision even when
    the provider cannot confirm it (it does not answer), on the operator's word, audited so."""

    positive: bool
    reason: str
    actor: str
    unverified: bool = False


@dataclass(frozen=True)
class CancelRequested:
    reason: str | None = None


@dataclass(frozen=True)
class ProviderChecked:
    """The provider's answer to the query (a status poll, then a cancel) made before support's
    negative decision is applied: a negative decision says the provider will never pay."""

    resolve: Resolve
    answer: ProviderAnswer | Ambiguous


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
    | ProviderChecked
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
class Changes:
    """The task fields a step sets (``UNSET``: unchanged), and what only its audit row keeps
    (``resolution``, ``resolved_by``, ``provider_check``)."""

    provider_reference: str | UnsetType | None = UNSET
    outcome: Outcome | UnsetType | None = UNSET
    provider_code: str | UnsetType | None = UNSET
    freeze_state: FreezeState | UnsetType = UNSET
    recheck_attempts: int | UnsetType = UNSET
    status_polls: int | UnsetType = UNSET
    create_retries: int | UnsetType = UNSET
    cancel_requested: bool | UnsetType = UNSET
    resolution: str | UnsetType = UNSET
    resolved_by: str | UnsetType = UNSET
    provider_check: str | UnsetType = UNSET

    def items(self) -> dict[str, object]:
        """The fields set, by name."""
        return {name: value for name, value in vars(self).items() if value is not UNSET}


NO_CHANGES = Changes()
_AUDIT_ONLY = frozenset({"resolution", "resolved_by", "provider_check"})


RefusalCode = Literal["provider_paid", "provider_pending", "provider_unreachable"]


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """Why support's negative decision was not applied: the provider paid (the attempt is
    committed instead), the order is pending and not cancelled, or the provider did not
    answer."""

    code: RefusalCode
    message: str


@dataclass(frozen=True, kw_only=True)
class Step:
    """What one event does to one task. ``to is None`` means: the state stays."""

    event: str
    to: TaskState | None = None
    changes: Changes = NO_CHANGES
    # Balance call that must return 200 before the transition may be persisted.
    balance: Balance | None = None
    # I/O whose answer is fed back to decide() as the next event, in this transaction.
    call: Call | None = None
    # Support's decision waiting for the call's answer: it comes back as ProviderChecked.
    awaiting: Resolve | None = None
    # The event to apply in a *new* transaction once this one committed: entering CREATING is
    # committed before the freeze and the create, so a crash mid-call leaves a task the
    # sweeper resumes.
    then: Event | None = None
    timer: Timer | None = None
    clear_timer: bool = False
    # The cascade must not try further providers (error table said stop).
    stop_cascade: bool = False
    # Write the step (version bump and audit row) even when it changes nothing.
    record: bool = True
    # The audit row's details: what the event said.
    details: Mapping[str, object] = field(default_factory=dict)
    ignored_because: str | None = None
    # Ignored for now but not to be dropped: the message is retried later.
    retry: bool = False
    # Support's decision is not applied, and why (the step records that it was refused).
    refusal: Refusal | None = None

    @property
    def ignored(self) -> bool:
        return self.ignored_because is not None

    @property
    def plain(self) -> bool:
        """A state change that needs nothing but its write: no call, no timer, not final."""
        return (
            self.to is not None
            and self.to not in FINAL_TASK_STATES
            and self.to not in (T.CREATING, T.NEGATIVE_EVAL)
            and self.balance is None
            and self.call is None
            and self.then is None
            and self.timer is None
            and not self.stop_cascade
        )


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
    task: OrderTask, config: ProviderConfig, now: datetime, event: str, changes: Changes
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
        timer = _status_timer(config, now, now, attempt=0)
    else:
        due = now + timedelta(seconds=config.webhook_sla_seconds)
        timer = Timer(kind="webhook_timeout", due_at=due, attempt=0)
    return Step(event=event, to=T.EXECUTING, changes=changes, call=call, timer=timer)


def _on_decision(
    task: OrderTask, decision: Decision, code: str, config: ProviderConfig, now: datetime
) -> Step:
    """Apply the provider error table to a definitive refusal at create."""
    if decision == "recheck":
        due = now + timedelta(seconds=recheck_delay(config, task.recheck_attempts))
        return Step(
            event="create.declined.recheck",
            to=T.RECHECKING,
            changes=Changes(provider_code=code),
            timer=Timer(kind="recheck", due_at=due, attempt=task.recheck_attempts),
        )
    if decision == "manual_check":
        return Step(
            event="create.declined.manual", to=T.MANUAL_CHECK, changes=Changes(provider_code=code)
        )
    return Step(
        event="create.declined",
        to=T.NEGATIVE_EVAL,
        changes=Changes(provider_code=code, outcome="declined"),
        balance=_release(task),
        stop_cascade=decision == "stop_cascade",
    )


def _on_retried_decline(
    task: OrderTask, policy: RetryPolicy, code: str, config: ProviderConfig, now: datetime
) -> Step:
    """A decline at create whose code the error table retries. A decline proves the order was
    not created, so creating it again (same order id: should the decline have been wrong, the
    provider deduplicates) cannot pay twice. The freeze stays held while the task waits in
    CREATING on its ``retry`` timer; once ``max_attempts`` creates were declined, the policy's
    ``then`` decides as a plain decision would. A cancel already requested ends it instead."""
    if task.cancel_requested:
        return _cancelled_unsent(task, "create.declined.cancelled", code)
    if task.create_retries + 1 >= policy.max_attempts:
        return _on_decision(task, policy.then, code, config, now)
    retries = task.create_retries + 1
    due = now + timedelta(seconds=policy.delay(task.create_retries))
    return Step(
        event=RETRY_EVENT,
        changes=Changes(provider_code=code, create_retries=retries),
        timer=Timer(kind="retry", due_at=due, attempt=retries),
    )


def _cancelled_unsent(task: OrderTask, event: str, code: str | None = None) -> Step:
    """A CREATING task whose order is proven not created (declined, waiting to be retried),
    cancelled: its freeze is released, and no create follows."""
    return Step(
        event=event,
        to=T.CANCELLED,
        changes=Changes(
            outcome="cancelled",
            cancel_requested=True,
            provider_code=code if code is not None else UNSET,
        ),
        balance=_release(task),
        clear_timer=True,
    )


def _release(task: OrderTask) -> Balance | None:
    """The balance call that ends an attempt without payment: a rollback of what it holds."""
    return "rollback" if task.freeze_state == "frozen" else None


def _final_answer(task: OrderTask, answer: ProviderAnswer, event: str) -> Step | None:
    """A final provider status, wherever it comes from; None if the answer is not final."""
    reference: str | UnsetType | None = answer.reference if answer.reference else UNSET
    if answer.status == "succeeded":
        # Commit even when a cancel was requested: a success that won the race is kept.
        return Step(
            event=event + ".succeeded",
            to=T.SUCCEEDED,
            changes=Changes(provider_reference=reference),
            balance="commit",
            clear_timer=True,
        )
    if answer.status in ("failed", "cancelled", "absent"):
        outcome: Outcome
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
            changes=Changes(
                provider_reference=reference, outcome=outcome, provider_code=answer.code
            ),
            balance=_release(task),
            clear_timer=True,
        )
    return None


def _cancelled(event: str) -> Step:
    """A task that never reached a provider, cancelled: nothing is held, nothing to ask."""
    return Step(event=event, to=T.CANCELLED, changes=Changes(outcome="cancelled"))


def decide(task: OrderTask, event: Event, config: ProviderConfig, now: datetime) -> Step:
    """The one function that applies an event to a task. Pure; see the module docstring."""
    step = _decide(task, event, config, now)
    if step.ignored:
        return step
    return dataclasses.replace(step, details=event_details(event))


def _decide(task: OrderTask, event: Event, config: ProviderConfig, now: datetime) -> Step:
    if isinstance(event, ProviderAnswer) and event.status == "returned":
        step = _decide_returned(task, event)
        if task.state == T.CREATING and not step.ignored:
            # Answered by the create, sent only after cascade-core held the amount.
            step = dataclasses.replace(
                step, changes=dataclasses.replace(step.changes, freeze_state="frozen")
            )
        return step
    if task.final:
        return ignore(type(event).__name__, f"task is final ({task.state})")
    if task.state == T.CREATING and _answers_create(event):
        # The create was sent only after cascade-core held the amount: the task holds it now.
        held = dataclasses.replace(task, freeze_state="frozen")
        step = _decide_event(held, event, config, now)
        return dataclasses.replace(
            step, changes=dataclasses.replace(step.changes, freeze_state="frozen")
        )
    return _decide_event(task, event, config, now)


def _decide_returned(task: OrderTask, answer: ProviderAnswer) -> Step:
    """A provider reporting our order returned after it paid. Only a SUCCEEDED attempt,
    told by a verified webhook or a status poll, moves to RETURNED; no balance call follows
    (cascade-core has no reversal: finance settles it from the reconciliation's ``return``
    alert) and the queue stays COMPLETED. An attempt still in flight (creating, rechecking,
    executing) told its order was returned goes to MANUAL_CHECK, freeze held: the provider
    says it paid, so it cannot fail, and the money came back, so it cannot be committed.
    Anywhere else (a final or manual-check task) it is ignored and logged; it never moves
    money."""
    event = f"{answer.source}.returned"
    if task.state == T.SUCCEEDED and answer.source in ("webhook", "poll"):
        return Step(event=event, to=T.RETURNED, changes=Changes(provider_code=answer.code))
    in_flight = (task.state == T.CREATING and answer.source == "create") or (
        task.state in (T.RECHECKING, T.EXECUTING) and answer.source in ("poll", "webhook")
    )
    if in_flight:
        # The provider says it paid this order and it came back: not a failure (it paid),
        # not a success we could commit (it came back). A person decides; the freeze stays.
        reference: str | UnsetType | None = answer.reference if answer.reference else UNSET
        return Step(
            event=event,
            to=T.MANUAL_CHECK,
            changes=Changes(provider_code=answer.code, provider_reference=reference),
            clear_timer=True,
        )
    return ignore(event, f"a return for a task in {task.state}, not SUCCEEDED")


def _answers_create(event: Event) -> bool:
    return isinstance(event, Declined) or (
        isinstance(event, ProviderAnswer | Ambiguous) and event.source == "create"
    )


def _decide_event(task: OrderTask, event: Event, config: ProviderConfig, now: datetime) -> Step:
    match event:
        case Start(resume=resume):
            return _decide_start(task, resume)
        case FreezeRefused(code=code):
            if task.state != T.CREATING:
                return ignore("freeze.refused", f"task is {task.state}")
            return Step(
                event="freeze.refused",
                to=T.NEGATIVE_EVAL,
                changes=Changes(provider_code=code, outcome="provider_error"),
            )
        case FreezeRolledBack():
            if task.state != T.CREATING:
                return ignore("freeze.rolled_back", f"task is {task.state}")
            cancelled = task.cancel_requested
            return Step(
                event="freeze.rolled_back",
                to=T.CANCELLED if cancelled else T.FAILED,
                changes=Changes(
                    outcome="cancelled" if cancelled else "provider_error",
                    provider_code="freeze_rolled_back",
                    freeze_state="rolled_back",
                ),
                clear_timer=True,
                stop_cascade=not cancelled,
            )
        case FreezeCommitted():
            if task.state != T.CREATING:
                return ignore("freeze.committed", f"task is {task.state}")
            return Step(
                event="freeze.committed",
                to=T.SUCCEEDED,
                changes=Changes(freeze_state="committed"),
                clear_timer=True,
            )
        case Declined(code=code):
            if task.state != T.CREATING:
                return ignore("create.declined", f"task is {task.state}")
            policy = config.retry_for(code)
            if policy is not None:
                return _on_retried_decline(task, policy, code, config, now)
            return _on_decision(task, config.decision_for(code), code, config, now)
        case Ambiguous(detail=detail, source=source):
            return _decide_ambiguous(task, detail, source, config, now)
        case ProviderAnswer() as answer:
            return _decide_answer(task, answer, config, now)
        case TimerFired(kind=kind, attempt=attempt):
            return _decide_timer(task, kind, attempt, config)
        case Resolve() as resolve:
            return _decide_resolve(task, resolve, can_ask=True)
        case ProviderChecked(resolve=resolve, answer=answer):
            return _decide_checked(task, resolve, answer, config)
        case CancelRequested():
            return _decide_cancel(task, config)
    raise AssertionError(f"unhandled event {event!r}")  # pragma: no cover


def _decide_start(task: OrderTask, resume: bool) -> Step:
    if task.state == T.PENDING:
        if task.cancel_requested:
            return _cancelled("start.cancelled")
        return Step(event=START_EVENT, to=T.CREATING, then=Start(resume=False))
    if task.state == T.CREATING and task.timer_kind == "retry":
        # A redelivered start must not cut the backoff short: the retry timer (re-fired by
        # the sweeper if the broker lost it) is what creates again.
        return ignore("start", "waiting to retry the create")
    if task.state == T.CREATING:
        if not resume and task.cancel_requested and task.create_retries:
            # A retry's firing was committed, then the cancel came before its create: the
            # earlier creates were declined, this one is not sent, nothing can pay.
            return _cancelled_unsent(task, "start.cancelled")
        if not resume:
            # The handler's own PENDING → CREATING row already says what happens.
            return Step(event="start.create", call="freeze_and_create", record=False)
        # Redelivery after a crash mid-create: both calls are idempotent, redo them.
        return Step(event="start.resume", call="freeze_and_create")
    return ignore("start", f"task already {task.state}")


def _decide_ambiguous(
    task: OrderTask, detail: str, source: AnswerSource, config: ProviderConfig, now: datetime
) -> Step:
    if task.state == T.CREATING and source == "create":
        due = now + timedelta(seconds=recheck_delay(config, 0))
        return Step(
            event="create.ambiguous",
            to=T.RECHECKING,
            changes=Changes(provider_code=detail[:200]),
            timer=Timer(kind="recheck", due_at=due, attempt=0),
        )
    if source == "poll" and task.state in (T.RECHECKING, T.EXECUTING):
        return after_poll_pending(task, config, now)
    return ignore("ambiguous", f"task is {task.state}")


def _decide_resolve(task: OrderTask, resolve: Resolve, *, can_ask: bool) -> Step:
    """Support's decision. A negative one says the provider will never pay: before the
    cascade moves on (and another provider may pay), the provider is asked, where it can be
    (``can_ask``), and its answer decides (:func:`_decide_checked`)."""
    if task.state != T.MANUAL_CHECK:
        return ignore("manual.resolve", f"task is {task.state}, not MANUAL_CHECK")
    if resolve.positive:
        return Step(
            event="manual.resolved.positive",
            to=T.SUCCEEDED,
            balance="commit",
            changes=Changes(resolution=resolve.reason, resolved_by=resolve.actor),
        )
    if can_ask:
        return Step(event="manual.check", call="poll", awaiting=resolve, record=False)
    return _resolved_negative(task, resolve, "unverified: provider not configured")


def _resolved_negative(task: OrderTask, resolve: Resolve, check: str) -> Step:
    return Step(
        event="manual.resolved.negative",
        to=T.FAILED,
        balance=_release(task),
        changes=Changes(
            outcome="manual_rejected",
            resolution=resolve.reason,
            resolved_by=resolve.actor,
            provider_check=check,
        ),
    )


def _decide_checked(
    task: OrderTask, resolve: Resolve, answer: ProviderAnswer | Ambiguous, config: ProviderConfig
) -> Step:
    """A negative decision, with the provider's answer. A success wins over the decision (the
    attempt is committed, the decision refused); a failed, cancelled or never-accepted absent
    order confirms it; a pending one is cancelled at the provider first where it can be, and
    the decision is refused until a cancel is confirmed; no answer (a timeout, an error, an
    answer that does not decode, a 404 for an order accepted earlier) proves nothing, as
    everywhere: refused, unless the operator applies it unverified. A refusal is recorded
    (the decision, its reason, the provider's answer), and changes nothing else."""
    if task.state != T.MANUAL_CHECK:
        return ignore("manual.resolve", f"task is {task.state}, not MANUAL_CHECK")
    if isinstance(answer, Ambiguous) and answer.source == "cancel":
        return _refused(resolve, "provider_pending", f"cancel: {answer.detail[:200]}")
    accepted_once = task.provider_reference is not None
    # A return (paid, then sent back) no more proves that the order will not pay than a
    # silence does: only the operator's word applies the decision.
    if (
        isinstance(answer, Ambiguous)
        or answer.status == "returned"
        or (answer.status == "absent" and accepted_once)
    ):
        check = answer.detail[:200] if isinstance(answer, Ambiguous) else f"poll: {answer.status}"
        if resolve.unverified:
            return _resolved_negative(task, resolve, f"unverified ({check})")
        return _refused(resolve, "provider_unreachable", check)
    if answer.status == "succeeded":
        reference = answer.reference or task.provider_reference or task.provider_order_id
        message = f"the provider reports order {reference} succeeded: it is committed"
        return Step(
            event="manual.refused.provider_paid",
            to=T.SUCCEEDED,
            balance="commit",
            changes=Changes(
                provider_reference=answer.reference if answer.reference else UNSET,
                resolution=resolve.reason,
                resolved_by=resolve.actor,
                provider_check=f"{answer.source}: succeeded",
            ),
            clear_timer=True,
            refusal=Refusal(code="provider_paid", message=message),
        )
    if answer.status != "pending":
        return _resolved_negative(task, resolve, f"{answer.source}: {answer.status}")
    if answer.source == "poll" and config.supports_cancel:
        return Step(
            event="manual.cancel", call="cancel_at_provider", awaiting=resolve, record=False
        )
    return _refused(resolve, "provider_pending", f"{answer.source}: pending")


_REFUSALS: Mapping[RefusalCode, str] = {
    "provider_paid": "the provider reports the order succeeded",
    "provider_pending": "the order is pending at the provider and no cancel of it is confirmed:"
    " it may still pay; wait for its outcome",
    "provider_unreachable": "the provider could not confirm that it will not pay; send the"
    ' decision again later, or with "unverified": true to apply it on your word',
}


def _refused(resolve: Resolve, code: RefusalCode, check: str) -> Step:
    """Support's negative decision, refused: recorded in the audit, nothing else changes."""
    return Step(
        event=f"manual.refused.{code}",
        changes=Changes(resolution=resolve.reason, resolved_by=resolve.actor, provider_check=check),
        refusal=Refusal(code=code, message=f"{_REFUSALS[code]} ({check})"),
    )


def _decide_cancel(task: OrderTask, config: ProviderConfig) -> Step:
    if task.state == T.PENDING:
        return _cancelled("cancel")
    if task.state == T.CREATING and task.timer_kind == "retry":
        # Declined, so not created, and no create in flight (a retry's firing is committed
        # before its create): nothing at the provider can still pay.
        return _cancelled_unsent(task, "cancel.retry_dropped")
    if task.cancel_requested:
        return ignore("cancel", "cancel already requested")
    if task.state == T.EXECUTING and config.supports_cancel:
        return Step(
            event="cancel.requested",
            changes=Changes(cancel_requested=True),
            call="cancel_at_provider",
        )
    # The provider may still pay: remember the request, finish when the outcome is known.
    return Step(event="cancel.requested", changes=Changes(cancel_requested=True))


def _decide_answer(
    task: OrderTask, answer: ProviderAnswer, config: ProviderConfig, now: datetime
) -> Step:
    source = answer.source
    if source == "poll" and _proves_nothing(task, answer):
        return after_poll_pending(task, config, now)
    reference: str | UnsetType | None = answer.reference
    if task.state == T.CREATING and source == "create":
        final = _final_answer(task, answer, "create")
        if final is not None:
            return final
        return _executing(
            task, config, now, "create.accepted", Changes(provider_reference=reference)
        )
    if task.state == T.RECHECKING:
        final = _final_answer(task, answer, "recheck")
        if final is not None:
            return final
        # Proven to exist and still pending: wait for it like any accepted order.
        return _executing(task, config, now, "recheck.found", Changes(provider_reference=reference))
    if task.state in (T.EXECUTING, T.MANUAL_CHECK):
        if answer.status == "absent":
            # An order we saw accepted cannot be proven absent by a 404: keep waiting for a human.
            return ignore(f"{source}.absent", "order was accepted earlier; 404 is not proof")
        final = _final_answer(task, answer, source)
        if final is not None:
            return final
        return ignore(f"{source}.pending", "progress, not an outcome")
    return ignore(f"{source}.{answer.status}", f"task is {task.state}")


def _proves_nothing(task: OrderTask, answer: ProviderAnswer) -> bool:
    """A poll answer that settles nothing: still pending while executing (while rechecking,
    "pending" is the proof the order exists), or a 404 for an order accepted earlier."""
    if task.state == T.EXECUTING:
        return answer.status in ("pending", "absent")
    return False


def _decide_timer(task: OrderTask, kind: TimerKind, attempt: int, config: ProviderConfig) -> Step:
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
    if kind == "hold":
        # A hold fires as a start message (bus.TIMER_TARGETS), never as a timer event.
        return ignore(event, "a hold timer fires as a start")
    if kind == "retry":
        if not _waits_to_retry(task, attempt):
            return ignore(event, "stale retry timer")
        # Committed before the calls, as PENDING → CREATING is: from here on the task is a
        # create in flight (no timer), which a cancel no longer ends at once and the sweeper
        # resumes after a crash. The same calls as the first create follow: the freeze
        # answers ``frozen`` (held already), the create carries the same order id.
        return Step(event=event, clear_timer=True, then=Start(resume=False))
    if kind == "status_timeout":
        if task.state != T.EXECUTING or attempt != task.status_polls:
            return ignore(event, "stale status timeout")
        # Polled for as long as the provider's settings allow and still pending: a human
        # decides; never FAILED, the provider may still pay.
        return Step(event="status.timeout", to=T.MANUAL_CHECK, clear_timer=True)
    raise AssertionError(kind)  # pragma: no cover


def _waits_to_retry(task: OrderTask, attempt: int) -> bool:
    return (
        task.state == T.CREATING and task.timer_kind == "retry" and attempt == task.create_retries
    )


def after_poll_pending(task: OrderTask, config: ProviderConfig, now: datetime) -> Step:
    """A poll proved nothing: the order is still pending (EXECUTING) or still unknown
    (RECHECKING)."""
    if task.state == T.RECHECKING:
        attempts = task.recheck_attempts + 1
        if attempts >= config.recheck.max_attempts:
            return Step(
                event="recheck.exhausted",
                to=T.MANUAL_CHECK,
                changes=Changes(recheck_attempts=attempts),
                clear_timer=True,
            )
        due = now + timedelta(seconds=recheck_delay(config, attempts))
        return Step(
            event="recheck.unknown",
            changes=Changes(recheck_attempts=attempts),
            timer=Timer(kind="recheck", due_at=due, attempt=attempts),
        )
    polls = task.status_polls + 1
    polling = config.status_polling
    if polling is None or polls >= polling.max_polls:
        return Step(
            event="status.exhausted",
            to=T.MANUAL_CHECK,
            changes=Changes(status_polls=polls),
            clear_timer=True,
        )
    deadline = _polling_deadline(config, task.state_entered_at)
    if deadline is not None and now >= deadline:
        # The poll itself came late (a late timer, a slow provider): no further wait.
        return Step(
            event="status.timeout",
            to=T.MANUAL_CHECK,
            changes=Changes(status_polls=polls),
            clear_timer=True,
        )
    return Step(
        event="status.pending",
        changes=Changes(status_polls=polls),
        timer=_status_timer(config, task.state_entered_at, now, attempt=polls),
    )


def apply_changes(task: OrderTask, step: Step) -> OrderTask:
    """The task as it is after ``step`` (the record's view; checks the transition table)."""
    changes = _task_fields(task, step)
    if not changes:
        return task
    return dataclasses.replace(task, **changes)  # type: ignore[arg-type]


def _task_fields(task: OrderTask, step: Step) -> dict[str, object]:
    """The task fields ``step`` sets, by name; raises :class:`IllegalTransition` if the
    transition table does not allow its state change."""
    if (
        step.to is not None
        and step.to != task.state
        and step.to not in TASK_TRANSITIONS[task.state]
    ):
        raise IllegalTransition(f"{task.state} → {step.to} ({step.event})")
    changes = {k: v for k, v in step.changes.items().items() if k not in _AUDIT_ONLY}
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
    return changes


def event_details(event: Event) -> dict[str, object]:
    """What an event said, as its audit row keeps it."""
    match event:
        case ProviderAnswer(status=status, reference=reference, code=code, source=source):
            return {
                "provider_status": status,
                "reference": reference,
                "code": code,
                "source": source,
            }
        case Ambiguous(detail=detail):
            return {"ambiguous": detail[:300]}
        case FreezeRefused(code=code):
            return {"core_code": code}
        case FreezeRolledBack():
            return {"core_state": "rolled_back"}
        case FreezeCommitted():
            return {"core_state": "committed"}
        case Resolve(positive=positive, reason=reason, actor=actor):
            return {
                "decision": "positive" if positive else "negative",
                "reason": reason,
                "operator": actor,
            }
        case TimerFired(kind=kind, attempt=attempt):
            return {"timer": kind, "attempt": attempt}
        case ProviderChecked(resolve=resolve, answer=answer):
            return {**event_details(resolve), **event_details(answer)}
        case CancelRequested(reason=reason):
            return {"reason": reason}
    return {}


# --- the queue --------------------------------------------------------------------------


def may_start(queue: OrderQueue, task: OrderTask) -> bool:
    """Whether ``task`` is the queue's next attempt: an active queue with no attempt running,
    and ``task`` its first pending one.

    A start message for any other task (replayed from the DLQ, published by hand) must not
    create a second live order at another provider: that is how withdrawals get paid twice.
    (Provider health may start a later pending task instead of this one, in the same
    transaction: :func:`plan_start`.)
    """
    if queue.final or queue.cancel_requested or queue.stop_requested:
        return False
    if queue.active_task() is not None:
        return False
    return next_pending(queue) == task


def wants_start(queue: OrderQueue, task: OrderTask, event: Event) -> bool:
    """Whether ``event`` starts the queue's next attempt: a start (the first, a repeated one,
    or its hold timer firing) of its first pending task while nothing runs. Provider health
    then says which attempt starts (:func:`plan_start`)."""
    return (
        isinstance(event, Start)
        and task.state == T.PENDING
        and not task.cancel_requested
        and may_start(queue, task)
    )


def next_pending(queue: OrderQueue) -> OrderTask | None:
    """The queue's first pending task (in cascade order), if any."""
    return next((t for t in queue.tasks if t.state == T.PENDING), None)


def decide_in_queue(
    queue: OrderQueue,
    task_id: uuid.UUID,
    event: Event,
    config: ProviderConfig | None,
    now: datetime,
) -> Step:
    """:func:`decide` with what the queue knows: a start out of turn is ignored, a task whose
    provider is not configured is skipped when it would start (and ignores anything else)."""
    task = queue.task(task_id)
    if isinstance(event, Start) and task.state == T.PENDING and not may_start(queue, task):
        step = ignore("start", "not this queue's next attempt")
    elif (
        config is not None
        and queue.cancel_requested
        and isinstance(event, TimerFired)
        and event.kind == "retry"
        and _waits_to_retry(task, event.attempt)
    ):
        # The withdrawal's cancel has not reached the task yet (cut off by a crash): it does
        # now, instead of a create after the cancel.
        step = decide(task, CancelRequested(), config, now)
    elif config is None:
        step = _unknown_provider(task, event)
    else:
        step = decide(task, event, config, now)
    if (
        step.ignored
        and (task.state == T.CREATING or config is None)
        and isinstance(event, ProviderAnswer)
        and event.source == "webhook"
    ):
        # The create's outcome is not recorded yet (a crash cut it off; the sweeper resumes
        # it), or this worker's providers file lacks the provider the intake knew (a deploy
        # in progress): the webhook must come back later, not be dropped.
        return dataclasses.replace(step, retry=True)
    return step


def _unknown_provider(task: OrderTask, event: Event) -> Step:
    """A task whose provider is not in the providers file (any more): skipped if it has not
    started; support's decision on its manual check still applies (deciding needs no provider
    setting); anything else waits for the provider to be configured again."""
    if task.state == T.PENDING and isinstance(event, Start):
        return Step(
            event=UNKNOWN_PROVIDER_EVENT,
            to=T.SKIPPED,
            changes=Changes(outcome="provider_error", provider_code="unknown_provider"),
        )
    if isinstance(event, Resolve) and not task.final:
        step = _decide_resolve(task, event, can_ask=False)
        return step if step.ignored else dataclasses.replace(step, details=event_details(event))
    return ignore(type(event).__name__, "provider not configured")


def plain_start(queue: OrderQueue, task: OrderTask, config: ProviderConfig | None) -> bool:
    """Whether starting ``task`` is a plain PENDING → CREATING: the queue's next attempt, a
    configured provider, nothing else to write (a start published with the versions it was
    decided on may then be written without a read)."""
    if config is None or task.state != T.PENDING or not may_start(queue, task):
        return False
    step = _decide_start(task, resume=True)
    return step.to == T.CREATING and step.changes == NO_CHANGES


# --- provider health: which attempt starts now ------------------------------------------

GateVerdict = Literal["admit", "pass_over", "wait"]


@dataclass(frozen=True, kw_only=True)
class Gate:
    """What provider health says about starting an attempt at its provider now.

    ``admit``: start it (``probe``: as the one half-open probe of the fleet). ``pass_over``:
    its breaker is open (or half-open with the probe taken): a later provider of the cascade
    may go first; ``retry_at`` says when it may be worth asking again. ``wait``: the
    provider's rate or in-flight limit is reached: the attempt waits for a slot until
    ``retry_at``, and is never failed nor passed over for it (a limit is a queue, not an
    outage, and the cascade order is the merchant's preference).
    """

    verdict: GateVerdict
    reason: str = ""
    retry_at: datetime | None = None
    probe: bool = False
    # Admitted on a rate-limit slot due this soon: the create waits for it in-process.
    not_before: datetime | None = None


def turn_began(queue: OrderQueue) -> datetime | None:
    """When the queue started waiting for its next attempt: when its last attempt ended, or
    when it was created (its first task's entry into PENDING)."""
    times = [t.state_entered_at for t in queue.tasks if t.final or t.position == 0]
    known = [at for at in times if at is not None]
    return max(known) if known else None


def hold_deadline(queue: OrderQueue, config: ProviderConfig, now: datetime) -> datetime:
    """Until when the queue may wait for a provider to recover, by its next attempt's
    provider's ``hold_seconds``; after that its next attempt is made, breaker or not."""
    began = turn_began(queue) or now
    return began + timedelta(seconds=config.hold_seconds)


def plan_start(
    queue: OrderQueue,
    gates: Sequence[tuple[OrderTask, Gate]],
    now: datetime,
    hold_until: datetime,
) -> tuple[Transition, OrderTask | None]:
    """Start the queue's next attempt by what provider health said, task by task in cascade
    order (``gates``: the first pending task first, ending at the first that is not passed
    over). Returns the transition and the task that enters CREATING, if one does.

    - the last one admitted: each passed-over task keeps an audit row saying why, and the
      admitted one enters CREATING (its calls follow in a transaction of their own);
    - the last one waits for a limit: the queue waits on its first pending task's hold timer
      until the slot is due, however long that takes (a limit never fails an attempt);
    - all passed over: the queue holds, on the same timer, until the earliest provider may
      have recovered, at the latest until ``hold_until``.
    Every wait is one audit row on the first pending task, naming what it waits for.
    """
    settling = _Settling(queue, now)
    first = gates[0][0]
    *before, (last, gate) = gates
    if gate.verdict == "admit":
        for task, passed in before:
            settling.task(task, _passed_over(task, passed))
        if gate.reason:
            event = f"start.{gate.reason}"
        else:
            event = "start.after_pass_over" if before else START_EVENT
        chosen = settling.task(
            settling.queue.task(last.task_id),
            Step(
                event=event,
                to=T.CREATING,
                clear_timer=True,
                details=_gate_details(last, gate) if event != START_EVENT else {},
            ),
        )
        return settling.result(), chosen
    if gate.verdict == "pass_over":
        # Until the first provider may have recovered, at the latest until the hold ends;
        # never sooner than a second on (a hold is not a loop).
        retries = [g.retry_at for _, g in gates if g.retry_at is not None]
        due = max(min([hold_until, *retries]), now + _MIN_WAIT)
    else:
        # A limit never ends a wait: it lasts until the slot (hold_seconds do not apply).
        due = max(gate.retry_at or now, now)
    step = Step(
        event="start.held" if gate.verdict == "pass_over" else "start.waiting",
        # The generation is the task's version: each arming is fired again by the sweeper
        # should it be lost, not taken for a duplicate of the one before.
        timer=Timer(kind="hold", due_at=due, attempt=first.version),
        details={
            "until": due.isoformat(),
            "providers": [_gate_details(task, g) for task, g in gates],
        },
    )
    settling.task(first, step)
    return settling.result(), None


_MIN_WAIT = timedelta(seconds=1)


def _passed_over(task: OrderTask, gate: Gate) -> Step:
    return Step(event="start.passed_over", clear_timer=True, details=_gate_details(task, gate))


def _gate_details(task: OrderTask, gate: Gate) -> dict[str, object]:
    details: dict[str, object] = {"provider_id": task.provider_id, "gate": gate.verdict}
    if gate.reason:
        details["reason"] = gate.reason
    if gate.retry_at is not None:
        details["retry_at"] = gate.retry_at.isoformat()
    return details


@dataclass(frozen=True, kw_only=True)
class TaskChange:
    """One task write: the version-checked update from ``before`` to ``after`` and its audit
    row; the timer to arm with it, and the pending schedule it cancels."""

    before: OrderTask
    after: OrderTask
    event: str
    details: Mapping[str, object]
    timer: Timer | None = None
    clear_timer: bool = False
    purge: TimerKind | None = None

    @property
    def changed(self) -> bool:
        return self.after.state != self.before.state


@dataclass(frozen=True, kw_only=True)
class QueueChange:
    """One queue write: the version-checked update from ``before`` to ``after`` and its audit
    row."""

    before: OrderQueue
    after: OrderQueue
    event: str
    cancel_reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class Transition:
    """What one step did to a queue: the queue afterwards, every write in order, the task to
    start next and, when the queue became final, its final state."""

    queue: OrderQueue
    at: datetime
    changes: tuple[TaskChange | QueueChange, ...] = ()
    start: OrderTask | None = None
    finished: QueueState | None = None


class _Settling:
    """A queue being changed step by step: each change checked, recorded and applied."""

    def __init__(self, queue: OrderQueue, now: datetime) -> None:
        self.queue = queue
        self.now = now
        self.changes: list[TaskChange | QueueChange] = []
        self.start: OrderTask | None = None
        self.finished: QueueState | None = None

    def task(self, task: OrderTask, step: Step, fired: TimerKind | None = None) -> OrderTask:
        """Record ``step`` on ``task``: the version bump, and the new state's entry time."""
        fields = _task_fields(task, step)
        fields["version"] = task.version + 1
        purge = None
        moved = fields.get("state", task.state) != task.state
        if moved:
            fields["state_entered_at"] = self.now
        if (moved or step.clear_timer) and task.timer_kind not in (None, fired):
            purge = task.timer_kind  # the one timer it waited on, unless spent firing
        after = dataclasses.replace(task, **fields)  # type: ignore[arg-type]
        self.changes.append(
            TaskChange(
                before=task,
                after=after,
                event=step.event,
                details=_audit_details(step),
                timer=step.timer,
                clear_timer=step.clear_timer,
                purge=purge,
            )
        )
        self.queue = dataclasses.replace(
            self.queue,
            tasks=tuple(after if t.task_id == after.task_id else t for t in self.queue.tasks),
        )
        return after

    def flag(self, event: str, *, cancel: bool = False, cancel_reason: str | None = None) -> None:
        """Set the queue's cancel flag (``cancel``) or else its stop flag."""
        before = self.queue
        if cancel:
            self.queue = dataclasses.replace(
                before, version=before.version + 1, cancel_requested=True
            )
        else:
            self.queue = dataclasses.replace(
                before, version=before.version + 1, stop_requested=True
            )
        self.changes.append(
            QueueChange(before=before, after=self.queue, event=event, cancel_reason=cancel_reason)
        )

    def advance(self) -> None:
        """Queue rules: a success completes it; otherwise the next task runs; none left →
        FAILED (CANCELLED when cancelled)."""
        queue = self.queue
        if queue.final:
            return
        tasks = queue.tasks
        pending = [t for t in tasks if t.state == T.PENDING]
        if any(t.state == T.SUCCEEDED for t in tasks):
            self._finish(QueueState.COMPLETED, None, skip=pending)
        elif queue.active_task() is not None:
            return
        elif queue.cancel_requested:
            for t in pending:
                self.task(t, _cancelled("queue.cancelled"))
            self._finish(QueueState.CANCELLED, "cancelled", skip=[])
        elif queue.stop_requested or not pending:
            # The last attempt made: provider health may have made them out of cascade order.
            last = next((t for t in reversed(in_attempt_order(tasks)) if t.outcome), None)
            code: Outcome = last.outcome if last and last.outcome else "provider_error"
            final = QueueState.CANCELLED if code == "cancelled" else QueueState.FAILED
            self._finish(final, code, skip=pending)
        else:
            self.start = pending[0]

    def _finish(self, state: QueueState, code: Outcome | None, skip: list[OrderTask]) -> None:
        for t in skip:
            self.task(t, Step(event="queue.finished", to=T.SKIPPED))
        before = self.queue
        if state not in QUEUE_TRANSITIONS[before.state]:
            raise IllegalTransition(f"queue {before.state} → {state}")
        self.queue = dataclasses.replace(
            before,
            state=state,
            version=before.version + 1,
            failure_code=code or before.failure_code,
        )
        self.changes.append(
            QueueChange(before=before, after=self.queue, event=f"queue.{state.value.lower()}")
        )
        self.finished = state

    def result(self) -> Transition:
        return Transition(
            queue=self.queue,
            at=self.now,
            changes=tuple(self.changes),
            start=self.start,
            finished=self.finished,
        )


def settle(
    queue: OrderQueue,
    task_id: uuid.UUID,
    step: Step,
    now: datetime,
    *,
    fired: TimerKind | None = None,
) -> Transition:
    """Apply ``step`` (not ignored) to its task and the queue rules after it.

    NEGATIVE_EVAL is passed through to SKIPPED at once; a step that stops the cascade sets the
    queue's stop flag; a task that became final advances the queue (the next attempt, or the
    queue's final state with the untried tasks skipped or cancelled). ``fired``: the timer
    whose firing is being handled (its schedule is spent, nothing to cancel).
    """
    settling = _Settling(queue, now)
    task = queue.task(task_id)
    if step.record:
        task = settling.task(task, step, fired)
        if task.state == T.NEGATIVE_EVAL:
            task = settling.task(task, Step(event="task.skipped", to=T.SKIPPED, clear_timer=True))
    if step.stop_cascade and not settling.queue.stop_requested:
        settling.flag("queue.stop_requested")
    if task.final:
        settling.advance()
    return settling.result()


def request_cancel(queue: OrderQueue, reason: str | None, now: datetime) -> Transition:
    """A queue-level cancel: the flag, every task that has not started cancelled, and the
    queue's final state at once when no task is running. A running task is told separately
    (:class:`CancelRequested`): the provider may still pay, so it finishes when it can."""
    settling = _Settling(queue, now)
    if queue.final or queue.cancel_requested:
        return settling.result()
    settling.flag("queue.cancel_requested", cancel=True, cancel_reason=reason)
    for t in queue.tasks:
        if t.state == T.PENDING:
            settling.task(t, _cancelled("cancel"))
    if settling.queue.active_task() is None:
        settling.advance()
    return settling.result()


def _audit_details(step: Step) -> dict[str, object]:
    """An audit row's details: the event's, the step's changes, the balance call."""
    audit = {**step.details, **step.changes.items()}
    if step.balance:
        audit["balance"] = step.balance
    return audit


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


def in_attempt_order(tasks: Sequence[OrderTask]) -> list[OrderTask]:
    """Tasks in the order their attempts were made: by when each entered its current state
    (for a final one, when it ended), then by cascade position. The same as cascade order
    unless provider health passed a provider over and came back to it."""
    return sorted(tasks, key=lambda t: (t.state_entered_at or _LONG_AGO, t.position))


_LONG_AGO = datetime(1970, 1, 1, tzinfo=UTC)


def public_state(queue: OrderQueue) -> PublicState:
    """The only mapping from internal states to the legacy API's four statuses.

    Total over every combination: manual checks, rechecks and skipped providers all read
    ``processing`` while the queue is active; the failure code appears only when final.
    """
    tasks = queue.tasks
    # A returned payout still shows: the public status stays succeeded (README, *Returns*).
    shown = next((t for t in tasks if t.state in (T.SUCCEEDED, T.RETURNED)), None)
    if shown is None:
        ordered = in_attempt_order(tasks)
        started = [t for t in ordered if t.state != T.PENDING and t.provider_reference is not None]
        touched = [t for t in ordered if t.state != T.PENDING and _attempted(t)]
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
