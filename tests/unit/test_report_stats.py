"""The report's statistics against values computed by hand (and, where noted, published)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import cast

import asyncpg
import pytest

from gateway.report import (
    Z80,
    Z95,
    ReportError,
    _comparison,
    _Counts,
    _design,
    _parse_time,
    _sample_ratio,
    chi_square_1df_p,
    newcombe_difference,
    normal_two_sided_p,
    required_per_arm,
    sample_ratio_chi_square,
    two_proportion_z_test,
    wilson,
)


def test_normal_quantiles_are_the_textbook_ones() -> None:
    # Φ(1.959964) = 0.975 and Φ(0.841621) = 0.80, i.e. upper tails 0.025 and 0.20.
    assert 0.5 * math.erfc(Z95 / math.sqrt(2)) == pytest.approx(0.025, abs=1e-12)
    assert 0.5 * math.erfc(Z80 / math.sqrt(2)) == pytest.approx(0.20, abs=1e-12)
    assert normal_two_sided_p(1.959963984540054) == pytest.approx(0.05, abs=1e-12)
    # chi²(1) = z², so the 5 % critical value is 1.959964² = 3.841459.
    assert chi_square_1df_p(3.841458820694124) == pytest.approx(0.05, abs=1e-12)


def test_wilson_interval_by_hand() -> None:
    # 45 of 50: p = 0.9, z² = 3.841459
    # denom  = 1 + 3.841459/50                                = 1.0768292
    # centre = (0.9 + 3.841459/100) / 1.0768292               = 0.9384146 / 1.0768292 = 0.8714610
    # half   = 1.959964·√(0.9·0.1/50 + 3.841459/(4·50²)) / denom
    #        = 1.959964·√(0.0018 + 0.00038415) / 1.0768292   = 0.0915983 / 1.0768292 = 0.0850630
    # → [0.8714610 − 0.0850630, 0.8714610 + 0.0850630]        = [0.786398, 0.956524]
    low, high = wilson(45, 50) or (0.0, 0.0)
    assert low == pytest.approx(0.786398, abs=1e-6)
    assert high == pytest.approx(0.956524, abs=1e-6)
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 → 0.2553 to 0.3662.
    low, high = wilson(81, 263) or (0.0, 0.0)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def test_wilson_interval_edges() -> None:
    assert wilson(0, 0) is None
    # 0 of 10: centre = (0 + 3.841459/20)/(1 + 3.841459/10) = 0.1920729/1.3841459 = 0.1387664,
    # half = 1.959964·√(3.841459/400)/1.3841459 = 1.959964·0.0979982/1.3841459 = 0.1387664
    # → [0, 0.2775328]: never below 0, and the upper bound is far from 0 (no false certainty).
    low, high = wilson(0, 10) or (1.0, 1.0)
    assert low == 0.0
    assert high == pytest.approx(0.2775328, abs=1e-6)


def test_difference_interval_is_newcombes_hybrid_score() -> None:
    # 56/70 − 48/80 = 0.8 − 0.6 = 0.2
    # Wilson: 56/70 → [0.69183, 0.87695], 48/80 → [0.49045, 0.70038]
    # lower = 0.2 − √((0.8 − 0.69183)² + (0.70038 − 0.6)²) = 0.2 − √(0.011701 + 0.010076) = 0.0524
    # upper = 0.2 + √((0.87695 − 0.8)² + (0.6 − 0.49045)²) = 0.2 + √(0.005921 + 0.012001) = 0.3339
    # Newcombe (1998), Statistics in Medicine 17:873, example (a), method 10: 0.0524 to 0.3339.
    result = newcombe_difference(56, 70, 48, 80)
    assert result is not None
    difference, low, high = result
    assert difference == pytest.approx(0.2)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    assert newcombe_difference(1, 2, 0, 0) is None


def test_two_proportion_z_test_by_hand() -> None:
    # 56/70 vs 48/80: pooled = 104/150 = 0.693333
    # se = √(0.693333·0.306667·(1/70 + 1/80)) = √(0.212622·0.0267857) = √0.0056952 = 0.0754668
    # z  = (0.8 − 0.6)/0.0754668 = 2.650172; p = erfc(2.650172/√2) = 0.008045
    test = two_proportion_z_test(56, 70, 48, 80)
    assert test is not None
    assert test.pooled_rate == pytest.approx(104 / 150)
    assert test.z == pytest.approx(2.650172, abs=1e-6)
    assert test.p_value == pytest.approx(0.008045, abs=1e-6)
    # Identical rates of 1: no variance, no evidence of a difference.
    same = two_proportion_z_test(10, 10, 20, 20)
    assert same is not None
    assert (same.z, same.p_value) == (0.0, 1.0)
    assert two_proportion_z_test(1, 1, 0, 0) is None


def test_sample_ratio_chi_square_by_hand() -> None:
    # 50/50 rollout, 520 legacy / 480 cascade: expected 500/500
    # chi² = (480 − 500)²/500 + (520 − 500)²/500 = 0.8 + 0.8 = 1.6; p = erfc(√0.8) = 0.205903
    fair = sample_ratio_chi_square(520, 480, 0.5)
    assert fair.statistic == pytest.approx(1.6)
    assert fair.p_value == pytest.approx(0.205903, abs=1e-6)
    # 30 % rollout, 750 legacy / 250 cascade: expected 700/300
    # chi² = (250 − 300)²/300 + (750 − 700)²/700 = 8.333333 + 3.571429 = 11.904762
    # p = erfc(√(11.904762/2)) = erfc(2.439750) = 0.000560 < 0.001 → a mismatch
    skewed = sample_ratio_chi_square(750, 250, 0.3)
    assert (skewed.expected_legacy, skewed.expected_cascade) == (700.0, 300.0)
    assert skewed.statistic == pytest.approx(11.904762, abs=1e-6)
    assert skewed.p_value == pytest.approx(0.000560, abs=1e-6)


def test_required_sample_per_arm_by_hand() -> None:
    # n = 2·p̄(1 − p̄)·(1.959964 + 0.841621)²/0.05² with (z_α/2 + z_β)² = 2.801585² = 7.848880
    # p̄ = 0.9: 2·0.09·7.848880/0.0025 = 565.12 → 566
    # p̄ = 0.5: 2·0.25·7.848880/0.0025 = 1569.78 → 1570
    assert required_per_arm(0.9) == 566
    assert required_per_arm(0.5) == 1570
    # p̄ = 1 is clamped to 0.975: 2·0.975·0.025·7.848880/0.0025 = 153.05 → 154, never 0
    assert required_per_arm(1.0) == 154
    assert required_per_arm(0.0) == 154


def _counts(succeeded: int, failed: int) -> _Counts:
    return _Counts(created=succeeded + failed, succeeded=succeeded, failed=failed)


def test_small_samples_give_insufficient_evidence_whatever_the_p_value() -> None:
    # 56/70 vs 48/80 is significant (p = 0.008) but far below 566 per cohort (p̄ = 0.69 needs
    # 2·0.693·0.307·7.849/0.0025 = 1335.2 → 1336).
    result = _comparison(_counts(48, 32), _counts(56, 14), srm_mismatch=False)
    assert result["verdict"] == "insufficient evidence"
    assert result["required_per_cohort"] == 1336
    assert result["p_value"] == pytest.approx(0.008045, abs=1e-6)
    assert _comparison(_Counts(), _counts(5, 0), srm_mismatch=False)["verdict"] == (
        "insufficient evidence"
    )


def test_large_samples_give_a_verdict() -> None:
    # 900/1000 vs 940/1000: pooled 0.92 → n = 2·0.92·0.08·7.849/0.0025 = 462.2 → 463 ≤ 1000
    # se = √(0.92·0.08·0.002) = 0.0121326, z = 0.04/0.0121326 = 3.297; p ≈ 0.00098 → better
    better = _comparison(_counts(900, 100), _counts(940, 60), srm_mismatch=False)
    assert better["required_per_cohort"] == 463
    assert better["verdict"] == "cascade better"
    worse = _comparison(_counts(940, 60), _counts(900, 100), srm_mismatch=False)
    assert worse["verdict"] == "cascade worse"
    same = _comparison(_counts(900, 100), _counts(905, 95), srm_mismatch=False)
    assert same["verdict"] == "no difference detected"
    broken = _comparison(_counts(900, 100), _counts(940, 60), srm_mismatch=True)
    assert broken["verdict"] == "sample ratio mismatch"


def _reasons(**cascade: int) -> dict[str, dict[str, int]]:
    return {"legacy": {"not_targeted": 10}, "cascade": dict(cascade)}


def test_design_is_labelled_from_the_stored_reasons() -> None:
    assert _design(_reasons(allow_list=5))[0] == "observational"
    assert _design(_reasons(rollout=5))[0] == "experiment"
    assert _design(_reasons(allow_list=5, rollout=5))[0] == "mixed"
    assert _design(_reasons())[0] == "none"


def _split(cohort: str, merchants: int, withdrawals: int, rollout: int = 30) -> asyncpg.Record:
    """One row of the report's split query. asyncpg cannot build a Record outside a query;
    ``_sample_ratio`` reads its rows by column name only, which a dict answers alike."""
    row = {
        "cohort": cohort,
        "rollout": rollout,
        "stickiness": "merchantId",
        "merchants": merchants,
        "withdrawals": withdrawals,
    }
    return cast("asyncpg.Record", row)


def test_sample_ratio_counts_merchants_for_a_merchant_sticky_rollout() -> None:
    # The unit is the merchant: 750 legacy / 250 cascade merchants against 30 % → mismatch,
    # whatever the withdrawal counts (a big merchant is one unit, not thousands).
    rows = [_split("legacy", 750, 900), _split("cascade", 250, 5000)]
    result = _sample_ratio(rows, _reasons(rollout=5000), None)
    assert result["applicable"]
    assert result["unit"] == "merchant"
    assert result["observed"] == {"legacy": 750, "cascade": 250}
    assert result["chi_square"] == pytest.approx(11.904762, abs=1e-6)
    assert result["mismatch"] is True
    fair = _sample_ratio(
        [_split("legacy", 700, 1), _split("cascade", 300, 1)], _reasons(rollout=1), None
    )
    assert fair["mismatch"] is False


def test_sample_ratio_is_not_applicable_where_there_is_no_expected_split() -> None:
    allow = _sample_ratio([], _reasons(allow_list=3), None)
    assert not allow["applicable"]
    assert "allow-list" in allow["reason"]
    changed = _sample_ratio(
        [_split("legacy", 7, 7, rollout=30), _split("cascade", 3, 3, rollout=50)],
        _reasons(rollout=3),
        None,
    )
    assert not changed["applicable"]
    assert "changed" in changed["reason"]
    one = _sample_ratio([_split("cascade", 1, 9)], _reasons(rollout=9), "m_1")
    assert not one["applicable"]
    # Too few units: computed, but never flagged.
    few = _sample_ratio(
        [_split("legacy", 1, 1), _split("cascade", 3, 3)], _reasons(rollout=3), None
    )
    assert few["applicable"]
    assert few["mismatch"] is False


def test_a_date_alone_is_midnight_utc() -> None:
    midnight = datetime(2026, 1, 1, tzinfo=UTC)
    assert _parse_time("since", "2026-01-01") == midnight
    assert _parse_time("until", "2026-01-01T00:00:00Z") == midnight
    assert _parse_time("since", "2026-01-01T02:00:00+02:00") == midnight
    assert _parse_time("since", None) is None
    assert _parse_time("since", "") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2026-01-01T00:00", "since '2026-01-01T00:00' needs a time zone"),
        ("2026-01-01 10:00", "since '2026-01-01 10:00' needs a time zone"),
        ("yesterday", "since 'yesterday' is not an ISO date/time"),
        ("2026-13-01", "since '2026-13-01' is not an ISO date/time"),
        ("2026-01-01 ", "since '2026-01-01 ' is not an ISO date/time"),
    ],
)
def test_malformed_times_are_refused_precisely(value: str, message: str) -> None:
    with pytest.raises(ReportError) as caught:
        _parse_time("since", value)
    assert str(caught.value).startswith(message)
