"""The withdrawal cascade as a Temporal workflow: deterministic, every effect an activity.

As Temporal's samples write it (money-transfer): one input per activity, idempotency keys
derived from the business id, retry policies that name the non-retryable error, a
compensation (rollback) when a later step fails. A provider webhook arrives as the signal
``provider_webhook``; the workflow waits for it with ``workflow.wait_condition`` up to the
provider's SLA, then polls the order's status. This module imports only what the workflow
sandbox may see; the activities live in :mod:`bench.peers.temporal_app`.

Every step is a **local activity**: each is one short, idempotent HTTP call (milliseconds,
seconds at most with its retries) that needs no routing to another worker pool and no
server-side rate limit, which is where Temporal's documentation recommends local activities
over regular ones. A local activity runs in the worker that runs the workflow task and its
result is recorded with that task's completion, instead of a schedule / dispatch / complete
exchange with the server per step. After a crash a local activity whose result was not yet
recorded runs again: the idempotency keys make that the same call.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from bench.peers.flow import FINAL_STATUSES, Attempt, Created, Withdrawal, attempt

TASK_QUEUE = "withdrawals"
RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=2),
    non_retryable_error_types=["Refused"],
)
STEP_TIMEOUT = timedelta(seconds=10)


@dataclass(frozen=True)
class Webhook:
    """A verified provider webhook, as the receiver signals it."""

    order_id: str
    status: str


@dataclass(frozen=True)
class Notification:
    withdrawal_id: str
    status: str
    provider_id: str


@workflow.defn
class WithdrawalWorkflow:
    """freeze → create → webhook (or a synchronous answer) → commit → notify; a decline →
    rollback → next provider; an ambiguous create → status recheck."""

    def __init__(self) -> None:
        self._outcomes: dict[str, str] = {}

    @workflow.signal
    def provider_webhook(self, webhook: Webhook) -> None:
        if webhook.status in FINAL_STATUSES:
            self._outcomes.setdefault(webhook.order_id, webhook.status)

    @workflow.run
    async def run(self, withdrawal: Withdrawal) -> str:
        for index in range(len(withdrawal.providers)):
            step = attempt(withdrawal, index)
            outcome = await self._attempt(withdrawal, step)
            if outcome == "succeeded":
                await self._notify(
                    Notification(withdrawal.withdrawal_id, "succeeded", step.provider_id)
                )
                return "succeeded"
            if outcome == "manual_check":
                # Money may have moved: the freeze stays, a human decides (as ours does).
                return "manual_check"
        await self._notify(Notification(withdrawal.withdrawal_id, "failed", ""))
        return "failed"

    async def _attempt(self, withdrawal: Withdrawal, step: Attempt) -> str:
        try:
            held: str = await self._activity("freeze", step)
        except ActivityError as exc:
            if isinstance(exc.cause, ApplicationError) and exc.cause.type == "Refused":
                return "skipped"  # e.g. insufficient_balance: no hold, next provider
            raise
        if held == "committed":
            return "succeeded"
        if held == "rolled_back":
            return "failed"
        created: Created = await self._activity("create", step)
        outcome = created.outcome
        if outcome == "ambiguous":
            outcome = await self._recheck(step)
        if outcome == "pending":
            outcome = await self._wait_for_outcome(withdrawal, step)
        if outcome == "succeeded":
            await self._activity("commit", step)
            return "succeeded"
        if outcome in ("declined", "failed", "cancelled", "absent"):
            await self._activity("rollback", step)
            return "failed"
        return "manual_check"

    async def _recheck(self, step: Attempt) -> str:
        """Status until the order is proven to exist (its status) or proven absent."""
        # The status activity retries transport errors itself (RETRY), so one answer here is
        # definitive: the order's status, or ``absent`` (404).
        await asyncio.sleep(0.5)
        status: str = await self._activity("status", step)
        return self._outcomes.get(step.order_id, status)

    async def _wait_for_outcome(self, withdrawal: Withdrawal, step: Attempt) -> str:
        try:
            await workflow.wait_condition(
                lambda: step.order_id in self._outcomes,
                timeout=timedelta(seconds=withdrawal.sla_seconds),
            )
            return self._outcomes[step.order_id]
        except TimeoutError:
            pass
        for _ in range(withdrawal.max_polls):
            status: str = await self._activity("status", step)
            if status != "pending":
                return status
            try:
                await workflow.wait_condition(
                    lambda: step.order_id in self._outcomes,
                    timeout=timedelta(seconds=withdrawal.poll_interval),
                )
                return self._outcomes[step.order_id]
            except TimeoutError:
                pass
        return "manual_check"

    async def _activity(self, name: str, step: Attempt) -> Any:
        return await workflow.execute_local_activity(
            name,
            step,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
            result_type=Created if name == "create" else str,
        )

    async def _notify(self, notification: Notification) -> None:
        await workflow.execute_local_activity(
            "notify", notification, start_to_close_timeout=STEP_TIMEOUT, retry_policy=RETRY
        )
