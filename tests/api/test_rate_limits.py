"""Per-key rate limits (SECURITY.md line 13, in one process)."""

from __future__ import annotations

from sqlalchemy import func, select

from auth.models import UsageRecord
from tests.conftest import IRIS_SETOSA, Harness, bearer, create_tenant_with_key


async def test_rate_limit_holds_per_key_and_sets_headers(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness, rate_limit="3/minute")
    statuses = []
    for _ in range(4):
        response = await harness.client.post(
            "/api/v1/predict",
            json={"features": IRIS_SETOSA},
            headers={**bearer(key), "X-Forwarded-For": "10.0.0.1"},
        )
        statuses.append(response.status_code)
    assert statuses == [200, 200, 200, 429]
    assert response.json()["type"] == "rate-limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["X-RateLimit-Limit"] == "3"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert int(response.headers["X-RateLimit-Reset"]) > 0
    # Another key has its own budget.
    _, other = await create_tenant_with_key(harness, rate_limit="3/minute")
    fresh = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(other)
    )
    assert fresh.status_code == 200
    assert fresh.headers["X-RateLimit-Remaining"] == "2"


async def test_rate_limited_requests_are_not_billed(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, rate_limit="1/minute")
    await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    for _ in range(3):
        limited = await harness.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert limited.status_code == 429
    async with harness.sessionmaker() as session:
        count = await session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.tenant_id == tenant.id)
        )
    assert count == 1
