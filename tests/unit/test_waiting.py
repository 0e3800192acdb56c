"""The shared wait: it returns the value that ended it, and a timeout says what and what it saw."""

from __future__ import annotations

import pytest

from tests.waiting import wait_until, wait_until_sync


async def test_returns_the_first_value_that_is_done_from_a_sync_or_async_check() -> None:
    values = iter([None, [], ["event"]])
    assert await wait_until(lambda: next(values), timeout=5, what="an event") == ["event"]

    counts = iter(range(10))

    async def count() -> int:
        return next(counts)

    assert await wait_until(count, done=lambda n: n >= 3, timeout=5, what="three") == 3


async def test_a_timeout_names_what_it_waited_for_and_the_last_value() -> None:
    with pytest.raises(AssertionError) as timeout:
        await wait_until(
            lambda: {"state": "PENDING"},
            done=lambda row: row["state"] == "DONE",
            timeout=0.05,
            interval=0.01,
            what="the row to be DONE",
        )
    assert str(timeout.value) == (
        "timed out after 0.05 s waiting for the row to be DONE; last seen: {'state': 'PENDING'}"
    )


def test_the_sync_twin_behaves_alike() -> None:
    values = iter([0, 0, 7])
    assert wait_until_sync(lambda: next(values), timeout=5, what="a number") == 7
    with pytest.raises(AssertionError, match=r"waiting for nothing; last seen: False"):
        wait_until_sync(lambda: False, timeout=0.05, interval=0.01, what="nothing")
