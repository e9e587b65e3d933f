"""The async database engine and sessions, for Postgres (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
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


# How much longer than the statement timeout the driver waits for an answer.
DRIVER_TIMEOUT_MARGIN = 0.2


def create_engine(
    url: str,
    *,
    statement_timeout_seconds: float | None = None,
    sqlite_synchronous: str = "FULL",
    **overrides: Any,
) -> AsyncEngine:
    """An engine tuned for its backend: WAL, full durability and a busy timeout on SQLite, UTC
    and (when given) a statement timeout on Postgres.

    SQL parameters never appear in the engine's error messages (``hide_parameters``): such a
    message may reach a log, and a parameter may be a key's digest.
    """
    if is_sqlite(url):
        synchronous = sqlite_synchronous.upper()
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"unsupported SQLite synchronous mode {sqlite_synchronous!r}")
        _prepare_sqlite_path(url)
        engine = create_async_engine(url, hide_parameters=True, **overrides)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers proceed during a write; the busy timeout makes concurrent writers
            # wait for the lock instead of failing with "database is locked".
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.execute("PRAGMA foreign_keys=ON")
            # FULL: a commit is on disk before it returns, as on Postgres. In WAL mode NORMAL
            # syncs only at checkpoints, so an operating-system crash or power cut could lose
            # usage records of 2xx responses already sent. The group commit shares the sync
            # among the requests of a batch (cost measured by the bench: usage.write.sqlite.*).
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.close()

        return engine
    # Dates in usage reports are UTC days whatever the server's time zone is.
    server_settings = {"timezone": "UTC"}
    connect_args: dict[str, Any] = {"server_settings": server_settings, "timeout": 5}
    if statement_timeout_seconds is not None:
        # Two bounds: the server cancels a statement that runs too long, and the driver gives
        # up on a server that stops answering at all (a hung host, a stalled network), which
        # no server-side setting can catch. The driver's is a little longer, so that a slow
        # statement ends with the server's clean cancellation; only a little, because a
        # request cancelled at its deadline (api.http.deps.DatabaseRoute) still waits for the
        # driver to give up on a server that does not answer (measured: deadline + this).
        server_settings["statement_timeout"] = str(int(statement_timeout_seconds * 1000))
        connect_args["command_timeout"] = statement_timeout_seconds + DRIVER_TIMEOUT_MARGIN
    options: dict[str, Any] = {
        "pool_size": 10,
        "max_overflow": 10,
        "pool_timeout": 5,
        # A connection the server dropped (restart, failover, idle kill) is replaced at
        # checkout instead of failing the request that drew it.
        "pool_pre_ping": True,
        "hide_parameters": True,
        "connect_args": connect_args,
    }
    options.update(overrides)
    return create_async_engine(url, **options)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit (responses are built after it)."""
    return async_sessionmaker(engine, expire_on_commit=False)


# SQLSTATE classes (the first two characters) that mean the database or the way to it is
# unwell, not that the request or the code is wrong: connection exception, transaction
# rollback (serialization, deadlock), insufficient resources, operator intervention (a
# cancelled statement: the statement timeout), system error.
_OUTAGE_CLASSES = frozenset({"08", "40", "53", "57", "58"})


# SQLite's result codes for the same idea: busy, locked, out of memory, I/O error, corrupt,
# full, cannot open. Anything else (SQLITE_ERROR: bad SQL, a function's error) is ours.
_SQLITE_OUTAGE_CODES = frozenset({5, 6, 7, 10, 11, 13, 14})


def _sqlstate(exc: DBAPIError) -> str:
    return str(getattr(exc.orig, "sqlstate", None) or "")


def classify_database_error(exc: DBAPIError) -> Literal["data", "conflict", "outage", "bug"]:
    """What a database error means for the client: a value it sent that the database refused
    (422), a constraint (409), an outage (503), or a bug in our SQL (500)."""
    state = _sqlstate(exc)
    if isinstance(exc, DataError) or state.startswith("22"):
        return "data"
    if isinstance(exc, IntegrityError) or state.startswith("23"):
        return "conflict"
    sqlite_code = getattr(exc.orig, "sqlite_errorcode", None)
    if sqlite_code is not None:
        # The primary result code is the low byte of an extended one.
        return "outage" if sqlite_code & 0xFF in _SQLITE_OUTAGE_CODES else "bug"
    if (
        exc.connection_invalidated
        # A refused or reset socket, wrapped by SQLAlchemy as it connects (no SQLSTATE).
        or isinstance(exc.orig, OSError)
        or state[:2] in _OUTAGE_CLASSES
        or (not state and isinstance(exc, OperationalError | InterfaceError))
    ):
        return "outage"
    return "bug"
