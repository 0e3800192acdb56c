"""``cascade-gateway recon`` as its own process against a real stack: ``run`` finds an
injected discrepancy, then finance works the alert with ``alerts``, ``ack`` and ``resolve``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import Stack, StackFactory, new_id, withdrawal_body
from tests.faultkit import run_command


async def _cli(stack: Stack, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "GATEWAY_URL": stack.url,
        "OPS_API_TOKEN": "ops-token",
        "DATA_DIR": str(tmp_path),
        "DATABASE_URL": stack.settings.asyncpg_dsn,
        "CORE_URL": stack.settings.core_url or "",
        "CORE_TOKEN": stack.settings.core_token,
        "PROVIDERS_FILE": str(stack.settings.providers_file),
        "PUBLIC_URL": stack.url,
        "RECON_LEDGER_BUDGET": "50",
    }
    env.pop("NATS_URL", None)
    status, out, err = await run_command(env, "recon", *args)
    assert "Traceback" not in err, err
    return status, out, err


async def test_recon_run_then_the_alert_is_worked_from_the_terminal(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = await make_stack()
    wid = new_id()
    created = await stack.client.post(
        "/v1/withdrawals", json=withdrawal_body(wid, ["sbx_sync_ok"]), headers=stack.headers
    )
    assert created.status_code == 201, created.text
    await stack.wait_final(wid)
    detail = await stack.client.get(
        f"/ops/withdrawals/{wid}", headers={"Authorization": "Bearer ops-token"}
    )
    task_id = detail.json()["tasks"][0]["task_id"]
    lost = await stack.client.put(
        f"/sandbox/core/operations/{task_id}/fault", json={"fault": "lose"}
    )
    assert lost.status_code == 200

    status, out, err = await _cli(stack, tmp_path, "run")
    assert status == 0, err
    report = json.loads(out)
    assert (report["ran"], report["per_rule"]) == (True, {"ledger_parity": 1})

    status, out, _ = await _cli(stack, tmp_path, "alerts", "--state", "open", "--json")
    (alert,) = json.loads(out)["alerts"]
    assert alert["task_id"] == task_id
    alert_id = str(alert["alert_id"])
    status, out, err = await _cli(stack, tmp_path, "ack", alert_id, "--operator", "fin-bo")
    assert status == 0, err
    assert "acknowledged" in out
    status, _, err = await _cli(
        stack, tmp_path, "resolve", alert_id, "--operator", "fin-bo", "--reference", "CORE-77"
    )
    assert status == 0, err
    status, _, err = await _cli(stack, tmp_path, "ack", alert_id, "--operator", "fin-bo")
    assert status == 3
    assert "illegal_transition" in err
    status, out, _ = await _cli(stack, tmp_path, "alerts")
    assert f"#{alert_id}  resolved" in out
