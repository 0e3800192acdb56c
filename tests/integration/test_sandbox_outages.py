"""Scripted provider outages and request counts, on sandboxes served over real HTTP.

Each sandbox is served by uvicorn on a port of its own; two of them on one schema stand for two
sandbox processes sharing the database. Most tests move the sandboxes' clock instead of waiting
for an outage to end; one waits for a real second to pass.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar

from sandbox.outages import CACHE_SECONDS
from sandbox.routes import Sandbox, SandboxConfig
from sandbox.scenarios import Scenario, load_scenario
from tests.conftest import sandbox_schema
from tests.unit.test_sandbox_providers import PROVIDERS, Receiver, receiver_app, serve
from tests.waiting import wait_until

FAST = 0.05
ORDER = {
    "amount": "10.00",
    "currency": "EUR",
    "destination": {"type": "iban", "account": "DE89370400440532013000"},
}


class Clock:
    """Wall-clock seconds plus an offset a test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Served:
    sandbox: Sandbox
    http: httpx.AsyncClient

    async def create(self, provider: str, order_id: str | None = None) -> httpx.Response:
        order_id = order_id or f"cg-{uuid.uuid4().hex}"
        return await self.http.post(
            f"/sandbox/providers/{provider}/orders",
            json={"order_id": order_id, **ORDER},
            headers={"Idempotency-Key": order_id},
        )

    async def outage(self, provider: str, **body: Any) -> httpx.Response:
        return await self.http.put(f"/sandbox/providers/{provider}/outage", json=body)

    async def counts(self, provider: str) -> dict[str, Any]:
        answer = await self.http.get(f"/sandbox/providers/{provider}/requests")
        assert answer.status_code == 200, answer.text
        counts: dict[str, Any] = answer.json()
        return counts


@contextlib.asynccontextmanager
async def served(
    dsn: str,
    schema: str,
    receiver_url: str,
    *,
    clock: Clock | None = None,
    scenario: Scenario | None = None,
) -> AsyncIterator[Served]:
    """One sandbox on ``schema``, served over HTTP on a port of its own."""
    sandbox = Sandbox(
        SandboxConfig(
            gateway_url=receiver_url,
            database_url=dsn,
            schema=schema,
            providers=PROVIDERS,
            webhook_delay_seconds=FAST,
            fail_delay_seconds=FAST,
            webhook_backoff_seconds=0.01,
            scenario=scenario,
            clock=clock or time.time,
        )
    )
    await sandbox.start()
    try:
        async with (
            serve(Litestar(route_handlers=[sandbox.router], logging_config=None)) as url,
            httpx.AsyncClient(base_url=url, timeout=5.0) as http,
        ):
            yield Served(sandbox, http)
    finally:
        await sandbox.close()


@pytest.fixture
async def receiver_url() -> AsyncIterator[str]:
    async with serve(receiver_app(Receiver())) as url:
        yield url


@pytest.fixture
async def one(sandbox_dsn: str, receiver_url: str) -> AsyncIterator[Served]:
    async with served(sandbox_dsn, sandbox_schema(), receiver_url) as s:
        yield s


async def test_an_outage_answers_every_request_503_until_it_ends_by_itself(
    sandbox_dsn: str, receiver_url: str
) -> None:
    clock = Clock()
    async with served(sandbox_dsn, sandbox_schema(), receiver_url, clock=clock) as s:
        before = await s.create("sbx_a")
        assert before.status_code == 201, before.text
        order_id = before.json()["order_id"]

        put = await s.outage("sbx_a", error_ratio=1.0, duration_seconds=60)
        assert put.status_code == 200, put.text
        outage = put.json()["outage"]
        assert outage["active"] is True
        assert outage["remaining_seconds"] == 60
        assert (outage["error_ratio"], outage["timeout_ratio"]) == (1.0, 0.0)

        refused_id = f"cg-{uuid.uuid4().hex}"
        answers = [
            await s.create("sbx_a", refused_id),
            await s.http.get(f"/sandbox/providers/sbx_a/orders/{order_id}"),
            await s.http.post(f"/sandbox/providers/sbx_a/orders/{order_id}/cancel"),
        ]
        assert [a.status_code for a in answers] == [503, 503, 503]
        assert answers[0].json()["error"]["code"] == "unavailable"
        # The other provider of the pair is untouched.
        assert (await s.create("sbx_b")).status_code == 201

        shown = (await s.http.get("/sandbox/providers/sbx_a/outage")).json()
        assert shown["outage"]["ends_at"] == outage["ends_at"]
        assert shown["scheduled"] == []

        clock.offset = 60.5  # past the end; nobody deleted it
        assert (await s.http.get("/sandbox/providers/sbx_a/outage")).json()["outage"] is None
        # The refused create reached nothing: the order is absent, and a retry creates it.
        absent = await s.http.get(f"/sandbox/providers/sbx_a/orders/{refused_id}")
        assert absent.status_code == 404
        assert (await s.create("sbx_a", refused_id)).status_code == 201
        counts = await s.counts("sbx_a")
        assert counts["by_kind_and_answer"] == {
            "create": {"ok": 2, "503": 1},
            "status": {"503": 1, "404": 1},
            "cancel": {"503": 1},
        }


async def test_an_outage_ends_by_itself_on_the_real_clock(one: Served) -> None:
    started = time.monotonic()
    assert (await one.outage("sbx_b", error_ratio=1.0, duration_seconds=1)).status_code == 200
    assert (await one.create("sbx_b")).status_code == 503
    await wait_until(
        lambda: one.create("sbx_b"),
        done=lambda answer: answer.status_code == 201,
        timeout=5,
        what="sbx_b to accept creates again",
        interval=0.05,
    )
    assert time.monotonic() - started >= 1.0


async def test_delete_ends_an_outage_early(one: Served) -> None:
    await one.outage("sbx_a", error_ratio=1.0, duration_seconds=600)
    assert (await one.create("sbx_a")).status_code == 503
    ended = await one.http.delete("/sandbox/providers/sbx_a/outage")
    assert ended.status_code == 200
    assert ended.json() == {"provider_id": "sbx_a", "ended": 1}
    # This process forgets its cached copy at once: no wait.
    assert (await one.create("sbx_a")).status_code == 201
    again = await one.http.delete("/sandbox/providers/sbx_a/outage")
    assert again.json()["ended"] == 0


async def test_a_timeout_outage_holds_the_request_past_the_read_timeout(one: Served) -> None:
    put = await one.outage("sbx_ok", timeout_ratio=1.0, timeout_seconds=0.5, duration_seconds=60)
    assert put.json()["outage"]["timeout_seconds"] == 0.5
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up first
        await one.http.post(
            "/sandbox/providers/sbx_ok/orders",
            json={"order_id": "cg-held", **ORDER},
            headers={"Idempotency-Key": "cg-held"},
            timeout=0.2,
        )
    assert time.monotonic() - started >= 0.2
    held = await one.http.get("/sandbox/providers/sbx_ok/orders/cg-x", timeout=5.0)
    assert held.status_code == 504
    assert time.monotonic() - started >= 0.7
    await one.http.delete("/sandbox/providers/sbx_ok/outage")
    counts = await wait_until(
        lambda: one.counts("sbx_ok"),
        done=lambda c: c["by_answer"].get("timeout") == 2,
        timeout=5,
        what="both held requests to be counted as timeouts",
    )
    assert counts["by_kind"] == {"create": 1, "status": 1}


async def test_an_outage_share_lets_the_rest_through(one: Served) -> None:
    await one.outage("sbx_sync_ok", error_ratio=0.5, duration_seconds=60)
    answers = [(await one.create("sbx_sync_ok")).status_code for _ in range(60)]
    assert set(answers) == {201, 503}
    assert 15 <= answers.count(503) <= 45
    counts = await one.counts("sbx_sync_ok")
    assert counts["by_answer"] == {"ok": answers.count(201), "503": answers.count(503)}


async def test_two_sandbox_processes_on_one_schema_share_outages_and_counts(
    sandbox_dsn: str, receiver_url: str
) -> None:
    schema = sandbox_schema()
    async with (
        served(sandbox_dsn, schema, receiver_url) as a,
        served(sandbox_dsn, schema, receiver_url) as b,
    ):
        # b reads the outage rows before the PUT, so its copy is stale until it reads again.
        assert (await b.create("sbx_a")).status_code == 201
        await a.outage("sbx_a", error_ratio=1.0, duration_seconds=600)
        assert (await a.create("sbx_a")).status_code == 503
        seen = time.monotonic()
        await wait_until(
            lambda: b.create("sbx_a"),
            done=lambda answer: answer.status_code == 503,
            timeout=5,
            what="the other sandbox to see the outage",
            interval=0.05,
        )
        assert time.monotonic() - seen <= CACHE_SECONDS + 1.0
        shown = (await b.http.get("/sandbox/providers/sbx_a/outage")).json()
        assert shown["outage"]["source"] == "api"

        assert (await b.http.delete("/sandbox/providers/sbx_a/outage")).json()["ended"] == 1
        await wait_until(
            lambda: a.create("sbx_a"),
            done=lambda answer: answer.status_code == 201,
            timeout=5,
            what="the first sandbox to see the outage ended",
            interval=0.05,
        )
        # Every request either process answered is in one count, readable from both.
        from_a, from_b = await a.counts("sbx_a"), await b.counts("sbx_a")
        assert from_a == from_b
        creates = from_a["by_kind_and_answer"]["create"]
        assert creates["ok"] >= 2
        assert creates["503"] >= 2
        assert from_a["total"] == creates["ok"] + creates["503"]


async def test_request_counts_by_kind_and_answer_and_reset(one: Served) -> None:
    created = [await one.create("sbx_ok") for _ in range(3)]
    assert [c.status_code for c in created] == [201] * 3
    order_id = created[0].json()["order_id"]
    assert (await one.create("sbx_ok", order_id)).status_code == 200  # a replay
    assert (await one.http.get(f"/sandbox/providers/sbx_ok/orders/{order_id}")).is_success
    assert (await one.http.get("/sandbox/providers/sbx_ok/orders/cg-none")).status_code == 404
    cancelled = await one.http.post(
        f"/sandbox/providers/sbx_ok/orders/{created[1].json()['order_id']}/cancel"
    )
    assert cancelled.status_code in (200, 409)  # 409 if its webhook already settled it
    assert (await one.create("sbx_decline")).status_code == 422
    # Not provider protocol requests: not counted.
    await one.http.get("/sandbox/providers/sbx_ok/outage")
    await one.http.get("/sandbox/providers/nope/orders/x")

    counts = await one.counts("sbx_ok")
    assert counts["total"] == 7
    assert counts["by_kind"] == {"create": 4, "status": 2, "cancel": 1}
    assert counts["by_answer"]["ok"] >= 5
    assert counts["by_kind_and_answer"]["status"] == {"ok": 1, "404": 1}
    everyone = (await one.http.get("/sandbox/providers/requests")).json()["providers"]
    assert set(everyone) == {"sbx_ok", "sbx_decline"}
    assert everyone["sbx_decline"]["by_kind_and_answer"] == {"create": {"422": 1}}
    assert {"provider_id": "sbx_ok", **everyone["sbx_ok"]} == counts

    assert (await one.http.delete("/sandbox/providers/sbx_decline/requests")).status_code == 200
    assert (await one.counts("sbx_decline"))["total"] == 0
    assert (await one.counts("sbx_ok"))["total"] == 7
    assert (await one.http.delete("/sandbox/providers/requests")).json() == {"reset": True}
    assert (await one.http.get("/sandbox/providers/requests")).json() == {"providers": {}}
    assert await one.counts("sbx_ok") == {
        "provider_id": "sbx_ok",
        "total": 0,
        "by_kind": {},
        "by_answer": {},
        "by_kind_and_answer": {},
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "request body is not valid JSON"),
        (b"[]", "Expected `object`, got `array`"),
        (b'{"error_ratio": 1}', "Object missing required field `duration_seconds`"),
        (b'{"duration_seconds": 60, "error_rate": 1}', "unknown field `error_rate`"),
        (b'{"duration_seconds": "60", "error_ratio": 1}', "Expected `float`, got `str`"),
        (b'{"duration_seconds": 60}', "an outage needs error_ratio or timeout_ratio above 0"),
        (b'{"duration_seconds": 60, "error_ratio": 1.5}', "error_ratio must be within 0..1"),
        (b'{"duration_seconds": 60, "timeout_ratio": -0.1}', "timeout_ratio must be within 0..1"),
        (
            b'{"duration_seconds": 60, "error_ratio": 0.7, "timeout_ratio": 0.4}',
            "error_ratio + timeout_ratio must be at most 1, got 1.1",
        ),
        (b'{"duration_seconds": 0, "error_ratio": 1}', "duration_seconds must be above 0"),
        (b'{"duration_seconds": 86401, "error_ratio": 1}', "at most 86400"),
        (
            b'{"duration_seconds": 1e999, "error_ratio": 1}',
            "out of range - at `$.duration_seconds`",
        ),
        (
            b'{"duration_seconds": 60, "timeout_ratio": 1, "timeout_seconds": 0}',
            "timeout_seconds must be above 0 and at most 600",
        ),
    ],
)
async def test_a_bad_outage_body_is_400_with_what_is_wrong(
    one: Served, body: bytes, message: str
) -> None:
    answer = await one.http.put(
        "/sandbox/providers/sbx_a/outage",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
    assert (await one.http.get("/sandbox/providers/sbx_a/outage")).json()["outage"] is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/sandbox/providers/nope/outage"),
        ("GET", "/sandbox/providers/nope/outage"),
        ("DELETE", "/sandbox/providers/nope/outage"),
        ("GET", "/sandbox/providers/nope/requests"),
        ("DELETE", "/sandbox/providers/nope/requests"),
    ],
)
async def test_an_unknown_provider_is_404(one: Served, method: str, path: str) -> None:
    body = {"error_ratio": 1, "duration_seconds": 1} if method == "PUT" else None
    answer = await one.http.request(method, path, json=body)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "unknown_provider"


def _scenario(outages: list[dict[str, Any]]) -> Scenario:
    return load_scenario(
        msgspec.json.encode(
            {
                "name": f"outage-{uuid.uuid4().hex[:8]}",
                "providers": {"fast": {"approval_rate": 1.0}},
                "withdrawals": {"count": 1, "amount": {"min": "1.00", "max": "2.00"}},
                "outages": outages,
            }
        )
    )


async def test_scenario_outages_are_scheduled_once_per_schema(
    sandbox_dsn: str, receiver_url: str
) -> None:
    scenario = _scenario(
        [
            {"provider": "sbx_a", "duration_seconds": 60, "error_ratio": 1.0},
            {
                "provider": "sbx_scn_fast",
                "start_after_seconds": 30,
                "duration_seconds": 10,
                "error_ratio": 1.0,
            },
        ]
    )
    schema, clock = sandbox_schema(), Clock()
    async with served(sandbox_dsn, schema, receiver_url, clock=clock, scenario=scenario) as a:
        assert (await a.create("sbx_a")).status_code == 503
        assert (await a.create("sbx_scn_fast")).status_code == 201
        later = (await a.http.get("/sandbox/providers/sbx_scn_fast/outage")).json()
        assert later["outage"] is None
        assert [o["source"] for o in later["scheduled"]] == [f"scenario:{scenario.name}"]
        assert later["scheduled"][0]["remaining_seconds"] == 10

        clock.offset = 20.0
        # A second process with the same scenario keeps the first start's times.
        async with served(sandbox_dsn, schema, receiver_url, clock=clock, scenario=scenario) as b:
            listed = (await b.http.get("/sandbox/providers/outages")).json()["outages"]
            assert len(listed) == 2
            clock.offset = 35.0
            await wait_until(
                lambda: b.create("sbx_scn_fast"),
                done=lambda answer: answer.status_code == 503,
                timeout=5,
                what="the scenario's second outage to start",
                interval=0.05,
            )
            clock.offset = 61.0
            assert (await b.create("sbx_a")).status_code == 201
            assert (await b.create("sbx_scn_fast")).status_code == 201


def test_a_scenario_outage_of_a_provider_the_sandbox_does_not_serve_is_refused() -> None:
    scenario = _scenario([{"provider": "psp_real", "duration_seconds": 5, "error_ratio": 1}])
    with pytest.raises(ValueError, match="scenario outage of psp_real: no such sandbox provider"):
        Sandbox(
            SandboxConfig(
                gateway_url="http://127.0.0.1:9",
                database_url="postgresql://unused",
                providers=PROVIDERS,
                scenario=scenario,
            )
        )


async def test_sbx_a_and_sbx_b_behave_like_sbx_ok(sandbox_dsn: str) -> None:
    receiver = Receiver()
    async with (
        serve(receiver_app(receiver)) as url,
        served(sandbox_dsn, sandbox_schema(), url) as s,
    ):
        created = {p: await s.create(p) for p in ("sbx_a", "sbx_b")}
        for provider, answer in created.items():
            assert answer.status_code == 201
            assert answer.json()["status"] == "pending"
            assert answer.json()["reference"].startswith(f"{provider}-")
        await wait_until(
            lambda: len(receiver.deliveries),
            done=lambda n: n == 2,
            timeout=5,
            what="both success webhooks",
        )
        delivered = {(d.provider_id, d.body.status, d.verified) for d in receiver.deliveries}
        assert delivered == {("sbx_a", "succeeded", True), ("sbx_b", "succeeded", True)}
        order_id = created["sbx_a"].json()["order_id"]
        cancel = await s.http.post(f"/sandbox/providers/sbx_a/orders/{order_id}/cancel")
        assert cancel.status_code == 409  # cancellable, but already succeeded
