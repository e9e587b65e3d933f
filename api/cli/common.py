"""What every ``modelgate`` command shares: the one-line error and its exit code, running a
command's work on the configured database (after checking that its schema is at the newest
migration), parsing an id argument and printing a view as JSON."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import typer
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.cli.schema import schema_problem
from auth.db import classify_database_error, create_engine, create_sessionmaker
from auth.errors import ConfigurationError, ModelgateError
from auth.settings import Settings

T = TypeVar("T")

# SQLSTATE classes of a connection the server refused: invalid authorization (a wrong user or
# password), invalid catalog name (no such database). The operator's configuration, not a bug.
_REFUSED_CONNECTIONS = frozenset({"28", "3D"})


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; raise what this returns to exit with code 1."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def run_with_sessions(
    settings: Settings, work: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]]
) -> T:
    """Run ``work`` with a session factory on the configured database, once its schema is
    known to be at the newest migration; a missing or older schema, a database that cannot be
    reached, and the project's errors become a one-line message and exit code 1. Every command
    that uses the database comes through here."""

    async def main() -> T:
        engine = create_engine(settings.database_url)
        try:
            problem = await schema_problem(engine, settings.database_url)
            if problem is not None:
                raise fail(problem)
            return await work(create_sessionmaker(engine))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except ModelgateError as exc:
        raise fail(exc.detail) from None
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    except DBAPIError as exc:
        refused = str(getattr(exc.orig, "sqlstate", None) or "")[:2] in _REFUSED_CONNECTIONS
        if not refused and classify_database_error(exc) != "outage":
            raise
        raise fail(f"the database cannot be reached: {_first_line(exc.orig)}") from None
    except OSError as exc:
        # A refused or timed-out socket while connecting, raised below the driver.
        raise fail(f"the database cannot be reached: {_first_line(exc)}") from None


def _first_line(exc: BaseException | None) -> str:
    """What went wrong, in one short line: the first line of the error's text (a driver's text
    names the host, the user or the database, never the password), else its class."""
    lines = str(exc or "").strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def run_in_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run ``work`` in one session and commit it."""

    async def in_session(sessionmaker: async_sessionmaker[AsyncSession]) -> T:
        async with sessionmaker() as session:
            result = await work(session)
            await session.commit()
            return result

    return run_with_sessions(settings, in_session)


def uuid_argument(value: str, what: str) -> uuid.UUID:
    """``value`` as an id, or exit 1 saying that ``what`` must be one."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise fail(f"{what} must be an id (UUID)") from None


def echo_json(view: BaseModel) -> None:
    """Print a view as one line of JSON on stdout."""
    typer.echo(view.model_dump_json())
