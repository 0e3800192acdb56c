"""The legacy cohort: cascade-core's old single-shot executor, on the same foundations."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Stack, StackFactory, flags_document, new_id, withdrawal_body

LEGACY = flags_document(enabled=False)


async def _post(stack: Stack, providers: list[str]) -> tuple[str, dict[str, Any]]:
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, providers)
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return wid, body


async def _operations(stack: Stack, wid: str) -> list[tuple[str, str]]:
    ledger = await stack.ledger()
    assert ledger["violations"] == []
    return sorted(
        (d["provider_id"], d["state"])
        for d in ledger["operation_details"].values()
        if d["withdrawal_id"] == wid
    )


async def test_the_create_answer_decides_the_response(make_stack: StackFactory) -> None:
    stack = await make_stack(flags=LEGACY)
    _, paid = await _post(stack, ["sbx_sync_ok", "sbx_ok"])
    assert (paid["status"], paid["provider_id"]) == ("succeeded", "sbx_sync_ok")
    _, declined = await _post(stack, ["sbx_decline", "sbx_ok"])
    assert (declined["status"], declined["failure_code"]) == ("failed", "declined")
    _, accepted = await _post(stack, ["sbx_ok", "sbx_decline"])
    assert accepted["status"] == "processing"
    assert accepted["provider_reference"].startswith("sbx_ok-")  # created inside the request


async def test_never_a_second_provider(make_stack: StackFactory) -> None:
    stack = await make_stack(flags=LEGACY)
    wid, _ = await _post(stack, ["sbx_accept_fail", "sbx_ok"])
    final = await stack.wait_final(wid)
    assert (final["status"], final["provider_id"]) == ("failed", "sbx_accept_fail")
    assert await _operations(stack, wid) == [("sbx_accept_fail", "rolled_back")]
    async with stack.runtime.pool.acquire() as conn:
        providers = await conn.fetch(
            "SELECT t.provider_id FROM order_tasks t JOIN order_queues q USING (queue_id)"
            " WHERE q.withdrawal_id = $1",
            wid,
        )
    assert [r["provider_id"] for r in providers] == ["sbx_accept_fail"]


@pytest.mark.parametrize(
    ("outcome", "status", "ledger"),
    [
        ("created", "succeeded", "committed"),
        ("absent", "failed", "rolled_back"),
    ],
)
async def test_an_ambiguous_create_is_rechecked_not_failed(
    make_stack: StackFactory, outcome: str, status: str, ledger: str
) -> None:
    stack = await make_stack(flags=LEGACY)
    script = await stack.client.post(
        "/sandbox/providers/sbx_flaky/script", json={"outcomes": [outcome]}
    )
    assert script.status_code == 200
    wid, body = await _post(stack, ["sbx_flaky", "sbx_ok"])
    assert body["status"] == "processing"  # ambiguity is never answered as a failure
    final = await stack.wait_final(wid)
    assert final["status"] == status
    if status == "failed":
        assert final["failure_code"] == "provider_error"
    assert await _operations(stack, wid) == [("sbx_flaky", ledger)]


async def test_both_cohorts_share_the_ledger_and_its_invariants(make_stack: StackFactory) -> None:
    stack = await make_stack(flags=flags_document(enabled=True, merchants=["m_new"]))
    ids = []
    for merchant in ("m_new", "m_old"):
        for providers in (["sbx_decline", "sbx_sync_ok"], ["sbx_no_funds", "sbx_ok"]):
            wid = new_id()
            response = await stack.client.post(
                "/v1/withdrawals",
                headers=stack.headers,
                json=withdrawal_body(wid, providers, merchant=merchant),
            )
            assert response.status_code == 201
            ids.append((merchant, wid))
    finals = {wid: (await stack.wait_final(wid))["status"] for _, wid in ids}
    assert [finals[w] for m, w in ids if m == "m_new"] == ["succeeded", "succeeded"]
    assert [finals[w] for m, w in ids if m == "m_old"] == ["failed", "failed"]
    ledger = await stack.ledger()
    assert ledger["violations"] == []
    assert "frozen" not in ledger["operations"].values()
    notified = sorted((n["withdrawal_id"], n["status"]) for n in ledger["notifications"])
    assert notified == sorted((wid, finals[wid]) for _, wid in ids)
    text = (await stack.client.get("/metrics")).text
    assert 'withdrawals_total{cohort="legacy",outcome="failed"}' in text
    assert 'withdrawals_total{cohort="cascade",outcome="succeeded"}' in text


async def test_the_legacy_cohort_stays_single_shot_whatever_provider_health_says(
    make_stack: StackFactory,
) -> None:
    """The baseline is the system the cascade replaces: one create, its answer decides. No
    retry of a rate-limited decline at the provider, no breaker holding the request."""
    stack = await make_stack(flags=LEGACY)
    await stack.client.delete("/sandbox/providers/requests")
    _, limited = await _post(stack, ["sbx_rate_limited", "sbx_ok"])
    assert (limited["status"], limited["failure_code"]) == ("failed", "declined")
    counts = (await stack.client.get("/sandbox/providers/sbx_rate_limited/requests")).json()
    assert counts["by_kind"] == {"create": 1}
    # A breaker opened by hand for sbx_sync_ok does not stop a legacy create there.
    async with stack.runtime.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO provider_breakers (provider_id, state, changed_at, open_until)"
            " VALUES ('sbx_sync_ok', 'open', now(), now() + interval '10 minutes')"
            " ON CONFLICT (provider_id) DO UPDATE SET state = 'open',"
            " open_until = now() + interval '10 minutes', version = provider_breakers.version + 1"
        )
    await stack.runtime.engine.health.refresh(stack.runtime.pool)
    assert not stack.runtime.engine.health.closed("sbx_sync_ok")
    _, paid = await _post(stack, ["sbx_sync_ok"])
    assert (paid["status"], paid["provider_id"]) == ("succeeded", "sbx_sync_ok")
