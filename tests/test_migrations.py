"""The migrations are the schema: they match the models and go down and up again."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime

import sqlalchemy as sa
from alembic import command
from alembic.util.exc import CommandError
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from api.cli import alembic_config
from auth.audit import Actor, record_event, verify_chain
from auth.db import create_engine, create_sessionmaker
from auth.models import AuditEvent, Plan, Tenant, UsageDaily, UsageRecord, UTCDateTime
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


# The tables as the schema of revision 9affb5fe6a1f had them (the ORM describes the head's).
_OLD_TENANT = sa.table(
    "tenant",
    sa.column("id", sa.Uuid()),
    sa.column("name", sa.String()),
    sa.column("plan", sa.String()),
    sa.column("status", sa.String()),
    sa.column("created_at", UTCDateTime()),
    sa.column("updated_at", UTCDateTime()),
)
_OLD_KEY = sa.table(
    "api_key",
    sa.column("id", sa.Uuid()),
    sa.column("tenant_id", sa.Uuid()),
    sa.column("name", sa.String()),
    sa.column("display_prefix", sa.String()),
    sa.column("digest", sa.String()),
    sa.column("scopes", sa.String()),
    sa.column("created_at", UTCDateTime()),
)
_OLD_RECORD = sa.table(
    "usage_record",
    sa.column("request_id", sa.Uuid()),
    sa.column("tenant_id", sa.Uuid()),
    sa.column("api_key_id", sa.Uuid()),
    sa.column("model", sa.String()),
    sa.column("model_version", sa.String()),
    sa.column("units", sa.Integer()),
    sa.column("status_code", sa.Integer()),
    sa.column("latency_ms", sa.Float()),
    sa.column("created_at", UTCDateTime()),
)


async def _old_tenant_with_usage(
    connection: AsyncConnection, name: str, plan: str, usage: list[tuple[datetime, int]]
) -> uuid.UUID:
    """A tenant on the named plan with a key and these usage records, in the old schema."""
    tenant_id, key_id, now = uuid.uuid4(), uuid.uuid4(), datetime.now(UTC)
    await connection.execute(
        sa.insert(_OLD_TENANT).values(
            id=tenant_id, name=name, plan=plan, status="active", created_at=now, updated_at=now
        )
    )
    await connection.execute(
        sa.insert(_OLD_KEY).values(
            id=key_id,
            tenant_id=tenant_id,
            name="k",
            display_prefix="mg_x",
            digest=uuid.uuid4().hex * 2,
            scopes="predict",
            created_at=now,
        )
    )
    for moment, units in usage:
        await connection.execute(
            sa.insert(_OLD_RECORD).values(
                request_id=uuid.uuid4(),
                tenant_id=tenant_id,
                api_key_id=key_id,
                model="iris",
                model_version="1",
                units=units,
                status_code=200,
                latency_ms=1.0,
                created_at=moment,
            )
        )
    return tenant_id


async def test_records_written_before_the_rollups_are_rolled_up_by_the_upgrade(
    empty_database: str,
) -> None:
    config = alembic_config(empty_database)
    await asyncio.to_thread(command.upgrade, config, "9affb5fe6a1f")
    engine = create_engine(empty_database)
    try:
        async with engine.begin() as connection:
            await _old_tenant_with_usage(
                connection,
                "old",
                "standard",
                [
                    (datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=UTC), 2),
                    (datetime(2026, 2, 1, 0, 0, tzinfo=UTC), 3),
                    (datetime(2026, 2, 1, 18, 0, tzinfo=UTC), 4),
                ],
            )
        await asyncio.to_thread(command.upgrade, config, "head")
        async with create_sessionmaker(engine)() as session:
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


async def test_tenants_move_onto_plans_named_as_before_with_their_usage(
    empty_database: str,
) -> None:
    """Each former plan name becomes a plan; each tenant, its records and its rollups name the
    plan it was on; ``standard`` exists whatever tenants there were; and the downgrade merges
    rollups split by plan back into one row."""
    config = alembic_config(empty_database)
    await asyncio.to_thread(command.upgrade, config, "9affb5fe6a1f")
    engine = create_engine(empty_database)
    moment = datetime(2026, 3, 2, 12, tzinfo=UTC)
    try:
        async with engine.begin() as connection:
            gold = await _old_tenant_with_usage(connection, "g", "gold", [(moment, 5)])
            plain = await _old_tenant_with_usage(connection, "p", "standard", [(moment, 1)])
        await asyncio.to_thread(command.upgrade, config, "head")
        async with create_sessionmaker(engine)() as session:
            plans = dict((await session.execute(select(Plan.name, Plan.id))).all())
            assert set(plans) == {"gold", "standard"}
            tenants = dict((await session.execute(select(Tenant.id, Tenant.plan_id))).all())
            assert tenants == {gold: plans["gold"], plain: plans["standard"]}
            for table in (UsageRecord, UsageDaily):
                by_tenant = dict(
                    (await session.execute(select(table.tenant_id, table.plan_id))).all()
                )
                assert by_tenant == tenants
            # A rollup row of the same key, model and day under another plan (the tenant moved).
            row = (
                await session.scalars(select(UsageDaily).where(UsageDaily.tenant_id == gold))
            ).one()
            session.add(
                UsageDaily(
                    tenant_id=gold,
                    day=row.day,
                    api_key_id=row.api_key_id,
                    model=row.model,
                    model_version=row.model_version,
                    plan_id=plans["standard"],
                    requests=2,
                    units=6,
                )
            )
            await session.commit()
        await asyncio.to_thread(command.downgrade, config, "5c0d2b7e41a3")
        async with engine.connect() as connection:
            merged = (
                await connection.execute(
                    text("SELECT requests, units FROM usage_daily ORDER BY units")
                )
            ).all()
            plans_before = (
                await connection.execute(text("SELECT name, plan FROM tenant ORDER BY name"))
            ).all()
        assert [tuple(r) for r in merged] == [(1, 1), (3, 11)]
        assert [tuple(r) for r in plans_before] == [("g", "gold"), ("p", "standard")]
    finally:
        await engine.dispose()
