"""Same-provider retries on the real stack: a provider that answers ``rate_limited`` is asked
again, under the same order id, on the ``retry`` timer (a JetStream schedule), until it takes
the order; a cancel while the retry waits ends the attempt at once.

``sbx_rate_limited`` declines the first two creates of each order id with ``rate_limited``
(``sandbox.providers.RATE_LIMITED_DECLINES``), then accepts it and pays like ``sbx_ok``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sandbox.providers import RATE_LIMITED_DECLINES
from tests.conftest import Stack, StackFactory, new_id, providers_document, withdrawal_body
from tests.faultkit import (
    assert_settled,
    metric_sum,
    task_events,
    tasks_of,
    wait_task_state,
)
from tests.waiting import wait_until

PROVIDER = "sbx_rate_limited"


def _providers(base_delay_seconds: float) -> dict[str, Any]:
    doc = providers_document()
    doc["providers"][PROVIDER]["errors"]["rate_limited"] = {
        "decision": "retry",
        "max_attempts": 5,
        "backoff": "exponential",
        "base_delay_seconds": base_delay_seconds,
        "max_delay_seconds": max(base_delay_seconds, 1),
        "then": "next_provider",
    }
    return doc


async def _create(stack: Stack, providers: list[str]) -> str:
    withdrawal_id = new_id()
    response = await stack.client.post(
        "/v1/withdrawals", json=withdrawal_body(withdrawal_id, providers), headers=stack.headers
    )
    assert response.status_code == 201, response.text
    return withdrawal_id


async def _creates_answered(stack: Stack) -> dict[str, int]:
    response = await stack.client.get(f"/sandbox/providers/{PROVIDER}/requests")
    response.raise_for_status()
    counts: dict[str, int] = response.json()["by_kind_and_answer"].get("create", {})
    return counts


async def test_a_rate_limited_create_is_retried_until_the_provider_takes_it(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(providers=_providers(base_delay_seconds=0.2))
    (await stack.client.delete(f"/sandbox/providers/{PROVIDER}/requests")).raise_for_status()
    retried = await metric_sum(
        stack, "provider_retries_total", provider=PROVIDER, code="rate_limited"
    )

    withdrawal_id = await _create(stack, [PROVIDER, "sbx_ok"])
    final = await stack.wait_final(withdrawal_id)

    # Paid by the provider that declined twice, with one commit; sbx_ok never tried.
    assert (final["status"], final["provider_id"]) == ("succeeded", PROVIDER)
    await assert_settled(stack, {withdrawal_id: "succeeded"})
    first, second = await tasks_of(stack, withdrawal_id)
    assert (first["state"], first["create_retries"], first["freeze_state"]) == (
        "SUCCEEDED",
        RATE_LIMITED_DECLINES,
        "committed",
    )
    assert (first["timer_kind"], first["timer_due_at"]) == (None, None)
    assert (second["state"], second["freeze_state"]) == ("SKIPPED", "none")
    events = [e["event"] for e in await task_events(stack, first["task_id"])]
    assert events[:7] == [
        "task.created",
        "start",
        "create.declined.retry",
        "timer.retry",
        "create.declined.retry",
        "timer.retry",
        "create.accepted",
    ]
    # Three creates of one order id (the sandbox keeps one order), the first two declined.
    assert await _creates_answered(stack) == {"422": RATE_LIMITED_DECLINES, "ok": 1}
    assert (
        await metric_sum(stack, "provider_retries_total", provider=PROVIDER, code="rate_limited")
        == retried + RATE_LIMITED_DECLINES
    )


async def test_a_cancel_while_a_retry_waits_cancels_without_another_create(
    make_stack: StackFactory,
) -> None:
    # A backoff long enough that the cancel comes while the retry waits.
    stack = await make_stack(providers=_providers(base_delay_seconds=30))
    (await stack.client.delete(f"/sandbox/providers/{PROVIDER}/requests")).raise_for_status()
    withdrawal_id = await _create(stack, [PROVIDER, "sbx_ok"])
    waiting = await wait_until(
        lambda: tasks_of(stack, withdrawal_id),
        done=lambda tasks: tasks[0]["timer_kind"] == "retry",
        timeout=15,
        what="the declined create to wait for its retry",
    )
    assert (waiting[0]["state"], waiting[0]["freeze_state"]) == ("CREATING", "frozen")

    response = await stack.client.post(
        f"/v1/withdrawals/{withdrawal_id}/cancel", headers=stack.headers
    )
    assert response.status_code == 200, response.text

    assert response.json()["status"] == "cancelled"
    await assert_settled(stack, {withdrawal_id: "cancelled"})
    first = await wait_task_state(stack, withdrawal_id, 0, "CANCELLED")
    assert (first["freeze_state"], first["timer_kind"], first["timer_due_at"]) == (
        "rolled_back",
        None,
        None,
    )
    events = [e["event"] for e in await task_events(stack, first["task_id"])]
    assert events == ["task.created", "start", "create.declined.retry", "cancel.retry_dropped"]
    assert await _creates_answered(stack) == {"422": 1}


async def _retry_schedules(stack: Stack, task_id: uuid.UUID) -> int:
    """The task's pending retry timers at the broker."""
    names = stack.runtime.relay.names
    subject = names.schedule_subject(task_id, "retry")
    info = await stack.runtime.js.stream_info(names.stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def test_a_lost_retry_timer_is_fired_by_the_sweeper(make_stack: StackFactory) -> None:
    """The broker loses the retry's schedule before it is due: the Postgres sweeper fires it
    (once: a task waiting on a timer is not a stranded one to restart)."""
    stack = await make_stack(providers=_providers(base_delay_seconds=3))
    withdrawal_id = await _create(stack, [PROVIDER])
    task = await wait_task_state(stack, withdrawal_id, 0, "CREATING")
    await wait_until(
        lambda: _retry_schedules(stack, task["task_id"]),
        done=lambda pending: pending == 1,
        timeout=15,
        what="the first retry's schedule",
    )
    names = stack.runtime.relay.names
    await stack.runtime.js.purge_stream(
        names.stream, subject=names.schedule_subject(task["task_id"], "retry")
    )
    assert await _retry_schedules(stack, task["task_id"]) == 0
    lost = (await tasks_of(stack, withdrawal_id))[0]
    assert (lost["state"], lost["timer_kind"], lost["create_retries"]) == ("CREATING", "retry", 1)
    assert lost["timer_due_at"] > datetime.now(UTC), "the retry fired before it was purged"

    final = await stack.wait_final(withdrawal_id, timeout=30)

    assert final["status"] == "succeeded"
    await assert_settled(stack, {withdrawal_id: "succeeded"})
    events = await task_events(stack, task["task_id"])
    fired = [e for e in events if e["event"] == "timer.retry"]
    assert len(fired) == RATE_LIMITED_DECLINES, events
    assert fired[0]["created_at"] >= lost["timer_due_at"]
    assert "start.resume" not in [e["event"] for e in events]
