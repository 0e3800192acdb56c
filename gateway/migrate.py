"""Alembic migrations, run programmatically (``cascade-gateway migrate``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import orchestrator

SCRIPT_LOCATION = Path(orchestrator.__file__).resolve().parent / "migrations"


def upgrade(sqlalchemy_url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (blocking; runs its own event loop)."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url.replace("%", "%%"))
    command.upgrade(config, revision)
