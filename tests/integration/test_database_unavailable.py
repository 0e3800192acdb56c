"""A database that cannot answer (restarting, failing over) is a 503 and nothing persisted,
whatever asyncpg calls the failure: every error of the kinds ``store.DATABASE_UNAVAILABLE``
names, on create and cancel (the contract's envelope) and on the ops API.

The errors are raised where the store would raise them (its functions patched), which is what
a Postgres restart mid-request does: the classification is what is under test here; the
restart itself belongs to the fault campaign.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from orchestrator import store
from orchestrator.engine import Engine
from orchestrator.store import views
from tests.conftest import StackFactory, new_id, withdrawal_body

OPS = {"Authorization": "Bearer ops-token", "X-Operator": "alice"}

# Seen while Postgres restarted under load (issue 14), and one of each other kind.
FAILURES: list[BaseException] = [
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InternalClientError("cannot perform operation: another operation is in progress"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.DeadlockDetectedError("deadlock detected"),
    asyncpg.ReadOnlySQLTransactionError("cannot execute UPDATE in a read-only transaction"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError(),
]


def _failing(error: BaseException) -> Callable[..., Awaitable[Any]]:
    async def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    return fail


def _unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    rid = response.headers["x-request-id"]
    assert response.content == (
        b'{"error":{"code":"unavailable","message":"Service temporarily unavailable.",'
        b'"request_id":"' + rid.encode() + b'"}}'
    )


def test_every_failure_here_is_classified_unavailable() -> None:
    for error in FAILURES:
        assert isinstance(error, store.DATABASE_UNAVAILABLE), type(error)
    # A constraint or a bug is not an outage: it must not be retried as one.
    assert not isinstance(asyncpg.UniqueViolationError(), store.DATABASE_UNAVAILABLE)
    assert not isinstance(asyncpg.UndefinedColumnError(), store.DATABASE_UNAVAILABLE)


@pytest.mark.parametrize("error", FAILURES, ids=lambda e: type(e).__name__)
async def test_create_answers_503_and_persists_nothing(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    stack = await make_stack(with_worker=False)
    monkeypatch.setattr(store, "insert_withdrawal", _failing(error))
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, ["sbx_ok"])
    )
    _unavailable(response)
    monkeypatch.undo()
    assert (
        await stack.client.get(f"/v1/withdrawals/{wid}", headers=stack.headers)
    ).status_code == 404


@pytest.mark.parametrize("error", FAILURES[:2], ids=lambda e: type(e).__name__)
async def test_cancel_answers_503(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    stack = await make_stack(with_worker=False)
    wid = new_id()
    created = await stack.client.post(
        "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, ["sbx_ok"])
    )
    assert created.status_code == 201, created.text
    monkeypatch.setattr(Engine, "cancel_queue", _failing(error))
    _unavailable(
        await stack.client.post(f"/v1/withdrawals/{wid}/cancel", headers=stack.headers, json={})
    )
    monkeypatch.undo()
    assert (await stack.withdrawal(wid))["status"] == "processing"


@pytest.mark.parametrize("error", FAILURES[:2], ids=lambda e: type(e).__name__)
async def test_the_ops_api_answers_503(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    stack = await make_stack(with_worker=False)
    for name in ("manual_checks", "task_state", "withdrawal_detail"):
        monkeypatch.setattr(views, name, _failing(error))
    answers = [
        await stack.client.get("/ops/manual-checks", headers=OPS),
        await stack.client.get(f"/ops/withdrawals/{new_id()}", headers=OPS),
        await stack.client.post(
            "/ops/tasks/00000000-0000-4000-8000-000000000000/resolve",
            headers=OPS,
            json={"decision": "negative", "reason": "statement"},
        ),
    ]
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "unavailable"
