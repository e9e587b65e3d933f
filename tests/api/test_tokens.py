"""POST /auth/token (both grants), what a token may do, admin users, and the operator's token
records: list, revoke, prune."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import jwt
from sqlalchemy import select

from auth.admins import create_admin_user, hash_password
from auth.models import AccessToken, AdminPrincipal, ApiKey, AuditEvent, utcnow
from auth.tokens import prune_tokens
from tests.conftest import (
    IRIS_SETOSA,
    TEST_ACTOR,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    refused_within,
    unique,
)
from tests.e2e.servers import BIN

TOKEN = "/api/v1/auth/token"
PASSWORD = "correct horse battery staple"


def login_client(harness: Harness) -> httpx.AsyncClient:
    """A client from an address of its own: the failed-login throttle counts per address (on a
    Redis shared by every test), so no test's failures can throttle another's logins."""
    app = harness.client._transport.app  # type: ignore[attr-defined]
    a, b, c = uuid.uuid4().bytes[:3]
    address = f"10.{a}.{b}.{c}"
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(address, 4000)),
        base_url="http://testserver",
    )


async def mint(harness: Harness, **form: str) -> httpx.Response:
    """POST the form to /auth/token from a fresh address."""
    async with login_client(harness) as client:
        return await client.post(TOKEN, data=form)


async def key_token(harness: Harness, key: str, **form: str) -> str:
    response = await mint(harness, grant_type="client_credentials", client_secret=key, **form)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


async def new_admin_user(harness: Harness) -> str:
    email = f"{unique('ops')}@example.com"
    async with harness.sessionmaker() as session:
        await create_admin_user(session, TEST_ACTOR, email, PASSWORD)
        await session.commit()
    return email


async def test_client_credentials_gives_a_bearer_token_that_predicts_and_reads_me(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    response = await mint(harness, grant_type="client_credentials", client_secret=key)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == harness.state.settings.jwt_ttl_seconds == 900
    assert body["scope"] == "predict usage:read"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    token = body["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 900
    assert claims["sub"].startswith("key:")
    assert claims["tid"] == str(tenant.id)

    predicted = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(token)
    )
    assert predicted.status_code == 200, predicted.text
    me = await harness.client.get("/api/v1/me", headers=bearer(token))
    assert me.status_code == 200
    assert me.json()["tenant"]["id"] == str(tenant.id)
    assert me.json()["key"]["id"] == claims["sub"].removeprefix("key:")
    # The key's id as client_id is accepted; another id is not.
    same = await mint(
        harness, grant_type="client_credentials", client_secret=key, client_id=claims["sub"][4:]
    )
    assert same.status_code == 200
    wrong = await mint(
        harness, grant_type="client_credentials", client_secret=key, client_id=str(uuid.uuid4())
    )
    assert wrong.status_code == 401


async def test_a_requested_scope_narrows_the_token_and_more_is_refused(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    narrow = await key_token(harness, key, scope="predict")
    assert (await harness.client.get("/api/v1/me/usage", headers=bearer(narrow))).status_code == 403
    served = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(narrow)
    )
    assert served.status_code == 200
    for scope in ("predict keys:manage", "admin"):
        refused = await mint(
            harness, grant_type="client_credentials", client_secret=key, scope=scope
        )
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"] == "application/problem+json"


async def test_token_scopes_shrink_with_the_key_and_never_outlive_its_expiry(
    harness: Harness,
) -> None:
    _, key = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    token = await key_token(harness, key)
    key_id = jwt.decode(token, options={"verify_signature": False})["sub"][4:]
    async with harness.sessionmaker() as session:
        row = await session.get(ApiKey, uuid.UUID(key_id))
        assert row is not None
        row.scopes = "usage:read"
        row.expires_at = utcnow() + timedelta(seconds=120)
        await session.commit()
    await refused_within(harness, token, seconds=1.0)  # predict no longer held: 403
    await asyncio.sleep(1.0)  # the key itself is cached for a second too
    response = await mint(harness, grant_type="client_credentials", client_secret=key)
    assert 110 <= response.json()["expires_in"] <= 120
    assert response.json()["scope"] == "usage:read"
    # An admin key's token is an admin token.
    admin_token = await key_token(harness, admin)
    tenants = await harness.client.get("/api/v1/admin/tenants", headers=bearer(admin_token))
    assert tenants.status_code == 200


async def test_password_grant_gives_an_admin_token_and_bad_passwords_are_401(
    harness: Harness,
) -> None:
    email = await new_admin_user(harness)
    response = await mint(harness, grant_type="password", username=email.upper(), password=PASSWORD)
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "admin"
    token = response.json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["sub"].startswith("admin:")
    listed = await harness.client.get("/api/v1/admin/tenants", headers=bearer(token))
    assert listed.status_code == 200
    predicted = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(token)
    )
    assert predicted.status_code == 403
    # An admin user's change is audited under its e-mail address.
    created = await harness.client.post(
        "/api/v1/admin/tenants", json={"name": unique("by-user")}, headers=bearer(token)
    )
    assert created.status_code == 201
    async with harness.sessionmaker() as session:
        event = await session.scalar(
            select(AuditEvent).where(
                AuditEvent.action == "tenant.create", AuditEvent.target_id == created.json()["id"]
            )
        )
    assert event is not None
    assert event.actor == f"admin:{email}"

    for username, password in ((email, "wrong password!!"), ("nobody@example.com", PASSWORD)):
        refused = await mint(harness, grant_type="password", username=username, password=password)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.headers["content-type"] == "application/problem+json"
        assert PASSWORD not in refused.text


async def test_form_values_are_bounded_and_unknown_fields_refused(harness: Harness) -> None:
    for form in (
        {"grant_type": "client_credentials", "client_secret": "mg_" + "a" * 1100},
        {"grant_type": "password", "username": "a@b.example", "password": "p" * 1025},
        {"grant_type": "password", "username": "u" * 300 + "@b.example", "password": "x"},
        {"grant_type": "authorization_code", "client_secret": "x"},
        {"grant_type": "client_credentials", "client_secret": "x", "tenant_id": "y"},
    ):
        response = await mint(harness, **form)
        assert response.status_code == 422, (form, response.text)
    missing = await mint(harness, grant_type="client_credentials")
    assert missing.status_code == 401


async def test_operators_list_and_revoke_token_records_and_revocation_holds_within_a_second(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    token = await key_token(harness, key)
    claims = jwt.decode(token, options={"verify_signature": False})
    jti, key_id = claims["jti"], claims["sub"][4:]
    served = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(token)
    )
    assert served.status_code == 200  # and now cached

    listed = await harness.client.get(
        f"/api/v1/admin/tokens?key_id={key_id}&active_only=true", headers=bearer(admin)
    )
    assert listed.status_code == 200
    records = listed.json()["tokens"]
    assert [record["jti"] for record in records] == [jti]
    assert records[0]["tenant_id"] == str(tenant.id)
    assert records[0]["grant_type"] == "client_credentials"
    assert token not in listed.text
    by_tenant = await harness.client.get(
        f"/api/v1/admin/tokens?tenant_id={tenant.id}", headers=bearer(admin)
    )
    assert jti in {record["jti"] for record in by_tenant.json()["tokens"]}

    revoked = await harness.client.post(f"/api/v1/admin/tokens/{jti}/revoke", headers=bearer(admin))
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    await refused_within(harness, token, seconds=1.0)
    again = await harness.client.post(f"/api/v1/admin/tokens/{jti}/revoke", headers=bearer(admin))
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    async with harness.sessionmaker() as session:
        events = (
            await session.scalars(
                select(AuditEvent).where(
                    AuditEvent.action == "token.revoke", AuditEvent.target_id == jti
                )
            )
        ).all()
    assert len(events) == 1
    active = await harness.client.get(
        f"/api/v1/admin/tokens?key_id={key_id}&active_only=true", headers=bearer(admin)
    )
    assert active.json()["tokens"] == []
    # The key itself still works, and a tenant's credential may not see the records.
    assert (await harness.client.get("/api/v1/me", headers=bearer(key))).status_code == 200
    assert (
        await harness.client.get("/api/v1/admin/tokens", headers=bearer(key))
    ).status_code == 403
    unknown = await harness.client.post(
        f"/api/v1/admin/tokens/{uuid.uuid4()}/revoke", headers=bearer(admin)
    )
    assert unknown.status_code == 404


async def test_records_expired_a_while_ago_are_pruned(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    token = await key_token(harness, key)
    live = uuid.UUID(jwt.decode(token, options={"verify_signature": False})["jti"])
    async with harness.sessionmaker() as session:
        record = await session.get(AccessToken, live)
        assert record is not None
        old = AccessToken(
            jti=uuid.uuid4(),
            subject=record.subject,
            grant_type="client_credentials",
            api_key_id=record.api_key_id,
            tenant_id=record.tenant_id,
            scopes="predict",
            issued_at=utcnow() - timedelta(hours=3),
            expires_at=utcnow() - timedelta(hours=2),
        )
        session.add(old)
        await session.commit()
        assert await prune_tokens(session) >= 1
        await session.commit()
        assert await session.get(AccessToken, old.jti) is None
        assert await session.get(AccessToken, live) is not None


def _cli(
    harness: Harness, tmp_path: Path, *args: str, stdin: str
) -> subprocess.CompletedProcess[str]:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("MODELGATE_")
    }
    environment["MODELGATE_DATABASE_URL"] = harness.backend.database_url
    environment["MODELGATE_VAR_DIR"] = str(tmp_path / "var")
    return subprocess.run(
        [str(BIN / "modelgate"), *args],
        cwd=tmp_path,
        env=environment,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


async def test_cli_creates_admin_users_and_sets_passwords_from_stdin_never_from_argv(
    harness: Harness, tmp_path: Path
) -> None:
    email = f"{unique('cli')}@example.com"
    # No option takes a password: argv is visible to every local user.
    argv = ("admin", "create-user", "--email", email, "--password", PASSWORD)
    via_argv = _cli(harness, tmp_path, *argv, stdin="")
    assert via_argv.returncode == 2
    async with harness.sessionmaker() as session:
        assert (
            await session.scalar(select(AdminPrincipal).where(AdminPrincipal.name == email)) is None
        )
    too_short = _cli(harness, tmp_path, "admin", "create-user", "--email", email, stdin="short\n")
    assert too_short.returncode == 1
    created = _cli(
        harness, tmp_path, "admin", "create-user", "--email", email, stdin=PASSWORD + "\n"
    )
    assert created.returncode == 0, created.stderr
    assert PASSWORD not in created.stdout + created.stderr

    token = (await mint(harness, grant_type="password", username=email, password=PASSWORD)).json()
    assert (
        await harness.client.get("/api/v1/admin/tenants", headers=bearer(token["access_token"]))
    ).status_code == 200
    new_password = PASSWORD + " again"
    changed = _cli(
        harness, tmp_path, "admin", "set-password", "--email", email, stdin=new_password + "\n"
    )
    assert changed.returncode == 0, changed.stderr
    # Changing the password revokes the user's tokens, and only the new password logs in.
    await refused_within(harness, token["access_token"], seconds=1.0, path="/api/v1/admin/tenants")
    old = await mint(harness, grant_type="password", username=email, password=PASSWORD)
    assert old.status_code == 401
    new = await mint(harness, grant_type="password", username=email, password=new_password)
    assert new.status_code == 200
    async with harness.sessionmaker() as session:
        events = (
            await session.scalars(select(AuditEvent).where(AuditEvent.action.like("admin_user.%")))
        ).all()
    mine = [event for event in events if event.detail.get("email") == email]
    assert {event.actor for event in mine} == {"cli"}
    assert sorted(event.action for event in mine) == [
        "admin_user.create",
        "admin_user.password_change",
    ]
    for event in mine:
        assert PASSWORD not in str(event.detail)
        assert "hash" not in str(event.detail)
    pruned = _cli(harness, tmp_path, "tokens", "prune", stdin="")
    assert pruned.returncode == 0, pruned.stderr


async def test_password_hashing_runs_off_the_event_loop() -> None:
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await hash_password(PASSWORD)
    took = time.perf_counter() - started
    done.set()
    await ticking
    # Argon2 takes tens of milliseconds; had it run on the loop, one gap would be as long.
    assert took > 0.02, f"hashing took {took * 1000:.1f} ms: too fast to show anything"
    assert max(gaps) < took / 2, f"the loop stalled {max(gaps) * 1000:.1f} ms"
