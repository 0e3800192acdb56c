"""Sandbox providers over real HTTP: behaviours, idempotency, cancel, set-status and webhooks.

The sandbox app and a tiny webhook receiver are both served by uvicorn on free ports inside the
test's event loop. (Litestar's AsyncTestClient would run the sandbox on a portal thread with its
own loop, where the sandbox's delayed-webhook tasks could not reach a receiver on this loop.)
The receiver checks every signature with ``contracts.signatures.verify``. Orders and scheduled
webhooks are in Postgres: every sandbox here has a schema of its own in ``sandbox_dsn``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from litestar import Litestar, Request, Response, post
from litestar.params import FromPath
from litestar.types import ASGIApp, Receive, Scope, Send

from contracts.provider import ProviderWebhook
from contracts.providers_file import ProviderConfig, load_providers
from contracts.signatures import SignatureError, verify
from sandbox.providers import RATE_LIMITED_DECLINES
from sandbox.routes import Sandbox, SandboxConfig
from tests.conftest import sandbox_schema
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": "Bearer core-token"}
FAST = 0.05


def providers() -> dict[str, ProviderConfig]:
    raw = (ROOT / "config" / "providers.sandbox.json").read_bytes()
    loaded = dict(load_providers(raw, {"SANDBOX_URL": "http://127.0.0.1:9/sandbox"}).providers)
    # Suffixed ids select a behaviour too; they need their own secret.
    loaded["sbx_ok-2"] = ProviderConfig(
        base_url="http://127.0.0.1:9/sandbox/providers/sbx_ok-2",
        webhook_secrets=("whsec_c2Vjb25kLW9r", "whsec_b2xkLXNlY3JldA=="),
    )
    loaded["sbx_no_funds-2"] = ProviderConfig(base_url="http://127.0.0.1:9/x")
    return loaded


PROVIDERS = providers()


@contextlib.asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in this event loop."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listener says TCP, and without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app, interface="asgi3", lifespan="off", log_level="warning", access_log=False
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started or task.done(), timeout=5, what="uvicorn to start")
        assert not task.done(), "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        # Tests do not need a graceful drain (a scripted hang may still be sleeping).
        server.should_exit = server.force_exit = True
        await task
        sock.close()


class Swappable:
    """An ASGI app forwarding to whichever app the current test installed.

    Lets one uvicorn server per module serve a fresh sandbox (or receiver) per test, instead
    of paying uvicorn's start and shutdown ticks in every test.
    """

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None, "no app installed"
        await self.app(scope, receive, send)


@dataclass
class Hosts:
    receiver: Swappable
    receiver_url: str
    sandbox: Swappable
    http: httpx.AsyncClient
    dsn: str


@pytest.fixture(scope="module")
async def hosts(sandbox_dsn: str) -> AsyncIterator[Hosts]:
    receiver, sandbox = Swappable(), Swappable()
    async with (
        serve(receiver) as receiver_url,
        serve(sandbox) as sandbox_url,
        httpx.AsyncClient(base_url=sandbox_url, timeout=5.0) as http,
    ):
        yield Hosts(receiver, receiver_url, sandbox, http, sandbox_dsn)


@dataclass
class Delivery:
    provider_id: str
    webhook_id: str
    body: ProviderWebhook
    verified: bool


@dataclass
class Receiver:
    """Stands in for the gateway's webhook intake; records and verifies every delivery."""

    url: str = ""
    deliveries: list[Delivery] = field(default_factory=list)
    answers: deque[int] = field(default_factory=deque)

    def for_order(self, order_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.body.order_id == order_id]


def receiver_app(receiver: Receiver) -> Litestar:
    @post("/webhooks/{provider_id:str}")
    async def intake(
        request: Request[Any, Any, Any], provider_id: FromPath[str]
    ) -> Response[bytes]:
        raw = await request.body()
        secrets = list(PROVIDERS[provider_id].webhook_secrets)
        try:
            verify(
                secrets,
                request.headers.get("webhook-id"),
                request.headers.get("webhook-timestamp"),
                request.headers.get("webhook-signature"),
                raw,
                now=time.time(),
            )
            verified = True
        except SignatureError:
            verified = False
        receiver.deliveries.append(
            Delivery(
                provider_id=provider_id,
                webhook_id=request.headers["webhook-id"],
                body=msgspec.json.decode(raw, type=ProviderWebhook),
                verified=verified,
            )
        )
        status = receiver.answers.popleft() if receiver.answers else (200 if verified else 401)
        return Response(content=b"{}", status_code=status, media_type="application/json")

    return Litestar(route_handlers=[intake], logging_config=None)


@dataclass
class Harness:
    sandbox: Sandbox
    http: httpx.AsyncClient
    receiver: Receiver

    async def create(
        self,
        provider: str,
        order_id: str | None = None,
        *,
        amount: str = "10.00",
        key: str | None = None,
    ) -> httpx.Response:
        order_id = order_id or f"cg-{uuid.uuid4().hex}"
        body = {
            "order_id": order_id,
            "amount": amount,
            "currency": "EUR",
            "destination": {"type": "iban", "account": "DE89370400440532013000"},
        }
        return await self.http.post(
            f"/sandbox/providers/{provider}/orders",
            json=body,
            headers={"Idempotency-Key": key if key is not None else order_id},
        )

    async def status_of(self, provider: str, order_id: str) -> httpx.Response:
        return await self.http.get(f"/sandbox/providers/{provider}/orders/{order_id}")

    async def settled(self) -> None:
        """Wait until no delayed webhook is pending (every scheduled send has finished)."""
        await wait_until(
            self.sandbox.providers.pending_webhooks,
            done=lambda pending: pending == 0,
            timeout=5,
            what="every scheduled webhook to be sent",
        )


@contextlib.asynccontextmanager
async def running(hosts: Hosts, **overrides: Any) -> AsyncIterator[Harness]:
    """A fresh sandbox and receiver for one test, served by the module's servers."""
    receiver = Receiver(url=hosts.receiver_url)
    hosts.receiver.app = receiver_app(receiver)
    settings: dict[str, Any] = {
        "webhook_delay_seconds": FAST,
        "fail_delay_seconds": FAST,
        "flaky_timeout_seconds": FAST,
        "flaky_success_delay_seconds": FAST,
        "webhook_backoff_seconds": 0.01,
    }
    settings.update(overrides)
    sandbox = Sandbox(
        SandboxConfig(
            gateway_url=hosts.receiver_url,
            database_url=hosts.dsn,
            schema=sandbox_schema(),
            providers=PROVIDERS,
            **settings,
        )
    )
    hosts.sandbox.app = Litestar(route_handlers=[sandbox.router], logging_config=None)
    await sandbox.start()
    await sandbox.start()  # idempotent
    try:
        yield Harness(sandbox, hosts.http, receiver)
    finally:
        await sandbox.close()


@pytest.fixture
async def h(hosts: Hosts) -> AsyncIterator[Harness]:
    async with running(hosts) as harness:
        yield harness


REFERENCE = re.compile(r"^sbx_[a-z_]+(-2)?-[0-9a-f]{12}$")


# -- protocol basics -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/sandbox/providers/nope/orders"),
        ("GET", "/sandbox/providers/nope/orders/x"),
        ("POST", "/sandbox/providers/nope/orders/x/cancel"),
        ("POST", "/sandbox/providers/nope/orders/x/status"),
        ("POST", "/sandbox/providers/sbx_okay/orders"),
        ("POST", "/sandbox/providers/sbx_ok/script"),
    ],
)
async def test_unknown_provider_is_404(h: Harness, method: str, path: str) -> None:
    response = await h.http.request(method, path, content=b"{}")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"order_id":"a"}', {"Idempotency-Key": "a"}),
        (b"{nope", {"Idempotency-Key": "a"}),
        (
            b'{"order_id":"a","amount":"1","currency":"EUR",'
            b'"destination":{"type":"iban","account":"x"}}',
            {},
        ),
        (
            b'{"order_id":"a","amount":"1","currency":"EUR",'
            b'"destination":{"type":"iban","account":"x"}}',
            {"Idempotency-Key": "b"},
        ),
        (
            b'{"order_id":"a","amount":"0","currency":"EUR",'
            b'"destination":{"type":"iban","account":"x"}}',
            {"Idempotency-Key": "a"},
        ),
        (
            b'{"order_id":"a","amount":"x","currency":"EUR",'
            b'"destination":{"type":"iban","account":"x"}}',
            {"Idempotency-Key": "a"},
        ),
    ],
)
async def test_bad_create_is_400_and_creates_nothing(
    h: Harness, content: bytes, headers: dict[str, str]
) -> None:
    response = await h.http.post(
        "/sandbox/providers/sbx_ok/orders", content=content, headers=headers
    )
    assert response.status_code == 400
    assert "error" in response.json()
    assert (await h.status_of("sbx_ok", "a")).status_code == 404
    assert await h.sandbox.providers.orders() == []


async def test_create_is_idempotent_on_the_key(h: Harness) -> None:
    first = await h.create("sbx_silent", "cg-1")
    assert first.status_code == 201
    again = await h.create("sbx_silent", "cg-1")
    assert again.status_code == 200
    assert again.json() == first.json()
    conflict = await h.create("sbx_silent", "cg-1", amount="11.00")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    # Order ids are per provider: the same id elsewhere is another order.
    other = await h.create("sbx_ok", "cg-1")
    assert other.status_code == 201
    assert other.json()["reference"] != first.json()["reference"]


# -- behaviours ------------------------------------------------------------------------------


async def test_ok_accepts_then_sends_a_signed_success_webhook(h: Harness) -> None:
    created = await h.create("sbx_ok", "cg-ok")
    assert created.status_code == 201
    assert created.headers["content-type"] == "application/json"
    order = created.json()
    assert order["status"] == "pending"
    assert order["order_id"] == "cg-ok"
    assert order["code"] is None
    assert REFERENCE.match(order["reference"])
    assert order["reference"].startswith("sbx_ok-")

    [delivery] = await wait_until(
        lambda: h.receiver.for_order("cg-ok"), timeout=5, what="the webhook for cg-ok"
    )
    assert delivery.verified
    assert delivery.provider_id == "sbx_ok"
    assert delivery.webhook_id.startswith("msg_")
    assert delivery.body == ProviderWebhook(
        order_id="cg-ok", reference=order["reference"], status="succeeded"
    )
    got = await h.status_of("sbx_ok", "cg-ok")
    assert got.status_code == 200
    assert got.json() == {**order, "status": "succeeded"}


async def test_sync_ok_succeeds_in_the_create_response(h: Harness) -> None:
    created = await h.create("sbx_sync_ok", "cg-sync")
    assert created.status_code == 201
    assert created.json()["status"] == "succeeded"
    [delivery] = await wait_until(
        lambda: h.receiver.for_order("cg-sync"), timeout=5, what="the webhook for cg-sync"
    )
    assert delivery.verified
    assert delivery.body.status == "succeeded"


async def test_decline_is_422_and_leaves_no_order(h: Harness) -> None:
    declined = await h.create("sbx_decline", "cg-decline")
    assert declined.status_code == 422
    assert declined.json()["code"] == "declined"
    assert (await h.status_of("sbx_decline", "cg-decline")).status_code == 404
    again = await h.create("sbx_decline", "cg-decline")
    assert again.status_code == 422
    assert await h.sandbox.providers.pending_webhooks() == 0
    assert h.receiver.deliveries == []


async def test_rate_limited_declines_an_orders_first_creates_then_accepts_it(h: Harness) -> None:
    order_id = f"cg-rl-{uuid.uuid4().hex[:8]}"
    for _ in range(RATE_LIMITED_DECLINES):
        declined = await h.create("sbx_rate_limited", order_id)
        assert declined.status_code == 422
        assert declined.json()["code"] == "rate_limited"
        assert (await h.status_of("sbx_rate_limited", order_id)).status_code == 404
    # Counted per order: another order is declined from its own first create.
    assert (await h.create("sbx_rate_limited")).status_code == 422

    created = await h.create("sbx_rate_limited", order_id)

    assert created.status_code == 201
    assert created.json()["status"] == "pending"
    replayed = await h.create("sbx_rate_limited", order_id)
    assert (replayed.status_code, replayed.json()["reference"]) == (
        200,
        created.json()["reference"],
    )
    [delivery] = await wait_until(
        lambda: h.receiver.for_order(order_id), timeout=5, what=f"the webhook for {order_id}"
    )
    assert (delivery.verified, delivery.body.status) == (True, "succeeded")


async def test_accept_fail_accepts_then_sends_a_declined_failure(h: Harness) -> None:
    created = await h.create("sbx_accept_fail", "cg-af")
    assert created.status_code == 201
    assert created.json()["status"] == "pending"
    [delivery] = await wait_until(
        lambda: h.receiver.for_order("cg-af"), timeout=5, what="the webhook for cg-af"
    )
    assert delivery.verified
    assert (delivery.body.status, delivery.body.code) == ("failed", "declined")
    got = (await h.status_of("sbx_accept_fail", "cg-af")).json()
    assert (got["status"], got["code"]) == ("failed", "declined")


async def test_silent_accepts_and_never_calls_back(h: Harness) -> None:
    silent = await h.create("sbx_silent", "cg-silent")
    assert silent.status_code == 201
    # Nothing is even scheduled for it; an sbx_ok order created after it is delivered first.
    assert await h.sandbox.providers.pending_webhooks() == 0
    await h.create("sbx_ok", "cg-witness")
    await wait_until(
        lambda: h.receiver.for_order("cg-witness"), timeout=5, what="the webhook for cg-witness"
    )
    await h.settled()
    assert h.receiver.for_order("cg-silent") == []
    assert (await h.status_of("sbx_silent", "cg-silent")).json()["status"] == "pending"


async def test_no_funds_is_ok_at_the_provider_but_refused_at_core(h: Harness) -> None:
    created = await h.create("sbx_no_funds", "cg-nf")
    assert created.status_code == 201
    await wait_until(lambda: h.receiver.for_order("cg-nf"), timeout=5, what="the webhook for cg-nf")
    for provider in ("sbx_no_funds", "sbx_no_funds-2"):
        refused = await h.http.post(
            "/sandbox/core/v1/balances/freeze",
            json={
                "operation_id": f"op-{provider}",
                "withdrawal_id": "w-nf",
                "provider_id": provider,
                "amount": "0.01",
                "currency": "EUR",
            },
            headers=AUTH,
        )
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "insufficient_balance"


async def test_suffixed_id_behaves_like_its_base_and_signs_with_its_own_secret(
    h: Harness,
) -> None:
    created = await h.create("sbx_ok-2", "cg-alias")
    assert created.status_code == 201
    assert created.json()["reference"].startswith("sbx_ok-2-")
    [delivery] = await wait_until(
        lambda: h.receiver.for_order("cg-alias"), timeout=5, what="the webhook for cg-alias"
    )
    assert delivery.provider_id == "sbx_ok-2"
    assert delivery.verified


# -- sbx_flaky -------------------------------------------------------------------------------


async def script(h: Harness, **body: list[str]) -> httpx.Response:
    return await h.http.post("/sandbox/providers/sbx_flaky/script", json=body)


async def test_flaky_created_order_exists_succeeds_and_replays(h: Harness) -> None:
    assert (await script(h, outcomes=["created"], errors=["503"])).status_code == 200
    failed = await h.create("sbx_flaky", "cg-fl-created")
    assert failed.status_code == 503
    assert "error" in failed.json()
    [delivery] = await wait_until(
        lambda: h.receiver.for_order("cg-fl-created"),
        timeout=5,
        what="the webhook for cg-fl-created",
    )
    assert delivery.verified
    assert delivery.body.status == "succeeded"
    got = await h.status_of("sbx_flaky", "cg-fl-created")
    assert got.status_code == 200
    assert got.json()["status"] == "succeeded"
    # The retry of the same create finds the order: idempotency, not another attempt.
    replay = await h.create("sbx_flaky", "cg-fl-created")
    assert replay.status_code == 200
    assert replay.json() == got.json()


async def test_flaky_absent_order_is_404_and_a_retry_is_a_fresh_attempt(h: Harness) -> None:
    await script(h, outcomes=["absent", "created"], errors=["timeout", "503"])
    started = time.monotonic()
    timed_out = await h.create("sbx_flaky", "cg-fl-absent")
    assert timed_out.status_code == 504
    assert time.monotonic() - started >= FAST
    assert (await h.status_of("sbx_flaky", "cg-fl-absent")).status_code == 404
    retry = await h.create("sbx_flaky", "cg-fl-absent")
    assert retry.status_code == 503
    assert (await h.status_of("sbx_flaky", "cg-fl-absent")).status_code == 200


async def test_flaky_order_exists_while_the_create_still_hangs(hosts: Hosts) -> None:
    async with running(hosts, flaky_timeout_seconds=0.5) as h:
        await script(h, outcomes=["created"], errors=["timeout"])
        with pytest.raises(httpx.ReadTimeout):
            await h.http.post(
                "/sandbox/providers/sbx_flaky/orders",
                json={
                    "order_id": "cg-hang",
                    "amount": "1",
                    "currency": "EUR",
                    "destination": {"type": "iban", "account": "x"},
                },
                headers={"Idempotency-Key": "cg-hang"},
                timeout=0.05,
            )
        got = await h.status_of("sbx_flaky", "cg-hang")
        assert got.status_code == 200


async def test_flaky_unscripted_alternates_503_and_timeout(hosts: Hosts) -> None:
    async with running(hosts, flaky_created_ratio=1.0) as h:
        statuses = [(await h.create("sbx_flaky")).status_code for _ in range(4)]
        assert statuses == [503, 504, 503, 504]
        assert len(await h.sandbox.providers.orders()) == 4
    async with running(hosts, flaky_created_ratio=0.0) as h:
        for _ in range(3):
            await h.create("sbx_flaky")
        assert await h.sandbox.providers.orders() == []


async def test_flaky_outcomes_are_seeded(hosts: Hosts) -> None:
    async def outcomes(seed: int) -> list[bool]:
        async with running(hosts, seed=seed, flaky_created_ratio=0.5, flaky_timeout_seconds=0) as h:
            ids = [f"cg-{i}" for i in range(16)]
            for order_id in ids:
                await h.create("sbx_flaky", order_id)
            return [await h.sandbox.providers.order("sbx_flaky", i) is not None for i in ids]

    first = await outcomes(3)
    assert first == await outcomes(3)
    assert True in first
    assert False in first


@pytest.mark.parametrize(
    "body",
    [b'{"outcomes":["maybe"]}', b'{"errors":["500"]}', b"[", b'{"outcome":["created"]}'],
)
async def test_bad_flaky_script_is_422(h: Harness, body: bytes) -> None:
    response = await h.http.post("/sandbox/providers/sbx_flaky/script", content=body)
    assert response.status_code == 422


# -- cancel ----------------------------------------------------------------------------------


async def test_cancel_pending_order_wins_over_its_scheduled_success(hosts: Hosts) -> None:
    async with running(hosts, webhook_delay_seconds=0.2) as h:
        await h.create("sbx_ok", "cg-cancel")
        for _ in range(2):
            cancelled = await h.http.post("/sandbox/providers/sbx_ok/orders/cg-cancel/cancel")
            assert cancelled.status_code == 200
            assert cancelled.json()["status"] == "cancelled"
        await h.settled()
        assert h.receiver.for_order("cg-cancel") == []
        assert (await h.status_of("sbx_ok", "cg-cancel")).json()["status"] == "cancelled"


async def test_cancel_of_a_final_order_is_409_with_the_winner(h: Harness) -> None:
    await h.create("sbx_accept_fail", "cg-final")
    await wait_until(
        lambda: h.receiver.for_order("cg-final"), timeout=5, what="the webhook for cg-final"
    )
    response = await h.http.post("/sandbox/providers/sbx_accept_fail/orders/cg-final/cancel")
    assert response.status_code == 409
    assert response.json()["status"] == "failed"


@pytest.mark.parametrize(
    ("provider", "status"),
    [("sbx_sync_ok", 501), ("sbx_flaky", 501), ("sbx_decline", 501), ("sbx_silent", 404)],
)
async def test_cancel_unsupported_or_unknown(h: Harness, provider: str, status: int) -> None:
    response = await h.http.post(f"/sandbox/providers/{provider}/orders/cg-none/cancel")
    assert response.status_code == status
    assert "error" in response.json()


# -- set-status and webhook delivery ---------------------------------------------------------


async def set_status(h: Harness, provider: str, reference: str, body: Any) -> httpx.Response:
    return await h.http.post(f"/sandbox/providers/{provider}/orders/{reference}/status", json=body)


async def test_set_status_updates_and_sends_a_verified_webhook(h: Harness) -> None:
    reference = (await h.create("sbx_silent", "cg-set")).json()["reference"]
    response = await set_status(h, "sbx_silent", reference, {"status": "succeeded"})
    assert response.status_code == 200
    result = response.json()
    assert result["webhook_status"] == 200
    assert result["order"] == {
        "order_id": "cg-set",
        "reference": reference,
        "status": "succeeded",
        "code": None,
    }
    [delivery] = h.receiver.for_order("cg-set")
    assert delivery.verified
    assert delivery.webhook_id == result["webhook_id"]
    assert delivery.body.status == "succeeded"

    failed = (await set_status(h, "sbx_silent", reference, {"status": "failed"})).json()
    assert failed["order"]["code"] == "declined"
    closed = await set_status(
        h, "sbx_silent", reference, {"status": "failed", "code": "account_closed"}
    )
    assert closed.json()["order"]["code"] == "account_closed"
    assert [d.body.status for d in h.receiver.for_order("cg-set")] == [
        "succeeded",
        "failed",
        "failed",
    ]
    # Each set-status is a new event: a new webhook-id.
    assert len({d.webhook_id for d in h.receiver.for_order("cg-set")}) == 3


async def test_set_status_can_replay_one_event_id(h: Harness) -> None:
    reference = (await h.create("sbx_silent", "cg-replay")).json()["reference"]
    for _ in range(2):
        await set_status(
            h, "sbx_silent", reference, {"status": "succeeded", "webhook_id": "msg_fixed"}
        )
    assert [d.webhook_id for d in h.receiver.for_order("cg-replay")] == ["msg_fixed"] * 2


async def test_set_status_reports_the_gateway_refusal_without_retrying(h: Harness) -> None:
    reference = (await h.create("sbx_silent", "cg-refused")).json()["reference"]
    h.receiver.answers.append(401)
    result = (await set_status(h, "sbx_silent", reference, {"status": "succeeded"})).json()
    assert result["webhook_status"] == 401
    assert len(h.receiver.for_order("cg-refused")) == 1


@pytest.mark.parametrize(
    ("provider", "reference", "body", "status"),
    [
        ("sbx_silent", "sbx_silent-000000000000", {"status": "succeeded"}, 404),
        ("nope", "whatever", {"status": "succeeded"}, 404),
        ("sbx_silent", None, {"status": "paid"}, 422),
        ("sbx_silent", None, {}, 422),
        ("sbx_silent", None, [], 422),
        ("sbx_ok", None, {"status": "succeeded"}, 404),  # another provider's reference
    ],
)
async def test_set_status_errors(
    h: Harness, provider: str, reference: str | None, body: Any, status: int
) -> None:
    if reference is None:
        reference = (await h.create("sbx_silent")).json()["reference"]
    response = await set_status(h, provider, reference, body)
    assert response.status_code == status
    assert "error" in response.json()


async def test_set_status_with_malformed_json_is_422(h: Harness) -> None:
    reference = (await h.create("sbx_silent")).json()["reference"]
    response = await h.http.post(
        f"/sandbox/providers/sbx_silent/orders/{reference}/status", content=b"{"
    )
    assert response.status_code == 422


async def test_webhook_retries_5xx_with_the_same_id_and_fresh_signatures(h: Harness) -> None:
    h.receiver.answers.extend([503, 500])
    await h.create("sbx_ok", "cg-retry")
    deliveries = await wait_until(
        lambda: h.receiver.for_order("cg-retry"),
        done=lambda deliveries: len(deliveries) == 3,
        timeout=5,
        what="three deliveries of the webhook for cg-retry",
    )
    assert len({d.webhook_id for d in deliveries}) == 1
    assert all(d.verified for d in deliveries)
    await h.settled()
    assert len(h.receiver.for_order("cg-retry")) == 3


async def test_webhook_gives_up_when_the_gateway_is_unreachable(
    caplog: pytest.LogCaptureFixture, sandbox_dsn: str
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    # Bound then closed: nothing listens there, every attempt is refused.
    sandbox = Sandbox(
        SandboxConfig(
            gateway_url=f"http://127.0.0.1:{dead_port}",
            database_url=sandbox_dsn,
            schema=sandbox_schema(),
            providers=PROVIDERS,
            webhook_attempts=3,
            webhook_backoff_seconds=0.01,
        )
    )
    await sandbox.start()
    try:
        async with (
            serve(Litestar(route_handlers=[sandbox.router], logging_config=None)) as url,
            httpx.AsyncClient(base_url=url) as http,
        ):
            order = (
                await http.post(
                    "/sandbox/providers/sbx_silent/orders",
                    json={
                        "order_id": "cg-dead",
                        "amount": "1",
                        "currency": "EUR",
                        "destination": {"type": "iban", "account": "x"},
                    },
                    headers={"Idempotency-Key": "cg-dead"},
                )
            ).json()
            response = await http.post(
                f"/sandbox/providers/sbx_silent/orders/{order['reference']}/status",
                json={"status": "succeeded"},
            )
            result = response.json()
            assert response.status_code == 200
            assert result["webhook_status"] is None
            assert result["webhook_attempts"] == 3
            assert result["webhook_error"].startswith("connect failed")
            assert "gave up on webhook" in caplog.text
    finally:
        await sandbox.close()


async def test_close_stops_sending_and_keeps_the_scheduled_webhooks(hosts: Hosts) -> None:
    async with running(hosts, webhook_delay_seconds=60) as h:
        await h.create("sbx_ok", "cg-later")
        assert await h.sandbox.providers.pending_webhooks() == 1
        await h.sandbox.close()
        assert h.sandbox.sender.pending_tasks == 0
        assert h.receiver.deliveries == []
        # Still scheduled, in the database: a later start sends it (test_sandbox_restart.py).
        await h.sandbox.start()
        assert await h.sandbox.providers.pending_webhooks() == 1
