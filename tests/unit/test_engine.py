"""The engine's handlers, through the real :class:`~orchestrator.engine.Engine`, on fakes.

Every scenario drives withdrawals through the entry points the worker, the webhook intake and
the ops API call (``start_task``, ``webhook``, ``timer_fired``, ``timers_fired``, ``resolve``,
``cancel_queue``) with the in-memory record, cascade-core and providers of
``tests/unit/fakes.py``, asserts what it is about, and then the money-safety invariants
(:func:`check_money_safety`). ``test_every_transition_is_exercised`` runs them all again and
checks that together they walk every edge of both transition tables.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, cast

import msgspec
import pytest
from prometheus_client import REGISTRY

from contracts.messages import StartSeen, TaskMessage, WebhookMessage
from contracts.provider import ProviderDestination
from contracts.providers_file import (
    Decision,
    ProviderConfig,
    RecheckPolicy,
    RetryPolicy,
    StatusPolling,
)
from orchestrator import bus, store
from orchestrator.core_client import CoreRefused, CoreUnavailable
from orchestrator.domain import (
    FINAL_TASK_STATES,
    QUEUE_TRANSITIONS,
    RETRY_EVENT,
    TASK_TRANSITIONS,
    Ambiguous,
    Declined,
    OrderQueue,
    OrderTask,
    ProviderAnswer,
    QueueState,
    Step,
    TaskState,
    TimerKind,
    public_state,
    settle,
)
from orchestrator.engine import Engine, ResolutionRefused, RetryLater, TimerDue
from orchestrator.outbox import OutboxRelay
from tests.unit.fakes import (
    FakeCore,
    FakeEngineStore,
    FakeProviders,
    FakeRelay,
    FixedClock,
    Journal,
    QueueLocked,
)

T = TaskState
Q = QueueState
NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ERRORS: dict[str, Decision] = {
    "closed": "stop_cascade",
    "slow": "recheck",
    "review": "manual_check",
}
RECHECK = RecheckPolicy(initial_delay_seconds=1, multiplier=2, max_delay_seconds=60, max_attempts=3)


def _config(name: str, **settings: Any) -> ProviderConfig:
    base: dict[str, Any] = {
        "base_url": f"http://{name}.invalid",
        "webhook_sla_seconds": 60.0,
        "recheck": RECHECK,
        "errors": ERRORS,
    }
    return ProviderConfig(**(base | settings))


CONFIGS: dict[str, ProviderConfig] = {
    # SLA 60 s, no status polling, no cancel at the provider.
    "p_a": _config("p_a"),
    "p_b": _config("p_b"),
    # After the SLA, a poll every 5 s, 10 at most, for 12 s at most (deadline: +72 s).
    "p_poll": _config(
        "p_poll",
        status_polling=StatusPolling(interval_seconds=5, max_polls=10, timeout_seconds=12),
    ),
    # After the SLA, two polls at most, no deadline.
    "p_poll2": _config("p_poll2", status_polling=StatusPolling(interval_seconds=5, max_polls=2)),
    "p_cancel": _config("p_cancel", supports_cancel=True),
    # No SLA, no polling: an accepted order goes to manual check at once.
    "p_nosla": _config("p_nosla", webhook_sla_seconds=None),
    # "busy" is created again after 5 s, then 10 s: three creates in all, then the next one.
    "p_retry": _config(
        "p_retry",
        errors={
            **ERRORS,
            "busy": RetryPolicy(
                decision="retry", max_attempts=3, base_delay_seconds=5, max_delay_seconds=60
            ),
        },
    ),
}
NAMES = bus.Names(namespace="unit.")
TIMER_KINDS: tuple[TimerKind, ...] = tuple(bus.TIMER_TARGETS)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


# --- the harness --------------------------------------------------------------------------------


@dataclass
class Harness:
    """One engine on fresh fakes, and the calls a scenario makes, in the words of the callers."""

    store: FakeEngineStore
    core: FakeCore
    providers: FakeProviders
    relay: FakeRelay
    clock: FixedClock
    engine: Engine
    journal: Journal
    # The start the gateway publishes with each new withdrawal, by task.
    created_starts: dict[uuid.UUID, TaskMessage] = field(default_factory=dict)

    def reconfigure(self, configs: dict[str, ProviderConfig]) -> None:
        """The engine of a process started with another providers file, on the same fakes."""
        self.engine = _engine(
            self.store, self.core, self.providers, self.relay, self.clock, configs
        )

    def withdrawal(self, *providers: str) -> OrderQueue:
        queue = self.store.add_withdrawal(providers, configs=CONFIGS, now=self.clock())
        first = self.engine.start_message(queue, queue.tasks[0])
        self.created_starts[queue.tasks[0].task_id] = _task_message(first.payload)
        return queue

    def queue(self, queue: OrderQueue) -> OrderQueue:
        return self.store.queue(queue.queue_id)

    def task(self, queue: OrderQueue, position: int = 0) -> OrderTask:
        return self.store.queue(queue.queue_id).tasks[position]

    def states(self, queue: OrderQueue) -> tuple[QueueState, tuple[TaskState, ...]]:
        fresh = self.queue(queue)
        return fresh.state, tuple(t.state for t in fresh.tasks)

    def start_message(self, task: OrderTask) -> TaskMessage:
        """The start the worker receives for ``task``: the last the engine published, else
        the gateway's, else one published by hand (no versions)."""
        for message in reversed(self.store.published):
            if message.subject == NAMES.subject(bus.TASK_START):
                payload = _task_message(message.payload)
                if payload.task_id == task.task_id:
                    return payload
        created = self.created_starts.get(task.task_id)
        return created or TaskMessage(task_id=task.task_id, queue_id=task.queue_id)

    async def start(self, queue: OrderQueue, position: int = 0, *, seen: bool = True) -> None:
        """Deliver the task's start as the worker does, with the versions its message
        carries (``seen=False``: as a message published before they existed)."""
        message = self.start_message(queue.tasks[position])
        await self.engine.start_task(
            message.queue_id,
            message.task_id,
            actor="worker",
            trace_id="t1",
            seen=message.seen if seen else None,
        )

    async def webhook(
        self,
        task: OrderTask,
        status: Literal["pending", "succeeded", "failed", "cancelled", "returned"],
        *,
        code: str | None = None,
        reference: str | None = None,
        order_id: str | None = None,
    ) -> bool:
        message = WebhookMessage(
            provider_id=task.provider_id,
            order_id=task.provider_order_id if order_id is None else order_id,
            reference=reference or f"ref-{task.task_id.hex[:8]}",
            status=status,
            code=code,
        )
        return await self.engine.webhook(message, "t2")

    async def fire(self, task: OrderTask, kind: TimerKind, attempt: int = 0) -> None:
        message = TaskMessage(task_id=task.task_id, queue_id=task.queue_id, attempt=attempt)
        await self.engine.timer_fired(message, kind, "t3")

    async def cancel(self, queue: OrderQueue) -> None:
        await self.engine.cancel_queue(queue.queue_id, reason="merchant asked", actor="api")

    async def resolve(
        self, task: OrderTask, *, positive: bool, unverified: bool = False
    ) -> OrderTask | None:
        return await self.engine.resolve(
            task.task_id,
            positive=positive,
            reason="checked with provider",
            actor="ops:ana",
            unverified=unverified,
        )

    # --- what was published, purged, audited -------------------------------------------

    def armed(self, task: OrderTask) -> list[tuple[TimerKind, int, datetime]]:
        """The timers published for ``task``: kind, generation, due time."""
        armed = []
        for message in self.store.published:
            for kind in TIMER_KINDS:
                if message.subject == NAMES.schedule_subject(task.task_id, kind):
                    payload = _task_message(message.payload)
                    assert (payload.task_id, payload.queue_id) == (task.task_id, task.queue_id)
                    due = message.headers["Nats-Schedule"].removeprefix("@at ")
                    when = datetime.strptime(due, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
                    armed.append((kind, payload.attempt, when))
        return armed

    def purged(self, task: OrderTask) -> list[TimerKind]:
        return [
            kind
            for subject in self.store.purged
            for kind in TIMER_KINDS
            if subject == NAMES.schedule_subject(task.task_id, kind)
        ]

    def starts(self) -> list[uuid.UUID]:
        """The tasks whose start message was published, in order."""
        started = []
        for message in self.store.published:
            if message.subject == NAMES.subject(bus.TASK_START):
                payload = _task_message(message.payload)
                assert message.headers["Nats-Msg-Id"].startswith(f"start-{payload.task_id.hex}-")
                started.append(payload.task_id)
        return started

    def events(self, task: OrderTask) -> list[str]:
        return [e.event for e in self.store.audit if e.task_id == task.task_id]

    def queue_events(self, queue: OrderQueue) -> list[str]:
        return [
            e.event for e in self.store.audit if e.queue_id == queue.queue_id and e.task_id is None
        ]

    def creates(self) -> list[str]:
        return [call.order_id for call in self.providers.calls_of("create")]


def _task_message(payload: bytes) -> TaskMessage:
    return msgspec.json.decode(payload, type=TaskMessage)


def _engine(
    record: FakeEngineStore,
    core: FakeCore,
    providers: FakeProviders,
    relay: FakeRelay,
    clock: FixedClock,
    configs: dict[str, ProviderConfig],
) -> Engine:
    # The fake relay has only what the engine uses of an OutboxRelay; no pool is touched.
    return Engine(
        pool=cast(Any, None),
        relay=cast(OutboxRelay, relay),
        core=core,
        providers=providers,
        provider_configs=configs,
        clock=clock,
        record=record,
    )


def harness(configs: dict[str, ProviderConfig] | None = None) -> Harness:
    """An engine on fresh fakes, with ``configs`` (default: :data:`CONFIGS`)."""
    configs = configs or CONFIGS
    journal = Journal()
    record = FakeEngineStore()
    core = FakeCore(journal)
    providers = FakeProviders(configs, journal)
    relay = FakeRelay(NAMES)
    clock = FixedClock(NOW)
    engine = _engine(record, core, providers, relay, clock, configs)
    return Harness(record, core, providers, relay, clock, engine, journal)


def accepted(reference: str = "ref-1") -> ProviderAnswer:
    return ProviderAnswer(status="pending", reference=reference)


def paid(reference: str = "ref-1") -> ProviderAnswer:
    return ProviderAnswer(status="succeeded", reference=reference)


# --- the invariants -----------------------------------------------------------------------------

TASK_EDGES = {(a.value, b.value) for a, targets in TASK_TRANSITIONS.items() for b in targets}
QUEUE_EDGES = {(a.value, b.value) for a, targets in QUEUE_TRANSITIONS.items() for b in targets}
LIVE = {T.CREATING, T.EXECUTING, T.RECHECKING, T.MANUAL_CHECK}


def check_money_safety(h: Harness, *, scripts_used: bool = True) -> None:
    """What must hold after any scenario, whatever it did."""
    for queue in h.store.queues():
        _check_balances(h, queue)
        _check_audit_trail(h, queue)
        _check_queue_outcome(h, queue)
    _check_no_create_without_hold(h)
    if scripts_used:
        assert h.providers.unanswered() == {}, "scripted answers nobody asked for"


def _check_balances(h: Harness, queue: OrderQueue) -> None:
    holds = {
        op: hold for op, hold in h.core.holds.items() if hold.withdrawal_id == queue.withdrawal_id
    }
    committed = [op for op, hold in holds.items() if hold.state == "committed"]
    assert len(committed) <= 1, f"{queue.withdrawal_id}: more than one commit: {committed}"
    for op, hold in holds.items():
        # Settled once, one way; and settled by the time the withdrawal is final.
        assert len(hold.settlements) <= 1, f"{op}: settled {hold.settlements}"
        if queue.final:
            assert hold.state in ("committed", "rolled_back"), f"{op} left {hold.state}"
            assert hold.settlements, f"{op} never settled"
    for task in queue.tasks:
        held = holds.get(str(task.task_id))
        if held is None:
            assert task.freeze_state == "none", f"{task.task_id}: record says {task.freeze_state}"
            assert task.state != T.SUCCEEDED, "a success without a hold"
        elif task.final:
            # The record and the ledger agree on every finished attempt.
            assert task.freeze_state == held.state, (task.state, task.freeze_state, held.state)
            paid_out = task.state in (T.SUCCEEDED, T.RETURNED)  # a return moves no money
            assert paid_out == (held.state == "committed")
    live = [t for t in queue.tasks if t.state in LIVE]
    assert len(live) <= 1, f"two live attempts: {[t.state for t in live]}"
    frozen = [op for op, hold in holds.items() if hold.state == "frozen"]
    assert len(frozen) <= 1, f"two holds at once: {frozen}"


def _check_audit_trail(h: Harness, queue: OrderQueue) -> None:
    """An audit entry per write, each a legal edge, none leaving a final state: replaying a
    task's entries from PENDING ends at its state, one entry per version bump."""
    for task in queue.tasks:
        entries = [e for e in h.store.audit if e.task_id == task.task_id]
        state = T.PENDING.value
        for entry in entries:
            assert entry.from_state == state, (task.task_id, entry.event, entry.from_state, state)
            # A final state is never left, but for SUCCEEDED's one exit, a return.
            returned = (entry.from_state, entry.to_state) == ("SUCCEEDED", "RETURNED")
            assert returned or T(state) not in FINAL_TASK_STATES, f"{entry.event} on a final task"
            if entry.changed:
                assert (entry.from_state, entry.to_state) in TASK_EDGES, entry
            state = entry.to_state
        assert state == task.state.value
        assert len(entries) == task.version - 1, (task.task_id, len(entries), task.version)
    entries = [e for e in h.store.audit if e.queue_id == queue.queue_id and e.task_id is None]
    state = Q.ACTIVE.value
    for entry in entries:
        assert entry.from_state == state
        if entry.changed:
            assert (entry.from_state, entry.to_state) in QUEUE_EDGES, entry
        state = entry.to_state
    assert state == queue.state.value
    assert len(entries) == queue.version - 1


def _check_queue_outcome(h: Harness, queue: OrderQueue) -> None:
    succeeded = [t for t in queue.tasks if t.state in (T.SUCCEEDED, T.RETURNED)]
    assert len(succeeded) <= 1
    rows = [
        row for row in h.store.notifications.values() if row.withdrawal_id == queue.withdrawal_id
    ]
    notified = set(h.core.notified(queue.withdrawal_id))
    if not queue.final:
        assert not rows
        assert not notified
        return
    assert all(t.final for t in queue.tasks), [t.state for t in queue.tasks]
    assert (queue.state == Q.COMPLETED) == bool(succeeded)
    status = public_state(queue).status
    assert [row.status for row in rows] == [status]
    assert notified <= {status}
    body = msgspec.json.decode(rows[0].body)
    assert (body["withdrawal_id"], body["status"]) == (queue.withdrawal_id, status)


def _check_no_create_without_hold(h: Harness) -> None:
    """A provider order is only ever created while this attempt's hold is in place."""
    orders = {t.provider_order_id: t for q in h.store.queues() for t in q.tasks}
    holds: dict[str, str] = {}
    for entry in h.journal.entries:
        if entry.system == "core" and entry.action in ("freeze", "commit", "rollback"):
            if not entry.answer.startswith(("raised", "refused")):
                holds[entry.key] = entry.answer
        elif entry.system == "provider" and entry.action == "create":
            task = orders[entry.key]
            assert holds.get(str(task.task_id)) == "frozen", f"create without a hold: {entry}"
            record, _ = h.store.loaded(task.queue_id)
            order = next(c.order for c in h.providers.calls if c.order_id == entry.key)
            assert order is not None
            assert order.amount == f"{record.amount:.2f}"
            assert order.destination == msgspec.convert(record.destination, ProviderDestination)


def edges(h: Harness) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """The task and queue state changes the record saw."""
    tasks = {(e.from_state, e.to_state) for e in h.store.audit if e.task_id and e.changed}
    queues = {(e.from_state, e.to_state) for e in h.store.audit if not e.task_id and e.changed}
    return tasks, queues


# --- the scenarios ------------------------------------------------------------------------------

Scenario = Callable[[Harness], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(run: Scenario) -> Scenario:
    SCENARIOS[run.__name__] = run
    return run


# start → create


@scenario
async def sync_success_commits_and_completes(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", paid("ref-a"))

    await h.start(q)

    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED, T.SKIPPED))
    t0 = h.task(q)
    assert (t0.freeze_state, t0.provider_reference) == ("committed", "ref-a")
    assert h.core.holds[str(t0.task_id)].state == "committed"
    assert [(e.system, e.action, e.answer) for e in h.journal.entries] == [
        ("core", "freeze", "frozen"),
        ("provider", "create", "succeeded"),
        ("core", "commit", "committed"),
        ("core", "notify", "acked"),
    ]
    order = h.providers.calls_of("create")[0].order
    assert order is not None
    assert (order.order_id, order.amount, order.currency) == (t0.provider_order_id, "250.00", "EUR")
    assert h.events(t0) == ["start", "create.succeeded"]
    assert h.events(h.task(q, 1)) == ["queue.finished"]
    assert h.queue_events(q) == ["queue.completed"]
    # Nothing else starts, no timer is armed or purged.
    assert h.store.published == []
    assert h.store.purged == []
    assert h.core.notified(q.withdrawal_id) == ["succeeded"]
    assert h.relay.deferred.acked == [(q.withdrawal_id, "succeeded")]
    audit = [e for e in h.store.audit if e.task_id == t0.task_id]
    assert {(e.actor, e.trace_id) for e in audit} == {("worker", "t1")}
    assert audit[-1].details["balance"] == "commit"


@scenario
async def a_paid_order_returned_is_recorded_without_moving_money(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", paid("ref-a"))
    await h.start(q)
    t0 = h.task(q)
    journal = len(h.journal.entries)
    counted = REGISTRY.get_sample_value("withdrawals_returned_total", {"cohort": "cascade"})

    # A return for an attempt that never paid, or told twice, changes nothing; the first is
    # kept as a payout after final (a return implies a payout).
    assert not await h.webhook(h.task(q, 1), "returned", code="R01", reference="ref-b")
    assert await h.webhook(t0, "returned", code="R01", reference="ref-a")
    await h.webhook(t0, "returned", code="R01", reference="ref-a")

    assert h.states(q) == (Q.COMPLETED, (T.RETURNED, T.SKIPPED))
    assert h.task(q).provider_code == "R01"
    assert h.events(h.task(q)) == ["start", "create.succeeded", "webhook.returned"]
    assert h.queue_events(q) == ["queue.completed"]
    assert h.journal.entries[journal:] == [], "no balance or provider call, no notification"
    assert h.core.notified(q.withdrawal_id) == ["succeeded"]
    assert h.core.holds[str(t0.task_id)].state == "committed"
    assert [u[4] for u in h.store.unmatched] == ["success_after_final", "task_final"]
    assert (
        REGISTRY.get_sample_value("withdrawals_returned_total", {"cohort": "cascade"})
        == (counted or 0) + 1
    )


@scenario
async def a_start_without_versions_takes_the_locked_path(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    assert h.start_message(q.tasks[0]).seen is not None
    h.providers.on_create("p_a", paid("ref-a"))

    await h.start(q, seen=False)

    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED, T.SKIPPED))
    assert h.events(h.task(q)) == ["start", "create.succeeded"]
    # PENDING → CREATING in a unit of work of its own, then the calls in another.
    assert h.store.units_of_work == 2

    shortcut = h.withdrawal("p_a")
    h.providers.on_create("p_a", paid("ref-b"))
    await h.start(shortcut)
    assert h.states(shortcut) == (Q.COMPLETED, (T.SUCCEEDED,))
    assert h.events(h.task(shortcut)) == ["start", "create.succeeded"]
    assert h.store.units_of_work == 3  # PENDING → CREATING needed none


@scenario
async def decline_rolls_back_and_starts_the_next_provider(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", Declined("insufficient_funds"))

    await h.start(q)

    assert h.states(q) == (Q.ACTIVE, (T.SKIPPED, T.PENDING))
    t0 = h.task(q)
    assert (t0.outcome, t0.provider_code, t0.freeze_state) == (
        "declined",
        "insufficient_funds",
        "rolled_back",
    )
    assert h.core.holds[str(t0.task_id)].settlements == ["rollback"]
    assert h.events(t0) == ["start", "create.declined", "task.skipped"]
    # The next attempt is started through the outbox, deduplicated per task and version by
    # the broker.
    assert h.starts() == [q.tasks[1].task_id]
    start = h.store.published[0]
    assert start.headers["Nats-Msg-Id"] == f"start-{q.tasks[1].task_id.hex}-1"
    assert "traceparent" in start.headers

    h.providers.on_create("p_b", paid())
    await h.start(q, 1)

    assert h.states(q) == (Q.COMPLETED, (T.SKIPPED, T.SUCCEEDED))
    assert public_state(h.queue(q)).provider_id == "p_b"


@scenario
async def create_answered_failed_moves_on(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", ProviderAnswer(status="failed", code="invalid_account"))
    h.providers.on_create("p_b", Declined("do_not_honor"))

    await h.start(q)
    assert h.states(q) == (Q.ACTIVE, (T.FAILED, T.PENDING))
    assert h.events(h.task(q)) == ["start", "create.failed"]
    await h.start(q, 1)

    assert h.states(q) == (Q.FAILED, (T.FAILED, T.SKIPPED))
    assert h.queue(q).failure_code == "declined"
    assert h.core.notified(q.withdrawal_id) == ["failed"]


@scenario
async def decline_that_stops_the_cascade(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", Declined("closed"))

    await h.start(q)

    assert h.states(q) == (Q.FAILED, (T.SKIPPED, T.SKIPPED))
    queue = h.queue(q)
    assert queue.stop_requested
    assert queue.failure_code == "declined"
    assert h.queue_events(q) == ["queue.stop_requested", "queue.failed"]
    assert h.starts() == []
    assert h.creates() == [q.tasks[0].provider_order_id]
    assert h.core.notified(q.withdrawal_id) == ["failed"]


@scenario
async def freeze_refused_skips_to_the_next_provider(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.core.refuse_next("freeze", "insufficient_balance")

    await h.start(q)

    assert h.states(q) == (Q.ACTIVE, (T.SKIPPED, T.PENDING))
    t0 = h.task(q)
    assert (t0.outcome, t0.provider_code, t0.freeze_state) == (
        "provider_error",
        "insufficient_balance",
        "none",
    )
    assert h.events(t0) == ["start", "freeze.refused", "task.skipped"]
    # Nothing was held: no create, no rollback.
    assert h.creates() == []
    assert h.core.holds == {}
    assert h.starts() == [q.tasks[1].task_id]

    h.core.refuse_next("freeze", "insufficient_balance")
    await h.start(q, 1)

    assert h.states(q) == (Q.FAILED, (T.SKIPPED, T.SKIPPED))
    assert h.queue(q).failure_code == "provider_error"


@scenario
async def unknown_provider_is_skipped(h: Harness) -> None:
    q = h.withdrawal("p_gone", "p_a")
    counted = REGISTRY.get_sample_value("withdrawals_unknown_provider_total") or 0.0

    await h.start(q)

    # Counted and logged (with the ids): the contract accepts any provider id at create.
    assert REGISTRY.get_sample_value("withdrawals_unknown_provider_total") == counted + 1

    assert h.states(q) == (Q.ACTIVE, (T.SKIPPED, T.PENDING))
    t0 = h.task(q)
    assert (t0.outcome, t0.provider_code) == ("provider_error", "unknown_provider")
    assert h.events(t0) == ["provider.unknown"]
    assert h.core.holds == {}
    assert h.starts() == [q.tasks[1].task_id]

    h.providers.on_create("p_a", paid())
    await h.start(q, 1)
    assert h.states(q) == (Q.COMPLETED, (T.SKIPPED, T.SUCCEEDED))

    only = h.withdrawal("p_gone")
    await h.start(only)
    assert h.states(only) == (Q.FAILED, (T.SKIPPED,))
    assert h.queue(only).failure_code == "provider_error"


@scenario
async def a_start_out_of_turn_or_for_a_final_task_is_ignored(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    before = h.store.snapshot()

    await h.start(q, 1)  # the second task while the first has not run

    assert h.store.snapshot() == before
    h.providers.on_create("p_a", paid())
    await h.start(q)
    done = h.store.snapshot()
    await h.start(q)  # a redelivered start
    await h.start(q, 1)
    assert h.store.snapshot() == done
    assert len(h.creates()) == 1


# a declined create retried at the same provider


def _retries_counted(provider: str = "p_retry", code: str = "busy") -> float:
    counted = REGISTRY.get_sample_value(
        "provider_retries_total", {"provider": provider, "code": code}
    )
    return counted or 0.0


@scenario
async def a_declined_create_is_made_again_at_the_same_provider(h: Harness) -> None:
    q = h.withdrawal("p_retry", "p_b")
    h.providers.on_create("p_retry", Declined("busy"), Declined("busy"), accepted("ref-r"))
    counted = _retries_counted()

    await h.start(q)

    # Declined: still CREATING, the freeze held, a retry due after the first backoff.
    assert h.states(q) == (Q.ACTIVE, (T.CREATING, T.PENDING))
    t0 = h.task(q)
    assert (t0.create_retries, t0.provider_code, t0.freeze_state) == (1, "busy", "frozen")
    assert h.armed(t0) == [("retry", 1, at(5))]
    assert h.core.holds[str(t0.task_id)].settlements == []
    assert h.starts() == []
    assert _retries_counted() == counted + 1
    # A redelivered start and a firing of another generation create nothing.
    waiting = h.store.snapshot()
    await h.start(q)
    await h.fire(t0, "retry", 0)
    assert h.store.snapshot() == waiting

    h.clock.advance(5)
    await h.fire(t0, "retry", 1)

    t0 = h.task(q)
    assert (t0.state, t0.create_retries) == (T.CREATING, 2)
    assert h.armed(t0)[-1] == ("retry", 2, at(15))  # doubled
    h.clock.advance(10)
    await h.fire(t0, "retry", 2)
    await h.fire(t0, "retry", 2)  # the broker's and the sweeper's firing: once

    assert h.states(q) == (Q.ACTIVE, (T.EXECUTING, T.PENDING))
    t0 = h.task(q)
    assert h.events(t0) == [
        "start",
        RETRY_EVENT,
        "timer.retry",
        RETRY_EVENT,
        "timer.retry",
        "create.accepted",
    ]
    # Every create under the same order id (the provider's idempotency key), each after the
    # same hold: the freeze is made once and answers "frozen" on each retry.
    assert h.creates() == [t0.provider_order_id] * 3
    freezes = [e.answer for e in h.journal.entries if e.action == "freeze"]
    assert freezes == ["frozen"] * 3
    assert _retries_counted() == counted + 2
    assert await h.webhook(t0, "succeeded", reference="ref-r")
    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED, T.SKIPPED))
    assert h.core.holds[str(t0.task_id)].settlements == ["commit"]


@scenario
async def spent_retries_take_the_policys_decision(h: Harness) -> None:
    q = h.withdrawal("p_retry", "p_b")
    h.providers.on_create("p_retry", *[Declined("busy")] * 3)
    await h.start(q)
    for attempt in (1, 2):
        h.clock.advance(60)
        await h.fire(h.task(q), "retry", attempt)

    assert h.states(q) == (Q.ACTIVE, (T.SKIPPED, T.PENDING))
    t0 = h.task(q)
    assert (t0.outcome, t0.provider_code, t0.create_retries, t0.freeze_state) == (
        "declined",
        "busy",
        2,
        "rolled_back",
    )
    assert h.events(t0)[-2:] == ["create.declined", "task.skipped"]
    assert h.core.holds[str(t0.task_id)].settlements == ["rollback"]
    assert h.starts() == [q.tasks[1].task_id]
    assert len(h.creates()) == 3


@scenario
async def a_cancel_while_a_create_waits_to_be_retried_ends_it_at_once(h: Harness) -> None:
    q = h.withdrawal("p_retry", "p_b")
    h.providers.on_create("p_retry", Declined("busy"))
    await h.start(q)
    t0 = h.task(q)

    await h.cancel(q)

    # Declined, so not created: nothing can still pay; the freeze is released at once.
    assert h.states(q) == (Q.CANCELLED, (T.CANCELLED, T.CANCELLED))
    t0 = h.task(q)
    assert (t0.outcome, t0.freeze_state, t0.timer_kind) == ("cancelled", "rolled_back", None)
    assert h.events(t0)[-1] == "cancel.retry_dropped"
    assert h.purged(t0) == ["retry"]
    assert h.core.holds[str(t0.task_id)].settlements == ["rollback"]
    assert h.core.notified(q.withdrawal_id) == ["cancelled"]
    # Its timer, fired before the purge took: no create after a cancel.
    done = h.store.snapshot()
    await h.fire(t0, "retry", 1)
    await h.start(q)
    assert h.store.snapshot() == done
    assert len(h.creates()) == 1


# ambiguous create → RECHECKING


@scenario
async def ambiguous_create_is_rechecked_and_found_pending(h: Harness) -> None:
    q = h.withdrawal("p_a")
    h.providers.on_create("p_a", Ambiguous("read timeout after sending", "create"))

    await h.start(q)

    t0 = h.task(q)
    assert t0.state == T.RECHECKING
    assert (t0.freeze_state, t0.provider_code) == ("frozen", "read timeout after sending")
    assert h.armed(t0) == [("recheck", 0, at(1))]
    recheck = h.store.published[-1]
    assert recheck.subject == f"unit.order.schedule.{t0.task_id.hex}.recheck"
    assert recheck.headers["Nats-Schedule"] == "@at 2026-12-01T09:00:01Z"
    assert recheck.headers["Nats-Schedule-Target"] == "unit.order.task.recheck.tick"

    h.clock.advance(1)
    h.providers.on_status("p_a", accepted("ref-a"))
    await h.fire(t0, "recheck", 0)

    t0 = h.task(q)
    assert (t0.state, t0.provider_reference) == (T.EXECUTING, "ref-a")
    assert h.events(t0)[-2:] == ["timer.recheck", "recheck.found"]
    assert h.armed(t0)[-1] == ("webhook_timeout", 0, at(61))
    assert h.purged(t0) == []  # the recheck timer fired: nothing left to cancel
    assert h.store.timers[t0.task_id] is not None

    assert await h.webhook(t0, "succeeded", reference="ref-a")

    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED,))
    assert h.purged(t0) == ["webhook_timeout"]
    assert h.store.timers[t0.task_id] is None
    assert h.events(t0)[-1] == "webhook.succeeded"
    webhook_rows = [e for e in h.store.audit if e.event == "webhook.succeeded"]
    assert {(e.actor, e.trace_id) for e in webhook_rows} == {("provider:p_a", "t2")}


@scenario
async def recheck_proves_absence_then_a_slow_decline_is_found_paid(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", Ambiguous("HTTP 502 at create", "create"))
    await h.start(q)
    t0 = h.task(q)

    h.clock.advance(1)
    h.providers.on_status("p_a", ProviderAnswer(status="absent"))
    await h.fire(t0, "recheck", 0)

    t0 = h.task(q)
    assert (t0.state, t0.outcome, t0.freeze_state) == (T.FAILED, "provider_error", "rolled_back")
    assert h.events(t0)[-1] == "recheck.absent"
    assert h.starts() == [q.tasks[1].task_id]
    assert h.purged(t0) == []

    # The error table says "recheck" for this code: a decline that is not proof either.
    h.providers.on_create("p_b", Declined("slow"))
    await h.start(q, 1)
    t1 = h.task(q, 1)
    assert (t1.state, t1.provider_code) == (T.RECHECKING, "slow")
    assert h.events(t1)[-1] == "create.declined.recheck"
    assert h.armed(t1) == [("recheck", 0, at(2))]

    h.clock.advance(1)
    h.providers.on_status("p_b", paid("ref-b"))
    await h.fire(t1, "recheck", 0)

    assert h.states(q) == (Q.COMPLETED, (T.FAILED, T.SUCCEEDED))
    assert h.events(h.task(q, 1))[-1] == "recheck.succeeded"


@scenario
async def exhausted_rechecks_go_to_manual_check_and_a_negative_resolve_fails(h: Harness) -> None:
    q = h.withdrawal("p_a")
    h.providers.on_create("p_a", Ambiguous("connection reset after sending", "create"))
    await h.start(q)
    t0 = h.task(q)

    for attempt in range(3):
        h.clock.advance(2**attempt)
        h.providers.on_status("p_a", Ambiguous("HTTP 503 at status", "poll"))
        await h.fire(t0, "recheck", attempt)

    t0 = h.task(q)
    assert (t0.state, t0.recheck_attempts) == (T.MANUAL_CHECK, 3)
    # Backoff 1 s, 2 s, 4 s from each firing; the third unknown answer gives up.
    assert h.armed(t0) == [("recheck", 0, at(1)), ("recheck", 1, at(3)), ("recheck", 2, at(7))]
    assert h.events(t0)[1:] == [
        "create.ambiguous",
        "timer.recheck",
        "recheck.unknown",
        "timer.recheck",
        "recheck.unknown",
        "timer.recheck",
        "recheck.exhausted",
    ]
    assert h.store.timers[t0.task_id] is None

    # Asked before the cascade gives up: the provider has no such order.
    h.providers.on_status("p_a", ProviderAnswer(status="absent"))
    resolved = await h.resolve(t0, positive=False)

    assert resolved is not None
    assert (resolved.state, resolved.outcome) == (T.FAILED, "manual_rejected")
    assert h.states(q) == (Q.FAILED, (T.FAILED,))
    assert h.queue(q).failure_code == "manual_rejected"
    row = next(e for e in h.store.audit if e.event == "manual.resolved.negative")
    assert row.actor == "ops:ana"
    assert (row.details["resolution"], row.details["resolved_by"]) == (
        "checked with provider",
        "ops:ana",
    )
    assert await h.engine.resolve(uuid.uuid4(), positive=True, reason="x", actor="ops") is None


# EXECUTING → webhook, SLA, polling


@scenario
async def executing_order_fails_by_webhook_and_the_next_pays(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", accepted("ref-a"))
    await h.start(q)
    t0 = h.task(q)
    assert (t0.state, t0.provider_reference, t0.timer_kind) == (
        T.EXECUTING,
        "ref-a",
        "webhook_timeout",
    )
    assert h.armed(t0) == [("webhook_timeout", 0, at(60))]

    # Progress is not an outcome: recorded nowhere.
    before = h.store.snapshot()
    assert await h.webhook(t0, "pending", reference="ref-a")
    assert h.store.snapshot() == before

    assert await h.webhook(t0, "failed", code="rejected", reference="ref-a")

    t0 = h.task(q)
    assert (t0.state, t0.outcome, t0.provider_code) == (T.FAILED, "declined", "rejected")
    assert h.purged(t0) == ["webhook_timeout"]
    assert h.starts() == [q.tasks[1].task_id]

    h.providers.on_create("p_b", paid())
    await h.start(q, 1)
    assert h.states(q) == (Q.COMPLETED, (T.FAILED, T.SUCCEEDED))


@scenario
async def sla_expiry_without_polling_goes_to_manual_check_and_is_resolved_paid(
    h: Harness,
) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", accepted())
    await h.start(q)
    t0 = h.task(q)

    h.clock.advance(60)
    await h.fire(t0, "webhook_timeout")

    t0 = h.task(q)
    assert t0.state == T.MANUAL_CHECK
    assert h.events(t0)[-1] == "webhook.sla_expired"
    assert h.purged(t0) == []  # the SLA timer itself fired
    assert h.store.timers[t0.task_id] is None
    assert h.starts() == []  # a manual check holds the cascade

    resolved = await h.resolve(t0, positive=True)

    assert resolved is not None
    assert resolved.state == T.SUCCEEDED
    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED, T.SKIPPED))
    assert h.core.holds[str(t0.task_id)].settlements == ["commit"]


@scenario
async def polling_ticks_until_the_deadline_then_a_webhook_settles_the_manual_check(
    h: Harness,
) -> None:
    q = h.withdrawal("p_poll")
    h.providers.on_create("p_poll", accepted())
    await h.start(q)
    t0 = h.task(q)

    h.clock.advance(60)
    h.providers.on_status("p_poll", accepted())
    await h.fire(t0, "webhook_timeout")
    h.clock.advance(5)
    h.providers.on_status("p_poll", ProviderAnswer(status="absent"))  # 404: not proof
    await h.fire(t0, "status_tick", 1)
    h.clock.advance(5)
    h.providers.on_status("p_poll", Ambiguous("HTTP 500 at status", "poll"))
    await h.fire(t0, "status_tick", 2)

    t0 = h.task(q)
    assert (t0.state, t0.status_polls, t0.timer_kind) == (T.EXECUTING, 3, "status_timeout")
    # The tick after +70 s would come at +75 s, past the deadline (+72 s): the deadline instead.
    assert h.armed(t0) == [
        ("webhook_timeout", 0, at(60)),
        ("status_tick", 1, at(65)),
        ("status_tick", 2, at(70)),
        ("status_timeout", 3, at(72)),
    ]

    h.clock.advance(2)
    await h.fire(t0, "status_timeout", 3)

    t0 = h.task(q)
    assert t0.state == T.MANUAL_CHECK
    assert h.events(t0)[-1] == "status.timeout"
    assert h.purged(t0) == []

    assert await h.webhook(t0, "succeeded")
    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED,))
    assert h.purged(t0) == []  # a manual check waits on no timer


@scenario
async def polling_outcomes(h: Harness) -> None:
    # Exhausted polls: manual check.
    exhausted = h.withdrawal("p_poll2")
    h.providers.on_create("p_poll2", accepted())
    await h.start(exhausted)
    t = h.task(exhausted)
    h.providers.on_status("p_poll2", accepted(), accepted())
    await h.fire(t, "webhook_timeout")
    await h.fire(t, "status_tick", 1)
    t = h.task(exhausted)
    assert (t.state, t.status_polls) == (T.MANUAL_CHECK, 2)
    assert h.events(t)[-1] == "status.exhausted"

    # A poll that finds the order failed after polling began: the public code is "timeout".
    timed_out = h.withdrawal("p_poll")
    h.providers.on_create("p_poll", accepted())
    await h.start(timed_out)
    t = h.task(timed_out)
    h.providers.on_status("p_poll", accepted(), ProviderAnswer(status="failed"))
    await h.fire(t, "webhook_timeout")
    await h.fire(t, "status_tick", 1)
    assert h.states(timed_out) == (Q.FAILED, (T.FAILED,))
    assert h.queue(timed_out).failure_code == "timeout"

    # A poll that finds it paid.
    paid_late = h.withdrawal("p_poll")
    h.providers.on_create("p_poll", accepted())
    await h.start(paid_late)
    t = h.task(paid_late)
    h.providers.on_status("p_poll", paid())
    await h.fire(t, "webhook_timeout")
    assert h.states(paid_late) == (Q.COMPLETED, (T.SUCCEEDED,))
    assert h.events(h.task(paid_late))[-1] == "poll.succeeded"


@scenario
async def no_sla_and_manual_decline_go_to_manual_check(h: Harness) -> None:
    q = h.withdrawal("p_nosla")
    h.providers.on_create("p_nosla", accepted())
    await h.start(q)
    t0 = h.task(q)
    assert (t0.state, t0.timer_kind) == (T.MANUAL_CHECK, None)
    assert h.events(t0)[-1] == "create.accepted"
    assert h.armed(t0) == []

    reviewed = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", Declined("review"))
    await h.start(reviewed)
    t = h.task(reviewed)
    assert (t.state, t.provider_code, t.freeze_state) == (T.MANUAL_CHECK, "review", "frozen")
    assert h.events(t)[-1] == "create.declined.manual"

    h.providers.on_status("p_a", ProviderAnswer(status="failed", reference="ref-1"))
    await h.resolve(t, positive=False)
    assert h.states(reviewed) == (Q.ACTIVE, (T.FAILED, T.PENDING))
    assert h.starts() == [reviewed.tasks[1].task_id]
    # A resolve for a task not in manual check (a concurrent decision won) is refused and
    # changes nothing.
    before = h.store.snapshot()
    with pytest.raises(ResolutionRefused) as refused:
        await h.resolve(t, positive=True)
    assert refused.value.state == T.FAILED
    assert h.store.snapshot() == before


# a negative decision is checked with the provider first


async def _in_manual_check(h: Harness, provider: str) -> OrderQueue:
    """A two-provider withdrawal whose first attempt waits for support (a decline whose code
    the error table sends to a human)."""
    q = h.withdrawal(provider, "p_b")
    h.providers.on_create(provider, Declined("review"))
    await h.start(q)
    assert h.task(q).state == T.MANUAL_CHECK
    return q


def _check_of(h: Harness, q: OrderQueue) -> object:
    row = next(e for e in h.store.audit if e.event == "manual.resolved.negative")
    assert row.details["decision"] == "negative"
    return row.details["provider_check"]


@scenario
async def a_negative_decision_the_provider_confirms_moves_on(h: Harness) -> None:
    q = await _in_manual_check(h, "p_a")
    h.providers.on_status("p_a", ProviderAnswer(status="failed", reference="ref-1", code="x"))
    await h.resolve(h.task(q), positive=False)
    assert h.states(q) == (Q.ACTIVE, (T.FAILED, T.PENDING))
    assert h.starts() == [q.tasks[1].task_id]
    assert _check_of(h, q) == "poll: failed"


@scenario
async def a_negative_decision_on_an_order_the_provider_paid_is_refused(h: Harness) -> None:
    """The provider's word wins: the attempt is committed, the cascade stops, and support
    hears why (no second provider may pay)."""
    q = await _in_manual_check(h, "p_a")
    h.providers.on_status("p_a", paid("ref-paid"))
    with pytest.raises(ResolutionRefused) as refused:
        await h.resolve(h.task(q), positive=False)
    assert refused.value.code == "provider_paid"
    assert "ref-paid" in str(refused.value)
    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED, T.SKIPPED))
    assert h.starts() == []
    assert h.events(h.task(q))[-1] == "manual.refused.provider_paid"


@scenario
async def a_negative_decision_on_a_pending_order_cancels_it_first(h: Harness) -> None:
    q = await _in_manual_check(h, "p_cancel")
    h.providers.on_status("p_cancel", accepted())
    h.providers.on_cancel("p_cancel", ProviderAnswer(status="cancelled", reference="ref-1"))
    await h.resolve(h.task(q), positive=False)
    assert h.states(q) == (Q.ACTIVE, (T.FAILED, T.PENDING))
    assert [c.method for c in h.providers.calls][-2:] == ["status", "cancel"]
    assert _check_of(h, q) == "cancel: cancelled"


def _refusal_recorded(h: Harness, q: OrderQueue, code: str) -> None:
    """A refused decision is in the audit (who, why, what the provider said), and nothing
    else changed: the task waits in MANUAL_CHECK, its hold frozen."""
    row = [e for e in h.store.audit if e.event.startswith("manual.refused")][-1]
    assert row.event == f"manual.refused.{code}"
    assert (row.actor, row.details["resolution"], row.details["decision"]) == (
        "ops:ana",
        "checked with provider",
        "negative",
    )
    assert row.details["provider_check"]
    assert h.states(q) == (Q.ACTIVE, (T.MANUAL_CHECK, T.PENDING))
    assert h.core.holds[str(q.tasks[0].task_id)].state == "frozen"
    assert h.starts() == []


async def test_a_negative_decision_waits_while_the_order_may_still_pay() -> None:
    """Pending and not cancellable, or a cancel not confirmed (still pending, no answer):
    refused and recorded; the provider may still pay."""
    for provider, cancel in (("p_a", None), ("p_cancel", accepted()), ("p_cancel", None)):
        h = harness()
        q = await _in_manual_check(h, provider)
        h.providers.on_status(provider, accepted())
        if provider == "p_cancel":
            h.providers.on_cancel(provider, cancel or Ambiguous("read timeout", "cancel"))
        with pytest.raises(ResolutionRefused) as refused:
            await h.resolve(h.task(q), positive=False)
        assert (refused.value.code, refused.value.state) == ("provider_pending", T.MANUAL_CHECK)
        _refusal_recorded(h, q, "provider_pending")
        check_money_safety(h)
        if provider == "p_cancel" and cancel is not None:
            # The cancel the decision asked for takes effect later: the attempt ends then.
            await h.webhook(h.task(q), "cancelled", reference="ref-1")
            assert h.states(q) == (Q.ACTIVE, (T.FAILED, T.PENDING))
            check_money_safety(h)


async def test_a_negative_decision_the_provider_cannot_confirm_is_refused_unless_unverified() -> (
    None
):
    """No answer, an answer that does not decode (an unknown status word), or a 404 for an
    order the provider had accepted proves nothing, as everywhere: refused, recorded. Sent
    again ``unverified``, it is the operator's word, and the audit says so."""
    unreadable = msgspec.json.encode(
        {"order_id": "x", "reference": "ref-1", "status": "processing"}
    )
    for answer in (
        Ambiguous("HTTP 503 at status", "poll"),
        Ambiguous(f"unreadable provider answer: {unreadable!r}", "poll"),
        ProviderAnswer(status="absent", source="poll"),
    ):
        h = harness()
        q = h.withdrawal("p_a", "p_b")
        h.providers.on_create("p_a", accepted("ref-1"))  # accepted, then the SLA passed
        await h.start(q)
        await h.fire(h.task(q), "webhook_timeout", 0)
        h.providers.on_status("p_a", answer)
        with pytest.raises(ResolutionRefused) as refused:
            await h.resolve(h.task(q), positive=False)
        assert refused.value.code == "provider_unreachable"
        _refusal_recorded(h, q, "provider_unreachable")

        h.providers.on_status("p_a", answer)
        await h.resolve(h.task(q), positive=False, unverified=True)
        assert h.states(q) == (Q.ACTIVE, (T.FAILED, T.PENDING))
        assert str(_check_of(h, q)).startswith("unverified (")
        check_money_safety(h)


def test_the_unmatched_webhook_series_exist_from_the_start() -> None:
    """At 0 for every provider and reason before any event: an alert on increase() sees the
    first success_after_final (a series born at 1 has increased by nothing)."""
    provider = f"p_fresh_{uuid.uuid4().hex[:8]}"
    configs = {**CONFIGS, provider: _config(provider)}
    h = harness()
    _engine(h.store, h.core, h.providers, h.relay, h.clock, configs)
    for reason in ("unknown_order", "task_final", "success_after_final"):
        labels = {"provider": provider, "reason": reason}
        assert REGISTRY.get_sample_value("webhooks_unmatched_total", labels) == 0.0


# cancel


@scenario
async def cancel_before_anything_ran(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")

    await h.cancel(q)

    assert h.states(q) == (Q.CANCELLED, (T.CANCELLED, T.CANCELLED))
    queue = h.queue(q)
    assert (queue.cancel_requested, queue.failure_code) == (True, "cancelled")
    assert h.queue_events(q) == ["queue.cancel_requested", "queue.cancelled"]
    assert h.core.holds == {}
    assert h.core.notified(q.withdrawal_id) == ["cancelled"]
    # The start published with the withdrawal arrives late; a second cancel: nothing moves.
    done = h.store.snapshot()
    await h.start(q)
    await h.cancel(q)
    await h.engine.cancel_queue(uuid.uuid4(), reason=None, actor="api")  # no such withdrawal
    assert h.store.snapshot() == done
    assert h.creates() == []


@scenario
async def cancel_while_executing_without_provider_cancel_waits_for_the_outcome(
    h: Harness,
) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", accepted())
    await h.start(q)

    await h.cancel(q)

    assert h.states(q) == (Q.ACTIVE, (T.EXECUTING, T.CANCELLED))
    t0 = h.task(q)
    assert t0.cancel_requested
    assert h.events(t0)[-1] == "cancel.requested"
    assert h.providers.calls_of("cancel") == []
    assert public_state(h.queue(q)).status == "processing"

    assert await h.webhook(t0, "failed")

    assert h.states(q) == (Q.CANCELLED, (T.CANCELLED, T.CANCELLED))
    assert h.task(q).outcome == "cancelled"
    assert h.purged(t0) == ["webhook_timeout"]
    assert h.core.holds[str(t0.task_id)].state == "rolled_back"
    assert h.core.notified(q.withdrawal_id) == ["cancelled"]


@scenario
async def cancel_while_executing_is_sent_to_a_provider_that_supports_it(h: Harness) -> None:
    q = h.withdrawal("p_cancel", "p_b")
    h.providers.on_create("p_cancel", accepted())
    await h.start(q)
    h.providers.on_cancel("p_cancel", ProviderAnswer(status="cancelled"))

    await h.cancel(q)

    assert h.states(q) == (Q.CANCELLED, (T.CANCELLED, T.CANCELLED))
    t0 = h.task(q)
    assert h.providers.calls_of("cancel")[0].order_id == t0.provider_order_id
    assert h.events(t0)[-2:] == ["cancel.requested", "cancel.cancelled"]
    assert h.purged(t0) == ["webhook_timeout"]
    assert h.core.holds[str(t0.task_id)].state == "rolled_back"


@scenario
async def a_success_that_wins_the_cancel_race_is_kept(h: Harness) -> None:
    # The provider answers the cancel with the order, already paid (409).
    q = h.withdrawal("p_cancel", "p_b")
    h.providers.on_create("p_cancel", accepted())
    await h.start(q)
    h.providers.on_cancel("p_cancel", paid("ref-c"))

    await h.cancel(q)

    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED, T.CANCELLED))
    assert public_state(h.queue(q)).status == "succeeded"
    assert h.core.notified(q.withdrawal_id) == ["succeeded"]

    # No cancel at the provider: the webhook's success still wins.
    other = h.withdrawal("p_a")
    h.providers.on_create("p_a", accepted())
    await h.start(other)
    await h.cancel(other)
    assert await h.webhook(h.task(other), "succeeded")
    assert h.states(other) == (Q.COMPLETED, (T.SUCCEEDED,))


@scenario
async def cancel_while_rechecking_ends_cancelled_when_the_order_is_absent(h: Harness) -> None:
    q = h.withdrawal("p_cancel")
    h.providers.on_create("p_cancel", Ambiguous("read timeout after sending", "create"))
    await h.start(q)

    await h.cancel(q)

    t0 = h.task(q)
    assert (t0.state, t0.cancel_requested) == (T.RECHECKING, True)
    assert h.providers.calls_of("cancel") == []  # the order is not known to exist yet

    h.clock.advance(1)
    h.providers.on_status("p_cancel", ProviderAnswer(status="absent"))
    await h.fire(t0, "recheck", 0)

    assert h.states(q) == (Q.CANCELLED, (T.CANCELLED,))
    assert h.core.holds[str(t0.task_id)].state == "rolled_back"


@scenario
async def cancel_while_rechecking_is_sent_once_the_order_is_found(h: Harness) -> None:
    q = h.withdrawal("p_cancel")
    h.providers.on_create("p_cancel", Ambiguous("read timeout after sending", "create"))
    await h.start(q)
    await h.cancel(q)

    h.clock.advance(1)
    h.providers.on_status("p_cancel", accepted())
    h.providers.on_cancel("p_cancel", ProviderAnswer(status="cancelled"))
    await h.fire(h.task(q), "recheck", 0)

    assert h.states(q) == (Q.CANCELLED, (T.CANCELLED,))
    assert h.events(h.task(q))[-2:] == ["recheck.found", "cancel.cancelled"]
    # The SLA timer armed on entering EXECUTING is cancelled in the same transaction: never
    # published (test_a_timer_armed_and_left_in_one_transaction_is_not_left_behind).
    t0 = h.task(q)
    assert "webhook_timeout" not in [kind for kind, _attempt, _due in h.armed(t0)]
    assert h.purged(t0) == ["webhook_timeout"]  # the SLA timer, armed and left here
    done = h.store.snapshot()
    h.clock.advance(60)
    await h.fire(t0, "webhook_timeout")
    assert h.store.snapshot() == done


@scenario
async def cancel_during_a_manual_check_ends_cancelled_on_the_providers_word(h: Harness) -> None:
    q = h.withdrawal("p_a")
    h.providers.on_create("p_a", Declined("review"))
    await h.start(q)
    await h.cancel(q)
    t0 = h.task(q)
    assert (t0.state, t0.cancel_requested) == (T.MANUAL_CHECK, True)

    assert await h.webhook(t0, "cancelled")

    assert h.states(q) == (Q.CANCELLED, (T.CANCELLED,))
    assert h.core.holds[str(t0.task_id)].state == "rolled_back"


@scenario
async def a_repeated_cancel_delivers_what_a_failed_one_did_not(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", accepted())
    await h.start(q)
    # The queue's flag commits; the delivery to the running task does not.
    h.store.fail_commit(ConnectionResetError("connection lost"), after=1)
    with pytest.raises(ConnectionResetError):
        await h.cancel(q)
    assert h.queue(q).cancel_requested
    assert not h.task(q).cancel_requested

    await h.cancel(q)

    assert h.task(q).cancel_requested
    assert await h.webhook(h.task(q), "failed")
    assert h.states(q) == (Q.CANCELLED, (T.CANCELLED, T.CANCELLED))


# resumed creates (a crash, or a failed call, between CREATING and the create's record)


@scenario
async def resumed_create_after_a_lost_rollback_stops_without_a_second_create(
    h: Harness,
) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.core.fail_next("freeze")
    with pytest.raises(CoreUnavailable):
        await h.start(q)
    assert h.states(q) == (Q.ACTIVE, (T.CREATING, T.PENDING))
    # The resume is declined and rolled back; the process dies before the record.
    h.providers.on_create("p_a", Declined("closed"))
    h.store.fail_commit(ConnectionResetError("worker killed"))
    with pytest.raises(ConnectionResetError):
        await h.start(q)
    assert h.core.holds[str(q.tasks[0].task_id)].state == "rolled_back"
    assert h.states(q) == (Q.ACTIVE, (T.CREATING, T.PENDING))

    await h.start(q)  # the sweeper's resume

    assert h.states(q) == (Q.FAILED, (T.FAILED, T.SKIPPED))
    t0 = h.task(q)
    assert (t0.outcome, t0.provider_code, t0.freeze_state) == (
        "provider_error",
        "freeze_rolled_back",
        "rolled_back",
    )
    assert h.queue(q).stop_requested
    assert h.events(t0) == ["start", "start.resume", "freeze.rolled_back"]
    assert len(h.creates()) == 1
    assert h.core.holds[str(t0.task_id)].settlements == ["rollback"]


@scenario
async def resumed_create_after_a_lost_commit_succeeds_without_a_second_create(
    h: Harness,
) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.core.fail_next("freeze")
    with pytest.raises(CoreUnavailable):
        await h.start(q)
    h.providers.on_create("p_a", paid())
    h.store.fail_commit(ConnectionResetError("worker killed"))
    with pytest.raises(ConnectionResetError):
        await h.start(q)

    await h.start(q)

    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED, T.SKIPPED))
    t0 = h.task(q)
    assert t0.freeze_state == "committed"
    assert h.events(t0)[-1] == "freeze.committed"
    assert len(h.creates()) == 1
    assert h.core.holds[str(t0.task_id)].settlements == ["commit"]


@scenario
async def resumed_create_of_a_cancelled_withdrawal(h: Harness) -> None:
    # Answered failed: CANCELLED.
    q = h.withdrawal("p_a", "p_b")
    h.core.fail_next("freeze")
    with pytest.raises(CoreUnavailable):
        await h.start(q)
    await h.cancel(q)
    assert h.states(q) == (Q.ACTIVE, (T.CREATING, T.CANCELLED))
    assert h.task(q).cancel_requested
    h.providers.on_create("p_a", ProviderAnswer(status="failed"))

    await h.start(q)

    assert h.states(q) == (Q.CANCELLED, (T.CANCELLED, T.CANCELLED))
    assert h.events(h.task(q))[-1] == "create.failed"

    # Its freeze answers rolled_back: CANCELLED too, without a create.
    lost = h.withdrawal("p_a")
    h.core.fail_next("freeze")
    with pytest.raises(CoreUnavailable):
        await h.start(lost)
    h.providers.on_create("p_a", Declined("insufficient_funds"))
    h.store.fail_commit(ConnectionResetError("worker killed"))
    with pytest.raises(ConnectionResetError):
        await h.start(lost)
    await h.cancel(lost)

    await h.start(lost)

    assert h.states(lost) == (Q.CANCELLED, (T.CANCELLED,))
    assert h.events(h.task(lost))[-1] == "freeze.rolled_back"
    assert not h.queue(lost).stop_requested


@scenario
async def a_webhook_for_a_task_still_creating_is_retried_not_dropped(h: Harness) -> None:
    q = h.withdrawal("p_a")
    h.core.fail_next("freeze")
    with pytest.raises(CoreUnavailable):
        await h.start(q)
    t0 = h.task(q)
    before = h.store.snapshot()

    with pytest.raises(RetryLater):
        await h.webhook(t0, "succeeded")

    assert h.store.snapshot() == before
    h.providers.on_create("p_a", accepted("ref-a"))
    await h.start(q)
    assert h.task(q).state == T.EXECUTING

    assert await h.webhook(t0, "succeeded", reference="ref-a")  # the retry

    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED,))


# failures leave nothing written


@scenario
async def a_failed_balance_call_leaves_nothing_written_and_the_retry_succeeds(
    h: Harness,
) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", accepted("ref-a"))
    await h.start(q)
    t0 = h.task(q)
    before = h.store.snapshot()

    h.core.fail_next("commit")
    with pytest.raises(CoreUnavailable):
        await h.webhook(t0, "succeeded", reference="ref-a")

    assert h.store.snapshot() == before
    assert h.core.holds[str(t0.task_id)].state == "frozen"

    assert await h.webhook(t0, "succeeded", reference="ref-a")

    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED, T.SKIPPED))

    # A rollback that fails at create: the attempt stays CREATING, its resume finishes it.
    declined = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", Declined("insufficient_funds"), Declined("insufficient_funds"))
    h.core.fail_next("rollback")
    with pytest.raises(CoreUnavailable):
        await h.start(declined)
    assert h.states(declined) == (Q.ACTIVE, (T.CREATING, T.PENDING))
    assert h.events(h.task(declined)) == ["start"]

    await h.start(declined)

    assert h.states(declined) == (Q.ACTIVE, (T.SKIPPED, T.PENDING))
    # The replayed create carries the same order id: the provider's idempotency key.
    assert h.creates()[-2:] == [declined.tasks[0].provider_order_id] * 2


@scenario
async def a_failed_notification_is_left_to_the_notifier(h: Harness) -> None:
    q = h.withdrawal("p_a")
    h.providers.on_create("p_a", paid())
    h.core.fail_next("notify")

    await h.start(q)

    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED,))
    assert h.core.notified(q.withdrawal_id) == []
    assert h.relay.deferred.acked == []
    row = h.store.notifications[(q.withdrawal_id, "succeeded")]
    assert row.next_attempt_at == NOW + timedelta(seconds=30)


# timers


@scenario
async def stale_timers_are_ignored(h: Harness) -> None:
    q = h.withdrawal("p_poll")
    h.providers.on_create("p_poll", accepted())
    await h.start(q)
    t0 = h.task(q)
    h.clock.advance(60)
    h.providers.on_status("p_poll", accepted())
    await h.fire(t0, "webhook_timeout")
    before = h.store.snapshot()

    await h.fire(t0, "recheck", 0)  # not rechecking
    await h.fire(t0, "webhook_timeout", 0)  # fired already: polling began
    await h.fire(t0, "status_tick", 0)  # an older generation
    await h.fire(t0, "status_timeout", 0)

    assert h.store.snapshot() == before
    assert await h.webhook(t0, "succeeded")
    done = h.store.snapshot()
    await h.fire(t0, "status_tick", 1)  # the task is final
    assert h.store.snapshot() == done
    await h.engine.timer_fired(
        TaskMessage(task_id=uuid.uuid4(), queue_id=uuid.uuid4()), "recheck", None
    )
    assert h.store.snapshot() == done


@scenario
async def timers_fired_applies_plain_moves_in_one_transaction(h: Harness) -> None:
    queues = [h.withdrawal(p) for p in ("p_a", "p_a", "p_poll", "p_a", "p_a")]
    sla_a, sla_b, polled, locked, stale = queues
    for q in queues:
        h.providers.on_create(q.tasks[0].provider_id, accepted())
        await h.start(q)
    h.clock.advance(60)

    def due(q: OrderQueue, kind: TimerKind = "webhook_timeout", attempt: int = 0) -> TimerDue:
        message = TaskMessage(task_id=q.tasks[0].task_id, queue_id=q.queue_id, attempt=attempt)
        return TimerDue(message=message, kind=kind, trace_id="batch")

    unknown = TimerDue(
        message=TaskMessage(task_id=uuid.uuid4(), queue_id=uuid.uuid4()),
        kind="webhook_timeout",
        trace_id=None,
    )
    batch = [
        due(sla_a),
        due(sla_b),
        due(polled),  # needs a poll: not plain
        due(locked),  # its queue is held by a handler right now
        due(stale, attempt=1),  # stale: consumed, nothing written
        due(sla_a, "status_timeout"),  # a second firing for a queue already in the batch
        unknown,
    ]
    commits = h.store.commits
    async with h.store.unit_of_work() as handler:
        assert await handler.load(locked.queue_id) is not None
        rest = await h.engine.timers_fired(batch)
    assert h.store.commits == commits + 1

    assert rest == [batch[2], batch[3], batch[5], batch[6]]
    assert [h.task(q).state for q in queues] == [
        T.MANUAL_CHECK,
        T.MANUAL_CHECK,
        T.EXECUTING,
        T.EXECUTING,
        T.EXECUTING,
    ]
    for q in (sla_a, sla_b):
        row = [e for e in h.store.audit if e.task_id == q.tasks[0].task_id][-1]
        assert (row.event, row.actor, row.trace_id) == ("webhook.sla_expired", "timer", "batch")
        assert h.purged(q.tasks[0]) == []

    h.providers.on_status("p_poll", accepted())
    for d in rest:
        await h.engine.timer_fired(d.message, d.kind, d.trace_id)

    assert [h.task(q).state for q in queues] == [
        T.MANUAL_CHECK,
        T.MANUAL_CHECK,
        T.EXECUTING,
        T.MANUAL_CHECK,
        T.EXECUTING,
    ]
    assert h.armed(h.task(polled))[-1] == ("status_tick", 1, at(65))

    # A batch whose transaction fails writes nothing.
    before = h.store.snapshot()
    h.store.fail_commit(ConnectionResetError("connection lost"))
    with pytest.raises(ConnectionResetError):
        await h.engine.timers_fired([due(stale)])
    assert h.store.snapshot() == before


# webhooks that no task takes


@scenario
async def webhooks_no_task_takes_are_kept_with_the_reason(h: Harness) -> None:
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", accepted("ref-a"))
    await h.start(q)
    t0 = h.task(q)
    # Matched by the provider's reference alone.
    assert await h.webhook(t0, "failed", order_id="someone-else", reference="ref-a")
    assert h.task(q).state == T.FAILED
    before = h.store.snapshot()

    assert not await h.webhook(t0, "failed")  # a duplicate
    assert not await h.webhook(t0, "succeeded")  # paid after all: a double payout?
    assert not await h.webhook(t0, "succeeded", order_id="cg-unknown", reference="nobody")
    other_provider = h.task(q, 1)
    assert not await h.webhook(other_provider, "succeeded", order_id=t0.provider_order_id)

    assert h.store.snapshot() == before
    assert [u[4] for u in h.store.unmatched] == [
        "task_final",
        "success_after_final",
        "unknown_order",
        "unknown_order",
    ]


# --- running them -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_scenario(name: str) -> None:
    h = harness()
    await SCENARIOS[name](h)
    check_money_safety(h)


async def test_every_transition_is_exercised() -> None:
    """Together the scenarios walk every edge of both tables (and no other)."""
    task_edges: set[tuple[str, str]] = set()
    queue_edges: set[tuple[str, str]] = set()
    for run in SCENARIOS.values():
        h = harness()
        await run(h)
        tasks, queues = edges(h)
        task_edges |= tasks
        queue_edges |= queues
    assert sorted(TASK_EDGES - task_edges) == []
    assert sorted(task_edges - TASK_EDGES) == []
    assert queue_edges == QUEUE_EDGES


# --- what looks wrong (product code unchanged; see each reason) ---------------------------------


async def test_a_manual_check_is_resolved_after_its_provider_left_the_providers_file() -> None:
    h = harness()
    q = h.withdrawal("p_a")
    h.providers.on_create("p_a", Declined("review"))
    await h.start(q)
    assert h.task(q).state == T.MANUAL_CHECK
    h.reconfigure({k: v for k, v in CONFIGS.items() if k != "p_a"})

    resolved = await h.engine.resolve(
        q.tasks[0].task_id, positive=True, reason="paid, says the provider", actor="ops:ana"
    )

    assert resolved is not None
    assert resolved.state == T.SUCCEEDED
    assert h.core.holds[str(q.tasks[0].task_id)].state == "committed"
    check_money_safety(h)


async def test_a_start_with_versions_for_a_provider_the_worker_lacks_skips_it() -> None:
    h = harness()
    q = h.withdrawal("p_a", "p_b")  # published by a gateway that still knows p_a
    assert h.start_message(q.tasks[0]).seen is not None
    h.reconfigure({k: v for k, v in CONFIGS.items() if k != "p_a"})

    await h.start(q)
    await h.start(q)  # the sweeper's resume

    assert h.states(q) == (Q.ACTIVE, (T.SKIPPED, T.PENDING))
    assert h.starts() == [q.tasks[1].task_id]
    check_money_safety(h)


async def test_a_webhook_for_a_provider_the_worker_lacks_comes_back_later() -> None:
    """The intake knew the provider, this worker's providers file does not (a deploy in
    progress): the webhook is retried, then dead-lettered, never acknowledged and lost."""
    h = harness()
    q = h.withdrawal("p_a")
    h.providers.on_create("p_a", accepted("ref-a"))
    await h.start(q)
    before = h.store.snapshot()
    h.reconfigure({k: v for k, v in CONFIGS.items() if k != "p_a"})

    with pytest.raises(RetryLater):
        await h.webhook(h.task(q), "succeeded", reference="ref-a")
    assert h.store.snapshot() == before

    h.reconfigure(CONFIGS)
    await h.webhook(h.task(q), "succeeded", reference="ref-a")
    assert h.states(q) == (Q.COMPLETED, (T.SUCCEEDED,))
    check_money_safety(h)


async def test_a_timer_armed_and_left_in_one_transaction_is_not_left_behind() -> None:
    h = harness()
    q = h.withdrawal("p_cancel")
    h.providers.on_create("p_cancel", Ambiguous("read timeout after sending", "create"))
    await h.start(q)
    await h.cancel(q)
    h.clock.advance(1)
    h.providers.on_status("p_cancel", accepted())
    h.providers.on_cancel("p_cancel", ProviderAnswer(status="cancelled"))

    await h.fire(h.task(q), "recheck", 0)

    assert h.task(q).state == T.CANCELLED
    sla = NAMES.schedule_subject(q.tasks[0].task_id, "webhook_timeout")
    last = [op for op, subject in h.store.broker if subject == sla][-1:]
    assert last in ([], ["purge"]), "the SLA schedule of a cancelled task is still armed"


# --- the fakes behave like the adapters they stand for ------------------------------------------


async def test_the_unit_of_work_writes_only_at_commit_all_or_nothing() -> None:
    h = harness()
    q = h.withdrawal("p_a")
    before = h.store.snapshot()
    async with h.store.unit_of_work() as uow:
        loaded = await uow.load(q.queue_id)
        assert loaded is not None
        queue = loaded[1].queue
        step = Step(event="start", to=T.CREATING)
        uow.add(
            settle(queue, queue.tasks[0].task_id, step, NOW),
            withdrawal_id="w",
            actor="t",
            trace_id=None,
        )
        uow.publish(store.NewMessage("unit.x", b"{}", {}))
        uow.purge("unit.y")
        assert h.store.snapshot() == before  # nothing before the commit
    assert h.store.snapshot() == before  # nor without one

    # Two writers read version 1; the second to commit loses, having written nothing.
    async with h.store.unit_of_work() as first:
        loaded = await first.load(q.queue_id)
        assert loaded is not None
        stale = loaded[1].queue
        first.add(
            settle(stale, stale.tasks[0].task_id, Step(event="start", to=T.CREATING), NOW),
            withdrawal_id="w",
            actor="t",
            trace_id=None,
        )
        await first.commit()
    written = h.store.snapshot()
    async with h.store.unit_of_work() as second:
        step = Step(event="provider.unknown", to=T.SKIPPED)
        second.add(
            settle(stale, stale.tasks[0].task_id, step, NOW),
            withdrawal_id="w",
            actor="t",
            trace_id=None,
        )
        second.publish(store.NewMessage("unit.x", b"{}", {}))
        with pytest.raises(store.StaleVersion):
            await second.commit()
    assert h.store.snapshot() == written
    assert h.store.task(q.tasks[0].task_id).version == 2


async def test_the_unit_of_work_purges_then_publishes_after_commit() -> None:
    h = harness()
    async with h.store.unit_of_work() as uow:
        uow.publish(store.NewMessage("unit.c", b"{}", {}))  # armed, then cancelled: never armed
        uow.purge("unit.a")
        uow.purge("unit.b")
        uow.purge("unit.a")
        uow.purge("unit.c")
        uow.publish(store.NewMessage("unit.b", b"{}", {}))  # re-armed after its purge: survives
        await uow.commit()
    assert h.store.broker == [
        ("purge", "unit.a"),
        ("purge", "unit.b"),
        ("purge", "unit.c"),
        ("publish", "unit.b"),
    ]


async def test_queue_locks_are_held_until_the_unit_of_work_ends() -> None:
    h = harness()
    q = h.withdrawal("p_a")
    async with h.store.unit_of_work() as holder:
        await holder.load(q.queue_id)
        async with h.store.unit_of_work() as other:
            assert await other.load_queues([q.queue_id]) == {}  # SKIP LOCKED
            with pytest.raises(QueueLocked):
                await other.load(q.queue_id)
    async with h.store.unit_of_work() as later:
        assert q.queue_id in await later.load_queues([q.queue_id])


async def test_the_core_ledger_answers_repeats_like_cascade_core() -> None:
    core = FakeCore()
    amount = Decimal("10.00")
    assert await core.freeze("op", "wd", "p_a", amount, "EUR") == "frozen"
    assert await core.freeze("op", "wd", "p_a", amount, "EUR") == "frozen"
    with pytest.raises(CoreRefused) as conflict:
        await core.freeze("op", "wd", "p_b", amount, "EUR")
    assert conflict.value.code == "operation_conflict"
    await core.commit("op")
    await core.commit("op")  # a repeat answers the same
    assert await core.freeze("op", "wd", "p_a", amount, "EUR") == "committed"
    with pytest.raises(CoreRefused) as refused:
        await core.rollback("op")
    assert refused.value.code == "invalid_state"
    with pytest.raises(CoreRefused) as unknown:
        await core.rollback("never-frozen")
    assert unknown.value.code == "not_found"
    core.fail_next("freeze")
    with pytest.raises(CoreUnavailable):
        await core.freeze("op2", "wd", "p_a", amount, "EUR")
    assert "op2" not in core.holds
    core.refuse_next("freeze")
    with pytest.raises(CoreRefused) as poor:
        await core.freeze("op2", "wd", "p_a", amount, "EUR")
    assert poor.value.code == "insufficient_balance"


# --- races and hand-published messages ----------------------------------------------------------


async def test_a_success_webhook_that_loses_the_race_to_a_final_write_is_recorded() -> None:
    """The webhook is matched before its handler takes the lock; when the task becomes final in
    between (here support's negative decision), the success is recorded as
    ``success_after_final`` (an error in the log): the cascade has moved on and may pay
    twice."""
    h = harness()
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", accepted("ref-a"))
    await h.start(q)
    t0 = h.task(q)
    await h.fire(t0, "webhook_timeout", 0)  # p_a: no polling -> MANUAL_CHECK
    assert h.task(q).state == T.MANUAL_CHECK

    matched = h.store.match_webhook

    resolved: list[OrderTask | None] = []

    async def match_then_support_resolves(*args: str) -> tuple[uuid.UUID, uuid.UUID] | str:
        found = await matched(*args)
        if not resolved:  # commits between the (first) match and the handler
            h.providers.on_status("p_a", ProviderAnswer(status="failed", reference="ref-a"))
            resolved.append(await h.resolve(t0, positive=False))
        return found

    # A hook inside one call of the fake: mypy refuses assigning to a method.
    h.store.match_webhook = match_then_support_resolves  # type: ignore[method-assign,assignment]
    labels = {"provider": "p_a", "reason": "success_after_final"}
    counted = REGISTRY.get_sample_value("webhooks_unmatched_total", labels) or 0.0
    await h.webhook(t0, "succeeded", reference="ref-a")

    assert h.states(q) == (Q.ACTIVE, (T.FAILED, T.PENDING))  # the cascade moves on to p_b
    assert [u[4] for u in h.store.unmatched] == ["success_after_final"]
    # Counted for the alert (CascadeGatewayPaidAfterFinal), not only logged.
    assert REGISTRY.get_sample_value("webhooks_unmatched_total", labels) == counted + 1


async def test_a_start_with_versions_cannot_start_a_task_out_of_turn() -> None:
    """A start replayed or published by hand for a later task, with the versions every fresh
    withdrawal has, while an earlier attempt may still pay: refused, as the locked path
    refuses it (two live attempts are how withdrawals get paid twice)."""
    h = harness()
    q = h.withdrawal("p_a", "p_b")
    h.providers.on_create("p_a", accepted("ref-a"))
    await h.start(q)
    assert h.states(q) == (Q.ACTIVE, (T.EXECUTING, T.PENDING))

    second = q.tasks[1]
    seen = StartSeen(queue_version=1, task_version=1)
    await h.engine.start_task(q.queue_id, second.task_id, actor="worker", seen=seen)

    assert h.states(q) == (Q.ACTIVE, (T.EXECUTING, T.PENDING))
    check_money_safety(h, scripts_used=False)


async def test_an_unknown_provider_is_logged_with_the_ids(caplog: pytest.LogCaptureFixture) -> None:
    h = harness()
    q = h.withdrawal("p_gone", "p_a")
    with caplog.at_level("WARNING", logger="cascade.engine"):
        await h.start(q)
    [record] = [r for r in caplog.records if "provider not in the providers file" in r.message]
    assert (record.provider_id, record.task_id) == ("p_gone", str(q.tasks[0].task_id))  # type: ignore[attr-defined]  # set through extra=
    assert record.withdrawal_id == q.withdrawal_id  # type: ignore[attr-defined]
