"""The orchestrator's bus messages, and the dead letters the worker leaves on the DLQ.

Every message the worker consumes is a tagged Struct (JSON field ``type``), so one decoder
reads any of them (:func:`decode`) and the worker dispatches on the decoded type with
``match``. Which subject carries which message is the bus's business
(:mod:`orchestrator.bus`).

Messages published before the tag existed carry no ``type``: timers scheduled hours ahead,
outbox rows not relayed yet, dead letters replayed after an upgrade. Their subject still says
what they are, so :func:`decode` reads an untagged payload as the type its caller names.

Schema evolution: a new field always has a default; a field never changes type. Readers
ignore fields they do not know (msgspec's default), so a process of the previous version
still reads tagged messages during a rolling upgrade.
"""

from __future__ import annotations

import uuid
from typing import Final, TypeAlias

import msgspec

from contracts.provider import ProviderStatus


class StartSeen(msgspec.Struct, frozen=True, kw_only=True):
    """The queue and task versions a start was decided on when it was published."""

    queue_version: int
    task_version: int


class TaskMessage(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="task"):
    """Payload of task-addressed events (start, timers); the subject says which event.

    ``seen``: on a start published with the record it starts from (a create, or the queue
    moving to its next task), the versions that ``decide()`` approved a plain PENDING →
    CREATING on; the worker then writes it without reading first, if nothing changed since.
    """

    task_id: uuid.UUID
    queue_id: uuid.UUID
    attempt: int = 0
    seen: StartSeen | None = None


class WebhookMessage(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="webhook"):
    """A verified provider webhook handed from the intake to the orchestrator."""

    provider_id: str
    order_id: str
    reference: str
    status: ProviderStatus
    code: str | None = None
    webhook_id: str = ""


Message: TypeAlias = TaskMessage | WebhookMessage

# Why the worker gave up on a message (DeadLetter.reason).
RETRIES_EXHAUSTED: Final = "retries_exhausted"
UNREADABLE_MESSAGE: Final = "unreadable_message"
ILLEGAL_TRANSITION: Final = "illegal_transition"


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A message the worker gave up on, as stored on the DLQ (``cascade-gateway dlq``).

    ``reason``: ``retries_exhausted`` (failed on every allowed delivery: a replay may succeed
    once the cause is gone), ``unreadable_message`` or ``illegal_transition`` (no retry could
    fix it: dead-lettered on its first delivery). A plain ``str``, not a ``Literal``, so that a
    letter written by a later version with a reason this one does not know still lists.
    Letters from before the field were all ``retries_exhausted``.

    ``task_id`` (a task message's) and ``withdrawal_id`` (looked up when the letter is
    written) say what the message was about; empty when unknown: an unreadable payload, a
    withdrawal the lookup did not find, or a letter from before the fields.
    """

    subject: str
    payload: str
    error: str
    deliveries: int
    failed_at: str
    reason: str = RETRIES_EXHAUSTED
    withdrawal_id: str = ""
    task_id: str = ""


class _Tag(msgspec.Struct):
    type: str | None = None


_MESSAGE: Final[msgspec.json.Decoder[Message]] = msgspec.json.Decoder(Message)
_TAG: Final = msgspec.json.Decoder(_Tag)


def decode(data: bytes, *, untagged: type[Message]) -> Message:
    """The message in ``data``; a payload without a ``type`` (published before the tag) is
    read as ``untagged``. Raises ``msgspec.DecodeError`` / ``msgspec.ValidationError``."""
    try:
        return _MESSAGE.decode(data)
    except msgspec.ValidationError:
        if _TAG.decode(data).type is not None:
            raise
    # A single tagged type accepts a payload without its tag (and refuses another tag).
    return msgspec.json.decode(data, type=untagged)
