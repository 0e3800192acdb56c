"""The campaign's last check: reconciliation, once everything settled, finds nothing.

None of the campaign's faults (processes killed, the broker's store lost, Postgres stopped,
cascade-core answering 500 or timing out) may leave our record and cascade-core's ledger or a
provider disagreeing, a freeze open or a notification unacknowledged: a run with every
attempt in its budget must find nothing. The alerts the workers' own runs raised *during* the
campaign are listed apart: a freeze that outlives its provider's shortened deadline while
support has not yet decided its manual check is a true ``stale_freeze`` then, and settles.
"""

from __future__ import annotations

import asyncio
import json

from bench.chaos.fleet import CORE_TOKEN, Fleet
from contracts.providers_file import load_providers
from orchestrator.core_client import HttpCascadeCore
from orchestrator.provider_client import HttpProviderAdapter
from orchestrator.reconciliation import Reconciler, ReconPolicy, RunReport
from orchestrator.store import create_pool

# Every attempt of the campaign in one run; the time budgets (a third of the interval) too.
_ALL = ReconPolicy(interval=3600.0, ledger_budget=100_000, provider_budget=100_000)
_LOCK_TRIES = 20


async def reconciliation_findings(fleet: Fleet) -> tuple[tuple[int, list[str]], list[str]]:
    """(what a final run found, as a check: count and examples), and the lines listing the
    alerts raised while the campaign ran."""
    raw = (fleet.workdir / "providers.json").read_bytes()
    configs = load_providers(raw, {"SANDBOX_URL": fleet.sandbox_url}).providers
    pool = await create_pool(fleet.database_url, min_size=1, max_size=2)
    core = HttpCascadeCore(f"{fleet.sandbox_url}/core", CORE_TOKEN)
    providers = HttpProviderAdapter()
    try:
        reconciler = Reconciler(pool, core, configs, _ALL, providers=providers)
        report = await _run(reconciler)
        async with pool.acquire() as conn:
            during = await conn.fetch(
                "SELECT rule, severity, count(*) AS n FROM recon_alerts"
                " WHERE first_seen_at < $1 GROUP BY rule, severity ORDER BY rule",
                await conn.fetchval("SELECT max(started_at) FROM recon_runs"),
            )
    finally:
        await providers.aclose()
        await core.aclose()
        await pool.close()
    examples = [f"{rule}: {n}" for rule, n in sorted(report.per_rule.items())]
    lines = [
        "reconciliation once settled: "
        + json.dumps({k: v for k, v in report.as_dict().items() if k != "seconds"}),
        "reconciliation alerts raised during the campaign (workers' runs): "
        + (", ".join(f"{r['rule']} {r['severity']}: {r['n']}" for r in during) or "none"),
    ]
    return (report.detections, examples), lines


async def _run(reconciler: Reconciler) -> RunReport:
    """One run; a worker's run holding the lock is waited for."""
    for _ in range(_LOCK_TRIES):
        report = await reconciler.run_once()
        if report.ran:
            return report
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the reconciliation lock stayed taken for {_LOCK_TRIES / 2:g} s")
