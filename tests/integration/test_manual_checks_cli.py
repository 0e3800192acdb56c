"""``cascade-gateway manual-checks`` against a real gateway: what support sees and decides.

The command runs as its own process (as support runs it), against a stack served over real
HTTP; its environment names the gateway and the ops token explicitly, and a ``DATA_DIR``
without a stack file, so that a ``make run`` on the same machine is never picked up.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.embedded import free_port
from tests.conftest import (
    Stack,
    StackFactory,
    new_id,
    providers_document,
    withdrawal_body,
)
from tests.faultkit import run_command
from tests.waiting import wait_until

OPS = {"Authorization": "Bearer ops-token", "X-Operator": "tester"}


@dataclass(frozen=True)
class Ran:
    status: int
    out: str
    err: str


async def _cli(url: str, tmp_path: Path, *args: str, token: str = "ops-token") -> Ran:
    env = {
        **os.environ,
        "GATEWAY_URL": url,
        "OPS_API_TOKENS": f"{token},another",
        "DATA_DIR": str(tmp_path),
    }
    for name in ("OPS_API_TOKEN", "DATABASE_URL", "NATS_URL"):
        env.pop(name, None)
    status, out, err = await run_command(env, "manual-checks", *args)
    assert "Traceback" not in err, err
    return Ran(status, out, err)


async def _in_manual_check(stack: Stack, providers: list[str]) -> tuple[str, dict[str, Any]]:
    """A new withdrawal whose first attempt waits in MANUAL_CHECK: its id and that task."""
    wid = new_id()
    created = await stack.client.post(
        "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, providers)
    )
    assert created.status_code == 201, created.text

    async def first_task() -> dict[str, Any]:
        detail = await stack.client.get(f"/ops/withdrawals/{wid}", headers=OPS)
        task: dict[str, Any] = detail.json()["tasks"][0]
        return task

    task = await wait_until(
        first_task,
        done=lambda t: t["state"] == "MANUAL_CHECK",
        timeout=30,
        interval=0.1,
        what=f"{wid} in MANUAL_CHECK",
    )
    return wid, task


async def _events(stack: Stack, wid: str) -> list[dict[str, Any]]:
    detail = await stack.client.get(f"/ops/withdrawals/{wid}", headers=OPS)
    events: list[dict[str, Any]] = detail.json()["events"]
    return events


async def test_list_and_show_give_what_a_provider_statement_is_checked_against(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = await make_stack()
    empty = await _cli(stack.url, tmp_path, "list")
    assert (empty.status, empty.out.strip()) == (0, "No withdrawal is waiting for a manual check.")
    wid, task = await _in_manual_check(stack, ["sbx_silent"])

    listed = await _cli(stack.url, tmp_path, "list")
    assert listed.status == 0, listed.err
    header, row = listed.out.splitlines()[:2]
    for column in ("WAITED", "WITHDRAWAL", "MERCHANT", "AMOUNT", "DESTINATION", "PROVIDER"):
        assert column in header
    for value in (wid, "m_1001", "250.00 EUR", "iban DE89**************3000 (J. D.)"):
        assert value in row, row
    for value in ("sbx_silent", task["provider_order_id"], task["provider_reference"]):
        assert value in row, row
    assert "DE89370400440532013000" not in listed.out  # the account is masked
    assert task["task_id"] in row

    as_json = json.loads((await _cli(stack.url, tmp_path, "list", "--json")).out)
    [check] = as_json["manual_checks"]
    assert check["destination"] == {
        "type": "iban",
        "account": "DE89**************3000",
        "holder": "J. D.",
    }
    assert check["provider_order_id"] == task["provider_order_id"]
    assert check["waited_seconds"] >= 0
    answers = check["provider_answers"]
    # The create accepted the order (pending), then each status poll found it pending.
    assert [(a["source"], a["status"]) for a in answers] == [("create", "pending")] + [
        ("poll", "pending")
    ] * task["status_polls"], answers
    assert all(a["reference"] == task["provider_reference"] for a in answers)

    for case in (task["task_id"], wid):
        shown = await _cli(stack.url, tmp_path, "show", case)
        assert shown.status == 0, shown.err
        for value in (wid, "250.00 EUR", "DE89**************3000", task["provider_order_id"]):
            assert value in shown.out
        assert f"provider answers    {len(answers)}" in shown.out
        assert "MANUAL_CHECK for " in shown.out
        assert shown.out.count(" poll      pending") == task["status_polls"], shown.out
    shown_json = json.loads((await _cli(stack.url, tmp_path, "show", wid, "--json")).out)
    assert len(shown_json["tasks"][0]["provider_answers"]) == len(answers)

    missing = await _cli(stack.url, tmp_path, "show", "wd_nobody")
    assert missing.status == 2
    assert missing.err.count("\n") == 1
    assert "no withdrawal has the id 'wd_nobody'" in missing.err


async def test_resolve_needs_an_operator_and_names_them_in_the_audit(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = await make_stack()
    (paid, paid_task), (unpaid, unpaid_task) = await asyncio.gather(
        _in_manual_check(stack, ["sbx_silent"]), _in_manual_check(stack, ["sbx_silent"])
    )
    decide = ("resolve", paid_task["task_id"], "--decision", "positive", "--reason", "statement")
    nobody = await _cli(stack.url, tmp_path, *decide)
    assert nobody.status == 2
    assert "the following arguments are required: --operator" in nobody.err
    blank = await _cli(stack.url, tmp_path, *decide, "--operator", "  ")
    assert blank.status == 2
    assert "--operator: must name who decides" in blank.err
    assert (await _events(stack, paid))[-1]["event"] != "manual.resolved.positive"

    done = await _cli(stack.url, tmp_path, *decide, "--operator", "alice")
    assert done.status == 0, done.err
    assert f"task {paid_task['task_id']} at sbx_silent is SUCCEEDED" in done.out
    assert "by alice" in done.out
    negative = await _cli(  # by the withdrawal's id: its one task waiting, at that provider
        stack.url,
        tmp_path,
        "resolve",
        unpaid,
        "--provider",
        "sbx_silent",
        "--decision",
        "negative",
        "--operator",
        "bob",
        "--reason",
        "not on the statement",
        "--json",
    )
    assert negative.status == 0, negative.err
    assert json.loads(negative.out) == {"task_id": unpaid_task["task_id"], "state": "FAILED"}
    assert (await stack.wait_final(paid))["status"] == "succeeded"
    assert (await stack.wait_final(unpaid))["status"] == "failed"
    for wid, actor, event in (
        (paid, "ops:alice", "manual.resolved.positive"),
        (unpaid, "ops:bob", "manual.resolved.negative"),
    ):
        events = await _events(stack, wid)
        [resolution] = [e for e in events if e["event"].startswith("manual.")]
        assert (resolution["event"], resolution["actor"]) == (event, actor)
        assert "ops:unknown" not in {e["actor"] for e in events}

    again = await _cli(stack.url, tmp_path, *decide, "--operator", "alice")
    assert again.status == 3
    assert "refused (409 not_in_manual_check)" in again.err


async def test_a_refused_negative_decision_shows_the_providers_answer(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    """Support says "not paid", the provider's status says paid: exit 3, the 409's code, and
    what the provider answered, with its reference."""
    stack = await make_stack()
    wid, task = await _in_manual_check(stack, ["sbx_silent", "sbx_ok"])
    await stack.worker.stop(grace=3)  # the success webhook is left undelivered
    paid = await stack.client.post(
        f"/sandbox/providers/sbx_silent/orders/{task['provider_reference']}/status",
        json={"status": "succeeded"},
    )
    assert paid.status_code == 200, paid.text
    refused = await _cli(
        stack.url,
        tmp_path,
        "resolve",
        task["task_id"],
        "--decision",
        "negative",
        "--operator",
        "carol",
        "--reason",
        "statement shows nothing",
    )
    assert refused.status == 3, refused.err
    first, evidence, hint = refused.err.splitlines()
    assert first.startswith("cascade-gateway: refused (409 provider_paid): ")
    assert task["provider_reference"] in first
    assert "provider_status succeeded" in evidence
    assert f"reference {task['provider_reference']}" in evidence
    assert "source poll" in evidence
    assert "committed" in hint
    assert (await stack.withdrawal(wid))["status"] == "succeeded"
    actors = {e["actor"] for e in await _events(stack, wid) if e["event"].startswith("manual.")}
    assert actors == {"ops:carol"}


async def test_errors_are_one_line_with_exit_status_2(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = await make_stack()
    wrong = await _cli(stack.url, tmp_path, "list", token="not-the-token")
    assert (wrong.status, wrong.err.count("\n")) == (2, 1), wrong.err
    assert "refused the ops token (401)" in wrong.err
    unknown = await _cli(
        stack.url,
        tmp_path,
        "resolve",
        "00000000-0000-4000-8000-000000000000",
        "--decision",
        "positive",
        "--operator",
        "alice",
        "--reason",
        "x",
    )
    assert (unknown.status, unknown.err.count("\n")) == (2, 1), unknown.err
    assert "No such task. (404 not_found)" in unknown.err
    decide = ("--decision", "positive", "--operator", "alice", "--reason", "x")
    bad_id = await _cli(stack.url, tmp_path, "resolve", "wd_nobody", *decide)
    assert (bad_id.status, bad_id.err.count("\n")) == (2, 1), bad_id.err
    assert "no task waiting in manual check has the id 'wd_nobody'" in bad_id.err
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    unreachable = await _cli(nowhere, tmp_path, "list")
    assert (unreachable.status, unreachable.err.count("\n")) == (2, 1), unreachable.err
    assert f"cannot reach the gateway at {nowhere}" in unreachable.err


async def test_a_decision_by_withdrawal_id_applies_only_to_the_provider_support_checked(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    """Support checked attempt 1 (provider A); a colleague resolved it negative and the
    cascade's attempt 2 (provider B) now waits in turn. A decision by withdrawal id names the
    provider checked, and is refused when the waiting attempt is at another: B is never
    committed or rolled back on a word about A."""
    doc = providers_document()
    doc["providers"]["sbx_silent-b"] = doc["providers"]["sbx_silent"]
    stack = await make_stack(providers=doc)
    wid, first = await _in_manual_check(stack, ["sbx_silent", "sbx_silent-b"])
    colleague = await stack.client.post(
        f"/ops/tasks/{first['task_id']}/resolve",
        headers=OPS,
        json={"decision": "negative", "reason": "not on the statement"},
    )
    assert colleague.status_code == 200, colleague.text

    async def second_task() -> dict[str, Any]:
        detail = await stack.client.get(f"/ops/withdrawals/{wid}", headers=OPS)
        task: dict[str, Any] = detail.json()["tasks"][1]
        return task

    second = await wait_until(
        second_task,
        done=lambda t: t["state"] == "MANUAL_CHECK",
        timeout=30,
        interval=0.1,
        what=f"{wid}'s second attempt in MANUAL_CHECK",
    )
    decide = ("--decision", "positive", "--operator", "alice", "--reason", "statement")
    unnamed = await _cli(stack.url, tmp_path, "resolve", wid, *decide)
    assert (unnamed.status, unnamed.err.count("\n")) == (2, 1), unnamed.err
    assert "needs --provider" in unnamed.err
    other = await _cli(stack.url, tmp_path, "resolve", wid, "--provider", "sbx_silent", *decide)
    assert (other.status, other.err.count("\n")) == (2, 1), other.err
    assert (
        f"withdrawal '{wid}' waits on sbx_silent-b now (task {second['task_id']}), not on"
        " sbx_silent: nothing was applied"
    ) in other.err
    by_task = await _cli(
        stack.url, tmp_path, "resolve", second["task_id"], "--provider", "sbx_silent", *decide
    )
    assert (by_task.status, by_task.err.count("\n")) == (2, 1), by_task.err
    assert "is the attempt at sbx_silent-b, not at sbx_silent" in by_task.err
    assert (await second_task())["state"] == "MANUAL_CHECK"
    decided = [e for e in await _events(stack, wid) if e["event"].startswith("manual.")]
    assert [e["task_id"] for e in decided] == [first["task_id"]]

    done = await _cli(stack.url, tmp_path, "resolve", wid, "--provider", "sbx_silent-b", *decide)
    assert done.status == 0, done.err
    assert done.out.strip() == (
        f"task {second['task_id']} at sbx_silent-b is SUCCEEDED: positive decision by alice,"
        " kept in the audit trail"
    )
    assert (await stack.wait_final(wid))["status"] == "succeeded"
