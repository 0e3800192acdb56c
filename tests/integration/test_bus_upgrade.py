"""Upgrading from the version before typed messages, on the real broker and database.

Its messages carry no type tag, and some outlive the upgrade: timers scheduled hours ahead,
outbox rows not relayed yet, dead letters replayed later. Their subject still says what they
are. Its stream and consumer also list ``order.queue.cancel``, which nothing published.
"""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec
import pytest
from nats.js import api as js_api
from nats.js.errors import NoStreamResponseError, NotFoundError

from contracts.messages import TaskMessage
from orchestrator import bus
from tests.buskit import (
    SILENT,
    dead_letters,
    outbox_empty,
    parked_providers,
    purge_starts,
    sweepless_worker,
)
from tests.conftest import Services, StackFactory
from tests.faultkit import create_withdrawal, publish, tasks_of, wait_task_state, webhook_message
from tests.integration.test_webhook_intake import wait_consumed


def _previous_task_payload(task: Mapping[str, Any], attempt: int = 0) -> bytes:
    """A task message as the version before the type tag published it."""
    return msgspec.json.encode(
        {
            "task_id": str(task["task_id"]),
            "queue_id": str(task["queue_id"]),
            "attempt": attempt,
            "seen": None,
        }
    )


def _untagged(payload: bytes) -> bytes:
    body = msgspec.json.decode(payload)
    del body["type"]
    return msgspec.json.encode(body)


async def test_messages_of_the_previous_version_are_handled(make_stack: StackFactory) -> None:
    """A start, a timer and a webhook as the previous version published them."""
    stack = await make_stack(providers=parked_providers(), with_worker=False)
    parked = await create_withdrawal(stack, [SILENT])
    settled = await create_withdrawal(stack, [SILENT])
    await outbox_empty(stack)
    await purge_starts(stack)  # published tagged by this version: replaced by untagged ones
    for wid in (parked, settled):
        (task,) = await tasks_of(stack, wid)
        await publish(stack, bus.TASK_START, _previous_task_payload(task))
    worker = sweepless_worker(stack)  # the sweeper's restarts would hide an unhandled start
    await worker.start()
    try:
        parked_task = await wait_task_state(stack, parked, 0, "EXECUTING")
        settled_task = await wait_task_state(stack, settled, 0, "EXECUTING")
        await publish(stack, bus.WEBHOOK_TIMEOUT, _previous_task_payload(parked_task))
        await publish(
            stack, bus.WEBHOOK_RECEIVED, _untagged(webhook_message(settled_task, "succeeded"))
        )
        await wait_task_state(stack, parked, 0, "MANUAL_CHECK")
        assert (await stack.wait_final(settled))["status"] == "succeeded"
        await wait_consumed(stack)
    finally:
        await worker.stop()
    assert await dead_letters(stack) == []


async def test_a_stream_of_the_previous_version_is_updated_in_place(services: Services) -> None:
    """Its subject list and the consumer's filter still name ``order.queue.cancel``."""
    nc = await bus.connect(services.nats_url, name="test-upgrade")
    js = nc.jetstream()
    names = bus.Names(f"t{secrets.token_hex(4)}.")
    previous = [*bus.EVENT_SUBJECTS, "order.queue.cancel"]
    try:
        await js.add_stream(
            js_api.StreamConfig(
                name=names.stream,
                subjects=[names.subject(s) for s in previous]
                + [names.subject(f"{bus.SCHEDULE_PREFIX}.>")],
                retention=js_api.RetentionPolicy.LIMITS,
                storage=js_api.StorageType.MEMORY,
                allow_msg_schedules=True,
            )
        )
        await js.add_consumer(
            names.stream,
            js_api.ConsumerConfig(
                durable_name=names.consumer,
                filter_subjects=[names.subject(s) for s in previous],
                ack_policy=js_api.AckPolicy.EXPLICIT,
                max_deliver=bus.CONSUMER_MAX_DELIVER,
            ),
        )
        await js.publish(names.subject("order.queue.cancel"), b'{"queue_id":"x"}')
        start = TaskMessage(task_id=uuid.uuid4(), queue_id=uuid.uuid4())
        await js.publish(names.subject(bus.TASK_START), msgspec.json.encode(start))

        await bus.ensure_streams(js, names, file_storage=False)
        await bus.ensure_streams(js, names, file_storage=False)  # at every start

        stream = await js.stream_info(names.stream)
        assert names.subject("order.queue.cancel") not in (stream.config.subjects or [])
        assert stream.state.messages == 2  # nothing stored was lost
        consumer = await js.consumer_info(names.stream, names.consumer)
        assert set(consumer.config.filter_subjects or []) == {
            names.subject(s) for s in bus.EVENT_SUBJECTS
        }
        assert consumer.num_pending == 1  # the start; the retired subject is not delivered
    finally:
        for stream_name in (names.stream, names.dlq_stream):
            with contextlib.suppress(NotFoundError):  # the test failed before creating it
                await js.delete_stream(stream_name)
        await nc.close()


async def test_a_process_of_the_previous_version_cannot_take_a_new_subject_away(
    services: Services,
) -> None:
    """The previous version knew no ``order.task.retry.tick``. Started after this one (mid
    rollout, or a rollback), it sets its own shorter subject list; this version's processes
    see the subject gone and put it back, and their own start never drops a subject it does
    not know of (add-only, but for RETIRED_SUBJECTS)."""
    nc = await bus.connect(services.nats_url, name="test-upgrade-add-only")
    js = nc.jetstream()
    names = bus.Names(f"t{secrets.token_hex(4)}.")
    previous = [s for s in bus.EVENT_SUBJECTS if s != bus.RETRY_TICK]
    streams = bus.Streams(js, names, file_storage=False)
    try:
        await streams.ensure()
        # What the previous version's start does: its own lists, replacing ours.
        stream = await js.stream_info(names.stream)
        assert stream.config.subjects is not None
        stream.config.subjects = [names.subject(s) for s in previous] + [
            names.subject(f"{bus.SCHEDULE_PREFIX}.>")
        ]
        await js.update_stream(stream.config)
        consumer = await js.consumer_info(names.stream, names.consumer)
        consumer.config.filter_subjects = [names.subject(s) for s in previous]
        await js.add_consumer(names.stream, consumer.config)
        assert await streams.missing() == [
            f"stream subject {names.subject(bus.RETRY_TICK)}",
            f"consumer subject {names.subject(bus.RETRY_TICK)}",
        ]
        # A publish to the dropped subject fails as a lost stream does, and heals it.
        with pytest.raises(NoStreamResponseError) as refused:
            await js.publish(names.subject(bus.RETRY_TICK), b"{}")
        assert await streams.heal(refused.value)
        assert await streams.missing() == []
        # A subject this version does not know (a newer one's) survives its ensure.
        stream = await js.stream_info(names.stream)
        assert stream.config.subjects is not None
        stream.config.subjects = [*stream.config.subjects, names.subject("order.task.future")]
        await js.update_stream(stream.config)
        await streams.ensure()
        stream = await js.stream_info(names.stream)
        assert names.subject("order.task.future") in (stream.config.subjects or [])
    finally:
        for stream_name in (names.stream, names.dlq_stream):
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(stream_name)
        await nc.close()
