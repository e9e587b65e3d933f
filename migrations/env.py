"""Alembic environment: runs migrations on the configured async engine (Postgres or SQLite)."""

from __future__ import annotations

import asyncio
import re
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from auth.db import create_engine
from auth.models import Base
from auth.settings import get_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    # A caller (the CLI, the tests) may pass the URL explicitly; otherwise the settings decide.
    url = config.attributes.get("database_url")
    return str(url) if url else get_settings().database_url


# usage_record's monthly partitions on Postgres (auth.usage.partitions): made at run time, not
# described by the models, so the drift check does not look at them.
_PARTITION = re.compile(r"^usage_record_[0-9]{4}_[0-9]{2}$")


def _include_name(name: str | None, type_: str, _parents: object) -> bool:
    return not (type_ == "table" and name is not None and _PARTITION.fullmatch(name))


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        include_name=_include_name,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=True,
    )


def run_migrations_offline() -> None:
    """Emit SQL without a database connection (``alembic upgrade --sql``)."""
    _configure(url=_database_url())
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    _configure(connection=connection)
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a table by copying it, dropping the original and renaming the
        # copy; with foreign keys enforced, dropping a table that others reference fails. They
        # are checked as a whole once the migration is done instead (the pragma cannot change
        # inside a transaction, so it is set before the migration's begins).
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"the migration broke foreign keys: {broken[:5]}")
    finally:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")


async def run_migrations_online() -> None:
    """Run the migrations on a live async connection."""
    engine = create_engine(_database_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
