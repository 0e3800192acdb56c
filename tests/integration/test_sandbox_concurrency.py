"""The sandbox ledger's invariants under concurrency, on the real Postgres.

Two :class:`~sandbox.routes.Sandbox` objects on one schema stand for two processes: each has its
own pool, so their calls reach Postgres on different connections at the same time and only the
ledger's transactions and locks keep the books straight. The last tests create the schema:
from several processes at once, and as a role that may not create one.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from sandbox.core import Ledger, LedgerError
from sandbox.database import _TABLES, SandboxDb
from sandbox.routes import Sandbox, SandboxConfig
from tests.conftest import sandbox_schema

Pair = tuple[Ledger, Ledger]


def _sandbox(dsn: str, schema: str) -> Sandbox:
    return Sandbox(
        SandboxConfig(
            gateway_url="http://127.0.0.1:9",
            database_url=dsn,
            schema=schema,
            providers={},
            provider_floats={"float_100": Decimal(100)},
        )
    )


@pytest.fixture
async def ledgers(sandbox_dsn: str) -> AsyncIterator[Pair]:
    """Two ledgers on one schema, started at the same time (the schema created once)."""
    schema = sandbox_schema()
    first, second = _sandbox(sandbox_dsn, schema), _sandbox(sandbox_dsn, schema)
    try:
        await asyncio.gather(first.start(), second.start())
        yield first.ledger, second.ledger
    finally:
        await asyncio.gather(first.close(), second.close())


async def outcome(call: Awaitable[str]) -> str:
    """The state a ledger call answered, or ``<status> <code>`` of its refusal."""
    try:
        return await call
    except LedgerError as exc:
        return f"{exc.status} {exc.code}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


async def test_commit_racing_rollback_one_wins_and_the_loser_is_a_violation(
    ledgers: Pair,
) -> None:
    a, b = ledgers
    ops = [new_id("op") for _ in range(20)]
    for op in ops:
        await a.freeze(op, new_id("w"), "sbx_ok", Decimal("10.00"), "EUR")
    raced = await asyncio.gather(
        *(asyncio.gather(outcome(a.commit(op)), outcome(b.rollback(op))) for op in ops)
    )
    snapshot = await a.snapshot()
    violations = {v["operation_id"]: v["kind"] for v in snapshot["violations"]}
    assert len(snapshot["violations"]) == len(ops)
    for op, (commit, rollback) in zip(ops, raced, strict=True):
        # Exactly one wins; the loser is refused and recorded, whichever came second.
        if commit == "committed":
            assert rollback == "409 invalid_state"
            assert violations[op] == "rollback_after_commit"
        else:
            assert (commit, rollback) == ("409 invalid_state", "rolled_back")
            assert violations[op] == "commit_after_rollback"
        winner = "committed" if commit == "committed" else "rolled_back"
        assert snapshot["operations"][op] == winner
    committed = sum(1 for commit, _ in raced if commit == "committed")
    assert Decimal(snapshot["floats"]["sbx_ok"]) == Decimal(1000000) - 10 * committed
    assert snapshot["available"]["sbx_ok"] == snapshot["floats"]["sbx_ok"]  # nothing held


async def test_repeated_commits_from_both_sides_commit_once(ledgers: Pair) -> None:
    a, b = ledgers
    op = new_id("op")
    await a.freeze(op, new_id("w"), "sbx_ok", Decimal(5), "EUR")
    answers = await asyncio.gather(*(ledger.commit(op) for ledger in (a, b) * 5))
    assert answers == ["committed"] * 10
    snapshot = await b.snapshot()
    assert snapshot["violations"] == []
    assert snapshot["floats"]["sbx_ok"] == "999995"
    assert [h["action"] for h in snapshot["operation_details"][op]["history"]] == [
        "freeze",
        *["commit"] * 10,
    ]


async def test_two_operations_of_one_withdrawal_committed_at_once_are_one_double_commit(
    ledgers: Pair,
) -> None:
    a, b = ledgers
    withdrawals = [new_id("w") for _ in range(10)]
    pairs = [(new_id("op"), new_id("op")) for _ in withdrawals]
    for wid, (first, second) in zip(withdrawals, pairs, strict=True):
        await a.freeze(first, wid, "sbx_ok", Decimal(1), "EUR")
        await b.freeze(second, wid, "sbx_ok-2", Decimal(1), "EUR")
    await asyncio.gather(*(asyncio.gather(a.commit(x), b.commit(y)) for x, y in pairs))
    violations = (await a.snapshot())["violations"]
    # Without the withdrawal's lock both commits could see no other and neither be flagged.
    assert Counter(v["withdrawal_id"] for v in violations) == dict.fromkeys(withdrawals, 1)
    assert {v["kind"] for v in violations} == {"double_commit"}


async def test_concurrent_freezes_never_overdraw_a_float(ledgers: Pair) -> None:
    a, b = ledgers
    calls = [
        outcome(ledger.freeze(new_id("op"), new_id("w"), "float_100", Decimal(10), "EUR"))
        for ledger in (a, b) * 10
    ]
    answers = Counter(await asyncio.gather(*calls))
    assert answers == {"frozen": 10, "409 insufficient_balance": 10}
    snapshot = await a.snapshot()
    assert (snapshot["floats"]["float_100"], snapshot["available"]["float_100"]) == ("100", "0")
    assert len(snapshot["refusals"]) == 10


async def test_one_operation_frozen_from_both_sides_holds_once(ledgers: Pair) -> None:
    a, b = ledgers
    op, wid = new_id("op"), new_id("w")
    calls = [ledger.freeze(op, wid, "float_100", Decimal(60), "EUR") for ledger in (a, b) * 3]
    assert await asyncio.gather(*calls) == ["frozen"] * 6
    assert await a.available("float_100") == Decimal(40)


async def test_notifications_raced_from_both_sides(ledgers: Pair) -> None:
    a, b = ledgers
    wid = new_id("w")

    def body(status: str) -> dict[str, Any]:
        return {"withdrawal_id": wid, "status": status}

    same_key = await asyncio.gather(
        *(ledger.notify(f"{wid}:succeeded", body("succeeded")) for ledger in (a, b) * 3)
    )
    assert sorted(same_key) == [False] * 5 + [True]
    other = new_id("w")
    conflicting = [
        a.notify(f"{other}:succeeded", {"withdrawal_id": other, "status": "succeeded"}),
        b.notify(f"{other}:failed", {"withdrawal_id": other, "status": "failed"}),
    ]
    assert await asyncio.gather(*conflicting) == [True, True]
    snapshot = await b.snapshot()
    assert snapshot["notification_deliveries"][f"{wid}:succeeded"] == 6
    assert [(v["kind"], v["withdrawal_id"]) for v in snapshot["violations"]] == [
        ("conflicting_notifications", other)
    ]


async def test_schema_created_by_many_processes_at_once(sandbox_dsn: str) -> None:
    schema = sandbox_schema()
    stores = [SandboxDb(sandbox_dsn, schema=schema, pool_size=1) for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        tables = await stores[0].pool.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema
        )
        # Every table the DDL names, once: none lost to a race, none created twice.
        assert tables == sum(1 for ddl in _TABLES if ddl.lstrip().startswith("CREATE TABLE"))
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_a_role_that_cannot_create_schemas_may_be_given_one(sandbox_dsn: str) -> None:
    """Staging: the role owns a schema made for it; it lacks CREATE on the database."""
    schema, role = sandbox_schema(), f"r_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(sandbox_dsn)
    try:
        await admin.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'sandbox'")
        await admin.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{role}"')
    finally:
        await admin.close()
    scheme, _, rest = sandbox_dsn.partition("://")
    as_role = f"{scheme}://{role}:sandbox@{rest.rpartition('@')[2]}"
    given = SandboxDb(as_role, schema=schema, pool_size=1)
    try:
        await given.open()
        assert await given.pool.fetchval("SELECT count(*) FROM floats") == 0
    finally:
        await given.close()
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await SandboxDb(as_role, schema=sandbox_schema(), pool_size=1).open()
