"""Withdrawals parked waiting on a webhook, written straight into Postgres and JetStream.

Creating 100,000 withdrawals over HTTP would take most of the time budget, so the memory and
timer benchmarks write what the orchestrator itself leaves behind for a withdrawal whose only
provider accepted the order and has not called back yet (copied from a real
``[sbx_silent]`` withdrawal driven through the gateway and a worker):

* ``withdrawals`` — the stored request and routing decision (cohort ``cascade``);
* ``order_queues`` — ``ACTIVE``;
* ``order_tasks`` — ``EXECUTING`` at version 3, ``freeze_state = 'frozen'``, a provider
  reference, and the one timer it waits on: ``timer_kind = 'webhook_timeout'``,
  ``timer_attempt = 0``, ``timer_due_at``;
* ``order_task_events`` — the four audit rows of its history (queue.created, task.created,
  start, create.accepted);
* one JetStream message schedule on ``<ns>order.schedule.<task_id hex>.webhook_timeout`` with
  ``Nats-Schedule: @at <due>`` and ``Nats-Schedule-Target: <ns>order.task.webhook.timeout``,
  the payload ``{"task_id","queue_id","attempt":0}``, as ``Engine._persist`` writes it through
  the outbox.

Rows go in with ``COPY`` (asyncpg ``copy_records_to_table``), schedules through
:func:`bench.baselines.publish_pipelined` (every ack checked). The sandbox ledger knows
nothing of these freezes: they must not reach a balance call (the benchmarks only let them
wait, or time out into ``MANUAL_CHECK``, which makes none).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import nats

from bench.baselines import publish_pipelined
from bench.stack import NAMESPACE
from contracts.messages import TaskMessage
from contracts.provider import provider_order_id
from orchestrator import bus

PROVIDER = "sbx_silent"
BATCH = 10_000
_FLAG_STATE = msgspec.json.encode(
    {
        "found": True,
        "source": "bootstrap",
        "toggle": "withdrawals.cascade",
        "enabled": True,
        "revision": "bench",
        "strategies": [{"kind": "rollout", "name": "flexibleRollout", "rollout": 100}],
    }
).decode()


@dataclass(frozen=True)
class Parked:
    task_id: uuid.UUID
    queue_id: uuid.UUID


def whole_second(moment: datetime) -> datetime:
    """``moment`` rounded up to a whole second (message schedules have 1 s resolution)."""
    return datetime.fromtimestamp(math.ceil(moment.timestamp()), UTC)


def new_parked(count: int) -> list[Parked]:
    return [Parked(uuid.uuid4(), uuid.uuid4()) for _ in range(count)]


async def insert_rows(database_url: str, parked: list[Parked], due_at: datetime) -> None:
    """Write the rows of parked withdrawals whose webhook timer is due at ``due_at``."""
    run = secrets.token_hex(4)
    count = len(parked)
    now = datetime.now(UTC)
    created, accepted = now - timedelta(seconds=1), now
    destination = '{"type": "iban", "holder": null, "account": "DE89370400440532013000"}'
    cascade = f'[{{"fee": "0.50", "provider_id": "{PROVIDER}"}}]'
    conn = await asyncpg.connect(database_url)
    try:
        for start in range(0, count, BATCH):
            withdrawals, queues, tasks, events = [], [], [], []
            for i in range(start, min(count, start + BATCH)):
                withdrawal_id = f"bp-{run}-{i}"
                task_id, queue_id = parked[i].task_id, parked[i].queue_id
                trace = secrets.token_hex(16)
                withdrawals.append(
                    (
                        withdrawal_id,
                        f"m_bench_{i % 50}",
                        10,
                        "EUR",
                        destination,
                        "{}",
                        cascade,
                        None,
                        hashlib.sha256(withdrawal_id.encode()).digest(),
                        "cascade",
                        "rollout",
                        _FLAG_STATE,
                        trace,
                        created,
                    )
                )
                queues.append((queue_id, withdrawal_id, "ACTIVE", 1, created, accepted))
                tasks.append(
                    (
                        task_id,
                        queue_id,
                        0,
                        PROVIDER,
                        0.5,
                        "EXECUTING",
                        3,
                        provider_order_id(task_id, 64),
                        f"{PROVIDER}-{task_id.hex[:12]}",
                        "frozen",
                        "webhook_timeout",
                        0,
                        due_at,
                        accepted,
                        created,
                        accepted,
                    )
                )
                reference = f"{PROVIDER}-{task_id.hex[:12]}"
                accepted_details = msgspec.json.encode(
                    {
                        "code": None,
                        "source": "create",
                        "reference": reference,
                        "provider_status": "pending",
                        "provider_reference": reference,
                    }
                ).decode()
                for task, from_state, to_state, event, actor, details in (
                    (None, None, "ACTIVE", "queue.created", "api", '{"cohort": "cascade"}'),
                    (task_id, None, "PENDING", "task.created", "api", "{}"),
                    (task_id, "PENDING", "CREATING", "start", "worker", "{}"),
                    (task_id, "CREATING", "EXECUTING", "create.accepted", "worker", None),
                ):
                    events.append(
                        (
                            queue_id,
                            task,
                            withdrawal_id,
                            from_state,
                            to_state,
                            event,
                            actor,
                            trace,
                            details or accepted_details,
                            accepted,
                        )
                    )
            await conn.copy_records_to_table(
                "withdrawals",
                records=withdrawals,
                columns=[
                    "withdrawal_id",
                    "merchant_id",
                    "amount",
                    "currency",
                    "destination",
                    "metadata",
                    "cascade",
                    "idempotency_key",
                    "request_sha256",
                    "cohort",
                    "routing_reason",
                    "flag_state",
                    "trace_id",
                    "created_at",
                ],
            )
            await conn.copy_records_to_table(
                "order_queues",
                records=queues,
                columns=[
                    "queue_id",
                    "withdrawal_id",
                    "state",
                    "version",
                    "created_at",
                    "updated_at",
                ],
            )
            await conn.copy_records_to_table(
                "order_tasks",
                records=tasks,
                columns=[
                    "task_id",
                    "queue_id",
                    "position",
                    "provider_id",
                    "fee",
                    "state",
                    "version",
                    "provider_order_id",
                    "provider_reference",
                    "freeze_state",
                    "timer_kind",
                    "timer_attempt",
                    "timer_due_at",
                    "state_entered_at",
                    "created_at",
                    "updated_at",
                ],
            )
            await conn.copy_records_to_table(
                "order_task_events",
                records=events,
                columns=[
                    "queue_id",
                    "task_id",
                    "withdrawal_id",
                    "from_state",
                    "to_state",
                    "event",
                    "actor",
                    "trace_id",
                    "details",
                    "created_at",
                ],
            )
        await conn.execute("ANALYZE withdrawals, order_queues, order_tasks, order_task_events")
    finally:
        await conn.close()


async def publish_schedules(nats_url: str, parked: list[Parked], due_at: datetime) -> int:
    """One webhook-timeout schedule per parked task, due at ``due_at``; returns how many."""
    names = bus.Names(NAMESPACE)
    target = names.subject(bus.WEBHOOK_TIMEOUT)
    base = bus.schedule_headers(target, due_at)

    def messages() -> Iterator[tuple[str, bytes, dict[str, str] | None]]:
        for p in parked:
            payload = msgspec.json.encode(
                TaskMessage(task_id=p.task_id, queue_id=p.queue_id, attempt=0)
            )
            headers = {
                **base,
                "Nats-Msg-Id": f"bench-park-{p.task_id.hex}",
                "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
            }
            yield names.schedule_subject(p.task_id, "webhook_timeout"), payload, headers

    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)
    try:
        # What every gateway and worker does at start (idempotent): the stream must exist.
        await bus.ensure_streams(nc.jetstream(), names)
        return await publish_pipelined(nc, messages())
    finally:
        await nc.close()


async def park(
    database_url: str, nats_url: str, count: int, due_at: datetime
) -> tuple[list[Parked], float]:
    """Rows and schedules for ``count`` parked withdrawals; returns them and the seconds taken.

    Both are written at the same time (different servers); a schedule whose row is not
    committed yet is harmless as long as both are done before it is due.
    """
    started = datetime.now(UTC)
    parked = new_parked(count)
    await asyncio.gather(
        insert_rows(database_url, parked, due_at), publish_schedules(nats_url, parked, due_at)
    )
    return parked, (datetime.now(UTC) - started).total_seconds()
