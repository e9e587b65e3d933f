"""Values at the edges of their types are refused where they are parsed (422 naming the field),
never a 5xx: far dates, time zones past year 9999, integers past 64 bits, control characters."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from auth.db import classify_database_error, create_engine
from tests.conftest import (
    IRIS_SETOSA,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    unique,
)

HUGE = 2**70


def assert_refused(response: httpx.Response, field: str) -> None:
    """A 422 problem that names ``field`` in its errors, with the request id."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert any(field in [str(part) for part in error["loc"]] for error in body["errors"]), body


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("start=9999-12-31&end=9999-12-31", "start"),
        ("start=2026-01-01&end=9999-12-31", "end"),
        ("start=0001-01-01&end=2026-01-01", "start"),
        ("start=1999-12-31", "start"),
    ],
)
async def test_far_usage_dates_are_422(harness: Harness, query: str, field: str) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.get(f"/api/v1/me/usage?{query}", headers=bearer(key))
    assert_refused(response, field)


@pytest.mark.parametrize("month", ["9999-12", "0001-01", "1999-12", "3000-01", "2026-13"])
async def test_far_billing_months_are_422(harness: Harness, month: str) -> None:
    admin = await create_admin_key(harness)
    response = await harness.client.get(
        f"/api/v1/admin/billing/export?month={month}", headers=bearer(admin)
    )
    assert_refused(response, "month")


async def test_the_calendar_edges_themselves_are_served(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    for query in ("start=2999-12-31&end=2999-12-31", "start=2000-01-01&end=2000-01-31"):
        response = await harness.client.get(f"/api/v1/me/usage?{query}", headers=bearer(key))
        assert response.status_code == 200, response.text
        assert response.json()["total_requests"] == 0
    admin = await create_admin_key(harness)
    for month in ("2999-12", "2000-01"):
        export = await harness.client.get(
            f"/api/v1/admin/billing/export?month={month}", headers=bearer(admin)
        )
        assert export.status_code == 200, export.text


@pytest.mark.parametrize(
    "expires_at",
    [
        "9999-12-31T23:00:00-05:00",  # past year 9999 once converted to UTC
        "2999-12-31T23:00:00-05:00",  # past the latest expiry once converted to UTC
        "3000-01-01T00:00:00+00:00",
        "2001-01-01T00:00:00+00:00",  # in the past
    ],
)
async def test_key_expiry_out_of_range_is_422(harness: Harness, expires_at: str) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    response = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys",
        json={"name": "edge", "expires_at": expires_at},
        headers=bearer(admin),
    )
    assert_refused(response, "expires_at")


async def test_key_expiry_in_a_far_time_zone_is_stored_in_utc(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    response = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys",
        json={"name": "edge", "expires_at": "2999-06-01T00:00:00+14:00"},
        headers=bearer(admin),
    )
    assert response.status_code == 201, response.text
    assert response.json()["expires_at"].startswith("2999-05-31T10:00:00")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"monthly_quota": HUGE}, "monthly_quota"),
        ({"monthly_quota": 10**12 + 1}, "monthly_quota"),
        ({"monthly_quota": -1}, "monthly_quota"),
        ({"rate_limit": "99999999999999999999/second"}, "rate_limit"),
        ({"rate_limit": "10 per 2 minutes; 5/second"}, "rate_limit"),
        ({"name": "nul\x00name"}, "name"),
        ({"name": "line\nbreak"}, "name"),
    ],
)
async def test_tenant_fields_out_of_range_are_422(
    harness: Harness, body: dict[str, Any], field: str
) -> None:
    admin = await create_admin_key(harness)
    created = await harness.client.post(
        "/api/v1/admin/tenants", json={"name": unique("edge"), **body}, headers=bearer(admin)
    )
    assert_refused(created, field)
    tenant, _ = await create_tenant_with_key(harness)
    patched = await harness.client.patch(
        f"/api/v1/admin/tenants/{tenant.id}", json=body, headers=bearer(admin)
    )
    assert_refused(patched, field)


@pytest.mark.parametrize("query", [f"offset={HUGE}", f"limit={HUGE}", "offset=-1", "limit=0"])
async def test_paging_out_of_range_is_422(harness: Harness, query: str) -> None:
    admin = await create_admin_key(harness)
    response = await harness.client.get(f"/api/v1/admin/tenants?{query}", headers=bearer(admin))
    assert_refused(response, query.split("=")[0])


@pytest.mark.parametrize(
    "value", ["3.5e38", "1e308", "-1e300", "1e400", str(10**40), "1" + "0" * 400]
)
async def test_features_past_the_models_input_are_422(harness: Harness, value: str) -> None:
    _, key = await create_tenant_with_key(harness)
    body = '{"features": [5.1, 3.5, ' + value + ", 0.2]}"
    response = await harness.client.post(
        "/api/v1/predict",
        content=body,
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    assert_refused(response, "features")
    assert (
        await harness.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
    ).status_code == 200


async def test_database_errors_are_classified_by_what_caused_them(postgres_database: str) -> None:
    """The backstop behind the bounds: a value the database refuses is the request's fault
    (422), a cancelled statement is an outage (503), bad SQL is a bug (500). (Postgres only:
    SQLite has no SQLSTATE, and its integer overflow is an OverflowError, answered 422.)"""
    engine = create_engine(postgres_database, statement_timeout_seconds=0.2)
    cases = [
        ("SELECT CAST(:v AS BIGINT)", {"v": HUGE}, "data"),
        ("SELECT CAST(:v AS TEXT)", {"v": "a\x00b"}, "data"),
        ("SELECT pg_sleep(2)", {}, "outage"),
        ("SELECT * FROM no_such_table", {}, "bug"),
    ]
    try:
        async with engine.connect() as connection:
            for sql, params, expected in cases:
                with pytest.raises(DBAPIError) as caught:
                    await connection.execute(text(sql), params)
                assert classify_database_error(caught.value) == expected, sql
                # Parameters never reach the message the engine builds.
                assert str(HUGE) not in str(caught.value).split("[SQL")[1]
                await connection.rollback()
    finally:
        await engine.dispose()


async def test_an_unknown_model_name_or_version_is_never_echoed(harness: Harness) -> None:
    """A key pasted into the wrong field does not come back in the error."""
    _, key = await create_tenant_with_key(harness)
    for field in ("model", "model_version"):
        response = await harness.client.post(
            "/api/v1/predict",
            json={"features": IRIS_SETOSA, field: key[:50]},
            headers=bearer(key),
        )
        assert response.status_code == 404, response.text
        assert key[:50] not in response.text
    listing = await harness.client.get(f"/api/v1/models/{key[:50]}", headers=bearer(key))
    assert listing.status_code == 404
    assert key[:50] not in listing.text


def test_a_connection_refused_while_connecting_is_an_outage() -> None:
    """SQLAlchemy wraps a refused socket at connect time in a bare DBAPIError (no SQLSTATE, no
    invalidated connection): still an outage (503), never a bug (500). Seen when a database
    refuses every connection while requests are being authenticated."""
    refused = DBAPIError("connect", None, ConnectionRefusedError(111, "Connection refused"))
    assert classify_database_error(refused) == "outage"
