"""The peers bench's ceiling: what the co-located environment leaves any system (pure math)."""

from __future__ import annotations

import os

import pytest

from bench.peers.run import Result, ceilings


def turn(system: str, rate: float, per_withdrawal: float, per_second: float) -> Result:
    """A saturation turn whose environment cost per_withdrawal ms each plus per_second ms/s."""
    env = per_withdrawal + per_second / rate
    result = Result(system)
    result.rate = {"sync": rate, "mixed": rate / 2}
    result.env_cpu_ms = {"sync": env, "mixed": 2 * per_withdrawal + per_second / (rate / 2)}
    return result


def test_the_fit_separates_the_per_second_cost_and_the_ceiling_discounts_it() -> None:
    budget = (os.cpu_count() or 1) * 1000.0
    turns = [turn(s, rate, 5.0, 200.0) for s, rate in (("a", 150), ("b", 40), ("c", 15))]
    sync = ceilings(turns)["sync"]
    assert sync.fitted
    assert sync.per_withdrawal_ms == pytest.approx(5.0)
    assert sync.per_second_ms == pytest.approx(200)
    assert sync.rate == pytest.approx((budget - 200) / 5.0)
    # Above what the fastest turn's cost alone would allow: it still carried per-second work.
    assert sync.rate > budget / sync.env_ms.low
    mixed = ceilings(turns)["mixed"]
    assert mixed.per_withdrawal_ms == pytest.approx(10.0)


def test_too_few_turns_fall_back_to_the_lowest_cost_and_say_so() -> None:
    budget = (os.cpu_count() or 1) * 1000.0
    only = ceilings([turn("ours", 150, 5.0, 200.0)])["sync"]
    assert not only.fitted
    assert only.rate == pytest.approx(budget / (5.0 + 200 / 150))
