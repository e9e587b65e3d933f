"""The daily usage rollups: maintained by the usage writer in the records' own transaction, equal
to what a rebuild from the raw records gives, and what reports and exports read; requests refused
(for their quota or their rate limit) are in none of them."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from auth.errors import InvalidRequest
from auth.models import MonthlyUsage, UsageDaily, UsageRecord, utcnow
from auth.usage.ledger import month_of, prune_records, rebuild_rollups
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


@dataclass(frozen=True)
class Served:
    """What a scenario's 2xx responses were billed: requests and units (a batch's units are its
    size), and what its refusals were (429 problem types)."""

    requests: int
    units: int
    refusals: list[str]


def _served(responses: list[httpx.Response]) -> Served:
    requests = units = 0
    refusals = []
    for response in responses:
        if response.status_code == 200:
            requests += 1
            units += response.json().get("batch_size", 1)
        else:
            assert response.status_code == 429, response.text
            refusals.append(response.json()["type"])
    return Served(requests, units, refusals)


def _predict(client: httpx.AsyncClient, key: str) -> Awaitable[httpx.Response]:
    return client.post("/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key))


def _batch(client: httpx.AsyncClient, key: str, size: int) -> Awaitable[httpx.Response]:
    return client.post(
        "/api/v1/predict/batch", json={"instances": [IRIS_SETOSA] * size}, headers=bearer(key)
    )


async def _concurrent_batches_past_the_quota(harness: Harness, key: str) -> list[httpx.Response]:
    # 8 batches of 3 against a quota of 10: three fit, the others are refused whole.
    return await asyncio.gather(*(_batch(harness.client, key, 3) for _ in range(8)))


async def _single_predictions_past_the_quota(harness: Harness, key: str) -> list[httpx.Response]:
    # Concurrent then one by one, the quota of 10 crossed by both.
    first = await asyncio.gather(*(_predict(harness.client, key) for _ in range(7)))
    then = [await _predict(harness.client, key) for _ in range(5)]
    return [*first, *then]


async def _rate_limited_requests(harness: Harness, key: str) -> list[httpx.Response]:
    # A limit of 4 a minute: 3 of 6 concurrent predictions, then one batch, then nothing.
    first = await asyncio.gather(*(_predict(harness.client, key) for _ in range(6)))
    then = [await _batch(harness.client, key, 2), await _predict(harness.client, key)]
    return [*first, *then]


SCENARIOS: dict[str, tuple[dict[str, Any], Callable[..., Awaitable[list[httpx.Response]]]]] = {
    "concurrent-batches-past-the-quota": (
        {"monthly_quota": 10},
        _concurrent_batches_past_the_quota,
    ),
    "single-predictions-past-the-quota": (
        {"monthly_quota": 10},
        _single_predictions_past_the_quota,
    ),
    "rate-limited-requests": ({"rate_limit": "4/minute"}, _rate_limited_requests),
}


async def _report_totals(
    harness: Harness, path: str, params: dict[str, str], key: str
) -> tuple[int, int]:
    response = await harness.client.get(path, params=params, headers=bearer(key))
    assert response.status_code == 200, response.text
    report = response.json()
    totals = (report["total_requests"], report["total_units"])
    by_day = (
        sum(day["requests"] for day in report["by_day"]),
        sum(day["units"] for day in report["by_day"]),
    )
    by_model = (
        sum(model["requests"] for model in report["by_model"]),
        sum(model["units"] for model in report["by_model"]),
    )
    assert by_day == by_model == totals, report
    return totals


async def _exported_totals(harness: Harness, admin: str, month: str, tenant_id: str) -> list[int]:
    response = await harness.client.get(
        "/api/v1/admin/billing/export",
        params={"month": month, "format": "jsonl"},
        headers=bearer(admin),
    )
    assert response.status_code == 200, response.text
    rows = [json.loads(line) for line in response.text.splitlines()]
    mine = [row for row in rows if row["tenant_id"] == tenant_id]
    return [sum(row["requests"] for row in mine), sum(row["units"] for row in mine)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_refused_requests_are_in_no_rollup_report_or_export(
    harness: Harness, scenario: str
) -> None:
    """After requests refused for their quota (one by one and concurrently, single and batch)
    or their rate limit, the rollups, /me/usage, /admin/usage, the quota's counter and the
    billing export hold exactly what the 2xx responses served, and a rebuild of the rollups
    from the records changes nothing."""
    limits, scenario_of = SCENARIOS[scenario]
    tenant, key = await create_tenant_with_key(harness, **limits)
    admin = await create_admin_key(harness)
    before = utcnow()
    served = _served(await scenario_of(harness, key))
    after = utcnow()
    expected = (served.requests, served.units)
    # The scenario means something: some requests were served and some refused.
    assert served.requests > 0, served
    refusal = "rate-limited" if "rate_limit" in limits else "quota-exceeded"
    assert served.refusals, served
    assert set(served.refusals) == {refusal}, served

    async with harness.sessionmaker() as session:
        rolled = (
            await session.execute(
                select(func.sum(UsageDaily.requests), func.sum(UsageDaily.units)).where(
                    UsageDaily.tenant_id == tenant.id
                )
            )
        ).one()
        recorded = (
            await session.execute(
                select(func.count(), func.sum(UsageRecord.units)).where(
                    UsageRecord.tenant_id == tenant.id
                )
            )
        ).one()
        counted = (
            await session.execute(
                select(func.sum(MonthlyUsage.requests), func.sum(MonthlyUsage.units)).where(
                    MonthlyUsage.tenant_id == tenant.id
                )
            )
        ).one()
    assert tuple(rolled) == tuple(recorded) == tuple(counted) == expected

    # The tenant reads its report with a key of its own (the first one may be rate limited).
    reader = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys",
        json={"name": "reader", "scopes": ["usage:read"]},
        headers=bearer(admin),
    )
    assert reader.status_code == 201, reader.text
    reader_key = reader.json()["key"]
    # Midnight or a month's end may pass while the test runs: every day and month it touched.
    window = {"start": before.date().isoformat(), "end": after.date().isoformat()}
    mine = await _report_totals(harness, "/api/v1/me/usage", window, reader_key)
    theirs = await _report_totals(
        harness, "/api/v1/admin/usage", {**window, "tenant_id": str(tenant.id)}, admin
    )
    assert mine == theirs == expected
    exported = [0, 0]
    for month in sorted({month_of(before), month_of(after)}):
        requests, units = await _exported_totals(harness, admin, month, str(tenant.id))
        exported = [exported[0] + requests, exported[1] + units]
    assert tuple(exported) == expected
    if month_of(before) == month_of(after):
        quota = (await harness.client.get("/api/v1/me/usage", headers=bearer(reader_key))).json()
        assert quota["quota"]["used"] == served.units

    # `modelgate usage rebuild-rollups` finds nothing to repair.
    maintained = await _rollups(harness)
    async with harness.sessionmaker() as session:
        await rebuild_rollups(session)
        await session.commit()
    assert await _rollups(harness) == maintained
