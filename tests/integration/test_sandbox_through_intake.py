"""Every sandbox provider behaviour, end to end, with its webhooks through the real intake.

Each test drives withdrawals through the public API on a real stack; the sandbox providers
answer the generic provider adapter over HTTP and send their signed webhooks to
``POST /webhooks/{provider_id}``, exactly as a real provider would. What is checked: the public
status, the provider shown, the path the task took, what the intake counted, and the sandbox
ledger (one commit per success, a rollback for every other freeze, no violations).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Stack, StackFactory, new_id, providers_document, withdrawal_body
from tests.integration.test_webhook_intake import (
    counted,
    ledger_ops,
    quiet_providers,
    task_events,
    wait_consumed,
    webhook_counts,
)
from tests.waiting import wait_until

OPS = {"Authorization": "Bearer ops-token"}


async def create(stack: Stack, cascade: list[str]) -> str:
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, cascade)
    )
    assert response.status_code == 201, response.text
    return wid


def path(events: list[dict[str, Any]], provider: str) -> list[str]:
    """The states one provider's task entered after it was created (from its audit rows)."""
    return [
        e["to_state"]
        for e in events
        if e["provider_id"] == provider
        and e["to_state"] not in (None, e["from_state"])
        and e["event"] != "task.created"
    ]


async def intake_saw(
    stack: Stack, before: dict[tuple[str, str], float], expected: dict[tuple[str, str], float]
) -> None:
    """Await the intake having counted ``expected`` since ``before``, then demand exactly that."""

    def arrived(counts: dict[tuple[str, str], float]) -> bool:
        moved = counted(before, counts)
        return all(moved.get(k, 0) >= v for k, v in expected.items())

    await wait_until(
        lambda: webhook_counts(stack),
        done=arrived,
        timeout=10,
        what=f"the intake to count webhooks {expected}",
    )
    await wait_consumed(stack)
    assert counted(before, await webhook_counts(stack)) == expected


async def assert_clean_ledger(stack: Stack, wid: str, ops: list[tuple[str, str]]) -> None:
    ledger = await stack.ledger()
    assert ledger_ops(ledger, wid) == sorted(ops)
    committed = [op for op in ops if op[1] == "committed"]
    assert len(committed) <= 1
    assert not [op for op in ops if op[1] == "frozen"], "a freeze was left open"
    assert ledger["violations"] == []


@pytest.mark.parametrize(
    ("cascade", "status", "provider", "failure_code", "ops", "paths", "webhooks"),
    [
        pytest.param(
            ["sbx_ok"],
            "succeeded",
            "sbx_ok",
            None,
            [("sbx_ok", "committed")],
            {"sbx_ok": ["CREATING", "EXECUTING", "SUCCEEDED"]},
            {("sbx_ok", "accepted"): 1},
            id="sbx_ok",
        ),
        pytest.param(
            ["sbx_sync_ok"],
            "succeeded",
            "sbx_sync_ok",
            None,
            [("sbx_sync_ok", "committed")],
            {"sbx_sync_ok": ["CREATING", "SUCCEEDED"]},
            # Its webhook still comes, after the create already settled it: absorbed.
            {("sbx_sync_ok", "accepted"): 1},
            id="sbx_sync_ok",
        ),
        pytest.param(
            ["sbx_decline"],
            "failed",
            "sbx_decline",
            "declined",
            [("sbx_decline", "rolled_back")],
            {"sbx_decline": ["CREATING", "NEGATIVE_EVAL", "SKIPPED"]},
            {},
            id="sbx_decline",
        ),
        pytest.param(
            ["sbx_accept_fail"],
            "failed",
            "sbx_accept_fail",
            "declined",
            [("sbx_accept_fail", "rolled_back")],
            {"sbx_accept_fail": ["CREATING", "EXECUTING", "FAILED"]},
            {("sbx_accept_fail", "accepted"): 1},
            id="sbx_accept_fail",
        ),
        pytest.param(
            ["sbx_accept_fail", "sbx_ok"],
            "succeeded",
            "sbx_ok",
            None,
            [("sbx_accept_fail", "rolled_back"), ("sbx_ok", "committed")],
            {
                "sbx_accept_fail": ["CREATING", "EXECUTING", "FAILED"],
                "sbx_ok": ["CREATING", "EXECUTING", "SUCCEEDED"],
            },
            {("sbx_accept_fail", "accepted"): 1, ("sbx_ok", "accepted"): 1},
            id="sbx_accept_fail-then-sbx_ok",
        ),
        pytest.param(
            ["sbx_no_funds"],
            "failed",
            "sbx_no_funds",
            "provider_error",
            [],
            {"sbx_no_funds": ["CREATING", "NEGATIVE_EVAL", "SKIPPED"]},
            {},
            id="sbx_no_funds",
        ),
        pytest.param(
            ["sbx_no_funds", "sbx_ok"],
            "succeeded",
            "sbx_ok",
            None,
            [("sbx_ok", "committed")],
            {
                "sbx_no_funds": ["CREATING", "NEGATIVE_EVAL", "SKIPPED"],
                "sbx_ok": ["CREATING", "EXECUTING", "SUCCEEDED"],
            },
            {("sbx_ok", "accepted"): 1},
            id="sbx_no_funds-then-sbx_ok",
        ),
    ],
)
async def test_provider_behaviour(
    make_stack: StackFactory,
    cascade: list[str],
    status: str,
    provider: str,
    failure_code: str | None,
    ops: list[tuple[str, str]],
    paths: dict[str, list[str]],
    webhooks: dict[tuple[str, str], float],
) -> None:
    stack = await make_stack()
    before = await webhook_counts(stack)
    wid = await create(stack, cascade)
    view = await stack.wait_final(wid)
    assert (view["status"], view["provider_id"], view["failure_code"]) == (
        status,
        provider,
        failure_code,
    )
    if status == "succeeded":
        assert view["provider_reference"].startswith(f"{provider}-")
    await intake_saw(stack, before, webhooks)
    events = await task_events(stack, wid)
    assert {p: path(events, p) for p in paths} == paths
    # Every outcome a webhook brought is in the audit trail as the provider's own doing.
    for (webhook_provider, _), _count in webhooks.items():
        applied = [
            e
            for e in events
            if e["provider_id"] == webhook_provider and e["details"].get("source") == "webhook"
        ]
        if webhook_provider == "sbx_sync_ok":
            assert applied == [], "the create had settled it; the webhook must change nothing"
        else:
            assert [e["actor"] for e in applied] == [f"provider:{webhook_provider}"]
    await assert_clean_ledger(stack, wid, ops)
    if "sbx_no_funds" in cascade:
        ledger = await stack.ledger()
        async with stack.runtime.pool.acquire() as conn:
            refused = await conn.fetchval(
                "SELECT t.task_id FROM order_tasks t JOIN order_queues q USING (queue_id)"
                " WHERE q.withdrawal_id = $1 AND t.provider_id = 'sbx_no_funds'",
                wid,
            )
        assert "insufficient_balance" in ledger["refusals"][str(refused)]
        no_funds = [e for e in events if e["to_state"] == "NEGATIVE_EVAL"]
        assert [e["details"]["core_code"] for e in no_funds] == ["insufficient_balance"]


async def test_sbx_silent_stays_processing_until_set_status(make_stack: StackFactory) -> None:
    """Silent never calls back; set-status sends its success through the real intake."""
    stack = await make_stack(providers=quiet_providers())
    before = await webhook_counts(stack)
    silent = await create(stack, ["sbx_silent"])
    # A witness on the same sandbox timings: once sbx_ok's webhook has been applied, silent
    # had every chance to call back too (no wall-clock guess at "long enough").
    witness = await create(stack, ["sbx_ok"])
    assert (await stack.wait_final(witness))["status"] == "succeeded"
    view = await stack.wait_for(silent, lambda b: b["provider_reference"] is not None)
    await wait_consumed(stack)
    assert view["status"] == "processing"
    assert counted(before, await webhook_counts(stack)) == {("sbx_ok", "accepted"): 1.0}
    assert path(await task_events(stack, silent), "sbx_silent") == ["CREATING", "EXECUTING"]
    assert ledger_ops(await stack.ledger(), silent) == [("sbx_silent", "frozen")]

    reference = view["provider_reference"]
    progress = await stack.client.post(
        f"/sandbox/providers/sbx_silent/orders/{reference}/status", json={"status": "pending"}
    )
    assert progress.status_code == 200, progress.text
    assert progress.json()["webhook_status"] == 200
    await wait_consumed(stack)
    assert (await stack.withdrawal(silent))["status"] == "processing"

    response = await stack.client.post(
        f"/sandbox/providers/sbx_silent/orders/{reference}/status", json={"status": "succeeded"}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["webhook_status"] == 200
    assert answer["order"]["status"] == "succeeded"
    final = await stack.wait_final(silent)
    assert (final["status"], final["provider_id"], final["provider_reference"]) == (
        "succeeded",
        "sbx_silent",
        reference,
    )
    await wait_consumed(stack)
    assert counted(before, await webhook_counts(stack)) == {
        ("sbx_ok", "accepted"): 1.0,
        ("sbx_silent", "progress"): 1.0,
        ("sbx_silent", "accepted"): 1.0,
    }
    events = await task_events(stack, silent)
    assert path(events, "sbx_silent") == ["CREATING", "EXECUTING", "SUCCEEDED"]
    assert [e["event"] for e in events if e["to_state"] == "SUCCEEDED"] == ["webhook.succeeded"]
    await assert_clean_ledger(stack, silent, [("sbx_silent", "committed")])


async def test_sbx_silent_set_status_failed_moves_the_cascade_on(make_stack: StackFactory) -> None:
    stack = await make_stack(providers=quiet_providers())
    wid = await create(stack, ["sbx_silent", "sbx_ok"])
    view = await stack.wait_for(wid, lambda b: b["provider_reference"] is not None)
    response = await stack.client.post(
        f"/sandbox/providers/sbx_silent/orders/{view['provider_reference']}/status",
        json={"status": "failed", "code": "limit_exceeded"},
    )
    assert response.json()["webhook_status"] == 200, response.text
    final = await stack.wait_final(wid)
    assert (final["status"], final["provider_id"]) == ("succeeded", "sbx_ok")
    events = await task_events(stack, wid)
    failed = [e for e in events if e["to_state"] == "FAILED"]
    assert [(e["provider_id"], e["details"]["code"]) for e in failed] == [
        ("sbx_silent", "limit_exceeded")
    ]
    await assert_clean_ledger(stack, wid, [("sbx_silent", "rolled_back"), ("sbx_ok", "committed")])


async def test_sbx_silent_reaches_manual_check_and_set_status_still_settles_it(
    make_stack: StackFactory,
) -> None:
    """With test-speed timers: SLA passes, polling says pending, support is asked; then the
    provider's late webhook (via set-status) settles the task before anyone resolves it."""
    stack = await make_stack(providers=providers_document())
    wid = await create(stack, ["sbx_silent"])

    async def listed() -> list[dict[str, Any]]:
        response = await stack.client.get("/ops/manual-checks", headers=OPS)
        response.raise_for_status()
        return [c for c in response.json()["manual_checks"] if c["withdrawal_id"] == wid]

    [check] = await wait_until(listed, timeout=20, what="the manual check")
    assert (await stack.withdrawal(wid))["status"] == "processing"
    response = await stack.client.post(
        f"/sandbox/providers/sbx_silent/orders/{check['provider_reference']}/status",
        json={"status": "succeeded"},
    )
    assert response.json()["webhook_status"] == 200, response.text
    final = await stack.wait_final(wid)
    assert (final["status"], final["provider_id"]) == ("succeeded", "sbx_silent")
    assert path(await task_events(stack, wid), "sbx_silent") == [
        "CREATING",
        "EXECUTING",
        "MANUAL_CHECK",
        "SUCCEEDED",
    ]
    assert await listed() == []
    await assert_clean_ledger(stack, wid, [("sbx_silent", "committed")])


async def script_flaky(stack: Stack, outcomes: list[str], errors: list[str]) -> None:
    response = await stack.client.post(
        "/sandbox/providers/sbx_flaky/script", json={"outcomes": outcomes, "errors": errors}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"outcomes": outcomes, "errors": errors}


@pytest.mark.parametrize("error", ["503", "timeout"])
async def test_sbx_flaky_created_anyway_is_found_by_recheck_and_succeeds(
    make_stack: StackFactory, error: str
) -> None:
    """The create fails ambiguously but the order exists: RECHECKING finds it, it pays once."""
    stack = await make_stack()
    await script_flaky(stack, ["created"], [error])
    before = await webhook_counts(stack)
    wid = await create(stack, ["sbx_flaky", "sbx_ok"])
    final = await stack.wait_final(wid)
    assert (final["status"], final["provider_id"]) == ("succeeded", "sbx_flaky")
    assert final["provider_reference"].startswith("sbx_flaky-")
    # The order's success webhook always comes; it may land after a recheck poll saw it first.
    await intake_saw(stack, before, {("sbx_flaky", "accepted"): 1})
    events = await task_events(stack, wid)
    flaky = path(events, "sbx_flaky")
    assert flaky[:2] == ["CREATING", "RECHECKING"]
    assert flaky[-1] == "SUCCEEDED"
    assert set(flaky) <= {"CREATING", "RECHECKING", "EXECUTING", "SUCCEEDED"}
    assert path(events, "sbx_ok") == ["SKIPPED"], "the next provider must not be tried"
    await assert_clean_ledger(stack, wid, [("sbx_flaky", "committed")])


@pytest.mark.parametrize("error", ["503", "timeout"])
async def test_sbx_flaky_absent_is_proven_by_recheck_and_the_next_provider_pays(
    make_stack: StackFactory, error: str
) -> None:
    stack = await make_stack()
    await script_flaky(stack, ["absent"], [error])
    before = await webhook_counts(stack)
    wid = await create(stack, ["sbx_flaky", "sbx_ok"])
    final = await stack.wait_final(wid)
    assert (final["status"], final["provider_id"]) == ("succeeded", "sbx_ok")
    await intake_saw(stack, before, {("sbx_ok", "accepted"): 1})
    events = await task_events(stack, wid)
    assert path(events, "sbx_flaky") == ["CREATING", "RECHECKING", "FAILED"]
    assert path(events, "sbx_ok") == ["CREATING", "EXECUTING", "SUCCEEDED"]
    await assert_clean_ledger(stack, wid, [("sbx_flaky", "rolled_back"), ("sbx_ok", "committed")])
    order = await stack.client.get(
        f"/sandbox/providers/sbx_flaky/orders/{await _order_id(stack, wid, 'sbx_flaky')}"
    )
    assert order.status_code == 404, "the sandbox must not hold an order it said was absent"


async def _order_id(stack: Stack, wid: str, provider: str) -> str:
    async with stack.runtime.pool.acquire() as conn:
        order_id: str = await conn.fetchval(
            "SELECT t.provider_order_id FROM order_tasks t JOIN order_queues q USING (queue_id)"
            " WHERE q.withdrawal_id = $1 AND t.provider_id = $2",
            wid,
            provider,
        )
    return order_id


async def test_every_behaviour_at_once_on_one_stack(make_stack: StackFactory) -> None:
    """The behaviours side by side (concurrent webhooks, shared floats): the ledger stays clean."""
    stack = await make_stack()
    await script_flaky(stack, ["created", "absent"], ["503", "503"])
    cascades = [
        ["sbx_ok"],
        ["sbx_sync_ok"],
        ["sbx_decline", "sbx_ok"],
        ["sbx_accept_fail", "sbx_sync_ok"],
        ["sbx_no_funds", "sbx_ok"],
        ["sbx_flaky", "sbx_ok"],
        ["sbx_flaky", "sbx_ok"],
    ]
    wids = await asyncio.gather(*(create(stack, c) for c in cascades))
    finals = await asyncio.gather(*(stack.wait_final(w) for w in wids))
    assert [f["status"] for f in finals] == ["succeeded"] * len(cascades)
    await wait_consumed(stack)
    ledger = await stack.ledger()
    assert ledger["violations"] == []
    for wid in wids:
        states = [state for _, state in ledger_ops(ledger, wid)]
        assert states.count("committed") == 1, (wid, states)
        assert "frozen" not in states
