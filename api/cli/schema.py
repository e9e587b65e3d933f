"""The database schema's migrations: Alembic's configuration for the project, and bringing a
database to the newest migration (``modelgate serve`` and ``modelgate db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str) -> Config:
    """Alembic's configuration for the project, pointed at a database."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def upgrade_database(database_url: str) -> None:
    """Bring the schema to the newest migration (a no-op when it is already there)."""
    command.upgrade(alembic_config(database_url), "head")
