"""``cascade-gateway flags`` (the installed console script) moves real routing: a running
gateway's on a flags file, and a real Unleash server's, read by the router's real client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.embedded import free_port
from flags.router import TOGGLE, CohortRouter, RoutingDecision
from tests.conftest import (
    ROOT,
    Services,
    StackFactory,
    create_database,
    flags_document,
    new_id,
    withdrawal_body,
)
from tests.faultkit import stack_env
from tests.unleash_server import UnleashAdmin, running_unleash
from tests.waiting import wait_until

COMMAND = Path(sys.executable).parent / "cascade-gateway"
OPS = {"Authorization": "Bearer ops-token"}
API = {"Authorization": "Bearer dev-token"}
# Variables of the developer's shell that would point the command elsewhere.
_OWN = ("FLAGS_FILE", "UNLEASH_URL", "UNLEASH_ADMIN_TOKEN", "UNLEASH_API_TOKEN", "DATA_DIR")


async def flags(env: Mapping[str, str], *argv: str) -> tuple[int, list[str], list[str]]:
    """Run ``cascade-gateway flags ARGV``: exit status, stdout lines, stderr lines."""
    base = {k: v for k, v in os.environ.items() if k not in _OWN and not k.startswith("UNLEASH")}
    process = await asyncio.create_subprocess_exec(
        str(COMMAND),
        "flags",
        *argv,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode().splitlines(), err.decode().splitlines()


async def run_ok(env: Mapping[str, str], *argv: str) -> list[str]:
    """Run ``cascade-gateway flags ARGV``, which must succeed quietly on stderr: its stdout."""
    status, out, err = await flags(env, *argv)
    assert (status, err) == (0, []), (argv, out, err)
    return out


@contextlib.asynccontextmanager
async def serving(env: Mapping[str, str], log_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A ``cascade-gateway serve`` process, ready; a client of it. Stopped when the block ends."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(COMMAND), "serve"],
            env=dict(env),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['HTTP_PORT']}", timeout=10)

    async def ready() -> bool:
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
        try:
            return (await client.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        await wait_until(ready, timeout=60, interval=0.05, what="the gateway process to be ready")
        yield client
    finally:
        await client.aclose()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 10)


@pytest.mark.e2e
async def test_flags_allow_moves_a_gateway_process_through_its_flags_file(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    # The stack's database, broker and sandbox; the gateway under test is a process of its own.
    stack = await make_stack()
    flags_file = tmp_path / "flags.json"
    flags_file.write_text(json.dumps(flags_document(enabled=True, merchants=["m_a"])))
    env = stack_env(
        stack,
        HTTP_PORT=str(free_port()),
        FLAGS_FILE=str(flags_file),
        UNLEASH_REFRESH_SECONDS="1",
        SANDBOX_ENABLED="false",
        GATEWAY_API_TOKENS="dev-token",
        DATA_DIR=str(tmp_path),
    )
    merchant = new_id("m")
    async with serving(env, tmp_path / "serve.log") as gateway:

        async def cohort() -> str:
            wid = new_id()
            body = withdrawal_body(wid, ["sbx_sync_ok"], merchant=merchant)
            created = await gateway.post("/v1/withdrawals", headers=API, json=body)
            assert created.status_code == 201, created.text
            detail = await gateway.get(f"/ops/withdrawals/{wid}", headers=OPS)
            value: str = detail.json()["cohort"]
            return value

        assert await cohort() == "legacy"
        out = await run_ok(env, "allow", merchant)
        assert out[1] == f"  allow-list: m_a → {', '.join(sorted(['m_a', merchant]))}"
        await wait_until(
            cohort, done=lambda c: c == "cascade", timeout=15, what=f"{merchant} to go cascade"
        )
        await run_ok(env, "kill", "on")
        await wait_until(
            cohort, done=lambda c: c == "legacy", timeout=15, what="every merchant to go legacy"
        )
    assert "changed: new withdrawals route by revision" in (tmp_path / "serve.log").read_text()


def _decision(router: CohortRouter, merchant: str) -> RoutingDecision:
    return router.decide(merchant)


async def _routed(router: CohortRouter, merchant: str, cohort: str, reason: str) -> None:
    await wait_until(
        lambda: _decision(router, merchant),
        done=lambda d: (d.cohort, d.reason) == (cohort, reason),
        timeout=15,
        interval=0.05,
        what=f"the live router to route {merchant} {cohort} ({reason})",
    )


async def _strategies(router: CohortRouter, expected: list[dict[str, Any]]) -> None:
    await wait_until(
        lambda: _decision(router, "m_probe").flag_state.get("strategies"),
        done=lambda s: s == expected,
        timeout=15,
        interval=0.05,
        what=f"the live router to hold the strategies {expected}",
    )


@pytest.mark.e2e
async def test_flags_command_drives_a_real_unleash_server(
    services: Services, tmp_path: Path
) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: cannot run a real unleash-server")
    database = f"unleash_{secrets.token_hex(6)}"
    await create_database(services.admin_dsn, database)
    async with running_unleash(services.dsn(database), services.workdir) as unleash:
        admin = UnleashAdmin(unleash)
        try:
            await admin.define_merchant_context()
            await admin.create_toggle(TOGGLE)  # no strategy yet, off in every environment
        finally:
            await admin.aclose()
        env = {
            "UNLEASH_URL": unleash.api_url,
            "UNLEASH_ADMIN_TOKEN": unleash.admin_token,
            # The gateway's client token names the environment the command changes.
            "UNLEASH_API_TOKEN": unleash.client_token,
            "UNLEASH_REFRESH_SECONDS": "1",
        }
        bootstrap = tmp_path / "bootstrap.json"
        bootstrap.write_text(json.dumps(flags_document(enabled=False)))
        router = CohortRouter(
            flags_file=bootstrap,
            unleash_url=unleash.api_url,
            unleash_token=unleash.client_token,
            refresh_interval=1,
        )
        await asyncio.to_thread(router.start)
        try:
            await _drive(router, env, unleash.api_url, unleash.client_token)
        finally:
            await asyncio.to_thread(router.close)


async def _drive(router: CohortRouter, env: dict[str, str], url: str, client_token: str) -> None:
    await _first_merchant(router, env, url)
    await _rollout_kill_and_back(router, env)
    # A client token is not an admin token: one line, exit 2.
    status, out, err = await flags({**env, "UNLEASH_ADMIN_TOKEN": client_token}, "show")
    assert (status, out, len(err)) == (2, [], 1)
    assert err[0].startswith(f"cascade-gateway: flags show: Unleash at {url} refused the token")


async def _first_merchant(router: CohortRouter, env: dict[str, str], url: str) -> None:
    """From a toggle without strategies to one merchant on the cascade."""
    where = f"withdrawals.cascade in Unleash {url} (project default, environment development)"
    when = (
        "New withdrawals see it within 1 s (the gateway polls Unleash every"
        " UNLEASH_REFRESH_SECONDS); withdrawals already created keep their cohort."
    )
    assert await run_ok(env, "show") == [
        where,
        "  kill switch: on (every new withdrawal goes legacy)",
        "  allow-list: nobody",
        "  rollout: none",
        "  strategies: none",
    ]
    # Unleash would add a 100 % rollout to a toggle switched on without strategies.
    status, _, err = await flags(env, "kill", "off")
    assert status == 2
    assert err[0].startswith("cascade-gateway: flags kill: the toggle has no strategy")

    assert await run_ok(env, "allow", "m_x") == [
        where,
        "  allow-list: nobody → m_x",
        "  note: the kill switch is on: every new withdrawal stays legacy until `flags kill off`",
        when,
    ]
    assert (await run_ok(env, "kill", "off"))[1] == (
        "  kill switch: on (every new withdrawal goes legacy) → off (toggle enabled)"
    )
    await _routed(router, "m_x", "cascade", "allow_list")
    assert _decision(router, "m_y").cohort == "legacy"
    assert _decision(router, "m_x").flag_state["source"] == "server"


async def _rollout_kill_and_back(router: CohortRouter, env: dict[str, str]) -> None:
    """A second merchant, a 30 % rollout, the kill switch, then everyone off again."""
    await run_ok(env, "allow", "m_y")
    await _routed(router, "m_y", "cascade", "allow_list")
    assert (await run_ok(env, "rollout", "30"))[1] == (
        "  rollout: none → 30 % of merchants (stickiness merchantId)"
    )
    listed = {"name": "flexibleRollout", "kind": "allow_list", "merchants": 2}
    rollout = {
        "name": "flexibleRollout",
        "kind": "rollout",
        "rollout": 30,
        "stickiness": "merchantId",
    }
    await _strategies(router, [listed, rollout])
    merchants = [f"m_{i:04d}" for i in range(400)]
    share = sum(_decision(router, m).cohort == "cascade" for m in merchants) / len(merchants)
    # 400 Bernoulli(0.3) draws: sd 2.3 points; ±10 points is over 4 sd.
    assert abs(share - 0.30) < 0.10, share
    shown = json.loads("\n".join(await run_ok(env, "show", "--json")))
    assert (shown["allow_list"], shown["rollout"], shown["kill_switch"]) == (
        ["m_x", "m_y"],
        30,
        "off",
    )

    await run_ok(env, "kill", "on")
    await _routed(router, "m_x", "legacy", "disabled")
    await run_ok(env, "kill", "off")
    await _routed(router, "m_x", "cascade", "allow_list")

    # Off the list: m_x's list keeps m_y; m_y's removal deletes the emptied strategy.
    assert (await run_ok(env, "disallow", "m_x"))[1] == "  allow-list: m_x, m_y → m_y"
    out = await run_ok(env, "disallow", "m_y")
    assert out[1] == "  allow-list: m_y → nobody"
    await _strategies(router, [rollout])
    assert (await run_ok(env, "rollout", "0"))[1] == (
        "  rollout: 30 % of merchants (stickiness merchantId) → 0 % of merchants"
        " (stickiness merchantId)"
    )
    await _routed(router, "m_x", "legacy", "not_targeted")
