"""Usage is attributed to UTC days and months whatever the local time zone: the daily rollups,
the quota's month, reports, the billing export and a rebuild of the rollups, with records at
23:59:59.999999 and 00:00:00 UTC either side of a month's end, in a process whose clock is 14
hours ahead of UTC and in one 11 hours behind (on a UTC machine a day or month computed in local
time is right by accident).

The zone is switched in this process with ``time.tzset()``: everything here that could read
local time reads it through the C library's zone, which ``tzset`` resets from ``TZ``
(``datetime.fromtimestamp``, ``datetime.now()``, ``.astimezone()``, ``time.localtime``). The
databases do not read the client's zone: SQLite holds the UTC text the app writes, and Postgres
uses its session's ``TimeZone``. The app pins that to UTC (``auth.db``); this module's Postgres
database defaults to 14 hours ahead, so that the pin is proved, and a day computed in the
session's zone (as the rollup rebuild could) would be caught if it ever went."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from auth.errors import QuotaExceeded
from auth.models import MonthlyUsage, UsageDaily, utcnow
from auth.usage.ledger import month_of, rebuild_rollups, report_window, seconds_to_next_month
from tests.conftest import (
    Backend,
    Harness,
    admin_connection,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    only_on,
)
from tests.factories import insert_usage, usage_events, utc_at

# POSIX zone names count the other way: Etc/GMT-14 is 14 hours ahead of UTC.
ZONES = {"utc+14": "Etc/GMT-14", "utc-11": "Etc/GMT+11"}
DATABASE_ZONE = "Etc/GMT-14"

LAST_INSTANT = "23:59:59.999999"
FIRST_INSTANT = "00:00:00"


@pytest.fixture(scope="module")
def backend(backend: Backend) -> Backend:
    """This module's database; on Postgres its sessions' time zone is far from UTC too."""
    if backend.name == "postgres":
        name = make_url(backend.database_url).database

        async def set_zone() -> None:
            connection = await admin_connection()
            try:
                await connection.execute(
                    f"ALTER DATABASE \"{name}\" SET timezone TO '{DATABASE_ZONE}'"
                )
            finally:
                await connection.close()

        asyncio.run(set_zone())
    return backend


@pytest.fixture(params=list(ZONES))
def local_zone(request: pytest.FixtureRequest) -> Iterator[str]:
    """This process's local time zone, far from UTC for the test (restored after it)."""
    previous = os.environ.get("TZ")
    os.environ["TZ"] = ZONES[request.param]
    time.tzset()
    try:
        # In force: one of a month's edge instants falls on another local day than its UTC one.
        edges = (utc_at("2027-03-31", LAST_INSTANT), utc_at("2027-04-01", FIRST_INSTANT))
        assert any(edge.astimezone().date() != edge.date() for edge in edges)
        yield request.param
    finally:
        if previous is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = previous
        time.tzset()


@only_on("postgres")
async def test_the_apps_postgres_sessions_are_utc_whatever_the_databases_zone(
    harness: Harness,
) -> None:
    async with harness.sessionmaker() as session:
        assert await session.scalar(text("SHOW timezone")) == "UTC"


async def _rollups(harness: Harness, tenant_id: uuid.UUID) -> list[tuple[Any, ...]]:
    async with harness.sessionmaker() as session:
        rows = await session.execute(
            select(UsageDaily.day, UsageDaily.requests, UsageDaily.units)
            .where(UsageDaily.tenant_id == tenant_id)
            .order_by(UsageDaily.day)
        )
        return [(_day(day), requests, units) for day, requests, units in rows]


def _day(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


async def _months(harness: Harness, tenant_id: uuid.UUID) -> dict[str, int]:
    async with harness.sessionmaker() as session:
        rows = await session.execute(
            select(MonthlyUsage.month, MonthlyUsage.units).where(
                MonthlyUsage.tenant_id == tenant_id
            )
        )
        return {str(row.month): int(row.units) for row in rows}


async def test_records_either_side_of_a_month_end_count_on_their_utc_day_and_month(
    harness: Harness, local_zone: str
) -> None:
    """The rollups, the monthly counters, /me/usage, /admin/usage and the billing export put
    March's last instant in March and April's first in April, and a rebuild agrees."""
    tenant, key = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    await insert_usage(
        harness,
        [
            (tenant.id, utc_at("2027-03-31", LAST_INSTANT), "iris", "1", 2),
            (tenant.id, utc_at("2027-04-01", FIRST_INSTANT), "iris", "1", 3),
        ],
    )
    days = [(date(2027, 3, 31), 1, 2), (date(2027, 4, 1), 1, 3)]
    assert await _rollups(harness, tenant.id) == days
    assert await _months(harness, tenant.id) == {"2027-03": 2, "2027-04": 3}

    for day, _, units in days:
        window = {"start": day.isoformat(), "end": day.isoformat()}
        mine = await harness.client.get("/api/v1/me/usage", params=window, headers=bearer(key))
        theirs = await harness.client.get(
            "/api/v1/admin/usage",
            params={**window, "tenant_id": str(tenant.id)},
            headers=bearer(admin),
        )
        assert mine.status_code == theirs.status_code == 200, mine.text
        assert mine.json() == theirs.json()
        assert mine.json()["by_day"] == [{"date": day.isoformat(), "requests": 1, "units": units}]

    for month, day, units in (("2027-03", "2027-03-31", 2), ("2027-04", "2027-04-01", 3)):
        export = await harness.client.get(
            "/api/v1/admin/billing/export",
            params={"month": month, "format": "jsonl"},
            headers=bearer(admin),
        )
        assert export.status_code == 200, export.text
        rows = [json.loads(line) for line in export.text.splitlines()]
        mine = [
            (row["date"], row["requests"], row["units"])
            for row in rows
            if row["tenant_id"] == str(tenant.id)
        ]
        assert mine == [(day, 1, units)], month

    async with harness.sessionmaker() as session:
        await rebuild_rollups(session)
        await session.commit()
    assert await _rollups(harness, tenant.id) == days


async def test_the_quota_month_of_a_request_is_its_utc_month(
    harness: Harness, local_zone: str
) -> None:
    """A quota of 5 used up by March's last instant leaves April's first instant a whole
    quota, and refuses one more unit in March (its reset a second away at most)."""
    tenant, _ = await create_tenant_with_key(harness)
    last, first = utc_at("2027-03-31", LAST_INSTANT), utc_at("2027-04-01", FIRST_INSTANT)
    march, april, more_march, more_april = await usage_events(
        harness,
        [
            (tenant.id, last, "iris", "1", 5),
            (tenant.id, first, "iris", "1", 5),
            (tenant.id, last, "iris", "1", 1),
            (tenant.id, first, "iris", "1", 1),
        ],
    )
    writer = harness.state.usage_writer
    await writer.charge(march, 5)
    await writer.charge(april, 5)
    for refused in (more_march, more_april):
        with pytest.raises(QuotaExceeded) as caught:
            await writer.charge(refused, 5)
        if refused is more_march:
            assert caught.value.retry_after == 1
    assert await _months(harness, tenant.id) == {"2027-03": 5, "2027-04": 5}


def test_months_and_quota_resets_are_utc(local_zone: str) -> None:
    last, first = utc_at("2027-03-31", LAST_INSTANT), utc_at("2027-04-01", FIRST_INSTANT)
    assert (month_of(last), month_of(first)) == ("2027-03", "2027-04")
    assert seconds_to_next_month(last) == 1
    assert seconds_to_next_month(first) == 30 * 86400


async def test_the_default_report_window_is_this_utc_month_so_far(
    harness: Harness, local_zone: str
) -> None:
    """Whatever the hour, one of the two zones has another local date than UTC's, so a window
    ending on the local date is caught by one of them."""
    _, key = await create_tenant_with_key(harness)
    before = datetime.now(UTC).date()
    computed = report_window(None, None)
    default = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    after = utcnow().date()
    assert default.status_code == 200, default.text
    windows = {(day.replace(day=1), day) for day in (before, after)}
    assert computed in windows
    body = default.json()
    assert (date.fromisoformat(body["start"]), date.fromisoformat(body["end"])) in windows
