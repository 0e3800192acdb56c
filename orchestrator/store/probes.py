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


async def schema_present(pool: Pool) -> bool:
    """Whether the migrations have run (two of the tables they create exist). Database
    errors propagate: the caller decides whether to wait."""
    present = await pool.fetchval(
        "SELECT to_regclass('order_tasks') IS NOT NULL AND to_regclass('outbox') IS NOT NULL"
    )
    return bool(present)
