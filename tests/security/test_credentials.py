"""SECURITY.md, credentials (lines 1-3) and authorization (lines 9, 11, 12)."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from auth.errors import InvalidRequest, Unauthenticated
from auth.identity.authn import MAX_AUTHORIZATION_LENGTH, KeyAuthenticator, bearer_credential
from auth.identity.keys import (
    TENANT_SCOPES,
    _checksum,
    generate_key,
    has_valid_checksum,
    key_digest,
    normalize_scopes,
)
from auth.models import ApiKey, utcnow
from tests.conftest import (
    IRIS_SETOSA,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    refused_within,
    update_key,
    wrong_checksum,
)

PREDICT = "/api/v1/predict"


def _assert_401(response: object) -> None:
    status = response.status_code  # type: ignore[attr-defined]
    assert status == 401, response.text  # type: ignore[attr-defined]
    assert response.headers["WWW-Authenticate"] == "Bearer"  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["type"] == "unauthenticated"
    assert response.headers["content-type"].startswith("application/problem+json")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Token mg_abc"},
        {"Authorization": "Bearer " + "a" * 9000},
        {"Authorization": "Bearer mg_x mg_y"},
        {"Authorization": "Bearer not-a-key-nor-a-jwt"},
    ],
)
async def test_missing_or_malformed_credentials_are_401(
    harness: Harness, headers: dict[str, str]
) -> None:
    """SECURITY.md line 1: no, a non-Bearer, an empty or an over-8-KiB credential is 401
    with WWW-Authenticate: Bearer."""
    response = await harness.client.post(PREDICT, json={"features": IRIS_SETOSA}, headers=headers)
    _assert_401(response)


def test_generated_keys_are_prefixed_long_and_checksummed() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("mg_")
        assert len(key) == 52
        assert has_valid_checksum(key)
    key = next(iter(keys))
    flipped = key[:10] + ("A" if key[10] != "A" else "B") + key[11:]
    assert not has_valid_checksum(flipped)
    assert not has_valid_checksum(key[:-1])
    assert not has_valid_checksum(key + "0")


def test_digest_is_an_hmac_under_the_pepper() -> None:
    key = generate_key()
    for pepper in (b"pepper-one", b"pepper-two"):
        # Computed here, independently of auth.identity.keys: the hex HMAC-SHA256 of the key
        # under the pepper, and nothing else (not a plain hash, not the pepper appended or
        # prepended).
        assert key_digest(pepper, key) == hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()
    assert key_digest(b"pepper-one", key) != key_digest(b"pepper-two", key)
    assert key_digest(b"pepper-one", key) != key_digest(b"pepper-one", generate_key())


async def test_an_issued_key_is_stored_only_as_its_hmac(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    created = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys", json={"name": "stored"}, headers=bearer(admin)
    )
    assert created.status_code == 201, created.text
    key, key_id = created.json()["key"], created.json()["id"]
    async with harness.sessionmaker() as session:
        row = await session.scalar(select(ApiKey).where(ApiKey.id == uuid.UUID(key_id)))
    assert row is not None
    pepper = harness.state.secrets.key_pepper
    assert row.digest == hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()
    assert row.display_prefix == key[:11]
    stored = [str(getattr(row, column.key)) for column in ApiKey.__table__.columns]
    assert not any(key[11:20] in value for value in stored), stored


class _ExplodingSessionmaker:
    """A sessionmaker that fails the test if anything asks it for a session."""

    def __call__(self) -> object:
        raise AssertionError("the database was touched")


async def test_wrong_checksum_is_refused_without_touching_the_database() -> None:
    authenticator = KeyAuthenticator(_ExplodingSessionmaker(), b"pepper")  # type: ignore[arg-type]
    key = generate_key()
    forged = wrong_checksum(key)
    with pytest.raises(Unauthenticated):
        await authenticator.authenticate(forged)


async def test_wrong_checksum_over_http_is_401(harness: Harness) -> None:
    """SECURITY.md line 2: an mg_ key with a wrong checksum is 401 (and never reaches the
    database: the test above proves it)."""
    _, key = await create_tenant_with_key(harness)
    forged = wrong_checksum(key)
    _assert_401(
        await harness.client.post(PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(forged))
    )


async def test_unknown_well_formed_key_is_401(harness: Harness) -> None:
    _assert_401(
        await harness.client.post(
            PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(generate_key())
        )
    )


@pytest.mark.parametrize("column", ["revoked_at", "expires_at"])
async def test_revoked_or_expired_key_is_401(harness: Harness, column: str) -> None:
    """SECURITY.md line 3: a revoked or expired key is 401, on this worker within a second."""
    _, key = await create_tenant_with_key(harness)
    ok = await harness.client.post(PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key))
    assert ok.status_code == 200
    await update_key(harness, key, **{column: utcnow() - timedelta(seconds=1)})
    # The key was verified a moment ago and is cached; the change must still hold within the
    # cache's 1 second, and from then on.
    await refused_within(harness, key, promised=1.0)
    _assert_401(
        await harness.client.post(PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key))
    )


async def test_key_with_a_future_expiry_is_accepted(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    expires_at = utcnow() + timedelta(minutes=10)
    created = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys",
        json={"name": "expiring", "expires_at": expires_at.isoformat()},
        headers=bearer(admin),
    )
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    # Twice: the first is a database lookup, the second is served from the key cache.
    for _ in range(2):
        response = await harness.client.post(
            PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert response.status_code == 200, response.text
    me = await harness.client.get("/api/v1/me", headers=bearer(key))
    assert me.status_code == 200, me.text
    assert datetime.fromisoformat(me.json()["key"]["expires_at"]) == expires_at
    # An existing key given an expiry in the future (not the past) keeps working too.
    _, other = await create_tenant_with_key(harness)
    await update_key(harness, other, expires_at=utcnow() + timedelta(seconds=30))
    response = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(other)
    )
    assert response.status_code == 200, response.text


async def test_key_cannot_be_issued_already_expired(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    response = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys",
        json={"name": "stale", "expires_at": (utcnow() - timedelta(seconds=1)).isoformat()},
        headers=bearer(admin),
    )
    assert response.status_code == 422, response.text
    assert "expires_at" in response.json()["detail"]
    listing = await harness.client.get(
        f"/api/v1/admin/tenants/{tenant.id}/keys", headers=bearer(admin)
    )
    assert [k["name"] for k in listing.json()["keys"]] == ["test key"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/admin/tenants"),
        ("POST", "/api/v1/admin/tenants"),
        ("GET", "/api/v1/admin/tenants/00000000-0000-0000-0000-000000000000"),
        ("PATCH", "/api/v1/admin/tenants/00000000-0000-0000-0000-000000000000"),
        ("POST", "/api/v1/admin/tenants/00000000-0000-0000-0000-000000000000/keys"),
        ("GET", "/api/v1/admin/tenants/00000000-0000-0000-0000-000000000000/keys"),
        ("GET", "/api/v1/admin/billing/export?month=2026-01"),
    ],
)
async def test_tenant_key_on_admin_routes_is_403_and_no_credential_is_401(
    harness: Harness, method: str, path: str
) -> None:
    """SECURITY.md line 9: a tenant key on any /admin route is 403; no credential is 401."""
    _, key = await create_tenant_with_key(harness, scopes=("predict", "usage:read", "keys:manage"))
    forbidden = await harness.client.request(method, path, headers=bearer(key), json={})
    assert forbidden.status_code == 403, forbidden.text
    assert forbidden.json()["type"] == "forbidden"
    _assert_401(await harness.client.request(method, path, json={}))


async def test_key_without_predict_scope_is_403(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness, scopes=("usage:read",))
    response = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert response.status_code == 403
    assert "predict" in response.json()["detail"]


async def test_key_without_usage_scope_cannot_read_usage(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness, scopes=("predict",))
    response = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    assert response.status_code == 403


async def test_admin_key_cannot_predict(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    response = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(admin)
    )
    assert response.status_code == 403


async def test_suspended_tenant_is_refused(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    patched = await harness.client.patch(
        f"/api/v1/admin/tenants/{tenant.id}", json={"status": "suspended"}, headers=bearer(admin)
    )
    assert patched.status_code == 200
    response = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert response.status_code == 403
    assert response.json()["type"] == "tenant-suspended"


@pytest.mark.parametrize(
    "extra",
    [
        {"tenant_id": "00000000-0000-0000-0000-000000000000"},
        {"scopes": ["admin"]},
        {"rate_limit": "1000000/second"},
        {"monthly_quota": 10**9},
        {"is_admin": True},
    ],
)
async def test_fields_a_tenant_may_not_set_are_422(
    harness: Harness, extra: dict[str, object]
) -> None:
    """SECURITY.md line 11: a field the client may not set is 422 and changes nothing."""
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA, **extra}, headers=bearer(key)
    )
    assert response.status_code == 422


async def test_admin_cannot_issue_admin_scope_to_a_tenant_key(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    response = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys",
        json={"name": "sneaky", "scopes": ["predict", "admin"]},
        headers=bearer(admin),
    )
    assert response.status_code == 422


async def test_no_response_contains_a_digest_and_the_key_appears_once(harness: Harness) -> None:
    """SECURITY.md line 12: no response holds a digest; the key is in its creating response only."""
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    created = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys",
        json={"name": "shown once"},
        headers=bearer(admin),
    )
    assert created.status_code == 201
    key = created.json()["key"]
    digest = key_digest(harness.state.secrets.key_pepper, key)
    assert digest not in created.text
    listing = await harness.client.get(
        f"/api/v1/admin/tenants/{tenant.id}/keys", headers=bearer(admin)
    )
    assert listing.status_code == 200
    assert key not in listing.text
    assert digest not in listing.text
    assert "digest" not in listing.text
    me = await harness.client.get("/api/v1/me", headers=bearer(key))
    assert key not in me.text
    assert digest not in me.text


@pytest.mark.parametrize(
    ("header", "credential"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),  # the scheme is case-insensitive (RFC 7235)
        ("BEARER abc", "abc"),
        ("Bearer  abc", "abc"),  # one or more spaces (RFC 6750)
        ("Bearer abc ", "abc"),
        ("Bearer " + "k" * (MAX_AUTHORIZATION_LENGTH - 7), "k" * (MAX_AUTHORIZATION_LENGTH - 7)),
    ],
)
def test_bearer_credential_is_taken_from_a_well_formed_header(header: str, credential: str) -> None:
    assert bearer_credential(header) == credential


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Bearer " + "k" * (MAX_AUTHORIZATION_LENGTH - 6), "too long"),  # one over the limit
        ("Bearer", "Bearer <credential>"),
        ("Bearer ", "Bearer <credential>"),
        ("Basic abc", "Bearer <credential>"),
        ("Bearerabc", "Bearer <credential>"),
        ("Bearer abc def", "Bearer <credential>"),
        ("Bearer abc  def", "Bearer <credential>"),
    ],
)
def test_malformed_authorization_headers_are_refused(header: str | None, reason: str) -> None:
    with pytest.raises(Unauthenticated, match=re.escape(reason)):
        bearer_credential(header)


def test_checksum_refuses_the_wrong_length_prefix_or_alphabet_even_when_the_crc_matches() -> None:
    """Each check stands on its own: a string whose CRC matches its body is still refused
    when it is one character short, lacks the prefix, or uses characters outside base62."""
    body = generate_key()[3:-6]
    assert has_valid_checksum("mg_" + body + _checksum(body))
    short = body[:-1]
    assert not has_valid_checksum("mg_" + short + _checksum(short))
    assert not has_valid_checksum("xx_" + body + _checksum(body))
    assert not has_valid_checksum("mg-" + body + _checksum(body))
    odd = body[:-1] + "!"
    assert not has_valid_checksum("mg_" + odd + _checksum(odd))
    assert not has_valid_checksum("mg_" + body + _checksum(body)[:-1] + "!")


def test_scopes_are_checked_against_what_the_owner_may_hold() -> None:
    assert normalize_scopes(["usage:read", "predict", "predict"], TENANT_SCOPES) == (
        "predict usage:read"
    )
    with pytest.raises(InvalidRequest, match="unknown scopes: admin, superuser"):
        normalize_scopes(["predict", "superuser", "admin"], TENANT_SCOPES)
    with pytest.raises(InvalidRequest, match="at least one scope"):
        normalize_scopes([], TENANT_SCOPES)
