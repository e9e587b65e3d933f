"""/me, /me/usage and the monthly quota (SECURITY.md line 14)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from auth.errors import InvalidRequest
from auth.models import UsageRecord, utcnow
from auth.usage.ledger import month_of, parse_month, seconds_to_next_month
from tests.conftest import IRIS_SETOSA, Harness, bearer, create_tenant_with_key
from tests.factories import insert_usage, utc_at


async def test_me_describes_tenant_limits_and_key(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=42)
    response = await harness.client.get("/api/v1/me", headers=bearer(key))
    assert response.status_code == 200
    body = response.json()
    assert body["tenant"]["id"] == str(tenant.id)
    assert body["tenant"]["plan"] == "standard"
    assert body["limits"] == {
        "rate_limit": "1000/minute",
        "monthly_quota": 42,
        "max_in_flight": None,
        "models": None,
    }
    assert body["key"]["scopes"] == ["predict", "usage:read"]
    assert body["key"]["expires_at"] is None


async def test_me_usage_reports_by_day_and_model_with_quota(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=100)
    # Read before the requests (and again after the last one), so that the test holds when
    # midnight or a month's end passes while it runs.
    before = utcnow()
    await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    await harness.client.post(
        "/api/v1/predict/batch", json={"instances": [IRIS_SETOSA] * 4}, headers=bearer(key)
    )
    default = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    start, end = before.date(), before.date() + timedelta(days=1)
    window = await harness.client.get(
        f"/api/v1/me/usage?start={start}&end={end}", headers=bearer(key)
    )
    after = utcnow()
    assert default.status_code == 200, default.text
    assert window.status_code == 200, window.text
    body = window.json()
    assert body["tenant_id"] == str(tenant.id)
    assert (body["start"], body["end"]) == (start.isoformat(), end.isoformat())
    assert body["total_requests"] == 2
    assert body["total_units"] == 5
    assert body["by_model"] == [{"model": "iris", "model_version": "1", "requests": 2, "units": 5}]
    days = {before.date().isoformat(), after.date().isoformat()}
    assert {d["date"] for d in body["by_day"]} <= days
    assert sum(d["requests"] for d in body["by_day"]) == 2
    assert sum(d["units"] for d in body["by_day"]) == 5
    if before.strftime("%Y-%m") == after.strftime("%Y-%m"):
        # No month's end passed: the default window (this month so far) holds the same, and
        # the quota counts all five units.
        assert default.json()["by_model"] == body["by_model"]
        assert default.json()["total_units"] == 5
        assert body["quota"] == {"monthly_quota": 100, "used": 5, "remaining": 95}
    if len(days) == 1:
        assert body["by_day"] == [{"date": start.isoformat(), "requests": 2, "units": 5}]
    empty = await harness.client.get(
        "/api/v1/me/usage?start=2001-01-01&end=2001-01-31", headers=bearer(key)
    )
    assert empty.json()["total_requests"] == 0
    assert empty.json()["by_day"] == []
    inverted = await harness.client.get(
        f"/api/v1/me/usage?start={start}&end=2001-01-01", headers=bearer(key)
    )
    assert inverted.status_code == 422


async def _count_rows(harness: Harness, tenant_id: object) -> int:
    async with harness.sessionmaker() as session:
        count = await session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.tenant_id == tenant_id)
        )
    return int(count or 0)


async def test_request_crossing_the_quota_is_refused_whole(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=5)
    first = await harness.client.post(
        "/api/v1/predict/batch", json={"instances": [IRIS_SETOSA] * 3}, headers=bearer(key)
    )
    assert first.status_code == 200
    crossing = await harness.client.post(
        "/api/v1/predict/batch", json={"instances": [IRIS_SETOSA] * 3}, headers=bearer(key)
    )
    assert crossing.status_code == 429
    assert crossing.json()["type"] == "quota-exceeded"
    assert int(crossing.headers["Retry-After"]) > 0
    fitting = await harness.client.post(
        "/api/v1/predict/batch", json={"instances": [IRIS_SETOSA] * 2}, headers=bearer(key)
    )
    assert fitting.status_code == 200
    over = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert over.status_code == 429
    usage = (await harness.client.get("/api/v1/me/usage", headers=bearer(key))).json()
    assert usage["quota"] == {"monthly_quota": 5, "used": 5, "remaining": 0}
    assert usage["total_units"] == 5
    assert await _count_rows(harness, tenant.id) == 2


async def test_concurrent_requests_never_exceed_the_quota(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=7)
    responses = await asyncio.gather(
        *[
            harness.client.post(
                "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
            )
            for _ in range(20)
        ]
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 7, statuses
    assert statuses.count(429) == 13
    assert await _count_rows(harness, tenant.id) == 7


async def test_zero_quota_refuses_everything(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=0)
    response = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert response.status_code == 429
    assert await _count_rows(harness, tenant.id) == 0


async def test_usage_window_counts_its_edges_and_each_day_model_and_version(
    harness: Harness,
) -> None:
    """Usage of a past month, inserted directly: a window includes its first instant and its
    last day, excludes the instants just outside, and reports each day and each model version
    on its own, in order."""
    tenant, key = await create_tenant_with_key(harness)
    await insert_usage(
        harness,
        [
            (tenant.id, utc_at("2001-01-31", "23:59:59.999999"), "iris", "1", 100),
            (tenant.id, utc_at("2001-02-01", "00:00:00"), "iris", "1", 1),
            (tenant.id, utc_at("2001-02-10", "08:00:00"), "wine", "1", 2),
            (tenant.id, utc_at("2001-02-10", "09:00:00"), "iris", "2", 3),
            (tenant.id, utc_at("2001-02-10", "10:00:00"), "wine", "2", 4),
            (tenant.id, utc_at("2001-02-10", "11:00:00"), "iris", "1", 5),
            (tenant.id, utc_at("2001-02-28", "23:59:59.999999"), "wine", "1", 6),
            (tenant.id, utc_at("2001-03-01", "00:00:00"), "iris", "1", 100),
        ],
    )
    response = await harness.client.get(
        "/api/v1/me/usage?start=2001-02-01&end=2001-02-28", headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["start"], body["end"]) == ("2001-02-01", "2001-02-28")
    assert (body["total_requests"], body["total_units"]) == (6, 21)
    assert body["by_day"] == [
        {"date": "2001-02-01", "requests": 1, "units": 1},
        {"date": "2001-02-10", "requests": 4, "units": 14},
        {"date": "2001-02-28", "requests": 1, "units": 6},
    ]
    assert body["by_model"] == [
        {"model": "iris", "model_version": "1", "requests": 2, "units": 6},
        {"model": "iris", "model_version": "2", "requests": 1, "units": 3},
        {"model": "wine", "model_version": "1", "requests": 2, "units": 8},
        {"model": "wine", "model_version": "2", "requests": 1, "units": 4},
    ]
    # Each day's usage by model version, in day, model and version order; days without usage
    # are left out, and each day's rows add up to its by_day row.
    assert body["by_day_and_model"] == [
        {"date": "2001-02-01", "model": "iris", "model_version": "1", "requests": 1, "units": 1},
        {"date": "2001-02-10", "model": "iris", "model_version": "1", "requests": 1, "units": 5},
        {"date": "2001-02-10", "model": "iris", "model_version": "2", "requests": 1, "units": 3},
        {"date": "2001-02-10", "model": "wine", "model_version": "1", "requests": 1, "units": 2},
        {"date": "2001-02-10", "model": "wine", "model_version": "2", "requests": 1, "units": 4},
        {"date": "2001-02-28", "model": "wine", "model_version": "1", "requests": 1, "units": 6},
    ]
    one_day = await harness.client.get(
        "/api/v1/me/usage?start=2001-02-10&end=2001-02-10", headers=bearer(key)
    )
    assert one_day.status_code == 200, one_day.text
    assert one_day.json()["by_day"] == [{"date": "2001-02-10", "requests": 4, "units": 14}]
    # A window that starts on the last day of January holds January's last instant.
    edge = await harness.client.get(
        "/api/v1/me/usage?start=2001-01-31&end=2001-01-31", headers=bearer(key)
    )
    assert edge.json()["by_day"] == [{"date": "2001-01-31", "requests": 1, "units": 100}]


async def test_usage_window_defaults_to_this_month_and_is_bounded(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    before = utcnow().date()
    default = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    after = utcnow().date()
    assert default.status_code == 200, default.text
    window = (default.json()["start"], default.json()["end"])
    assert window in {(day.replace(day=1).isoformat(), day.isoformat()) for day in (before, after)}
    # Only an end: the window is that end's month up to it.
    only_end = await harness.client.get("/api/v1/me/usage?end=2001-02-10", headers=bearer(key))
    assert (only_end.json()["start"], only_end.json()["end"]) == ("2001-02-01", "2001-02-10")
    # At most 366 days, counting both ends: all of 2000 (a leap year) is fine, a day more not.
    longest = await harness.client.get(
        "/api/v1/me/usage?start=2000-01-01&end=2000-12-31", headers=bearer(key)
    )
    assert longest.status_code == 200, longest.text
    for start, end in (("2000-01-01", "2001-01-01"), ("2001-01-01", "2002-01-02")):
        too_long = await harness.client.get(
            f"/api/v1/me/usage?start={start}&end={end}", headers=bearer(key)
        )
        assert too_long.status_code == 422, (start, end)
        assert "366 days" in too_long.json()["detail"]
    inverted = await harness.client.get(
        "/api/v1/me/usage?start=2001-02-02&end=2001-02-01", headers=bearer(key)
    )
    assert inverted.status_code == 422
    assert "start" in inverted.json()["detail"]


async def test_quota_counts_only_this_tenant_and_this_month(harness: Harness) -> None:
    _, other_key = await create_tenant_with_key(harness)
    served = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(other_key)
    )
    assert served.status_code == 200  # another tenant has used units this month
    tenant, key = await create_tenant_with_key(harness, monthly_quota=10)
    await insert_usage(harness, [(tenant.id, utc_at("2001-02-10"), "iris", "1", 7)])
    usage = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    assert usage.json()["quota"] == {"monthly_quota": 10, "used": 0, "remaining": 10}
    # And an unlimited tenant has no remaining figure.
    _, unlimited = await create_tenant_with_key(harness)
    quota = (await harness.client.get("/api/v1/me/usage", headers=bearer(unlimited))).json()
    assert quota["quota"] == {"monthly_quota": None, "used": 0, "remaining": None}


NEW_YORK_WINTER = timezone(timedelta(hours=-5))
KARACHI = timezone(timedelta(hours=5))


def _next_month(moment: datetime) -> datetime:
    """The first instant of the UTC month after ``moment``, by calendar arithmetic."""
    utc = moment.astimezone(UTC)
    year, month = (utc.year + 1, 1) if utc.month == 12 else (utc.year, utc.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


async def test_quota_refusal_says_when_the_quota_resets(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness, monthly_quota=0)
    before = utcnow()
    refused = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    after = utcnow()
    assert refused.status_code == 429
    retry_after = int(refused.headers["Retry-After"])
    earliest = int((_next_month(after) - after).total_seconds()) - 1
    latest = int((_next_month(before) - before).total_seconds()) + 1
    if _next_month(before) == _next_month(after):
        assert earliest <= retry_after <= latest


@pytest.mark.parametrize(
    ("moment", "seconds"),
    [
        (datetime(2026, 1, 31, 23, 59, 30, tzinfo=UTC), 30),
        (datetime(2026, 1, 31, 23, 59, 59, 500_000, tzinfo=UTC), 1),  # never 0
        (datetime(2026, 2, 15, 12, 0, tzinfo=UTC), 13 * 86400 + 12 * 3600),
        (datetime(2026, 3, 1, 0, 0, tzinfo=UTC), 31 * 86400),
        (datetime(2026, 12, 31, 6, 30, 15, 250_000, tzinfo=UTC), 17 * 3600 + 29 * 60 + 44),
        # 2026-01-31 20:00 at UTC-5 is already February in UTC.
        (
            datetime(2026, 1, 31, 20, 0, tzinfo=NEW_YORK_WINTER),
            27 * 86400 + 23 * 3600,
        ),
    ],
)
def test_seconds_to_next_month(moment: datetime, seconds: int) -> None:
    assert seconds_to_next_month(moment) == seconds
    assert seconds_to_next_month(moment) == max(
        1, int((_next_month(moment) - moment).total_seconds())
    )


def test_month_of_is_the_utc_month() -> None:
    assert month_of(datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC)) == "2026-01"
    assert month_of(datetime(2026, 2, 1, 0, 0, tzinfo=UTC)) == "2026-02"
    assert month_of(datetime(2026, 1, 31, 20, 0, tzinfo=NEW_YORK_WINTER)) == ("2026-02")
    assert month_of(datetime(2026, 2, 1, 3, 0, tzinfo=KARACHI)) == "2026-01"
    assert month_of(datetime(987, 3, 1, tzinfo=UTC)) == "0987-03"


@pytest.mark.parametrize(
    ("month", "first", "last"),
    [
        ("2024-02", date(2024, 2, 1), date(2024, 2, 29)),
        ("2026-02", date(2026, 2, 1), date(2026, 2, 28)),
        ("2026-04", date(2026, 4, 1), date(2026, 4, 30)),
        ("2026-12", date(2026, 12, 1), date(2026, 12, 31)),
    ],
)
def test_parse_month_gives_its_first_and_last_day(month: str, first: date, last: date) -> None:
    assert parse_month(month) == (first, last)


@pytest.mark.parametrize("month", ["2026-13", "2026-00", "2026", "26-01", "january"])
def test_parse_month_refuses_anything_else(month: str) -> None:
    with pytest.raises(InvalidRequest, match="YYYY-MM"):
        parse_month(month)
