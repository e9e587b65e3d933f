"""The migrations are the schema: they match the models and go down and up again."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from alembic import command
from alembic.util.exc import CommandError
from sqlalchemy import select, text

from api.cli import alembic_config
from auth.audit import Actor, record_event, verify_chain
from auth.db import create_engine, create_sessionmaker
from auth.models import AuditEvent
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


async def test_events_written_before_the_audit_chain_are_chained_by_the_upgrade(
    empty_database: str,
) -> None:
    """Events from the first schema (ids with gaps, no hashes) become positions 1..n of a chain
    that verifies, and new events extend it."""
    config = alembic_config(empty_database)
    await asyncio.to_thread(command.upgrade, config, "001611c2a964")
    engine = create_engine(empty_database)
    try:
        async with engine.begin() as connection:
            for old_id in (3, 7, 8):
                await connection.execute(
                    text(
                        "INSERT INTO audit_event (id, created_at, actor, action, target_type,"
                        " target_id, detail) VALUES (:id, :at, 'cli', 'tenant.create', 'tenant',"
                        ' :target, \'{"name": "old"}\')'
                    ),
                    {
                        "id": old_id,
                        "at": datetime(2026, 1, old_id, 12, tzinfo=UTC),
                        "target": f"t{old_id}",
                    },
                )
        await asyncio.to_thread(command.upgrade, config, "head")
        sessionmaker = create_sessionmaker(engine)
        async with sessionmaker() as session:
            report = await verify_chain(session)
            assert report.intact, report.problem
            assert report.events == 3
            targets = (
                await session.scalars(select(AuditEvent.target_id).order_by(AuditEvent.id))
            ).all()
            assert targets == ["t3", "t7", "t8"]
            await record_event(
                session, Actor(name="test"), action="x.y", target_type="t", target_id="new"
            )
            await session.commit()
            report = await verify_chain(session)
        assert report.intact, report.problem
        assert report.events == 4
    finally:
        await engine.dispose()
