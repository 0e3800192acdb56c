"""Stateless handlers: load from Postgres, apply the pure FSM, run effects, persist, publish.

Each entry point takes the queue row lock for its transaction, so the events of one withdrawal
are applied one at a time by whichever process holds it (worker, gateway legacy path, ops API).
Balance calls run inside that transaction *before* the state change is written: if the call
fails the transaction rolls back, nothing moves, and the message is retried. Messages to
publish are written to the outbox in the same transaction and published after commit (and by
the relay, should this process die in between).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

from contracts.legacy import WithdrawalView, decode_metadata, encode_withdrawal
from contracts.provider import CreateOrder, ProviderDestination
from contracts.providers_file import ProviderConfig
from orchestrator import bus, store
from orchestrator import metrics as m
from orchestrator.core_client import CascadeCore, CoreRefused
from orchestrator.domain import (
    FINAL_TASK_STATES,
    START_EVENT,
    Ambiguous,
    CancelRequested,
    Event,
    FreezeCommitted,
    FreezeRefused,
    FreezeRolledBack,
    OrderQueue,
    OrderTask,
    ProviderAnswer,
    QueueState,
    Resolve,
    Start,
    Step,
    TaskState,
    TimerFired,
    TimerKind,
    advance_queue,
    after_poll_pending,
    apply_changes,
    decide,
    may_start,
    public_state,
)
from orchestrator.faults import fault_point
from orchestrator.outbox import OutboxRelay
from orchestrator.providers import ProviderAdapter

log = logging.getLogger("cascade.engine")

NOTIFY_RETRY_AFTER = timedelta(seconds=30)
# How a webhook that changed nothing is logged, by reason: a late duplicate for a final task is
# routine; an unknown order deserves a look; a success for an attempt that ended without one
# may be a second payout.
_UNMATCHED_LOG = {
    "task_final": (logging.INFO, "webhook changed nothing"),
    "unknown_order": (logging.WARNING, "webhook changed nothing"),
    "success_after_final": (
        logging.ERROR,
        "provider reports a success for an attempt that did not succeed: check for a double payout",
    ),
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def withdrawal_view(record: store.WithdrawalRecord, queue: store.QueueRecord) -> WithdrawalView:
    """The legacy API's Withdrawal object for a stored withdrawal (the one place it is built)."""
    public = public_state(queue.queue)
    return WithdrawalView(
        withdrawal_id=record.withdrawal_id,
        merchant_id=record.merchant_id,
        status=public.status,
        amount=record.amount,
        currency=record.currency,
        provider_id=public.provider_id,
        provider_reference=public.provider_reference,
        failure_code=public.failure_code,
        metadata=decode_metadata(record.metadata),
        created_at=record.created_at,
        updated_at=queue.updated_at,
    )


class CreateInProgress(Exception):
    """A webhook for a task whose create has no recorded outcome yet, because a crash cut the
    create off (the sweeper resumes it within seconds): retried with the usual backoff, never
    dropped, since the provider's own retries of it would be deduplicated away."""


@dataclass(frozen=True, slots=True)
class TimerDue:
    """A timer message as :meth:`Engine.timers_fired` takes it."""

    message: bus.TaskMessage
    kind: TimerKind
    trace_id: str | None


@dataclass
class _Tx:
    """What one transaction did, for the after-commit work."""

    conn: store.Connection
    queue: OrderQueue
    record: store.WithdrawalRecord
    queue_created_at: datetime
    outbox: list[store.OutboxMessage] = field(default_factory=list)
    purge: list[str] = field(default_factory=list)
    armed: set[str] = field(default_factory=set)
    # The timer whose firing this transaction handles: its schedule is spent, no purge needed.
    fired: TimerKind | None = None
    finished: list[tuple[str, bytes]] = field(default_factory=list)
    # A task write not sent yet (see Engine._persist); Engine._flush sends it.
    pending: store.TaskWrite | None = None


class Engine:
    """The orchestrator's handlers; one instance per process."""

    def __init__(
        self,
        *,
        pool: store.Pool,
        relay: OutboxRelay,
        core: CascadeCore,
        providers: ProviderAdapter,
        provider_configs: Mapping[str, ProviderConfig],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.pool = pool
        self.relay = relay
        self.names = relay.names
        self.core = core
        self.providers = providers
        self.configs = provider_configs
        self.clock = clock

    # --- entry points ------------------------------------------------------------------

    async def start_task(
        self,
        queue_id: uuid.UUID,
        task_id: uuid.UUID,
        *,
        actor: str,
        trace_id: str | None = None,
        seen: bus.StartSeen | None = None,
    ) -> None:
        await self._drive(queue_id, task_id, Start(), actor=actor, trace_id=trace_id, seen=seen)

    def start_message(self, queue: OrderQueue, task: OrderTask) -> bus.TaskMessage:
        """The start of ``task`` as it is published, with the versions of ``queue`` and
        ``task`` when :meth:`_plain_start` approves a plain start on them (the worker then
        writes it without reading, if nothing changed in between)."""
        seen = None
        if self._plain_start(queue, task, self.clock()) is not None:
            seen = bus.StartSeen(queue_version=queue.version, task_version=task.version)
        return bus.TaskMessage(task_id=task.task_id, queue_id=queue.queue_id, seen=seen)

    async def timer_fired(self, msg: bus.TaskMessage, kind: str, trace_id: str | None) -> None:
        event = TimerFired(kind=kind, attempt=msg.attempt)  # type: ignore[arg-type]
        await self._drive(msg.queue_id, msg.task_id, event, actor="timer", trace_id=trace_id)

    async def webhook(self, msg: bus.WebhookMessage, trace_id: str | None) -> bool:
        """Apply a verified webhook; False when no task owns the order (recorded, ignored)."""
        async with self.pool.acquire() as conn:
            found = await store.match_webhook(
                conn,
                msg.provider_id,
                msg.order_id,
                msg.reference,
                msg.status,
                final_states=FINAL_TASK_STATES,
            )
        if isinstance(found, str):
            level, message = _UNMATCHED_LOG[found]
            log.log(
                level,
                message,
                extra={
                    "provider_id": msg.provider_id,
                    "reference": msg.reference,
                    "reason": found,
                },
            )
            return False
        queue_id, task_id = found
        answer = ProviderAnswer(
            status=msg.status,
            reference=msg.reference,
            code=msg.code,
            source="webhook",
        )
        await self._drive(
            queue_id, task_id, answer, actor=f"provider:{msg.provider_id}", trace_id=trace_id
        )
        return True

    async def resolve(
        self,
        task_id: uuid.UUID,
        *,
        positive: bool,
        reason: str,
        actor: str,
        trace_id: str | None = None,
    ) -> OrderTask | None:
        """Support's decision on a manual check; returns the task afterwards (None: unknown)."""
        async with self.pool.acquire() as conn:
            queue_id = await conn.fetchval(
                "SELECT queue_id FROM order_tasks WHERE task_id = $1", task_id
            )
        if queue_id is None:
            return None
        await self._drive(
            queue_id,
            task_id,
            Resolve(positive=positive, reason=reason, actor=actor),
            actor=actor,
            trace_id=trace_id,
        )
        async with self.pool.acquire() as conn:
            rec = await store.load_queue(conn, queue_id=queue_id)
        assert rec is not None
        return rec.queue.task(task_id)

    async def cancel_queue(
        self, queue_id: uuid.UUID, *, reason: str | None, actor: str, trace_id: str | None = None
    ) -> None:
        """Queue-level cancel: pending tasks stop now; an active one finishes when it can."""
        active: uuid.UUID | None = None
        async with self.pool.acquire() as conn, conn.transaction():
            tx = await self._open(conn, queue_id)
            if tx is None or tx.queue.final:
                return
            if not tx.queue.cancel_requested:
                now = self.clock()
                await store.save_queue(
                    conn,
                    tx.queue,
                    cancel_requested=True,
                    cancel_reason=reason,
                    event="queue.cancel_requested",
                    actor=actor,
                    trace_id=trace_id,
                    now=now,
                )
                tx.queue = dataclasses.replace(
                    tx.queue, cancel_requested=True, version=tx.queue.version + 1
                )
                for task in tx.queue.tasks:
                    if task.state == TaskState.PENDING:
                        await self._persist(
                            tx,
                            task,
                            Step(
                                event="cancel",
                                to=TaskState.CANCELLED,
                                changes={"outcome": "cancelled"},
                            ),
                            actor=actor,
                            trace_id=trace_id,
                            details={},
                        )
                if tx.queue.active_task() is None:
                    await self._advance(tx, actor=actor, trace_id=trace_id)
                await self._flush(tx)
            # Also when the queue's flag was set before: a crash (or a failed drive) between
            # that commit and the drive below left the active task without its cancel, which
            # a repeated cancel must still deliver.
            active_task = tx.queue.active_task()
            if active_task is not None and not active_task.cancel_requested:
                active = active_task.task_id
        # After releasing the connection: publishing and notifying take their own, and a
        # handler holding two at once deadlocks a busy pool.
        await self._after_commit(tx)
        if active is not None:
            await self._drive(
                queue_id, active, CancelRequested(reason), actor=actor, trace_id=trace_id
            )

    async def timers_fired(self, due: Sequence[TimerDue]) -> list[TimerDue]:
        """Apply many timer firings in one transaction, where each one is a plain state change.

        A burst of timers (a provider outage lets thousands of webhook SLAs expire in the same
        second) would otherwise cost a transaction each. Here the queues are locked and loaded
        together, each firing goes through the same :func:`decide` as :meth:`timer_fired`,
        and the state changes that need nothing else (no balance call, no provider call, no
        new timer, no final state: e.g. EXECUTING → MANUAL_CHECK when an SLA expires) are
        written with one statement, each with its audit row and version check. Stale firings
        are ignored as they would be one by one.

        Returns the firings this did not apply (they need I/O, a final state, share a queue
        with an earlier one, or their queue is locked by a handler right now: the batch does
        not wait for it): the caller hands each to :meth:`timer_fired`. Raises when the
        transaction failed, having written nothing: then every firing goes that way.
        """
        rest: list[TimerDue] = []
        moves: list[store.TaskWrite] = []
        spent: list[TimerKind] = []
        async with self.pool.acquire() as conn, conn.transaction():
            queues = await store.load_queues(
                conn, [d.message.queue_id for d in due], lock=True, skip_locked=True
            )
            now = self.clock()
            taken: set[uuid.UUID] = set()
            for d in due:
                rec = queues.get(d.message.queue_id)
                if rec is None or d.message.queue_id in taken:
                    rest.append(d)
                    continue
                taken.add(d.message.queue_id)
                task = rec.queue.find_task(d.message.task_id)
                config = self.configs.get(task.provider_id) if task else None
                if task is None or config is None:
                    rest.append(d)
                    continue
                event = TimerFired(kind=d.kind, attempt=d.message.attempt)
                step = decide(task, event, config, now)
                if step.ignored:
                    log.info(
                        "event ignored",
                        extra={
                            "task_id": str(task.task_id),
                            "event": step.event,
                            "because": step.ignored_because,
                        },
                    )
                    continue
                if not _plain_move(task, step):
                    rest.append(d)
                    continue
                moves.append(
                    store.TaskWrite(
                        before=task,
                        after=apply_changes(task, step),
                        withdrawal_id=rec.queue.withdrawal_id,
                        event=step.event,
                        actor="timer",
                        trace_id=d.trace_id,
                        details=_audit_details(step, _details(event)),
                        now=now,
                    )
                )
                spent.append(d.kind)
            await store.save_transitions(conn, moves, now)
        purges = []
        for move, kind in zip(moves, spent, strict=True):
            _observe_time_in_state(move.before, now)
            purges.extend(self._purges(move.before, kind))
        if purges:
            await asyncio.gather(*(self.relay.purge(subject) for subject in purges))
        return rest

    def _purges(self, task: OrderTask, fired: TimerKind | None) -> list[str]:
        """Schedule subjects to purge when ``task`` leaves its state: the one timer it waits
        on, unless that is the one firing now (``fired``: its schedule is spent). Purging is
        tidiness, not safety: a stale timer that fires anyway is ignored by ``decide``."""
        kind = task.timer_kind
        if kind is None or kind == fired:
            return []
        return [self.names.schedule_subject(task.task_id, kind)]

    # --- the loop ----------------------------------------------------------------------

    async def _open(self, conn: store.Connection, queue_id: uuid.UUID) -> _Tx | None:
        loaded = await store.load_all(conn, queue_id=queue_id, lock=True)
        if loaded is None:
            return None
        record, rec = loaded
        return _Tx(conn=conn, queue=rec.queue, record=record, queue_created_at=rec.created_at)

    async def _drive(
        self,
        queue_id: uuid.UUID,
        task_id: uuid.UUID,
        event: Event,
        *,
        actor: str,
        trace_id: str | None,
        seen: bus.StartSeen | None = None,
    ) -> None:
        pending: Event | None = event
        if isinstance(event, Start) and await self._start_unlocked(
            queue_id, task_id, actor=actor, trace_id=trace_id, seen=seen
        ):
            fault_point("after_state_write")
            fault_point("after_publish")  # nothing to publish; kept for the fault numbering
            pending = Start(resume=False)  # CREATING is committed: now the calls, locked
        while pending is not None:
            async with self.pool.acquire() as conn, conn.transaction():
                tx = await self._open(conn, queue_id)
                if tx is None:
                    return
                pending = await self._apply(tx, task_id, pending, actor=actor, trace_id=trace_id)
                await self._flush(tx)
            fault_point("after_state_write")
            # The connection is back in the pool first: one connection per handler at a time.
            await self._after_commit(tx)
            fault_point("after_publish")

    def _plain_start(self, queue: OrderQueue, task: OrderTask, now: datetime) -> Step | None:
        """``decide()``'s step for starting ``task`` when it is a plain PENDING → CREATING: the
        queue's next attempt, a configured provider, nothing else to write. None otherwise."""
        config = self.configs.get(task.provider_id)
        if config is None or task.state != TaskState.PENDING or not may_start(queue, task):
            return None
        step = decide(task, Start(), config, now)
        if (
            step.to != TaskState.CREATING
            or step.changes
            or step.balance is not None
            or step.timer is not None
            or step.stop_cascade
        ):
            return None
        return step

    async def _start_unlocked(
        self,
        queue_id: uuid.UUID,
        task_id: uuid.UUID,
        *,
        actor: str,
        trace_id: str | None,
        seen: bus.StartSeen | None,
    ) -> bool:
        """The common first step of a start, PENDING → CREATING, without a locked transaction:
        one conditional write (:func:`store.start_pending`) that lands only if the queue and
        the task are at the versions its decision was made on. A start that carries them
        (``seen``: decided when it was published) writes at once; otherwise, or when they no
        longer hold, the queue is read and decided on first. Anything else — another state,
        not the queue's next attempt, an unknown provider, a change in between — returns False
        and the caller takes the locked path, which decides as usual.
        """
        now = self.clock()
        async with self.pool.acquire() as conn:
            started = None
            if seen is not None:
                started = await store.start_pending(
                    conn,
                    queue_id=queue_id,
                    queue_version=seen.queue_version,
                    task_id=task_id,
                    task_version=seen.task_version,
                    event=START_EVENT,
                    actor=actor,
                    trace_id=trace_id,
                    details={},  # a plain start's, as _audit_details makes them
                    now=now,
                )
            if started is None:
                rec = await store.load_queue(conn, queue_id=queue_id)
                task = rec.queue.find_task(task_id) if rec else None
                step = self._plain_start(rec.queue, task, now) if rec and task else None
                if rec is None or task is None or step is None:
                    return False
                started = await store.start_pending(
                    conn,
                    queue_id=queue_id,
                    queue_version=rec.queue.version,
                    task_id=task_id,
                    task_version=task.version,
                    event=step.event,
                    actor=actor,
                    trace_id=trace_id,
                    details=_audit_details(step, _details(Start())),
                    now=now,
                )
        if started is None:
            return False
        _observe_time(TaskState.PENDING, started.provider_id, started.pending_since, now)
        return True

    async def _apply(
        self, tx: _Tx, task_id: uuid.UUID, event: Event, *, actor: str, trace_id: str | None
    ) -> Event | None:
        """Apply ``event`` and the answers of any calls it triggers, in this transaction.

        Returns an event to apply in a *new* transaction: entering CREATING is committed
        before freezing and creating, so a crash mid-call leaves a task the sweeper resumes.
        """
        task = tx.queue.task(task_id)
        if isinstance(event, TimerFired):
            tx.fired = event.kind
        while True:
            config = self.configs.get(task.provider_id)
            now = self.clock()
            if (
                isinstance(event, Start)
                and task.state == TaskState.PENDING
                and not may_start(tx.queue, task)
            ):
                step = Step(event="start", ignored_because="not this queue's next attempt")
            elif config is None:
                step = self._unknown_provider(task, event)
            else:
                step = decide(task, event, config, now)
            if step.ignored:
                if (
                    task.state == TaskState.CREATING
                    and isinstance(event, ProviderAnswer)
                    and event.source == "webhook"
                ):
                    raise CreateInProgress(f"task {task_id} is CREATING")
                log.info(
                    "event ignored",
                    extra={
                        "task_id": str(task_id),
                        "event": step.event,
                        "because": step.ignored_because,
                    },
                )
                return None
            # No call while a write is held back: the record is written before it, as always.
            await self._flush(tx)
            if step.balance is not None:
                await self._balance(step.balance, task)
                fault_point("after_balance_call")
            if step.record:
                task = await self._persist(
                    tx, task, step, actor=actor, trace_id=trace_id, details=_details(event)
                )
            if step.stop_cascade and not tx.queue.stop_requested:
                await self._flush(tx)
                await store.save_queue(
                    tx.conn,
                    tx.queue,
                    stop_requested=True,
                    event="queue.stop_requested",
                    actor=actor,
                    trace_id=trace_id,
                    now=now,
                )
                tx.queue = dataclasses.replace(
                    tx.queue, stop_requested=True, version=tx.queue.version + 1
                )
            if task.final:
                await self._advance(tx, actor=actor, trace_id=trace_id)
            if step.to == TaskState.CREATING:
                return Start(resume=False)
            if step.call is None or config is None:
                return None
            await self._flush(tx)
            event = await self._call(step.call, task, config, tx.record)
            if step.call == "poll" and _still_waiting(task, event):
                wait = after_poll_pending(task, config, self.clock())
                task = await self._persist(
                    tx, task, wait, actor=actor, trace_id=trace_id, details=_details(event)
                )
                return None
            if (
                step.call == "freeze_and_create"
                and task.freeze_state != "frozen"
                and not isinstance(event, FreezeRefused | FreezeRolledBack | FreezeCommitted)
            ):
                task = dataclasses.replace(task, freeze_state="frozen")

    def _unknown_provider(self, task: OrderTask, event: Event) -> Step:
        if task.state == TaskState.PENDING and isinstance(event, Start):
            return Step(
                event="provider.unknown",
                to=TaskState.SKIPPED,
                changes={"outcome": "provider_error", "provider_code": "unknown_provider"},
            )
        return Step(event=type(event).__name__, ignored_because="provider not configured")

    async def _persist(
        self,
        tx: _Tx,
        task: OrderTask,
        step: Step,
        *,
        actor: str,
        trace_id: str | None,
        details: Mapping[str, object],
    ) -> OrderTask:
        await self._flush(tx)
        now = self.clock()
        after = apply_changes(task, step)
        write = store.TaskWrite(
            before=task,
            after=after,
            withdrawal_id=tx.queue.withdrawal_id,
            event=step.event,
            actor=actor,
            trace_id=trace_id,
            details=_audit_details(step, details),
            now=now,
            timer=step.timer,
            clear_timer=step.clear_timer,
        )
        after = dataclasses.replace(after, version=task.version + 1)
        if after.state == TaskState.NEGATIVE_EVAL:
            await store.save_task(tx.conn, write)
            skipped = dataclasses.replace(after, state=TaskState.SKIPPED)
            write = store.TaskWrite(
                before=after,
                after=skipped,
                withdrawal_id=tx.queue.withdrawal_id,
                event="task.skipped",
                actor=actor,
                trace_id=trace_id,
                details={},
                now=now,
                clear_timer=True,
            )
            after = dataclasses.replace(skipped, version=after.version + 1)
        if after.final and step.timer is None:
            # Held back until the next statement of this transaction, at the latest its end
            # (_flush): when the queue becomes final too, both go in one statement (_advance).
            tx.pending = write
        else:
            await store.save_task(tx.conn, write)
        if after.state != task.state:
            _observe_time_in_state(task, now)
            after = dataclasses.replace(after, state_entered_at=now)
            tx.purge.extend(self._purges(task, tx.fired))
        if step.timer is not None:
            headers = bus.schedule_headers(
                self.names.subject(bus.TIMER_TARGETS[step.timer.kind]), step.timer.due_at
            )
            payload = msgspec.json.encode(
                bus.TaskMessage(
                    task_id=task.task_id, queue_id=task.queue_id, attempt=step.timer.attempt
                )
            )
            armed = self.names.schedule_subject(task.task_id, step.timer.kind)
            tx.armed.add(armed)
            tx.outbox.append(
                await store.enqueue(
                    tx.conn,
                    armed,
                    payload,
                    {**headers, **bus.trace_headers(trace_id)},
                )
            )
        tx.queue = dataclasses.replace(
            tx.queue,
            tasks=tuple(after if t.task_id == after.task_id else t for t in tx.queue.tasks),
        )
        return after

    async def _advance(self, tx: _Tx, *, actor: str, trace_id: str | None) -> None:
        """Apply the queue rules after a task became final."""
        qstep = advance_queue(tx.queue)
        for task_id in qstep.skip_tasks:
            await self._persist(
                tx,
                tx.queue.task(task_id),
                Step(event="queue.finished", to=TaskState.SKIPPED),
                actor=actor,
                trace_id=trace_id,
                details={},
            )
        for task_id in qstep.cancel_tasks:
            await self._persist(
                tx,
                tx.queue.task(task_id),
                Step(
                    event="queue.cancelled",
                    to=TaskState.CANCELLED,
                    changes={"outcome": "cancelled"},
                ),
                actor=actor,
                trace_id=trace_id,
                details={},
            )
        if qstep.start_task is not None:
            await self._flush(tx)
            payload = msgspec.json.encode(
                self.start_message(tx.queue, tx.queue.task(qstep.start_task))
            )
            tx.outbox.append(
                await store.enqueue(
                    tx.conn,
                    self.names.subject(bus.TASK_START),
                    payload,
                    {"Nats-Msg-Id": f"start-{qstep.start_task.hex}", **bus.trace_headers(trace_id)},
                )
            )
        if qstep.to is None:
            return
        now = self.clock()
        before = tx.queue
        tx.queue = dataclasses.replace(
            before,
            state=qstep.to,
            version=before.version + 1,
            failure_code=qstep.failure_code or before.failure_code,
        )
        queue_record = store.QueueRecord(
            queue=tx.queue, created_at=tx.queue_created_at, updated_at=now, finished_at=now
        )
        view = withdrawal_view(tx.record, queue_record)
        body = encode_withdrawal(view)
        # The final state, its audit row, the notification to send and the write of the task
        # that made it final (held back by _persist): one statement.
        task_write, tx.pending = tx.pending, None
        await store.save_queue(
            tx.conn,
            before,
            state=qstep.to,
            failure_code=qstep.failure_code,
            event=f"queue.{qstep.to.value.lower()}",
            actor=actor,
            trace_id=trace_id,
            now=now,
            notification=store.Notification(
                status=view.status, body=body, first_attempt_at=now + NOTIFY_RETRY_AFTER
            ),
            task=task_write,
        )
        tx.finished.append((view.status, body))
        cohort = tx.record.cohort
        outcome = {
            QueueState.COMPLETED: "succeeded",
            QueueState.FAILED: "failed",
            QueueState.CANCELLED: "cancelled",
        }[qstep.to]
        attempts = sum(
            1
            for t in tx.queue.tasks
            if t.provider_reference is not None
            or t.state in (TaskState.SUCCEEDED, TaskState.FAILED)
        )
        m.withdrawals_final.labels(cohort=cohort, outcome=outcome).inc()
        m.withdrawal_attempts.labels(cohort=cohort).observe(max(attempts, 1))
        m.withdrawal_duration.labels(cohort=cohort, outcome=outcome).observe(
            (now - tx.record.created_at).total_seconds()
        )

    async def _flush(self, tx: _Tx) -> None:
        """Send the task write :meth:`_persist` held back, if any: before any other statement
        or call of the transaction, and before it commits."""
        if tx.pending is not None:
            write, tx.pending = tx.pending, None
            await store.save_task(tx.conn, write)

    async def _balance(self, operation: str, task: OrderTask) -> None:
        # Raises CoreUnavailable/CoreRefused: the transaction rolls back and nothing moves.
        if operation == "commit":
            await self.core.commit(str(task.task_id))
        else:
            await self.core.rollback(str(task.task_id))

    async def _call(
        self, call: str, task: OrderTask, config: ProviderConfig, record: store.WithdrawalRecord
    ) -> Event:
        if call == "freeze_and_create":
            try:
                held = await self.core.freeze(
                    str(task.task_id),
                    record.withdrawal_id,
                    task.provider_id,
                    record.amount,
                    record.currency,
                )
            except CoreRefused as exc:
                if exc.code == "insufficient_balance":
                    return FreezeRefused(exc.code)
                raise
            if held == "rolled_back":
                return FreezeRolledBack()
            if held == "committed":
                return FreezeCommitted()
            fault_point("after_freeze")
            destination = msgspec.convert(record.destination, ProviderDestination)
            order = CreateOrder(
                order_id=task.provider_order_id,
                amount=f"{record.amount:.2f}",
                currency=record.currency,
                destination=destination,
            )
            created = await self.providers.create(config, order)
            fault_point("after_provider_create")
            return created
        if call == "poll":
            return await self.providers.status(config, task.provider_order_id)
        if call == "cancel_at_provider":
            return await self.providers.cancel(config, task.provider_order_id)
        raise AssertionError(call)

    async def _after_commit(self, tx: _Tx) -> None:
        # Purge before publishing, and never a subject this transaction re-armed: the new
        # timer on that subject must survive.
        purges = [s for s in dict.fromkeys(tx.purge) if s not in tx.armed]
        if purges:
            await asyncio.gather(*(self.relay.purge(subject) for subject in purges))
        await self.relay.publish_now(tx.outbox)
        for status, body in tx.finished:
            await self.notify_now(tx.record.withdrawal_id, status, body)

    async def notify_now(self, withdrawal_id: str, status: str, body: bytes) -> None:
        """First notification attempt right after the final commit; the notifier retries."""
        try:
            await self.core.notify(withdrawal_id, status, body)
        except Exception as exc:  # noqa: BLE001 — any failure is retried by the notifier loop
            m.core_notifications.labels(result="error").inc()
            log.warning(
                "notification failed, will retry",
                extra={"withdrawal_id": withdrawal_id, "error": str(exc)},
            )
            return
        m.core_notifications.labels(result="acked").inc()
        self.relay.deferred.notification_acked(withdrawal_id, status)


def _plain_move(task: OrderTask, step: Step) -> bool:
    """A state change that needs nothing but its write: no call, no timer, not final."""
    return (
        step.to is not None
        and step.to != task.state
        and step.to not in FINAL_TASK_STATES
        and step.to not in (TaskState.CREATING, TaskState.NEGATIVE_EVAL)
        and step.balance is None
        and step.call is None
        and step.timer is None
        and not step.stop_cascade
    )


def _audit_details(step: Step, details: Mapping[str, object]) -> dict[str, object]:
    """An audit row's details: the event's, the step's scalar changes, the balance call."""
    audit = {
        **details,
        **{k: v for k, v in step.changes.items() if isinstance(v, str | int | bool | None)},
    }
    if step.balance:
        audit["balance"] = step.balance
    return audit


def _observe_time_in_state(task: OrderTask, now: datetime) -> None:
    _observe_time(task.state, task.provider_id, task.state_entered_at, now)


def _observe_time(
    state: TaskState, provider_id: str, entered_at: datetime | None, now: datetime
) -> None:
    if entered_at is not None:
        m.task_time_in_state.labels(state=state.value, provider=provider_id).observe(
            (now - entered_at).total_seconds()
        )


def _still_waiting(task: OrderTask, event: Event) -> bool:
    """A poll that proved nothing: ambiguous, still pending, or a 404 for an accepted order."""
    if isinstance(event, Ambiguous):
        return True
    if isinstance(event, ProviderAnswer):
        if event.status == "pending":
            # While rechecking, "pending" is the proof the order exists: not a wait.
            return task.state != TaskState.RECHECKING
        return event.status == "absent" and task.state != TaskState.RECHECKING
    return False


def _details(event: Event) -> dict[str, object]:
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
        case CancelRequested(reason=reason):
            return {"reason": reason}
    return {}
