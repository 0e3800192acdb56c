"""The reconciliation alerts' lifecycle through the ops API: list and filter, ack, resolve,
accept, and precise refusals of what the lifecycle does not allow."""

from __future__ import annotations

from typing import Any

import httpx

from orchestrator.reconciliation import Reconciler, ReconPolicy
from tests.conftest import Stack, StackFactory, new_id, withdrawal_body

OPS = {"Authorization": "Bearer ops-token", "X-Operator": "fin-anna"}


async def _with_alerts(stack: Stack, count: int) -> list[dict[str, Any]]:
    """``count`` notification alerts (cascade-core never acknowledged them), newest first."""
    wids = []
    for _ in range(count):
        wid = new_id()
        wids.append(wid)
        created = await stack.client.post(
            "/v1/withdrawals", json=withdrawal_body(wid, ["sbx_sync_ok"]), headers=stack.headers
        )
        assert created.status_code in (200, 201, 202), created.text
        await stack.wait_final(wid)
    async with stack.runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE notifications SET acked_at = NULL, created_at = now() - interval '1 hour',"
            " next_attempt_at = now() + interval '1 hour' WHERE withdrawal_id = ANY($1)",
            wids,
        )
    rt = stack.runtime
    policy = ReconPolicy(ledger_budget=0)
    assert (await Reconciler(rt.pool, rt.core, rt.engine.configs, policy).run_once()).ran
    listed = await stack.client.get("/ops/recon/alerts", headers=OPS)
    assert listed.status_code == 200, listed.text
    alerts: list[dict[str, Any]] = listed.json()["alerts"]
    assert len(alerts) == count
    return alerts


async def _act(stack: Stack, alert_id: object, action: str, **body: str) -> httpx.Response:
    return await stack.client.post(f"/ops/recon/alerts/{alert_id}/{action}", json=body, headers=OPS)


async def test_an_alert_is_acknowledged_then_resolved_with_a_reference(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    (alert,) = await _with_alerts(stack, 1)
    assert (alert["rule"], alert["state"], alert["severity"]) == ("notification", "open", "warning")
    acked = await _act(stack, alert["alert_id"], "ack")
    assert acked.status_code == 200, acked.text
    assert acked.json()["state"] == "acknowledged"
    refused = await _act(stack, alert["alert_id"], "resolve")
    assert refused.status_code == 422
    assert "reference" in refused.json()["error"]["message"]
    resolved = await _act(stack, alert["alert_id"], "resolve", reference="FIN-1234")
    assert resolved.status_code == 200, resolved.text
    body = resolved.json()
    assert (body["state"], body["resolution_reference"], body["operator"]) == (
        "resolved",
        "FIN-1234",
        "ops:fin-anna",
    )
    assert [(e["event"], e["to_state"], e["actor"]) for e in body["events"]] == [
        ("raised", "open", "recon"),
        ("ack", "acknowledged", "ops:fin-anna"),
        ("resolve", "resolved", "ops:fin-anna"),
    ]
    again = await _act(stack, alert["alert_id"], "ack")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "illegal_transition"


async def test_accept_needs_a_note_and_an_operator_and_is_final(make_stack: StackFactory) -> None:
    stack = await make_stack()
    first, second = await _with_alerts(stack, 2)
    no_operator = await stack.client.post(
        f"/ops/recon/alerts/{first['alert_id']}/accept",
        json={"note": "known"},
        headers={"Authorization": OPS["Authorization"]},
    )
    assert no_operator.status_code == 422
    assert "X-Operator" in no_operator.json()["error"]["message"]
    assert (await _act(stack, first["alert_id"], "accept")).status_code == 422
    accepted = await _act(stack, first["alert_id"], "accept", note="core replays it next day")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["acceptance_note"] == "core replays it next day"
    assert (await _act(stack, first["alert_id"], "resolve", reference="X")).status_code == 409
    listed = await stack.client.get(
        "/ops/recon/alerts", params={"state": "open", "rule": "notification"}, headers=OPS
    )
    assert [a["alert_id"] for a in listed.json()["alerts"]] == [second["alert_id"]]
    accepted_only = await stack.client.get(
        "/ops/recon/alerts", params={"state": "accepted"}, headers=OPS
    )
    assert [a["alert_id"] for a in accepted_only.json()["alerts"]] == [first["alert_id"]]


async def test_bad_requests_get_precise_errors(make_stack: StackFactory) -> None:
    stack = await make_stack()
    (alert,) = await _with_alerts(stack, 1)
    for params in ({"state": "closed"}, {"rule": "nope"}, {"limit": "0"}, {"limit": "x"}):
        answer = await stack.client.get("/ops/recon/alerts", params=params, headers=OPS)
        assert answer.status_code == 400, params
        assert answer.json()["error"]["code"] == "invalid_parameter"
    assert (await _act(stack, "999999", "ack")).status_code == 404
    assert (await _act(stack, "abc", "ack")).status_code == 404
    assert (await _act(stack, "\u0661", "ack")).status_code == 404  # an Arabic-Indic 1
    unknown_field = await _act(stack, alert["alert_id"], "ack", colour="red")
    assert unknown_field.status_code == 422
    malformed = await stack.client.post(
        f"/ops/recon/alerts/{alert['alert_id']}/ack", content=b"{", headers=OPS
    )
    assert malformed.status_code == 400
    unauthorized = await stack.client.get("/ops/recon/alerts")
    assert unauthorized.status_code == 401
