"""``cascade-gateway providers`` as its own process against a real stack: the table, one
provider in full, a drain and a close by hand that the gateway records, and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.conftest import Stack, StackFactory, providers_document
from tests.faultkit import run_command


async def _cli(stack: Stack, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "GATEWAY_URL": stack.url,
        "OPS_API_TOKEN": "ops-token",
        "DATA_DIR": str(tmp_path),
        "DATABASE_URL": stack.settings.asyncpg_dsn,
    }
    env.pop("NATS_URL", None)
    status, out, err = await run_command(env, "providers", *args)
    assert "Traceback" not in err, err
    return status, out, err


async def test_operators_list_show_drain_and_restore_a_provider(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    providers: dict[str, Any] = providers_document()
    providers["providers"]["sbx_ok"]["rate_limit"] = {"per_second": 20, "burst": 4}
    providers["providers"]["sbx_ok"]["max_in_flight"] = 10
    providers["providers"]["sbx_decline"]["breaker"] = None
    stack = await make_stack(providers=providers, with_worker=False)

    status, out, err = await _cli(stack, tmp_path, "list")
    assert status == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:2] == ["PROVIDER", "BREAKER"]
    by_id = {row.split()[0]: row for row in rows}
    assert set(by_id) == set(stack.runtime.engine.configs)
    assert "20/s burst 4, in flight 10, hold 900s" in by_id["sbx_ok"]
    assert by_id["sbx_decline"].split()[1] == "disabled"

    status, out, err = await _cli(
        stack, tmp_path, "open", "sbx_ok", "--seconds", "600", "--reason", "PSP maintenance",
        "--operator", "oncall-kim",
    )  # fmt: skip
    assert status == 0, err
    assert out.startswith("sbx_ok: breaker open until ")
    assert "by oncall-kim" in out.splitlines()[0]
    status, out, err = await _cli(stack, tmp_path, "show", "sbx_ok", "--json")
    assert status == 0, err
    shown = json.loads(out)
    assert (shown["state"], shown["limits"]["max_in_flight"]) == ("open", 10)
    status, out, err = await _cli(stack, tmp_path, "show", "sbx_ok")
    assert status == 0, err
    assert "breaker          open until" in out
    assert ", by ops:oncall-kim: PSP maintenance (window then:" in out
    assert "policy           open at 50% of at least 20 calls in 60s" in out

    status, out, err = await _cli(
        stack, tmp_path, "close", "sbx_ok", "--reason", "fixed", "--operator", "oncall-kim"
    )
    assert status == 0, err
    assert out.startswith("sbx_ok: breaker closed, by oncall-kim")


async def test_the_command_says_what_is_wrong_and_exits_as_its_siblings(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    providers: dict[str, Any] = providers_document()
    providers["providers"]["sbx_decline"]["breaker"] = None
    stack = await make_stack(providers=providers, with_worker=False)
    status, _, err = await _cli(
        stack, tmp_path, "open", "sbx_decline", "--seconds", "60", "--reason", "x",
        "--operator", "kim",
    )  # fmt: skip
    assert status == 3
    assert "no_breaker" in err
    status, _, err = await _cli(stack, tmp_path, "show", "nope")
    assert status == 2
    assert "No provider 'nope'" in err
    status, _, err = await _cli(
        stack, tmp_path, "open", "sbx_ok", "--seconds", "0", "--reason", "x", "--operator", "kim"
    )
    assert status == 2
    assert "--seconds: must be a number of seconds above 0" in err
    status, _, err = await _cli(stack, tmp_path, "close", "sbx_ok", "--reason", "x")
    assert status == 2
    assert "--operator" in err
    env = {**os.environ, "GATEWAY_URL": "http://127.0.0.1:9", "DATA_DIR": str(tmp_path)}
    env.pop("NATS_URL", None)
    env["DATABASE_URL"] = stack.settings.asyncpg_dsn
    status, _, err = await run_command(env, "providers", "list")
    assert status == 2
    assert "cannot reach the gateway" in err
