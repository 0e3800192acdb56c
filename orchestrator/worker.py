"""The worker process: consumes orchestrator events, relays the outbox, sweeps, notifies.

- Consumer: one durable pull consumer, explicit ack. Every payload goes through one decoder
  (:func:`orchestrator.bus.decode`) and is dispatched on its type with ``match``. A handler
  that raises is nak'ed with a growing delay; on its last allowed delivery the message goes to
  ``order.task.dlq`` with the error and is acked (``dlq_size`` shows it; ``cascade-gateway dlq
  replay`` sends it back). Errors no retry can fix (:data:`NOT_RETRYABLE`) go there at once.
- Sweeper: Postgres decides what is due. Timers whose due time passed without being handled
  (a schedule lost by the broker) are fired directly; tasks stranded in PENDING/CREATING (a
  crash after commit and before publish, or mid-create) are started again. Handlers ignore
  whatever no longer applies, so sweeping something that was merely slow is harmless.
- Notifier: final-status notifications to cascade-core, retried with backoff until a 2xx.
- Reconciliation (:mod:`orchestrator.reconciliation`), when given a reconciler: one run every
  ``recon_interval`` seconds; the fleet-wide advisory lock lets one worker at a time run it.
- A broker that lost its streams (its store wiped) is repaired while the worker runs: a fetch
  or a pass failing the way a missing stream or consumer fails asks :class:`bus.Streams` to
  recreate them, the fetch loop binds again, and the sweeper and the outbox relay re-publish
  what Postgres says is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, assert_never

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from contracts import messages
from contracts.messages import DeadLetter, TaskMessage, WebhookMessage
from orchestrator import bus
from orchestrator import metrics as m
from orchestrator.core_client import CascadeCore
from orchestrator.domain import FINAL_TASK_STATES, IllegalTransition, TaskState, TimerKind
from orchestrator.engine import Engine, TimerDue
from orchestrator.reconciliation import Reconciler
from orchestrator.store import sweeps

log = logging.getLogger("cascade.worker")

FETCH_CHUNK = 64
FETCH_MAX = 256
# How long a failed message's withdrawal lookup may take (the database may be why it failed).
_LOOKUP_TIMEOUT = 2.0
_TIMER_KINDS: dict[str, TimerKind] = {
    bus.RECHECK_TICK: "recheck",
    bus.WEBHOOK_TIMEOUT: "webhook_timeout",
    bus.STATUS_TICK: "status_tick",
    bus.STATUS_TIMEOUT: "status_timeout",
    bus.RETRY_TICK: "retry",
}
# The states the gauges report, 0 when no task is in one. NEGATIVE_EVAL is not among them: a
# task passes through it to SKIPPED within one transaction.
_WAITING_STATES = [
    state
    for state in TaskState
    if state not in FINAL_TASK_STATES and state != TaskState.NEGATIVE_EVAL
]

# The retry policy. An error named here is one no retry can fix: its message goes to the DLQ on
# its first delivery, with this reason. Any other error is retried after bus.BACKOFF[n]
# seconds, and dead-lettered as retries_exhausted after bus.MAX_DELIVER deliveries.
NOT_RETRYABLE: dict[type[Exception], str] = {
    bus.UnreadableMessage: messages.UNREADABLE_MESSAGE,
    IllegalTransition: messages.ILLEGAL_TRANSITION,
}


def dead_letter_reason(error: Exception, deliveries: int) -> str | None:
    """Why a message that failed on its ``deliveries``-th delivery goes to the DLQ now, or
    None when it is to be retried."""
    for kind, reason in NOT_RETRYABLE.items():
        if isinstance(error, kind):
            return reason
    return messages.RETRIES_EXHAUSTED if deliveries >= bus.MAX_DELIVER else None


class _Slot:
    """One of the worker's handler slots, released once (early, or when its task ends)."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


class Worker:
    def __init__(
        self,
        *,
        engine: Engine,
        js: JetStreamContext,
        core: CascadeCore,
        concurrency: int = 16,
        sweep_interval: float = 2.0,
        stranded_after: float = 10.0,
        timer_grace: float = 15.0,
        streams: bus.Streams | None = None,
        reconciler: Reconciler | None = None,
    ) -> None:
        self.engine = engine
        self.reconciler = reconciler
        self.js = js
        self.names = engine.names
        self.core = core
        self.concurrency = concurrency
        self.sweep_interval = sweep_interval
        self.stranded_after = stranded_after
        self.timer_grace = timer_grace
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._streams = streams
        self._bound = 0  # the streams' generation the subscription was bound under

    @property
    def streams(self) -> bus.Streams:
        """What repairs a broker that lost its streams: by default the outbox relay's, one
        per process."""
        if self._streams is not None:
            return self._streams
        streams = self.engine.relay.streams
        assert streams is not None, "a worker's relay publishes to JetStream"
        return streams

    async def start(self) -> None:
        sub = await self._bind()
        self._tasks = [
            asyncio.create_task(self._consume(sub), name="consume"),
            asyncio.create_task(self.engine.relay.run(), name="outbox-relay"),
            asyncio.create_task(self._loop(self.sweep_once, self.sweep_interval), name="sweeper"),
            asyncio.create_task(self._loop(self.notify_once, 1.0), name="notifier"),
            asyncio.create_task(self._loop(self.measure_dlq, 5.0), name="dlq-gauge"),
            asyncio.create_task(self.engine.health.run(self.engine.pool), name="provider-health"),
        ]
        if self.reconciler is not None:
            run, every = self.reconciler.run_once, self.reconciler.policy.interval
            self._tasks.append(asyncio.create_task(self._loop(run, every), name="reconciliation"))

    async def stop(self, grace: float = 8.0) -> None:
        """Stop fetching, let in-flight handlers finish (unacked ones are redelivered)."""
        for task in self._tasks:
            task.cancel()
        # Bounded: a loop stuck in a client call that ignores cancellation must not hold up
        # the shutdown (unacked messages are redelivered anyway).
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._running:
            await asyncio.wait(self._running, timeout=grace)

    async def _loop(self, fn: Callable[[], Awaitable[object]], interval: float) -> None:
        while True:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("periodic pass failed", extra={"loop": getattr(fn, "__name__", "")})
                # A sweep's publish or the DLQ gauge may be the first to meet a lost stream.
                await self.streams.heal(exc)
            await asyncio.sleep(interval)

    async def _bind(self) -> JetStreamContext.PullSubscription:
        generation = self.streams.generation
        sub = await self.js.pull_subscribe_bind(
            durable=self.names.consumer, stream=self.names.stream
        )
        self._bound = generation
        return sub

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            free = max(1, self.concurrency - len(self._running))
            try:
                msgs = await sub.fetch(free, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — broker hiccup: wait and fetch again
                log.warning("fetch failed", extra={"error": repr(exc)})
                # A consumer the broker lost answers no fetch: recreate it (here, or in the
                # relay or the sweeper of this process) and bind to the new one.
                await self.streams.heal(exc)
                if self.streams.generation != self._bound:
                    sub = await self._rebind(sub)
                else:
                    await asyncio.sleep(0.5)
                continue
            msgs += await self._more_timers(sub, msgs, free)
            timers = [msg for msg in msgs if self._is_timer(msg)]
            if len(timers) > 1:
                await self._spawn(functools.partial(self._handle_timers, timers))
                msgs = [msg for msg in msgs if not self._is_timer(msg)]
            for msg in msgs:
                await self._spawn(functools.partial(self._handle, msg))

    async def _rebind(
        self, old: JetStreamContext.PullSubscription
    ) -> JetStreamContext.PullSubscription:
        try:
            sub = await self._bind()
        except Exception as exc:  # noqa: BLE001 — keep the old binding; the next failure retries
            log.warning("binding the recreated consumer failed", extra={"error": repr(exc)})
            await asyncio.sleep(0.5)
            return old
        with contextlib.suppress(Exception):
            await old.unsubscribe()
        return sub

    async def _spawn(self, job: Callable[[_Slot], Coroutine[Any, Any, None]]) -> None:
        """Run ``job`` as a handler once one of the worker's ``concurrency`` slots is free."""
        await self._slots.acquire()
        slot = _Slot(self._slots)
        task = asyncio.create_task(job(slot))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(lambda _t: slot.release())

    async def _more_timers(
        self, sub: JetStreamContext.PullSubscription, fetched: list[Msg], asked: int
    ) -> list[Msg]:
        """While fetches come back full of timers only (a burst of firings), fetch on, up to
        ``FETCH_MAX``: they are applied as one batch taking one handler slot. Other messages
        are fetched no faster than slots free up, so that every worker gets its share."""
        more: list[Msg] = []
        chunk = fetched
        while (
            len(chunk) == asked
            and all(self._is_timer(msg) for msg in chunk)
            and len(fetched) + len(more) < FETCH_MAX
        ):
            asked = min(FETCH_CHUNK, FETCH_MAX - len(fetched) - len(more))
            try:
                chunk = await sub.fetch(asked, timeout=0.05)
            except (NatsTimeoutError, TimeoutError):
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — keep what was fetched; fetch again later
                log.warning("fetch failed", extra={"error": repr(exc)})
                break
            more += chunk
        return more

    def _is_timer(self, msg: Msg) -> bool:
        return self.names.unprefixed(msg.subject) in _TIMER_KINDS

    async def _handle_timers(self, msgs: list[Msg], slot: _Slot) -> None:
        """Timer messages fetched together: one transaction for the plain state changes
        (:meth:`Engine.timers_fired`); each of the others, or all of them if that fails, is
        then handled as if it had come alone, in a handler slot of its own."""
        pairs: list[tuple[TimerDue, Msg]] = []
        alone: list[Msg] = []
        for msg in msgs:
            subject = self.names.unprefixed(msg.subject)
            try:
                message = bus.decode(subject, msg.data)
            except bus.UnreadableMessage:
                alone.append(msg)  # _handle dead-letters it, as any unreadable message
                continue
            assert isinstance(message, TaskMessage)  # what every timer subject carries
            due = TimerDue(message=message, kind=_TIMER_KINDS[subject], trace_id=_trace_id(msg))
            pairs.append((due, msg))
        try:
            rest = await self.engine.timers_fired([d for d, _ in pairs])
        except Exception as exc:  # noqa: BLE001 — nothing was written: one at a time instead
            log.warning("timer batch failed, handling one by one", extra={"error": repr(exc)})
            rest = [d for d, _ in pairs]
        left = {id(d) for d in rest}
        for d, msg in pairs:
            if id(d) in left:
                alone.append(msg)
                continue
            try:
                await msg.ack()
            except Exception as exc:  # noqa: BLE001 — redelivered later, then ignored as stale
                log.warning(
                    "ack failed",
                    extra={
                        "task_id": str(d.message.task_id),
                        "queue_id": str(d.message.queue_id),
                        "error": repr(exc),
                    },
                )
        # The batch's slot is free now: the rest (provider polls, mostly) queue for slots
        # like any other message, so the worker's concurrency bound holds.
        slot.release()
        for msg in alone:
            await self._spawn(functools.partial(self._handle, msg))

    async def _handle(self, msg: Msg, _slot: _Slot | None = None) -> None:
        subject = self.names.unprefixed(msg.subject)
        try:
            await self.dispatch(subject, msg.data, _trace_id(msg))
        except Exception as exc:  # noqa: BLE001 — the retry policy decides: retry or dead-letter
            m.handler_errors.labels(subject=subject, error=type(exc).__name__).inc()
            await self._failed(msg, subject, exc)
            return
        await msg.ack()

    async def _failed(self, msg: Msg, subject: str, exc: Exception) -> None:
        deliveries = msg.metadata.num_delivered
        reason = dead_letter_reason(exc, deliveries)
        ids = await self._ids_of(subject, msg.data)
        if reason is None:
            delay = bus.BACKOFF[min(deliveries - 1, len(bus.BACKOFF) - 1)]
            log.warning(
                "handler failed, will retry",
                extra={
                    **ids,
                    "subject": subject,
                    "error": repr(exc),
                    "deliveries": deliveries,
                    "retry_in": delay,
                },
            )
            await msg.nak(delay=delay)
            return
        try:
            await self._dead_letter(msg, subject, exc, deliveries, reason, ids=ids)
        except Exception as dlq_exc:  # keep it: nak, dead-letter it later
            log.exception(
                "dead-lettering failed; will retry",
                extra={**ids, "subject": subject, "error": repr(dlq_exc)},
            )
            await msg.nak(delay=bus.BACKOFF[-1])
            return
        await msg.ack()

    async def _ids_of(self, subject: str, data: bytes) -> dict[str, str]:
        """The ids a failed message's log lines and dead letter carry: a task message's task
        and queue, a webhook's provider, order and reference, and the withdrawal's, read from
        the record. Only on failure paths, and best effort: an unreadable payload has none,
        and a lookup that fails or finds nothing leaves the withdrawal out."""
        try:
            message = bus.decode(subject, data)
        except bus.UnreadableMessage:
            return {}
        ids: dict[str, str]
        try:
            match message:
                case TaskMessage():
                    ids = {"task_id": str(message.task_id), "queue_id": str(message.queue_id)}
                    lookup = functools.partial(
                        sweeps.withdrawal_of_queue, queue_id=message.queue_id
                    )
                case WebhookMessage():
                    ids = {
                        "provider_id": message.provider_id,
                        "order_id": message.order_id,
                        "reference": message.reference,
                    }
                    lookup = functools.partial(
                        sweeps.withdrawal_of_order,
                        provider_id=message.provider_id,
                        order_id=message.order_id,
                    )
                case unknown:
                    assert_never(unknown)
            async with asyncio.timeout(_LOOKUP_TIMEOUT):
                async with self.engine.pool.acquire() as conn:
                    withdrawal_id = await lookup(conn)
        except Exception as exc:  # noqa: BLE001 — the ids are a help; the failure path goes on
            log.warning(
                "withdrawal lookup for a failed message failed",
                extra={**ids, "subject": subject, "error": repr(exc)},
            )
            return ids
        if withdrawal_id:
            ids["withdrawal_id"] = withdrawal_id
        return ids

    async def dispatch(self, subject: str, data: bytes, trace_id: str | None) -> None:
        """Decode one event and hand it to its handler (also used by ``dlq replay`` tests)."""
        match bus.decode(subject, data):
            case TaskMessage() as start if subject == bus.TASK_START:
                await self.engine.start_task(
                    start.queue_id,
                    start.task_id,
                    actor="worker",
                    trace_id=trace_id,
                    seen=start.seen,
                )
            case TaskMessage() as timer:
                await self.engine.timer_fired(timer, _TIMER_KINDS[subject], trace_id)
            case WebhookMessage() as webhook:
                await self.engine.webhook(webhook, trace_id)
            case unknown:
                assert_never(unknown)

    async def _dead_letter(
        self,
        msg: Msg,
        subject: str,
        exc: Exception,
        deliveries: int,
        reason: str,
        *,
        ids: dict[str, str],
    ) -> None:
        letter = DeadLetter(
            subject=subject,
            payload=msg.data.decode(errors="replace"),
            error=f"{type(exc).__name__}: {exc}"[:2000],
            deliveries=deliveries,
            failed_at=datetime.now(UTC).isoformat(),
            reason=reason,
            withdrawal_id=ids.get("withdrawal_id", ""),
            task_id=ids.get("task_id", ""),
        )
        await self.js.publish(self.names.subject(bus.DLQ), msgspec.json.encode(letter))
        log.error(
            "message dead-lettered",
            extra={**ids, "subject": subject, "reason": reason, "error": letter.error},
        )

    async def measure_dlq(self) -> None:
        """Gauges read from the record and the broker: DLQ size, tasks waiting per state."""
        m.dlq_size.set(await bus.dlq_size(self.js, self.names))
        async with self.engine.pool.acquire() as conn:
            waiting = {row.state: row for row in await sweeps.tasks_per_state(conn)}
        for state in _WAITING_STATES:
            row = waiting.get(state)
            m.tasks_in_state.labels(state=state).set(row.count if row else 0)
            m.task_oldest_in_state.labels(state=state).set(row.oldest_seconds if row else 0)

    async def sweep_once(self) -> int:
        """Fire overdue timers and restart stranded tasks; returns how many were re-armed."""
        now = datetime.now(UTC)
        async with self.engine.pool.acquire() as conn:
            overdue = await sweeps.overdue_timers(conn, now - timedelta(seconds=self.timer_grace))
            stranded = await sweeps.stranded_tasks(
                conn, now - timedelta(seconds=self.stranded_after)
            )
        refused: list[NoStreamResponseError] = []
        for timer in overdue:
            payload = msgspec.json.encode(
                TaskMessage(task_id=timer.task_id, queue_id=timer.queue_id, attempt=timer.attempt)
            )
            msg_id = f"sweep-{timer.task_id.hex}-{timer.kind}-{timer.attempt}"
            subject = self.names.subject(bus.TIMER_TARGETS[timer.kind])
            await self._republish(subject, payload, msg_id, refused)
        minute = now.strftime("%Y%m%d%H%M")
        for task in stranded:
            payload = msgspec.json.encode(TaskMessage(task_id=task.task_id, queue_id=task.queue_id))
            msg_id = f"restart-{task.task_id.hex}-{minute}"
            await self._republish(self.names.subject(bus.TASK_START), payload, msg_id, refused)
        if refused:
            raise refused[0]  # the loop heals the streams (a subject another version dropped)
        fired = len(overdue) + len(stranded)
        if fired:
            log.info(
                "sweeper re-armed work", extra={"timers": len(overdue), "stranded": len(stranded)}
            )
        return fired

    async def _republish(
        self, subject: str, payload: bytes, msg_id: str, refused: list[NoStreamResponseError]
    ) -> None:
        """Publish one re-armed message; one whose subject no stream takes (a process of
        another version set a shorter subject list) is kept in ``refused`` and the sweep
        goes on: it must not hold up every other timer behind it."""
        try:
            await self.js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
        except NoStreamResponseError as exc:
            refused.append(exc)

    async def notify_once(self) -> int:
        """Retry notifications that were not acknowledged yet (exponential backoff, no limit)."""
        sent = 0
        async with self.engine.pool.acquire() as conn, conn.transaction():
            for due in await sweeps.due_notifications(conn):
                try:
                    await self.core.notify(due.withdrawal_id, due.status, due.body)
                except Exception as exc:  # noqa: BLE001 — retried with backoff below
                    m.core_notifications.labels(result="error").inc()
                    await sweeps.notification_failed(
                        conn,
                        due.withdrawal_id,
                        due.status,
                        error=repr(exc)[:500],
                        retry_in=min(3600.0, 2.0 ** min(due.attempts + 1, 12)),
                    )
                    continue
                m.core_notifications.labels(result="acked").inc()
                await sweeps.notification_acked(conn, due.withdrawal_id, due.status)
                sent += 1
        return sent


def _trace_id(msg: Msg) -> str | None:
    parent = (msg.headers or {}).get("traceparent")
    if parent and len(parent) >= 35:
        return parent[3:35]
    return None
