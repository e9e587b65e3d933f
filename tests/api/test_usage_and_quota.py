"""/me, /me/usage and the monthly quota (SECURITY.md line 14)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import func, select

from auth.models import UsageRecord, utcnow
from tests.conftest import IRIS_SETOSA, Harness, bearer, create_tenant_with_key


async def test_me_describes_tenant_limits_and_key(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=42)
    response = await harness.client.get("/api/v1/me", headers=bearer(key))
    assert response.status_code == 200
    body = response.json()
    assert body["tenant"]["id"] == str(tenant.id)
    assert body["tenant"]["plan"] == "standard"
    assert body["limits"] == {"rate_limit": "1000/minute", "monthly_quota": 42}
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
