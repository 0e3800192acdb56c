"""A sandbox closed and a new one opened on the same schema carries on where the first stopped.

The first sandbox freezes, commits, notifies and accepts orders whose webhooks are due an hour
later, then closes (its state is all in Postgres: a close and a kill leave the same rows). The
second runs on a clock two hours ahead, so those webhooks are due at once, without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
from litestar import Litestar

from sandbox.routes import Sandbox, SandboxConfig
from tests.conftest import sandbox_schema
from tests.unit.test_sandbox_providers import PROVIDERS, Receiver, receiver_app, serve
from tests.waiting import wait_until

HOUR = 3600.0


def _sandbox(dsn: str, schema: str, receiver_url: str, clock: Callable[[], float]) -> Sandbox:
    return Sandbox(
        SandboxConfig(
            gateway_url=receiver_url,
            database_url=dsn,
            schema=schema,
            providers=PROVIDERS,
            webhook_delay_seconds=HOUR,
            fail_delay_seconds=HOUR,
            open_freeze_bound_seconds=100 * HOUR,
            clock=clock,
        )
    )


def _create(order_id: str) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "amount": "10.00",
        "currency": "EUR",
        "destination": {"type": "iban", "account": "DE89370400440532013000"},
    }


async def _before_the_crash(sandbox: Sandbox) -> None:
    """Freezes (one left open), a commit, a notification and two orders with due webhooks."""
    ledger = sandbox.ledger
    await ledger.freeze("op-open", "w-1", "sbx_ok", Decimal("10.00"), "EUR")
    await ledger.freeze("op-done", "w-2", "sbx_ok", Decimal("5.00"), "EUR")
    await ledger.commit("op-done")
    await ledger.notify("w-2:succeeded", {"withdrawal_id": "w-2", "status": "succeeded"})
    app: Any = Litestar(route_handlers=[sandbox.router], logging_config=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as http:
        for provider, order_id in (("sbx_ok", "cg-ok"), ("sbx_accept_fail", "cg-fail")):
            created = await http.post(
                f"/sandbox/providers/{provider}/orders",
                json=_create(order_id),
                headers={"Idempotency-Key": order_id},
            )
            assert created.status_code == 201, created.text
    assert await sandbox.providers.pending_webhooks() == 2
    # One of them as a dying process leaves it: claimed, mid-send.
    await sandbox.db.pool.execute(
        "UPDATE webhooks SET claimed_until = $1 WHERE order_id = 'cg-fail'", time.time() + HOUR
    )


async def test_a_new_sandbox_on_the_same_schema_resumes_ledger_and_webhooks(
    sandbox_dsn: str,
) -> None:
    schema = sandbox_schema()
    receiver = Receiver()
    async with serve(receiver_app(receiver)) as receiver_url:
        first = _sandbox(sandbox_dsn, schema, receiver_url, time.time)
        await first.start()
        try:
            await _before_the_crash(first)
        finally:
            await first.close()
        assert receiver.deliveries == []

        second = _sandbox(sandbox_dsn, schema, receiver_url, lambda: time.time() + 2 * HOUR)
        await second.start()
        try:
            # The freeze made before the restart commits; the commit made before it repeats.
            assert await second.ledger.commit("op-open") == "committed"
            assert await second.ledger.commit("op-done") == "committed"
            await wait_until(
                second.providers.pending_webhooks,
                done=lambda pending: pending == 0,
                timeout=10,
                what="the webhooks due before the restart to be sent",
            )
            sent = {(d.body.order_id, d.body.status) for d in receiver.deliveries}
            assert sent == {("cg-ok", "succeeded"), ("cg-fail", "failed")}
            assert all(d.verified for d in receiver.deliveries)
            orders = {o.order_id: o.status for o in await second.providers.orders()}
            assert orders == {"cg-ok": "succeeded", "cg-fail": "failed"}
            snapshot = await second.ledger.snapshot()
        finally:
            await second.close()
    assert snapshot["violations"] == []
    assert snapshot["operations"] == {"op-open": "committed", "op-done": "committed"}
    assert snapshot["notification_deliveries"] == {"w-2:succeeded": 1}
    assert (snapshot["floats"]["sbx_ok"], snapshot["available"]["sbx_ok"]) == (
        "999985.00",
        "999985.00",
    )
