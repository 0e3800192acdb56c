"""The worker's retry policy on the real broker and database.

A message no retry can fix (it does not decode, it is another message than its subject
carries, or its handler finds an illegal transition) goes to the DLQ on its first delivery,
with the reason; any other error keeps the retry with backoff.
"""

from __future__ import annotations

import logging
import uuid

import pytest

from contracts import messages
from contracts.messages import DeadLetter, WebhookMessage
from orchestrator import bus
from orchestrator.domain import IllegalTransition
from orchestrator.engine import TimerDue
from tests.buskit import (
    SILENT,
    dead_letters,
    outbox_empty,
    parked_providers,
    purge_starts,
    sweepless_worker,
)
from tests.conftest import Stack, StackFactory
from tests.faultkit import (
    create_withdrawal,
    metric_sum,
    publish,
    task_message,
    tasks_of,
    wait_task_state,
    webhook_message,
)
from tests.integration.test_webhook_intake import wait_consumed
from tests.waiting import wait_until

NO_ID = str(uuid.UUID(int=0)).encode()


async def _unreadable_errors(stack: Stack) -> float:
    # The counter is process-wide: other stacks of the session add to it too.
    return await metric_sum(stack, "orchestrator_handler_errors_total", error="UnreadableMessage")


async def _wait_dead_letters(stack: Stack, count: int) -> list[DeadLetter]:
    await wait_until(
        lambda: dead_letters(stack),
        done=lambda letters: len(letters) >= count,
        timeout=15,
        what=f"{count} dead letter(s)",
    )
    await wait_consumed(stack)
    letters = await dead_letters(stack)
    assert len(letters) == count, letters
    return letters


async def test_unreadable_messages_are_dead_lettered_at_once_with_the_reason(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(providers=parked_providers())
    wid = await create_withdrawal(stack, [SILENT])
    task = await wait_task_state(stack, wid, 0, "EXECUTING")
    await wait_consumed(stack)
    errors_before = await _unreadable_errors(stack)

    await publish(stack, bus.TASK_START, b"{not json")
    # A webhook where a timer belongs, and a task message without its task id.
    await publish(stack, bus.WEBHOOK_TIMEOUT, webhook_message(task, "succeeded"))
    await publish(stack, bus.RECHECK_TICK, b'{"type":"task","queue_id":"%s"}' % NO_ID)

    letters = {letter.subject: letter for letter in await _wait_dead_letters(stack, 3)}
    assert set(letters) == {bus.TASK_START, bus.WEBHOOK_TIMEOUT, bus.RECHECK_TICK}
    for letter in letters.values():
        assert (letter.deliveries, letter.reason) == (1, messages.UNREADABLE_MESSAGE), letter
        assert letter.error.startswith("UnreadableMessage: "), letter
    assert letters[bus.TASK_START].payload == "{not json"
    assert "JSON is malformed" in letters[bus.TASK_START].error
    assert "carries TaskMessage, not WebhookMessage" in letters[bus.WEBHOOK_TIMEOUT].error
    # Nothing happened to the withdrawal: the webhook on the wrong subject was not applied.
    assert [t["state"] for t in await tasks_of(stack, wid)] == ["EXECUTING"]
    assert await _unreadable_errors(stack) == errors_before + 3

    await wait_until(
        lambda: metric_sum(stack, "dlq_size"),
        done=lambda size: size == 3.0,
        timeout=15,
        what="dlq_size to show 3",
    )


async def test_an_illegal_transition_is_dead_lettered_at_once_and_other_errors_retried(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus, "BACKOFF", (0.05,) * 7)
    stack = await make_stack(providers=parked_providers())
    engine = stack.runtime.engine
    wids = [await create_withdrawal(stack, [SILENT]) for _ in range(2)]
    illegal, flaky = [await wait_task_state(stack, wid, 0, "EXECUTING") for wid in wids]
    await wait_consumed(stack)
    calls: list[str] = []
    real_webhook = engine.webhook

    async def webhook(msg: WebhookMessage, trace_id: str | None) -> bool:
        calls.append(msg.order_id)
        if msg.order_id == illegal["provider_order_id"]:
            raise IllegalTransition("EXECUTING → PENDING (webhook.test)")
        if calls.count(msg.order_id) < 3:
            raise ConnectionResetError("cascade-core went away")
        return await real_webhook(msg, trace_id)

    monkeypatch.setattr(engine, "webhook", webhook)
    await publish(stack, bus.WEBHOOK_RECEIVED, webhook_message(illegal, "succeeded"))
    await publish(stack, bus.WEBHOOK_RECEIVED, webhook_message(flaky, "succeeded"))

    (letter,) = await _wait_dead_letters(stack, 1)
    assert (letter.subject, letter.deliveries) == (bus.WEBHOOK_RECEIVED, 1)
    assert letter.reason == messages.ILLEGAL_TRANSITION
    assert letter.error == "IllegalTransition: EXECUTING → PENDING (webhook.test)"
    # A webhook's letter names the withdrawal of the task its provider order belongs to.
    assert (letter.withdrawal_id, letter.task_id) == (wids[0], "")
    assert calls.count(illegal["provider_order_id"]) == 1
    # The connection error kept the retry path: handled on its third delivery.
    assert (await stack.wait_final(wids[1]))["status"] == "succeeded"
    assert calls.count(flaky["provider_order_id"]) == 3
    assert [t["state"] for t in await tasks_of(stack, wids[0])] == ["EXECUTING"]


async def test_an_unreadable_timer_in_a_batch_is_dead_lettered_at_once(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack(providers=parked_providers(), with_worker=False)
    engine = stack.runtime.engine
    wids = [await create_withdrawal(stack, [SILENT]) for _ in range(3)]
    for wid in wids:
        (task,) = await tasks_of(stack, wid)
        await engine.start_task(task["queue_id"], task["task_id"], actor="test")
    tasks = [await wait_task_state(stack, wid, 0, "EXECUTING") for wid in wids]
    await outbox_empty(stack)
    await purge_starts(stack)  # a worker was never needed: the test started the tasks
    batches: list[int] = []
    real_timers_fired = stack.runtime.engine.timers_fired

    async def timers_fired(due: list[TimerDue]) -> list[TimerDue]:
        batches.append(len(due))
        return await real_timers_fired(due)

    monkeypatch.setattr(stack.runtime.engine, "timers_fired", timers_fired)
    for task in tasks:
        await publish(stack, bus.WEBHOOK_TIMEOUT, task_message(task))
    await publish(stack, bus.WEBHOOK_TIMEOUT, b'{"type":"task"}')
    worker = sweepless_worker(stack)
    await worker.start()
    try:
        (letter,) = await _wait_dead_letters(stack, 1)
    finally:
        await worker.stop()
    assert batches[0] == 3, batches  # fetched together: the three readable ones as one batch
    assert (letter.subject, letter.deliveries) == (bus.WEBHOOK_TIMEOUT, 1)
    assert letter.reason == messages.UNREADABLE_MESSAGE
    assert letter.payload == '{"type":"task"}'
    for wid in wids:
        assert [t["state"] for t in await tasks_of(stack, wid)] == ["MANUAL_CHECK"]


async def test_a_dead_letter_and_the_worker_lines_carry_the_withdrawal_and_task_ids(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cascade.worker")
    monkeypatch.setattr(bus, "BACKOFF", (0.05,) * 7)
    stack = await make_stack(providers=parked_providers())
    engine = stack.runtime.engine
    wid = await create_withdrawal(stack, [SILENT])
    task = await wait_task_state(stack, wid, 0, "EXECUTING")
    await wait_consumed(stack)
    starts: list[uuid.UUID] = []

    async def start_task(queue_id: uuid.UUID, task_id: uuid.UUID, **_: object) -> None:
        starts.append(task_id)
        if len(starts) == 1:
            raise ConnectionResetError("postgres went away")  # retried
        raise IllegalTransition("EXECUTING → CREATING (start.test)")  # dead-lettered

    monkeypatch.setattr(engine, "start_task", start_task)
    await publish(stack, bus.TASK_START, task_message(task))

    (letter,) = await _wait_dead_letters(stack, 1)
    assert (letter.subject, letter.reason) == (bus.TASK_START, messages.ILLEGAL_TRANSITION)
    assert (letter.withdrawal_id, letter.task_id) == (wid, str(task["task_id"]))
    assert letter.deliveries == 2
    ids = {"withdrawal_id": wid, "task_id": str(task["task_id"]), "queue_id": str(task["queue_id"])}
    for line in ("handler failed, will retry", "message dead-lettered"):
        (record,) = [r for r in caplog.records if r.getMessage() == line]
        assert {key: getattr(record, key, None) for key in ids} == ids, line
