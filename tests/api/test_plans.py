"""Plans: managed by the operator, referenced by tenants, enforced on every request, priced in
the billing export."""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import func, select

from auth.models import ApiKey, UsageRecord
from tests.conftest import (
    IRIS_SETOSA,
    IRIS_VIRGINICA,
    Harness,
    bearer,
    create_admin_key,
    unique,
)
from tests.factories import insert_usage, utc_at
from tests.promises import PromisedDelay


async def _create_plan(harness: Harness, admin: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("name", unique("plan"))
    response = await harness.client.post("/api/v1/admin/plans", json=fields, headers=bearer(admin))
    assert response.status_code == 201, response.text
    plan: dict[str, Any] = response.json()
    return plan


async def _tenant_on(harness: Harness, admin: str, plan: str, **fields: Any) -> tuple[str, str]:
    """A tenant on the plan, made through the operator's routes, and a key for it."""
    response = await harness.client.post(
        "/api/v1/admin/tenants",
        json={"name": unique("tenant"), "plan": plan, **fields},
        headers=bearer(admin),
    )
    assert response.status_code == 201, response.text
    tenant_id = response.json()["id"]
    issued = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant_id}/keys",
        json={"name": "k", "scopes": ["predict", "usage:read"]},
        headers=bearer(admin),
    )
    assert issued.status_code == 201, issued.text
    return tenant_id, issued.json()["key"]


async def _limits(harness: Harness, key: str) -> dict[str, Any]:
    response = await harness.client.get("/api/v1/me", headers=bearer(key))
    assert response.status_code == 200, response.text
    limits: dict[str, Any] = response.json()["limits"]
    return limits


async def test_operator_creates_lists_and_changes_plans_and_each_change_is_audited(
    harness: Harness,
) -> None:
    admin = await create_admin_key(harness)
    plan = await _create_plan(
        harness,
        admin,
        rate_limits="10/second;1000/hour",
        monthly_quota=5000,
        max_in_flight=4,
        models=["iris"],
        price_per_1000_units=250,
        currency="EUR",
    )
    assert plan["status"] == "active"
    assert (plan["rate_limits"], plan["monthly_quota"], plan["max_in_flight"]) == (
        "10/second;1000/hour",
        5000,
        4,
    )
    listed = await harness.client.get("/api/v1/admin/plans", headers=bearer(admin))
    assert plan["id"] in {p["id"] for p in listed.json()["plans"]}
    assert "standard" in {p["name"] for p in listed.json()["plans"]}

    changed = await harness.client.patch(
        f"/api/v1/admin/plans/{plan['id']}",
        json={"rate_limits": "20/minute", "models": None, "status": "retired"},
        headers=bearer(admin),
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["rate_limits"], changed.json()["models"]) == ("20/minute", None)
    shown = await harness.client.get(f"/api/v1/admin/plans/{plan['id']}", headers=bearer(admin))
    assert shown.json() == changed.json()

    audit = await harness.client.get("/api/v1/admin/audit", headers=bearer(admin))
    assert audit.status_code == 200, audit.text
    actions = [e["action"] for e in audit.json()["events"] if e["target_id"] == plan["id"]]
    assert sorted(actions) == ["plan.create", "plan.update"]


async def test_a_plans_price_never_changes_and_bad_values_are_refused(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    plan = await _create_plan(harness, admin, price_per_1000_units=100)
    for body in (
        {"price_per_1000_units": 1},
        {"currency": "EUR"},
        {"rate_limits": "0/minute"},
        {"rate_limits": "1/minute;2/minute;3/minute;4/minute;5/minute;6/minute"},
        {"rate_limits": "5/100000 days"},
        {"max_in_flight": 0},
        {"models": ["../etc"]},
        {"name": None},
        {"status": "deleted"},
    ):
        response = await harness.client.patch(
            f"/api/v1/admin/plans/{plan['id']}", json=body, headers=bearer(admin)
        )
        assert response.status_code == 422, (body, response.text)
    again = await harness.client.get(f"/api/v1/admin/plans/{plan['id']}", headers=bearer(admin))
    assert again.json() == plan
    duplicate = await harness.client.post(
        "/api/v1/admin/plans", json={"name": plan["name"]}, headers=bearer(admin)
    )
    assert duplicate.status_code == 409
    missing = await harness.client.get(f"/api/v1/admin/plans/{uuid.uuid4()}", headers=bearer(admin))
    assert missing.status_code == 404


async def test_tenants_join_active_plans_only(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    retired = await _create_plan(harness, admin)
    await harness.client.patch(
        f"/api/v1/admin/plans/{retired['id']}", json={"status": "retired"}, headers=bearer(admin)
    )
    for plan in (retired["name"], "no-such-plan"):
        response = await harness.client.post(
            "/api/v1/admin/tenants",
            json={"name": unique("tenant"), "plan": plan},
            headers=bearer(admin),
        )
        assert response.status_code == 422, response.text
    default = await harness.client.post(
        "/api/v1/admin/tenants", json={"name": unique("tenant")}, headers=bearer(admin)
    )
    assert default.json()["plan"] == "standard"


async def test_a_tenant_key_is_held_to_its_plan_its_overrides_and_its_own_limits(
    harness: Harness,
) -> None:
    admin = await create_admin_key(harness)
    plan = await _create_plan(
        harness, admin, rate_limits="50/minute", monthly_quota=900, max_in_flight=8
    )
    tenant_id, key = await _tenant_on(harness, admin, plan["name"])
    assert await _limits(harness, key) == {
        "rate_limit": "50/minute",
        "monthly_quota": 900,
        "max_in_flight": 8,
        "models": None,
    }
    # The tenant's overrides replace the plan's; a key's own limits are checked on top.
    await harness.client.patch(
        f"/api/v1/admin/tenants/{tenant_id}",
        json={"rate_limit": "70/minute", "monthly_quota": 10},
        headers=bearer(admin),
    )
    tight = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant_id}/keys",
        json={"name": "tight", "rate_limits": "5/second", "max_in_flight": 2},
        headers=bearer(admin),
    )
    assert tight.status_code == 201, tight.text
    assert (tight.json()["rate_limits"], tight.json()["max_in_flight"]) == ("5/second", 2)
    assert await _limits(harness, tight.json()["key"]) == {
        "rate_limit": "70/minute;5/second",
        "monthly_quota": 10,
        "max_in_flight": 2,
        "models": None,
    }
    # A key's own limit with no tenant limit still keeps the server's default.
    _, loose_tenant_key = await _tenant_on(harness, admin, "standard")
    response = await harness.client.get("/api/v1/me", headers=bearer(loose_tenant_key))
    default = response.json()["limits"]["rate_limit"]
    tenant = response.json()["tenant"]["id"]
    loose = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant}/keys",
        json={"name": "own", "rate_limits": "100000/second"},
        headers=bearer(admin),
    )
    own_limits = await _limits(harness, loose.json()["key"])
    assert own_limits["rate_limit"] == f"{default};100000/second"


async def test_a_plan_change_reaches_its_tenants_within_a_second(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    plan = await _create_plan(harness, admin, rate_limits="500/minute")
    _, key = await _tenant_on(harness, admin, plan["name"])
    assert (await _limits(harness, key))["rate_limit"] == "500/minute"  # now cached
    await harness.client.patch(
        f"/api/v1/admin/plans/{plan['id']}",
        json={"rate_limits": "600/minute", "monthly_quota": 3},
        headers=bearer(admin),
    )
    # Polled for up to 5 s (tests.promises): the limits leave room for that many requests.
    seen: dict[str, Any] = {}

    async def applied() -> bool:
        seen.update(await _limits(harness, key))
        return bool(seen["rate_limit"] == "600/minute")

    await PromisedDelay("plan change", 1.0).until(applied)
    assert seen["monthly_quota"] == 3


async def test_the_plans_quota_refuses_a_batch_whole(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    plan = await _create_plan(harness, admin, monthly_quota=3)
    tenant_id, key = await _tenant_on(harness, admin, plan["name"])
    two = await harness.client.post(
        "/api/v1/predict/batch",
        json={"instances": [IRIS_SETOSA, IRIS_VIRGINICA]},
        headers=bearer(key),
    )
    assert two.status_code == 200, two.text
    refused = await harness.client.post(
        "/api/v1/predict/batch",
        json={"instances": [IRIS_SETOSA, IRIS_VIRGINICA]},
        headers=bearer(key),
    )
    assert refused.status_code == 429
    assert refused.json()["type"].endswith("quota-exceeded")
    last = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert last.status_code == 200, last.text
    async with harness.sessionmaker() as session:
        units = await session.scalar(
            select(func.sum(UsageRecord.units)).where(UsageRecord.tenant_id == uuid.UUID(tenant_id))
        )
    assert units == 3


async def test_a_model_outside_the_plan_answers_as_an_unknown_model(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    closed = await _create_plan(harness, admin, models=["wine"])
    _, outsider = await _tenant_on(harness, admin, closed["name"])
    opened = await _create_plan(harness, admin, models=["iris"])
    _, insider = await _tenant_on(harness, admin, opened["name"])

    def shape(response: Any) -> tuple[int, str, dict[str, Any]]:
        body = {k: v for k, v in response.json().items() if k != "request_id"}
        return response.status_code, response.headers["content-type"], body

    for body in (
        {"features": IRIS_SETOSA},
        {"features": IRIS_SETOSA, "model_version": "1"},
        {"features": IRIS_SETOSA, "model_version": "no-such-version"},
    ):
        outside = await harness.client.post(
            "/api/v1/predict", json={**body, "model": "iris"}, headers=bearer(outsider)
        )
        unknown = await harness.client.post(
            "/api/v1/predict", json={**body, "model": "no-such-model"}, headers=bearer(outsider)
        )
        assert outside.status_code == 404
        assert shape(outside) == shape(unknown)
    batch = await harness.client.post(
        "/api/v1/predict/batch",
        json={"instances": [IRIS_SETOSA], "model": "iris"},
        headers=bearer(outsider),
    )
    assert batch.status_code == 404
    described = await harness.client.get("/api/v1/models/iris", headers=bearer(outsider))
    nothing = await harness.client.get("/api/v1/models/no-such-model", headers=bearer(outsider))
    assert shape(described) == shape(nothing)
    listed = await harness.client.get("/api/v1/models", headers=bearer(outsider))
    assert listed.json()["models"] == []

    served = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(insider)
    )
    assert served.status_code == 200, served.text
    mine = await harness.client.get("/api/v1/models", headers=bearer(insider))
    assert [m["name"] for m in mine.json()["models"]] == ["iris"]
    everything = await harness.client.get("/api/v1/models", headers=bearer(admin))
    assert "iris" in {m["name"] for m in everything.json()["models"]}


async def test_the_export_prices_each_row_at_the_plan_it_was_served_under(
    harness: Harness,
) -> None:
    """Units times the price per 1,000, rounded half up to the minor unit, per row; a tenant
    that changed plans in the day has one row per plan, each at its own price."""
    admin = await create_admin_key(harness)
    cheap = await _create_plan(harness, admin, price_per_1000_units=1234, currency="EUR")
    dear = await _create_plan(harness, admin, price_per_1000_units=500_000, currency="EUR")
    tenant_id, _ = await _tenant_on(harness, admin, cheap["name"])
    tenant = uuid.UUID(tenant_id)
    await insert_usage(
        harness,
        [
            (tenant, utc_at("2002-05-03", "10:00:00"), "iris", "1", 4),  # 4.936 -> 5
            (tenant, utc_at("2002-05-04", "10:00:00"), "iris", "1", 1),  # 1.234 -> 1
        ],
    )
    await harness.client.patch(
        f"/api/v1/admin/tenants/{tenant_id}", json={"plan": dear["name"]}, headers=bearer(admin)
    )
    await insert_usage(harness, [(tenant, utc_at("2002-05-04", "18:00:00"), "iris", "1", 3)])
    response = await harness.client.get(
        "/api/v1/admin/billing/export?month=2002-05&format=jsonl", headers=bearer(admin)
    )
    rows = [
        (row["date"], row["plan"], row["units"], row["currency"], row["amount"])
        for row in map(json.loads, response.text.splitlines())
        if row["tenant_id"] == tenant_id
    ]
    assert sorted(rows) == sorted(
        [
            ("2002-05-03", cheap["name"], 4, "EUR", 5),
            ("2002-05-04", cheap["name"], 1, "EUR", 1),
            ("2002-05-04", dear["name"], 3, "EUR", 1500),
        ]
    )
    # Changing the plan's limits later changes nothing in a closed month's bill.
    await harness.client.patch(
        f"/api/v1/admin/plans/{cheap['id']}", json={"rate_limits": "1/day"}, headers=bearer(admin)
    )
    again = await harness.client.get(
        "/api/v1/admin/billing/export?month=2002-05&format=jsonl", headers=bearer(admin)
    )
    assert again.text == response.text


async def test_an_operator_tightens_and_clears_a_keys_own_limits(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    plan = await _create_plan(harness, admin, rate_limits="500/minute")
    tenant_id, key = await _tenant_on(harness, admin, plan["name"])
    keys = await harness.client.get(
        f"/api/v1/admin/tenants/{tenant_id}/keys", headers=bearer(admin)
    )
    key_id = keys.json()["keys"][0]["id"]
    assert (await _limits(harness, key))["rate_limit"] == "500/minute"  # now cached
    changed = await harness.client.patch(
        f"/api/v1/admin/keys/{key_id}",
        json={"rate_limits": "2/second", "max_in_flight": 1},
        headers=bearer(admin),
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["rate_limits"], changed.json()["max_in_flight"]) == ("2/second", 1)
    # Polled for up to 5 s (tests.promises): the limits leave room for that many requests.
    seen: dict[str, Any] = {}

    async def applied() -> bool:
        seen.update(await _limits(harness, key))
        return bool(seen["rate_limit"] == "500/minute;2/second")

    await PromisedDelay("key limit change", 1.0).until(applied)
    assert seen["max_in_flight"] == 1
    cleared = await harness.client.patch(
        f"/api/v1/admin/keys/{key_id}", json={"max_in_flight": None}, headers=bearer(admin)
    )
    assert (cleared.json()["rate_limits"], cleared.json()["max_in_flight"]) == ("2/second", None)

    for body in ({"rate_limits": "9/fortnight"}, {"max_in_flight": 0}, {"scopes": ["admin"]}):
        refused = await harness.client.patch(
            f"/api/v1/admin/keys/{key_id}", json=body, headers=bearer(admin)
        )
        assert refused.status_code == 422, (body, refused.text)
    missing = await harness.client.patch(
        f"/api/v1/admin/keys/{uuid.uuid4()}", json={"max_in_flight": 2}, headers=bearer(admin)
    )
    assert missing.status_code == 404
    me = await harness.client.get("/api/v1/me", headers=bearer(key))
    tenant_keys = await harness.client.patch(
        f"/api/v1/admin/keys/{me.json()['key']['id']}", json={}, headers=bearer(key)
    )
    assert tenant_keys.status_code == 403
    async with harness.sessionmaker() as session:
        admin_key_id = await session.scalar(
            select(ApiKey.id).where(ApiKey.admin_principal_id.is_not(None)).limit(1)
        )
    operator = await harness.client.patch(
        f"/api/v1/admin/keys/{admin_key_id}", json={"max_in_flight": 2}, headers=bearer(admin)
    )
    assert operator.status_code == 422, operator.text


async def test_an_operator_sets_a_tenants_alert_thresholds_at_creation(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    created = await harness.client.post(
        "/api/v1/admin/tenants",
        json={"name": unique("alerts"), "usage_alert_thresholds": [80, 40]},
        headers=bearer(admin),
    )
    assert created.status_code == 201, created.text
    assert created.json()["usage_alert_thresholds"] == [40, 80]
    shown = await harness.client.get(
        f"/api/v1/admin/tenants/{created.json()['id']}", headers=bearer(admin)
    )
    assert shown.json()["usage_alert_thresholds"] == [40, 80]
    cleared = await harness.client.patch(
        f"/api/v1/admin/tenants/{created.json()['id']}",
        json={"usage_alert_thresholds": None},
        headers=bearer(admin),
    )
    assert cleared.json()["usage_alert_thresholds"] is None
