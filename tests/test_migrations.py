"""The migrations are the schema: they match the models and go down and up again."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime

from alembic import command
from alembic.util.exc import CommandError
from sqlalchemy import select, text

from api.cli import alembic_config
from auth.audit import Actor, record_event, verify_chain
from auth.db import create_engine, create_sessionmaker
from auth.models import ApiKey, AuditEvent, Tenant, UsageDaily, UsageRecord
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


async def test_records_written_before_the_rollups_are_rolled_up_by_the_upgrade(
    empty_database: str,
) -> None:
    config = alembic_config(empty_database)
    await asyncio.to_thread(command.upgrade, config, "9affb5fe6a1f")
    engine = create_engine(empty_database)
    try:
        sessionmaker = create_sessionmaker(engine)
        async with sessionmaker() as session:
            tenant = Tenant(name="old")
            session.add(tenant)
            await session.flush()
            key = ApiKey(
                tenant_id=tenant.id, name="k", display_prefix="mg_x", digest="d" * 64, scopes="p"
            )
            session.add(key)
            await session.flush()
            for moment, units in (
                (datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=UTC), 2),
                (datetime(2026, 2, 1, 0, 0, tzinfo=UTC), 3),
                (datetime(2026, 2, 1, 18, 0, tzinfo=UTC), 4),
            ):
                session.add(
                    UsageRecord(
                        request_id=uuid.uuid4(),
                        tenant_id=tenant.id,
                        api_key_id=key.id,
                        model="iris",
                        model_version="1",
                        units=units,
                        status_code=200,
                        latency_ms=1.0,
                        created_at=moment,
                    )
                )
            await session.commit()
        await asyncio.to_thread(command.upgrade, config, "head")
        async with sessionmaker() as session:
            rows = (
                await session.execute(
                    select(UsageDaily.day, UsageDaily.requests, UsageDaily.units).order_by(
                        UsageDaily.day
                    )
                )
            ).all()
        assert [tuple(row) for row in rows] == [
            (date(2026, 1, 31), 1, 2),
            (date(2026, 2, 1), 2, 7),
        ]
    finally:
        await engine.dispose()
