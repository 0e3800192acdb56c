"""Readiness probes: does Postgres answer, and has the schema been migrated."""

from __future__ import annotations

import asyncio

import asyncpg

from orchestrator.store import Pool

# What "the database does not answer" looks like to a client: refused or reset connections,
# a server shutting down or refusing queries, no answer in time.
_UNREACHABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
# Long enough for a busy pool to hand out a connection, short enough for a readiness probe.
PING_SECONDS = 2.0


async def ping(pool: Pool) -> bool:
    """True when a pooled connection answers a trivial query within :data:`PING_SECONDS`."""
    try:
        async with asyncio.timeout(PING_SECONDS), pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
    except _UNREACHABLE:
        return False
    return True


SCHEMA_REVISION = "0005"
"""The newest migration this code reads and writes (a unit test keeps it at the head): a
process started before ``migrate`` has run it waits, instead of failing every statement that
names a new column. A database migrated further (the next version's, during a rollback) is
accepted: migrations only add."""


async def schema_present(pool: Pool) -> bool:
    """Whether the migrations have run up to :data:`SCHEMA_REVISION` at least. Database errors
    propagate: the caller decides whether to wait."""
    async with pool.acquire() as conn:
        if await conn.fetchval("SELECT to_regclass('alembic_version')") is None:
            return False
        revision = await conn.fetchval("SELECT max(version_num) FROM alembic_version")
    # Revisions are numbered "0001", "0002", …: their order is the strings' order.
    return revision is not None and revision >= SCHEMA_REVISION
