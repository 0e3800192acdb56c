"""A release manager drives ``withdrawals.cascade`` on a real Unleash server; the gateway follows.

npm ``unleash-server`` 8.x runs on a database of its own in the suite's Postgres. The gateway
polls it every second (``UNLEASH_REFRESH_SECONDS=1``) and starts from a bootstrap file that says
the opposite (toggle disabled), so every cascade decision below can only come from the server.
"""

from __future__ import annotations

import secrets
import shutil
import time
from typing import Any

import pytest

from flags.router import TOGGLE
from tests.conftest import (
    Services,
    Stack,
    StackFactory,
    create_database,
    flags_document,
    new_id,
    withdrawal_body,
)
from tests.unleash_server import UnleashAdmin, running_unleash
from tests.waiting import wait_until

OPS = {"Authorization": "Bearer ops-token"}
FLIP_DEADLINE = 15.0


async def _create(stack: Stack, merchant: str, providers: list[str]) -> dict[str, Any]:
    """Create a withdrawal and return the routing decision stored with it."""
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals",
        headers=stack.headers,
        json=withdrawal_body(wid, providers, merchant=merchant),
    )
    assert response.status_code == 201, response.text
    return await _detail(stack, wid)


async def _detail(stack: Stack, wid: str) -> dict[str, Any]:
    response = await stack.client.get(f"/ops/withdrawals/{wid}", headers=OPS)
    assert response.status_code == 200, response.text
    detail: dict[str, Any] = response.json()
    return detail


async def _until_cohort(stack: Stack, merchant: str, cohort: str) -> tuple[float, dict[str, Any]]:
    """Create withdrawals for ``merchant`` until one lands in ``cohort``; the seconds it took."""
    start = time.monotonic()
    detail = await wait_until(
        lambda: _create(stack, merchant, ["sbx_sync_ok"]),
        done=lambda detail: detail["cohort"] == cohort,
        timeout=FLIP_DEADLINE,
        interval=0.05,
        what=f"a withdrawal of {merchant} to go {cohort}",
    )
    return time.monotonic() - start, detail


@pytest.mark.e2e
async def test_release_manager_flips_merchants_on_a_live_unleash(
    services: Services, make_stack: StackFactory
) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: cannot run a real unleash-server")
    began = time.monotonic()
    database = f"unleash_{secrets.token_hex(6)}"
    await create_database(services.admin_dsn, database)
    async with running_unleash(services.dsn(database), services.workdir) as unleash:
        started = time.monotonic() - began
        admin = UnleashAdmin(unleash)
        try:
            merchant = new_id("m")
            bystander = new_id("m")
            await admin.define_merchant_context()
            await admin.create_toggle(TOGGLE)
            strategy = await admin.add_allow_list(TOGGLE, ["m_pilot"])
            await admin.enable(TOGGLE)

            stack = await make_stack(
                flags=flags_document(enabled=False),
                env={
                    "UNLEASH_URL": unleash.api_url,
                    "UNLEASH_API_TOKEN": unleash.client_token,
                    "UNLEASH_REFRESH_SECONDS": "1",
                },
            )
            ready = await stack.client.get("/readyz")
            assert ready.status_code == 200, ready.text
            first = await _create(stack, merchant, ["sbx_sync_ok"])
            assert (first["cohort"], first["routing_reason"]) == ("legacy", "not_targeted")
            assert first["flag_state"]["source"] == "server"

            # Add the merchant to the allow-list: its next withdrawals go cascade.
            await admin.set_allow_list(TOGGLE, strategy, ["m_pilot", merchant])
            added, on = await _until_cohort(stack, merchant, "cascade")
            assert on["routing_reason"] == "allow_list"
            assert on["flag_state"]["source"] == "server"
            assert on["flag_state"]["strategies"] == [
                {"name": "flexibleRollout", "kind": "allow_list", "merchants": 2}
            ]
            other = await _create(stack, bystander, ["sbx_sync_ok"])
            assert other["cohort"] == "legacy"

            # An in-flight cascade withdrawal (its provider never answers) ...
            in_flight = await _create(stack, merchant, ["sbx_silent"])
            assert in_flight["cohort"] == "cascade"

            # ... keeps its cohort when the merchant is taken off the list.
            await admin.set_allow_list(TOGGLE, strategy, ["m_pilot"])
            removed, off = await _until_cohort(stack, merchant, "legacy")
            assert off["routing_reason"] == "not_targeted"
            kept = await _detail(stack, in_flight["withdrawal_id"])
            assert (kept["cohort"], kept["routing_reason"]) == ("cascade", "allow_list")
            assert kept["queue"]["state"] == "ACTIVE"
            assert kept["flag_state"] == in_flight["flag_state"]

            # Back on the list, then Unleash dies: routing continues from the last known state.
            await admin.set_allow_list(TOGGLE, strategy, ["m_pilot", merchant])
            await _until_cohort(stack, merchant, "cascade")
            unleash.kill()
            router = stack.runtime.router
            assert router is not None
            await wait_until(
                router.describe,
                done=lambda flags: flags["source"] == "backup",
                timeout=10,
                interval=0.05,
                what="the router to route from its backup",
            )
            after = await _create(stack, merchant, ["sbx_sync_ok"])
            assert (after["cohort"], after["routing_reason"]) == ("cascade", "allow_list")
            assert after["flag_state"]["source"] == "backup"
            assert (await _create(stack, bystander, ["sbx_sync_ok"]))["cohort"] == "legacy"
            assert (await stack.client.get("/readyz")).status_code == 200
        finally:
            await admin.aclose()
    total = time.monotonic() - began
    print(
        f"\nlive Unleash: server ready in {started:.1f} s; flag flip → effect: "
        f"add {added:.2f} s, remove {removed:.2f} s (refresh 1 s); whole test {total:.1f} s"
    )
