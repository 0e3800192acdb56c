"""Bus messages: one tagged decoder, the subject's type for payloads from before the tag, and
the worker's retry policy (what goes to the DLQ at once)."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest

from contracts import messages
from contracts.messages import DeadLetter, StartSeen, TaskMessage, WebhookMessage
from orchestrator import bus
from orchestrator.domain import IllegalTransition
from orchestrator.worker import dead_letter_reason

TASK = TaskMessage(
    task_id=uuid.uuid4(),
    queue_id=uuid.uuid4(),
    attempt=2,
    seen=StartSeen(queue_version=3, task_version=1),
)
WEBHOOK = WebhookMessage(
    provider_id="sbx_ok", order_id="o-1", reference="r-1", status="succeeded", webhook_id="msg_1"
)


def _previous_task_payload(message: TaskMessage) -> bytes:
    """A task message exactly as the version before the tag encoded it."""
    seen = message.seen
    return msgspec.json.encode(
        {
            "task_id": str(message.task_id),
            "queue_id": str(message.queue_id),
            "attempt": message.attempt,
            "seen": None
            if seen is None
            else {"queue_version": seen.queue_version, "task_version": seen.task_version},
        }
    )


PREVIOUS_WEBHOOK = (
    b'{"provider_id":"sbx_ok","order_id":"o-1","reference":"r-1","status":"succeeded",'
    b'"code":null,"webhook_id":"msg_1"}'
)


def test_messages_carry_their_tag_and_round_trip() -> None:
    for message, tag in ((TASK, "task"), (WEBHOOK, "webhook")):
        data = msgspec.json.encode(message)
        assert msgspec.json.decode(data)["type"] == tag
        assert messages.decode(data, untagged=TaskMessage) == message
        assert messages.decode(data, untagged=WebhookMessage) == message


@pytest.mark.parametrize("subject", [bus.TASK_START, *bus.TIMER_TARGETS.values()])
def test_a_task_message_from_before_the_tag_is_read_as_its_subject_says(subject: str) -> None:
    assert bus.decode(subject, _previous_task_payload(TASK)) == TASK
    plain = TaskMessage(task_id=TASK.task_id, queue_id=TASK.queue_id)
    assert bus.decode(subject, _previous_task_payload(plain)) == plain


def test_a_webhook_from_before_the_tag_is_read_as_its_subject_says() -> None:
    assert bus.decode(bus.WEBHOOK_RECEIVED, PREVIOUS_WEBHOOK) == WEBHOOK


def test_the_previous_version_reads_tagged_messages() -> None:
    """A worker of the previous version still running during an upgrade: it ignores the tag."""

    class PreviousTaskMessage(msgspec.Struct, frozen=True, kw_only=True):
        task_id: uuid.UUID
        queue_id: uuid.UUID
        attempt: int = 0
        seen: Any = None

    read = msgspec.json.decode(msgspec.json.encode(TASK), type=PreviousTaskMessage)
    assert (read.task_id, read.queue_id, read.attempt) == (TASK.task_id, TASK.queue_id, 2)


def test_every_event_subject_carries_one_message_type() -> None:
    assert set(bus.MESSAGE_OF_SUBJECT) == set(bus.EVENT_SUBJECTS)


@pytest.mark.parametrize(
    ("subject", "data", "says"),
    [
        (bus.TASK_START, b"{not json", "JSON is malformed"),
        (bus.TASK_START, b"[1, 2]", "Expected `object`"),
        (bus.TASK_START, b'{"type":"task","task_id":7}', "$.task_id"),
        (bus.TASK_START, b'{"task_id":"not-a-uuid"}', "$.task_id"),
        (bus.TASK_START, b'{"type":"order","task_id":"x"}', "$.type"),
        (bus.WEBHOOK_RECEIVED, msgspec.json.encode(TASK), "carries WebhookMessage, not Task"),
        (bus.WEBHOOK_TIMEOUT, msgspec.json.encode(WEBHOOK), "carries TaskMessage, not Webhook"),
        (bus.WEBHOOK_RECEIVED, _previous_task_payload(TASK), "missing required field"),
        ("order.queue.cancel", b'{"queue_id":"x"}', "no message belongs"),
    ],
)
def test_a_payload_that_is_not_its_subjects_message_is_unreadable(
    subject: str, data: bytes, says: str
) -> None:
    with pytest.raises(bus.UnreadableMessage) as caught:
        bus.decode(subject, data)
    assert says in str(caught.value)


def test_a_dead_letter_from_before_the_reason_reads_as_retries_exhausted() -> None:
    previous = (
        b'{"subject":"order.task.start","payload":"{}","error":"CoreUnavailable: 500",'
        b'"deliveries":8,"failed_at":"2026-12-01T10:00:00+00:00"}'
    )
    letter = msgspec.json.decode(previous, type=DeadLetter)
    assert letter.reason == messages.RETRIES_EXHAUSTED
    assert (letter.withdrawal_id, letter.task_id) == ("", "")  # from before the ids
    unknown = msgspec.json.encode({**msgspec.to_builtins(letter), "reason": "from_the_future"})
    assert msgspec.json.decode(unknown, type=DeadLetter).reason == "from_the_future"


def test_errors_no_retry_can_fix_are_dead_lettered_on_the_first_delivery() -> None:
    assert dead_letter_reason(bus.UnreadableMessage("x"), 1) == messages.UNREADABLE_MESSAGE
    assert dead_letter_reason(IllegalTransition("x"), 1) == messages.ILLEGAL_TRANSITION


@pytest.mark.parametrize("error", [RuntimeError("x"), ConnectionResetError(), TimeoutError()])
def test_other_errors_are_retried_until_the_last_delivery(
    error: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus, "MAX_DELIVER", 3)
    assert dead_letter_reason(error, 1) is None
    assert dead_letter_reason(error, 2) is None
    assert dead_letter_reason(error, 3) == messages.RETRIES_EXHAUSTED


def test_a_dead_letter_carries_the_ids_of_what_it_was_about() -> None:
    letter = DeadLetter(
        subject=bus.TASK_START,
        payload="{}",
        error="IllegalTransition: x",
        deliveries=1,
        failed_at="2026-12-01T10:00:00+00:00",
        reason=messages.ILLEGAL_TRANSITION,
        withdrawal_id="wd-1",
        task_id=str(TASK.task_id),
    )
    data = msgspec.json.encode(letter)
    assert msgspec.json.decode(data)["withdrawal_id"] == "wd-1"
    assert msgspec.json.decode(data, type=DeadLetter) == letter
