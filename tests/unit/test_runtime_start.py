"""Starting against a database that is there but not ready: wait; unreachable: fail at once."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from gateway import runtime
from gateway.settings import load_settings

SETTINGS = load_settings({"DATABASE_URL": "postgresql://postgres@127.0.0.1:5999/db"})


def _answers(monkeypatch: pytest.MonkeyPatch, *answers: Any) -> list[int]:
    """Make the pool factory give ``answers`` in turn (an exception is raised); the calls."""
    calls: list[int] = []

    async def create_pool(dsn: str, max_size: int) -> Any:
        calls.append(1)
        answer = answers[min(len(calls), len(answers)) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr("gateway.runtime.store.create_pool", create_pool)
    # Not asyncio.sleep itself: that is every task's, and the suite's own run beside these.
    monkeypatch.setattr(runtime, "START_RETRY_PAUSE", 0.0)
    return calls


async def test_a_database_still_recovering_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    not_yet = asyncpg.CannotConnectNowError("the database system is starting up")
    pool = object()
    calls = _answers(monkeypatch, not_yet, not_yet, pool)
    assert await runtime._create_pool(SETTINGS) is pool
    assert len(calls) == 3


async def test_an_unreachable_database_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _answers(monkeypatch, ConnectionRefusedError(111, "refused"), "pool")
    with pytest.raises(ConnectionRefusedError):
        await runtime._create_pool(SETTINGS)
    assert len(calls) == 1


async def test_the_wait_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "DATABASE_START_SECONDS", -1.0)
    calls = _answers(monkeypatch, asyncpg.TooManyConnectionsError("too many clients"))
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await runtime._create_pool(SETTINGS)
    assert len(calls) == 1
