"""Where the sandbox keeps its state: its own schema in Postgres, created by the sandbox itself.

The ledger, the notifications, the violations, the provider orders with their webhooks still
to be delivered, the providers' outages and their request counts outlive the process that serves
them: a sandbox killed and restarted on the same database carries on where it stopped. The
schema is not the product's (no Alembic migration creates it, the sandbox is not in the wheel):
every start runs the idempotent DDL below under a transaction-scoped advisory lock, so two
processes starting at once do not race on it.

Every pooled connection has ``search_path`` set to the schema, so the queries name bare tables.
"""

from __future__ import annotations

import asyncio
import re
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

DEFAULT_SCHEMA = "sandbox"
CLOSE_GRACE_SECONDS = 10.0
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
"""A connection of the sandbox's pool (``search_path`` on the schema)."""
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# One statement per item: asyncpg runs a multi-statement string only without parameters,
# and a list reads better in a diff.
_TABLES = (
    """CREATE TABLE IF NOT EXISTS {s}.floats (
        provider_id text PRIMARY KEY,
        amount numeric NOT NULL,
        held numeric NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.operations (
        operation_id text PRIMARY KEY,
        seq bigint GENERATED ALWAYS AS IDENTITY,
        withdrawal_id text NOT NULL,
        provider_id text NOT NULL,
        amount numeric NOT NULL,
        currency text NOT NULL,
        state text NOT NULL CHECK (state IN ('frozen', 'committed', 'rolled_back')),
        frozen_at double precision NOT NULL,
        flagged_open boolean NOT NULL DEFAULT false,
        history jsonb NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS operations_withdrawal ON {s}.operations (withdrawal_id)",
    "CREATE INDEX IF NOT EXISTS operations_open ON {s}.operations (frozen_at)"
    " WHERE state = 'frozen'",
    """CREATE TABLE IF NOT EXISTS {s}.refusals (
        operation_id text PRIMARY KEY,
        seq bigint GENERATED ALWAYS AS IDENTITY,
        detail text NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.notifications (
        idempotency_key text PRIMARY KEY,
        seq bigint GENERATED ALWAYS AS IDENTITY,
        body text NOT NULL,
        deliveries integer NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.final_statuses (
        withdrawal_id text NOT NULL,
        status text NOT NULL,
        seq bigint GENERATED ALWAYS AS IDENTITY,
        PRIMARY KEY (withdrawal_id, status)
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.violations (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kind text NOT NULL,
        detail text NOT NULL,
        operation_id text,
        withdrawal_id text,
        at text NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.orders (
        provider_id text NOT NULL,
        order_id text NOT NULL,
        seq bigint GENERATED ALWAYS AS IDENTITY,
        reference text NOT NULL UNIQUE,
        request text NOT NULL,
        status text NOT NULL,
        code text,
        PRIMARY KEY (provider_id, order_id)
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.webhooks (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        provider_id text NOT NULL,
        order_id text NOT NULL,
        status text NOT NULL,
        code text,
        webhook_id text NOT NULL,
        due_at double precision NOT NULL,
        claimed_until double precision,
        FOREIGN KEY (provider_id, order_id) REFERENCES {s}.orders ON DELETE CASCADE
    )""",
    "CREATE INDEX IF NOT EXISTS webhooks_due ON {s}.webhooks (due_at)",
    # Provider outages and request counts (sandbox.outages): shared by every process.
    """CREATE TABLE IF NOT EXISTS {s}.outages (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        provider_id text NOT NULL,
        error_ratio double precision NOT NULL,
        timeout_ratio double precision NOT NULL,
        timeout_seconds double precision NOT NULL,
        starts_at double precision NOT NULL,
        ends_at double precision NOT NULL,
        source text NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS outages_ends ON {s}.outages (ends_at)",
    """CREATE TABLE IF NOT EXISTS {s}.scenario_runs (
        name text PRIMARY KEY,
        started_at double precision NOT NULL
    )""",
    # Creates each sbx_rate_limited order got so far (sandbox.providers): shared by every
    # process, so a decline count outlives a restart.
    """CREATE TABLE IF NOT EXISTS {s}.create_tries (
        provider_id text NOT NULL,
        order_id text NOT NULL,
        tries integer NOT NULL,
        PRIMARY KEY (provider_id, order_id)
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.provider_requests (
        provider_id text NOT NULL,
        kind text NOT NULL,
        answer text NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (provider_id, kind, answer)
    )""",
)
# Any constant will do: it only has to be the same in every sandbox process.
_SCHEMA_LOCK = 0x5A4D_B0C5


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Release without asyncpg's default reset (one extra round trip per release).

    Safe: the sandbox leaves no session state behind — its advisory locks are transaction
    locks, and transactions are closed by their context managers before a release.
    """


class SandboxDb:
    """The sandbox's connection pool on its schema; :meth:`open` creates the schema."""

    def __init__(self, dsn: str, *, schema: str = DEFAULT_SCHEMA, pool_size: int = 10) -> None:
        if not _IDENTIFIER.fullmatch(schema):
            raise ValueError(f"sandbox schema must be a lower-case SQL identifier, not {schema!r}")
        self.dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.schema = schema
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the sandbox is not started: its database is not open")
        return self._pool

    async def open(self) -> None:
        """Create the schema if need be and open the pool; idempotent."""
        if self._pool is not None:
            return
        conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                # Only when missing: a role that cannot create schemas may be given one.
                if not await conn.fetchval(
                    "SELECT true FROM pg_namespace WHERE nspname = $1", self.schema
                ):
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                for statement in _TABLES:
                    await conn.execute(statement.format(s=f'"{self.schema}"'))
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=self._pool_size,
            server_settings={"search_path": self.schema},
            reset=_keep_session,
        )

    async def close(self) -> None:
        """Close the pool; connections still busy after a grace period are dropped."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), CLOSE_GRACE_SECONDS)
            except TimeoutError:
                pool.terminate()
