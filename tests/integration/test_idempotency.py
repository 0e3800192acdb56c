"""Idempotency-Key under concurrency, cohort pinning on replay, and the 503 path."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from flags.router import CohortRouter
from tests.conftest import Services, StackFactory, flags_document, new_id, withdrawal_body
from tests.faultkit import metric_sum
from tests.waiting import wait_until


@pytest.mark.parametrize("enabled", [False, True], ids=["legacy", "cascade"])
async def test_racing_identical_requests_execute_once(
    make_stack: StackFactory, enabled: bool
) -> None:
    stack = await make_stack(flags=flags_document(enabled=enabled))
    wid, key = new_id(), new_id("key")
    body = json.dumps(withdrawal_body(wid, ["sbx_silent", "sbx_ok"])).encode()
    headers = {**stack.headers, "Content-Type": "application/json", "Idempotency-Key": key}
    routed = await metric_sum(stack, "routing_decisions_total")
    responses = await asyncio.gather(
        *[stack.client.post("/v1/withdrawals", content=body, headers=headers) for _ in range(20)]
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 19 + [201]
    # Replays are not routing decisions: one new withdrawal, one decision counted.
    assert await metric_sum(stack, "routing_decisions_total") - routed == 1
    replays = [r for r in responses if r.status_code == 200]
    assert all(r.headers.get("Idempotent-Replayed") == "true" for r in replays)
    created = next(r for r in responses if r.status_code == 201)
    assert created.headers.get("Idempotent-Replayed") is None
    async with stack.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM withdrawals") == 1
    # One execution: the first provider gets exactly one freeze.
    await stack.wait_for(wid, lambda b: b["provider_reference"] is not None)
    ledger = await stack.ledger()
    freezes = [d for d in ledger["operation_details"].values() if d["withdrawal_id"] == wid]
    assert len(freezes) == 1


async def test_racing_different_bodies_under_one_key(make_stack: StackFactory) -> None:
    stack = await make_stack()
    key = new_id("key")
    headers = {**stack.headers, "Idempotency-Key": key}
    responses = await asyncio.gather(
        *[
            stack.client.post(
                "/v1/withdrawals", headers=headers, json=withdrawal_body(new_id(), ["sbx_silent"])
            )
            for _ in range(10)
        ]
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 9
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 409} == {
        "idempotency_conflict"
    }


async def test_replay_answers_the_same_after_the_flag_flipped(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = await make_stack(flags=flags_document(enabled=True))
    wid, key = new_id(), new_id("key")
    body = json.dumps(withdrawal_body(wid, ["sbx_decline", "sbx_ok"])).encode()
    headers = {**stack.headers, "Content-Type": "application/json", "Idempotency-Key": key}
    first = await stack.client.post("/v1/withdrawals", content=body, headers=headers)
    assert first.status_code == 201
    final = await stack.wait_final(wid)
    assert final["status"] == "succeeded"  # walked the cascade
    # Kill switch: the toggle goes off; only new withdrawals are affected.
    legacy_flags = tmp_path / "legacy.json"
    legacy_flags.write_text(json.dumps(flags_document(enabled=False)))
    router = CohortRouter(flags_file=legacy_flags)
    await asyncio.to_thread(router.start)
    stack.runtime.router = router
    replay = await stack.client.post("/v1/withdrawals", content=body, headers=headers)
    assert replay.status_code == 200
    assert replay.json() == final
    other = new_id()
    await stack.client.post(
        "/v1/withdrawals",
        headers=stack.headers,
        json=withdrawal_body(other, ["sbx_decline", "sbx_ok"]),
    )
    assert (await stack.wait_final(other))["status"] == "failed"  # legacy now
    async with stack.runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT withdrawal_id, cohort FROM withdrawals")
    cohorts = {row["withdrawal_id"]: row["cohort"] for row in rows}
    assert cohorts == {wid: "cascade", other: "legacy"}


async def test_nats_down_means_503_and_nothing_persisted(
    make_stack: StackFactory, services: Services
) -> None:
    stack = await make_stack()
    wid = new_id()
    services.nats.stop()
    try:
        await wait_until(
            lambda: not stack.runtime.nc.is_connected,
            timeout=5,
            interval=0.01,
            what="the gateway to see NATS gone",
        )
        response = await stack.client.post(
            "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, ["sbx_ok"])
        )
        assert response.status_code == 503
        rid = response.headers["x-request-id"]
        assert response.content == (
            b'{"error":{"code":"unavailable","message":"Service temporarily unavailable.",'
            b'"request_id":"' + rid.encode() + b'"}}'
        )
        async with stack.runtime.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM withdrawals") == 0
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        services.nats.restart()
    await wait_until(
        lambda: stack.runtime.nc.is_connected,
        timeout=15,
        what="the gateway to reconnect to NATS",
    )
    again = await stack.client.post(
        "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, ["sbx_ok"])
    )
    assert again.status_code == 201
    assert (await stack.wait_final(wid))["status"] == "succeeded"


async def test_unknown_route_and_method_carry_request_ids(make_stack: StackFactory) -> None:
    stack = await make_stack()
    async with httpx.AsyncClient(base_url=stack.url) as client:
        response = await client.get("/nope", headers={"X-Request-Id": "trace.me-1"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "trace.me-1"
    assert response.json()["error"]["request_id"] == "trace.me-1"
