"""POST /admin/keys/{id}/revoke: the key fails within a second, the revocation is audited once,
and revoking again changes nothing."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from auth.models import AuditEvent
from tests.conftest import (
    IRIS_SETOSA,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    refused_within,
)


async def test_a_revoked_key_fails_within_a_second_and_the_revocation_is_audited(
    harness: Harness,
) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    issued = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys", json={"name": "doomed"}, headers=bearer(admin)
    )
    key, key_id = issued.json()["key"], issued.json()["id"]
    served = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert served.status_code == 200  # and now cached by the app's authenticator

    revoked = await harness.client.post(
        f"/api/v1/admin/keys/{key_id}/revoke", headers=bearer(admin)
    )
    assert revoked.status_code == 200, revoked.text
    body = revoked.json()
    assert body["id"] == key_id
    assert body["revoked_at"] is not None
    assert key not in revoked.text
    await refused_within(harness, key, promised=1.0)

    again = await harness.client.post(f"/api/v1/admin/keys/{key_id}/revoke", headers=bearer(admin))
    assert again.status_code == 200
    assert again.json()["revoked_at"] == body["revoked_at"]
    async with harness.sessionmaker() as session:
        events = (
            await session.scalars(
                select(AuditEvent).where(
                    AuditEvent.action == "key.revoke", AuditEvent.target_id == key_id
                )
            )
        ).all()
    assert len(events) == 1
    assert events[0].tenant_id == tenant.id
    assert events[0].actor.startswith("admin:")


async def test_revoking_an_unknown_key_is_404_and_a_tenant_key_may_not_revoke(
    harness: Harness,
) -> None:
    _, tenant_key = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    unknown = await harness.client.post(
        f"/api/v1/admin/keys/{uuid.uuid4()}/revoke", headers=bearer(admin)
    )
    assert unknown.status_code == 404
    forbidden = await harness.client.post(
        f"/api/v1/admin/keys/{uuid.uuid4()}/revoke", headers=bearer(tenant_key)
    )
    assert forbidden.status_code == 403
