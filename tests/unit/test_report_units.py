"""The report's units (one per kind of number) and its HTML page, on numbers made here."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.report import (
    _cohort,
    _comparison,
    _Counts,
    describe_window,
    format_points,
    format_rate,
    format_seconds,
)
from gateway.report_page import _nice_ceiling, _ticks, render_page


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "n/a"),
        (0.0, "0.0 ms"),
        (0.0042, "4.2 ms"),
        (0.00996, "10 ms"),
        (0.2014, "201 ms"),
        (0.9996, "1.0 s"),
        (12.34, "12.3 s"),
        (59.96, "1.0 min"),
        (754.0, "12.6 min"),
        (5400.0, "1.5 h"),
    ],
)
def test_times_take_the_unit_that_keeps_their_precision(seconds: float | None, text: str) -> None:
    assert format_seconds(seconds) == text


def test_rates_are_percent_and_their_differences_percentage_points() -> None:
    assert format_rate(1 / 3) == "33.3%"
    assert format_rate(None) == "n/a"
    assert format_points(0.05) == "+5.0 pp"
    assert format_points(-0.0123) == "-1.2 pp"
    assert format_points(0.05, sign=False) == "5.0 pp"


def test_the_window_says_what_was_asked_and_what_was_found() -> None:
    empty = {
        "since": None,
        "until": None,
        "merchant": None,
        "first_created_at": None,
        "last_created_at": None,
    }
    assert describe_window(empty) == "all withdrawals (no --since/--until); no withdrawals found"
    bounded = {
        **empty,
        "since": "2026-11-01T00:00:00+00:00",
        "until": "2026-11-08T09:30:00+01:00",
        "merchant": "m_1",
        "first_created_at": "2026-11-01T08:00:00+00:00",
        "last_created_at": "2026-11-07T23:59:59.5+00:00",
    }
    assert describe_window(bounded) == (
        "created from 2026-11-01 00:00:00 UTC (inclusive) until 2026-11-08 08:30:00 UTC "
        "(exclusive), merchant m_1; found withdrawals created 2026-11-01 08:00:00 UTC to "
        "2026-11-07 23:59:59 UTC"
    )


@pytest.mark.parametrize(
    ("value", "ceiling"), [(0.0, 1.0), (0.201, 0.25), (1.0, 1.0), (1.5, 2.0), (7.0, 10.0)]
)
def test_axes_end_on_a_round_number(value: float, ceiling: float) -> None:
    assert _nice_ceiling(value) == pytest.approx(ceiling)


def test_ticks_divide_the_axis_evenly() -> None:
    assert [text for _, text in _ticks(0.25, format_seconds)] == [
        "0",
        "50 ms",
        "100 ms",
        "150 ms",
        "200 ms",
        "250 ms",
    ]
    assert [value for value, _ in _ticks(2.0, str)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    # Times over a minute are divided in minutes.
    assert [text for _, text in _ticks(300.0, format_seconds, 60.0)] == [
        "0",
        "1.0 min",
        "2.0 min",
        "3.0 min",
        "4.0 min",
        "5.0 min",
    ]


def _report(merchant_id: str, legacy: _Counts, cascade: _Counts) -> dict[str, Any]:
    window = {
        "since": None,
        "until": None,
        "merchant": None,
        "first_created_at": None,
        "last_created_at": None,
    }
    return {
        "generated_at": "2026-12-06T00:00:00+00:00",
        "window": window,
        "cohorts": {"legacy": _cohort(legacy, None, {}), "cascade": _cohort(cascade, None, {})},
        "comparison": {
            "design": "none",
            "design_note": "no cascade withdrawals",
            **_comparison(legacy, cascade, srm_mismatch=False),
        },
        "merchants": [
            {"merchant_id": merchant_id, "cohort": "legacy", **_cohort(legacy, None, {})}
        ],
    }


def test_a_page_without_finished_withdrawals_draws_no_bars_and_says_n_a() -> None:
    page = render_page(_report("m_1", _Counts(created=2, processing=2), _Counts()))
    assert page.startswith("<!DOCTYPE html>")
    assert 'class="bar ' not in page
    assert "n/a" in page
    assert "Verdict: insufficient evidence" in page


def test_names_from_the_record_are_escaped_and_the_page_loads_nothing() -> None:
    hostile = '<script>alert("x")</script>&'
    page = render_page(
        _report(hostile, _Counts(created=1, succeeded=1, attempts=1), _Counts()),
        database="postgresql://postgres:***@db/cascade",
    )
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "Database: postgresql://postgres:***@db/cascade" in page
    for remote in ("http://", "https://", "<link", " src="):
        assert remote not in page
