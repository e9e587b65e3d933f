"""SECURITY.md lines 3, 10, 11 and 12 for the key lifecycle: rotation, and the tenant's own key
routes (/me/keys)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from auth.identity.keys import key_digest
from auth.models import ApiKey
from tests.conftest import (
    IRIS_SETOSA,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
)

MANAGER = ("predict", "usage:read", "keys:manage")
KEYS = "/api/v1/me/keys"
PREDICT = "/api/v1/predict"


async def _predict(harness: Harness, key: str) -> int:
    response = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    return response.status_code


async def _key_count(harness: Harness, tenant_id: uuid.UUID) -> int:
    async with harness.sessionmaker() as session:
        count = await session.scalar(
            select(func.count()).select_from(ApiKey).where(ApiKey.tenant_id == tenant_id)
        )
    return int(count or 0)


async def test_a_rotated_key_past_its_grace_is_401(harness: Harness) -> None:
    """SECURITY.md line 3: a rotated key is 401 from the end of its grace on, although this
    worker verified (and cached) it a moment before; its successor is served."""
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    old = (
        await harness.client.post(
            f"/api/v1/admin/tenants/{tenant.id}/keys", json={"name": "old"}, headers=bearer(admin)
        )
    ).json()
    rotated = await harness.client.post(
        f"/api/v1/admin/keys/{old['id']}/rotate", json={"grace_seconds": 2}, headers=bearer(admin)
    )
    ends = time.monotonic() + 2.0
    assert rotated.status_code == 201
    # Verified half a second before the grace ends, so cached by this worker: a cache that
    # trusted it for its full second would still serve it after the end.
    await asyncio.sleep(max(0.0, ends - 0.5 - time.monotonic()))
    harness.state.authenticator.forget()
    assert await _predict(harness, old["key"]) == 200
    await asyncio.sleep(max(0.0, ends - time.monotonic()))
    refused = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(old["key"])
    )
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert await _predict(harness, rotated.json()["key"]) == 200


async def test_a_tenant_never_sees_or_revokes_another_tenants_keys(harness: Harness) -> None:
    """SECURITY.md line 10: /me/keys lists only the caller's tenant's keys whatever it puts in
    the query, and revoking or rotating another tenant's key is 404 with the same body as a key
    that does not exist; the other tenant's key keeps working, and has no successor."""
    tenant_a, key_a = await create_tenant_with_key(harness, scopes=MANAGER)
    tenant_b, key_b = await create_tenant_with_key(harness, scopes=MANAGER)
    digest_b = key_digest(harness.state.secrets.key_pepper, key_b)
    async with harness.sessionmaker() as session:
        id_b = await session.scalar(select(ApiKey.id).where(ApiKey.digest == digest_b))
    assert id_b is not None
    for query in ("", f"?tenant_id={tenant_b.id}", f"?id={id_b}"):
        listing = await harness.client.get(f"{KEYS}{query}", headers=bearer(key_a))
        assert listing.status_code == 200
        assert {k["tenant_id"] for k in listing.json()["keys"]} == {str(tenant_a.id)}
        assert str(id_b) not in listing.text
    # Revoking or rotating it (which would hand over a successor's secret) is not found.
    for action, body in (("revoke", None), ("rotate", {"grace_seconds": 60})):
        foreign = await harness.client.post(
            f"{KEYS}/{id_b}/{action}", json=body, headers=bearer(key_a)
        )
        missing = await harness.client.post(
            f"{KEYS}/{uuid.uuid4()}/{action}", json=body, headers=bearer(key_a)
        )
        assert foreign.status_code == missing.status_code == 404, (action, foreign.text)
        for field in ("type", "title", "status", "detail"):
            assert foreign.json()[field] == missing.json()[field]
    for path in (f"{KEYS}/{id_b}", f"{KEYS}/{tenant_b.id}"):
        assert (await harness.client.get(path, headers=bearer(key_a))).status_code in (404, 405)
    # A body naming the other tenant changes nothing either (line 11 proves the 422).
    assert await _predict(harness, key_b) == 200
    assert await _key_count(harness, tenant_b.id) == 1


@pytest.mark.parametrize(
    "extra",
    [
        {"tenant_id": "00000000-0000-0000-0000-000000000000"},
        {"rate_limit": "1000000/second"},
        {"monthly_quota": 10**9},
        {"is_admin": True},
        {"admin_principal_id": "00000000-0000-0000-0000-000000000000"},
        {"digest": "0" * 64},
        {"key": "mg_chosen"},
        {"revoked_at": None},
    ],
)
async def test_fields_a_tenant_may_not_set_on_its_keys_are_422(
    harness: Harness, extra: dict[str, Any]
) -> None:
    """SECURITY.md line 11: a /me/keys body with a field the tenant may not set (its tenant,
    limits, admin, the key or its digest) is 422 and issues nothing; so is an admin scope."""
    tenant, key = await create_tenant_with_key(harness, scopes=MANAGER)
    for body in ({"name": "sneaky", **extra}, {"name": "sneaky", "scopes": ["admin"]}):
        refused = await harness.client.post(KEYS, json=body, headers=bearer(key))
        assert refused.status_code == 422, refused.text
    assert await _key_count(harness, tenant.id) == 1


def _assert_no_digest(response: httpx.Response, digests: list[str]) -> None:
    assert "digest" not in response.text
    for digest in digests:
        assert digest not in response.text


async def test_no_key_route_shows_a_digest_and_a_secret_only_where_it_was_created(
    harness: Harness,
) -> None:
    """SECURITY.md line 12: no response of the key routes (admin or self-service: list,
    create, rotate, revoke) contains a digest, and each secret appears in the one response that
    created it and in no other."""
    tenant, manager = await create_tenant_with_key(harness, scopes=MANAGER)
    admin = await create_admin_key(harness)
    pepper = harness.state.secrets.key_pepper
    created_by_admin = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys", json={"name": "a"}, headers=bearer(admin)
    )
    created_by_tenant = await harness.client.post(KEYS, json={"name": "t"}, headers=bearer(manager))
    rotated = await harness.client.post(
        f"/api/v1/admin/keys/{created_by_admin.json()['id']}/rotate",
        json={"grace_seconds": 60},
        headers=bearer(admin),
    )
    creations = [created_by_admin, created_by_tenant, rotated]
    assert [r.status_code for r in creations] == [201, 201, 201]
    secrets = [r.json()["key"] for r in creations]
    digests = [key_digest(pepper, s) for s in [*secrets, manager, admin]]
    others = [
        await harness.client.get(f"/api/v1/admin/tenants/{tenant.id}/keys", headers=bearer(admin)),
        await harness.client.get(KEYS, headers=bearer(manager)),
        await harness.client.post(
            f"{KEYS}/{created_by_tenant.json()['id']}/revoke", headers=bearer(manager)
        ),
        await harness.client.post(
            f"/api/v1/admin/keys/{rotated.json()['id']}/revoke", headers=bearer(admin)
        ),
        # A refused rotation (already rotated) repeats nothing either.
        await harness.client.post(
            f"/api/v1/admin/keys/{created_by_admin.json()['id']}/rotate",
            json={"grace_seconds": 60},
            headers=bearer(admin),
        ),
        await harness.client.get("/api/v1/me", headers=bearer(secrets[1])),
    ]
    assert [r.status_code for r in others] == [200, 200, 200, 200, 409, 401]
    for index, response in enumerate(creations):
        _assert_no_digest(response, digests)
        for other_index, secret in enumerate([*secrets, manager, admin]):
            assert (secret in response.text) == (other_index == index)
    for response in others:
        _assert_no_digest(response, digests)
        for secret in [*secrets, manager, admin]:
            assert secret not in response.text
