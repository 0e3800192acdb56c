"""Provider health through the ops API: what ``GET /ops/providers`` shows, and an operator's
override of a breaker that the workers obey (a start after ``open`` is passed over or held,
audited; the half-open probe follows), with precise refusals of what it does not allow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.conftest import Stack, StackFactory, providers_document
from tests.faultkit import create_withdrawal, task_events, tasks_of
from tests.waiting import wait_until

SECOND = timedelta(seconds=1)
OPS = {"Authorization": "Bearer ops-token", "X-Operator": "oncall-kim"}


def _providers() -> dict[str, Any]:
    doc: dict[str, Any] = providers_document()
    doc["providers"]["sbx_ok"]["rate_limit"] = {"per_second": 50, "burst": 5}
    doc["providers"]["sbx_ok"]["max_in_flight"] = 8
    doc["providers"]["sbx_ok"]["hold_seconds"] = 120
    doc["providers"]["sbx_decline"]["breaker"] = None
    return doc


async def _override(stack: Stack, provider: str, **body: object) -> httpx.Response:
    return await stack.client.post(f"/ops/providers/{provider}/breaker", json=body, headers=OPS)


async def _worker_sees(stack: Stack, provider: str, state: str) -> None:
    """Until the in-process worker's copy of the breaker (refreshed every second) says so."""
    health = stack.runtime.engine.health
    await wait_until(
        lambda: (b := health.breaker(provider)) is not None and b.state == state,
        timeout=10,
        what=f"the worker to see {provider}'s breaker {state}",
    )


async def test_the_list_shows_every_provider_with_its_breaker_limits_and_work(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(providers=_providers())
    await _worker_sees(stack, "sbx_sync_ok", "closed")
    # A closed breaker counts whole seconds from when it closed (its row's creation here).
    created = stack.runtime.engine.health.breaker("sbx_sync_ok")
    assert created is not None
    await wait_until(
        lambda: datetime.now(UTC) >= created.changed_at.replace(microsecond=0) + SECOND,
        timeout=3,
        what="the second the breaker row was created in to end",
    )
    withdrawal_id = await create_withdrawal(stack, ["sbx_sync_ok"])
    await stack.wait_final(withdrawal_id)
    listed = await stack.client.get("/ops/providers", headers=OPS)
    assert listed.status_code == 200, listed.text
    providers = {p["provider_id"]: p for p in listed.json()["providers"]}
    assert set(providers) == set(stack.runtime.engine.configs)
    ok = providers["sbx_ok"]
    assert ok["state"] == "closed"
    assert ok["limits"] == {
        "rate_limit": {"per_second": 50.0, "burst": 5},
        "max_in_flight": 8,
        "hold_seconds": 120.0,
    }
    assert ok["breaker"] == {
        "failure_rate": 0.5,
        "min_calls": 20,
        "window_seconds": 60.0,
        "open_seconds": 30.0,
        "half_open_probes": 1,
    }
    assert (ok["in_flight"], ok["waiting"], ok["open_until"], ok["probe"]) == (0, 0, None, None)
    assert ok["window"]["seconds"] == 60.0
    declined = providers["sbx_decline"]
    assert (declined["state"], declined["breaker"], declined["window"]) == ("disabled", None, None)

    async def counted() -> dict[str, Any]:
        one = await stack.client.get("/ops/providers/sbx_sync_ok", headers=OPS)
        assert one.status_code == 200, one.text
        body: dict[str, Any] = one.json()
        return body

    # The worker adds its calls to the fleet's window at its next refresh.
    sync_ok = await wait_until(
        counted,
        done=lambda p: p["window"]["calls"] >= 1,
        timeout=10,
        what="the create call in sbx_sync_ok's window",
    )
    assert (sync_ok["window"]["technical"], sync_ok["window"]["failure_rate"]) == (0, 0.0)
    assert sync_ok["last_transition"]["changed_at"]


async def test_an_opened_breaker_makes_new_attempts_pass_over_then_hold_until_the_probe(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(providers=_providers())
    opened = await _override(stack, "sbx_ok", action="open", seconds=600, reason="PSP maintenance")
    assert opened.status_code == 200, opened.text
    view = opened.json()
    assert view["state"] == "open"
    assert view["open_until"] > view["last_transition"]["changed_at"]
    last = view["last_transition"]
    assert (last["cause"], last["operator"], last["reason"]) == (
        "operator",
        "ops:oncall-kim",
        "PSP maintenance",
    )
    await _worker_sees(stack, "sbx_ok", "open")

    passed = await create_withdrawal(stack, ["sbx_ok", "sbx_sync_ok"])
    body = await stack.wait_final(passed)
    assert (body["status"], body["provider_id"]) == ("succeeded", "sbx_sync_ok")
    first, _ = await tasks_of(stack, passed)
    events = [
        e for e in await task_events(stack, first["task_id"]) if e["event"].startswith("start")
    ]
    assert events[0]["event"] == "start.passed_over"
    assert (events[0]["details"]["provider_id"], events[0]["details"]["reason"]) == (
        "sbx_ok",
        "breaker_open",
    )

    # Its only provider open: the withdrawal holds; the breaker closed by hand lets it go.
    held = await create_withdrawal(stack, ["sbx_ok"])
    (task,) = await tasks_of(stack, held)

    async def hold_audited() -> list[dict[str, Any]]:
        return [e for e in await task_events(stack, task["task_id"]) if e["event"] == "start.held"]

    (hold,) = await wait_until(hold_audited, timeout=10, what=f"{held} to hold")
    assert hold["details"]["providers"][0]["reason"] == "breaker_open"
    shown = (await stack.client.get("/ops/providers/sbx_ok", headers=OPS)).json()
    assert shown["waiting"] == 1

    reopened = await _override(stack, "sbx_ok", action="open", seconds=1, reason="fixed early")
    assert reopened.status_code == 200, reopened.text
    # After a second it is half-open: the held withdrawal's timer fires as its start, which
    # is the one probe of the fleet; its success closes the breaker.
    body = await stack.wait_final(held, timeout=30)
    assert body["status"] == "succeeded"
    await _worker_sees(stack, "sbx_ok", "closed")
    probes = [e for e in await task_events(stack, task["task_id"]) if e["event"] == "start.probe"]
    assert len(probes) == 1


async def test_close_by_hand_restarts_the_window_and_the_withdrawals_held_for_it(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(providers=_providers())
    opened = await _override(stack, "sbx_sync_ok", action="open", seconds=600, reason="drill")
    assert opened.status_code == 200, opened.text
    await _worker_sees(stack, "sbx_sync_ok", "open")
    held = await create_withdrawal(stack, ["sbx_sync_ok"])
    (task,) = await tasks_of(stack, held)

    async def hold_audited() -> list[dict[str, Any]]:
        return [e for e in await task_events(stack, task["task_id"]) if e["event"] == "start.held"]

    await wait_until(hold_audited, timeout=10, what=f"{held} to hold")
    closed = await _override(stack, "sbx_sync_ok", action="close", reason="PSP confirmed the fix")
    assert closed.status_code == 200, closed.text
    view = closed.json()
    assert (view["state"], view["open_until"], view["window"]["calls"]) == ("closed", None, 0)
    assert view["window"]["since"] == view["last_transition"]["changed_at"]
    # Held until the breaker's open_until (10 minutes away): the close brings it forward.
    body = await stack.wait_final(held, timeout=20)
    assert (body["status"], body["provider_id"]) == ("succeeded", "sbx_sync_ok")


async def test_bad_overrides_get_precise_refusals_and_change_nothing(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(providers=_providers(), with_worker=False)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"action": "open", "reason": "x"}, 422, "open needs seconds"),
        ({"action": "open", "seconds": 0, "reason": "x"}, 422, "greater than 0"),
        ({"action": "open", "seconds": 10**9, "reason": "x"}, 422, "7 days"),
        ({"action": "close", "seconds": 5, "reason": "x"}, 422, "seconds applies to open only"),
        ({"action": "drain", "reason": "x"}, 422, "action"),
        ({"action": "close", "reason": "  "}, 422, "reason must not be empty"),
        ({"action": "close", "reason": "a\x00b"}, 422, "reason must not contain a NUL"),
        ({"action": "close"}, 422, "reason"),
        ({"action": "close", "reason": "x", "colour": "red"}, 422, "colour"),
        ({"action": "open", "seconds": "600", "reason": "x"}, 422, "seconds"),
    ]
    for body, status, words in cases:
        answer = await _override(stack, "sbx_ok", **body)
        assert answer.status_code == status, (body, answer.text)
        assert words in answer.json()["error"]["message"], (body, answer.text)
    malformed = await stack.client.post("/ops/providers/sbx_ok/breaker", content=b"{", headers=OPS)
    assert (malformed.status_code, malformed.json()["error"]["code"]) == (400, "malformed_json")
    no_operator = await stack.client.post(
        "/ops/providers/sbx_ok/breaker",
        json={"action": "close", "reason": "x"},
        headers={"Authorization": OPS["Authorization"]},
    )
    assert no_operator.status_code == 422
    assert "X-Operator" in no_operator.json()["error"]["message"]
    unknown = await _override(stack, "nope", action="close", reason="x")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")
    assert (await stack.client.get("/ops/providers/nope", headers=OPS)).status_code == 404
    no_breaker = await _override(stack, "sbx_decline", action="open", seconds=60, reason="x")
    assert (no_breaker.status_code, no_breaker.json()["error"]["code"]) == (409, "no_breaker")
    assert (await stack.client.get("/ops/providers")).status_code == 401
    assert (await stack.client.post("/ops/providers/sbx_ok/breaker", json={})).status_code == 401
    shown = (await stack.client.get("/ops/providers/sbx_ok", headers=OPS)).json()
    assert (shown["state"], shown["last_transition"]) == ("closed", None)


async def test_a_cause_left_behind_by_a_writer_of_the_previous_release_reads_as_unknown(
    make_stack: StackFactory,
) -> None:
    """A worker of the release before 0005 moves the breaker (its version) but not the cause:
    the operator's reason must not be shown for a transition the operator did not make."""
    stack = await make_stack(providers=_providers(), with_worker=False)
    opened = await _override(stack, "sbx_ok", action="open", seconds=60, reason="maintenance")
    assert opened.json()["last_transition"]["cause"] == "operator"
    async with stack.runtime.pool.acquire() as conn:
        # What the previous release's save_breaker writes for open → half-open.
        await conn.execute(
            "UPDATE provider_breakers SET state = 'half_open', open_until = NULL,"
            " changed_at = now(), version = version + 1 WHERE provider_id = 'sbx_ok'"
        )
    shown = (await stack.client.get("/ops/providers/sbx_ok", headers=OPS)).json()
    last = shown["last_transition"]
    assert (shown["state"], last["cause"], last["operator"], last["reason"]) == (
        "half_open",
        None,
        None,
        None,
    )
