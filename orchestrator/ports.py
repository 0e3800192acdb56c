"""The ports the engine and the application service talk through, besides cascade-core
(:mod:`orchestrator.core_client`) and the providers (:mod:`orchestrator.provider_client`):
the record, the clock and the ids.

Each has one real adapter (:mod:`orchestrator.store.uow` on Postgres) and an in-memory fake
for the engine's unit tests (``tests/unit/fakes.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Protocol, Self

from orchestrator.domain import OrderQueue, Transition
from orchestrator.store import Loaded, NewMessage, Notification, Started

Clock = Callable[[], datetime]
"""The current time, timezone-aware (:func:`utcnow` in production)."""

Ids = Callable[[], uuid.UUID]
"""A new id no other queue or task has (:func:`uuid.uuid4` in production)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class UnitOfWork(Protocol):
    """One transaction: load (locking the queue), collect what was decided, commit.

    Leaving the ``async with`` block without :meth:`commit` writes nothing.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    async def load(self, queue_id: uuid.UUID) -> Loaded | None: ...

    async def load_queues(self, queue_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, OrderQueue]: ...

    def add(
        self,
        transition: Transition,
        *,
        withdrawal_id: str,
        actor: str,
        trace_id: str | None,
        notification: Notification | None = None,
    ) -> None: ...

    def publish(self, message: NewMessage) -> None: ...

    def purge(self, subject: str) -> None: ...

    async def commit(self) -> None: ...

    # Provider health's fleet-wide limits, taken in this transaction: a start that rolls
    # back gives them back (orchestrator.provider_health).

    async def in_flight(self, provider_id: str, *, lock: bool = True) -> int:
        """The provider's attempts being created or rechecked; ``lock``: counted under the
        provider's lock, held against other starts there until this transaction ends."""
        ...

    async def take_rate(
        self, provider_id: str, per_second: float, burst: int, now: datetime, horizon: float
    ) -> float:
        """The seconds until the provider's next rate-limit slot: taken for then when at most
        ``horizon``; beyond it nothing is taken."""
        ...

    async def take_probe(
        self, provider_id: str, task_id: uuid.UUID, now: datetime, until: datetime
    ) -> bool:
        """The provider's half-open probe lease for ``task_id``, if free (or expired)."""
        ...


class EngineStore(Protocol):
    """The record as the engine uses it: units of work, and reads needing no transaction."""

    def unit_of_work(self) -> UnitOfWork: ...

    async def match_webhook(
        self, provider_id: str, order_id: str, reference: str, status: str
    ) -> tuple[uuid.UUID, uuid.UUID] | str:
        """The (queue_id, task_id) a webhook applies to, or why none (recorded for support)."""
        ...

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
    ) -> Started | None:
        """PENDING → CREATING without a read, if the queue and the task are still at the
        versions given and the task's provider is one of ``providers`` (one statement that
        takes the queue row lock itself); None otherwise."""
        ...

    async def queue_of_task(self, task_id: uuid.UUID) -> uuid.UUID | None: ...

    async def load_queue(self, queue_id: uuid.UUID) -> OrderQueue | None: ...
