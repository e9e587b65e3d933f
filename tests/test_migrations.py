"""The migrations are the schema: they match the models and go down and up again."""

from __future__ import annotations

from alembic import command
from alembic.util.exc import CommandError

from api.cli import alembic_config
from tests.conftest import Backend


def test_models_and_migrations_do_not_drift(backend: Backend) -> None:
    try:
        command.check(alembic_config(backend.database_url))
    except CommandError as exc:  # pragma: no cover - the failure message is the point
        raise AssertionError(f"models and migrations differ: {exc}") from exc


def test_every_migration_goes_down_and_up_again(empty_database: str) -> None:
    config = alembic_config(empty_database)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    command.upgrade(config, "head")
    command.check(config)
