"""Manual checks resolved by support, and cancellation at every task state, end to end."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from orchestrator.domain import CancelRequested
from tests.conftest import Stack, StackFactory, new_id, providers_document, withdrawal_body
from tests.waiting import wait_until

OPS = {"Authorization": "Bearer ops-token", "X-Operator": "alice"}


async def _create(stack: Stack, providers: list[str]) -> str:
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, providers)
    )
    assert response.status_code == 201, response.text
    return wid


async def _tasks(stack: Stack, wid: str) -> list[dict[str, Any]]:
    response = await stack.client.get(f"/ops/withdrawals/{wid}", headers=OPS)
    assert response.status_code == 200
    tasks: list[dict[str, Any]] = response.json()["tasks"]
    return tasks


async def _wait_task_state(
    stack: Stack, wid: str, position: int, state: str, timeout: float = 20
) -> dict[str, Any]:
    tasks = await wait_until(
        lambda: _tasks(stack, wid),
        done=lambda tasks: tasks[position]["state"] == state,
        timeout=timeout,
        interval=0.05,
        what=f"task {position} of {wid} in {state}",
    )
    return tasks[position]


async def _ledger_ok(stack: Stack, wid: str) -> dict[str, str]:
    ledger = await stack.ledger()
    assert ledger["violations"] == []
    states = {
        d["provider_id"]: d["state"]
        for d in ledger["operation_details"].values()
        if d["withdrawal_id"] == wid
    }
    assert "frozen" not in states.values(), states
    return states


@pytest.mark.parametrize(
    ("decision", "status", "ledger"),
    [
        ("positive", "succeeded", "committed"),
        ("negative", "failed", "rolled_back"),
    ],
)
async def test_manual_check_resolution(
    make_stack: StackFactory, decision: str, status: str, ledger: str
) -> None:
    stack = await make_stack()
    wid = await _create(stack, ["sbx_silent"])
    task = await _wait_task_state(stack, wid, 0, "MANUAL_CHECK")
    listed = (await stack.client.get("/ops/manual-checks", headers=OPS)).json()["manual_checks"]
    assert [(c["task_id"], c["withdrawal_id"]) for c in listed] == [(task["task_id"], wid)]
    assert (await stack.withdrawal(wid))["status"] == "processing"  # never leaks
    response = await stack.client.post(
        f"/ops/tasks/{task['task_id']}/resolve",
        headers=OPS,
        json={"decision": decision, "reason": "statement says so"},
    )
    assert response.status_code == 200, response.text
    final = await stack.wait_final(wid)
    assert final["status"] == status
    if status == "failed":
        assert final["failure_code"] == "manual_rejected"
    assert await _ledger_ok(stack, wid) == {"sbx_silent": ledger}
    events = (await stack.client.get(f"/ops/withdrawals/{wid}", headers=OPS)).json()["events"]
    resolution = [e for e in events if e["event"].startswith("manual.resolved")]
    assert len(resolution) == 1
    assert resolution[0]["actor"] == "ops:alice"
    assert resolution[0]["details"]["reason"] == "statement says so"
    again = await stack.client.post(
        f"/ops/tasks/{task['task_id']}/resolve",
        headers=OPS,
        json={"decision": decision, "reason": "twice"},
    )
    assert again.status_code == 409


async def test_concurrent_resolutions_one_wins_the_other_gets_409(
    make_stack: StackFactory,
) -> None:
    """Positive and negative at once: whichever takes the lock first is applied; the other
    answers 409 ``not_in_manual_check`` (it passed the check before the lock, then found the
    task decided), never a 200 showing the other decision's state."""
    stack = await make_stack()
    wid = await _create(stack, ["sbx_silent"])
    task = await _wait_task_state(stack, wid, 0, "MANUAL_CHECK")

    async def resolve(decision: str) -> Any:
        return await stack.client.post(
            f"/ops/tasks/{task['task_id']}/resolve",
            headers=OPS,
            json={"decision": decision, "reason": f"{decision} by a colleague"},
        )

    answers = await asyncio.gather(resolve("positive"), resolve("negative"))
    assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
    won = next(a for a in answers if a.status_code == 200).json()["state"]
    lost = next(a for a in answers if a.status_code == 409).json()
    assert lost["error"]["code"] == "not_in_manual_check"
    assert won in lost["error"]["message"]
    events = (await stack.client.get(f"/ops/withdrawals/{wid}", headers=OPS)).json()["events"]
    assert len([e for e in events if e["event"].startswith("manual.resolved")]) == 1
    await _ledger_ok(stack, wid)


async def test_a_negative_decision_on_an_order_the_provider_paid_is_refused(
    make_stack: StackFactory,
) -> None:
    """Support says "never paid", the provider's status says succeeded (its webhook is still
    on its way): the status wins, the withdrawal succeeds with one commit, no second provider
    is tried, and support gets 409 with the provider's answer."""
    stack = await make_stack()
    wid = await _create(stack, ["sbx_silent", "sbx_ok"])
    task = await _wait_task_state(stack, wid, 0, "MANUAL_CHECK")
    await stack.worker.stop(grace=3)  # the success webhook below is left undelivered
    paid = await stack.client.post(
        f"/sandbox/providers/sbx_silent/orders/{task['provider_reference']}/status",
        json={"status": "succeeded"},
    )
    assert paid.status_code == 200, paid.text
    response = await stack.client.post(
        f"/ops/tasks/{task['task_id']}/resolve",
        headers=OPS,
        json={"decision": "negative", "reason": "statement shows nothing"},
    )
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "provider_paid"
    assert task["provider_reference"] in error["message"]
    assert (await stack.withdrawal(wid))["status"] == "succeeded"
    assert await _ledger_ok(stack, wid) == {"sbx_silent": "committed"}
    events = (await stack.client.get(f"/ops/withdrawals/{wid}", headers=OPS)).json()["events"]
    assert "manual.refused.provider_paid" in [e["event"] for e in events]


async def test_ops_api_refuses_bad_input(make_stack: StackFactory) -> None:
    stack = await make_stack()
    assert (await stack.client.get("/ops/manual-checks")).status_code == 401
    assert (await stack.client.get("/ops/manual-checks", headers=stack.headers)).status_code == 401
    unknown = await stack.client.post(
        "/ops/tasks/not-a-uuid/resolve", headers=OPS, json={"decision": "positive", "reason": "x"}
    )
    assert unknown.status_code == 404
    wid = await _create(stack, ["sbx_silent"])
    task = await _wait_task_state(stack, wid, 0, "EXECUTING")
    bad = await stack.client.post(
        f"/ops/tasks/{task['task_id']}/resolve",
        headers=OPS,
        json={"decision": "maybe", "reason": "x"},
    )
    assert bad.status_code == 422
    early = await stack.client.post(
        f"/ops/tasks/{task['task_id']}/resolve",
        headers=OPS,
        json={"decision": "positive", "reason": "x"},
    )
    assert early.status_code == 409
    assert (await _tasks(stack, wid))[0]["state"] == "EXECUTING"  # nothing moved


async def test_a_resolution_without_an_operator_is_refused(make_stack: StackFactory) -> None:
    """The audit names who resolved: without ``X-Operator`` (missing, empty or blank) the
    answer is 422 naming the header, and the task, the ledger and the audit are unchanged."""
    stack = await make_stack()
    wid = await _create(stack, ["sbx_silent"])
    task = await _wait_task_state(stack, wid, 0, "MANUAL_CHECK")
    token = {"Authorization": OPS["Authorization"]}
    for headers in (token, {**token, "X-Operator": ""}):  # blank: tests/unit/test_ops_operator
        response = await stack.client.post(
            f"/ops/tasks/{task['task_id']}/resolve",
            headers=headers,
            json={"decision": "positive", "reason": "statement says so"},
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "validation_failed"
        assert "X-Operator" in error["message"]
    assert (await _tasks(stack, wid))[0]["state"] == "MANUAL_CHECK"
    assert (await stack.withdrawal(wid))["status"] == "processing"
    events = (await stack.client.get(f"/ops/withdrawals/{wid}", headers=OPS)).json()["events"]
    assert not [e for e in events if e["event"].startswith("manual.")]
    assert "ops:unknown" not in {e["actor"] for e in events}


async def _cancel(stack: Stack, wid: str) -> dict[str, Any]:
    response = await stack.client.post(f"/v1/withdrawals/{wid}/cancel", headers=stack.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_cancel_executing_with_provider_cancel(make_stack: StackFactory) -> None:
    stack = await make_stack()
    wid = await _create(stack, ["sbx_silent", "sbx_ok"])
    await _wait_task_state(stack, wid, 0, "EXECUTING")
    await _cancel(stack, wid)
    final = await stack.wait_final(wid)
    assert (final["status"], final["failure_code"]) == ("cancelled", "cancelled")
    # The provider that was executing it, not the one cancelled before it was tried.
    assert final["provider_id"] == "sbx_silent"
    tasks = await _tasks(stack, wid)
    assert [t["state"] for t in tasks] == ["CANCELLED", "CANCELLED"]
    assert await _ledger_ok(stack, wid) == {"sbx_silent": "rolled_back"}
    assert (await _cancel(stack, wid))["status"] == "cancelled"  # idempotent


def _no_cancel_providers() -> dict[str, Any]:
    doc = providers_document()
    doc["providers"]["sbx_silent"]["supports_cancel"] = False
    doc["providers"]["sbx_silent"]["webhook_sla_seconds"] = 60
    return doc


@pytest.mark.parametrize(
    ("outcome", "status"), [("failed", "cancelled"), ("succeeded", "succeeded")]
)
async def test_cancel_waits_for_a_provider_that_cannot_cancel(
    make_stack: StackFactory, outcome: str, status: str
) -> None:
    stack = await make_stack(providers=_no_cancel_providers())
    wid = await _create(stack, ["sbx_silent", "sbx_ok"])
    task = await _wait_task_state(stack, wid, 0, "EXECUTING")
    assert (await _cancel(stack, wid))["status"] == "processing"
    tasks = await _tasks(stack, wid)
    assert tasks[1]["state"] == "CANCELLED"  # pending work stops at once
    set_status = await stack.client.post(
        f"/sandbox/providers/sbx_silent/orders/{task['provider_reference']}/status",
        json={"status": outcome},
    )
    assert set_status.status_code == 200
    final = await stack.wait_final(wid)
    assert final["status"] == status  # a success that won the race is kept
    expected = "committed" if outcome == "succeeded" else "rolled_back"
    assert await _ledger_ok(stack, wid) == {"sbx_silent": expected}


async def test_cancel_while_rechecking_completes_on_proof(make_stack: StackFactory) -> None:
    stack = await make_stack()
    script = await stack.client.post(
        "/sandbox/providers/sbx_flaky/script", json={"outcomes": ["absent"]}
    )
    assert script.status_code == 200, script.text
    wid = await _create(stack, ["sbx_flaky", "sbx_ok"])
    await _wait_task_state(stack, wid, 0, "RECHECKING")
    await _cancel(stack, wid)
    final = await stack.wait_final(wid)
    assert final["status"] == "cancelled"
    assert await _ledger_ok(stack, wid) == {"sbx_flaky": "rolled_back"}


async def test_cancel_in_manual_check_then_support_decides(make_stack: StackFactory) -> None:
    stack = await make_stack()
    wid = await _create(stack, ["sbx_silent", "sbx_ok"])
    task = await _wait_task_state(stack, wid, 0, "MANUAL_CHECK")
    assert (await _cancel(stack, wid))["status"] == "processing"
    response = await stack.client.post(
        f"/ops/tasks/{task['task_id']}/resolve",
        headers=OPS,
        json={"decision": "negative", "reason": "not paid"},
    )
    assert response.status_code == 200
    final = await stack.wait_final(wid)
    assert final["status"] == "cancelled"
    assert await _ledger_ok(stack, wid) == {"sbx_silent": "rolled_back"}


async def test_cancel_final_withdrawals(make_stack: StackFactory) -> None:
    stack = await make_stack()
    wid = await _create(stack, ["sbx_sync_ok"])
    assert (await stack.wait_final(wid))["status"] == "succeeded"
    response = await stack.client.post(f"/v1/withdrawals/{wid}/cancel", headers=stack.headers)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "not_cancellable"


async def test_a_cancel_cut_off_before_reaching_the_active_task_is_delivered_by_the_next(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue's cancel flag committed, then the process died before the active task heard
    of it: cancelling again must still reach the task (and the provider)."""
    stack = await make_stack()
    wid = await _create(stack, ["sbx_silent", "sbx_ok"])
    await _wait_task_state(stack, wid, 0, "EXECUTING")
    engine = stack.runtime.engine
    drive = engine._drive

    async def dies_on_the_cancel(*args: Any, **kwargs: Any) -> None:
        if isinstance(args[2], CancelRequested):
            raise RuntimeError("worker died after committing the queue's flag")
        await drive(*args, **kwargs)

    monkeypatch.setattr(engine, "_drive", dies_on_the_cancel)
    with pytest.raises(RuntimeError):
        await engine.cancel_queue(
            uuid.UUID((await _tasks(stack, wid))[0]["queue_id"]), reason=None, actor="test"
        )
    monkeypatch.setattr(engine, "_drive", drive)
    tasks = await _tasks(stack, wid)
    assert (tasks[0]["state"], tasks[0]["cancel_requested"]) == ("EXECUTING", False)
    assert tasks[1]["state"] == "CANCELLED"

    await _cancel(stack, wid)
    final = await stack.wait_final(wid)
    assert (final["status"], final["failure_code"]) == ("cancelled", "cancelled")
    assert await _ledger_ok(stack, wid) == {"sbx_silent": "rolled_back"}
