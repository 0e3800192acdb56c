"""Faults on the real stack: the broker, cascade-core, repeated and late messages, races, DLQ.

What must hold whatever happens (DESIGN.md, "Money safety"): a task never advances on a
balance call that failed; a duplicate, late or stale message changes nothing; one event wins
a race and the other is ignored; a timer the broker lost is fired by the sweeper; a message
that keeps failing ends on the DLQ with its error and can be replayed after a fix.

Messages are published here exactly as the system publishes them, minus ``Nats-Msg-Id``, so
that JetStream's duplicate window does not hide the duplicates from the handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from contracts.messages import WebhookMessage
from contracts.provider import ProviderStatus
from devstack.embedded import EmbeddedServiceError
from gateway.runtime import open_runtime
from orchestrator import bus
from orchestrator.core_client import CoreUnavailable
from orchestrator.domain import TimerKind
from orchestrator.engine import RetryLater
from orchestrator.worker import Worker
from tests.conftest import Services, Stack, StackFactory, providers_document
from tests.faultkit import (
    assert_settled,
    create_withdrawal,
    metric_sum,
    publish,
    run_cli,
    set_core_faults,
    task_events,
    task_message,
    tasks_of,
    transitions,
    wait_connected,
    wait_task_state,
    webhook_message,
)
from tests.integration.test_webhook_intake import wait_consumed
from tests.waiting import wait_until

OPS = {"Authorization": "Bearer ops-token", "X-Operator": "alice"}
SILENT = "sbx_silent"
SYNC_OK = "sbx_sync_ok"
DECLINE = "sbx_decline"
FLAKY = "sbx_flaky"


def providers(
    *,
    sla: float | None,
    polling: Mapping[str, float] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Test-speed providers; ``sbx_silent`` (and ``sbx_flaky``) wait as told."""
    doc = providers_document()
    for provider_id in (SILENT, FLAKY):
        doc["providers"][provider_id]["webhook_sla_seconds"] = sla
        doc["providers"][provider_id]["status_polling"] = polling
    for provider_id, changes in (overrides or {}).items():
        doc["providers"][provider_id].update(changes)
    return doc


async def event_names(stack: Stack, task_id: uuid.UUID) -> Counter[str]:
    return Counter(e["event"] for e in await task_events(stack, task_id))


async def burst(stack: Stack, *messages: tuple[str, bytes]) -> None:
    """Publish all at once (the worker takes them in one fetch), then wait until handled."""
    await asyncio.gather(*(publish(stack, subject, payload) for subject, payload in messages))
    await wait_consumed(stack, timeout=15)


async def schedules(stack: Stack, task_id: uuid.UUID, kind: TimerKind) -> int:
    """Pending schedule messages (timers) of one task and kind in the stack's stream."""
    names = stack.runtime.relay.names
    subject = names.schedule_subject(task_id, kind)
    info = await stack.runtime.js.stream_info(names.stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def clock_past(moment: datetime) -> bool:
    return datetime.now(UTC) > moment


async def unmatched(stack: Stack, reference: str) -> list[str]:
    async with stack.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT reason FROM unmatched_webhooks WHERE reference = $1 ORDER BY id", reference
        )
    return [r["reason"] for r in rows]


# --- broker faults -----------------------------------------------------------------------------


def _worker_without_sweeper(stack: Stack) -> Worker:
    """A worker whose sweeper waits ten minutes: only JetStream can deliver its timers."""
    return Worker(
        engine=stack.runtime.engine,
        js=stack.runtime.js,
        core=stack.runtime.core,
        sweep_interval=0.5,
        stranded_after=600.0,
        timer_grace=600.0,
    )


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_pending_timers_fire_after_a_nats_restart(
    make_stack: StackFactory, services: Services, how: str
) -> None:
    """The server is down (stopped, or killed -9) when the webhook SLA expires; the schedules
    fire once it is back.

    The sweeper is off (its grace is ten minutes), so only JetStream can deliver the timers.
    """
    stack = await make_stack(providers=providers(sla=3), with_worker=False)
    worker = _worker_without_sweeper(stack)
    await worker.start()
    try:
        wids = [await create_withdrawal(stack, [SILENT]) for _ in range(3)]
        tasks = [await wait_task_state(stack, wid, 0, "EXECUTING") for wid in wids]
        await wait_consumed(stack)  # the outbox is empty: every timer is a schedule in NATS
        for task in tasks:
            assert await schedules(stack, task["task_id"], "webhook_timeout") == 1
        due = max(t["timer_due_at"] for t in tasks)
        before = services.nats.pid
        try:
            await asyncio.to_thread(services.nats.stop if how == "stop" else services.nats.kill)
            # Down until after the due time (schedules have whole-second resolution).
            await wait_until(
                lambda: clock_past(due + timedelta(seconds=1.5)), timeout=15, what="the due time"
            )
        finally:
            # The session's nats-server is every later test's too: always bring it back.
            with contextlib.suppress(EmbeddedServiceError):
                await asyncio.to_thread(services.nats.start)
        assert services.nats.pid != before
        await wait_connected(stack)
        for wid, task in zip(wids, tasks, strict=True):
            await wait_task_state(stack, wid, 0, "MANUAL_CHECK", timeout=20)
            names = await event_names(stack, task["task_id"])
            assert names["webhook.sla_expired"] == 1, names
    finally:
        await worker.stop()


async def test_a_lost_timer_is_fired_by_the_sweeper(make_stack: StackFactory) -> None:
    """The webhook-SLA schedule is purged before it is due: the Postgres sweeper fires it."""
    stack = await make_stack(providers=providers(sla=3))
    wid = await create_withdrawal(stack, [SILENT])
    task = await wait_task_state(stack, wid, 0, "EXECUTING")
    await wait_consumed(stack)
    names = stack.runtime.relay.names
    assert await schedules(stack, task["task_id"], "webhook_timeout") == 1
    await stack.runtime.js.purge_stream(
        names.stream, subject=names.schedule_subject(task["task_id"], "webhook_timeout")
    )
    assert await schedules(stack, task["task_id"], "webhook_timeout") == 0
    lost = (await tasks_of(stack, wid))[0]
    # Lost while still pending: whatever fires it now is not the broker.
    assert lost["state"] == "EXECUTING"
    assert lost["timer_due_at"] > datetime.now(UTC), "the timer fired before it was purged"

    await wait_task_state(stack, wid, 0, "MANUAL_CHECK", timeout=15)
    events = await task_events(stack, task["task_id"])
    expired = [e for e in events if e["event"] == "webhook.sla_expired"]
    assert len(expired) == 1, events
    assert expired[0]["created_at"] >= lost["timer_due_at"]


# --- cascade-core faults -----------------------------------------------------------------------


async def _ahead_of_ledger(stack: Stack, wids: list[str]) -> list[str]:
    """Tasks whose record claims a balance outcome cascade-core does not hold (read in order).

    The record is read first: a balance call happens before the transaction that records it,
    so a ledger read afterwards can only be ahead of the record, never behind.
    """
    async with stack.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT t.task_id, t.state, t.freeze_state FROM order_tasks t"
            " JOIN order_queues q ON q.queue_id = t.queue_id"
            " WHERE q.withdrawal_id = ANY($1::text[])",
            wids,
        )
    ledger = (await stack.ledger())["operations"]
    problems = []
    for row in rows:
        held = ledger.get(str(row["task_id"]))
        claimed = row["freeze_state"]
        if claimed in ("committed", "rolled_back") and held != claimed:
            problems.append(f"{row['task_id']}: record {claimed}, ledger {held}")
        if claimed == "frozen" and held is None:
            problems.append(f"{row['task_id']}: record frozen, ledger has nothing")
        if row["state"] == "SUCCEEDED" and held != "committed":
            problems.append(f"{row['task_id']}: SUCCEEDED, ledger {held}")
    return problems


async def _set_status(stack: Stack, task: dict[str, Any], status: str) -> None:
    """The provider settles the order and sends its signed webhook through the real intake."""
    response = await stack.client.post(
        f"/sandbox/providers/{task['provider_id']}/orders/{task['provider_reference']}/status",
        json={"status": status},
    )
    assert response.status_code == 200, response.text
    assert response.json()["webhook_status"] == 200, response.text


@pytest.mark.parametrize("mode", ["500", "timeout"])
async def test_core_faults_hold_tasks_until_balance_calls_succeed(
    make_stack: StackFactory, mode: str
) -> None:
    stack = await make_stack(providers=providers(sla=600))
    if mode == "500":
        outage: dict[str, float] = {"fault_500_ratio": 1.0}
        flaky: dict[str, float] = {"fault_500_ratio": 0.5}
    else:
        outage = {"timeout_ratio": 1.0, "timeout_seconds": 0.2}
        flaky = {"timeout_ratio": 0.5, "timeout_seconds": 0.2}
    # Two orders accepted by the provider, frozen at cascade-core, waiting for the webhook.
    accepted = [await create_withdrawal(stack, [SILENT]) for _ in range(2)]
    waiting = [await wait_task_state(stack, wid, 0, "EXECUTING") for wid in accepted]
    await wait_consumed(stack)
    expected = {accepted[0]: "succeeded", accepted[1]: "failed"}
    samples: list[list[str]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            samples.append(await _ahead_of_ledger(stack, list(expected)))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        # 1. cascade-core fails every balance call: nothing may move.
        errors = await metric_sum(
            stack, "orchestrator_handler_errors_total", error="CoreUnavailable"
        )
        await set_core_faults(stack, **outage)
        fresh = []
        for cascade, status in [
            ([DECLINE, SYNC_OK], "succeeded"),
            ([SYNC_OK], "succeeded"),
            ([DECLINE], "failed"),
        ]:
            wid = await create_withdrawal(stack, cascade)
            expected[wid] = status
            fresh.append(wid)
        await _set_status(stack, waiting[0], "succeeded")
        await _set_status(stack, waiting[1], "failed")

        async def retried() -> bool:
            seen = await metric_sum(
                stack, "orchestrator_handler_errors_total", error="CoreUnavailable"
            )
            firsts = [(await tasks_of(stack, w))[0] for w in fresh]
            started = all(t["state"] == "CREATING" for t in firsts)
            return started and seen >= errors + 2 * 5  # five messages, each failed twice

        await wait_until(retried, timeout=20, what="every message to fail twice")
        ledger = (await stack.ledger())["operations"]
        for wid in expected:
            assert (await stack.withdrawal(wid))["status"] == "processing"
        for wid in accepted:
            task = (await tasks_of(stack, wid))[0]
            assert (task["state"], task["freeze_state"]) == ("EXECUTING", "frozen"), task
            assert ledger[str(task["task_id"])] == "frozen"
        for wid in fresh:
            first, *rest = await tasks_of(stack, wid)
            # CREATING is committed before the freeze; the freeze failed, so no provider call.
            assert (first["state"], first["freeze_state"]) == ("CREATING", "none"), first
            assert str(first["task_id"]) not in ledger
            order = await stack.client.get(
                f"/sandbox/providers/{first['provider_id']}/orders/{first['provider_order_id']}"
            )
            assert order.status_code == 404, order.text
            assert all(t["state"] == "PENDING" for t in rest)

        # 2. Half the balance calls fail: new withdrawals go through, retried as needed.
        await set_core_faults(stack, **flaky)
        more = [await create_withdrawal(stack, [DECLINE, SYNC_OK]) for _ in range(3)]
        expected.update(dict.fromkeys(more, "succeeded"))
        for wid in more:
            await stack.wait_final(wid, timeout=30)

        # 3. cascade-core healthy again: everything that waited completes.
        await set_core_faults(stack)
        for wid in expected:
            await stack.wait_final(wid, timeout=30)
    finally:
        stop.set()
        await sampler
    await wait_consumed(stack)
    assert len(samples) > 10
    assert [s for s in samples if s] == [], "the record ran ahead of cascade-core"
    await assert_settled(stack, expected)


# --- duplicates, out of order, late ------------------------------------------------------------


async def test_duplicate_and_late_starts_change_nothing(make_stack: StackFactory) -> None:
    """Each first start is delivered three times at once, and every start again afterwards."""
    stack = await make_stack(with_worker=False)
    expected = {}
    for cascade, status in [
        ([DECLINE, SYNC_OK], "succeeded"),
        ([SYNC_OK], "succeeded"),
        (["sbx_accept_fail", "sbx_ok"], "succeeded"),
        ([DECLINE], "failed"),
    ]:
        expected[await create_withdrawal(stack, cascade)] = status
    for wid in expected:
        first = (await tasks_of(stack, wid))[0]
        await publish(stack, bus.TASK_START, task_message(first))
        await publish(stack, bus.TASK_START, task_message(first))
    await stack.worker.start()
    for wid in expected:
        await stack.wait_final(wid)
    await wait_consumed(stack)
    before = await transitions(stack, list(expected))

    late = [
        (bus.TASK_START, task_message(task))
        for wid in expected
        for task in await tasks_of(stack, wid)
        for _ in range(2)
    ]
    await burst(stack, *late)
    assert await transitions(stack, list(expected)) == before
    await assert_settled(stack, expected)


async def test_timer_duplicates_and_stale_generations_change_nothing(
    make_stack: StackFactory,
) -> None:
    """Webhook SLA then status polling on one task, every timer delivered twice and late."""
    stack = await make_stack(
        providers=providers(sla=600, polling={"interval_seconds": 600, "max_polls": 3})
    )
    wid = await create_withdrawal(stack, [SILENT])
    task = await wait_task_state(stack, wid, 0, "EXECUTING")
    await wait_consumed(stack)
    task_id = task["task_id"]
    sla = (bus.WEBHOOK_TIMEOUT, task_message(task, 0))

    def tick(attempt: int) -> tuple[str, bytes]:
        return bus.STATUS_TICK, task_message(task, attempt)

    await burst(stack, sla, sla)
    names = await event_names(stack, task_id)
    assert (names["timer.webhook_timeout"], names["status.pending"]) == (1, 1), names
    polled = (await tasks_of(stack, wid))[0]
    assert (polled["status_polls"], polled["timer_kind"], polled["timer_attempt"]) == (
        1,
        "status_tick",
        1,
    )

    # Late: the SLA timer again, the status tick of a generation that never was, a recheck.
    await burst(stack, sla, tick(0), (bus.RECHECK_TICK, task_message(task, 0)))
    assert await event_names(stack, task_id) == names

    await burst(stack, tick(1), tick(1))
    names = await event_names(stack, task_id)
    assert (names["timer.status_tick"], names["status.pending"]) == (1, 2), names

    # The outcome twice at once, then everything again after it.
    success = (bus.WEBHOOK_RECEIVED, webhook_message(task, "succeeded"))
    await burst(stack, success, success)
    assert (await tasks_of(stack, wid))[0]["state"] == "SUCCEEDED"
    names = await event_names(stack, task_id)
    recorded = len(await unmatched(stack, task["provider_reference"]))
    await burst(
        stack,
        success,
        (bus.WEBHOOK_RECEIVED, webhook_message(task, "failed", "declined")),
        sla,
        tick(1),
        tick(2),
        (bus.RECHECK_TICK, task_message(task, 0)),
        (bus.TASK_START, task_message(task)),
    )
    assert await event_names(stack, task_id) == names
    # The two late webhooks are kept for support as "task already final".
    assert await unmatched(stack, task["provider_reference"]) == ["task_final"] * (recorded + 2)
    await assert_settled(stack, {wid: "succeeded"})


async def _deadline_armed(stack: Stack, wid: str) -> dict[str, Any]:
    """Until the task's timer is the polling deadline (the SLA expired, the poll found the
    order pending, the next tick would come after the deadline); returns its row."""

    async def probe() -> dict[str, Any] | None:
        row = (await tasks_of(stack, wid))[0]
        return row if row["timer_kind"] == "status_timeout" else None

    return await wait_until(probe, timeout=15, what=f"{wid}'s polling deadline to be armed")


async def delivered(stack: Stack, subject: str) -> int:
    """Messages the stack's stream holds on one event subject (limits retention keeps them)."""
    names = stack.runtime.relay.names
    info = await stack.runtime.js.stream_info(names.stream, subjects_filter=names.subject(subject))
    return (info.state.subjects or {}).get(names.subject(subject), 0)


DEADLINE_POLLING = {"interval_seconds": 600, "max_polls": 3, "timeout_seconds": 3}


async def test_the_polling_deadline_moves_a_pending_order_to_manual_check_once(
    make_stack: StackFactory,
) -> None:
    """SLA 1 s, then polling every ten minutes for at most 3 s: the one poll finds the order
    pending, the deadline (not a tick) is armed, and its schedule fires on
    ``order.task.status.timeout``: MANUAL_CHECK, once. The same firing again, and stale
    generations of every EXECUTING timer, change nothing.

    The sweeper is off (its grace is ten minutes): only JetStream can deliver the deadline.
    """
    stack = await make_stack(
        providers=providers(sla=1, polling=DEADLINE_POLLING), with_worker=False
    )
    worker = _worker_without_sweeper(stack)
    await worker.start()
    try:
        wid = await create_withdrawal(stack, [SILENT])
        task = await wait_task_state(stack, wid, 0, "EXECUTING")
        task_id = task["task_id"]
        armed = await _deadline_armed(stack, wid)
        # SLA expiry + timeout_seconds, from when EXECUTING was entered.
        assert armed["timer_due_at"] == armed["state_entered_at"] + timedelta(seconds=1 + 3)
        assert (armed["state"], armed["status_polls"], armed["timer_attempt"]) == (
            "EXECUTING",
            1,
            1,
        )
        await wait_until(
            lambda: _has_schedule(stack, task_id, "status_timeout"),
            timeout=15,
            what="the deadline's schedule",
        )
        assert await schedules(stack, task_id, "status_tick") == 0

        manual = await wait_task_state(stack, wid, 0, "MANUAL_CHECK", timeout=20)
        await wait_consumed(stack)
        assert await delivered(stack, bus.STATUS_TIMEOUT) == 1
        assert await schedules(stack, task_id, "status_timeout") == 0  # spent
        assert (manual["timer_kind"], manual["timer_due_at"], manual["status_polls"]) == (
            None,
            None,
            1,
        )
        assert manual["freeze_state"] == "frozen"  # support decides; nothing rolled back
        events = await task_events(stack, task_id)
        waited = [
            (e["event"], e["from_state"], e["to_state"], e["actor"])
            for e in events
            if e["from_state"] == "EXECUTING"
        ]
        assert waited == [
            ("timer.webhook_timeout", "EXECUTING", None, "timer"),
            ("status.pending", "EXECUTING", None, "timer"),
            ("status.timeout", "EXECUTING", "MANUAL_CHECK", "timer"),
        ], events
        polled = next(e for e in events if e["event"] == "status.pending")
        assert polled["details"]["provider_status"] == "pending"  # the order stays pending
        timeout = events[-1]
        assert timeout["details"] == {"timer": "status_timeout", "attempt": 1}
        assert timeout["created_at"] >= armed["timer_due_at"]  # fired by the deadline
        assert (await transitions(stack, [wid]))[(task_id, "MANUAL_CHECK")] == 1

        # The deadline again (twice, at once), an older generation, and the other timers late.
        deadline = (bus.STATUS_TIMEOUT, task_message(task, 1))
        await burst(
            stack,
            deadline,
            deadline,
            (bus.STATUS_TIMEOUT, task_message(task, 0)),
            (bus.STATUS_TICK, task_message(task, 1)),
            (bus.WEBHOOK_TIMEOUT, task_message(task, 0)),
        )
        assert await task_events(stack, task_id) == events
        assert (await tasks_of(stack, wid))[0]["version"] == manual["version"]
        assert (await stack.withdrawal(wid))["status"] == "processing"
    finally:
        await worker.stop()

    listed = await stack.client.get("/ops/manual-checks", headers=OPS)
    assert [c["task_id"] for c in listed.json()["manual_checks"]] == [str(task_id)]
    resolved = await stack.client.post(
        f"/ops/tasks/{task_id}/resolve",
        headers=OPS,
        json={"decision": "negative", "reason": "provider has no record of paying it"},
    )
    assert resolved.status_code == 200, resolved.text
    await assert_settled(stack, {wid: "failed"})


async def _has_schedule(stack: Stack, task_id: uuid.UUID, kind: TimerKind) -> bool:
    return await schedules(stack, task_id, kind) == 1


async def test_a_lost_polling_deadline_is_fired_by_the_sweeper(make_stack: StackFactory) -> None:
    """The deadline's schedule is purged before it is due: the Postgres sweeper fires it on
    the same subject, and the task moves to MANUAL_CHECK once."""
    stack = await make_stack(providers=providers(sla=1, polling=DEADLINE_POLLING))
    wid = await create_withdrawal(stack, [SILENT])
    armed = await _deadline_armed(stack, wid)
    task_id = armed["task_id"]
    names = stack.runtime.relay.names
    subject = names.schedule_subject(task_id, "status_timeout")
    await wait_until(
        lambda: _has_schedule(stack, task_id, "status_timeout"), timeout=15, what="the schedule"
    )
    await stack.runtime.js.purge_stream(names.stream, subject=subject)
    assert await schedules(stack, task_id, "status_timeout") == 0
    lost = (await tasks_of(stack, wid))[0]
    assert (lost["state"], lost["timer_kind"]) == ("EXECUTING", "status_timeout")
    assert lost["timer_due_at"] > datetime.now(UTC), "the deadline fired before it was purged"

    await wait_task_state(stack, wid, 0, "MANUAL_CHECK", timeout=15)
    await wait_consumed(stack)
    events = await task_events(stack, task_id)
    timeouts = [e for e in events if e["event"] == "status.timeout"]
    assert len(timeouts) == 1, events
    assert timeouts[0]["created_at"] >= lost["timer_due_at"]
    assert await delivered(stack, bus.STATUS_TIMEOUT) >= 1
    assert (await transitions(stack, [wid]))[(task_id, "MANUAL_CHECK")] == 1


SLOW_RECHECK = {
    "recheck": {
        "initial_delay_seconds": 600,
        "multiplier": 2,
        "max_delay_seconds": 600,
        "max_attempts": 5,
    }
}


async def _rechecking(
    make_stack: StackFactory, outcome: str, *, success_after: float = 2.0
) -> tuple[Stack, str, dict[str, Any]]:
    """A ``[sbx_flaky, sbx_sync_ok]`` withdrawal whose create answered 503: RECHECKING.

    The order exists at the provider (``created``, it succeeds ``success_after`` seconds after
    the create) or not (``absent``). The recheck timer is ten minutes away: the test fires it.
    """
    stack = await make_stack(
        providers=providers(sla=600, overrides={FLAKY: SLOW_RECHECK}),
        env={"SANDBOX_FLAKY_SUCCESS_DELAY_SECONDS": str(success_after)},
    )
    script = await stack.client.post(
        f"/sandbox/providers/{FLAKY}/script", json={"outcomes": [outcome], "errors": ["503"]}
    )
    assert script.status_code == 200, script.text
    wid = await create_withdrawal(stack, [FLAKY, SYNC_OK])
    task = await wait_task_state(stack, wid, 0, "RECHECKING")
    await wait_consumed(stack)
    return stack, wid, task


@pytest.mark.parametrize(("outcome", "provider"), [("created", FLAKY), ("absent", SYNC_OK)])
async def test_duplicate_recheck_ticks_poll_once(
    make_stack: StackFactory, outcome: str, provider: str
) -> None:
    """Two recheck ticks at once: one poll, one recorded answer; a late tick changes nothing."""
    stack, wid, task = await _rechecking(make_stack, outcome)
    recheck = (bus.RECHECK_TICK, task_message(task, 0))

    await burst(stack, recheck, recheck)
    names = await event_names(stack, task["task_id"])
    assert names["timer.recheck"] == 1, names
    answers = {name: n for name, n in names.items() if name.startswith("recheck.")}
    assert sum(answers.values()) == 1, names
    if outcome == "absent":
        assert answers == {"recheck.absent": 1}, names

    final = await stack.wait_final(wid, timeout=15)
    assert final["provider_id"] == provider
    count = len(await task_events(stack, task["task_id"]))
    await burst(stack, recheck)
    assert len(await task_events(stack, task["task_id"])) == count
    await wait_consumed(stack)
    await assert_settled(stack, {wid: "succeeded"})


async def test_a_recheck_that_finds_the_order_pending_moves_to_executing(
    make_stack: StackFactory,
) -> None:
    # The order succeeds only long after the poll, however slow the machine.
    stack, wid, task = await _rechecking(make_stack, "created", success_after=120)
    await burst(stack, (bus.RECHECK_TICK, task_message(task, 0)))
    row = (await tasks_of(stack, wid))[0]
    names = await event_names(stack, task["task_id"])
    assert (row["state"], row["timer_kind"]) == ("EXECUTING", "webhook_timeout"), names
    assert names["recheck.found"] == 1, names
    # The SLA timer armed by this transition is a schedule in NATS, not only a row.
    assert await schedules(stack, task["task_id"], "webhook_timeout") == 1


async def test_an_outcome_purges_the_timer_the_task_waited_on(make_stack: StackFactory) -> None:
    """The SLA schedule a task waits on goes when a webhook settles it, not 15 minutes later."""
    stack = await make_stack(providers=providers(sla=600))
    wid = await create_withdrawal(stack, [SILENT])
    task = await wait_task_state(stack, wid, 0, "EXECUTING")
    await wait_consumed(stack)
    assert (await tasks_of(stack, wid))[0]["timer_kind"] == "webhook_timeout"
    assert await schedules(stack, task["task_id"], "webhook_timeout") == 1

    await burst(stack, (bus.WEBHOOK_RECEIVED, webhook_message(task, "succeeded")))
    await stack.wait_final(wid)
    assert (await tasks_of(stack, wid))[0]["timer_kind"] is None
    assert await schedules(stack, task["task_id"], "webhook_timeout") == 0
    await assert_settled(stack, {wid: "succeeded"})


async def test_start_of_a_task_out_of_turn_is_ignored(make_stack: StackFactory) -> None:
    """A start for the second task while the first still waits on its provider."""
    stack = await make_stack(providers=providers(sla=600))
    wid = await create_withdrawal(stack, [SILENT, SYNC_OK])
    first = await wait_task_state(stack, wid, 0, "EXECUTING")
    await wait_consumed(stack)
    second = (await tasks_of(stack, wid))[1]

    await burst(stack, (bus.TASK_START, task_message(second)))
    assert (await tasks_of(stack, wid))[1]["state"] == "PENDING"

    await burst(stack, (bus.WEBHOOK_RECEIVED, webhook_message(first, "succeeded")))
    assert (await stack.wait_final(wid))["provider_id"] == SILENT
    await assert_settled(stack, {wid: "succeeded"})


# --- concurrency -------------------------------------------------------------------------------


async def test_webhook_and_sla_timeout_at_the_same_moment(make_stack: StackFactory) -> None:
    """Outcome webhook and SLA timer race on each task: one wins, the other is ignored."""
    stack = await make_stack(providers=providers(sla=600))
    wids = [await create_withdrawal(stack, [SILENT]) for _ in range(8)]
    tasks = [await wait_task_state(stack, wid, 0, "EXECUTING") for wid in wids]
    await wait_consumed(stack)
    expected = {}
    race = []
    for i, (wid, task) in enumerate(zip(wids, tasks, strict=True)):
        status: ProviderStatus = "succeeded" if i % 2 == 0 else "failed"
        expected[wid] = status
        race.append((bus.WEBHOOK_RECEIVED, webhook_message(task, status, None)))
        race.append((bus.WEBHOOK_TIMEOUT, task_message(task, 0)))
    await burst(stack, *race)
    for wid in wids:
        await stack.wait_final(wid)
    await assert_settled(stack, expected)
    for task in tasks:
        names = await event_names(stack, task["task_id"])
        # Either the webhook came first (the timer was stale) or the timer did (a manual check
        # the webhook then settled); never both outcomes.
        assert names["webhook.sla_expired"] <= 1, names


class RecordingWorker(Worker):
    """A worker that remembers which task each message it handled was about."""

    def __init__(self, label: str, handled: list[tuple[str, str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label
        self.handled = handled

    async def dispatch(self, subject: str, data: bytes, trace_id: str | None) -> None:
        body = json.loads(data)
        self.handled.append((self.label, subject, body.get("task_id") or body.get("order_id")))
        await super().dispatch(subject, data, trace_id)


async def test_two_workers_on_the_same_messages_one_winner(make_stack: StackFactory) -> None:
    """Two workers (own connections and pools) share the consumer; every start comes thrice."""
    stack = await make_stack(with_worker=False)
    other = await open_runtime(stack.settings, name="worker-2", with_router=False)
    handled: list[tuple[str, str, str]] = []
    workers = [
        RecordingWorker(
            label,
            handled,
            engine=runtime.engine,
            js=runtime.js,
            core=runtime.core,
            concurrency=4,
            sweep_interval=0.5,
            stranded_after=3.0,
            timer_grace=1.0,
        )
        for label, runtime in (("one", stack.runtime), ("two", other))
    ]
    try:
        expected = {}
        for cascade, status in [
            ([DECLINE, SYNC_OK], "succeeded"),
            ([SYNC_OK], "succeeded"),
            (["sbx_ok"], "succeeded"),
            ([DECLINE], "failed"),
        ] * 2:
            expected[await create_withdrawal(stack, cascade)] = status
        for wid in expected:
            first = (await tasks_of(stack, wid))[0]
            for _ in range(2):
                await publish(stack, bus.TASK_START, task_message(first))
        await asyncio.gather(*(w.start() for w in workers))
        for wid in expected:
            await stack.wait_final(wid)
        await wait_consumed(stack)
        await assert_settled(stack, expected)
    finally:
        for worker in workers:
            await worker.stop()
        await other.close()
    by_worker = Counter(label for label, _, _ in handled)
    assert by_worker["one"] > 0, by_worker
    assert by_worker["two"] > 0, by_worker
    starts: dict[str, set[str]] = {}
    for label, subject, about in handled:
        if subject == bus.TASK_START:
            starts.setdefault(about, set()).add(label)
    assert any(len(labels) == 2 for labels in starts.values()), "no start reached both workers"


# --- dead letters ------------------------------------------------------------------------------


async def test_a_failing_message_is_dead_lettered_and_replayed_after_the_fix(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Test-speed redelivery: eight deliveries in about a second instead of two minutes.
    monkeypatch.setattr(bus, "BACKOFF", (0.05,) * 7)
    stack = await make_stack(providers=providers(sla=600))
    names = stack.runtime.relay.names
    wid = await create_withdrawal(stack, [SILENT])
    task = await wait_task_state(stack, wid, 0, "EXECUTING")
    await wait_consumed(stack)

    # A webhook whose commit cascade-core refuses to take (down), and bytes that are no event.
    await set_core_faults(stack, fault_500_ratio=1.0)
    await publish(stack, bus.WEBHOOK_RECEIVED, webhook_message(task, "succeeded"))
    await publish(stack, bus.TASK_START, b"{not json")

    async def dead(n: int) -> bool:
        return await bus.dlq_size(stack.runtime.js, names) == n

    await wait_until(lambda: dead(2), timeout=30, what="two dead letters")
    await wait_consumed(stack)
    held = (await tasks_of(stack, wid))[0]
    assert (held["state"], held["freeze_state"]) == ("EXECUTING", "frozen")
    assert (await stack.ledger())["operations"][str(task["task_id"])] == "frozen"

    async def gauge(n: float) -> bool:
        return await metric_sum(stack, "dlq_size") == n

    await wait_until(lambda: gauge(2.0), timeout=15, what="dlq_size to show 2")

    status, out, err = await run_cli(stack, "dlq", "list")
    assert status == 0, err
    assert "disconnected" not in err, err  # its own close is not an outage
    letters = {d["subject"]: d for d in map(json.loads, out.splitlines())}
    assert set(letters) == {bus.WEBHOOK_RECEIVED, bus.TASK_START}, out
    # cascade-core down: retried until the last delivery. Bytes that are no event: no retry
    # can fix them, dead-lettered on the first.
    webhook, garbage = letters[bus.WEBHOOK_RECEIVED], letters[bus.TASK_START]
    assert (webhook["deliveries"], webhook["reason"]) == (bus.MAX_DELIVER, "retries_exhausted")
    assert (garbage["deliveries"], garbage["reason"]) == (1, "unreadable_message"), out
    assert garbage["error"].startswith("UnreadableMessage: DecodeError"), out
    assert letters[bus.WEBHOOK_RECEIVED]["error"].startswith("CoreUnavailable"), out
    assert "commit" in letters[bus.WEBHOOK_RECEIVED]["error"], out
    assert letters[bus.TASK_START]["payload"] == "{not json", out

    # The fix: cascade-core is back. Replay: the webhook goes through, the garbage fails again.
    await set_core_faults(stack)
    status, out, err = await run_cli(stack, "dlq", "replay")
    assert status == 0, err
    assert "replayed 2 message(s)" in out
    final = await stack.wait_final(wid)
    assert final["status"] == "succeeded"
    await wait_until(lambda: dead(1), timeout=30, what="the garbage back on the DLQ")
    await wait_consumed(stack)
    await assert_settled(stack, {wid: "succeeded"})


async def test_a_webhook_for_a_create_cut_off_waits_for_its_resume(
    make_stack: StackFactory,
) -> None:
    """The create's handler failed after PENDING → CREATING (here cascade-core answered 500 to
    the freeze; a crash does the same): a webhook for that order is retried, not dropped, and
    applies once the resumed create has recorded the order."""
    stack = await make_stack(with_worker=False)
    engine = stack.runtime.engine
    wid = await create_withdrawal(stack, [SILENT])
    (task,) = await tasks_of(stack, wid)
    queue_id, task_id = task["queue_id"], task["task_id"]
    await set_core_faults(stack, fault_500_ratio=1.0)
    with pytest.raises(CoreUnavailable):
        await engine.start_task(queue_id, task_id, actor="test")
    await set_core_faults(stack)
    (task,) = await tasks_of(stack, wid)
    assert task["state"] == "CREATING"

    webhook = WebhookMessage(
        provider_id=SILENT, order_id=task["provider_order_id"], reference="r-1", status="succeeded"
    )
    with pytest.raises(RetryLater):
        await engine.webhook(webhook, None)
    assert [t["state"] for t in await tasks_of(stack, wid)] == ["CREATING"]

    await engine.start_task(queue_id, task_id, actor="sweeper")  # the sweeper's resume
    assert [t["state"] for t in await tasks_of(stack, wid)] == ["EXECUTING"]
    assert await engine.webhook(webhook, None)  # the retry
    assert [t["state"] for t in await tasks_of(stack, wid)] == ["SUCCEEDED"]
    assert "webhook.succeeded" in await event_names(stack, task_id)
