"""What the ops API answers, as msgspec Structs: the handlers (:mod:`gateway.ops`) encode
these, and the ops API's OpenAPI document (:mod:`gateway.ops_openapi`) takes its schemas from
them, so the two cannot drift apart.

Fields are only ever added, with defaults where an old answer lacked them; a field's type
never changes. Times are ISO 8601 strings with their offset, amounts decimal strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from orchestrator.store.views import ManualCheck, ProviderAnswerRow

Timestamp = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]
Cohort = Annotated[str, msgspec.Meta(extra_json_schema={"enum": ["legacy", "cascade"]})]
Amount = Annotated[str, msgspec.Meta(pattern=r"^\d+\.\d{2}$", examples=["75.50"])]
# Characters of an account number shown at each end once it is long enough to hide the rest.
_SHOWN = 4


class Error(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    code: str
    message: str
    evidence: (
        Annotated[
            dict[str, Any],
            msgspec.Meta(
                description="On a 409 refusing a negative decision (provider_paid,"
                " provider_pending, provider_unreachable): what the provider answered when it"
                " was asked, as the refusal's audit row keeps it (provider_status, reference,"
                " code, source; or ambiguous: why the answer proves nothing; provider_check)."
            ),
        ]
        | None
    ) = None


class ErrorEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    error: Error


class Destination(msgspec.Struct, frozen=True, kw_only=True):
    """Where the money goes, masked: the account's first and last four characters (only the
    last four below 12 characters, none below 8), the holder's initials."""

    type: str
    account: str
    holder: str | None = None


class ProviderAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """One answer of the provider about the attempt: its create response, a recheck or status
    poll, a webhook, or its answer to support's check."""

    at: Timestamp
    event: Annotated[str, msgspec.Meta(description="The audit event it led to.")]
    source: Annotated[
        str | None, msgspec.Meta(description="create, poll, webhook or cancel; null: no answer")
    ]
    status: Annotated[
        str,
        msgspec.Meta(
            description="succeeded, failed, pending, cancelled, absent (404), or no_answer"
            " (a timeout, an error, an answer that could not be read: proves nothing)"
        ),
    ]
    code: str | None = None
    reference: str | None = None
    detail: Annotated[str | None, msgspec.Meta(description="Why a no_answer proves nothing.")] = (
        None
    )


class ManualCheckItem(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    withdrawal_id: str
    queue_id: str
    merchant_id: str
    provider_id: str
    provider_reference: str | None
    amount: Amount
    currency: str
    cohort: Cohort
    waiting_since: Timestamp
    last_provider_code: str | None
    rechecks: int
    status_polls: int
    provider_order_id: Annotated[
        str, msgspec.Meta(description="Our order id at the provider (its idempotency key).")
    ]
    destination: Destination
    waited_seconds: Annotated[int, msgspec.Meta(description="Seconds in MANUAL_CHECK so far.")]
    provider_answers: Annotated[
        list[ProviderAnswer],
        msgspec.Meta(description="Every answer of the provider, oldest first."),
    ]


class ManualChecks(msgspec.Struct, frozen=True, kw_only=True):
    manual_checks: Annotated[
        list[ManualCheckItem], msgspec.Meta(description="The longest waiting first.")
    ]


class ResolveBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    decision: Literal["positive", "negative"]
    reason: Annotated[
        str, msgspec.Meta(description="Why; kept in the audit row (up to 500 characters).")
    ]
    # A negative decision applied even though the provider cannot confirm it (audited so).
    unverified: Annotated[
        bool,
        msgspec.Meta(
            description="Apply a negative decision the provider could not confirm"
            " (after a 409 provider_unreachable), on the operator's word; audited as such."
        ),
    ] = False


class Resolved(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    state: Annotated[str, msgspec.Meta(description="The task's state after the decision.")]


class QueueView(msgspec.Struct, frozen=True, kw_only=True):
    queue_id: str
    state: str
    cancel_requested: bool
    failure_code: str | None
    created_at: Timestamp
    updated_at: Timestamp


class WithdrawalDetail(msgspec.Struct, frozen=True, kw_only=True):
    withdrawal_id: str
    merchant_id: str
    cohort: Cohort
    routing_reason: str
    flag_state: Any
    amount: Amount
    currency: str
    cascade: list[dict[str, str]]
    queue: QueueView
    tasks: Annotated[
        list[dict[str, Any]],
        msgspec.Meta(
            description="Every attempt in cascade order: the order_tasks row (task_id, position,"
            " provider_id, state, provider_order_id, provider_reference, status_polls, …) and"
            " provider_answers, every answer of its provider (see ProviderAnswer)."
        ),
    ]
    events: Annotated[
        list[dict[str, Any]],
        msgspec.Meta(
            description="The audit trail, oldest first: from_state, to_state, event, actor"
            " (ops:<operator> for support's decisions), details, created_at, …"
        ),
    ]
    destination: Destination | None = None


def mask_account(account: str) -> str:
    """An account number with all but its ends hidden (see :class:`Destination`)."""
    length = len(account)
    tail = _SHOWN if length >= 2 * _SHOWN else 0
    head = _SHOWN if length >= 3 * _SHOWN else 0
    return account[:head] + "*" * (length - head - tail) + account[length - tail :]


def mask_holder(holder: str) -> str:
    """A name as its initials: ``Jane Doe`` → ``J. D.``."""
    return " ".join(f"{word[0]}." for word in holder.split())


def masked_destination(destination: Mapping[str, object]) -> Destination:
    """The request's destination as support may see it."""
    holder = destination.get("holder")
    return Destination(
        type=str(destination.get("type", "")),
        account=mask_account(str(destination.get("account", ""))),
        holder=mask_holder(holder) if isinstance(holder, str) and holder.strip() else None,
    )


def provider_answer(row: ProviderAnswerRow) -> ProviderAnswer:
    """An audit row holding a provider's answer, as support reads it."""
    details = row.details
    ambiguous = details.get("ambiguous")
    return ProviderAnswer(
        at=row.at.isoformat(),
        event=row.event,
        source=_text(details.get("source")),
        status="no_answer" if ambiguous is not None else str(details.get("provider_status")),
        code=_text(details.get("code")),
        reference=_text(details.get("reference")),
        detail=_text(ambiguous),
    )


def manual_check_item(check: ManualCheck) -> ManualCheckItem:
    return ManualCheckItem(
        task_id=str(check.task_id),
        withdrawal_id=check.withdrawal_id,
        queue_id=str(check.queue_id),
        merchant_id=check.merchant_id,
        provider_id=check.provider_id,
        provider_reference=check.provider_reference,
        amount=f"{check.amount:.2f}",
        currency=check.currency,
        cohort=check.cohort,
        waiting_since=check.waiting_since.isoformat(),
        last_provider_code=check.last_provider_code,
        rechecks=check.rechecks,
        status_polls=check.status_polls,
        provider_order_id=check.provider_order_id,
        destination=masked_destination(check.destination),
        waited_seconds=int(check.waited_seconds),
        provider_answers=[provider_answer(row) for row in check.provider_answers],
    )


def _text(value: object) -> str | None:
    return None if value is None else str(value)
