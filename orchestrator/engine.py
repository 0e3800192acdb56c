"""The orchestrator's handlers: load, decide, run the effects, commit.

Every entry point turns its input into a domain event and drives it through one loop
(:meth:`Engine._drive`): a unit of work loads the withdrawal (taking the queue row lock, so
the events of one withdrawal are applied one at a time by whichever process holds it),
:func:`~orchestrator.domain.decide_in_queue` says what the event does, the engine runs the
step's effects in the order the step prescribes, :func:`~orchestrator.domain.settle` applies
it to the queue, and the unit of work writes it all and publishes after the commit.

Effects, in order: the balance call a step needs (commit/rollback at cascade-core) before its
state change is recorded — if it fails the transaction rolls back, nothing moves, and the
message is retried; then the record; then the step's call (freeze and create, poll, cancel at
the provider), whose answer is the next event, in the same transaction. A step that enters
CREATING commits on its own first (``Step.then``): a crash mid-create leaves a task the
sweeper resumes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec

from contracts.legacy import WithdrawalView, decode_metadata, encode_withdrawal
from contracts.messages import StartSeen, TaskMessage, WebhookMessage
from contracts.provider import CreateOrder, ProviderDestination
from contracts.providers_file import ProviderConfig
from orchestrator import bus, store
from orchestrator import metrics as m
from orchestrator.breaker import CallResult
from orchestrator.core_client import CascadeCore, CoreRefused
from orchestrator.domain import (
    RETRY_EVENT,
    UNKNOWN_PROVIDER_EVENT,
    Ambiguous,
    Balance,
    Call,
    CancelRequested,
    Declined,
    Event,
    FreezeCommitted,
    FreezeRefused,
    FreezeRolledBack,
    Gate,
    OrderQueue,
    OrderTask,
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
    decide,
    decide_in_queue,
    hold_deadline,
    plain_start,
    plan_start,
    public_state,
    request_cancel,
    settle,
    turn_began,
    wants_start,
)
from orchestrator.faults import fault_point
from orchestrator.outbox import OutboxRelay
from orchestrator.ports import Clock, EngineStore, UnitOfWork, utcnow
from orchestrator.provider_client import ProviderAdapter
from orchestrator.provider_health import ProviderHealth
from orchestrator.store.uow import PostgresEngineStore

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
_OUTCOME_OF = {
    QueueState.COMPLETED: "succeeded",
    QueueState.FAILED: "failed",
    QueueState.CANCELLED: "cancelled",
}


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


class RetryLater(Exception):
    """A webhook that cannot be applied yet: its task's create has no recorded outcome (a
    crash cut it off; the sweeper resumes it within seconds), or this worker does not know
    its provider (a providers file that differs during a deploy). Retried with the usual
    backoff, then dead-lettered, never dropped: the provider's own retries of it would be
    deduplicated away."""


class ResolutionRefused(Exception):
    """Support's decision was not applied; ``code`` says why, ``state`` is the task's state
    afterwards:

    - ``not_in_manual_check``: the task was not waiting for a decision when it took the lock
      (a concurrent decision won, or the provider's answer came first);
    - ``provider_paid``: a negative decision, but the provider reports the order succeeded:
      the attempt is committed instead;
    - ``provider_pending``: a negative decision, but the order is still pending at the
      provider and no cancel of it was confirmed: nothing changed, the provider may still pay;
    - ``provider_unreachable``: a negative decision the provider could not confirm (no answer,
      an unreadable one, a 404 for an order it had accepted): nothing changed, unless sent
      again ``unverified``.
    A refused decision is recorded in the audit trail all the same.
    """

    def __init__(self, code: str, message: str, state: TaskState) -> None:
        super().__init__(message)
        self.code = code
        self.state = state


@dataclass(frozen=True, slots=True)
class TimerDue:
    """A timer message as :meth:`Engine.timers_fired` takes it."""

    message: TaskMessage
    kind: TimerKind
    trace_id: str | None


@dataclass
class _Handling:
    """One handler's transaction: the withdrawal it loaded and what it decided so far."""

    uow: UnitOfWork
    record: store.WithdrawalRecord
    queue: OrderQueue
    queue_created_at: datetime
    actor: str
    trace_id: str | None
    # The timer whose firing this transaction handles: its schedule is spent, no purge needed.
    fired: TimerKind | None = None
    transitions: list[Transition] = field(default_factory=list)
    finished: list[tuple[str, bytes]] = field(default_factory=list)
    # The last step decided (ignored or not).
    last: Step | None = None


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
        clock: Clock = utcnow,
        record: EngineStore | None = None,
        health: ProviderHealth | None = None,
    ) -> None:
        self.pool = pool
        self.relay = relay
        self.names = relay.names
        self.record = record or PostgresEngineStore(pool, relay)
        self.core = core
        self.providers = providers
        self.configs = provider_configs
        # The legacy cohort's withdrawals run single-shot (ProviderConfig.single_shot): the
        # baseline the cascade is compared with is the system it replaces.
        self.legacy_configs = {p: c.single_shot() for p, c in provider_configs.items()}
        self.clock = clock
        self.health = health or ProviderHealth(provider_configs, clock)
        # Every series at 0 from the start: an alert on increase() sees the first event (a
        # series born at 1 has increased by nothing).
        for provider_id, config in provider_configs.items():
            for reason in _UNMATCHED_LOG:
                m.webhooks_unmatched.labels(provider=provider_id, reason=reason)
            for code in config.errors:
                if config.retry_for(code) is not None:
                    m.provider_retries.labels(provider=provider_id, code=code)

    # --- entry points ------------------------------------------------------------------

    async def start_task(
        self,
        queue_id: uuid.UUID,
        task_id: uuid.UUID,
        *,
        actor: str,
        trace_id: str | None = None,
        seen: StartSeen | None = None,
    ) -> None:
        """Start a task; ``seen``: the versions its start was decided on when published."""
        event = Start()
        if seen is not None and await self._start_seen(queue_id, task_id, seen, actor, trace_id):
            event = Start(resume=False)  # CREATING is committed: now the calls, locked
        await self._drive(queue_id, task_id, event, actor=actor, trace_id=trace_id)

    async def _start_seen(
        self,
        queue_id: uuid.UUID,
        task_id: uuid.UUID,
        seen: StartSeen,
        actor: str,
        trace_id: str | None,
    ) -> bool:
        """PENDING → CREATING in one statement, without a transaction or a read, when the
        start was published with the versions decide() approved a plain start on (see
        :meth:`start_message`) and both still hold; False: the locked path decides as usual.
        Performance shortcut, worth it by bench.ab against the locked path: a sync_ok
        withdrawal 17.3 → 13.4 worker messages, 0.48× → 0.85× the throughput of the commit
        before the redesign (README, *Operations → Benchmarks*)."""
        now = self.clock()
        started = await self.record.start_pending(
            queue_id=queue_id,
            queue_version=seen.queue_version,
            task_id=task_id,
            task_version=seen.task_version,
            actor=actor,
            trace_id=trace_id,
            now=now,
            # A provider this worker cannot call (a providers file that differs during a
            # deploy) takes the locked path, which skips it instead of creating nothing; so
            # does one whose health gates its starts (a breaker not closed, a limit).
            providers=[p for p in self.configs if self.health.unguarded(p)],
        )
        if started is None:
            return False
        if started.pending_since is not None:
            m.task_time_in_state.labels(
                state=TaskState.PENDING.value, provider=started.provider_id
            ).observe((now - started.pending_since).total_seconds())
        # Numbered as a transaction of its own, as the crash tests count them.
        fault_point("after_state_write")
        fault_point("after_publish")
        return True

    async def timer_fired(self, msg: TaskMessage, kind: TimerKind, trace_id: str | None) -> None:
        event = TimerFired(kind=kind, attempt=msg.attempt)
        await self._drive(msg.queue_id, msg.task_id, event, actor="timer", trace_id=trace_id)

    async def webhook(self, msg: WebhookMessage, trace_id: str | None) -> bool:
        """Apply a verified webhook; False when no task owns the order (recorded, ignored)."""
        found = await self._match(msg)
        if found is None:
            return False
        queue_id, task_id = found
        answer = ProviderAnswer(
            status=msg.status, reference=msg.reference, code=msg.code, source="webhook"
        )
        actor = f"provider:{msg.provider_id}"
        last = await self._drive(queue_id, task_id, answer, actor=actor, trace_id=trace_id)
        if last is None or last.ignored:
            # Ignored: when its task became final between the match and the lock (support's
            # negative decision, say), matching again records it as any webhook for a final
            # task is: a success there may be a second payout, and must not pass unseen.
            await self._match(msg)
        return True

    async def _match(self, msg: WebhookMessage) -> tuple[uuid.UUID, uuid.UUID] | None:
        """The (queue_id, task_id) a webhook applies to; None, logged and recorded in
        ``unmatched_webhooks`` with the reason, when no task owns it or its task is final."""
        found = await self.record.match_webhook(
            msg.provider_id, msg.order_id, msg.reference, msg.status
        )
        if not isinstance(found, str):
            return found
        level, message = _UNMATCHED_LOG[found]
        extra = {"provider_id": msg.provider_id, "reference": msg.reference, "reason": found}
        log.log(level, message, extra=extra)
        m.webhooks_unmatched.labels(provider=msg.provider_id, reason=found).inc()
        return None

    async def resolve(
        self,
        task_id: uuid.UUID,
        *,
        positive: bool,
        reason: str,
        actor: str,
        trace_id: str | None = None,
        unverified: bool = False,
    ) -> OrderTask | None:
        """Support's decision on a manual check; returns the task afterwards (None: unknown).
        Raises :class:`ResolutionRefused` when the decision is not applied: the task was not
        waiting for it when it took the lock (a concurrent decision won, or the provider's
        answer came first), or the provider contradicts or cannot confirm a negative one."""
        queue_id = await self.record.queue_of_task(task_id)
        if queue_id is None:
            return None
        event = Resolve(positive=positive, reason=reason, actor=actor, unverified=unverified)
        last = await self._drive(queue_id, task_id, event, actor=actor, trace_id=trace_id)
        queue = await self.record.load_queue(queue_id)
        assert queue is not None
        task = queue.task(task_id)
        if last is None or last.ignored:
            message = f"task is {task.state}, not MANUAL_CHECK"
            raise ResolutionRefused("not_in_manual_check", message, task.state)
        if last.refusal is not None:
            raise ResolutionRefused(last.refusal.code, last.refusal.message, task.state)
        return task

    async def cancel_queue(
        self, queue_id: uuid.UUID, *, reason: str | None, actor: str, trace_id: str | None = None
    ) -> None:
        """Queue-level cancel: pending tasks stop now; an active one finishes when it can."""
        async with self.record.unit_of_work() as uow:
            handling = await self._open(uow, queue_id, actor, trace_id)
            if handling is None or handling.queue.final:
                return
            self._add(handling, request_cancel(handling.queue, reason, self.clock()))
            await self._commit(handling)
        # Also when the queue's flag was set before: a crash (or a failed drive) between that
        # commit and this drive left the active task without its cancel, which a repeated
        # cancel must still deliver.
        active = handling.queue.active_task()
        if active is not None and not active.cancel_requested:
            event = CancelRequested(reason)
            await self._drive(queue_id, active.task_id, event, actor=actor, trace_id=trace_id)

    async def timers_fired(self, due: Sequence[TimerDue]) -> list[TimerDue]:
        """Apply many timer firings in one transaction, where each one is a plain state change
        (no balance call, no provider call, no new timer, not final: e.g. EXECUTING →
        MANUAL_CHECK when an SLA expires), as one by one through the same decide().

        A burst of timers (a provider outage lets thousands of webhook SLAs expire in the same
        second) would otherwise cost a transaction each. Returns the firings this did not
        apply (they need I/O or a final state, share a queue with an earlier one, or their
        queue is locked by a handler right now): the caller hands each to
        :meth:`timer_fired`. Raises when the transaction failed, having written nothing.
        """
        rest: list[TimerDue] = []
        done: list[Transition] = []
        async with self.record.unit_of_work() as uow:
            queues = await uow.load_queues([d.message.queue_id for d in due])
            now = self.clock()
            for d in due:
                queue = queues.pop(d.message.queue_id, None)
                transition = self._fire_plain(uow, queue, d, now) if queue else None
                if transition is None:
                    rest.append(d)
                elif transition.changes:
                    done.append(transition)
            await uow.commit()
        for transition in done:
            _observe_time_in_state(transition)
        return rest

    def start_message(
        self, queue: OrderQueue, task: OrderTask, trace_id: str | None = None
    ) -> store.NewMessage:
        """The outbox message that starts ``task`` (deduplicated per task by the broker), with
        the versions of ``queue`` and ``task`` when starting it is a plain PENDING → CREATING
        (the worker then writes it without a read, if nothing changed in between)."""
        seen = None
        if plain_start(queue, task, self.configs.get(task.provider_id)):
            seen = StartSeen(queue_version=queue.version, task_version=task.version)
        start = TaskMessage(task_id=task.task_id, queue_id=queue.queue_id, seen=seen)
        payload = msgspec.json.encode(start)
        # One id per publication (the task's version): the outbox relay's re-send of the same
        # row is absorbed, while a task started again after being passed over is not taken
        # for a duplicate of its first start.
        message_id = f"start-{task.task_id.hex}-{task.version}"
        headers = {"Nats-Msg-Id": message_id, **bus.trace_headers(trace_id)}
        return store.NewMessage(self.names.subject(bus.TASK_START), payload, headers)

    # --- the loop ----------------------------------------------------------------------

    async def _drive(
        self,
        queue_id: uuid.UUID,
        task_id: uuid.UUID,
        event: Event,
        *,
        actor: str,
        trace_id: str | None,
    ) -> Step | None:
        """Apply ``event`` to a task, and the events its steps lead to, one transaction each.
        Returns the last step decided (ignored or not); None when the queue is unknown."""
        pending: tuple[uuid.UUID, Event] | None = (task_id, event)
        last: Step | None = None
        while pending is not None:
            task_id, event = pending
            if isinstance(event, Start) and event.not_before is not None:
                # A rate-limit slot due within a second: kept without holding anything.
                await asyncio.sleep((event.not_before - self.clock()).total_seconds())
            async with self.record.unit_of_work() as uow:
                handling = await self._open(uow, queue_id, actor, trace_id)
                if handling is None:
                    return None
                pending = await self._apply(handling, task_id, event)
                await self._commit(handling)
            last = handling.last
        return last

    async def _apply(
        self, handling: _Handling, task_id: uuid.UUID, event: Event
    ) -> tuple[uuid.UUID, Event] | None:
        """Decide ``event`` and the answers of the calls it triggers, in this transaction;
        returns the task and event to apply in the next one, if any."""
        if isinstance(event, TimerFired):
            handling.fired = event.kind
        while True:
            task = handling.queue.task(task_id)
            configs = self._configs_of(handling.record)
            config = configs.get(task.provider_id)
            if config is not None and wants_start(handling.queue, task, event):
                return await self._start(handling, task, configs)
            step = decide_in_queue(handling.queue, task_id, event, config, self.clock())
            handling.last = step
            if step.ignored:
                if step.retry:
                    raise RetryLater(f"task {task_id} is {task.state}: {step.ignored_because}")
                _log_ignored(task_id, step.event, step.ignored_because)
                return None
            # Settled first (pure, checks the tables): no money moves for a step that cannot
            # be recorded.
            transition = settle(handling.queue, task_id, step, self.clock(), fired=handling.fired)
            if step.balance is not None:
                await self._balance(step.balance, task)
                fault_point("after_balance_call")
            self._add(handling, transition)
            if step.call is None or config is None:
                return None if step.then is None else (task_id, step.then)
            answer = await self._call(
                step.call, handling.queue.task(task_id), config, handling.record
            )
            if step.awaiting is not None:
                assert isinstance(answer, ProviderAnswer | Ambiguous)
                answer = ProviderChecked(resolve=step.awaiting, answer=answer)
            event = answer

    def _configs_of(self, record: store.WithdrawalRecord) -> Mapping[str, ProviderConfig]:
        return self.legacy_configs if record.cohort == "legacy" else self.configs

    async def _start(
        self, handling: _Handling, first: OrderTask, configs: Mapping[str, ProviderConfig]
    ) -> tuple[uuid.UUID, Event] | None:
        """Start the queue's next attempt as provider health allows (:func:`plan_start`);
        returns the task that entered CREATING and the event that makes its calls."""
        queue, now = handling.queue, self.clock()
        hold_until = hold_deadline(queue, configs[first.provider_id], now)
        gates = await self._gates(
            handling.uow, queue, configs, first, now=now, hold_until=hold_until
        )
        transition, chosen = plan_start(queue, gates, now, hold_until)
        self._add(handling, transition)
        if chosen is None:
            return None
        return chosen.task_id, Start(resume=False, not_before=gates[-1][1].not_before)

    async def _gates(
        self,
        uow: UnitOfWork,
        queue: OrderQueue,
        configs: Mapping[str, ProviderConfig],
        first: OrderTask,
        *,
        now: datetime,
        hold_until: datetime,
    ) -> list[tuple[OrderTask, Gate]]:
        """Each pending task in cascade order, gated, up to the first not passed over. Once
        the queue has waited until ``hold_until``, the first one's breaker no longer stops
        it."""
        gates: list[tuple[OrderTask, Gate]] = []
        since = turn_began(queue) or now
        for task in (t for t in queue.tasks if t.state == TaskState.PENDING):
            task_config = configs.get(task.provider_id)
            ignore_breaker = now >= hold_until and task is first
            if task_config is None:
                gate = Gate(verdict="pass_over", reason="provider_not_configured")
            else:
                gate = await self.health.gate(
                    uow, task, task_config, now, waiting_since=since, breaker=not ignore_breaker
                )
            overridden = ignore_breaker and not self.health.closed(task.provider_id)
            if overridden and gate.verdict == "admit":
                gate = dataclasses.replace(gate, reason="hold_expired")
            gates.append((task, gate))
            if gate.verdict != "pass_over":
                break
        return gates

    def _fire_plain(
        self, uow: UnitOfWork, queue: OrderQueue, due: TimerDue, now: datetime
    ) -> Transition | None:
        """Record one firing of a timer batch if it is a plain move (its transition) or stale
        (an empty one); None: it needs the full handler."""
        task = queue.find_task(due.message.task_id)
        config = self.configs.get(task.provider_id) if task else None
        if task is None or config is None:
            return None
        step = decide(task, TimerFired(kind=due.kind, attempt=due.message.attempt), config, now)
        if step.ignored:
            _log_ignored(task.task_id, step.event, step.ignored_because)
            return Transition(queue=queue, at=now)
        if not step.plain:
            return None
        transition = settle(queue, task.task_id, step, now, fired=due.kind)
        uow.add(transition, withdrawal_id=queue.withdrawal_id, actor="timer", trace_id=due.trace_id)
        return transition

    # --- effects -----------------------------------------------------------------------

    async def _open(
        self, uow: UnitOfWork, queue_id: uuid.UUID, actor: str, trace_id: str | None
    ) -> _Handling | None:
        loaded = await uow.load(queue_id)
        if loaded is None:
            return None
        record, queue = loaded
        return _Handling(
            uow=uow,
            record=record,
            queue=queue.queue,
            queue_created_at=queue.created_at,
            actor=actor,
            trace_id=trace_id,
        )

    def _add(self, handling: _Handling, transition: Transition) -> None:
        """Hand a transition's writes and messages to the unit of work."""
        uow = handling.uow
        notification = None
        if transition.finished is not None:
            queue = store.QueueRecord(
                queue=transition.queue,
                created_at=handling.queue_created_at,
                updated_at=transition.at,
                finished_at=transition.at,
            )
            view = withdrawal_view(handling.record, queue)
            body = encode_withdrawal(view)
            notification = store.Notification(
                status=view.status, body=body, first_attempt_at=transition.at + NOTIFY_RETRY_AFTER
            )
            handling.finished.append((view.status, body))
        uow.add(
            transition,
            withdrawal_id=handling.record.withdrawal_id,
            actor=handling.actor,
            trace_id=handling.trace_id,
            notification=notification,
        )
        for change in transition.changes:
            if isinstance(change, TaskChange):
                if change.timer is not None:
                    uow.publish(self._timer_message(change.after, change.timer, handling.trace_id))
                if change.purge is not None:
                    uow.purge(self.names.schedule_subject(change.after.task_id, change.purge))
        if transition.start is not None:
            uow.publish(self.start_message(transition.queue, transition.start, handling.trace_id))
        handling.queue = transition.queue
        handling.transitions.append(transition)

    async def _commit(self, handling: _Handling) -> None:
        """Commit, then what follows a commit: metrics, the first notification attempt."""
        await handling.uow.commit()
        for transition in handling.transitions:
            _observe_time_in_state(transition)
            _report_unknown_providers(handling.record, transition)
            _count_returns(handling.record, transition)
            _count_retries(transition)
            if transition.finished is not None:
                _observe_final(
                    handling.record, transition.finished, transition.queue, transition.at
                )
        for status, body in handling.finished:
            await self.notify_now(handling.record.withdrawal_id, status, body)
        fault_point("after_publish")

    def _timer_message(
        self, task: OrderTask, timer: Timer, trace_id: str | None
    ) -> store.NewMessage:
        """A timer as the broker keeps it: a scheduled message on the task's subject for its
        kind (re-publishing there replaces it), targeting the kind's event subject."""
        target = self.names.subject(bus.TIMER_TARGETS[timer.kind])
        headers = {**bus.schedule_headers(target, timer.due_at), **bus.trace_headers(trace_id)}
        payload = msgspec.json.encode(
            TaskMessage(task_id=task.task_id, queue_id=task.queue_id, attempt=timer.attempt)
        )
        return store.NewMessage(
            self.names.schedule_subject(task.task_id, timer.kind), payload, headers
        )

    async def _balance(self, operation: Balance, task: OrderTask) -> None:
        # Raises CoreUnavailable/CoreRefused: the transaction rolls back and nothing moves.
        match operation:
            case "commit":
                await self.core.commit(str(task.task_id))
            case "rollback":
                await self.core.rollback(str(task.task_id))

    async def _call(
        self, call: Call, task: OrderTask, config: ProviderConfig, record: store.WithdrawalRecord
    ) -> Event:
        match call:
            case "freeze_and_create":
                return await self._freeze_and_create(task, config, record)
            case "poll":
                answer = await self.providers.status(config, task.provider_order_id)
            case "cancel_at_provider":
                answer = await self.providers.cancel(config, task.provider_order_id)
        self._observe(task, answer)
        return answer

    def _observe(self, task: OrderTask, answer: Event) -> None:
        """A provider call's result, for its provider's health."""
        result: CallResult = "ok"
        if isinstance(answer, Ambiguous):
            result = "technical"
        elif isinstance(answer, Declined):
            result = "declined"
        self.health.observe(task.provider_id, task.task_id, result)

    async def _freeze_and_create(
        self, task: OrderTask, config: ProviderConfig, record: store.WithdrawalRecord
    ) -> Event:
        """Hold the amount at cascade-core, then create the order: the answer of whichever
        settles the attempt (both are idempotent, keyed by the task)."""
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
        order = CreateOrder(
            order_id=task.provider_order_id,
            amount=f"{record.amount:.2f}",
            currency=record.currency,
            destination=msgspec.convert(record.destination, ProviderDestination),
        )
        created = await self.providers.create(config, order)
        self._observe(task, created)
        fault_point("after_provider_create")
        return created

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


def _log_ignored(task_id: uuid.UUID, event: str, because: str | None) -> None:
    log.info("event ignored", extra={"task_id": str(task_id), "event": event, "because": because})


def _observe_time_in_state(transition: Transition) -> None:
    for change in transition.changes:
        if isinstance(change, TaskChange) and change.changed:
            before = change.before
            if before.state_entered_at is not None:
                m.task_time_in_state.labels(
                    state=before.state.value, provider=before.provider_id
                ).observe((transition.at - before.state_entered_at).total_seconds())


def _report_unknown_providers(record: store.WithdrawalRecord, transition: Transition) -> None:
    """An attempt skipped because its provider is not in the providers file: the contract
    accepts any provider id, so this is the one place anyone hears of it."""
    for change in transition.changes:
        if isinstance(change, TaskChange) and change.event == UNKNOWN_PROVIDER_EVENT:
            m.withdrawals_unknown_provider.inc()
            log.warning(
                "cascade entry skipped: provider not in the providers file",
                extra={
                    "withdrawal_id": record.withdrawal_id,
                    "queue_id": str(change.after.queue_id),
                    "task_id": str(change.after.task_id),
                    "provider_id": change.after.provider_id,
                },
            )


def _count_returns(record: store.WithdrawalRecord, transition: Transition) -> None:
    """A paid attempt the provider returned (SUCCEEDED → RETURNED), counted once it is
    committed: the public status stays succeeded, so this is where the cohorts' net success
    shows."""
    for change in transition.changes:
        if (
            isinstance(change, TaskChange)
            and change.changed
            and change.after.state == TaskState.RETURNED
        ):
            m.withdrawals_returned.labels(cohort=record.cohort).inc()
            log.warning(
                "provider reports a paid withdrawal returned: finance settles it",
                extra={
                    "withdrawal_id": record.withdrawal_id,
                    "task_id": str(change.after.task_id),
                    "provider_id": change.after.provider_id,
                    "code": change.after.provider_code,
                },
            )


def _count_retries(transition: Transition) -> None:
    """A declined create the error table retries, counted once its retry is armed."""
    for change in transition.changes:
        if isinstance(change, TaskChange) and change.event == RETRY_EVENT:
            after = change.after
            m.provider_retries.labels(
                provider=after.provider_id, code=after.provider_code or ""
            ).inc()


def _observe_final(
    record: store.WithdrawalRecord, final: QueueState, queue: OrderQueue, now: datetime
) -> None:
    cohort, outcome = record.cohort, _OUTCOME_OF[final]
    attempts = sum(
        1
        for t in queue.tasks
        if t.provider_reference is not None or t.state in (TaskState.SUCCEEDED, TaskState.FAILED)
    )
    m.withdrawals_final.labels(cohort=cohort, outcome=outcome).inc()
    m.withdrawal_attempts.labels(cohort=cohort).observe(max(attempts, 1))
    m.withdrawal_duration.labels(cohort=cohort, outcome=outcome).observe(
        (now - record.created_at).total_seconds()
    )
