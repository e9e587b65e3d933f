"""Postgres keeps usage records in one partition per UTC month: made as a month's first record is
written, dropped whole by a prune."""

from __future__ import annotations

import uuid
from datetime import date

import pytest
from sqlalchemy import func, select, text

from auth.models import UsageDaily, UsageRecord
from auth.usage.ledger import UsageEvent, prune_records
from tests.conftest import Harness, create_tenant_with_key, only_on
from tests.factories import insert_usage, utc_at

pytestmark = only_on("postgres")


async def _partitions(harness: Harness) -> set[str]:
    async with harness.sessionmaker() as session:
        names = await session.scalars(
            text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'usage_record'::regclass"
            )
        )
        return set(names)


async def _units(harness: Harness, tenant_id: uuid.UUID, table: type) -> int:
    async with harness.sessionmaker() as session:
        total = await session.scalar(
            select(func.coalesce(func.sum(table.units), 0)).where(table.tenant_id == tenant_id)
        )
    return int(total)


async def test_a_months_first_record_creates_its_partition(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    assert "usage_record_2003_04" not in await _partitions(harness)
    await insert_usage(
        harness,
        [
            (tenant.id, utc_at("2003-04-01", "00:00:00"), "iris", "1", 1),
            (tenant.id, utc_at("2003-04-30", "23:59:59.999999"), "iris", "1", 2),
            (tenant.id, utc_at("2003-05-01", "00:00:00"), "iris", "1", 4),
        ],
    )
    assert {"usage_record_2003_04", "usage_record_2003_05"} <= await _partitions(harness)
    async with harness.sessionmaker() as session:
        april = await session.scalar(text("SELECT sum(units) FROM usage_record_2003_04"))
        may = await session.scalar(text("SELECT sum(units) FROM usage_record_2003_05"))
    assert (april, may) == (3, 4)


async def test_a_prune_drops_whole_months_and_keeps_the_rollups(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    await insert_usage(
        harness,
        [
            (tenant.id, utc_at("2004-01-10"), "iris", "1", 1),
            (tenant.id, utc_at("2004-02-10"), "iris", "1", 2),
            (tenant.id, utc_at("2004-02-29", "23:59:59.999999"), "iris", "1", 4),
            (tenant.id, utc_at("2004-03-01", "00:00:00"), "iris", "1", 8),
            (tenant.id, utc_at("2004-03-20"), "iris", "1", 16),
        ],
    )
    before = await _partitions(harness)
    assert {"usage_record_2004_01", "usage_record_2004_02", "usage_record_2004_03"} <= before

    # Up to 2004-03-02: January and February go whole, March loses its first day's record.
    deleted = await prune_records(harness.sessionmaker, date(2004, 3, 2))
    after = await _partitions(harness)
    assert "usage_record_2004_01" not in after
    assert "usage_record_2004_02" not in after
    assert "usage_record_2004_03" in after
    assert deleted >= 4  # this tenant's four (other tests' older months may go too)
    assert await _units(harness, tenant.id, UsageRecord) == 16
    assert await _units(harness, tenant.id, UsageDaily) == 31

    # A late record for a dropped month gets its partition back, even from a writer that
    # remembered it as made.
    await insert_usage(harness, [(tenant.id, utc_at("2004-01-11"), "iris", "1", 32)])
    assert "usage_record_2004_01" in await _partitions(harness)
    assert await _units(harness, tenant.id, UsageRecord) == 48


async def test_a_retried_record_is_refused_in_its_partition(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    await insert_usage(harness, [(tenant.id, utc_at("2005-06-01"), "iris", "1", 1)])
    async with harness.sessionmaker() as session:
        record = (
            await session.scalars(select(UsageRecord).where(UsageRecord.tenant_id == tenant.id))
        ).one()
    retry = UsageEvent(
        request_id=record.request_id,
        tenant_id=record.tenant_id,
        api_key_id=record.api_key_id,
        model=record.model,
        model_version=record.model_version,
        plan_id=record.plan_id,
        units=record.units,
        status_code=200,
        latency_ms=1.0,
        created_at=record.created_at,
    )
    with pytest.raises(Exception, match="usage could not be recorded"):
        await harness.state.usage_writer.charge(retry, None)
    assert await _units(harness, tenant.id, UsageRecord) == 1
