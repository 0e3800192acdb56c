"""In-memory fakes of the engine's ports, for its unit tests (``tests/unit/test_engine.py``).

Each fake behaves like its real adapter in everything the engine can observe, and keeps what
happened so that a test can assert on it:

- :class:`FakeEngineStore` / :class:`FakeUnitOfWork` stand for Postgres
  (:mod:`orchestrator.store.uow`): a unit of work locks the queues it loads, collects what the
  handler decided and writes it only at :meth:`~FakeUnitOfWork.commit`, version-checked
  (:class:`~orchestrator.store.StaleVersion`), all or nothing, with an audit entry per write;
  the outbox messages are published and the timers purged only after the commit. Leaving the
  block without a commit writes nothing.
- :class:`FakeCore` stands for cascade-core: a ledger keyed by operation id with the
  idempotency rules of the sandbox's simulator (``sandbox/core.py``), and switches that make
  the next call fail.
- :class:`FakeProviders` answers from a script per provider and records every call.
- :class:`FakeRelay` gives the engine its bus names and a sink for acknowledged notifications.
- :class:`FixedClock` is a clock that moves only when told to.

Every call to cascade-core or a provider also goes into one shared :class:`Journal`, in order,
so that a test can check what happened before what (no create without a hold in place).
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import Literal, Self, TypeVar

from contracts.legacy import encode_metadata
from contracts.provider import CreateOrder, provider_order_id
from contracts.providers_file import ProviderConfig
from orchestrator import store
from orchestrator.bus import Names
from orchestrator.core_client import CoreRefused, CoreUnavailable, FreezeState
from orchestrator.domain import (
    FINAL_TASK_STATES,
    START_EVENT,
    Ambiguous,
    AnswerSource,
    Declined,
    OrderQueue,
    OrderTask,
    ProviderAnswer,
    QueueChange,
    QueueState,
    TaskChange,
    TaskState,
    Timer,
    Transition,
    may_start,
)
from orchestrator.provider_client import CreateResult, StatusResult

_A = TypeVar("_A")

# --- the journal ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One outside call: who was called, what for, on which key, and what it answered."""

    system: Literal["core", "provider"]
    action: str
    key: str
    answer: str


@dataclass
class Journal:
    """Every call to cascade-core and to the providers, in the order they were made."""

    entries: list[Entry] = field(default_factory=list)

    def add(self, system: Literal["core", "provider"], action: str, key: str, answer: str) -> None:
        self.entries.append(Entry(system, action, key, answer))


# --- the record -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    """One audit row: a task's (``task_id`` set) or a queue's write."""

    withdrawal_id: str
    queue_id: uuid.UUID
    task_id: uuid.UUID | None
    from_state: str
    to_state: str
    event: str
    actor: str
    trace_id: str | None
    details: Mapping[str, object]
    at: datetime

    @property
    def changed(self) -> bool:
        return self.from_state != self.to_state


@dataclass(frozen=True, kw_only=True)
class NotificationRow:
    """A final-status notification kept for cascade-core's notifier."""

    withdrawal_id: str
    status: str
    body: bytes
    next_attempt_at: datetime


class QueueLocked(Exception):
    """A unit of work asked for a queue another open one holds: Postgres would wait for it,
    which a sequential test never ends. Tests hold a lock only to see it skipped."""


@dataclass(frozen=True)
class Snapshot:
    """Everything committed, to compare before and after a handler that must write nothing."""

    withdrawals: Mapping[uuid.UUID, store.Loaded]
    audit: tuple[AuditEntry, ...]
    timers: Mapping[uuid.UUID, Timer | None]
    published: tuple[store.NewMessage, ...]
    purged: tuple[str, ...]
    notifications: tuple[NotificationRow, ...]


class FakeEngineStore:
    """The record in memory: withdrawals with their queues, audit rows, the outbox as it was
    published, purged timers and notification rows. Implements ``EngineStore``."""

    def __init__(self) -> None:
        self._withdrawals: dict[uuid.UUID, store.Loaded] = {}
        # The one timer each task's record says it waits on (kind, attempt, due).
        self.timers: dict[uuid.UUID, Timer | None] = {}
        self.audit: list[AuditEntry] = []
        # Published after their commit, in order (the outbox's fast path).
        self.published: list[store.NewMessage] = []
        # Timer subjects purged after their commit.
        self.purged: list[str] = []
        # What reached the broker, in order: ("publish" | "purge", subject).
        self.broker: list[tuple[str, str]] = []
        self.notifications: dict[tuple[str, str], NotificationRow] = {}
        # Webhooks no task took, with the reason (``unmatched_webhooks``).
        self.unmatched: list[tuple[str, str, str, str, str]] = []
        self.commits = 0
        self.units_of_work = 0
        self._locks: dict[uuid.UUID, FakeUnitOfWork] = {}
        # Commit failures to come, by the number of commits that succeed before each.
        self._fail_commits: dict[int, Exception] = {}
        self._after_commit: deque[Callable[[], Awaitable[None]]] = deque()
        # Provider health's fleet-wide state: each provider's GCRA arrival time, probe lease.
        self.rate_tat: dict[str, datetime] = {}
        self.probes: dict[str, tuple[uuid.UUID, datetime]] = {}

    # --- setting up ----------------------------------------------------------------------

    def add_withdrawal(
        self,
        providers: Sequence[str],
        *,
        configs: Mapping[str, ProviderConfig],
        now: datetime,
        amount: Decimal = Decimal("250.00"),
        currency: str = "EUR",
    ) -> OrderQueue:
        """A new withdrawal as the gateway's create writes it (``gateway.service``
        ``new_withdrawal``): an ACTIVE queue with one PENDING task per provider, versions 1."""
        queue_id = uuid.uuid4()
        withdrawal_id = f"wd_{uuid.uuid4().hex[:12]}"
        tasks = []
        for position, provider_id in enumerate(providers):
            task_id = uuid.uuid4()
            config = configs.get(provider_id)
            key_length = config.idempotency_key_max_length if config else 64
            tasks.append(
                OrderTask(
                    task_id=task_id,
                    queue_id=queue_id,
                    position=position,
                    provider_id=provider_id,
                    state=TaskState.PENDING,
                    version=1,
                    provider_order_id=provider_order_id(task_id, key_length),
                    # The insert sets it (NOT NULL); the aggregate the gateway builds does not.
                    state_entered_at=now,
                )
            )
            self.timers[task_id] = None
        record = store.WithdrawalRecord(
            withdrawal_id=withdrawal_id,
            merchant_id="m_1001",
            amount=amount,
            currency=currency,
            destination={"type": "iban", "account": "DE89370400440532013000", "holder": "J"},
            metadata=encode_metadata([("order", "42")]),
            cascade=[{"provider_id": p, "fee": "0.10"} for p in providers],
            idempotency_key=None,
            request_sha256=b"\x00" * 32,
            cohort="cascade",
            routing_reason="allow_list",
            flag_state={"source": "test"},
            trace_id=None,
            created_at=now,
        )
        queue = OrderQueue(
            queue_id=queue_id,
            withdrawal_id=withdrawal_id,
            state=QueueState.ACTIVE,
            version=1,
            tasks=tuple(tasks),
        )
        self._withdrawals[queue_id] = (
            record,
            store.QueueRecord(queue=queue, created_at=now, updated_at=now, finished_at=None),
        )
        return queue

    def fail_commit(self, error: Exception, *, after: int = 0) -> None:
        """Make a commit raise ``error`` having written nothing (the database went away, or
        the process died, between the handler's calls and its write): the next one, or the
        one after ``after`` more commits succeeded."""
        self._fail_commits[self.commits + after] = error

    def after_next_commit(self, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action`` right after the next commit, its locks released: what another
        process does between two transactions of one handler."""
        self._after_commit.append(action)

    # --- reading what was committed ------------------------------------------------------

    def loaded(self, queue_id: uuid.UUID) -> store.Loaded:
        return self._withdrawals[queue_id]

    def queue(self, queue_id: uuid.UUID) -> OrderQueue:
        return self._withdrawals[queue_id][1].queue

    def queues(self) -> list[OrderQueue]:
        return [queue.queue for _record, queue in self._withdrawals.values()]

    def task(self, task_id: uuid.UUID) -> OrderTask:
        for queue in self.queues():
            found = queue.find_task(task_id)
            if found is not None:
                return found
        raise KeyError(task_id)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            withdrawals=dict(self._withdrawals),
            audit=tuple(self.audit),
            timers=dict(self.timers),
            published=tuple(self.published),
            purged=tuple(self.purged),
            notifications=tuple(self.notifications.values()),
        )

    # --- EngineStore ---------------------------------------------------------------------

    def unit_of_work(self) -> FakeUnitOfWork:
        self.units_of_work += 1
        return FakeUnitOfWork(self)

    async def match_webhook(
        self, provider_id: str, order_id: str, reference: str, status: str
    ) -> tuple[uuid.UUID, uuid.UUID] | str:
        """As ``orchestrator.store.match_webhook``: the task owning the order by our order id
        or the provider's reference; a final one (or none) is kept as unmatched, with why."""
        owner = next(
            (
                task
                for queue in self.queues()
                for task in queue.tasks
                if task.provider_id == provider_id
                and (task.provider_order_id == order_id or task.provider_reference == reference)
            ),
            None,
        )
        if owner is not None and (
            owner.state not in FINAL_TASK_STATES
            or (status == "returned" and owner.state == TaskState.SUCCEEDED)
        ):
            return owner.queue_id, owner.task_id
        paid = (TaskState.SUCCEEDED, TaskState.RETURNED)
        if owner is None:
            reason = "unknown_order"
        elif status in ("succeeded", "returned") and owner.state not in paid:
            reason = "success_after_final"
        else:
            reason = "task_final"
        self.unmatched.append((provider_id, order_id, reference, status, reason))
        return reason

    async def start_pending(
        self,
        *,
        queue_id: uuid.UUID,
        queue_version: int,
        task_id: uuid.UUID,
        task_version: int,
        actor: str,
        trace_id: str | None,
        now: datetime,
        providers: Sequence[str],
    ) -> store.Started | None:
        """As ``orchestrator.store.start_pending``: PENDING → CREATING in one autocommit
        statement that takes the queue row lock, if the queue is still ACTIVE at
        ``queue_version``, the task still PENDING at ``task_version`` and its provider one of
        ``providers``; else nothing. A failure :meth:`fail_commit` scheduled hits it only when
        it would write."""
        loaded = self._withdrawals.get(queue_id)
        if loaded is None:
            return None
        if queue_id in self._locks:
            raise QueueLocked(f"queue {queue_id} is held by a unit of work")
        record, queue_record = loaded
        queue = queue_record.queue
        task = queue.find_task(task_id)
        if (
            task is None
            or (queue.state, queue.version) != (QueueState.ACTIVE, queue_version)
            or (task.state, task.version) != (TaskState.PENDING, task_version)
            or task.provider_id not in providers
            or not may_start(queue, task)
        ):
            return None
        failure = self._take_commit_failure()
        if failure is not None:
            raise failure
        written = dataclasses.replace(
            task,
            state=TaskState.CREATING,
            version=task.version + 1,
            state_entered_at=now,
            timer_kind=None,
        )
        tasks = tuple(written if t.task_id == task_id else t for t in queue.tasks)
        withdrawals = dict(self._withdrawals)
        withdrawals[queue_id] = (
            record,
            dataclasses.replace(
                queue_record, queue=dataclasses.replace(queue, tasks=tasks), updated_at=now
            ),
        )
        entry = AuditEntry(
            withdrawal_id=queue.withdrawal_id,
            queue_id=queue_id,
            task_id=task_id,
            from_state=TaskState.PENDING.value,
            to_state=TaskState.CREATING.value,
            event=START_EVENT,
            actor=actor,
            trace_id=trace_id,
            details={},
            at=now,
        )
        self._write(withdrawals, [entry], {task_id: None}, {})
        await self._run_after_commit()
        return store.Started(provider_id=task.provider_id, pending_since=task.state_entered_at)

    async def queue_of_task(self, task_id: uuid.UUID) -> uuid.UUID | None:
        try:
            return self.task(task_id).queue_id
        except KeyError:
            return None

    async def load_queue(self, queue_id: uuid.UUID) -> OrderQueue | None:
        loaded = self._withdrawals.get(queue_id)
        return None if loaded is None else loaded[1].queue

    # --- for the unit of work ------------------------------------------------------------

    def _lock(self, queue_id: uuid.UUID, holder: FakeUnitOfWork, *, skip: bool) -> bool:
        """Take the queue's row lock for ``holder``; False when another holds it and
        ``skip`` (``SKIP LOCKED``); raises :class:`QueueLocked` when it would wait."""
        owner = self._locks.get(queue_id)
        if owner is not None and owner is not holder:
            if skip:
                return False
            raise QueueLocked(f"queue {queue_id} is held by another unit of work")
        self._locks[queue_id] = holder
        return True

    def _release(self, holder: FakeUnitOfWork) -> None:
        for queue_id in [q for q, owner in self._locks.items() if owner is holder]:
            del self._locks[queue_id]

    def _take_commit_failure(self) -> Exception | None:
        return self._fail_commits.pop(self.commits, None)

    async def _run_after_commit(self) -> None:
        if self._after_commit:
            await self._after_commit.popleft()()

    def _write(
        self,
        withdrawals: dict[uuid.UUID, store.Loaded],
        audit: list[AuditEntry],
        timers: dict[uuid.UUID, Timer | None],
        notifications: dict[tuple[str, str], NotificationRow],
    ) -> None:
        """Install what a commit staged (all of it, at once)."""
        self._withdrawals = withdrawals
        self.audit.extend(audit)
        self.timers.update(timers)
        for key, row in notifications.items():
            # ON CONFLICT DO NOTHING: the first row for (withdrawal, status) stays.
            self.notifications.setdefault(key, row)
        self.commits += 1


@dataclass(frozen=True, slots=True)
class _Added:
    transition: Transition
    withdrawal_id: str
    actor: str
    trace_id: str | None
    notification: store.Notification | None


class FakeUnitOfWork:
    """One transaction in memory (see the module docstring). Implements ``UnitOfWork``."""

    def __init__(self, record: FakeEngineStore) -> None:
        self._store = record
        self._open = False
        self._committed = False
        self._added: list[_Added] = []
        self._messages: list[store.NewMessage] = []
        self._purges: list[str] = []

    async def __aenter__(self) -> Self:
        if self._open or self._committed:
            raise RuntimeError("a unit of work is used once")
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Without a commit this is a rollback: what was collected is dropped unwritten.
        self._added.clear()
        self._messages.clear()
        self._purges.clear()
        self._open = False
        self._store._release(self)

    def _check_open(self) -> None:
        if not self._open or self._committed:
            raise RuntimeError("the unit of work is not open")

    async def load(self, queue_id: uuid.UUID) -> store.Loaded | None:
        """A copy of the withdrawal with its queue, the queue locked until the end."""
        self._check_open()
        loaded = self._store._withdrawals.get(queue_id)
        if loaded is None:
            return None
        self._store._lock(queue_id, self, skip=False)
        return copy.deepcopy(loaded)

    async def load_queues(self, queue_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, OrderQueue]:
        """Copies of many queues, locked; those another unit of work holds are left out."""
        self._check_open()
        found: dict[uuid.UUID, OrderQueue] = {}
        for queue_id in sorted(set(queue_ids)):
            loaded = self._store._withdrawals.get(queue_id)
            if loaded is not None and self._store._lock(queue_id, self, skip=True):
                found[queue_id] = copy.deepcopy(loaded[1].queue)
        return found

    def add(
        self,
        transition: Transition,
        *,
        withdrawal_id: str,
        actor: str,
        trace_id: str | None,
        notification: store.Notification | None = None,
    ) -> None:
        self._check_open()
        self._added.append(_Added(transition, withdrawal_id, actor, trace_id, notification))

    def publish(self, message: store.NewMessage) -> None:
        self._check_open()
        self._messages.append(message)

    async def in_flight(self, provider_id: str, *, lock: bool = True) -> int:
        """Committed attempts of the provider in CREATING or RECHECKING."""
        self._check_open()
        return sum(
            1
            for _, queue in self._store._withdrawals.values()
            for task in queue.queue.tasks
            if task.provider_id == provider_id
            and task.state in (TaskState.CREATING, TaskState.RECHECKING)
        )

    async def take_rate(
        self, provider_id: str, per_second: float, burst: int, now: datetime, horizon: float
    ) -> float:
        """The same GCRA as Postgres's (orchestrator.store.breakers.take_rate), in memory."""
        self._check_open()
        period = timedelta(seconds=1 / per_second)
        tolerance = period * (burst - 1)
        due = max(self._store.rate_tat.get(provider_id, now), now)
        if due - now <= tolerance + timedelta(seconds=horizon):
            self._store.rate_tat[provider_id] = due + period
        return max((due - now - tolerance).total_seconds(), 0.0)

    async def take_probe(
        self, provider_id: str, task_id: uuid.UUID, now: datetime, until: datetime
    ) -> bool:
        self._check_open()
        held = self._store.probes.get(provider_id)
        if held is not None and held[1] >= now:
            return False
        self._store.probes[provider_id] = (task_id, until)
        return True

    def purge(self, subject: str) -> None:
        self._check_open()
        self._purges.append(subject)
        # As the real one: a timer armed earlier in this transaction and cancelled now was
        # never armed.
        self._messages = [m for m in self._messages if m.subject != subject]

    async def commit(self) -> None:
        """Write everything collected, version-checked, or nothing; then purge and publish."""
        self._check_open()
        failure = self._store._take_commit_failure()
        if failure is not None:
            raise failure
        withdrawals = dict(self._store._withdrawals)
        audit: list[AuditEntry] = []
        timers: dict[uuid.UUID, Timer | None] = {}
        notifications: dict[tuple[str, str], NotificationRow] = {}
        for added in self._added:
            for change in added.transition.changes:
                if isinstance(change, TaskChange):
                    entry = _write_task(withdrawals, timers, change, added)
                else:
                    entry = _write_queue(withdrawals, change, added, notifications)
                audit.append(entry)
        self._store._write(withdrawals, audit, timers, notifications)
        self._committed = True
        self._store._release(self)
        # As the real one: purge before publishing (a timer re-armed here survives).
        purges = list(dict.fromkeys(self._purges))
        self._store.purged.extend(purges)
        self._store.published.extend(self._messages)
        self._store.broker.extend([("purge", s) for s in purges])
        self._store.broker.extend([("publish", m.subject) for m in self._messages])
        await self._store._run_after_commit()


def _write_task(
    withdrawals: dict[uuid.UUID, store.Loaded],
    timers: dict[uuid.UUID, Timer | None],
    change: TaskChange,
    added: _Added,
) -> AuditEntry:
    """``store.save_task``: the columns it sets, if the task is still at the version read."""
    before, after, now = change.before, change.after, added.transition.at
    record, queue_record = withdrawals[before.queue_id]
    queue = queue_record.queue
    stored = queue.task(before.task_id)
    if stored.version != before.version:
        raise store.StaleVersion(f"task {before.task_id} is no longer at version {before.version}")
    changed = after.state != before.state
    timer_kind = stored.timer_kind
    if change.timer is not None:
        timer_kind = change.timer.kind
        timers[before.task_id] = change.timer
    elif change.clear_timer or changed:
        timer_kind = None
        timers[before.task_id] = None
    written = dataclasses.replace(
        stored,
        state=after.state,
        provider_reference=after.provider_reference,
        freeze_state=after.freeze_state,
        outcome=after.outcome,
        provider_code=after.provider_code,
        recheck_attempts=after.recheck_attempts,
        status_polls=after.status_polls,
        create_retries=after.create_retries,
        cancel_requested=after.cancel_requested,
        version=stored.version + 1,
        state_entered_at=now if changed else stored.state_entered_at,
        timer_kind=timer_kind,
    )
    queue = dataclasses.replace(
        queue, tasks=tuple(written if t.task_id == written.task_id else t for t in queue.tasks)
    )
    withdrawals[before.queue_id] = (
        record,
        dataclasses.replace(
            queue_record,
            queue=queue,
            updated_at=now if changed else queue_record.updated_at,
        ),
    )
    return AuditEntry(
        withdrawal_id=added.withdrawal_id,
        queue_id=before.queue_id,
        task_id=before.task_id,
        from_state=before.state.value,
        to_state=after.state.value,
        event=change.event,
        actor=added.actor,
        trace_id=added.trace_id,
        details=dict(change.details),
        at=now,
    )


def _write_queue(
    withdrawals: dict[uuid.UUID, store.Loaded],
    change: QueueChange,
    added: _Added,
    notifications: dict[tuple[str, str], NotificationRow],
) -> AuditEntry:
    """``store.save_queue``: state, flags (only ever set), failure code of a final state, the
    notification with the final state; if the queue is still at the version read."""
    before, after, now = change.before, change.after, added.transition.at
    record, queue_record = withdrawals[before.queue_id]
    stored = queue_record.queue
    if stored.version != before.version:
        raise store.StaleVersion(
            f"queue {before.queue_id} is no longer at version {before.version}"
        )
    final = after.state != before.state
    written = dataclasses.replace(
        stored,
        state=after.state,
        version=stored.version + 1,
        cancel_requested=stored.cancel_requested or after.cancel_requested,
        stop_requested=stored.stop_requested or after.stop_requested,
        failure_code=(after.failure_code if final else None) or stored.failure_code,
    )
    withdrawals[before.queue_id] = (
        record,
        dataclasses.replace(
            queue_record,
            queue=written,
            updated_at=now,
            finished_at=now if after.state != QueueState.ACTIVE else None,
        ),
    )
    if final and added.notification is not None:
        n = added.notification
        notifications.setdefault(
            (added.withdrawal_id, n.status),
            NotificationRow(
                withdrawal_id=added.withdrawal_id,
                status=n.status,
                body=n.body,
                next_attempt_at=n.first_attempt_at,
            ),
        )
    return AuditEntry(
        withdrawal_id=added.withdrawal_id,
        queue_id=before.queue_id,
        task_id=None,
        from_state=before.state.value,
        to_state=after.state.value,
        event=change.event,
        actor=added.actor,
        trace_id=added.trace_id,
        details={"failure_code": written.failure_code} if final and written.failure_code else {},
        at=now,
    )


# --- cascade-core -----------------------------------------------------------------------------

CoreOperation = Literal["freeze", "commit", "rollback", "notify"]


@dataclass
class Hold:
    """One balance operation at cascade-core: a freeze and what became of it."""

    operation_id: str
    withdrawal_id: str
    provider_id: str
    amount: Decimal
    currency: str
    state: FreezeState
    # Each commit or rollback call that reached the ledger, repeats included.
    settlements: list[str] = field(default_factory=list)


class FakeCore:
    """cascade-core's ledger in memory, with the sandbox simulator's idempotency rules.

    A freeze of a known operation answers its state (a conflicting repeat is refused); a
    commit or rollback of an operation already settled that way answers the same; one settled
    the other way, or never frozen, is refused. :meth:`fail_next` / :meth:`refuse_next` make
    the next call of an operation raise before it reaches the ledger.
    """

    def __init__(self, journal: Journal | None = None) -> None:
        self.journal = journal or Journal()
        self.holds: dict[str, Hold] = {}
        # Notifications that reached the ledger, one per delivery; keyed per withdrawal:status.
        self.notifications: list[tuple[str, str, bytes]] = []
        self._failures: dict[CoreOperation, deque[Exception]] = {}

    def fail_next(self, operation: CoreOperation, detail: str = "HTTP 503") -> None:
        """The next ``operation`` raises CoreUnavailable (a timeout, a 5xx): nothing changed."""
        self._failures.setdefault(operation, deque()).append(
            CoreUnavailable(f"cascade-core {operation}: {detail}")
        )

    def refuse_next(
        self, operation: CoreOperation = "freeze", code: str = "insufficient_balance"
    ) -> None:
        """The next ``operation`` is refused with ``code`` (HTTP 409): nothing changed."""
        self._failures.setdefault(operation, deque()).append(CoreRefused(code, 409))

    def _scripted_failure(self, operation: CoreOperation, key: str) -> None:
        queued = self._failures.get(operation)
        if queued:
            error = queued.popleft()
            self.journal.add("core", operation, key, f"raised {type(error).__name__}")
            raise error

    def notified(self, withdrawal_id: str) -> list[str]:
        """The statuses notified for a withdrawal, one per delivery."""
        return [status for wid, status, _body in self.notifications if wid == withdrawal_id]

    async def freeze(
        self,
        operation_id: str,
        withdrawal_id: str,
        provider_id: str,
        amount: Decimal,
        currency: str,
    ) -> FreezeState:
        self._scripted_failure("freeze", operation_id)
        hold = self.holds.get(operation_id)
        if hold is not None:
            if (hold.withdrawal_id, hold.provider_id, hold.amount, hold.currency) != (
                withdrawal_id,
                provider_id,
                amount,
                currency,
            ):
                self.journal.add("core", "freeze", operation_id, "refused operation_conflict")
                raise CoreRefused("operation_conflict", 409)
            # An idempotent replay: never a second hold for one operation.
            self.journal.add("core", "freeze", operation_id, hold.state)
            return hold.state
        self.holds[operation_id] = Hold(
            operation_id=operation_id,
            withdrawal_id=withdrawal_id,
            provider_id=provider_id,
            amount=amount,
            currency=currency,
            state="frozen",
        )
        self.journal.add("core", "freeze", operation_id, "frozen")
        return "frozen"

    async def commit(self, operation_id: str) -> None:
        self._settle("commit", operation_id, "committed", "rolled_back")

    async def rollback(self, operation_id: str) -> None:
        self._settle("rollback", operation_id, "rolled_back", "committed")

    def _settle(
        self,
        operation: Literal["commit", "rollback"],
        operation_id: str,
        to: FreezeState,
        other: FreezeState,
    ) -> None:
        self._scripted_failure(operation, operation_id)
        hold = self.holds.get(operation_id)
        if hold is None:
            self.journal.add("core", operation, operation_id, "refused not_found")
            raise CoreRefused("not_found", 404)
        hold.settlements.append(operation)
        if hold.state == other:
            self.journal.add("core", operation, operation_id, "refused invalid_state")
            raise CoreRefused("invalid_state", 409)
        hold.state = to
        self.journal.add("core", operation, operation_id, to)

    async def notify(self, withdrawal_id: str, status: str, body: bytes) -> None:
        self._scripted_failure("notify", f"{withdrawal_id}:{status}")
        self.notifications.append((withdrawal_id, status, body))
        self.journal.add("core", "notify", f"{withdrawal_id}:{status}", "acked")


# --- providers --------------------------------------------------------------------------------

ProviderMethod = Literal["create", "status", "cancel"]


@dataclass(frozen=True, slots=True)
class ProviderCall:
    method: ProviderMethod
    provider_id: str
    order_id: str
    order: CreateOrder | None = None


class FakeProviders:
    """Answers each provider's create, status and cancel calls from a script, in order; a call
    nobody scripted fails the test. Implements ``ProviderAdapter``.

    Answers are tagged with the call they answer (``source``), as the real adapter does.
    """

    def __init__(self, configs: Mapping[str, ProviderConfig], journal: Journal | None = None):
        self._configs = configs
        self.journal = journal or Journal()
        self.calls: list[ProviderCall] = []
        self._creates: dict[str, deque[CreateResult]] = {}
        self._statuses: dict[str, deque[StatusResult]] = {}
        self._cancels: dict[str, deque[StatusResult]] = {}

    def on_create(self, provider_id: str, *answers: CreateResult) -> None:
        self._creates.setdefault(provider_id, deque()).extend(answers)

    def on_status(self, provider_id: str, *answers: StatusResult) -> None:
        self._statuses.setdefault(provider_id, deque()).extend(answers)

    def on_cancel(self, provider_id: str, *answers: StatusResult) -> None:
        self._cancels.setdefault(provider_id, deque()).extend(answers)

    def calls_of(self, method: ProviderMethod) -> list[ProviderCall]:
        return [call for call in self.calls if call.method == method]

    def unanswered(self) -> dict[str, int]:
        """Scripted answers nobody asked for, by provider and method."""
        left: dict[str, int] = {}
        for method, scripts in (
            ("create", self._creates),
            ("status", self._statuses),
            ("cancel", self._cancels),
        ):
            for provider_id, answers in scripts.items():
                if answers:
                    left[f"{provider_id}.{method}"] = len(answers)
        return left

    def _provider_id(self, config: ProviderConfig) -> str:
        for provider_id, known in self._configs.items():
            if known is config:
                return provider_id
        raise AssertionError(f"a config no provider has: {config.base_url}")

    @staticmethod
    def _next(scripts: dict[str, deque[_A]], provider_id: str, method: str) -> _A:
        answers = scripts.get(provider_id)
        if not answers:
            raise AssertionError(f"unscripted {method} call to {provider_id}")
        return answers.popleft()

    def _record(self, call: ProviderCall, answer: CreateResult) -> None:
        self.calls.append(call)
        self.journal.add("provider", call.method, call.order_id, _describe(answer))

    async def create(self, config: ProviderConfig, order: CreateOrder) -> CreateResult:
        provider_id = self._provider_id(config)
        answer = self._next(self._creates, provider_id, "create")
        if not isinstance(answer, Declined):
            answer = _tagged(answer, "create")
        self._record(ProviderCall("create", provider_id, order.order_id, order), answer)
        return answer

    async def status(self, config: ProviderConfig, order_id: str) -> StatusResult:
        provider_id = self._provider_id(config)
        answer = _tagged(self._next(self._statuses, provider_id, "status"), "poll")
        self._record(ProviderCall("status", provider_id, order_id), answer)
        return answer

    async def cancel(self, config: ProviderConfig, order_id: str) -> StatusResult:
        provider_id = self._provider_id(config)
        answer = _tagged(self._next(self._cancels, provider_id, "cancel"), "cancel")
        self._record(ProviderCall("cancel", provider_id, order_id), answer)
        return answer


def _tagged(answer: StatusResult, source: AnswerSource) -> StatusResult:
    """The answer as the real adapter returns it: tagged with the call it answers."""
    return dataclasses.replace(answer, source=source)


def _describe(answer: CreateResult) -> str:
    match answer:
        case ProviderAnswer(status=status):
            return status
        case Ambiguous():
            return "ambiguous"
    return f"declined {answer.code}"


# --- relay and clock --------------------------------------------------------------------------


class FakeDeferred:
    """The deferred writes' one entry point the engine uses."""

    def __init__(self) -> None:
        self.acked: list[tuple[str, str]] = []

    def notification_acked(self, withdrawal_id: str, status: str) -> None:
        self.acked.append((withdrawal_id, status))


class FakeRelay:
    """What the engine uses of the outbox relay: the bus names, the deferred writes."""

    def __init__(self, names: Names | None = None) -> None:
        self.names = names or Names()
        self.deferred = FakeDeferred()


class FixedClock:
    """A clock standing still until :meth:`advance` moves it."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now
