"""``cascade-gateway report`` and ``GET /ops/cohorts``: compare the cohorts from the record.

Per cohort (from Postgres, the system of record): created, succeeded, failed, cancelled,
still processing; the success rate of finished withdrawals with a Wilson 95 % interval;
provider attempts per finished withdrawal; time to final (p50/p95, from ``created_at`` to the
queue's ``finished_at``); the manual-check rate. Then:

* the difference cascade − legacy with Newcombe's 95 % interval (built from the two Wilson
  intervals) and a pooled two-proportion z-test;
* a power check: the finished withdrawals per cohort needed to detect a 5-point difference with
  80 % power at α = 0.05, given the pooled rate; below that the verdict is "insufficient
  evidence", whatever the p-value says;
* a sample-ratio-mismatch chi-square of the observed split against the configured rollout
  percentage, read from the flag state stored with each withdrawal, when the toggle was a pure
  ``flexibleRollout`` (flagged at p < 0.001). The unit is the unit of randomisation: merchants
  for ``stickiness: merchantId``, withdrawals otherwise;
* honest labelling, from the stored ``routing_reason``: an allow-list cohort is observational
  (release managers chose the merchants), a sticky percentage is an experiment.

The statistics are plain functions over counts, computed with :mod:`math` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

import asyncpg

from orchestrator import store
from orchestrator.store import reports

Z95 = 1.959963984540054  # Φ⁻¹(0.975): two-sided 95 %
Z80 = 0.8416212335729143  # Φ⁻¹(0.80): 80 % power
ALPHA = 0.05
SRM_ALPHA = 0.001
MIN_DETECTABLE = 0.05  # five percentage points
COHORTS = ("legacy", "cascade")
TABLE_MERCHANTS = 20


class ReportError(ValueError):
    """A report parameter is unusable; the message is one line for the caller."""


# --- statistics ------------------------------------------------------------------------------


def normal_two_sided_p(z: float) -> float:
    """P(|Z| ≥ |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2))


def chi_square_1df_p(statistic: float) -> float:
    """Upper tail of the chi-square distribution with one degree of freedom."""
    return math.erfc(math.sqrt(statistic / 2))


def wilson(successes: int, total: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion; None without data."""
    if total == 0:
        return None
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe_difference(
    x1: int, n1: int, x2: int, n2: int, z: float = Z95
) -> tuple[float, float, float] | None:
    """p1 − p2 and its hybrid score interval (Newcombe 1998, method 10); None without data."""
    first, second = wilson(x1, n1, z), wilson(x2, n2, z)
    if first is None or second is None:
        return None
    p1, p2 = x1 / n1, x2 / n2
    (l1, u1), (l2, u2) = first, second
    difference = p1 - p2
    lower = difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return difference, lower, upper


@dataclass(frozen=True)
class ZTest:
    z: float
    p_value: float
    pooled_rate: float


def two_proportion_z_test(x1: int, n1: int, x2: int, n2: int) -> ZTest | None:
    """Pooled two-proportion z-test of p1 = p2 (two-sided); None without data."""
    if n1 == 0 or n2 == 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        # Both rates are 0 or both are 1: no evidence of a difference.
        return ZTest(z=0.0, p_value=1.0, pooled_rate=pooled)
    z = (x1 / n1 - x2 / n2) / se
    return ZTest(z=z, p_value=normal_two_sided_p(z), pooled_rate=pooled)


def required_per_arm(
    pooled_rate: float, delta: float = MIN_DETECTABLE, z_alpha: float = Z95, z_beta: float = Z80
) -> int:
    """Units per arm to detect a difference ``delta`` (two-sided α = 0.05, 80 % power).

    n = 2·p̄(1 − p̄)·(z_α/2 + z_β)² / δ². A rate of exactly 0 or 1 in a small sample is no
    evidence that the variance is zero, so p̄ is kept within [δ/2, 1 − δ/2].
    """
    p = min(max(pooled_rate, delta / 2), 1 - delta / 2)
    return math.ceil(2 * p * (1 - p) * (z_alpha + z_beta) ** 2 / delta**2)


@dataclass(frozen=True)
class ChiSquare:
    statistic: float
    p_value: float
    expected_legacy: float
    expected_cascade: float


def sample_ratio_chi_square(legacy: int, cascade: int, cascade_share: float) -> ChiSquare:
    """Chi-square (1 df) of the observed legacy/cascade split against the expected share."""
    total = legacy + cascade
    expected_cascade = total * cascade_share
    expected_legacy = total - expected_cascade
    statistic = (cascade - expected_cascade) ** 2 / expected_cascade + (
        legacy - expected_legacy
    ) ** 2 / expected_legacy
    return ChiSquare(
        statistic=statistic,
        p_value=chi_square_1df_p(statistic),
        expected_legacy=expected_legacy,
        expected_cascade=expected_cascade,
    )


# --- the window ------------------------------------------------------------------------------

# Routing reasons of the sticky percentage rollout: a withdrawal routed for one of them was
# assigned by hash, so these are the experiment's arms (an allow-list is observational).
EXPERIMENT_REASONS = ("rollout", "not_targeted")


def _parse_time(name: str, value: str | None) -> datetime | None:
    """``since``/``until`` from the CLI or the query string: the one parser for both.

    A date alone (``2026-01-01``) is midnight UTC; a date/time must carry its zone.
    """
    if value is None or value == "":
        return None
    try:
        day = date.fromisoformat(value)  # a date alone; refuses anything with a time
    except ValueError:
        pass
    else:
        return datetime.combine(day, time(0), tzinfo=UTC)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ReportError(
            f"{name} {value!r} is not an ISO date/time (e.g. 2026-11-01T00:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        raise ReportError(f"{name} {value!r} needs a time zone (e.g. 2026-11-01T00:00:00Z)")
    return moment


def _window(since: str | None, until: str | None, merchant: str | None) -> reports.Window:
    """The report's filters as given on the command line or the query string."""
    if merchant and "\x00" in merchant:
        # Postgres text cannot hold NUL: refused here rather than failing the query (a 500).
        raise ReportError(f"merchant {merchant!r} must not contain a NUL character")
    return reports.Window(
        since=_parse_time("since", since),
        until=_parse_time("until", until),
        merchant=merchant or None,
    )


# --- the report ------------------------------------------------------------------------------


@dataclass
class _Counts:
    created: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    processing: int = 0
    manual_checked: int = 0
    attempts: int = 0
    # Succeeded, and the provider returned the payout since (still among ``succeeded``).
    returned: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    def add(self, row: dict[str, Any]) -> None:
        self.created += row["created"]
        self.succeeded += row["succeeded"]
        self.failed += row["failed"]
        self.cancelled += row["cancelled"]
        self.processing += row["processing"]
        self.manual_checked += row.get("manual_checked", 0) or 0
        self.attempts += row.get("attempts", 0) or 0
        self.returned += row.get("returned", 0) or 0


def _rate(counts: _Counts) -> dict[str, Any]:
    interval = wilson(counts.succeeded, counts.finished)
    return {
        "created": counts.created,
        "succeeded": counts.succeeded,
        "failed": counts.failed,
        "cancelled": counts.cancelled,
        "processing": counts.processing,
        "finished": counts.finished,
        "success_rate": counts.succeeded / counts.finished if counts.finished else None,
        "success_rate_ci95": list(interval) if interval else None,
    }


def _design(reasons: dict[str, dict[str, int]]) -> tuple[str, str]:
    allow_listed = reasons["cascade"].get("allow_list", 0)
    rolled_out = reasons["cascade"].get("rollout", 0)
    if allow_listed and rolled_out:
        return (
            "mixed",
            f"{allow_listed} cascade withdrawals come from allow-listed merchants (chosen, not "
            f"randomised) and {rolled_out} from the sticky percentage rollout: the overall "
            "difference is observational; the 'experiment' block compares only rollout with "
            "not-targeted withdrawals.",
        )
    if allow_listed:
        return (
            "observational",
            "allow-list: release managers chose the cascade merchants, so a difference may come "
            "from the merchants rather than the execution path.",
        )
    if rolled_out:
        return (
            "experiment",
            "sticky percentage rollout: merchants were assigned by hash, so the cohorts are "
            "comparable. The unit of randomisation is the merchant; the z-test treats "
            "withdrawals as independent and is optimistic when a few merchants dominate.",
        )
    return ("none", "no cascade withdrawals in the window: nothing to compare.")


def _comparison(legacy: _Counts, cascade: _Counts, *, srm_mismatch: bool) -> dict[str, Any]:
    n_l, n_c = legacy.finished, cascade.finished
    x_l, x_c = legacy.succeeded, cascade.succeeded
    diff = newcombe_difference(x_c, n_c, x_l, n_l)
    test = two_proportion_z_test(x_c, n_c, x_l, n_l)
    result: dict[str, Any] = {
        "legacy_finished": n_l,
        "cascade_finished": n_c,
        "difference": None,
        "difference_ci95": None,
        "ci_method": "Newcombe hybrid score (from the Wilson intervals)",
        "z": None,
        "p_value": None,
        "pooled_rate": None,
        "required_per_cohort": None,
        "min_detectable_difference": MIN_DETECTABLE,
    }
    if diff is None or test is None:
        result["verdict"] = "insufficient evidence"
        result["verdict_note"] = "a cohort has no finished withdrawals"
        return result
    needed = required_per_arm(test.pooled_rate)
    result.update(
        difference=diff[0],
        difference_ci95=[diff[1], diff[2]],
        z=test.z,
        p_value=test.p_value,
        pooled_rate=test.pooled_rate,
        required_per_cohort=needed,
    )
    if srm_mismatch:
        result["verdict"] = "sample ratio mismatch"
        result["verdict_note"] = (
            "the observed split does not match the configured rollout: the assignment is "
            "broken, so the difference cannot be trusted"
        )
    elif min(n_l, n_c) < needed:
        result["verdict"] = "insufficient evidence"
        result["verdict_note"] = (
            f"detecting a {format_points(MIN_DETECTABLE, sign=False)} difference (80 % power, "
            f"α = {ALPHA}) needs "
            f"{needed} finished withdrawals per cohort; have legacy {n_l}, cascade {n_c}"
        )
    elif test.p_value < ALPHA:
        better = "better" if diff[0] > 0 else "worse"
        result["verdict"] = f"cascade {better}"
        result["verdict_note"] = (
            f"difference {format_points(diff[0])} (95 % CI {format_points(diff[1])} to "
            f"{format_points(diff[2])}), "
            f"p = {test.p_value:.2g}"
        )
    else:
        result["verdict"] = "no difference detected"
        result["verdict_note"] = (
            f"p = {test.p_value:.2g}; the sample was large enough to detect "
            f"{format_points(MIN_DETECTABLE, sign=False)}, and the 95 % CI is "
            f"{format_points(diff[1])} to {format_points(diff[2])}"
        )
    return result


def _sample_ratio(
    rows: list[asyncpg.Record], reasons: dict[str, dict[str, int]], merchant: str | None
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "applicable": False,
        "reason": None,
        "unit": None,
        "rollout_percent": None,
        "expected_cascade_share": None,
        "observed": None,
        "expected": None,
        "chi_square": None,
        "p_value": None,
        "mismatch": False,
        "threshold": SRM_ALPHA,
    }
    configurations = sorted({(r["rollout"], r["stickiness"]) for r in rows})
    result["reason"] = _no_sample_ratio(configurations, reasons, merchant)
    if result["reason"] is not None:
        return result
    percent, stickiness = configurations[0]
    result["rollout_percent"] = percent
    if not 0 < percent < 100:
        result["reason"] = f"not applicable: a {percent} % rollout has only one cohort"
        return result
    unit = "merchant" if stickiness == "merchantId" else "withdrawal"
    key = "merchants" if unit == "merchant" else "withdrawals"
    observed = {c: sum(r[key] for r in rows if r["cohort"] == c) for c in COHORTS}
    share = percent / 100
    chi = sample_ratio_chi_square(observed["legacy"], observed["cascade"], share)
    enough = min(chi.expected_legacy, chi.expected_cascade) >= 5
    result.update(
        applicable=True,
        unit=unit,
        expected_cascade_share=share,
        observed=observed,
        expected={"legacy": chi.expected_legacy, "cascade": chi.expected_cascade},
        chi_square=chi.statistic,
        p_value=chi.p_value,
        mismatch=enough and chi.p_value < SRM_ALPHA,
        reason=(
            f"{percent} % rollout sticky on {stickiness}: split of {unit}s checked"
            if enough
            else "too few units for the chi-square approximation (an expected count below 5)"
        ),
    )
    return result


def _no_sample_ratio(
    configurations: list[tuple[int, str]], reasons: dict[str, dict[str, int]], merchant: str | None
) -> str | None:
    """Why no split can be checked, given the rollout configurations seen; None if one can."""
    if merchant is not None:
        return "not applicable: one merchant is one unit, not a sample"
    if not configurations:
        if reasons["cascade"].get("allow_list", 0):
            return (
                "not applicable: allow-list — merchants were chosen, so there is no expected split"
            )
        return "not applicable: no withdrawals were routed by a pure percentage rollout"
    if len(configurations) > 1:
        listed = ", ".join(f"{p} % by {s}" for p, s in configurations)
        return (
            f"not applicable: the rollout changed within the window ({listed}); "
            "narrow --since/--until to one configuration"
        )
    return None


async def cohort_report(
    conn: store.Connection,
    *,
    since: str | None = None,
    until: str | None = None,
    merchant: str | None = None,
) -> dict[str, Any]:
    """The cohort comparison as a JSON-ready dict (the fixed keys are under ``cohorts``)."""
    window = _window(since, until, merchant)
    by_reason = await reports.cohort_counts(conn, window)
    times = {r["cohort"]: r for r in await reports.time_to_final(conn, window)}
    by_merchant = await reports.merchant_counts(conn, window)
    split = await reports.rollout_split(conn, window, reasons=EXPERIMENT_REASONS)

    totals = {c: _Counts() for c in COHORTS}
    reasons: dict[str, dict[str, int]] = {c: {} for c in COHORTS}
    experiment = {c: _Counts() for c in COHORTS}
    for row in by_reason:
        cohort = row["cohort"]
        totals[cohort].add(dict(row))
        reasons[cohort][row["reason"]] = row["created"]
        if row["reason"] in EXPERIMENT_REASONS:
            experiment[cohort].add(dict(row))

    sample_ratio = _sample_ratio(list(split), reasons, window.merchant)
    design, design_note = _design(reasons)
    comparison = {
        "design": design,
        "design_note": design_note,
        **_comparison(totals["legacy"], totals["cascade"], srm_mismatch=sample_ratio["mismatch"]),
    }
    if design == "mixed":
        comparison["experiment"] = _comparison(
            experiment["legacy"], experiment["cascade"], srm_mismatch=sample_ratio["mismatch"]
        )
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "filters": {"since": since, "until": until, "merchant": merchant},
        "window": _covered(window, by_reason),
        "cohorts": {c: _cohort(totals[c], times.get(c), reasons[c]) for c in COHORTS},
        "comparison": comparison,
        "sample_ratio": sample_ratio,
        "merchants": [
            {"merchant_id": r["merchant_id"], "cohort": r["cohort"], **_rate(_counts_of(r))}
            for r in by_merchant
        ],
    }


def _covered(window: reports.Window, rows: list[asyncpg.Record]) -> dict[str, Any]:
    """The window as read (bounds in UTC) and the first and last withdrawal found in it."""
    firsts = [r["first_created"] for r in rows if r["first_created"] is not None]
    lasts = [r["last_created"] for r in rows if r["last_created"] is not None]
    return {
        "since": _utc_text(window.since),
        "until": _utc_text(window.until),
        "merchant": window.merchant,
        "first_created_at": _utc_text(min(firsts, default=None)),
        "last_created_at": _utc_text(max(lasts, default=None)),
    }


def _utc_text(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _cohort(
    counts: _Counts, timing: asyncpg.Record | None, reasons: dict[str, int]
) -> dict[str, Any]:
    """One cohort's block of the report."""
    return {
        **_rate(counts),
        "attempts_per_withdrawal": counts.attempts / counts.finished if counts.finished else None,
        "time_to_final_seconds": {
            "p50": timing["p50"] if timing else None,
            "p95": timing["p95"] if timing else None,
            "p99": timing["p99"] if timing else None,
        },
        "manual_checked": counts.manual_checked,
        "manual_check_rate": counts.manual_checked / counts.created if counts.created else None,
        "routing_reasons": dict(sorted(reasons.items())),
        # Paid, then returned by the provider: the public status (and ``succeeded``) keeps
        # them; the net rate does not count them as successes.
        "returned": counts.returned,
        "net_success_rate": (
            (counts.succeeded - counts.returned) / counts.finished if counts.finished else None
        ),
    }


def _counts_of(row: asyncpg.Record) -> _Counts:
    counts = _Counts()
    counts.add(dict(row))
    return counts


# --- rendering -------------------------------------------------------------------------------
# One unit per kind of number, in the table and the HTML page alike: rates in %, differences
# of rates in percentage points (pp), times in the unit that keeps their precision.


def format_rate(value: float | None) -> str:
    """A rate (a share of withdrawals) in percent: ``87.5%``."""
    return "n/a" if value is None else f"{value:.1%}"


def format_points(value: float | None, *, sign: bool = True) -> str:
    """A difference of two rates in percentage points: ``+5.0 pp``."""
    if value is None:
        return "n/a"
    return f"{value * 100:+.1f} pp" if sign else f"{value * 100:.1f} pp"


def format_seconds(value: float | None) -> str:
    """A duration in ms below a second, then s, min and h, with three significant digits
    at most, so that sub-second times keep their precision."""
    if value is None:
        return "n/a"
    if value * 1000 < 9.95:
        return f"{value * 1000:.1f} ms"
    if value * 1000 < 999.5:
        return f"{value * 1000:.0f} ms"
    if value < 59.95:
        return f"{value:.1f} s"
    if value < 59.95 * 60:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _when(text: str) -> str:
    return datetime.fromisoformat(text).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_window(window: dict[str, Any]) -> str:
    """Which withdrawals the report covers, in words: the bounds asked for, then what was found."""
    bounds = []
    if window["since"]:
        bounds.append(f"from {_when(window['since'])} (inclusive)")
    if window["until"]:
        bounds.append(f"until {_when(window['until'])} (exclusive)")
    scope = "created " + " ".join(bounds) if bounds else "all withdrawals (no --since/--until)"
    if window["merchant"]:
        scope += f", merchant {window['merchant']}"
    if window["first_created_at"] is None:
        return f"{scope}; no withdrawals found"
    return (
        f"{scope}; found withdrawals created {_when(window['first_created_at'])} to "
        f"{_when(window['last_created_at'])}"
    )


def render_table(report: dict[str, Any], *, database: str | None = None) -> str:
    """The report as text for a terminal; ``database`` (redacted) names the source."""
    lines = ["Cohort comparison"]
    if database is not None:
        lines.append(f"Database: {database}")
    lines += [f"Window:   {describe_window(report['window'])}", ""]
    lines += _cohort_lines(report["cohorts"])
    comparison = report["comparison"]
    lines += ["", f"Design: {comparison['design']} — {comparison['design_note']}"]
    lines += _comparison_lines(comparison, "")
    if "experiment" in comparison:
        lines += ["", "Experiment only (rollout vs not targeted):"]
        lines += _comparison_lines(comparison["experiment"], "  ")
    lines.append("")
    lines += _sample_ratio_lines(report["sample_ratio"])
    lines += _merchant_lines(report["merchants"])
    return "\n".join(lines)


def _cohort_lines(cohorts: dict[str, Any]) -> list[str]:
    lines = [
        f"{'cohort':<8} {'created':>7} {'succ':>6} {'fail':>6} {'canc':>6} {'proc':>6} "
        f"{'success rate (95% CI)':>21} {'attempts':>8} {'time to final p50 / p95 / p99':>32} "
        f"{'manual':>7}"
    ]
    for name, c in cohorts.items():
        rate = format_rate(c["success_rate"])
        if c["success_rate_ci95"]:
            low, high = c["success_rate_ci95"]
            rate += f" ({low:.1%}–{high:.1%})"
        attempts = (
            "n/a"
            if c["attempts_per_withdrawal"] is None
            else (f"{c['attempts_per_withdrawal']:.2f}")
        )
        timing = c["time_to_final_seconds"]
        final = " / ".join(format_seconds(timing[q]) for q in ("p50", "p95", "p99"))
        lines.append(
            f"{name:<8} {c['created']:>7} {c['succeeded']:>6} {c['failed']:>6} "
            f"{c['cancelled']:>6} {c['processing']:>6} {rate:>21} {attempts:>8} {final:>32} "
            f"{format_rate(c['manual_check_rate']):>7}"
        )
    for name, c in cohorts.items():
        reasons = ", ".join(f"{k} {v}" for k, v in c["routing_reasons"].items()) or "none"
        lines.append(f"  {name} routing reasons: {reasons}")
    for name, c in cohorts.items():
        lines.append(
            f"  {name} returned after success: {c['returned']}"
            f" (success rate net of returns {format_rate(c['net_success_rate'])})"
        )
    return lines


def _sample_ratio_lines(srm: dict[str, Any]) -> list[str]:
    if not srm["applicable"]:
        return [f"Sample ratio: {srm['reason']}"]
    flag = "MISMATCH" if srm["mismatch"] else "ok"
    return [
        f"Sample ratio ({srm['unit']}s): observed legacy {srm['observed']['legacy']} / "
        f"cascade {srm['observed']['cascade']}, expected "
        f"{srm['expected']['legacy']:.1f} / {srm['expected']['cascade']:.1f} "
        f"({srm['rollout_percent']} % rollout): chi² = {srm['chi_square']:.2f}, "
        f"p = {srm['p_value']:.3g} → {flag} (flag at p < {srm['threshold']})",
        f"  {srm['reason']}",
    ]


def _merchant_lines(merchants: list[dict[str, Any]]) -> list[str]:
    if not merchants:
        return []
    lines = [
        "",
        f"Per merchant (top {min(len(merchants), TABLE_MERCHANTS)} by volume):",
        f"{'merchant':<20} {'cohort':<8} {'created':>7} {'succ':>6} {'fail':>6} "
        f"{'canc':>6} {'proc':>6} {'success rate':>12}",
    ]
    for m in merchants[:TABLE_MERCHANTS]:
        lines.append(
            f"{m['merchant_id'][:20]:<20} {m['cohort']:<8} {m['created']:>7} "
            f"{m['succeeded']:>6} {m['failed']:>6} {m['cancelled']:>6} {m['processing']:>6} "
            f"{format_rate(m['success_rate']):>12}"
        )
    if len(merchants) > TABLE_MERCHANTS:
        lines.append(f"… {len(merchants) - TABLE_MERCHANTS} more rows: use --json")
    return lines


def _comparison_lines(comparison: dict[str, Any], indent: str) -> list[str]:
    lines = []
    if comparison["difference"] is not None:
        low, high = comparison["difference_ci95"]
        lines.append(
            f"{indent}Difference cascade − legacy: {format_points(comparison['difference'])}, "
            f"95 % CI [{format_points(low)}, {format_points(high)}] (Newcombe)"
        )
        lines.append(
            f"{indent}Two-proportion z-test: z = {comparison['z']:.2f}, "
            f"p = {comparison['p_value']:.3g}"
        )
        lines.append(
            f"{indent}Power: {comparison['required_per_cohort']} finished withdrawals per cohort "
            f"are needed to detect {format_points(MIN_DETECTABLE, sign=False)} (80 % power, "
            f"α = {ALPHA}); have legacy {comparison['legacy_finished']}, "
            f"cascade {comparison['cascade_finished']}"
        )
    lines.append(f"{indent}Verdict: {comparison['verdict']} — {comparison['verdict_note']}")
    return lines
