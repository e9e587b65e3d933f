"""/me, /me/usage and the monthly quota (SECURITY.md line 14)."""

from __future__ import annotations

import asyncio

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
    await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    await harness.client.post(
        "/api/v1/predict/batch", json={"instances": [IRIS_SETOSA] * 4}, headers=bearer(key)
    )
    response = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    assert response.status_code == 200, response.text
    body = response.json()
    today = utcnow().date().isoformat()
    assert body["tenant_id"] == str(tenant.id)
    assert body["total_requests"] == 2
    assert body["total_units"] == 5
    assert body["quota"] == {"monthly_quota": 100, "used": 5, "remaining": 95}
    assert body["by_day"] == [{"date": today, "requests": 2, "units": 5}]
    assert body["by_model"] == [{"model": "iris", "model_version": "1", "requests": 2, "units": 5}]
    window = await harness.client.get(
        "/api/v1/me/usage?start=2001-01-01&end=2001-01-31", headers=bearer(key)
    )
    assert window.json()["total_requests"] == 0
    inverted = await harness.client.get(
        f"/api/v1/me/usage?start={today}&end=2001-01-01", headers=bearer(key)
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
