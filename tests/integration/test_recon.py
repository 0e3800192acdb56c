"""Reconciliation against a real stack: each rule sees its injected discrepancy in one run,
a clean run raises nothing, re-detections update their alert, the cap holds, and a run never
changes a withdrawal, a task or a balance.

Discrepancies are injected where they would come from: the sandbox's cascade-core lies about
an operation (ledger parity), a provider pays an attempt that had failed (success after
final), a provider never calls back (stale freeze). Two cannot be produced by a correct
engine, so the test writes them into the record as a bug would (double success, a
notification cascade-core never acknowledged).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from orchestrator import reconciliation
from orchestrator.core_client import FreezeState
from orchestrator.reconciliation import Reconciler, ReconPolicy, RunReport
from orchestrator.store.recon import RECON_LOCK_KEY
from orchestrator.worker import Worker
from tests.conftest import Stack, StackFactory, new_id, withdrawal_body
from tests.waiting import wait_until

OPS = {"Authorization": "Bearer ops-token", "X-Operator": "tester"}


def _reconciler(stack: Stack, *, ask_providers: bool = False, **policy: Any) -> Reconciler:
    rt = stack.runtime
    providers = rt.provider_adapter if ask_providers else None
    return Reconciler(
        rt.pool, rt.core, rt.engine.configs, ReconPolicy(**policy), providers=providers
    )


async def _provider_says(stack: Stack, reference: str, status: str) -> None:
    """The sandbox provider changes its order's status without telling us (a lost webhook)."""
    assert stack.sandbox is not None
    moved = await stack.sandbox.db.pool.execute(
        "UPDATE orders SET status = $2 WHERE reference = $1", reference, status
    )
    assert moved == "UPDATE 1"


async def _final(stack: Stack, providers: list[str]) -> tuple[str, dict[str, Any]]:
    """A new withdrawal through ``providers``, once final: its id and its body."""
    wid = new_id()
    created = await stack.client.post(
        "/v1/withdrawals", json=withdrawal_body(wid, providers), headers=stack.headers
    )
    assert created.status_code in (200, 201, 202), created.text
    return wid, await stack.wait_final(wid)


async def _tasks(stack: Stack, wid: str) -> list[dict[str, Any]]:
    detail = await stack.client.get(f"/ops/withdrawals/{wid}", headers=OPS)
    assert detail.status_code == 200, detail.text
    tasks: list[dict[str, Any]] = detail.json()["tasks"]
    return tasks


async def _alerts(stack: Stack) -> list[dict[str, Any]]:
    async with stack.runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM recon_alerts ORDER BY alert_id")
    return [dict(r) for r in rows]


async def _snapshot(stack: Stack) -> tuple[list[asyncpg.Record], dict[str, Any]]:
    """The engine's record of every task and cascade-core's operations: a run changes neither."""
    async with stack.runtime.pool.acquire() as conn:
        tasks = await conn.fetch(
            "SELECT task_id, state, version, freeze_state FROM order_tasks ORDER BY task_id"
        )
    return list(tasks), (await stack.ledger())["operations"]


async def _run(stack: Stack, reconciler: Reconciler) -> RunReport:
    before = await _snapshot(stack)
    report = await reconciler.run_once()
    assert report.ran
    assert await _snapshot(stack) == before, "a reconciliation run changed the record"
    return report


async def test_a_clean_run_raises_no_alert(make_stack: StackFactory) -> None:
    stack = await make_stack()
    for providers in (["sbx_ok"], ["sbx_sync_ok"], ["sbx_decline", "sbx_ok"], ["sbx_decline"]):
        await _final(stack, providers)
    report = await _run(stack, _reconciler(stack, ask_providers=True))
    assert report.detections == 0, report.as_dict()
    assert report.ledger_checked >= 4
    assert report.provider_checked >= 2  # the accepted ones: sbx_ok twice
    assert await _alerts(stack) == []


async def test_ledger_parity_sees_a_lost_a_flipped_and_a_delayed_operation(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    faults = {"lose": ["sbx_ok"], "flip": ["sbx_sync_ok"], "delay": ["sbx_decline", "sbx_ok"]}
    operation_of: dict[str, str] = {}
    for fault, providers in faults.items():
        wid, _ = await _final(stack, providers)
        task = (await _tasks(stack, wid))[-1]
        operation_of[fault] = task["task_id"]
        answer = await stack.client.put(
            f"/sandbox/core/operations/{task['task_id']}/fault",
            json={"fault": fault, "seconds": 600},
        )
        assert answer.status_code == 200, answer.text
    await _final(stack, ["sbx_ok"])  # one the ledger agrees with
    report = await _run(stack, _reconciler(stack))
    alerts = {a["task_id"]: a for a in await _alerts(stack)}
    assert report.per_rule == {"ledger_parity": 3}
    expected = {"lose": "absent", "flip": "rolled_back", "delay": "frozen"}
    for fault, operation in operation_of.items():
        alert = alerts[uuid.UUID(operation)]
        assert alert["rule"] == "ledger_parity"
        assert alert["state"] == "open"
        assert alert["evidence"]["ours"] == "committed"
        assert alert["evidence"]["cascade_core"] == expected[fault], fault


async def test_a_success_after_final_and_a_double_success_are_raised(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    failed, _ = await _final(stack, ["sbx_accept_fail"])
    task = (await _tasks(stack, failed))[0]
    paid = await stack.client.post(
        f"/sandbox/providers/sbx_accept_fail/orders/{task['provider_reference']}/status",
        json={"status": "succeeded"},
    )
    assert paid.status_code == 200, paid.text

    async def unmatched() -> int:
        async with stack.runtime.pool.acquire() as conn:
            n: int = await conn.fetchval(
                "SELECT count(*) FROM unmatched_webhooks WHERE reason = 'success_after_final'"
            )
        return n

    await wait_until(unmatched, timeout=20, what="the late success webhook to be kept")
    twice, _ = await _final(stack, ["sbx_decline", "sbx_ok"])
    skipped = (await _tasks(stack, twice))[0]
    async with stack.runtime.pool.acquire() as conn:  # a bug would leave this behind
        await conn.execute(
            "UPDATE order_tasks SET state = 'SUCCEEDED' WHERE task_id = $1",
            uuid.UUID(skipped["task_id"]),
        )
    report = await _run(stack, _reconciler(stack, ledger_budget=0))
    assert report.per_rule == {"success_after_final": 1, "double_success": 1}
    by_rule = {a["rule"]: a for a in await _alerts(stack)}
    assert by_rule["success_after_final"]["withdrawal_id"] == failed
    assert by_rule["success_after_final"]["evidence"]["our_state"] == "FAILED"
    assert by_rule["double_success"]["withdrawal_id"] == twice
    assert len(by_rule["double_success"]["evidence"]["task_ids"]) == 2


async def test_a_stale_freeze_warns_then_goes_critical(make_stack: StackFactory) -> None:
    stack = await make_stack()
    wid = new_id()
    created = await stack.client.post(
        "/v1/withdrawals", json=withdrawal_body(wid, ["sbx_silent"]), headers=stack.headers
    )
    assert created.status_code in (200, 201, 202)

    async def frozen_task() -> dict[str, Any] | None:
        tasks = await _tasks(stack, wid)
        return tasks[0] if tasks and tasks[0]["state"] == "MANUAL_CHECK" else None

    task = await wait_until(frozen_task, timeout=30, what="the silent attempt in MANUAL_CHECK")
    async with stack.runtime.pool.acquire() as conn:  # frozen an hour ago
        await conn.execute(
            "UPDATE order_task_events SET created_at = now() - interval '1 hour'"
            " WHERE withdrawal_id = $1 AND to_state = 'CREATING'",
            wid,
        )
    # The test providers' deadline is 9.1 s: rechecks 0.3 + 0.6 + 1.2 + 2 + 2, SLA 2 s, one
    # 1 s poll. Support deciding a manual check is no engine fault: a warning, however late.
    report = await _run(stack, _reconciler(stack, stale_margin=0, ledger_budget=0))
    assert report.per_rule == {"stale_freeze": 1}
    (alert,) = await _alerts(stack)
    assert (alert["severity"], alert["withdrawal_id"]) == ("warning", wid)
    assert alert["evidence"]["awaiting_manual_check"] is True
    assert alert["evidence"]["deadline_seconds"] == pytest.approx(9.1)
    async with stack.runtime.pool.acquire() as conn:  # an engine that lost track of it
        await conn.execute(
            "UPDATE order_tasks SET state = 'EXECUTING' WHERE task_id = $1",
            uuid.UUID(task["task_id"]),
        )
    # Within the margin after its deadline: a warning; past it, critical.
    await _run(stack, _reconciler(stack, stale_margin=7200, ledger_budget=0))
    (within,) = await _alerts(stack)
    assert (within["alert_id"], within["severity"]) == (alert["alert_id"], "warning")
    await _run(stack, _reconciler(stack, stale_margin=0, ledger_budget=0))
    (again,) = await _alerts(stack)
    assert (again["alert_id"], again["severity"], again["detections"]) == (
        alert["alert_id"],
        "critical",
        3,
    )
    assert again["last_evidence"]["awaiting_manual_check"] is False
    assert again["evidence"] == alert["evidence"], "the first detection's evidence is frozen"


async def test_an_unacknowledged_notification_is_raised(make_stack: StackFactory) -> None:
    stack = await make_stack()
    wid, _ = await _final(stack, ["sbx_ok"])
    async with stack.runtime.pool.acquire() as conn:  # cascade-core never acknowledged it
        await conn.execute(
            "UPDATE notifications SET acked_at = NULL, created_at = now() - interval '1 hour',"
            " next_attempt_at = now() + interval '1 hour' WHERE withdrawal_id = $1",
            wid,
        )
    report = await _run(stack, _reconciler(stack, notify_after=600, ledger_budget=0))
    assert report.per_rule == {"notification": 1}
    (alert,) = await _alerts(stack)
    assert alert["fingerprint"] == f"notification:{wid}:succeeded"


async def test_the_cap_holds_new_alerts_back_behind_one_meta_alert(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    wids = [(await _final(stack, ["sbx_ok"]))[0] for _ in range(4)]

    async def all_acked() -> bool:
        """No notification of these in flight: an ack landing after the UPDATE below would
        take one back out of the rule's reach."""
        async with stack.runtime.pool.acquire() as conn:
            acked = await conn.fetchval(
                "SELECT count(*) FROM notifications"
                " WHERE withdrawal_id = ANY($1) AND acked_at IS NOT NULL",
                wids,
            )
        return bool(acked == len(wids))

    await wait_until(all_acked, timeout=20, what="the four notifications to be acknowledged")
    async with stack.runtime.pool.acquire() as conn:
        updated = await conn.execute(
            "UPDATE notifications SET acked_at = NULL, created_at = now() - interval '1 hour',"
            " next_attempt_at = now() + interval '1 hour' WHERE withdrawal_id = ANY($1)",
            wids,
        )
    assert updated == "UPDATE 4"
    reconciler = _reconciler(stack, max_new_alerts=2, ledger_budget=0)
    report = await _run(stack, reconciler)
    assert (len(report.new_alerts), report.held_back) == (3, 2)
    rules = sorted(a["rule"] for a in await _alerts(stack))
    assert rules == ["alert_cap", "notification", "notification"]
    await _run(stack, reconciler)  # the next run raises the held-back ones
    rules = sorted(a["rule"] for a in await _alerts(stack))
    assert rules == ["alert_cap", *["notification"] * 4]


async def test_one_runner_at_a_time(make_stack: StackFactory) -> None:
    stack = await make_stack()
    reconciler = _reconciler(stack)
    async with stack.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", RECON_LOCK_KEY)
        try:
            assert not (await reconciler.run_once()).ran
        finally:
            assert await conn.fetchval("SELECT pg_advisory_unlock($1)", RECON_LOCK_KEY)
    assert (await reconciler.run_once()).ran


_LOCK_HOLDER = (
    "SELECT a.state FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted"
    " AND ((l.classid::bigint << 32) | l.objid::bigint) = $1"
)


class _WatchingLedger:
    """cascade-core's ledger, asked through a reader that looks, at every call, at the
    session holding the reconciliation lock: it must be idle, not inside a transaction."""

    def __init__(self, stack: Stack, fail: bool = False) -> None:
        self.stack = stack
        self.fail = fail
        self.seen: list[str] = []

    async def operation(self, operation_id: str) -> FreezeState | None:
        async with self.stack.runtime.pool.acquire() as conn:
            self.seen.extend(r["state"] for r in await conn.fetch(_LOCK_HOLDER, RECON_LOCK_KEY))
        if self.fail:
            raise RuntimeError("the ledger reader broke")
        return await self.stack.runtime.core.operation(operation_id)


async def test_a_run_holds_the_lock_with_no_transaction_open_across_its_calls(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    await _final(stack, ["sbx_ok"])
    rt = stack.runtime
    ledger = _WatchingLedger(stack)
    report = await Reconciler(rt.pool, ledger, rt.engine.configs, ReconPolicy()).run_once()
    assert report.ran
    assert report.ledger_checked >= 1, report.as_dict()
    assert ledger.seen, "the ledger was never asked"
    assert set(ledger.seen) == {"idle"}, ledger.seen
    async with rt.pool.acquire() as conn:
        assert await conn.fetch(_LOCK_HOLDER, RECON_LOCK_KEY) == [], "the lock outlived its run"


async def test_a_run_that_fails_releases_the_lock(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await _final(stack, ["sbx_ok"])
    rt = stack.runtime
    broken = Reconciler(rt.pool, _WatchingLedger(stack, fail=True), rt.engine.configs)
    with pytest.raises(RuntimeError, match="ledger reader broke"):
        await broken.run_once()
    assert (await _reconciler(stack).run_once()).ran


async def test_the_worker_runs_it_every_interval_and_reports_it(make_stack: StackFactory) -> None:
    stack = await make_stack()
    rt = stack.runtime
    worker = Worker(
        engine=rt.engine,
        js=rt.js,
        core=rt.core,
        reconciler=_reconciler(stack, interval=0.2, ledger_budget=0),
    )
    await worker.start()
    try:

        async def runs() -> int:
            async with rt.pool.acquire() as conn:
                n: int = await conn.fetchval("SELECT count(*) FROM recon_runs")
            return n

        await wait_until(lambda: _at_least(runs, 2), timeout=20, what="two runs by the worker")
    finally:
        await worker.stop(grace=3)
    assert (REGISTRY.get_sample_value("recon_last_success_timestamp") or 0) > 0


async def _at_least(check: Callable[[], Awaitable[int]], n: int) -> bool:
    return await check() >= n


async def test_provider_parity_sees_a_payout_we_never_heard_of(make_stack: StackFactory) -> None:
    stack = await make_stack()
    failed, _ = await _final(stack, ["sbx_accept_fail"])
    task = (await _tasks(stack, failed))[0]
    await _provider_says(stack, task["provider_reference"], "succeeded")
    report = await _run(stack, _reconciler(stack, ask_providers=True, ledger_budget=0))
    assert report.per_rule == {"provider_parity": 1}, report.as_dict()
    (alert,) = await _alerts(stack)
    assert (alert["severity"], alert["withdrawal_id"]) == ("critical", failed)
    assert (alert["evidence"]["ours"], alert["evidence"]["provider_status"]) == (
        "FAILED",
        "succeeded",
    )


async def test_provider_parity_warns_of_an_outcome_a_waiting_attempt_missed(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    wid = new_id()
    created = await stack.client.post(
        "/v1/withdrawals", json=withdrawal_body(wid, ["sbx_silent"]), headers=stack.headers
    )
    assert created.status_code == 201

    async def waiting() -> dict[str, Any] | None:
        tasks = await _tasks(stack, wid)
        return tasks[0] if tasks and tasks[0]["state"] == "MANUAL_CHECK" else None

    task = await wait_until(waiting, timeout=30, what="the silent attempt in MANUAL_CHECK")
    clean = await _run(stack, _reconciler(stack, ask_providers=True, ledger_budget=0))
    assert "provider_parity" not in clean.per_rule  # pending at the provider: agreed
    await _provider_says(stack, task["provider_reference"], "failed")
    report = await _run(stack, _reconciler(stack, ask_providers=True, ledger_budget=0))
    assert report.per_rule.get("provider_parity") == 1, report.as_dict()
    (alert,) = [a for a in await _alerts(stack) if a["rule"] == "provider_parity"]
    assert alert["severity"] == "warning"
    assert alert["evidence"]["ours"] == "MANUAL_CHECK"


async def test_a_rule_that_hits_its_row_cap_says_so(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack()
    twice, _ = await _final(stack, ["sbx_decline", "sbx_ok"])
    skipped = (await _tasks(stack, twice))[0]
    async with stack.runtime.pool.acquire() as conn:  # a bug would leave this behind
        await conn.execute(
            "UPDATE order_tasks SET state = 'SUCCEEDED' WHERE task_id = $1",
            uuid.UUID(skipped["task_id"]),
        )
    await _final(stack, ["sbx_ok"])  # the newest success: the only one a cap of 1 reads
    monkeypatch.setattr(reconciliation, "_SUCCESSES_PER_RUN", 1)
    before = REGISTRY.get_sample_value("recon_rows_capped_total", {"rule": "double_success"})
    report = await _run(stack, _reconciler(stack, ledger_budget=0))
    assert report.capped == ["double_success"]
    assert "double_success" not in report.per_rule  # partial, and the report says so
    after = REGISTRY.get_sample_value("recon_rows_capped_total", {"rule": "double_success"})
    assert (after or 0) == (before or 0) + 1
    assert any("row cap" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(reconciliation, "_SUCCESSES_PER_RUN", 20_000)
    report = await _run(stack, _reconciler(stack, ledger_budget=0))
    assert (report.capped, report.per_rule) == ([], {"double_success": 1})


# --- returns after success ------------------------------------------------------------------


async def _returned_count(cohort: str) -> float:
    return REGISTRY.get_sample_value("withdrawals_returned_total", {"cohort": cohort}) or 0.0


async def _cohort_of(stack: Stack, wid: str) -> str:
    async with stack.runtime.pool.acquire() as conn:
        cohort: str = await conn.fetchval(
            "SELECT cohort FROM withdrawals WHERE withdrawal_id = $1", wid
        )
    return cohort


async def _return(stack: Stack, reference: str, **body: str) -> dict[str, Any]:
    answer = await stack.client.post(
        f"/sandbox/providers/sbx_ok/orders/{reference}/status",
        json={"status": "returned", **body},
    )
    assert answer.status_code == 200, answer.text
    moved: dict[str, Any] = answer.json()
    return moved


async def _task_in(stack: Stack, wid: str, state: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        task = (await _tasks(stack, wid))[0]
        return task if task["state"] == state else None

    return await wait_until(reached, timeout=20, what=f"the attempt of {wid} to be {state}")


async def test_a_paid_order_returned_is_recorded_counted_and_raised(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    wid, final = await _final(stack, ["sbx_ok"])
    await _final(stack, ["sbx_ok"])  # a success that stays one
    assert final["status"] == "succeeded"
    task = (await _tasks(stack, wid))[0]
    cohort = await _cohort_of(stack, wid)
    counted = await _returned_count(cohort)

    moved = await _return(stack, task["provider_reference"])
    assert (moved["order"]["status"], moved["order"]["code"]) == ("returned", "R01")
    assert 200 <= moved["webhook_status"] < 300, moved
    returned = await _task_in(stack, wid, "RETURNED")

    # The frozen public API knows no return: the withdrawal still reads succeeded.
    public = await stack.client.get(f"/v1/withdrawals/{wid}", headers=stack.headers)
    assert public.status_code == 200, public.text
    assert (public.json()["status"], public.json()["provider_reference"]) == (
        "succeeded",
        task["provider_reference"],
    )
    assert returned["provider_code"] == "R01"
    assert await _returned_count(cohort) == counted + 1
    # No balance call: cascade-core still has the operation committed.
    assert (await stack.ledger())["operations"][task["task_id"]] == "committed"

    report = await _run(stack, _reconciler(stack, ask_providers=True, ledger_budget=0))
    assert report.per_rule == {"return": 1}, report.as_dict()
    (alert,) = await _alerts(stack)
    assert (alert["rule"], alert["severity"], alert["withdrawal_id"]) == ("return", "critical", wid)
    evidence = alert["evidence"]
    assert (evidence["source"], evidence["return_code"], evidence["reference"]) == (
        "recorded",
        "R01",
        task["provider_reference"],
    )
    assert evidence["audit"]["event"] == "webhook.returned"
    assert evidence["audit"]["actor"] == "provider:sbx_ok"

    cohorts = await stack.client.get("/ops/cohorts", headers=OPS)
    assert cohorts.status_code == 200, cohorts.text
    mine = cohorts.json()["cohorts"][cohort]
    assert (mine["succeeded"], mine["returned"]) == (2, 1)
    assert (mine["success_rate"], mine["net_success_rate"]) == (1.0, 0.5)


async def test_a_return_seen_only_by_the_status_poll_is_raised_then_recorded(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    wid, _ = await _final(stack, ["sbx_ok"])
    task = (await _tasks(stack, wid))[0]
    await _provider_says(stack, task["provider_reference"], "returned")  # its webhook lost

    report = await _run(stack, _reconciler(stack, ask_providers=True, ledger_budget=0))
    assert report.per_rule == {"return": 1}, report.as_dict()
    (alert,) = await _alerts(stack)
    assert alert["evidence"]["source"] == "provider_status"
    assert alert["evidence"]["our_state"] == "SUCCEEDED"  # a run changes nothing (_run)

    await _return(stack, task["provider_reference"], code="R02")  # the webhook, at last
    await _task_in(stack, wid, "RETURNED")
    await _run(stack, _reconciler(stack, ask_providers=True, ledger_budget=0))
    (again,) = await _alerts(stack)
    assert (again["alert_id"], again["detections"]) == (alert["alert_id"], 2)
    assert again["evidence"]["source"] == "provider_status", "the first evidence is frozen"
    assert (again["last_evidence"]["source"], again["last_evidence"]["return_code"]) == (
        "recorded",
        "R02",
    )


async def test_only_a_paid_order_can_be_returned(make_stack: StackFactory) -> None:
    stack = await make_stack()
    wid, _ = await _final(stack, ["sbx_accept_fail"])
    task = (await _tasks(stack, wid))[0]
    answer = await stack.client.post(
        f"/sandbox/providers/sbx_accept_fail/orders/{task['provider_reference']}/status",
        json={"status": "returned"},
    )
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "not_paid"
    assert (await _tasks(stack, wid))[0]["state"] == "FAILED"
