"""SECURITY.md line 9: operator routes need an operator's credential, not just the scope."""

from __future__ import annotations

from sqlalchemy import update

from auth.models import ApiKey
from tests.conftest import Harness, bearer, create_admin_key, create_tenant_with_key


async def test_a_tenant_key_carrying_the_admin_scope_is_still_403_on_admin_routes(
    harness: Harness,
) -> None:
    """SECURITY.md line 9: the admin scope on a tenant's key opens no operator route."""
    tenant, key = await create_tenant_with_key(harness)
    # The API never issues "admin" to a tenant key; a row that carries it anyway (a bad
    # migration, a hand edit) must still not open the operator routes.
    async with harness.sessionmaker() as session:
        await session.execute(
            update(ApiKey).where(ApiKey.tenant_id == tenant.id).values(scopes="admin predict")
        )
        await session.commit()
    harness.state.authenticator.forget()
    for method, path in (
        ("GET", "/api/v1/admin/tenants"),
        ("POST", "/api/v1/admin/tenants"),
        ("GET", f"/api/v1/admin/tenants/{tenant.id}"),
        ("GET", "/api/v1/admin/billing/export?month=2026-01"),
    ):
        response = await harness.client.request(
            method, path, headers=bearer(key), json={"name": "x"} if method == "POST" else None
        )
        assert response.status_code == 403, (path, response.text)
        assert "operator" in response.json()["detail"]
    # An operator's key still works.
    admin = await create_admin_key(harness)
    ok = await harness.client.get("/api/v1/admin/tenants", headers=bearer(admin))
    assert ok.status_code == 200
