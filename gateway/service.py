"""The application service: what the v1 API, the webhook intake, the ops API and the CLI ask of
the gateway, one method per use case.

Callers parse their input and encode the answer; this module decides and runs: it reads
through the store, builds a new withdrawal with a pure function (:func:`new_withdrawal`), and
hands the cascade to the engine and the broker. Ids and the clock come through ports
(:data:`orchestrator.ports.Ids`, :data:`orchestrator.ports.Clock`), so that tests can fix
them. A request it refuses raises a
:class:`ServiceError`; each caller maps those to its own wire format, in one place.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

import msgspec

from contracts.legacy import CascadeEntry, CreateWithdrawal, WithdrawalView, encode_metadata
from contracts.messages import WebhookMessage
from contracts.provider import FINAL_PROVIDER_STATUSES, ProviderWebhook, provider_order_id
from contracts.providers_file import ProviderConfig
from flags.router import Cohort, RoutingDecision
from gateway.runtime import Runtime
from orchestrator import bus, store
from orchestrator import metrics as m
from orchestrator.domain import OrderQueue, OrderTask, QueueState, TaskState, public_state
from orchestrator.engine import ResolutionRefused, withdrawal_view
from orchestrator.ports import Clock, Ids, utcnow
from orchestrator.store import views

log = logging.getLogger("cascade.service")

# Providers the providers file does not know take the longest key the contract allows.
DEFAULT_KEY_LENGTH = 64


# --- refusals ----------------------------------------------------------------------------------


class ServiceError(Exception):
    """A request the service refuses; nothing was changed."""


class Unavailable(ServiceError):
    """The database or the broker does not answer: try again later."""


class UnknownWithdrawal(ServiceError):
    pass


class DuplicateWithdrawal(ServiceError):
    """Another request holds the withdrawal id."""


class IdempotencyConflict(ServiceError):
    """The idempotency key was used with a different request body."""


class NotCancellable(ServiceError):
    """The withdrawal is already final."""


class UnknownTask(ServiceError):
    pass


class ResolutionConflict(ServiceError):
    """Support's decision was not applied (see ``orchestrator.engine.ResolutionRefused``);
    ``evidence``: what the provider answered when it was asked (its audit row's details), if
    it was."""

    def __init__(self, code: str, message: str, evidence: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.evidence = evidence


class NotInManualCheck(ServiceError):
    def __init__(self, state: TaskState) -> None:
        super().__init__(f"Task is {state}, not MANUAL_CHECK.")
        self.state = state


# --- pure decisions ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NewWithdrawal:
    """A withdrawal as its creation writes it: the request and routing decision, its queue
    (ACTIVE) with one PENDING task per provider to try, and the fee of each of those."""

    record: store.WithdrawalRecord
    queue: store.QueueRecord
    fees: tuple[Decimal, ...]


def providers_to_try(request: CreateWithdrawal, cohort: Cohort) -> Sequence[CascadeEntry]:
    """The cascade entries a cohort walks: all of them, or only the cheapest (legacy)."""
    return request.cascade if cohort == "cascade" else request.cascade[:1]


def new_withdrawal(
    request: CreateWithdrawal,
    decision: RoutingDecision,
    *,
    idempotency_key: str | None,
    request_sha256: bytes,
    trace_id: str,
    queue_id: uuid.UUID,
    task_ids: Sequence[uuid.UUID],
    now: datetime,
    providers: Mapping[str, ProviderConfig],
) -> NewWithdrawal:
    """The new aggregate, built without I/O: ``task_ids`` holds one id per provider to try
    (:func:`providers_to_try`); versions are 1, as the insert leaves them."""
    entries = providers_to_try(request, decision.cohort)
    tasks = tuple(
        OrderTask(
            task_id=task_id,
            queue_id=queue_id,
            position=position,
            provider_id=entry.provider_id,
            state=TaskState.PENDING,
            version=1,
            provider_order_id=provider_order_id(task_id, _key_length(providers, entry)),
        )
        for position, (entry, task_id) in enumerate(zip(entries, task_ids, strict=True))
    )
    record = store.WithdrawalRecord(
        withdrawal_id=request.withdrawal_id,
        merchant_id=request.merchant_id,
        amount=request.amount,
        currency=request.currency,
        destination=msgspec.to_builtins(request.destination),
        metadata=encode_metadata(request.metadata),
        cascade=[{"provider_id": e.provider_id, "fee": f"{e.fee:.2f}"} for e in request.cascade],
        idempotency_key=idempotency_key,
        request_sha256=request_sha256,
        cohort=decision.cohort,
        routing_reason=decision.reason,
        flag_state=decision.flag_state,
        trace_id=trace_id,
        created_at=now,
    )
    queue = OrderQueue(
        queue_id=queue_id,
        withdrawal_id=request.withdrawal_id,
        state=QueueState.ACTIVE,
        version=1,
        tasks=tasks,
    )
    return NewWithdrawal(
        record=record,
        queue=store.QueueRecord(queue=queue, created_at=now, updated_at=now, finished_at=None),
        fees=tuple(entry.fee for entry in entries),
    )


def _key_length(providers: Mapping[str, ProviderConfig], entry: CascadeEntry) -> int:
    config = providers.get(entry.provider_id)
    return config.idempotency_key_max_length if config else DEFAULT_KEY_LENGTH


def replayed(
    claims: Sequence[views.Claim], idempotency_key: str | None, request_sha256: bytes
) -> str | None:
    """The withdrawal a request replays, given what holds its id or key: the key's holder if
    the bodies match; None when nothing holds either. Raises :class:`IdempotencyConflict` (the
    key with another body) or :class:`DuplicateWithdrawal` (the id, under another key)."""
    if idempotency_key is not None:
        for claim in claims:
            if claim.idempotency_key == idempotency_key:
                if claim.request_sha256 != request_sha256:
                    raise IdempotencyConflict
                return claim.withdrawal_id
    if claims:
        raise DuplicateWithdrawal
    return None


def must_cancel(queue: OrderQueue) -> bool:
    """Whether a cancel request has anything to do: a processing withdrawal is cancelled, a
    cancelled one already is (answered as it is); a succeeded or failed one refuses."""
    status = public_state(queue).status
    if status in ("succeeded", "failed"):
        raise NotCancellable
    return status == "processing"


def check_resolvable(state: TaskState | None) -> None:
    """Only a task waiting in MANUAL_CHECK takes support's decision."""
    if state is None:
        raise UnknownTask
    if state != TaskState.MANUAL_CHECK:
        raise NotInManualCheck(state)


@contextlib.contextmanager
def _database_required() -> Iterator[None]:
    """An unreachable database is :class:`Unavailable`: the caller may simply retry."""
    try:
        yield
    except store.DATABASE_UNAVAILABLE as exc:
        log.warning("database unavailable", extra={"error": repr(exc)})
        raise Unavailable from exc


# --- the service -------------------------------------------------------------------------------


# What became of a verified webhook: not an outcome (``progress``: the timers keep running),
# handed to the orchestrator (``accepted``), already handed over (``duplicate``), or not, the
# broker being down (``unavailable``: the provider retries).
WebhookReceipt = Literal["progress", "accepted", "duplicate", "unavailable"]


@dataclass(frozen=True, slots=True)
class Created:
    """A create's answer: the withdrawal, and whether the request replayed an earlier one."""

    view: WithdrawalView
    replayed: bool


class WithdrawalService:
    """The gateway's use cases over one process's live dependencies."""

    def __init__(self, runtime: Runtime, *, clock: Clock = utcnow, ids: Ids = uuid.uuid4) -> None:
        self._rt = runtime
        self._clock = clock
        self._ids = ids

    async def create(
        self,
        request: CreateWithdrawal,
        *,
        idempotency_key: str | None,
        request_sha256: bytes,
        trace_id: str,
    ) -> Created:
        """Accept a withdrawal for its cohort, or answer a replay of an earlier request."""
        with _database_required():
            # Accepting needs the broker (to drive the withdrawal) as much as the database; a
            # replay or a duplicate is still answered without it.
            if not self._rt.nats_up:
                async with self._rt.pool.acquire() as conn:
                    replay = await self._replay(conn, request, idempotency_key, request_sha256)
                if replay is None:
                    raise Unavailable
                return replay
            return await self._accept(request, idempotency_key, request_sha256, trace_id)

    async def view(self, withdrawal_id: str) -> WithdrawalView:
        with _database_required():
            async with self._rt.pool.acquire() as conn:
                return await _view(conn, withdrawal_id)

    async def cancel(
        self, withdrawal_id: str, *, reason: str | None, trace_id: str
    ) -> WithdrawalView:
        """Cancel a processing withdrawal; answers it as it is afterwards."""
        with _database_required():
            async with self._rt.pool.acquire() as conn:
                queue = await store.load_queue(conn, withdrawal_id=withdrawal_id)
            if queue is None:
                raise UnknownWithdrawal
            if must_cancel(queue.queue):
                await self._rt.engine.cancel_queue(
                    queue.queue.queue_id, reason=reason, actor="api:cancel", trace_id=trace_id
                )
            async with self._rt.pool.acquire() as conn:
                return await _view(conn, withdrawal_id)

    async def manual_checks(self) -> list[views.ManualCheck]:
        """Tasks waiting for support, the longest waiting first."""
        with _database_required():
            async with self._rt.pool.acquire() as conn:
                return await views.manual_checks(conn)

    async def resolve(
        self,
        task_id: uuid.UUID,
        *,
        positive: bool,
        reason: str,
        actor: str,
        unverified: bool = False,
    ) -> OrderTask:
        """Support's decision on a manual check: positive commits the frozen amount (the
        provider paid); negative, once the provider confirmed it will not pay (or could not be
        asked), rolls it back and the cascade moves on. A decision not applied raises
        :class:`ResolutionConflict`; cascade-core's refusals (``CoreUnavailable``,
        ``CoreRefused``) reach the caller: nothing changed."""
        with _database_required():
            async with self._rt.pool.acquire() as conn:
                check_resolvable(await views.task_state(conn, task_id))
            try:
                task = await self._rt.engine.resolve(
                    task_id, positive=positive, reason=reason, actor=actor, unverified=unverified
                )
            except ResolutionRefused as exc:
                evidence = None
                if exc.code.startswith("provider_"):
                    async with self._rt.pool.acquire() as conn:
                        evidence = await views.refusal_details(conn, task_id, actor)
                raise ResolutionConflict(exc.code, str(exc), evidence) from exc
        if task is None:
            raise UnknownTask
        return task

    async def withdrawal_detail(self, withdrawal_id: str) -> views.WithdrawalDetail:
        """The queue, every task and the audit trail of one withdrawal, for support."""
        with _database_required():
            async with self._rt.pool.acquire() as conn:
                detail = await views.withdrawal_detail(conn, withdrawal_id)
        if detail is None:
            raise UnknownWithdrawal
        return detail

    async def accept_webhook(
        self, provider_id: str, event: ProviderWebhook, *, webhook_id: str, trace_id: str
    ) -> WebhookReceipt:
        """Hand a verified webhook to the orchestrator on JetStream. Its ``Nats-Msg-Id`` of
        provider + reference + status absorbs a provider's quick retries; the state machine
        absorbs everything later."""
        if event.status not in FINAL_PROVIDER_STATUSES:
            return "progress"
        if not self._rt.nats_up:
            return "unavailable"
        message = WebhookMessage(
            provider_id=provider_id,
            order_id=event.order_id,
            reference=event.reference,
            status=event.status,
            code=event.code,
            webhook_id=webhook_id,
        )
        msg_id = f"wh:{provider_id}:{event.reference}:{event.status}"
        try:
            ack = await self._rt.js.publish(
                self._rt.relay.names.subject(bus.WEBHOOK_RECEIVED),
                msgspec.json.encode(message),
                headers={"Nats-Msg-Id": msg_id, **bus.trace_headers(trace_id)},
                timeout=5,
            )
        except Exception:  # noqa: BLE001 — any broker failure: the provider retries later
            return "unavailable"
        return "duplicate" if ack.duplicate else "accepted"

    # --- create ---------------------------------------------------------------------------

    async def _accept(
        self, request: CreateWithdrawal, key: str | None, digest: bytes, trace_id: str
    ) -> Created:
        router = self._rt.router
        assert router is not None, "the gateway's runtime is opened with the router"
        decision = router.decide(request.merchant_id)
        queue_id = self._ids()
        task_ids = [self._ids() for _ in providers_to_try(request, decision.cohort)]
        new = new_withdrawal(
            request,
            decision,
            idempotency_key=key,
            request_sha256=digest,
            trace_id=trace_id,
            queue_id=queue_id,
            task_ids=task_ids,
            now=self._clock(),
            providers=self._rt.settings.providers,
        )
        start = self._start_message(new, trace_id) if decision.cohort == "cascade" else None
        async with self._rt.pool.acquire() as conn:
            written = await store.insert_withdrawal(
                conn, new.record, queue_id, new.queue.queue.tasks, new.fees, start=start
            )
            if written is False:
                # The id or the key exists (perhaps a concurrent request's, which was waited for).
                replay = await self._replay(conn, request, key, digest)
                if replay is not None:
                    return replay
                log.error("insert refused, yet neither the id nor the key exists")
                raise Unavailable
        _count_accepted(new, decision)
        if decision.cohort == "legacy":
            return Created(view=await self._single_shot(new, trace_id), replayed=False)
        assert isinstance(written, store.OutboxMessage)
        await self._rt.relay.publish_now([written])
        # The answer describes the withdrawal as accepted, built from what was just written
        # (whatever a fast worker did since is for GET to show).
        return Created(view=withdrawal_view(new.record, new.queue), replayed=False)

    def _start_message(self, new: NewWithdrawal, trace_id: str) -> store.NewMessage:
        """The outbox message that starts the cascade's first task."""
        queue = new.queue.queue
        return self._rt.engine.start_message(queue, queue.tasks[0], trace_id)

    async def _single_shot(self, new: NewWithdrawal, trace_id: str) -> WithdrawalView:
        """Legacy: one create inside the request; its answer decides the response."""
        first = new.queue.queue.tasks[0]
        try:
            await self._rt.engine.start_task(
                first.queue_id, first.task_id, actor="api:legacy", trace_id=trace_id
            )
        except Exception as exc:  # noqa: BLE001 — the task stays CREATING; the sweeper resumes it
            log.warning(
                "legacy create did not finish in the request",
                extra={"withdrawal_id": new.record.withdrawal_id, "error": repr(exc)},
            )
        async with self._rt.pool.acquire() as conn:
            return await _view(conn, new.record.withdrawal_id)

    async def _replay(
        self,
        conn: store.Connection,
        request: CreateWithdrawal,
        key: str | None,
        digest: bytes,
    ) -> Created | None:
        """The answer to a request whose id or key is taken (the earlier withdrawal, or a
        refusal); None when neither is."""
        claims = await views.claims(conn, withdrawal_id=request.withdrawal_id, idempotency_key=key)
        withdrawal_id = replayed(claims, key, digest)
        if withdrawal_id is None:
            return None
        return Created(view=await _view(conn, withdrawal_id), replayed=True)


async def _view(conn: store.Connection, withdrawal_id: str) -> WithdrawalView:
    loaded = await store.load_all(conn, withdrawal_id=withdrawal_id)
    if loaded is None:
        raise UnknownWithdrawal
    return withdrawal_view(*loaded)


def _count_accepted(new: NewWithdrawal, decision: RoutingDecision) -> None:
    # Counted only for a new withdrawal: a replay or a duplicate asked the router for nothing.
    m.routing_decisions.labels(cohort=decision.cohort, reason=decision.reason).inc()
    m.withdrawals_created.labels(cohort=decision.cohort).inc()
    log.info(
        "withdrawal accepted",
        extra={
            "withdrawal_id": new.record.withdrawal_id,
            "queue_id": str(new.queue.queue.queue_id),
            "cohort": decision.cohort,
            "reason": decision.reason,
            "trace_id": new.record.trace_id,
        },
    )
