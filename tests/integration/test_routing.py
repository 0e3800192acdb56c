"""Cohort routing on the real stack, and the router's behaviour when Unleash comes and goes.

The router tests poll a small stand-in for Unleash's client endpoint (``/api/client/features``
with ETags), so that the server can be absent at start, appear, change and vanish on cue; the
real ``unleash-server`` is exercised in ``tests/e2e/test_unleash_live.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from UnleashClient.cache import FileCache
from UnleashClient.clients.unleash_client import UnleashClient
from UnleashClient.utils import InstanceAllowType

from devstack.embedded import free_port
from flags.router import TOGGLE, CohortRouter
from gateway.report import cohort_report
from gateway.report_command import run_report
from tests.conftest import Stack, StackFactory, flags_document, new_id, withdrawal_body
from tests.waiting import wait_until_sync

OPS = {"Authorization": "Bearer ops-token"}


# --- a stand-in for Unleash's client API ----------------------------------------------------


class _StubUnleash:
    """Serves a features document with ETags on a fixed port; start/stop at will."""

    def __init__(self, port: int, document: dict[str, Any]) -> None:
        self.port = port
        self.document = document
        self.fetches = 0
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/api/client/features":
                    self.send_error(404)
                    return
                if self.headers.get("Authorization") != "client-token":
                    self.send_error(401)
                    return
                stub.fetches += 1
                body = json.dumps(stub.document).encode()
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                if self.headers.get("If-None-Match") == etag:
                    # As unleash-server does: a 304 carries no headers at all, not even ETag.
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", etag)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def stub_port() -> int:
    return free_port()


@pytest.fixture
def live_router(tmp_path: Path, stub_port: int) -> Iterator[CohortRouter]:
    bootstrap = tmp_path / "flags.json"
    bootstrap.write_text(json.dumps(flags_document(enabled=True, merchants=["m_boot"])))
    router = CohortRouter(
        flags_file=bootstrap,
        unleash_url=f"http://127.0.0.1:{stub_port}/api",
        unleash_token="client-token",
        refresh_interval=1,
        request_timeout=1,
        first_fetch_wait=3,
    )
    yield router
    router.close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]


def test_unleash_unreachable_at_start_then_live_then_unreachable_mid_run(
    live_router: CohortRouter, stub_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    router = live_router
    # Unreachable at start: ready at once from the bootstrap file, one warning line.
    router.start()
    assert router.ready
    assert router.source == "bootstrap"
    booted = router.decide("m_boot")
    assert (booted.cohort, booted.reason) == ("cascade", "allow_list")
    assert booted.flag_state["source"] == "bootstrap"
    wait_until_sync(
        lambda: router.describe()["failed_polls"] >= 3, timeout=10, what="three failed polls"
    )
    assert _warnings(caplog) == [
        f"cascade.flags: Unleash at http://127.0.0.1:{stub_port}/api unreachable "
        "(connection refused); routing from FLAGS_FILE (bootstrap) until it answers"
    ]

    # The server appears: its definition, not the bootstrap file's, decides and explains.
    stub = _StubUnleash(stub_port, flags_document(enabled=True, merchants=["m_live"]))
    stub.start()
    try:
        wait_until_sync(
            lambda: router.source == "server", timeout=5, what="the first successful poll"
        )
        live = router.decide("m_live")
        assert (live.cohort, live.reason) == ("cascade", "allow_list")
        assert live.flag_state["source"] == "server"
        assert router.decide("m_boot").reason == "not_targeted"

        # A release manager flips the kill switch: seen on the next poll.
        stub.document = flags_document(enabled=False, merchants=["m_live"])
        wait_until_sync(
            lambda: router.decide("m_live").reason == "disabled", timeout=5, what="the kill switch"
        )
        fetches = stub.fetches
        wait_until_sync(
            lambda: stub.fetches >= fetches + 2, timeout=5, what="two more polls (304s)"
        )
        # mypy still holds router.source to the "bootstrap" asserted above: it cannot know that
        # the router's poller thread has changed the property since.
        assert router.source == "server"  # type: ignore[comparison-overlap]
    finally:
        stub.stop()

    # Unreachable mid-run: the last known state (disabled) keeps serving, from the backup.
    wait_until_sync(
        lambda: router.source == "backup", timeout=5, what="the router to notice the outage"
    )
    wait_until_sync(
        lambda: router.describe()["failed_polls"] >= 3, timeout=10, what="three failed polls"
    )
    kept = router.decide("m_live")
    assert (kept.cohort, kept.reason) == ("legacy", "disabled")
    assert kept.flag_state["source"] == "backup"
    messages = _warnings(caplog)
    assert len(messages) == 3, messages
    assert "answers again" in messages[1]
    assert messages[2].endswith(
        "routing from the last flags it sent (client backup) until it answers"
    )
    # Never a traceback, never the client's or the scheduler's per-poll lines.
    assert all(r.exc_info is None for r in caplog.records)
    assert not [r for r in caplog.records if r.name.startswith(("UnleashClient", "apscheduler"))]


def test_first_poll_waits_for_the_server_and_nothing_loaded_means_fallback(
    stub_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    # No bootstrap and no server: ready (every withdrawal legacy, reason fallback), one line.
    router = CohortRouter(
        flags_file=None,
        unleash_url=f"http://127.0.0.1:{stub_port}/api",
        unleash_token="client-token",
        refresh_interval=1,
        request_timeout=1,
    )
    try:
        router.start()
        assert router.ready
        decision = router.decide("m_a")
        assert (decision.cohort, decision.reason) == ("legacy", "fallback")
        assert len(_warnings(caplog)) == 1
        assert "every new withdrawal goes legacy" in _warnings(caplog)[0]
    finally:
        router.close()
    # With the server up, start() returns with the server's flags already loaded.
    stub = _StubUnleash(stub_port, flags_document(enabled=True, merchants=["m_a"]))
    stub.start()
    router = CohortRouter(
        flags_file=None,
        unleash_url=f"http://127.0.0.1:{stub_port}/api",
        unleash_token="client-token",
        refresh_interval=1,
    )
    try:
        router.start()
        assert router.ready
        assert router.source == "server"
        assert router.decide("m_a").reason == "allow_list"
    finally:
        router.close()
        stub.stop()


# --- through the gateway ----------------------------------------------------------------------


def _reference(document: dict[str, Any]) -> UnleashClient:
    cache = FileCache("reference", directory=tempfile.mkdtemp())
    cache.bootstrap_from_dict(document)
    client = UnleashClient(
        url="http://127.0.0.1:1/unused",
        app_name="reference",
        disable_metrics=True,
        disable_registration=True,
        cache=cache,
        multiple_instance_mode=InstanceAllowType.SILENTLY_ALLOW,
    )
    client.initialize_client(fetch_toggles=False)
    return client


async def _create(stack: Stack, merchant: str, providers: list[str]) -> str:
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals",
        headers=stack.headers,
        json=withdrawal_body(wid, providers, merchant=merchant),
    )
    assert response.status_code == 201, response.text
    return wid


async def _stored(stack: Stack, wid: str) -> dict[str, Any]:
    row = await stack.runtime.pool.fetchrow(
        "SELECT cohort, routing_reason, flag_state FROM withdrawals WHERE withdrawal_id = $1", wid
    )
    assert row is not None
    return dict(row)


async def test_the_decision_is_stored_with_the_withdrawal(make_stack: StackFactory) -> None:
    listed = new_id("m")
    stack = await make_stack(flags=flags_document(enabled=True, merchants=[listed]))
    cascade = await _stored(stack, await _create(stack, listed, ["sbx_ok"]))
    assert (cascade["cohort"], cascade["routing_reason"]) == ("cascade", "allow_list")
    assert cascade["flag_state"]["source"] == "bootstrap"
    assert cascade["flag_state"]["strategies"] == [
        {"name": "default", "kind": "allow_list", "merchants": 1}
    ]
    legacy = await _stored(stack, await _create(stack, new_id("m"), ["sbx_ok"]))
    assert (legacy["cohort"], legacy["routing_reason"]) == ("legacy", "not_targeted")
    metrics = (await stack.client.get("/metrics")).text
    assert 'routing_decisions_total{cohort="cascade",reason="allow_list"}' in metrics
    assert 'routing_decisions_total{cohort="legacy",reason="not_targeted"}' in metrics


async def test_disabled_toggle_is_a_kill_switch(make_stack: StackFactory) -> None:
    listed = new_id("m")
    stack = await make_stack(flags=flags_document(enabled=False, merchants=[listed]))
    for merchant in (listed, new_id("m")):
        stored = await _stored(stack, await _create(stack, merchant, ["sbx_sync_ok"]))
        assert (stored["cohort"], stored["routing_reason"]) == ("legacy", "disabled")


async def test_sticky_rollout_through_the_gateway_and_its_sample_ratio(
    make_stack: StackFactory,
) -> None:
    document = flags_document(enabled=True, rollout=50)
    stack = await make_stack(flags=document)
    reference = _reference(document)
    try:
        merchants = [new_id("m") for _ in range(24)]
        expected = {
            m: reference.is_enabled(TOGGLE, {"properties": {"merchantId": m}}) for m in merchants
        }
    finally:
        reference.destroy()
    for merchant in merchants:
        # Two withdrawals per merchant: the assignment is sticky.
        for _ in range(2):
            stored = await _stored(stack, await _create(stack, merchant, ["sbx_sync_ok"]))
            assert (stored["cohort"] == "cascade") == expected[merchant], merchant
            assert stored["routing_reason"] == ("rollout" if expected[merchant] else "not_targeted")
    async with stack.runtime.pool.acquire() as conn:
        report = await cohort_report(conn)
    cascade_merchants = sum(expected.values())
    assert report["comparison"]["design"] == "experiment"
    srm = report["sample_ratio"]
    assert srm["applicable"]
    assert srm["unit"] == "merchant"
    assert srm["rollout_percent"] == 50
    assert srm["observed"] == {
        "legacy": len(merchants) - cascade_merchants,
        "cascade": cascade_merchants,
    }
    assert report["cohorts"]["cascade"]["created"] == 2 * cascade_merchants


async def test_cohort_report_and_the_ops_endpoint_agree(
    make_stack: StackFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = new_id("m")
    other = new_id("m")
    stack = await make_stack(flags=flags_document(enabled=True, merchants=[listed]))
    created = [
        await _create(stack, listed, ["sbx_decline", "sbx_ok"]),
        await _create(stack, listed, ["sbx_ok"]),
        await _create(stack, other, ["sbx_sync_ok"]),
        await _create(stack, other, ["sbx_decline", "sbx_ok"]),
    ]
    for wid in created:
        await stack.wait_final(wid)
    async with stack.runtime.pool.acquire() as conn:
        report = await cohort_report(conn)
    cascade, legacy = report["cohorts"]["cascade"], report["cohorts"]["legacy"]
    assert (cascade["created"], cascade["succeeded"], cascade["processing"]) == (2, 2, 0)
    assert (legacy["created"], legacy["succeeded"], legacy["failed"]) == (2, 1, 1)
    assert cascade["success_rate"] == 1.0
    assert legacy["success_rate"] == 0.5
    # The cascade walked past the decline once: 3 attempts over 2 withdrawals.
    assert cascade["attempts_per_withdrawal"] == 1.5
    assert cascade["time_to_final_seconds"]["p50"] > 0
    assert cascade["routing_reasons"] == {"allow_list": 2}
    assert report["comparison"]["design"] == "observational"
    assert report["comparison"]["verdict"] == "insufficient evidence"
    assert "allow-list" in report["sample_ratio"]["reason"]
    assert {(m["merchant_id"], m["cohort"]) for m in report["merchants"]} == {
        (listed, "cascade"),
        (other, "legacy"),
    }

    response = await stack.client.get("/ops/cohorts", headers=OPS)
    assert response.status_code == 200, response.text
    served = response.json()
    served.pop("generated_at")
    report.pop("generated_at")
    assert served == json.loads(json.dumps(report))

    one = (await stack.client.get("/ops/cohorts", headers=OPS, params={"merchant": other})).json()
    assert one["cohorts"]["cascade"]["created"] == 0
    assert one["cohorts"]["legacy"]["created"] == 2
    future = (
        await stack.client.get(
            "/ops/cohorts", headers=OPS, params={"since": "2999-01-01T00:00:00+00:00"}
        )
    ).json()
    assert future["cohorts"]["legacy"]["created"] == 0
    denied = await stack.client.get("/ops/cohorts")
    assert denied.status_code == 401
    bad = await stack.client.get("/ops/cohorts", headers=OPS, params={"since": "yesterday"})
    assert bad.status_code == 400
    assert "since" in bad.json()["error"]["message"]
    nul = await stack.client.get("/ops/cohorts", headers=OPS, params={"merchant": "m\x00"})
    assert nul.status_code == 400, nul.text
    assert nul.json()["error"] == {
        "code": "invalid_parameter",
        "message": "merchant 'm\\x00' must not contain a NUL character",
    }

    # The CLI prints the same numbers: as JSON, and as a table.
    assert (
        await run_report(stack.settings, as_json=True, since=None, until=None, merchant=None) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["cohorts"]["cascade"]["created"] == 2
    assert (
        await run_report(stack.settings, as_json=False, since=None, until=None, merchant=None) == 0
    )
    table = capsys.readouterr().out
    assert "Design: observational" in table
    assert "Verdict: insufficient evidence" in table
    assert listed[:20] in table
    assert (
        await run_report(
            stack.settings, as_json=False, since="2026-01-01T00:00", until=None, merchant=None
        )
        == 2
    )
    assert "needs a time zone" in capsys.readouterr().err

    # A date alone is midnight UTC, on the CLI and the ops API alike (docs/helm.md's example).
    assert (
        await run_report(
            stack.settings, as_json=True, since="2026-01-01", until=None, merchant=None
        )
        == 0
    )
    dated = json.loads(capsys.readouterr().out)
    assert dated["cohorts"]["cascade"]["created"] == 2
    assert dated["filters"]["since"] == "2026-01-01"
    by_date = await stack.client.get(
        "/ops/cohorts", headers=OPS, params={"since": "2026-01-01", "until": "2999-01-01"}
    )
    assert by_date.status_code == 200, by_date.text
    assert by_date.json()["cohorts"]["cascade"]["created"] == 2
    empty = await stack.client.get("/ops/cohorts", headers=OPS, params={"until": "2026-01-01"})
    assert empty.status_code == 200, empty.text
    assert empty.json()["cohorts"]["cascade"]["created"] == 0


async def test_ops_cohorts_on_an_empty_record(make_stack: StackFactory) -> None:
    stack = await make_stack(flags=flags_document(enabled=True))
    async with httpx.AsyncClient(base_url=stack.url) as client:
        body = (await client.get("/ops/cohorts", headers=OPS)).json()
    for name in ("legacy", "cascade"):
        cohort = body["cohorts"][name]
        assert {
            k: cohort[k] for k in ("created", "succeeded", "failed", "cancelled", "processing")
        } == {
            "created": 0,
            "succeeded": 0,
            "failed": 0,
            "cancelled": 0,
            "processing": 0,
        }
        assert cohort["success_rate"] is None
    assert body["comparison"]["design"] == "none"
    assert body["comparison"]["verdict"] == "insufficient evidence"
