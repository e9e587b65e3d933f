"""GET /admin/usage: any tenant's usage for operators, in /me/usage's shape; group_by on both."""

from __future__ import annotations

import pytest

from auth.limits.plans import create_plan
from tests.conftest import (
    IRIS_SETOSA,
    TEST_ACTOR,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    unique,
)
from tests.factories import insert_usage, utc_at

WINDOW = {"start": "2026-03-01", "end": "2026-03-31"}


async def _tenant_with_usage(harness: Harness) -> tuple[str, str]:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=1000)
    await insert_usage(
        harness,
        [
            (tenant.id, utc_at("2026-03-01"), "iris", "1", 2),
            (tenant.id, utc_at("2026-03-02"), "iris", "2", 3),
            (tenant.id, utc_at("2026-03-02"), "iris", "1", 4),
        ],
    )
    return str(tenant.id), key


async def test_the_operator_sees_what_the_tenant_sees(harness: Harness) -> None:
    tenant_id, key = await _tenant_with_usage(harness)
    admin = await create_admin_key(harness)
    mine = await harness.client.get("/api/v1/me/usage", params=WINDOW, headers=bearer(key))
    theirs = await harness.client.get(
        "/api/v1/admin/usage", params={**WINDOW, "tenant_id": tenant_id}, headers=bearer(admin)
    )
    assert mine.status_code == theirs.status_code == 200, theirs.text
    assert theirs.json() == mine.json()
    report = theirs.json()
    assert report["total_units"] == 9
    assert [d["units"] for d in report["by_day"]] == [2, 7]
    assert [(m["model_version"], m["units"]) for m in report["by_model"]] == [("1", 6), ("2", 3)]
    assert report["by_key"] == []
    assert [
        (p["date"], p["model_version"], p["requests"], p["units"])
        for p in report["by_day_and_model"]
    ] == [("2026-03-01", "1", 1, 2), ("2026-03-02", "1", 1, 4), ("2026-03-02", "2", 1, 3)]
    assert report["quota"]["monthly_quota"] == 1000


async def test_group_by_chooses_the_breakdowns(harness: Harness) -> None:
    tenant_id, _ = await _tenant_with_usage(harness)
    admin = await create_admin_key(harness)
    response = await harness.client.get(
        "/api/v1/admin/usage",
        params={**WINDOW, "tenant_id": tenant_id, "group_by": "key"},
        headers=bearer(admin),
    )
    report = response.json()
    assert report["by_day"] == report["by_model"] == report["by_day_and_model"] == []
    [by_key] = report["by_key"]
    assert (by_key["name"], by_key["requests"], by_key["units"]) == ("test key", 3, 9)
    assert by_key["prefix"].startswith("mg_")
    both = await harness.client.get(
        "/api/v1/admin/usage",
        params=[
            *WINDOW.items(),
            ("tenant_id", tenant_id),
            ("group_by", "day"),
            ("group_by", "key"),
        ],
        headers=bearer(admin),
    )
    assert both.status_code == 200
    # By day and model together only when both are asked for (as by default).
    assert both.json()["by_day"]
    assert both.json()["by_day_and_model"] == []
    default = await harness.client.get(
        "/api/v1/admin/usage", params={**WINDOW, "tenant_id": tenant_id}, headers=bearer(admin)
    )
    pairs = default.json()["by_day_and_model"]
    assert sum(p["requests"] for p in pairs) == default.json()["total_requests"] == 3
    assert sum(p["units"] for p in pairs) == default.json()["total_units"] == 9


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"tenant_id": "00000000-0000-0000-0000-000000000000"}, 404),
        ({}, 422),  # no tenant_id
        ({"tenant_id": "not-a-uuid"}, 422),
        ({"tenant_id": "{tenant}", "group_by": "tenant"}, 422),
        ({"tenant_id": "{tenant}", "start": "2026-03-02", "end": "2026-03-01"}, 422),
    ],
)
async def test_bad_queries_are_refused(
    harness: Harness, params: dict[str, str], status: int
) -> None:
    tenant_id, _ = await _tenant_with_usage(harness)
    admin = await create_admin_key(harness)
    query = {name: value.replace("{tenant}", tenant_id) for name, value in params.items()}
    response = await harness.client.get("/api/v1/admin/usage", params=query, headers=bearer(admin))
    assert response.status_code == status, response.text


async def test_a_tenant_credential_gets_403(harness: Harness) -> None:
    tenant_id, key = await _tenant_with_usage(harness)
    response = await harness.client.get(
        "/api/v1/admin/usage", params={"tenant_id": tenant_id}, headers=bearer(key)
    )
    assert response.status_code == 403


async def test_the_tenant_may_break_its_usage_down_by_key(harness: Harness) -> None:
    _, key = await _tenant_with_usage(harness)
    response = await harness.client.get(
        "/api/v1/me/usage", params={**WINDOW, "group_by": "key"}, headers=bearer(key)
    )
    report = response.json()
    assert [k["units"] for k in report["by_key"]] == [9]
    assert report["by_day"] == []


async def test_the_operator_sees_the_quota_and_thresholds_of_the_tenants_plan(
    harness: Harness,
) -> None:
    plan = unique("plan")
    async with harness.sessionmaker() as session:
        await create_plan(
            session, TEST_ACTOR, name=plan, monthly_quota=20, usage_alert_thresholds=[25, 50]
        )
        await session.commit()
    tenant, key = await create_tenant_with_key(harness, plan=plan)
    for _ in range(6):
        served = await harness.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert served.status_code == 200, served.text
    admin = await create_admin_key(harness)
    mine = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    theirs = await harness.client.get(
        "/api/v1/admin/usage", params={"tenant_id": str(tenant.id)}, headers=bearer(admin)
    )
    assert theirs.status_code == 200, theirs.text
    assert theirs.json() == mine.json()
    assert theirs.json()["quota"] == {"monthly_quota": 20, "used": 6, "remaining": 14}
    assert theirs.json()["thresholds_crossed"] == [25]
