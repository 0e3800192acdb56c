"""JetStream: streams, the work consumer, scheduled messages (durable timers) and the DLQ.

One stream carries every orchestrator event and every pending timer. Timers are nats-server
2.12+ message schedules: a message on ``order.schedule.<task_id>.<kind>`` with
``Nats-Schedule: @at <RFC3339>`` and ``Nats-Schedule-Target: <event subject>``. Re-publishing
to that subject replaces the timer; purging it cancels the timer. The stream uses ``limits``
retention: ``interest`` retention silently drops schedules.

Each event subject carries one message type (:data:`MESSAGE_OF_SUBJECT`; the messages are
in :mod:`contracts.messages`), and :func:`decode` reads a payload as the message of its subject.

A namespace prefix (empty in production) lets tests share one nats-server without sharing
subjects or streams.

Postgres is the record and the broker only delivers, so a broker that lost its store (a disk
wiped, a server replaced) is repaired while the processes run: :class:`Streams` recreates the
streams and the work consumer when a fetch or a publish fails the way their absence makes
it fail, and the sweeper and the outbox relay re-arm what was due from Postgres.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import (
    APIError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from contracts import messages
from contracts.messages import Message, TaskMessage, WebhookMessage
from orchestrator import metrics as m
from orchestrator.domain import TimerKind

log = logging.getLogger("cascade.bus")

TASK_START = "order.task.start"
WEBHOOK_RECEIVED = "order.task.webhook.received"
WEBHOOK_TIMEOUT = "order.task.webhook.timeout"
STATUS_TICK = "order.task.status.tick"
STATUS_TIMEOUT = "order.task.status.timeout"
RECHECK_TICK = "order.task.recheck.tick"
# A create declined with a code the error table retries, due to be made again. Not a start:
# a start carries no timer generation, and a stale or duplicate firing would create again
# before the backoff ran out.
RETRY_TICK = "order.task.retry.tick"
DLQ = "order.task.dlq"
SCHEDULE_PREFIX = "order.schedule"
# Subjects no version publishes any more: the only ones ensure_streams takes off the stream.
RETIRED_SUBJECTS = ("order.queue.cancel",)

EVENT_SUBJECTS = (
    TASK_START,
    WEBHOOK_RECEIVED,
    WEBHOOK_TIMEOUT,
    STATUS_TICK,
    STATUS_TIMEOUT,
    RECHECK_TICK,
    RETRY_TICK,
)
TIMER_TARGETS: dict[TimerKind, str] = {
    "recheck": RECHECK_TICK,
    "webhook_timeout": WEBHOOK_TIMEOUT,
    "status_tick": STATUS_TICK,
    "status_timeout": STATUS_TIMEOUT,
    # A withdrawal waiting to start (domain.plan_start) is started again when its hold ends.
    "hold": TASK_START,
    "retry": RETRY_TICK,
}
MAX_DELIVER = 8
# The consumer's own bound sits above ours: a message past MAX_DELIVER whose dead-lettering
# failed (broker trouble) is nak'ed and comes back to be dead-lettered, never silently dropped.
CONSUMER_MAX_DELIVER = 50
# Redelivery delay after the n-th failed attempt (explicit nak delay), seconds.
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


# The message each event subject carries. The worker checks a payload against it, and reads a
# payload without a type tag (published before the tag existed) as this type.
MESSAGE_OF_SUBJECT: dict[str, type[Message]] = {
    TASK_START: TaskMessage,
    WEBHOOK_RECEIVED: WebhookMessage,
    **dict.fromkeys(TIMER_TARGETS.values(), TaskMessage),
}


class UnreadableMessage(Exception):
    """A payload that is not the message its subject carries: not JSON, not the schema,
    another message type, or a subject no message belongs to. No retry can fix it."""


def decode(subject: str, data: bytes) -> Message:
    """The message on ``subject`` (unprefixed), checked against the type the subject carries."""
    expected = MESSAGE_OF_SUBJECT.get(subject)
    if expected is None:
        raise UnreadableMessage(f"no message belongs to subject {subject!r}")
    try:
        message = messages.decode(data, untagged=expected)
    except msgspec.MsgspecError as exc:
        raise UnreadableMessage(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(message, expected):
        raise UnreadableMessage(
            f"{subject} carries {expected.__name__}, not {type(message).__name__}"
        )
    return message


@dataclass(frozen=True)
class Names:
    """Stream, consumer and subject names, optionally namespaced (tests)."""

    namespace: str = ""

    @property
    def stream(self) -> str:
        return f"{self.namespace.upper().replace('.', '_')}ORDERS"

    @property
    def dlq_stream(self) -> str:
        return f"{self.namespace.upper().replace('.', '_')}ORDERS_DLQ"

    @property
    def consumer(self) -> str:
        return "workers"

    def subject(self, name: str) -> str:
        return f"{self.namespace}{name}"

    def unprefixed(self, subject: str) -> str:
        return subject.removeprefix(self.namespace)

    def schedule_subject(self, task_id: uuid.UUID, kind: TimerKind) -> str:
        return f"{self.namespace}{SCHEDULE_PREFIX}.{task_id.hex}.{kind}"


def schedule_headers(target: str, due_at: datetime) -> dict[str, str]:
    """Headers that turn a message into a one-shot timer firing on ``target`` at ``due_at``."""
    # Schedules have one-second resolution; round up so a timer never fires early.
    due = due_at.astimezone(UTC)
    if due.microsecond:
        due = due.replace(microsecond=0) + _ONE_SECOND
    return {
        "Nats-Schedule": f"@at {due.strftime('%Y-%m-%dT%H:%M:%SZ')}",
        "Nats-Schedule-Target": target,
    }


_ONE_SECOND = timedelta(seconds=1)


def trace_headers(trace_id: str | None) -> dict[str, str]:
    """W3C ``traceparent`` carrying ``trace_id`` onward (a fresh span id per message)."""
    if not trace_id:
        return {}
    return {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


async def connect(url: str, *, name: str) -> NatsClient:
    """Connect with endless reconnects: NATS outages are waited out, never fatal.

    ``url`` may list several servers separated by commas (a cluster's seeds): the client
    connects to one and fails over to the others, and to those the cluster announces."""
    state = {"down": False}
    client: list[NatsClient] = []  # the callbacks need the client connect() returns

    async def on_error(exc: Exception) -> None:
        # One line per outage, not a traceback per reconnect attempt.
        if not state["down"]:
            log.warning("nats connection problem", extra={"error": repr(exc)})
            state["down"] = True

    async def on_disconnect() -> None:
        if client and client[0].is_closed:
            return  # our own close(): nothing to reconnect, nothing to warn about
        log.warning("nats disconnected; reconnecting", extra={"client": name})

    async def on_reconnect() -> None:
        state["down"] = False
        log.warning("nats reconnected", extra={"client": name})

    nc = await nats.connect(
        [server.strip() for server in url.split(",")],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    client.append(nc)
    return nc


async def ensure_streams(
    js: JetStreamContext,
    names: Names,
    *,
    replicas: int = 1,
    file_storage: bool = True,
    ack_wait_seconds: float = 60.0,
) -> None:
    """Create or update the streams and the work consumer (idempotent, at every start)."""
    storage = js_api.StorageType.FILE if file_storage else js_api.StorageType.MEMORY
    ours = [names.subject(s) for s in EVENT_SUBJECTS]
    existing = await _existing_subjects(js, names)
    main = js_api.StreamConfig(
        name=names.stream,
        subjects=_add_only(existing[0], [*ours, names.subject(f"{SCHEDULE_PREFIX}.>")], names),
        retention=js_api.RetentionPolicy.LIMITS,
        storage=storage,
        num_replicas=replicas,
        max_age=14 * 24 * 3600,
        duplicate_window=120,
        allow_msg_schedules=True,
    )
    dlq = js_api.StreamConfig(
        name=names.dlq_stream,
        subjects=[names.subject(DLQ)],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=storage,
        num_replicas=replicas,
        max_age=30 * 24 * 3600,
    )
    # update_stream replaces the subject list, and add_consumer the consumer's filter: both are
    # given what is there already plus ours, less RETIRED_SUBJECTS. Add-only, so that a process
    # of the previous version starting mid-rollout (or after a rollback), which sets its own
    # shorter list, cannot take a newer subject away for good: the newer processes put it back
    # (Streams.missing sees it gone).
    for config in (main, dlq):
        try:
            await js.stream_info(config.name or "")
        except NotFoundError:
            await js.add_stream(config)
        else:
            await js.update_stream(config)
    await js.add_consumer(
        names.stream,
        js_api.ConsumerConfig(
            durable_name=names.consumer,
            filter_subjects=_add_only(existing[1], ours, names),
            ack_policy=js_api.AckPolicy.EXPLICIT,
            deliver_policy=js_api.DeliverPolicy.ALL,
            max_deliver=CONSUMER_MAX_DELIVER,
            # A crashed worker's message comes back after ack_wait; handlers that fail nak
            # with an explicit delay from BACKOFF instead.
            ack_wait=ack_wait_seconds,
            max_ack_pending=2000,
        ),
    )


async def _existing_subjects(js: JetStreamContext, names: Names) -> tuple[list[str], list[str]]:
    """The main stream's subjects and the work consumer's filter as the broker has them."""
    try:
        stream = await js.stream_info(names.stream)
    except NotFoundError:
        return [], []
    try:
        consumer = await js.consumer_info(names.stream, names.consumer)
    except NotFoundError:
        return list(stream.config.subjects or []), []
    return list(stream.config.subjects or []), list(consumer.config.filter_subjects or [])


def _add_only(existing: list[str], ours: list[str], names: Names) -> list[str]:
    retired = {names.subject(s) for s in RETIRED_SUBJECTS}
    kept = [s for s in existing if s not in retired and s not in ours]
    return [*ours, *kept]


# How a missing stream or consumer shows: a publish nothing stores (no stream takes the subject),
# a fetch nobody answers (no consumer: "no responders", a 503), an API call on a name the broker
# does not know. A broker that is merely down shows as timeouts and connection errors instead,
# and is waited out by the client's reconnects.
LOST_STREAM_SYMPTOMS: tuple[type[Exception], ...] = (
    NoStreamResponseError,
    ServiceUnavailableError,
    NotFoundError,
)
# A schedule whose target subject the stream does not take: the stream lost a subject.
_SCHEDULE_TARGET_INVALID = 10190


def lost_stream_symptom(error: BaseException) -> bool:
    """Whether ``error`` is how a lost stream, consumer or stream subject shows."""
    if isinstance(error, LOST_STREAM_SYMPTOMS):
        return True
    return isinstance(error, APIError) and error.err_code == _SCHEDULE_TARGET_INVALID


class Streams:
    """The streams and the work consumer a process relies on: ensured at start, and recreated
    while it runs whenever the broker turns out to have lost them.

    One instance per process (the outbox relay holds it; the worker uses the relay's), so
    the fetch loop, the sweeper and the relay that see the same loss repair it once.
    """

    def __init__(
        self,
        js: JetStreamContext,
        names: Names,
        *,
        replicas: int = 1,
        file_storage: bool = True,
        ack_wait_seconds: float = 60.0,
        check_interval: float = 2.0,
        check_timeout: float = 5.0,
    ) -> None:
        self.js = js
        self.names = names
        self.replicas = replicas
        self.file_storage = file_storage
        self.ack_wait_seconds = ack_wait_seconds
        self.check_interval = check_interval
        self.check_timeout = check_timeout
        # Bumped at each recreation: a subscription bound under an older one binds again.
        self.generation = 0
        self._checked_at: float | None = None
        self._lock = asyncio.Lock()

    async def ensure(self) -> None:
        """Create or update the streams and the work consumer (:func:`ensure_streams`)."""
        await ensure_streams(
            self.js,
            self.names,
            replicas=self.replicas,
            file_storage=self.file_storage,
            ack_wait_seconds=self.ack_wait_seconds,
        )

    async def missing(self) -> list[str]:
        """What the broker lacks of the streams and the work consumer (empty: nothing)."""
        gone: list[str] = []
        for stream in (self.names.stream, self.names.dlq_stream):
            try:
                await self.js.stream_info(stream)
            except NotFoundError:
                gone.append(f"stream {stream}")
        try:
            await self.js.consumer_info(self.names.stream, self.names.consumer)
        except NotFoundError:
            gone.append(f"consumer {self.names.consumer}")
        if not gone:
            # A process of another version may have set a shorter subject list.
            subjects, filtered = await _existing_subjects(self.js, self.names)
            ours = {self.names.subject(s) for s in EVENT_SUBJECTS}
            gone += [f"stream subject {s}" for s in sorted(ours - set(subjects))]
            gone += [f"consumer subject {s}" for s in sorted(ours - set(filtered))]
        return gone

    async def heal(self, error: BaseException) -> bool:
        """After a broker call failed with ``error``: if the error is how a lost stream or
        consumer shows and the broker confirms they are gone, recreate them. The broker is
        asked at most once per ``check_interval`` (callers fail every half second while it
        lasts); True when something was recreated."""
        if not lost_stream_symptom(error) or self._lock.locked():
            return False
        now = asyncio.get_running_loop().time()
        if self._checked_at is not None and now - self._checked_at < self.check_interval:
            return False
        async with self._lock:
            self._checked_at = now
            try:
                async with asyncio.timeout(self.check_timeout):
                    gone = await self.missing()
                    # Only what the broker says it does not know is recreated, exactly as a
                    # process start would (ensure_streams is idempotent): a 503 while the
                    # broker itself recovers is not a loss, and is checked again later.
                    if gone:
                        await self.ensure()
            except Exception as exc:  # noqa: BLE001 — the next failure checks again
                log.warning(
                    "checking the broker's streams failed; will check again",
                    extra={"error": repr(exc), "after": repr(error)},
                )
                return False
        if not gone:
            return False
        self.generation += 1
        m.broker_heals.inc()
        log.warning(
            "broker lost its streams; recreated them (pending work is re-armed from Postgres)",
            extra={"recreated": ", ".join(gone), "after": repr(error)},
        )
        return True


async def dlq_size(js: JetStreamContext, names: Names) -> int:
    info = await js.stream_info(names.dlq_stream)
    return int(info.state.messages)
