"""Per-request routing cost: ``CohortRouter.decide()`` next to a bare ``is_enabled``.

``POST /v1/withdrawals`` calls ``CohortRouter.decide(merchant_id)`` once (flags/router.py): the
Unleash client's local evaluation (``UnleashClient.is_enabled``, a Rust engine) plus the
router's reason and flag-state copy. Both run here in-process against an offline bootstrap
(``FLAGS_FILE``, Unleash's ``/api/client/features`` format), for two strategies release
managers use:

* ``allow-list`` — ``default`` strategy with a ``merchantId IN [...]`` constraint of
  ``ALLOW_LIST`` merchants (20 % of the merchants called are on it);
* ``rollout 50 %`` — ``flexibleRollout`` at 50 %, stickiness ``merchantId``.

Each case: ``decide`` and the bare ``is_enabled`` (same client, same context shape) alternate
in ``CHUNKS`` chunks of ``CHUNK`` calls each over ``MERCHANTS`` distinct merchant ids, timed
with ``perf_counter_ns``; the fastest chunk of each gives µs per call (the least disturbed by
other processes on this shared machine), the median chunk is kept in the JSON. The bare call
is the baseline: ``decide / is_enabled`` is what the router adds; the router's own work is
also timed alone, with the client's ``is_enabled`` replaced by a dict lookup.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.registry import Report, benchmark
from flags.router import TOGGLE, CohortRouter

CHUNK = 1_000
CHUNKS = 20
MERCHANTS = 1_000
ALLOW_LIST = 200


def _flags(strategy: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "features": [{"name": TOGGLE, "enabled": True, "strategies": [strategy]}],
        "segments": [],
    }


def _cases() -> dict[str, dict[str, Any]]:
    listed = [f"m_{i}" for i in range(0, 2 * ALLOW_LIST, 2)]  # every other merchant
    return {
        "allow_list": _flags(
            {
                "name": "default",
                "parameters": {},
                "constraints": [
                    {
                        "contextName": "merchantId",
                        "operator": "IN",
                        "values": listed,
                        "inverted": False,
                        "caseInsensitive": False,
                    }
                ],
            }
        ),
        "rollout_50": _flags(
            {
                "name": "flexibleRollout",
                "parameters": {"rollout": "50", "stickiness": "merchantId", "groupId": TOGGLE},
                "constraints": [],
            }
        ),
    }


class _StubClient:
    """Answers is_enabled from a dict: what decide() costs without the Unleash engine."""

    def __init__(self, answers: dict[str, bool]) -> None:
        self.answers = answers

    def is_enabled(self, _toggle: str, context: dict[str, Any]) -> bool:
        return self.answers[context["properties"]["merchantId"]]


def _per_call_us(fn: Callable[[str], object], merchants: list[str], offset: int) -> float:
    n = len(merchants)
    started = time.perf_counter_ns()
    for i in range(offset, offset + CHUNK):
        fn(merchants[i % n])
    return (time.perf_counter_ns() - started) / CHUNK / 1000


def _measure(flags: dict[str, Any], workdir: Path) -> dict[str, Any]:
    path = workdir / "flags.json"
    path.write_text(json.dumps(flags))
    router = CohortRouter(flags_file=path)
    router.start()
    try:
        client = router._client  # the same engine decide() uses
        assert client is not None
        assert router.source == "bootstrap"
        merchants = [f"m_{i}" for i in range(MERCHANTS)]

        def bare(merchant: str) -> bool:
            return bool(client.is_enabled(TOGGLE, {"properties": {"merchantId": merchant}}))

        for m in merchants:  # warm both paths
            router.decide(m)
            bare(m)
        decide_us, bare_us = [], []
        for chunk in range(CHUNKS):
            decide_us.append(_per_call_us(router.decide, merchants, chunk * CHUNK))
            bare_us.append(_per_call_us(bare, merchants, chunk * CHUNK))
        # The router's own work: decide() with the client's answer stubbed out.
        answers = {m: bare(m) for m in merchants}
        stub = _StubClient(answers)
        router._client = stub  # type: ignore[assignment]
        try:
            own_us = [
                _per_call_us(router.decide, merchants, chunk * CHUNK) for chunk in range(CHUNKS)
            ]
        finally:
            router._client = client
        split = Counter(router.decide(m).cohort for m in merchants)
        reasons = Counter(router.decide(m).reason for m in merchants)
        agree = sum((router.decide(m).cohort == "cascade") == bare(m) for m in merchants)
    finally:
        router.close()
    return {
        "decide_us": min(decide_us),
        "bare_us": min(bare_us),
        "router_own_us": min(own_us),
        "decide_median_us": round(statistics.median(decide_us), 2),
        "bare_median_us": round(statistics.median(bare_us), 2),
        "cascade_share": split["cascade"] / len(merchants),
        "reasons": dict(reasons),
        "agree_with_client": agree / len(merchants),
    }


@benchmark("routing", "CohortRouter.decide() µs per call vs a bare UnleashClient.is_enabled")
def routing() -> Report:
    workdir = Path(tempfile.mkdtemp(prefix="cascade-bench-routing-"))
    try:
        results = {name: _measure(flags, workdir) for name, flags in _cases().items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = Report()
    for name, r in results.items():
        label = {"allow_list": "allow-list", "rollout_50": "rollout 50 %"}[name]
        report.add(f"{name}_decide_us", f"decide() [{label}]", r["decide_us"], "µs")
        report.add(f"{name}_bare_us", "  bare is_enabled (baseline)", r["bare_us"], "µs")
        report.add(f"{name}_ratio", "  decide / is_enabled", r["decide_us"] / r["bare_us"], "x")
        report.add(
            f"{name}_router_own_us",
            "  router's own work (engine stubbed)",
            r["router_own_us"],
            "µs",
        )
        report.add(
            f"{name}_cascade_share", "  share routed to cascade", 100 * r["cascade_share"], "%"
        )
        if r["agree_with_client"] != 1.0:
            raise RuntimeError(f"{name}: decide() disagrees with is_enabled for some merchants")
    report.notes.append(
        f"offline bootstrap (FLAGS_FILE), UnleashClient in-process; {CHUNKS} alternating "
        f"chunks of {CHUNK:,} calls over {MERCHANTS:,} merchants, fastest chunk reported; "
        f"allow-list of {ALLOW_LIST} merchants; decide() agreed with is_enabled for every "
        "merchant"
    )
    report.notes.append(
        "the machine (2 cores) is shared with test runs: each figure is the least disturbed of "
        f"{CHUNKS} runs (medians in the JSON)"
    )
    report.details = results
    return report
