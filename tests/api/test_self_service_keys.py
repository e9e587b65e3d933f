"""GET/POST /me/keys, POST /me/keys/{id}/revoke and /rotate: a tenant manages its own keys with
the ``keys:manage`` scope; a new key holds at most the caller's scopes and is shown once."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import httpx
import pytest
from sqlalchemy import select

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

MANAGER = ("predict", "usage:read", "keys:manage")
KEYS = "/api/v1/me/keys"


async def test_a_tenant_lists_issues_and_revokes_its_own_keys(harness: Harness) -> None:
    tenant, manager = await create_tenant_with_key(harness, scopes=MANAGER)
    expires_at = utcnow() + timedelta(days=1)
    created = await harness.client.post(
        KEYS,
        json={"name": "ci", "scopes": ["predict"], "expires_at": expires_at.isoformat()},
        headers=bearer(manager),
    )
    assert created.status_code == 201, created.text
    assert created.headers["Cache-Control"] == "no-store"
    new = created.json()
    assert new["tenant_id"] == str(tenant.id)
    assert new["scopes"] == ["predict"]
    assert datetime.fromisoformat(new["expires_at"]) == expires_at
    assert new["key"].startswith("mg_")
    served = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(new["key"])
    )
    assert served.status_code == 200

    listing = await harness.client.get(KEYS, headers=bearer(manager))
    assert listing.status_code == 200
    keys = listing.json()["keys"]
    assert {k["name"] for k in keys} == {"test key", "ci"}
    assert new["key"] not in listing.text
    assert all("key" not in k and "digest" not in k for k in keys)

    revoked = await harness.client.post(f"{KEYS}/{new['id']}/revoke", headers=bearer(manager))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    await refused_within(harness, new["key"], promised=1.0)

    async with harness.sessionmaker() as session:
        events = (
            await session.scalars(
                select(AuditEvent).where(AuditEvent.target_id == new["id"]).order_by(AuditEvent.id)
            )
        ).all()
    assert [e.action for e in events] == ["key.issue", "key.revoke"]
    assert {e.actor for e in events} == {f"tenant:{tenant.id}"}
    assert all(e.tenant_id == tenant.id for e in events)


async def test_a_new_key_defaults_to_the_callers_scopes(harness: Harness) -> None:
    _, manager = await create_tenant_with_key(harness, scopes=("keys:manage", "usage:read"))
    created = await harness.client.post(KEYS, json={"name": "same"}, headers=bearer(manager))
    assert created.status_code == 201, created.text
    assert created.json()["scopes"] == ["keys:manage", "usage:read"]
    assert created.json()["expires_at"] is None


@pytest.mark.parametrize("scopes", [["predict"], ["predict", "usage:read"]])
async def test_a_scope_the_caller_lacks_is_403_and_issues_nothing(
    harness: Harness, scopes: list[str]
) -> None:
    _, manager = await create_tenant_with_key(harness, scopes=("keys:manage", "usage:read"))
    refused = await harness.client.post(
        KEYS, json={"name": "stronger", "scopes": scopes}, headers=bearer(manager)
    )
    assert refused.status_code == 403, refused.text
    assert refused.json()["type"] == "forbidden"
    assert "predict" in refused.json()["detail"]
    listing = await harness.client.get(KEYS, headers=bearer(manager))
    assert [k["name"] for k in listing.json()["keys"]] == ["test key"]


@pytest.mark.parametrize("scopes", [["admin"], [], ["predict"] * 5, ["anything"]])
async def test_an_unknown_admin_or_empty_scope_list_is_422(
    harness: Harness, scopes: list[str]
) -> None:
    _, manager = await create_tenant_with_key(harness, scopes=MANAGER)
    refused = await harness.client.post(
        KEYS, json={"name": "odd", "scopes": scopes}, headers=bearer(manager)
    )
    assert refused.status_code == 422, refused.text


async def test_the_routes_need_keys_manage_and_a_tenant_credential(harness: Harness) -> None:
    tenant, plain = await create_tenant_with_key(harness)  # predict, usage:read
    admin = await create_admin_key(harness)
    some_id = uuid.uuid4()
    for key in (plain, admin):
        for method, path in (
            ("GET", KEYS),
            ("POST", KEYS),
            ("POST", f"{KEYS}/{some_id}/revoke"),
        ):
            response = await harness.client.request(
                method, path, json={"name": "x"}, headers=bearer(key)
            )
            assert response.status_code == 403, (method, path, response.text)
    assert (await harness.client.get(KEYS)).status_code == 401
    # Nothing was issued by the refused attempts.
    listing = await harness.client.get(
        f"/api/v1/admin/tenants/{tenant.id}/keys", headers=bearer(admin)
    )
    assert [k["name"] for k in listing.json()["keys"]] == ["test key"]


async def test_revoking_an_unknown_key_is_404(harness: Harness) -> None:
    _, manager = await create_tenant_with_key(harness, scopes=MANAGER)
    response = await harness.client.post(f"{KEYS}/{uuid.uuid4()}/revoke", headers=bearer(manager))
    assert response.status_code == 404
    assert response.json()["type"] == "not-found"
    malformed = await harness.client.post(f"{KEYS}/not-a-uuid/revoke", headers=bearer(manager))
    assert malformed.status_code == 422


async def test_a_key_may_revoke_itself(harness: Harness) -> None:
    _, manager = await create_tenant_with_key(harness, scopes=MANAGER)
    own_id = (await harness.client.get("/api/v1/me", headers=bearer(manager))).json()["key"]["id"]
    revoked = await harness.client.post(f"{KEYS}/{own_id}/revoke", headers=bearer(manager))
    assert revoked.status_code == 200
    await refused_within(harness, manager, promised=1.0)


def _moment(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


async def _key_id(harness: Harness, credential: str) -> str:
    me = await harness.client.get("/api/v1/me", headers=bearer(credential))
    assert me.status_code == 200, me.text
    return str(me.json()["key"]["id"])


async def _token_for(harness: Harness, key: str) -> str:
    response = await harness.client.post(
        "/api/v1/auth/token", data={"grant_type": "client_credentials", "client_secret": key}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


@pytest.mark.parametrize("through", ["key", "token"])
async def test_a_new_key_never_outlives_the_key_behind_the_calling_credential(
    harness: Harness, through: str
) -> None:
    """A keys:manage key that expires at T, or a JWT minted from it: a new key without
    expires_at expires at T, one at or before T is issued as asked, one after T is 422 and
    issues nothing."""
    _, manager = await create_tenant_with_key(harness, scopes=MANAGER)
    ends = (utcnow() + timedelta(days=2)).replace(microsecond=0)
    await update_key(harness, manager, expires_at=ends)
    credential = manager if through == "key" else await _token_for(harness, manager)

    async def issue(**body: str) -> httpx.Response:
        return await harness.client.post(
            KEYS, json={"name": "child", **body}, headers=bearer(credential)
        )

    capped = await issue()
    assert capped.status_code == 201, capped.text
    assert _moment(capped.json()["expires_at"]) == ends
    for asked in (ends - timedelta(hours=1), ends):
        issued = await issue(expires_at=asked.isoformat())
        assert issued.status_code == 201, issued.text
        assert _moment(issued.json()["expires_at"]) == asked
    for later in (ends + timedelta(seconds=1), ends + timedelta(days=365)):
        refused = await issue(expires_at=later.isoformat())
        assert refused.status_code == 422, refused.text
        assert refused.json()["errors"][0]["loc"][-1] == "expires_at"
    listing = await harness.client.get(KEYS, headers=bearer(manager))
    assert len(listing.json()["keys"]) == 4  # the manager and the three issued


async def test_a_key_in_its_rotation_grace_issues_keys_that_end_with_the_grace(
    harness: Harness,
) -> None:
    """A rotated key keeps working until its grace ends, and so may still manage keys; a key
    it issues ends when it does (its scheduled revocation), not later."""
    _, manager = await create_tenant_with_key(harness, scopes=MANAGER)
    admin = await create_admin_key(harness)
    rotated = await harness.client.post(
        f"/api/v1/admin/keys/{await _key_id(harness, manager)}/rotate",
        json={"grace_seconds": 3600},
        headers=bearer(admin),
    )
    assert rotated.status_code == 201, rotated.text
    listing = await harness.client.get(KEYS, headers=bearer(manager))
    grace_ends = next(
        datetime.fromisoformat(k["revoked_at"])
        for k in listing.json()["keys"]
        if k["revoked_at"] is not None
    )
    capped = await harness.client.post(KEYS, json={"name": "child"}, headers=bearer(manager))
    assert capped.status_code == 201, capped.text
    assert _moment(capped.json()["expires_at"]) == grace_ends
    later = grace_ends + timedelta(minutes=1)
    refused = await harness.client.post(
        KEYS, json={"name": "late", "expires_at": later.isoformat()}, headers=bearer(manager)
    )
    assert refused.status_code == 422, refused.text


async def test_another_tenants_key_is_not_found_and_keeps_working(harness: Harness) -> None:
    """Tenant A's ``keys:manage`` credential revoking tenant B's key by its id: 404, the body
    of a key that does not exist (a 403 would confirm it does); B's key is not revoked, nothing
    is audited, and B is served, from the database as well as from the key cache."""
    _, manager_a = await create_tenant_with_key(harness, scopes=MANAGER)
    tenant_b, key_b = await create_tenant_with_key(harness, scopes=MANAGER)
    id_b = (await harness.client.get("/api/v1/me", headers=bearer(key_b))).json()["key"]["id"]
    served = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key_b)
    )
    assert served.status_code == 200  # and now cached by the app's authenticator

    foreign = await harness.client.post(f"{KEYS}/{id_b}/revoke", headers=bearer(manager_a))
    unknown = await harness.client.post(f"{KEYS}/{uuid.uuid4()}/revoke", headers=bearer(manager_a))
    assert foreign.status_code == unknown.status_code == 404, foreign.text
    assert {**foreign.json(), "request_id": None} == {**unknown.json(), "request_id": None}
    assert str(tenant_b.id) not in foreign.text

    async with harness.sessionmaker() as session:
        row = await session.get(ApiKey, uuid.UUID(id_b))
        audited = (
            await session.scalars(select(AuditEvent).where(AuditEvent.target_id == id_b))
        ).all()
    assert row is not None
    assert row.revoked_at is None
    assert [event.action for event in audited] == ["key.issue"]
    listing = await harness.client.get(KEYS, headers=bearer(key_b))
    assert [(k["id"], k["revoked_at"]) for k in listing.json()["keys"]] == [(id_b, None)]
    harness.state.authenticator.forget()  # the next request reads the key's row again
    again = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key_b)
    )
    assert again.status_code == 200, again.text


async def test_a_tenant_rotates_its_own_key_with_a_grace(harness: Harness) -> None:
    """The operator's rotation, on the tenant's own key: the successor is shown once, both keys
    work during the grace, the old one fails after it, and the rotation is audited as the
    tenant's own ``key.rotate``."""
    tenant, manager = await create_tenant_with_key(harness, scopes=MANAGER)
    issued = await harness.client.post(
        KEYS, json={"name": "rotating", "scopes": ["predict"]}, headers=bearer(manager)
    )
    old = issued.json()
    assert await _predict_status(harness, old["key"]) == 200
    rotated = await harness.client.post(
        f"{KEYS}/{old['id']}/rotate", json={"grace_seconds": 2}, headers=bearer(manager)
    )
    assert rotated.status_code == 201, rotated.text
    assert rotated.headers["Cache-Control"] == "no-store"
    new = rotated.json()
    assert new["key"] != old["key"]
    assert new["rotated_from_id"] == old["id"]
    assert (new["tenant_id"], new["name"], new["scopes"]) == (
        str(tenant.id),
        "rotating",
        ["predict"],
    )
    for key in (old["key"], new["key"]):
        assert await _predict_status(harness, key) == 200
    listing = await harness.client.get(KEYS, headers=bearer(manager))
    assert new["key"] not in listing.text
    await refused_within(harness, old["key"], promised=3.0)
    assert await _predict_status(harness, new["key"]) == 200
    # A second rotation of the old key issues nothing: the same 409 as the operator's.
    again = await harness.client.post(
        f"{KEYS}/{old['id']}/rotate", json={"grace_seconds": 2}, headers=bearer(manager)
    )
    assert again.status_code == 409
    async with harness.sessionmaker() as session:
        [event] = (
            await session.scalars(
                select(AuditEvent).where(
                    AuditEvent.action == "key.rotate", AuditEvent.target_id == old["id"]
                )
            )
        ).all()
    assert event.actor == f"tenant:{tenant.id}"
    assert event.tenant_id == tenant.id
    assert (event.detail["new_id"], event.detail["grace_seconds"]) == (new["id"], 2)
    assert old["key"] not in str(event.detail)
    assert new["key"] not in str(event.detail)


async def _predict_status(harness: Harness, key: str) -> int:
    response = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    return response.status_code


@pytest.mark.parametrize("body", [{"grace_seconds": -1}, {"grace_seconds": 604801}, {"x": 1}])
async def test_a_tenants_rotation_has_the_operators_bounds(
    harness: Harness, body: dict[str, object]
) -> None:
    _, manager = await create_tenant_with_key(harness, scopes=MANAGER)
    old = (await harness.client.post(KEYS, json={"name": "kept"}, headers=bearer(manager))).json()
    refused = await harness.client.post(
        f"{KEYS}/{old['id']}/rotate", json=body, headers=bearer(manager)
    )
    assert refused.status_code == 422, refused.text
    listing = (await harness.client.get(KEYS, headers=bearer(manager))).json()["keys"]
    assert [k["revoked_at"] for k in listing if k["id"] == old["id"]] == [None]
    longest = await harness.client.post(
        f"{KEYS}/{old['id']}/rotate", json={"grace_seconds": 604800}, headers=bearer(manager)
    )
    assert longest.status_code == 201, longest.text


async def test_another_tenants_key_or_an_operators_is_not_found_to_rotate(
    harness: Harness,
) -> None:
    """Another tenant's key id and an operator key's id are 404, with the body of a key that
    does not exist; neither key is rotated, and nothing is audited."""
    _, manager_a = await create_tenant_with_key(harness, scopes=MANAGER)
    _, key_b = await create_tenant_with_key(harness, scopes=MANAGER)
    id_b = (await harness.client.get("/api/v1/me", headers=bearer(key_b))).json()["key"]["id"]
    await create_admin_key(harness)  # an operator key exists
    async with harness.sessionmaker() as session:
        admin_row = (
            await session.scalars(select(ApiKey).where(ApiKey.scopes == "admin").limit(1))
        ).one()
    unknown = await harness.client.post(
        f"{KEYS}/{uuid.uuid4()}/rotate", json={}, headers=bearer(manager_a)
    )
    assert unknown.status_code == 404
    for key_id in (id_b, str(admin_row.id)):
        refused = await harness.client.post(
            f"{KEYS}/{key_id}/rotate", json={"grace_seconds": 60}, headers=bearer(manager_a)
        )
        assert refused.status_code == 404, refused.text
        assert {**refused.json(), "request_id": None} == {**unknown.json(), "request_id": None}
    async with harness.sessionmaker() as session:
        rotated = (
            await session.scalars(
                select(ApiKey).where(ApiKey.rotated_from_id.in_([uuid.UUID(id_b), admin_row.id]))
            )
        ).all()
        audited = (
            await session.scalars(
                select(AuditEvent).where(
                    AuditEvent.action == "key.rotate",
                    AuditEvent.target_id.in_([id_b, str(admin_row.id)]),
                )
            )
        ).all()
    assert rotated == []
    assert audited == []
    assert await _predict_status(harness, key_b) == 200


async def test_rotating_needs_keys_manage_and_a_tenant_credential(harness: Harness) -> None:
    _, plain = await create_tenant_with_key(harness)  # predict, usage:read
    _, manager = await create_tenant_with_key(harness, scopes=MANAGER)
    own_id = (await harness.client.get("/api/v1/me", headers=bearer(manager))).json()["key"]["id"]
    admin = await create_admin_key(harness)
    for key in (plain, admin):
        response = await harness.client.post(
            f"{KEYS}/{own_id}/rotate", json={}, headers=bearer(key)
        )
        assert response.status_code == 403, response.text
    assert (await harness.client.post(f"{KEYS}/{own_id}/rotate", json={})).status_code == 401


async def test_a_tenant_may_rotate_only_keys_it_could_issue(harness: Harness) -> None:
    """A rotation hands the caller a new secret with the old key's scopes and expiry, so it has
    issuing's bounds: a key with a scope the calling credential lacks, or one that outlives the
    key behind it, is 403 and is not rotated; a key within both bounds is rotated."""
    _, manager = await create_tenant_with_key(harness, scopes=MANAGER)  # never expires
    tomorrow = (utcnow() + timedelta(days=1)).isoformat()

    async def issue(credential: str, name: str, **body: object) -> dict[str, str]:
        issued = await harness.client.post(
            KEYS, json={"name": name, **body}, headers=bearer(credential)
        )
        assert issued.status_code == 201, issued.text
        created: dict[str, str] = issued.json()
        return created

    short = await issue(manager, "short", scopes=["keys:manage", "predict"], expires_at=tomorrow)
    wide = await issue(manager, "wide", scopes=["predict", "usage:read"], expires_at=tomorrow)
    lasting = await issue(manager, "lasting", scopes=["predict"])  # never expires
    within = await issue(short["key"], "within", scopes=["predict"])  # ends with "short"

    for refused_key, reason in ((wide, "scopes it lacks: usage:read"), (lasting, "outlives")):
        refused = await harness.client.post(
            f"{KEYS}/{refused_key['id']}/rotate", json={}, headers=bearer(short["key"])
        )
        assert refused.status_code == 403, refused.text
        assert reason in refused.json()["detail"]
    rotated = await harness.client.post(
        f"{KEYS}/{within['id']}/rotate", json={"grace_seconds": 60}, headers=bearer(short["key"])
    )
    assert rotated.status_code == 201, rotated.text
    assert rotated.json()["expires_at"] == within["expires_at"]
    async with harness.sessionmaker() as session:
        successors = (
            await session.scalars(
                select(ApiKey.rotated_from_id).where(
                    ApiKey.rotated_from_id.in_(
                        [uuid.UUID(k["id"]) for k in (wide, lasting, within)]
                    )
                )
            )
        ).all()
    assert successors == [uuid.UUID(within["id"])]
    # The operator, or a credential that lasts as long, rotates the others.
    for key in (wide, lasting):
        again = await harness.client.post(
            f"{KEYS}/{key['id']}/rotate", json={}, headers=bearer(manager)
        )
        assert again.status_code == 201, again.text
