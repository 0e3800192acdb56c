"""The cascade-core simulator: balances, notifications, invariant detection, fault injection.

Driven through HTTP (httpx's ASGI transport, in the test's event loop) against an app that
mounts the real ``sandbox.router``; a few ledger-only tests inject a clock instead of waiting.
The ledger is in Postgres: every sandbox here has a schema of its own in ``sandbox_dsn``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar

from contracts.providers_file import load_providers
from sandbox.core import LedgerError
from sandbox.routes import ENDPOINTS, Sandbox, SandboxConfig
from tests.conftest import sandbox_schema
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": "Bearer core-token"}
Client = httpx.AsyncClient


def providers() -> Any:
    raw = (ROOT / "config" / "providers.sandbox.json").read_bytes()
    return load_providers(raw, {"SANDBOX_URL": "http://127.0.0.1:9/sandbox"}).providers


def make_sandbox(dsn: str = "postgresql://127.0.0.1:9/unused", **overrides: Any) -> Sandbox:
    return Sandbox(
        SandboxConfig(
            gateway_url="http://127.0.0.1:9",
            database_url=dsn,
            schema=sandbox_schema(),
            providers=providers(),
            **overrides,
        )
    )


async def open_client(sandbox: Sandbox) -> Client:
    """Start the sandbox (its schema) and a client of its router."""
    await sandbox.start()
    # Any: Litestar's precise ASGI signature does not match httpx's looser ASGIApp alias.
    app: Any = Litestar(route_handlers=[sandbox.router])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox")


async def close_client(client: Client, sandbox: Sandbox) -> None:
    await client.aclose()
    await sandbox.close()


@pytest.fixture
async def sandbox(sandbox_dsn: str) -> AsyncIterator[Sandbox]:
    sbx = make_sandbox(sandbox_dsn, provider_floats={"float_100": Decimal("100")})
    yield sbx
    await sbx.close()


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[Client]:
    c = await open_client(sandbox)
    yield c
    await c.aclose()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def freeze(
    client: Client,
    op: str,
    *,
    withdrawal: str | None = None,
    provider: str = "sbx_ok",
    amount: str = "10.00",
) -> Any:
    body = {
        "operation_id": op,
        "withdrawal_id": withdrawal or new_id("w"),
        "provider_id": provider,
        "amount": amount,
        "currency": "EUR",
    }
    return await client.post("/sandbox/core/v1/balances/freeze", json=body, headers=AUTH)


async def settle(client: Client, action: str, op: str) -> Any:
    return await client.post(
        f"/sandbox/core/v1/balances/{action}", json={"operation_id": op}, headers=AUTH
    )


async def ledger(client: Client) -> Any:
    response = await client.get("/sandbox/core/ledger")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    return response.json()


def kinds(snapshot: Any, **match: str) -> list[str]:
    return [
        v["kind"]
        for v in snapshot["violations"]
        if all(v.get(key) == value for key, value in match.items())
    ]


# -- authentication and input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/sandbox/core/v1/balances/freeze"),
        ("POST", "/sandbox/core/v1/balances/commit"),
        ("POST", "/sandbox/core/v1/balances/rollback"),
        ("GET", "/sandbox/core/v1/balances/operations/op-1"),
        ("POST", "/sandbox/core/v1/withdrawal-notifications"),
    ],
)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic core-token", "Bearer"])
async def test_core_endpoints_need_a_core_token(
    client: Client, method: str, path: str, auth: str | None
) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    response = await client.request(method, path, headers=headers, content=b"{}")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "unauthorized"


async def test_ledger_needs_no_token(client: Client) -> None:
    snapshot = await ledger(client)
    assert snapshot["operations"] == {}
    assert snapshot["notifications"] == []
    assert snapshot["violations"] == []
    assert snapshot["floats"]["sbx_no_funds"] == "0"
    assert snapshot["floats"]["sbx_ok"] == "1000000"


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("freeze", b"{not json", 400, "malformed_json"),
        ("freeze", b"[]", 422, "validation_failed"),
        ("freeze", b'{"operation_id":"x"}', 422, "validation_failed"),
        (
            "freeze",
            b'{"operation_id":"x","withdrawal_id":"w","provider_id":"p",'
            b'"amount":"-1","currency":"EUR"}',
            422,
            "validation_failed",
        ),
        (
            "freeze",
            b'{"operation_id":"x","withdrawal_id":"w","provider_id":"p",'
            b'"amount":"ten","currency":"EUR"}',
            422,
            "validation_failed",
        ),
        (
            "freeze",
            b'{"operation_id":"","withdrawal_id":"w","provider_id":"p",'
            b'"amount":"1","currency":"EUR"}',
            422,
            "validation_failed",
        ),
        (
            "freeze",
            b'{"operation_id":"x","withdrawal_id":"w","provider_id":"p",'
            b'"amount":"NaN","currency":"EUR"}',
            422,
            "validation_failed",
        ),
        ("commit", b"", 400, "malformed_json"),
        ("commit", b'{"operation_id":5}', 422, "validation_failed"),
        ("rollback", b"null", 422, "validation_failed"),
    ],
)
async def test_bad_balance_input_is_a_4xx_and_changes_nothing(
    client: Client, path: str, body: bytes, status: int, code: str
) -> None:
    response = await client.post(f"/sandbox/core/v1/balances/{path}", content=body, headers=AUTH)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code
    snapshot = await ledger(client)
    assert snapshot["operations"] == {}
    assert snapshot["violations"] == []


# -- balances --------------------------------------------------------------------------------


async def test_freeze_is_idempotent_and_holds_once(client: Client) -> None:
    op, wid = new_id("op"), new_id("w")
    first = await freeze(client, op, withdrawal=wid, provider="float_100", amount="60")
    assert first.status_code == 200
    assert first.json() == {"operation_id": op, "state": "frozen"}
    again = await freeze(client, op, withdrawal=wid, provider="float_100", amount="60")
    assert again.status_code == 200
    assert again.json() == {"operation_id": op, "state": "frozen"}
    snapshot = await ledger(client)
    assert snapshot["available"]["float_100"] == "40"
    assert snapshot["floats"]["float_100"] == "100"
    assert len(snapshot["operation_details"][op]["history"]) == 2


async def test_open_freezes_count_against_the_float(client: Client) -> None:
    first, second = new_id("op"), new_id("op")
    assert (await freeze(client, first, provider="float_100", amount="60")).status_code == 200
    refused = await freeze(client, second, provider="float_100", amount="50")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "insufficient_balance"
    assert (await settle(client, "rollback", first)).status_code == 200
    assert (await freeze(client, second, provider="float_100", amount="50")).status_code == 200


async def test_no_funds_provider_refuses_every_freeze(client: Client) -> None:
    op = new_id("op")
    refused = await freeze(client, op, provider="sbx_no_funds", amount="0.01")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "insufficient_balance"
    snapshot = await ledger(client)
    assert op not in snapshot["operations"]
    assert op in snapshot["refusals"]
    assert snapshot["violations"] == []


async def test_commit_debits_the_float_and_repeats_answer_the_same(client: Client) -> None:
    op = new_id("op")
    await freeze(client, op, provider="float_100", amount="12.50")
    for _ in range(2):
        response = await settle(client, "commit", op)
        assert response.status_code == 200
        assert response.json() == {"operation_id": op, "state": "committed"}
    snapshot = await ledger(client)
    assert snapshot["operations"][op] == "committed"
    assert snapshot["floats"]["float_100"] == "87.50"
    assert snapshot["available"]["float_100"] == "87.50"
    assert snapshot["violations"] == []
    got = await client.get(f"/sandbox/core/v1/balances/operations/{op}", headers=AUTH)
    assert got.status_code == 200
    assert got.json() == {"operation_id": op, "state": "committed"}


async def test_rollback_releases_the_hold_and_repeats_answer_the_same(client: Client) -> None:
    op = new_id("op")
    await freeze(client, op, provider="float_100", amount="100")
    for _ in range(2):
        response = await settle(client, "rollback", op)
        assert response.status_code == 200
        assert response.json() == {"operation_id": op, "state": "rolled_back"}
    snapshot = await ledger(client)
    assert snapshot["operations"][op] == "rolled_back"
    assert snapshot["floats"]["float_100"] == "100"
    assert snapshot["available"]["float_100"] == "100"
    assert snapshot["violations"] == []


async def test_unknown_operation_lookup_is_404(client: Client) -> None:
    response = await client.get("/sandbox/core/v1/balances/operations/nope", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_ledger_shape(client: Client) -> None:
    op, wid = new_id("op"), new_id("w")
    await freeze(client, op, withdrawal=wid, amount="5")
    snapshot = await ledger(client)
    assert snapshot["operations"] == {op: "frozen"}
    details = snapshot["operation_details"][op]
    assert details["withdrawal_id"] == wid
    assert details["provider_id"] == "sbx_ok"
    assert details["amount"] == "5"
    assert details["currency"] == "EUR"
    assert details["state"] == "frozen"
    assert [h["action"] for h in details["history"]] == ["freeze"]
    assert all(isinstance(v, str) for v in snapshot["floats"].values())


# -- violations ------------------------------------------------------------------------------


async def test_commit_after_rollback_is_refused_and_recorded(client: Client) -> None:
    op = new_id("op")
    await freeze(client, op)
    await settle(client, "rollback", op)
    response = await settle(client, "commit", op)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "invalid_state"
    snapshot = await ledger(client)
    assert snapshot["operations"][op] == "rolled_back"
    assert kinds(snapshot, operation_id=op) == ["commit_after_rollback"]


async def test_rollback_after_commit_is_refused_and_recorded(client: Client) -> None:
    op = new_id("op")
    await freeze(client, op)
    await settle(client, "commit", op)
    response = await settle(client, "rollback", op)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "invalid_state"
    snapshot = await ledger(client)
    assert snapshot["operations"][op] == "committed"
    assert kinds(snapshot, operation_id=op) == ["rollback_after_commit"]


async def test_second_commit_for_one_withdrawal_is_a_double_commit(client: Client) -> None:
    wid, first, second = new_id("w"), new_id("op"), new_id("op")
    await freeze(client, first, withdrawal=wid, provider="sbx_ok")
    await freeze(client, second, withdrawal=wid, provider="sbx_sync_ok")
    assert (await settle(client, "commit", first)).status_code == 200
    assert (await settle(client, "commit", second)).status_code == 200
    snapshot = await ledger(client)
    assert kinds(snapshot, withdrawal_id=wid) == ["double_commit"]
    assert kinds(snapshot, operation_id=second) == ["double_commit"]


@pytest.mark.parametrize("action", ["commit", "rollback"])
async def test_settling_an_unknown_operation_is_recorded(client: Client, action: str) -> None:
    op = new_id("op")
    response = await settle(client, action, op)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    snapshot = await ledger(client)
    assert kinds(snapshot, operation_id=op) == ["unknown_operation"]
    assert op not in snapshot["operations"]


async def test_settling_a_refused_freeze_is_unknown_and_says_why(client: Client) -> None:
    op = new_id("op")
    await freeze(client, op, provider="sbx_no_funds")
    assert (await settle(client, "rollback", op)).status_code == 404
    snapshot = await ledger(client)
    [violation] = snapshot["violations"]
    assert violation["kind"] == "unknown_operation"
    assert "insufficient_balance" in violation["detail"]


async def test_freeze_open_too_long_is_seen_when_the_ledger_is_read(sandbox_dsn: str) -> None:
    sandbox = make_sandbox(sandbox_dsn, open_freeze_bound_seconds=0.05)
    client = await open_client(sandbox)
    try:
        op, settled = new_id("op"), new_id("op")
        await freeze(client, op)
        await freeze(client, settled)
        await settle(client, "commit", settled)

        async def flagged() -> list[str]:
            return kinds(await ledger(client), operation_id=op)

        kinds_seen = await wait_until(
            flagged, timeout=5, interval=0.01, what="the open freeze to be flagged"
        )
        assert kinds_seen == ["freeze_open_too_long"]
        # Flagged once, however often the ledger is read afterwards.
        snapshot = await ledger(client)
        assert kinds(snapshot) == ["freeze_open_too_long"]
    finally:
        await close_client(client, sandbox)


async def test_freeze_closed_after_the_bound_is_flagged_without_a_read(sandbox_dsn: str) -> None:
    now = [100.0]
    sandbox = make_sandbox(sandbox_dsn, open_freeze_bound_seconds=10, clock=lambda: now[0])
    await sandbox.start()
    try:
        book = sandbox.ledger
        await book.freeze("late", "w1", "p", Decimal(1), "EUR")
        await book.freeze("prompt", "w2", "p", Decimal(1), "EUR")
        now[0] += 5
        await book.commit("prompt")
        now[0] += 6
        await book.rollback("late")
        seen = [(v.kind, v.operation_id) for v in await book.violations()]
        assert seen == [("freeze_open_too_long", "late")]
        await book.check_open_freezes()
        assert len(await book.violations()) == 1
    finally:
        await sandbox.close()


async def test_ledger_errors_carry_wire_status_and_code(sandbox_dsn: str) -> None:
    sandbox = make_sandbox(sandbox_dsn, provider_floats={"p": Decimal(5)})
    await sandbox.start()
    try:
        with pytest.raises(LedgerError) as refused:
            await sandbox.ledger.freeze("a", "w", "p", Decimal(6), "EUR")
        assert (refused.value.status, refused.value.code) == (409, "insufficient_balance")
    finally:
        await sandbox.close()


async def test_freeze_replayed_with_other_terms_is_refused_and_recorded(client: Client) -> None:
    op, wid = new_id("op"), new_id("w")
    await freeze(client, op, withdrawal=wid, amount="10")
    response = await freeze(client, op, withdrawal=wid, amount="11")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "operation_conflict"
    snapshot = await ledger(client)
    assert kinds(snapshot, operation_id=op) == ["freeze_conflict"]
    assert snapshot["operation_details"][op]["amount"] == "10"


# -- notifications ---------------------------------------------------------------------------


def withdrawal(wid: str, status: str) -> dict[str, Any]:
    return {
        "withdrawal_id": wid,
        "merchant_id": "m-1",
        "status": status,
        "amount": "10.00",
        "currency": "EUR",
        "provider_id": "sbx_ok",
        "provider_reference": None,
        "failure_code": None if status == "succeeded" else "declined",
        "metadata": {"ключ": "значение"},
        "created_at": "2026-01-01T00:00:00.000Z",
        "updated_at": "2026-01-01T00:00:01.000Z",
    }


async def notify(client: Client, body: dict[str, Any], key: str | None = None) -> Any:
    key = key or f"{body['withdrawal_id']}:{body['status']}"
    return await client.post(
        "/sandbox/core/v1/withdrawal-notifications",
        content=msgspec.json.encode(body),
        headers={**AUTH, "Idempotency-Key": key, "Content-Type": "application/json"},
    )


async def test_notifications_are_recorded_once_per_key(client: Client) -> None:
    wid = new_id("w")
    body = withdrawal(wid, "succeeded")
    for _ in range(3):
        response = await notify(client, body)
        assert response.status_code == 200
    snapshot = await ledger(client)
    assert snapshot["notifications"] == [body]
    assert snapshot["notification_deliveries"] == {f"{wid}:succeeded": 3}
    assert snapshot["violations"] == []


async def test_two_final_statuses_for_one_withdrawal_conflict(client: Client) -> None:
    wid = new_id("w")
    await notify(client, withdrawal(wid, "succeeded"))
    await notify(client, withdrawal(wid, "failed"))
    snapshot = await ledger(client)
    assert [n["status"] for n in snapshot["notifications"]] == ["succeeded", "failed"]
    assert kinds(snapshot, withdrawal_id=wid) == ["conflicting_notifications"]


async def test_notification_key_must_match_body_and_status_must_be_final(client: Client) -> None:
    wid = new_id("w")
    await notify(client, withdrawal(wid, "processing"))
    await notify(client, withdrawal(wid, "failed"), key=f"{wid}:succeeded")
    snapshot = await ledger(client)
    assert kinds(snapshot, withdrawal_id=wid) == [
        "non_final_notification",
        "notification_key_mismatch",
    ]


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"{}", {}, 400),
        (b"{bad", {"Idempotency-Key": "w:succeeded"}, 400),
        (b"[1]", {"Idempotency-Key": "w:succeeded"}, 422),
    ],
)
async def test_bad_notifications_are_4xx(
    client: Client, body: bytes, headers: dict[str, str], status: int
) -> None:
    response = await client.post(
        "/sandbox/core/v1/withdrawal-notifications", content=body, headers={**AUTH, **headers}
    )
    assert response.status_code == status
    assert "error" in response.json()
    assert (await ledger(client))["notifications"] == []


# -- fault injection -------------------------------------------------------------------------


async def test_runtime_faults_answer_before_anything_is_applied(client: Client) -> None:
    op = new_id("op")
    response = await client.put("/sandbox/core/faults", json={"fault_500_ratio": 1.0})
    assert response.status_code == 200
    assert response.json()["fault_500_ratio"] == 1.0
    faulted = await freeze(client, op)
    assert faulted.status_code == 500
    assert (await ledger(client))["operations"] == {}

    await client.put("/sandbox/core/faults", json={"timeout_ratio": 1.0, "timeout_seconds": 0.05})
    started = time.monotonic()
    timed_out = await freeze(client, op)
    assert timed_out.status_code == 504
    assert time.monotonic() - started >= 0.05
    assert (await ledger(client))["operations"] == {}

    await client.put("/sandbox/core/faults", json={})
    assert (await freeze(client, op)).status_code == 200
    await client.put("/sandbox/core/faults", json={"fault_500_ratio": 1.0})
    assert (await settle(client, "commit", op)).status_code == 500
    assert (await ledger(client))["operations"] == {op: "frozen"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"fault_500_ratio": 1.5}',
        b'{"fault_500_ratio": 0.6, "timeout_ratio": 0.6}',
        b'{"timeout_ratio": -0.1}',
        b'{"timeout_seconds": -1}',
        b'{"unknown": 1}',
        b"nope",
    ],
)
async def test_bad_fault_settings_are_4xx(client: Client, body: bytes) -> None:
    response = await client.put("/sandbox/core/faults", content=body)
    assert 400 <= response.status_code < 500
    assert (await ledger(client))["faults"]["fault_500_ratio"] == 0.0


async def test_configured_faults_are_seeded_and_reproducible(sandbox_dsn: str) -> None:
    async def statuses(seed: int) -> list[int]:
        sandbox = make_sandbox(sandbox_dsn, core_fault_500_ratio=0.5, seed=seed)
        client = await open_client(sandbox)
        try:
            return [(await freeze(client, f"op-{i}")).status_code for i in range(20)]
        finally:
            await close_client(client, sandbox)

    first = await statuses(7)
    assert first == await statuses(7)
    assert set(first) == {200, 500}


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="flaky_created_ratio"):
        make_sandbox(flaky_created_ratio=2)
    with pytest.raises(ValueError, match="sum"):
        make_sandbox(core_fault_500_ratio=0.7, core_fault_timeout_ratio=0.7)
    with pytest.raises(ValueError, match="webhook_delay_seconds"):
        make_sandbox(webhook_delay_seconds=-1)


async def test_sandbox_root_lists_its_endpoints(client: Client) -> None:
    """``make run``'s banner advertises ``/sandbox``: it answers an index, not 404."""
    response = await client.get("/sandbox")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    endpoints = response.json()["endpoints"]
    listed = {(e["method"], e["path"]) for e in endpoints}
    assert all(e["purpose"] for e in endpoints)
    assert ("POST", "/sandbox/core/v1/balances/freeze") in listed
    assert ("GET", "/sandbox/core/ledger") in listed
    assert ("POST", "/sandbox/providers/{provider_id}/orders") in listed
    assert ("POST", "/sandbox/providers/{provider_id}/orders/{reference}/status") in listed


async def test_sandbox_index_matches_the_routes(sandbox: Sandbox) -> None:
    """Every route the sandbox serves is in the index, and nothing else is."""
    app = Litestar(route_handlers=[sandbox.router])
    served = {
        (method, route.path.replace(":str}", "}"))
        for route in app.routes
        for method in getattr(route, "methods", ())
        if method not in ("HEAD", "OPTIONS") and route.path.startswith("/sandbox")
    }
    listed = {(method, path) for method, path, _ in ENDPOINTS}
    assert listed == served
