"""Both cohorts through HTTP on real NATS and Postgres: the walking skeleton's promise."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Stack, StackFactory, flags_document, new_id, withdrawal_body
from tests.waiting import wait_until


def _ops_for(ledger: dict[str, Any], withdrawal_id: str) -> list[tuple[str, str]]:
    details = ledger["operation_details"]
    return sorted(
        (d["provider_id"], d["state"])
        for d in details.values()
        if d["withdrawal_id"] == withdrawal_id
    )


def _notified(ledger: dict[str, Any], withdrawal_id: str) -> list[str]:
    return [n["status"] for n in ledger["notifications"] if n["withdrawal_id"] == withdrawal_id]


@pytest.mark.e2e
async def test_cascade_cohort_walks_past_a_decline_and_succeeds(make_stack: StackFactory) -> None:
    stack = await make_stack(flags=flags_document(enabled=True))
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals",
        headers=stack.headers,
        json=withdrawal_body(wid, ["sbx_decline", "sbx_ok"]),
    )
    assert response.status_code == 201, response.text
    final = await stack.wait_final(wid)
    assert final["status"] == "succeeded"
    assert final["provider_id"] == "sbx_ok"
    assert final["provider_reference"].startswith("sbx_ok-")
    assert final["failure_code"] is None
    ledger = await stack.ledger()
    assert _ops_for(ledger, wid) == [("sbx_decline", "rolled_back"), ("sbx_ok", "committed")]
    assert ledger["violations"] == []
    await _await_notification(stack, wid, "succeeded")


@pytest.mark.e2e
async def test_legacy_cohort_tries_only_the_first_provider(make_stack: StackFactory) -> None:
    stack = await make_stack(flags=flags_document(enabled=False))
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals",
        headers=stack.headers,
        json=withdrawal_body(wid, ["sbx_decline", "sbx_ok"]),
    )
    assert response.status_code == 201, response.text
    final = await stack.wait_final(wid)
    assert final["status"] == "failed"
    assert final["failure_code"] == "declined"
    assert final["provider_id"] == "sbx_decline"
    ledger = await stack.ledger()
    assert _ops_for(ledger, wid) == [("sbx_decline", "rolled_back")]
    assert ledger["violations"] == []
    await _await_notification(stack, wid, "failed")


async def _await_notification(stack: Stack, wid: str, status: str) -> None:
    async def notified() -> list[str]:
        return _notified(await stack.ledger(), wid)

    await wait_until(
        notified,
        done=lambda statuses: statuses == [status],
        timeout=10,
        interval=0.05,
        what=f"cascade-core to be notified that {wid} is {status}",
    )


@pytest.mark.e2e
async def test_cohort_is_pinned_at_creation(make_stack: StackFactory) -> None:
    """The stored decision answers later reads, whatever the flag says now."""
    stack = await make_stack(flags=flags_document(enabled=True, merchants=["m_pinned"]))
    cascade_id, legacy_id = new_id(), new_id()
    for wid, merchant in ((cascade_id, "m_pinned"), (legacy_id, "m_other")):
        response = await stack.client.post(
            "/v1/withdrawals",
            headers=stack.headers,
            json=withdrawal_body(wid, ["sbx_decline", "sbx_ok"], merchant=merchant),
        )
        assert response.status_code == 201
    assert (await stack.wait_final(cascade_id))["status"] == "succeeded"
    assert (await stack.wait_final(legacy_id))["status"] == "failed"
    async with stack.runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT withdrawal_id, cohort, routing_reason FROM withdrawals")
    decided = {r["withdrawal_id"]: (r["cohort"], r["routing_reason"]) for r in rows}
    assert decided == {cascade_id: ("cascade", "allow_list"), legacy_id: ("legacy", "not_targeted")}


@pytest.mark.e2e
async def test_metrics_and_health(make_stack: StackFactory) -> None:
    stack = await make_stack()
    health = await stack.client.get("/healthz")
    assert health.status_code == 200
    assert health.content == b'{"status":"ok"}'
    ready = await stack.client.get("/readyz")
    assert ready.json() == {"status": "ready", "database": True, "nats": True, "flags": True}
    wid = new_id()
    await stack.client.post(
        "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, ["sbx_sync_ok"])
    )
    await stack.wait_final(wid)
    text = (await stack.client.get("/metrics")).text
    for name in (
        "withdrawals_created_total",
        "withdrawals_total",
        "withdrawal_attempts_bucket",
        "withdrawal_duration_seconds_bucket",
        "routing_decisions_total",
        "task_time_in_state_seconds_bucket",
        "core_notifications_total",
    ):
        assert f"\n{name}{{" in text, name
    assert 'withdrawals_created_total{cohort="cascade"}' in text


@pytest.mark.e2e
async def test_trace_id_follows_the_withdrawal_through_nats(make_stack: StackFactory) -> None:
    """W3C trace context from the API request reaches every audited transition."""
    stack = await make_stack()
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals",
        headers={**stack.headers, "traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
        json=withdrawal_body(wid, ["sbx_decline", "sbx_ok"]),
    )
    assert response.status_code == 201
    await stack.wait_final(wid)
    async with stack.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT event, actor, trace_id FROM order_task_events WHERE withdrawal_id = $1"
            " AND actor NOT LIKE 'provider:%'",
            wid,
        )
    assert len(rows) >= 6
    assert {r["trace_id"] for r in rows} == {trace}, [dict(r) for r in rows]
