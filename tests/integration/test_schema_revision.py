"""A process waits for the migrations its code needs, not only for a schema to exist."""

from __future__ import annotations

import asyncio
import secrets

from alembic.config import Config
from alembic.script import ScriptDirectory

from gateway.migrate import SCRIPT_LOCATION, upgrade
from orchestrator import store
from orchestrator.store import probes
from tests.conftest import Services, create_database


def test_the_revision_the_code_needs_is_the_newest_migration() -> None:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    assert ScriptDirectory.from_config(config).get_current_head() == probes.SCHEMA_REVISION


async def test_a_schema_one_migration_behind_is_not_present(services: Services) -> None:
    name = f"cg_{secrets.token_hex(6)}"
    await create_database(services.admin_dsn, name)
    dsn = services.dsn(name)
    pool = await store.create_pool(dsn, max_size=2)
    try:
        assert not await probes.schema_present(pool)  # empty
        sqlalchemy_url = "postgresql+asyncpg://" + dsn.split("://", 1)[1]
        previous = f"{int(probes.SCHEMA_REVISION) - 1:04d}"
        await asyncio.to_thread(upgrade, sqlalchemy_url, previous)
        assert not await probes.schema_present(pool)
        await asyncio.to_thread(upgrade, sqlalchemy_url)
        assert await probes.schema_present(pool)
    finally:
        await pool.close()
