"""Every recorded exchange, replayed through real HTTP on both paths, byte for byte.

One fresh gateway (fresh database, own NATS namespace) per file and path, as the contract's
exchange format prescribes. The same run checks route invariance: both paths answer the
same request sequence with identical bytes apart from placeholders.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import LEGACY_API, StackFactory, flags_document
from tests.contract.replay import load_exchange, normalise, replay

EXCHANGES = sorted((LEGACY_API / "exchanges").glob("*.json"))
COHORTS = {
    "legacy": flags_document(enabled=False),
    "cascade": flags_document(enabled=True),
}


def test_the_recorded_exchanges_are_there() -> None:
    assert len(EXCHANGES) >= 16


@pytest.mark.parametrize("path", EXCHANGES, ids=lambda p: p.stem)
async def test_exchange_on_both_paths(make_stack: StackFactory, path: Path) -> None:
    exchange = load_exchange(path)
    normalised: dict[str, list[tuple[int, str]]] = {}
    for cohort, flags in COHORTS.items():
        stack = await make_stack(flags=flags)
        async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
            outcomes = await replay(client, exchange)
        report = [
            f"[{cohort}] step {i} {o.step.method} {o.step.path}: {problem}"
            for i, o in enumerate(outcomes)
            for problem in o.problems()
        ]
        assert not report, "\n".join(report)
        assert all(o.response.headers.get("x-request-id") for o in outcomes)
        normalised[cohort] = [
            (
                o.response.status_code,
                normalise(o.body, o.step.template, o.response.headers.get("x-request-id", "")),
            )
            for o in outcomes
        ]
        async with stack.runtime.pool.acquire() as conn:
            routed = {r["cohort"] for r in await conn.fetch("SELECT cohort FROM withdrawals")}
        assert routed <= {cohort}, f"{cohort} run routed withdrawals to {routed}"
    assert normalised["legacy"] == normalised["cascade"]
