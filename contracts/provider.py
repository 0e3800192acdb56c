"""The provider HTTP protocol: what the generic provider adapter speaks and the sandbox serves.

One protocol for every HTTP provider, so the sandbox exercises exactly the code path a real
provider integration uses. ``{base}`` is the provider's ``base_url`` from ``PROVIDERS_FILE``.

``POST {base}/orders`` with header ``Idempotency-Key: <order_id>`` and a :class:`CreateOrder`
body. ``order_id`` is derived from our task id (see :func:`provider_order_id`), so a retry after
a crash is the same call and the provider answers with the order it already has.

- ``201`` / ``200`` + :class:`ProviderOrder` — accepted (``pending``) or already final
  (``succeeded`` paid synchronously, ``failed``).
- ``422`` + :class:`ProviderDecline` — a definitive refusal; ``code`` is looked up in the
  provider's error table.
- anything else (5xx, timeout, connection reset after sending) — **ambiguous**: the order may
  exist. The orchestrator rechecks with ``GET``; it never treats this as a failure.

``GET {base}/orders/{order_id}`` — ``200`` + :class:`ProviderOrder`, or ``404`` when the
provider has no such order (proven absent).

``POST {base}/orders/{order_id}/cancel`` — ``200`` + :class:`ProviderOrder` with status
``cancelled``; ``409`` + :class:`ProviderOrder` when the order is already final (the body tells
which outcome won); ``404`` unknown; ``501`` when the provider cannot cancel.

Webhooks: ``POST {gateway}/webhooks/{provider_id}`` with a :class:`ProviderWebhook` body signed
in the Standard Webhooks scheme (:mod:`contracts.signatures`).

A paid order may later be reported ``returned`` (with its return code in ``code``), by a
webhook and by ``GET {base}/orders/{order_id}``.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated, Literal

import msgspec

ProviderStatus = Literal["pending", "succeeded", "failed", "cancelled", "returned"]
"""``returned``: the order had succeeded (paid) and the payout came back (a closed account, a
bank's reversal); ``code`` carries the provider's return code. Only ever after ``succeeded``."""
FINAL_PROVIDER_STATUSES: frozenset[str] = frozenset(
    {"succeeded", "failed", "cancelled", "returned"}
)


class ProviderDestination(msgspec.Struct, frozen=True, kw_only=True):
    """Where the money goes, as the provider receives it."""

    type: str
    account: str
    holder: str | None = None


class CreateOrder(msgspec.Struct, frozen=True, kw_only=True):
    """Body of ``POST {base}/orders``."""

    order_id: str
    amount: str
    currency: str
    destination: ProviderDestination


StoredText = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$")]
"""A string Postgres ``text`` can hold: anything but U+0000 (NUL).

A webhook carrying NUL is refused when it is decoded: accepted, it would fail its store
write on every delivery until the DLQ took it, and the provider's replays with it. A create
or status answer carrying NUL does not decode either: the adapter takes it for an ambiguous
answer (the order may exist), never for a failure.
"""


class ProviderOrder(msgspec.Struct, frozen=True, kw_only=True):
    """The provider's view of one order."""

    order_id: str
    reference: StoredText
    status: ProviderStatus
    code: StoredText | None = None


class ProviderDecline(msgspec.Struct, frozen=True, kw_only=True):
    """Body of a definitive ``422`` refusal at create."""

    code: StoredText
    message: str = ""


class ProviderWebhook(msgspec.Struct, frozen=True, kw_only=True):
    """Body of a provider's status webhook. ``pending`` is progress, not an outcome.

    Every field ends up in a Postgres ``text`` column, so none may hold NUL.
    """

    order_id: StoredText
    reference: StoredText
    status: ProviderStatus
    code: StoredText | None = None


MIN_KEY_LENGTH = 16
"""The shortest provider idempotency key a providers file may set."""


def provider_order_id(task_id: uuid.UUID, max_length: int) -> str:
    """Our order id at the provider: derived from the task id, never from time or randomness.

    Short enough for the provider's idempotency-key limit: the plain ``cg-<hex>`` form when it
    fits, otherwise a prefix of its SHA-256: still stable, and unique per task in practice for
    at least :data:`MIN_KEY_LENGTH` hex digits (64 bits: a collision among ten million orders
    of one provider has a chance of about 3 in a million; 8 digits would collide within tens
    of thousands, and two withdrawals would share one order).
    """
    plain = f"cg-{task_id.hex}"
    if len(plain) <= max_length:
        return plain
    if max_length < MIN_KEY_LENGTH:
        raise ValueError(f"provider idempotency keys of {max_length} characters are too short")
    return hashlib.sha256(plain.encode()).hexdigest()[:max_length]
