"""Operator routes: tenants, keys, billing export and the audit trail."""

from __future__ import annotations

import csv
import io
import json

from sqlalchemy import select

from auth.models import AuditEvent, utcnow
from tests.conftest import (
    IRIS_SETOSA,
    IRIS_VIRGINICA,
    Harness,
    bearer,
    create_admin_key,
    unique,
)


async def test_admin_creates_tenant_issues_key_and_the_key_predicts(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    name = unique("acme")
    created = await harness.client.post(
        "/api/v1/admin/tenants",
        json={"name": name, "rate_limit": "50/minute", "monthly_quota": 1000},
        headers=bearer(admin),
    )
    assert created.status_code == 201, created.text
    tenant = created.json()
    assert tenant["name"] == name
    assert tenant["status"] == "active"
    assert tenant["rate_limit"] == "50/minute"
    issued = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant['id']}/keys",
        json={"name": "production", "scopes": ["predict"]},
        headers=bearer(admin),
    )
    assert issued.status_code == 201, issued.text
    key = issued.json()
    assert key["key"].startswith("mg_")
    assert key["prefix"] == key["key"][:11]
    assert key["scopes"] == ["predict"]
    predicted = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key["key"])
    )
    assert predicted.status_code == 200
    assert predicted.headers["X-RateLimit-Limit"] == "50"

    async with harness.sessionmaker() as session:
        events = (
            await session.scalars(
                select(AuditEvent).where(AuditEvent.target_id.in_([tenant["id"], key["id"]]))
            )
        ).all()
    assert {e.action for e in events} == {"tenant.create", "key.issue"}
    assert all(e.actor.startswith("admin:") for e in events)
    assert all(key["key"] not in json.dumps(e.detail) for e in events)


async def test_duplicate_tenant_name_is_409(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    name = unique("dup")
    first = await harness.client.post(
        "/api/v1/admin/tenants", json={"name": name}, headers=bearer(admin)
    )
    assert first.status_code == 201
    second = await harness.client.post(
        "/api/v1/admin/tenants", json={"name": name}, headers=bearer(admin)
    )
    assert second.status_code == 409
    assert second.json()["type"] == "conflict"


async def test_invalid_rate_limit_is_422(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    response = await harness.client.post(
        "/api/v1/admin/tenants",
        json={"name": unique("bad"), "rate_limit": "lots per second"},
        headers=bearer(admin),
    )
    assert response.status_code == 422


async def test_list_get_and_patch_tenants(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    created = (
        await harness.client.post(
            "/api/v1/admin/tenants", json={"name": unique("listed")}, headers=bearer(admin)
        )
    ).json()
    listing = await harness.client.get("/api/v1/admin/tenants?limit=500", headers=bearer(admin))
    assert created["id"] in {t["id"] for t in listing.json()["tenants"]}
    fetched = await harness.client.get(
        f"/api/v1/admin/tenants/{created['id']}", headers=bearer(admin)
    )
    assert fetched.json()["name"] == created["name"]
    patched = await harness.client.patch(
        f"/api/v1/admin/tenants/{created['id']}",
        json={"monthly_quota": 5, "rate_limit": "7/second"},
        headers=bearer(admin),
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["monthly_quota"] == 5
    assert patched.json()["rate_limit"] == "7/second"
    missing = await harness.client.get(
        "/api/v1/admin/tenants/00000000-0000-0000-0000-000000000000", headers=bearer(admin)
    )
    assert missing.status_code == 404
    bad_id = await harness.client.get("/api/v1/admin/tenants/not-a-uuid", headers=bearer(admin))
    assert bad_id.status_code == 422


async def test_key_for_unknown_tenant_is_404(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    response = await harness.client.post(
        "/api/v1/admin/tenants/00000000-0000-0000-0000-000000000000/keys",
        json={"name": "x"},
        headers=bearer(admin),
    )
    assert response.status_code == 404


async def test_billing_export_has_one_row_per_tenant_model_version_and_day(
    harness: Harness,
) -> None:
    admin = await create_admin_key(harness)
    tenant = (
        await harness.client.post(
            "/api/v1/admin/tenants", json={"name": unique("billed")}, headers=bearer(admin)
        )
    ).json()
    key = (
        await harness.client.post(
            f"/api/v1/admin/tenants/{tenant['id']}/keys",
            json={"name": "k"},
            headers=bearer(admin),
        )
    ).json()["key"]
    await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    await harness.client.post(
        "/api/v1/predict/batch",
        json={"instances": [IRIS_SETOSA, IRIS_VIRGINICA]},
        headers=bearer(key),
    )
    month = utcnow().strftime("%Y-%m")
    response = await harness.client.get(
        f"/api/v1/admin/billing/export?month={month}", headers=bearer(admin)
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == [
        "tenant_id",
        "tenant_name",
        "date",
        "model",
        "model_version",
        "requests",
        "units",
    ]
    mine = [r for r in rows if r["tenant_id"] == tenant["id"]]
    assert mine == [
        {
            "tenant_id": tenant["id"],
            "tenant_name": tenant["name"],
            "date": utcnow().date().isoformat(),
            "model": "iris",
            "model_version": "1",
            "requests": "2",
            "units": "3",
        }
    ]
    jsonl = await harness.client.get(
        f"/api/v1/admin/billing/export?month={month}&format=jsonl", headers=bearer(admin)
    )
    lines = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [x for x in lines if x["tenant_id"] == tenant["id"]] == [
        {**mine[0], "requests": 2, "units": 3}
    ]
    bad = await harness.client.get(
        "/api/v1/admin/billing/export?month=2026-13", headers=bearer(admin)
    )
    assert bad.status_code == 422
