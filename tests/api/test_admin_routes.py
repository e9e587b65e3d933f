"""Operator routes: tenants, keys, billing export and the audit trail."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from sqlalchemy import select

from api.routes.admin.billing import BILLING_COLUMNS
from auth.identity.keys import issue_admin_key
from auth.models import AuditEvent, Tenant, utcnow
from auth.tenants import get_or_create_admin
from tests.conftest import (
    IRIS_SETOSA,
    IRIS_VIRGINICA,
    TEST_ACTOR,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    unique,
)
from tests.factories import insert_usage, utc_at


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
    assert response.json()["detail"] == "tenant not found"


FORMULA_TENANT = "=cmd|' /C calc'!A0"


async def test_billing_export_has_one_row_per_tenant_model_version_and_day(
    harness: Harness,
) -> None:
    """Two tenants, two models, two versions, several days, and the month's first and last
    instants (and the ones just outside it), in a past month: exactly one row per tenant, day,
    model and version, in that order, the same in CSV and JSON Lines."""
    admin = await create_admin_key(harness)
    formula, _ = await create_tenant_with_key(harness, name=FORMULA_TENANT)
    plain, _ = await create_tenant_with_key(harness, name=unique("billed"))
    await insert_usage(
        harness,
        [
            (formula.id, utc_at("2001-01-31", "23:59:59.999999"), "iris", "1", 100),  # January
            (formula.id, utc_at("2001-02-01", "00:00:00"), "iris", "1", 1),
            (formula.id, utc_at("2001-02-01", "12:00:00"), "iris", "1", 3),
            (formula.id, utc_at("2001-02-01", "13:00:00"), "iris", "2", 2),
            (formula.id, utc_at("2001-02-01", "14:00:00"), "wine", "1", 5),
            (formula.id, utc_at("2001-02-28", "23:59:59.999999"), "iris", "1", 7),
            (formula.id, utc_at("2001-03-01", "00:00:00"), "iris", "1", 100),  # March
            (plain.id, utc_at("2001-02-01", "09:00:00"), "iris", "1", 1),
            (plain.id, utc_at("2001-02-15", "10:00:00"), "wine", "2", 10),
            (plain.id, utc_at("2001-02-15", "11:00:00"), "wine", "2", 20),
            (plain.id, utc_at("2001-02-15", "11:30:00"), "iris", "2", 4),
        ],
    )

    def row(
        tenant: Tenant, day: str, model: str, version: str, requests: int, units: int
    ) -> dict[str, Any]:
        return {
            "tenant_id": str(tenant.id),
            "tenant_name": tenant.name,
            "date": day,
            "model": model,
            "model_version": version,
            "requests": requests,
            "units": units,
            "plan": "standard",
            "currency": "USD",
            "amount": 0,  # the standard plan is free
        }

    expected = {
        formula.id: [
            row(formula, "2001-02-01", "iris", "1", 2, 4),
            row(formula, "2001-02-01", "iris", "2", 1, 2),
            row(formula, "2001-02-01", "wine", "1", 1, 5),
            row(formula, "2001-02-28", "iris", "1", 1, 7),
        ],
        plain.id: [
            row(plain, "2001-02-01", "iris", "1", 1, 1),
            row(plain, "2001-02-15", "iris", "2", 1, 4),
            row(plain, "2001-02-15", "wine", "2", 2, 30),
        ],
    }
    mine = {str(tenant_id) for tenant_id in expected}

    response = await harness.client.get(
        "/api/v1/admin/billing/export?month=2001-02", headers=bearer(admin)
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"] == 'attachment; filename="billing-2001-02.csv"'
    lines = response.text.splitlines()
    assert lines[0] == (
        "tenant_id,tenant_name,date,model,model_version,requests,units,plan,currency,amount"
    )
    # The formula is defused for spreadsheets (a leading quote), and only in the CSV.
    assert f"{formula.id},'{FORMULA_TENANT},2001-02-01,iris,1,2,4,standard,USD,0" in lines
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert not any(value[:1] in "=+-@" for r in rows for value in r.values())
    in_order = [r for r in rows if r["tenant_id"] in mine]
    for tenant_id, tenant_rows in expected.items():
        csv_rows = [
            {
                **r,
                "tenant_name": ("'" if tenant_id == formula.id else "") + str(r["tenant_name"]),
                "requests": str(r["requests"]),
                "units": str(r["units"]),
                "amount": str(r["amount"]),
            }
            for r in tenant_rows
        ]
        assert [r for r in in_order if r["tenant_id"] == str(tenant_id)] == csv_rows
    # One block per tenant: rows are ordered by tenant first.
    assert [r["tenant_id"] for r in in_order] in (
        [str(formula.id)] * 4 + [str(plain.id)] * 3,
        [str(plain.id)] * 3 + [str(formula.id)] * 4,
    )

    jsonl = await harness.client.get(
        "/api/v1/admin/billing/export?month=2001-02&format=jsonl", headers=bearer(admin)
    )
    assert jsonl.status_code == 200, jsonl.text
    assert jsonl.headers["content-type"].startswith("application/jsonl")
    objects = [json.loads(line) for line in jsonl.text.splitlines()]
    assert all(list(o) == list(BILLING_COLUMNS) for o in objects)
    in_order_json = [o for o in objects if o["tenant_id"] in mine]
    for tenant_id, tenant_rows in expected.items():
        assert [o for o in in_order_json if o["tenant_id"] == str(tenant_id)] == tenant_rows
    assert [o["tenant_id"] for o in in_order_json] == [r["tenant_id"] for r in in_order]

    for month in ("2001-01", "2001-03"):
        outside = await harness.client.get(
            f"/api/v1/admin/billing/export?month={month}&format=jsonl", headers=bearer(admin)
        )
        assert [
            (o["date"], o["units"])
            for o in map(json.loads, outside.text.splitlines())
            if o["tenant_id"] == str(formula.id)
        ] == [(f"{month}-{'31' if month == '2001-01' else '01'}", 100)]
    for bad_month in ("2026-13", "2026-1", "2026-01-01"):
        bad = await harness.client.get(
            f"/api/v1/admin/billing/export?month={bad_month}", headers=bearer(admin)
        )
        assert bad.status_code == 422, bad_month


async def test_billing_export_includes_live_predictions(harness: Harness) -> None:
    """Predictions served through the API appear in the current month's export. The month and
    day are read before the requests and again after the export, so the test holds across
    midnight and a month's end."""
    admin = await create_admin_key(harness)
    tenant, key = await create_tenant_with_key(harness)
    before = utcnow()
    await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    await harness.client.post(
        "/api/v1/predict/batch",
        json={"instances": [IRIS_SETOSA, IRIS_VIRGINICA]},
        headers=bearer(key),
    )
    exported = []
    for month in sorted({before.strftime("%Y-%m"), utcnow().strftime("%Y-%m")}):
        response = await harness.client.get(
            f"/api/v1/admin/billing/export?month={month}&format=jsonl", headers=bearer(admin)
        )
        assert response.status_code == 200
        exported += [json.loads(line) for line in response.text.splitlines()]
    after = utcnow()
    mine = [o for o in exported if o["tenant_id"] == str(tenant.id)]
    days = {before.date().isoformat(), after.date().isoformat()}
    assert {(o["tenant_name"], o["model"], o["model_version"]) for o in mine} == {
        (tenant.name, "iris", "1")
    }
    assert all(o["date"] in days for o in mine)
    assert sum(o["requests"] for o in mine) == 2
    assert sum(o["units"] for o in mine) == 3
    if len(days) == 1:
        assert len(mine) == 1


@pytest.mark.parametrize("lead", ["=", "+", "-", "@"])
async def test_billing_csv_defuses_every_formula_lead(harness: Harness, lead: str) -> None:
    """A tenant name a spreadsheet would read as a formula gets a leading quote in the CSV
    (and only there); a name with the same characters elsewhere is left alone."""
    admin = await create_admin_key(harness)
    formula, _ = await create_tenant_with_key(harness, name=lead + unique("SUM(A1)"))
    inner, _ = await create_tenant_with_key(harness, name=unique("a") + lead + "b")
    await insert_usage(
        harness,
        [
            (formula.id, utc_at("2001-04-10"), "iris", "1", 1),
            (inner.id, utc_at("2001-04-10"), "iris", "1", 1),
        ],
    )
    names = {}
    for fmt in ("csv", "jsonl"):
        response = await harness.client.get(
            f"/api/v1/admin/billing/export?month=2001-04&format={fmt}", headers=bearer(admin)
        )
        assert response.status_code == 200, response.text
        rows = (
            csv.DictReader(io.StringIO(response.text))
            if fmt == "csv"
            else map(json.loads, response.text.splitlines())
        )
        names[fmt] = {r["tenant_id"]: r["tenant_name"] for r in rows}
    assert names["csv"][str(formula.id)] == "'" + formula.name
    assert names["csv"][str(inner.id)] == inner.name
    assert names["jsonl"][str(formula.id)] == formula.name
    assert names["jsonl"][str(inner.id)] == inner.name


async def test_key_listing_is_newest_first_and_unknown_tenant_is_404(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)  # its first key is named "test key"
    admin = await create_admin_key(harness)
    path = f"/api/v1/admin/tenants/{tenant.id}/keys"
    for name in ("second", "third"):
        issued = await harness.client.post(path, json={"name": name}, headers=bearer(admin))
        assert issued.status_code == 201, issued.text
    listing = await harness.client.get(path, headers=bearer(admin))
    assert [k["name"] for k in listing.json()["keys"]] == ["third", "second", "test key"]
    missing = await harness.client.get(
        "/api/v1/admin/tenants/00000000-0000-0000-0000-000000000000/keys", headers=bearer(admin)
    )
    assert missing.status_code == 404
    assert missing.json()["detail"] == "tenant not found"


async def test_audit_names_the_admin_and_key_that_acted(harness: Harness) -> None:
    """With several operators in the database, each action is recorded under the one who
    did it (the admin principal is found through the key, not any admin)."""
    await create_admin_key(harness)  # another operator
    name = unique("operator")
    async with harness.sessionmaker() as session:
        principal = await get_or_create_admin(session, name)
        issued = await issue_admin_key(
            session,
            harness.state.secrets.key_pepper,
            TEST_ACTOR,
            admin_principal_id=principal.id,
            name="k",
        )
        await session.commit()
    admin = issued.key
    await create_admin_key(harness)  # and one more
    created = await harness.client.post(
        "/api/v1/admin/tenants", json={"name": unique("audited")}, headers=bearer(admin)
    )
    assert created.status_code == 201, created.text
    async with harness.sessionmaker() as session:
        [event] = (
            await session.scalars(
                select(AuditEvent).where(AuditEvent.target_id == created.json()["id"])
            )
        ).all()
    assert event.action == "tenant.create"
    assert event.actor == f"admin:{name}"
    assert event.actor_key_id == issued.id


@pytest.mark.parametrize("value", [False, True, 5.5, "5"])
async def test_a_quota_must_be_a_json_integer(harness: Harness, value: object) -> None:
    """JSON false, true, 5.5 or "5" is not a number of units: 422, and nothing changes (lax
    parsing would read false as a quota of 0). 5.0 is an integer, as JSON Schema has it."""
    admin = await create_admin_key(harness)
    created = await harness.client.post(
        "/api/v1/admin/tenants",
        json={"name": unique("strict"), "monthly_quota": value},
        headers=bearer(admin),
    )
    assert created.status_code == 422, created.text
    tenant, _ = await create_tenant_with_key(harness, monthly_quota=7)
    patched = await harness.client.patch(
        f"/api/v1/admin/tenants/{tenant.id}", json={"monthly_quota": value}, headers=bearer(admin)
    )
    assert patched.status_code == 422, patched.text
    shown = await harness.client.get(f"/api/v1/admin/tenants/{tenant.id}", headers=bearer(admin))
    assert shown.json()["monthly_quota"] == 7


async def test_a_whole_float_is_an_integer_quota(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    created = await harness.client.post(
        "/api/v1/admin/tenants",
        json={"name": unique("whole"), "monthly_quota": 5.0},
        headers=bearer(admin),
    )
    assert created.status_code == 201, created.text
    assert created.json()["monthly_quota"] == 5
