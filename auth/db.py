"""The async database engine and sessions, for Postgres (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def is_sqlite(url: str) -> bool:
    """Whether the URL names the embedded SQLite backend."""
    return make_url(url).get_backend_name() == "sqlite"


def _prepare_sqlite_path(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def create_engine(url: str, **overrides: Any) -> AsyncEngine:
    """An engine tuned for its backend: WAL and a busy timeout on SQLite, UTC on Postgres."""
    if is_sqlite(url):
        _prepare_sqlite_path(url)
        engine = create_async_engine(url, **overrides)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers proceed during a write; the busy timeout makes concurrent writers
            # wait for the lock instead of failing with "database is locked".
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    options: dict[str, Any] = {
        "pool_size": 10,
        "max_overflow": 10,
        "pool_timeout": 5,
        # A connection the server dropped (restart, failover, idle kill) is replaced at
        # checkout instead of failing the request that drew it.
        "pool_pre_ping": True,
        # Dates in usage reports are UTC days whatever the server's time zone is.
        "connect_args": {"server_settings": {"timezone": "UTC"}, "timeout": 5},
    }
    options.update(overrides)
    return create_async_engine(url, **options)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit (responses are built after it)."""
    return async_sessionmaker(engine, expire_on_commit=False)
