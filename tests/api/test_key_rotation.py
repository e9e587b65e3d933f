"""POST /admin/keys/{id}/rotate: a successor with the same owner, name, scopes and expiry, shown
once; the old key works until its grace ends and not after; a key that cannot be rotated is 409."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from auth.identity.keys import MAX_ROTATION_GRACE_SECONDS
from auth.models import ApiKey, AuditEvent, utcnow
from tests.conftest import (
    IRIS_SETOSA,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    refused_within,
    update_key,
)

PREDICT = "/api/v1/predict"


async def _predict(harness: Harness, key: str) -> int:
    response = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    return response.status_code


async def _issue(
    harness: Harness, admin: str, tenant_id: uuid.UUID, **body: object
) -> dict[str, Any]:
    issued = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant_id}/keys",
        json={"name": "rotating", **body},
        headers=bearer(admin),
    )
    assert issued.status_code == 201, issued.text
    created: dict[str, Any] = issued.json()
    return created


async def _rotate(
    harness: Harness, admin: str, key_id: str, grace: int | None = None
) -> httpx.Response:
    body = {} if grace is None else {"grace_seconds": grace}
    return await harness.client.post(
        f"/api/v1/admin/keys/{key_id}/rotate", json=body, headers=bearer(admin)
    )


async def test_both_keys_work_during_the_grace_and_the_old_fails_after(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    expires_at = utcnow() + timedelta(days=30)
    old = await _issue(
        harness, admin, tenant.id, scopes=["predict"], expires_at=expires_at.isoformat()
    )
    assert await _predict(harness, old["key"]) == 200  # cached by the app's authenticator now

    asked = utcnow()
    rotated = await _rotate(harness, admin, old["id"], grace=2)
    rotated_at, answered = time.monotonic(), utcnow()
    assert rotated.status_code == 201, rotated.text
    assert rotated.headers["Cache-Control"] == "no-store"
    new = rotated.json()
    assert new["key"] != old["key"]
    assert new["id"] != old["id"]
    assert new["rotated_from_id"] == old["id"]
    assert (new["tenant_id"], new["name"], new["scopes"]) == (
        str(tenant.id),
        "rotating",
        ["predict"],
    )
    assert datetime.fromisoformat(new["expires_at"]) == expires_at
    assert new["revoked_at"] is None

    # During the grace both keys are served.
    for key in (old["key"], new["key"], old["key"]):
        assert await _predict(harness, key) == 200
    listing = await harness.client.get(
        f"/api/v1/admin/tenants/{tenant.id}/keys", headers=bearer(admin)
    )
    by_id = {k["id"]: k for k in listing.json()["keys"]}
    scheduled = datetime.fromisoformat(by_id[old["id"]]["revoked_at"])
    # Two seconds after the rotation, whenever within the request it happened (not "more than a
    # second from now", which a slow machine would fail).
    assert asked + timedelta(seconds=2) <= scheduled <= answered + timedelta(seconds=2)

    # From the end of the grace on (the cache never outlives a scheduled revocation), the old
    # key is refused; the new one is not.
    await asyncio.sleep(max(0.0, 2.05 - (time.monotonic() - rotated_at)))
    assert await _predict(harness, old["key"]) == 401
    assert await _predict(harness, new["key"]) == 200


async def test_the_new_key_is_shown_once_and_never_again(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    old = await _issue(harness, admin, tenant.id)
    rotated = await _rotate(harness, admin, old["id"], grace=60)
    new = rotated.json()
    assert old["key"] not in rotated.text
    listing = await harness.client.get(
        f"/api/v1/admin/tenants/{tenant.id}/keys", headers=bearer(admin)
    )
    assert new["key"] not in listing.text
    assert all("key" not in k for k in listing.json()["keys"])
    # Rotating the old key again is refused: its successor is not issued a second time.
    again = await _rotate(harness, admin, old["id"], grace=60)
    assert again.status_code == 409
    assert new["key"] not in again.text
    # The successor can itself be rotated; its own secret is not repeated in that response.
    onwards = await _rotate(harness, admin, new["id"])
    assert onwards.status_code == 201
    assert new["key"] not in onwards.text


async def test_revoking_the_old_key_during_the_grace_takes_effect_now(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    old = await _issue(harness, admin, tenant.id)
    new = (await _rotate(harness, admin, old["id"], grace=3600)).json()
    assert await _predict(harness, old["key"]) == 200
    revoked = await harness.client.post(
        f"/api/v1/admin/keys/{old['id']}/revoke", headers=bearer(admin)
    )
    assert revoked.status_code == 200
    assert datetime.fromisoformat(revoked.json()["revoked_at"]) <= utcnow()
    await refused_within(harness, old["key"], promised=1.0)
    assert await _predict(harness, new["key"]) == 200


async def test_grace_zero_revokes_the_old_key_at_once(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    old = await _issue(harness, admin, tenant.id)
    assert await _predict(harness, old["key"]) == 200
    rotated = await _rotate(harness, admin, old["id"])  # grace_seconds defaults to 0
    assert rotated.status_code == 201
    await refused_within(harness, old["key"], promised=1.0)
    assert await _predict(harness, rotated.json()["key"]) == 200


@pytest.mark.parametrize(
    ("column", "detail"),
    [("revoked_at", "revoked"), ("expires_at", "expired")],
)
async def test_a_revoked_or_expired_key_cannot_be_rotated(
    harness: Harness, column: str, detail: str
) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    old = await _issue(harness, admin, tenant.id)
    await update_key(harness, old["key"], **{column: utcnow() - timedelta(seconds=1)})
    refused = await _rotate(harness, admin, old["id"], grace=10)
    assert refused.status_code == 409, refused.text
    assert refused.json()["type"] == "conflict"
    assert detail in refused.json()["detail"]
    async with harness.sessionmaker() as session:
        successors = (
            await session.scalars(
                select(ApiKey).where(ApiKey.rotated_from_id == uuid.UUID(old["id"]))
            )
        ).all()
    assert successors == []


async def test_an_already_rotated_key_is_409_naming_the_rotation(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    old = await _issue(harness, admin, tenant.id)
    assert (await _rotate(harness, admin, old["id"], grace=600)).status_code == 201
    again = await _rotate(harness, admin, old["id"], grace=600)
    assert again.status_code == 409
    assert "already rotated" in again.json()["detail"]


async def test_concurrent_rotations_of_one_key_issue_one_successor(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    old = await _issue(harness, admin, tenant.id)
    responses = await asyncio.gather(*[_rotate(harness, admin, old["id"], 60) for _ in range(4)])
    statuses = sorted(r.status_code for r in responses)
    # SQLite may also refuse a writer that lost the race for its lock with 503; never a 500.
    assert statuses.count(201) == 1, statuses
    assert set(statuses) <= {201, 409, 503}, statuses
    async with harness.sessionmaker() as session:
        successors = (
            await session.scalars(
                select(ApiKey).where(ApiKey.rotated_from_id == uuid.UUID(old["id"]))
            )
        ).all()
    assert len(successors) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"grace_seconds": -1},
        {"grace_seconds": MAX_ROTATION_GRACE_SECONDS + 1},
        {"grace_seconds": 10**30},
        {"grace_seconds": "soon"},
        {"grace_seconds": 10, "tenant_id": str(uuid.uuid4())},
        {"grace_seconds": 10, "scopes": ["admin"]},
    ],
)
async def test_a_bad_rotation_body_is_422_and_changes_nothing(
    harness: Harness, body: dict[str, object]
) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    old = await _issue(harness, admin, tenant.id)
    refused = await harness.client.post(
        f"/api/v1/admin/keys/{old['id']}/rotate", json=body, headers=bearer(admin)
    )
    assert refused.status_code == 422, refused.text
    listing = await harness.client.get(
        f"/api/v1/admin/tenants/{tenant.id}/keys", headers=bearer(admin)
    )
    rotating = [k for k in listing.json()["keys"] if k["name"] == "rotating"]
    assert len(rotating) == 1
    assert rotating[0]["revoked_at"] is None


async def test_the_longest_grace_is_accepted(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    old = await _issue(harness, admin, tenant.id)
    rotated = await _rotate(harness, admin, old["id"], grace=MAX_ROTATION_GRACE_SECONDS)
    assert rotated.status_code == 201, rotated.text


async def test_unknown_key_is_404_and_an_admin_key_keeps_its_owner(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    unknown = await _rotate(harness, admin, str(uuid.uuid4()), grace=10)
    assert unknown.status_code == 404
    # An operator's own key rotates to an operator key (scope admin, no tenant).
    async with harness.sessionmaker() as session:
        row = (await session.scalars(select(ApiKey).where(ApiKey.scopes == "admin").limit(1))).one()
    rotated = await _rotate(harness, admin, str(row.id), grace=10)
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert new["tenant_id"] is None
    assert new["scopes"] == ["admin"]
    tenants = await harness.client.get("/api/v1/admin/tenants", headers=bearer(new["key"]))
    assert tenants.status_code == 200


async def test_rotation_is_audited_without_a_secret(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    old = await _issue(harness, admin, tenant.id)
    new = (await _rotate(harness, admin, old["id"], grace=30)).json()
    async with harness.sessionmaker() as session:
        events = (
            await session.scalars(
                select(AuditEvent).where(
                    AuditEvent.action == "key.rotate", AuditEvent.target_id == old["id"]
                )
            )
        ).all()
    assert len(events) == 1
    event = events[0]
    assert event.actor.startswith("admin:")
    assert event.tenant_id == tenant.id
    assert event.detail["old_id"] == old["id"]
    assert event.detail["new_id"] == new["id"]
    assert event.detail["old_prefix"] == old["prefix"]
    assert event.detail["new_prefix"] == new["prefix"]
    assert event.detail["grace_seconds"] == 30
    text = str(event.detail)
    for secret in (old["key"], new["key"]):
        assert secret not in text
