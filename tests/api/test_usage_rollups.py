"""The daily usage rollups: maintained by the usage writer in the records' own transaction, equal
to what a rebuild from the raw records gives, and what reports and exports read."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

import pytest
from sqlalchemy import func, select, update

from auth.errors import InvalidRequest
from auth.models import UsageDaily, UsageRecord
from auth.usage.ledger import prune_records, rebuild_rollups
from tests.conftest import IRIS_SETOSA, Harness, bearer, create_admin_key, create_tenant_with_key
from tests.factories import insert_usage, utc_at


async def _rollups(harness: Harness) -> list[tuple[Any, ...]]:
    async with harness.sessionmaker() as session:
        rows = await session.execute(
            select(
                UsageDaily.tenant_id,
                UsageDaily.day,
                UsageDaily.api_key_id,
                UsageDaily.model,
                UsageDaily.model_version,
                UsageDaily.requests,
                UsageDaily.units,
            ).order_by(
                UsageDaily.tenant_id,
                UsageDaily.day,
                UsageDaily.api_key_id,
                UsageDaily.model,
                UsageDaily.model_version,
            )
        )
        return [tuple(row) for row in rows]


async def _make_usage(harness: Harness) -> list[uuid.UUID]:
    """Real predictions today, and records on past days (across a month's end) for two
    tenants, all through the usage writer."""
    first, key = await create_tenant_with_key(harness)
    second, _ = await create_tenant_with_key(harness)
    for _ in range(3):
        response = await harness.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert response.status_code == 200
    batch = await harness.client.post(
        "/api/v1/predict/batch", json={"instances": [IRIS_SETOSA] * 4}, headers=bearer(key)
    )
    assert batch.status_code == 200
    await insert_usage(
        harness,
        [
            (first.id, utc_at("2026-01-31", "23:59:59.999999"), "iris", "1", 2),
            (first.id, utc_at("2026-02-01", "00:00:00"), "iris", "1", 5),
            (first.id, utc_at("2026-02-01", "13:00:00"), "iris", "2", 1),
            (second.id, utc_at("2026-02-01", "13:00:00"), "iris", "1", 7),
            (second.id, utc_at("2026-02-01", "14:00:00"), "iris", "1", 3),
        ],
    )
    return [first.id, second.id]


async def test_the_maintained_rollups_equal_the_sums_of_the_records(harness: Harness) -> None:
    tenants = await _make_usage(harness)
    async with harness.sessionmaker() as session:
        totals = (
            await session.execute(
                select(func.count(), func.sum(UsageRecord.units)).where(
                    UsageRecord.tenant_id.in_(tenants)
                )
            )
        ).one()
        rolled = (
            await session.execute(
                select(func.sum(UsageDaily.requests), func.sum(UsageDaily.units)).where(
                    UsageDaily.tenant_id.in_(tenants)
                )
            )
        ).one()
    assert tuple(rolled) == tuple(totals)


async def test_a_rebuild_from_the_records_equals_the_maintained_rollups(harness: Harness) -> None:
    await _make_usage(harness)
    maintained = await _rollups(harness)
    assert maintained
    async with harness.sessionmaker() as session:
        assert await rebuild_rollups(session) == len(maintained)
        await session.commit()
    assert await _rollups(harness) == maintained


async def test_a_rebuild_repairs_damaged_rollups(harness: Harness) -> None:
    await _make_usage(harness)
    maintained = await _rollups(harness)
    async with harness.sessionmaker() as session:
        await session.execute(update(UsageDaily).values(units=UsageDaily.units + 1000))
        await session.commit()
    assert await _rollups(harness) != maintained
    async with harness.sessionmaker() as session:
        await rebuild_rollups(session)
        await session.commit()
    assert await _rollups(harness) == maintained


async def test_reports_read_the_rollups(harness: Harness) -> None:
    """A report answers from the rollups alone: changing a rollup changes the report."""
    tenant, key = await create_tenant_with_key(harness)
    await insert_usage(harness, [(tenant.id, utc_at("2026-02-01"), "iris", "1", 5)])
    async with harness.sessionmaker() as session:
        await session.execute(
            update(UsageDaily).where(UsageDaily.tenant_id == tenant.id).values(units=6)
        )
        await session.commit()
    report = await harness.client.get(
        "/api/v1/me/usage",
        params={"start": "2026-02-01", "end": "2026-02-01"},
        headers=bearer(key),
    )
    assert report.json()["total_units"] == 6
    # Put it back: the module's other tests compare rollups with their records.
    async with harness.sessionmaker() as session:
        await session.execute(
            update(UsageDaily).where(UsageDaily.tenant_id == tenant.id).values(units=5)
        )
        await session.commit()


async def test_pruning_raw_records_keeps_every_report_and_the_rollups(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    await insert_usage(
        harness,
        [
            (tenant.id, utc_at("2025-05-30", "23:59:59.999999"), "iris", "1", 2),
            (tenant.id, utc_at("2025-05-31", "00:00:00"), "iris", "1", 3),
            (tenant.id, utc_at("2025-06-01", "08:00:00"), "iris", "1", 4),
        ],
    )
    window = {"start": "2025-05-01", "end": "2025-06-30"}
    before = await harness.client.get("/api/v1/me/usage", params=window, headers=bearer(key))
    rollups = await _rollups(harness)
    deleted = await prune_records(harness.sessionmaker, date(2025, 5, 31), batch=1)
    assert deleted >= 1
    async with harness.sessionmaker() as session:
        days = (
            await session.scalars(
                select(UsageRecord.created_at).where(UsageRecord.tenant_id == tenant.id)
            )
        ).all()
    assert sorted(days) == [utc_at("2025-05-31", "00:00:00"), utc_at("2025-06-01", "08:00:00")]
    assert await _rollups(harness) == rollups
    after = await harness.client.get("/api/v1/me/usage", params=window, headers=bearer(key))
    assert after.json() == before.json()
    # A rebuild recomputes only the days that still have their records.
    async with harness.sessionmaker() as session:
        await rebuild_rollups(session)
        await session.commit()
    assert await _rollups(harness) == rollups


async def test_a_prune_outside_the_calendar_is_refused(harness: Harness) -> None:
    with pytest.raises(InvalidRequest):
        await prune_records(harness.sessionmaker, date(1999, 12, 31))


async def test_a_closed_month_exports_byte_identical_twice(harness: Harness) -> None:
    """The same bytes each time, in both formats, even after the current month's traffic and
    after the month's raw records are pruned (the export reads the rollups)."""
    admin = await create_admin_key(harness)
    tenant, key = await create_tenant_with_key(harness)
    await insert_usage(
        harness,
        [
            (tenant.id, utc_at("2024-07-01", "00:00:00"), "iris", "1", 2),
            (tenant.id, utc_at("2024-07-15"), "iris", "2", 3),
            (tenant.id, utc_at("2024-07-31", "23:59:59.999999"), "iris", "1", 4),
        ],
    )

    async def export(fmt: str) -> bytes:
        response = await harness.client.get(
            "/api/v1/admin/billing/export",
            params={"month": "2024-07", "format": fmt},
            headers=bearer(admin),
        )
        assert response.status_code == 200
        return response.content

    first = {fmt: await export(fmt) for fmt in ("csv", "jsonl")}
    assert str(tenant.id).encode() in first["csv"]
    live = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert live.status_code == 200
    assert {fmt: await export(fmt) for fmt in ("csv", "jsonl")} == first
    await prune_records(harness.sessionmaker, date(2024, 8, 1))
    assert {fmt: await export(fmt) for fmt in ("csv", "jsonl")} == first
