"""The database schema's migrations: Alembic's configuration for the project, bringing a database
to the newest migration (``modelgate serve`` and ``modelgate db upgrade``), and the check every
other command makes first, so that a database that was never migrated, or is behind, is named
in one line rather than in a SQL error."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

ROOT = Path(__file__).resolve().parents[2]

UPGRADE_HINT = "run `modelgate db upgrade`"


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


def _current_revisions(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


async def schema_problem(engine: AsyncEngine, database_url: str) -> str | None:
    """Why the database's schema is not fit for this modelgate (it was never migrated, or an
    older migration is its newest), with what to do about it; None when it is at the newest
    migration. One read of Alembic's version table. A revision this modelgate does not know
    (a newer modelgate migrated the database) is not refused here."""
    async with engine.connect() as connection:
        current = await connection.run_sync(_current_revisions)
    script = ScriptDirectory.from_config(alembic_config(database_url))
    heads = set(script.get_heads())
    if current == heads:
        return None
    if not current:
        return f"the database has no schema yet: {UPGRADE_HINT}"
    if not current <= {revision.revision for revision in script.walk_revisions()}:
        return None
    newest = ", ".join(sorted(heads))
    at = ", ".join(sorted(current))
    return (
        f"the database schema is behind this modelgate (at migration {at}, the newest is "
        f"{newest}): {UPGRADE_HINT}"
    )
