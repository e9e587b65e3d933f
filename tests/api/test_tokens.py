"""POST /auth/token (both grants), what a token may do, admin users, and the operator's token
records: list, revoke, prune."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import httpx
import jwt
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from typer.testing import CliRunner

from api.cli import app as cli
from auth.db import create_engine, create_sessionmaker
from auth.errors import ConfigurationError, Unauthenticated
from auth.identity.admins import authenticate_password, create_admin_user, hash_password
from auth.identity.authn import KeyAuthenticator
from auth.identity.tokens import (
    TokenConfig,
    key_id,
    mint_token,
    prune_tokens,
    sign_token,
    verify_token,
)
from auth.models import AccessToken, AdminPrincipal, ApiKey, AuditEvent, utcnow
from auth.settings import Settings, check_production, get_settings, load_secrets
from tests.conftest import (
    IRIS_SETOSA,
    TEST_ACTOR,
    Backend,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    refused_within,
    unique,
)
from tests.security.test_key_cache import CountingSessions

TOKEN = "/api/v1/auth/token"
PASSWORD = "correct horse battery staple"
T = TypeVar("T")


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
    await refused_within(harness, token, promised=1.0)  # predict no longer held: 403
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
    await refused_within(harness, token, promised=1.0)
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


async def test_a_token_revokes_itself_at_auth_revoke_and_a_key_may_not(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    token = await key_token(harness, key)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    other = await key_token(harness, key)
    served = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(token)
    )
    assert served.status_code == 200  # and now cached

    revoked = await harness.client.post("/api/v1/auth/revoke", headers=bearer(token))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["jti"] == jti
    assert revoked.json()["revoked_at"] is not None
    assert revoked.headers["cache-control"] == "no-store"
    # At once on this worker (it drops the token from its cache); within a second on others.
    after = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(token)
    )
    assert after.status_code == 401
    async with harness.sessionmaker() as session:
        event = await session.scalar(
            select(AuditEvent).where(
                AuditEvent.action == "token.revoke", AuditEvent.target_id == jti
            )
        )
    assert event is not None
    assert event.actor == f"tenant:{tenant.id}"
    # Only that token: another minted from the same key, and the key, still work.
    for credential in (other, key):
        still = await harness.client.get("/api/v1/me", headers=bearer(credential))
        assert still.status_code == 200
    # A key presented here is refused (403) and keeps working; no credential is 401.
    refused = await harness.client.post("/api/v1/auth/revoke", headers=bearer(key))
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert (await harness.client.get("/api/v1/me", headers=bearer(key))).status_code == 200
    anonymous = await harness.client.post("/api/v1/auth/revoke")
    assert anonymous.status_code == 401
    # An admin user's token signs out the same way.
    email = await new_admin_user(harness)
    login = await mint(harness, grant_type="password", username=email, password=PASSWORD)
    admin_token = login.json()["access_token"]
    out = await harness.client.post("/api/v1/auth/revoke", headers=bearer(admin_token))
    assert out.status_code == 200, out.text
    deadline = time.monotonic() + 1.5
    while (
        await harness.client.get("/api/v1/admin/tenants", headers=bearer(admin_token))
    ).status_code == 200:
        assert time.monotonic() < deadline, "the admin user's token still works"
        await asyncio.sleep(0.05)


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


async def _in_database(database_url: str, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            result = await work(session)
            await session.commit()
            return result
    finally:
        await engine.dispose()


def test_cli_creates_admin_users_and_sets_passwords_from_stdin_never_from_argv(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELGATE_DATABASE_URL", backend.database_url)
    monkeypatch.setenv("MODELGATE_VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    runner = CliRunner()
    email = f"{unique('cli')}@example.com"

    def user(session: AsyncSession) -> Awaitable[AdminPrincipal | None]:
        return session.scalar(select(AdminPrincipal).where(AdminPrincipal.name == email))

    try:
        # No option takes a password: argv is visible to every local user.
        argv = ["admin", "create-user", "--email", email, "--password", PASSWORD]
        assert runner.invoke(cli, argv, input="").exit_code == 2
        assert asyncio.run(_in_database(backend.database_url, user)) is None
        create = ["admin", "create-user", "--email", email]
        assert runner.invoke(cli, create, input="short\n").exit_code == 1
        created = runner.invoke(cli, create, input=PASSWORD + "\n")
        assert created.exit_code == 0, created.output
        assert PASSWORD not in created.output
        admin = asyncio.run(_in_database(backend.database_url, user))
        assert admin is not None
        assert admin.password_hash is not None
        assert PASSWORD not in admin.password_hash

        async def token_for_user(session: AsyncSession) -> uuid.UUID:
            assert await authenticate_password(session, email, PASSWORD) is not None
            config = TokenConfig.build(b"s" * 32, issuer="i", audience="a", ttl_seconds=60)
            minted = await mint_token(
                session,
                config,
                TEST_ACTOR,
                grant_type="password",
                scopes=frozenset({"admin"}),
                admin_principal_id=admin.id,
            )
            return minted.jti

        jti = asyncio.run(_in_database(backend.database_url, token_for_user))
        new_password = PASSWORD + " again"
        change = ["admin", "set-password", "--email", email]
        changed = runner.invoke(cli, change, input=new_password + "\n")
        assert changed.exit_code == 0, changed.output

        async def after_change(session: AsyncSession) -> None:
            # Only the new password logs in, and the user's live token is revoked.
            assert await authenticate_password(session, email, PASSWORD) is None
            assert await authenticate_password(session, email, new_password) is not None
            record = await session.get(AccessToken, jti)
            assert record is not None
            assert record.revoked_at is not None
            events = (
                await session.scalars(
                    select(AuditEvent).where(AuditEvent.target_id == str(admin.id))
                )
            ).all()
            assert sorted(event.action for event in events) == [
                "admin_user.create",
                "admin_user.password_change",
            ]
            for event in events:
                assert event.actor == "cli"
                assert PASSWORD not in str(event.detail)
                assert "$argon2" not in str(event.detail)

        asyncio.run(_in_database(backend.database_url, after_change))
        assert runner.invoke(cli, ["tokens", "prune"]).exit_code == 0
    finally:
        get_settings.cache_clear()


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


async def test_a_token_costs_no_lookup_in_the_steady_state_and_is_never_cached_past_exp(
    harness: Harness,
) -> None:
    _, key = await create_tenant_with_key(harness)
    token = await key_token(harness, key)
    sessions = CountingSessions(harness.sessionmaker)
    pepper = harness.state.secrets.key_pepper
    authenticator = KeyAuthenticator(sessions, pepper, tokens=harness.state.tokens)  # type: ignore[arg-type]
    # Concurrent misses share one lookup; then the cache answers.
    await asyncio.gather(*[authenticator.authenticate(token) for _ in range(20)])
    for _ in range(100):
        subject = await authenticator.authenticate(token)
    assert sessions.opened == 1
    assert subject.jti is not None
    assert subject.limit_id == str(subject.key_id)

    # A cache that would trust for ten seconds still drops a token at its exp.
    patient = KeyAuthenticator(sessions, pepper, tokens=harness.state.tokens, cache_ttl=10)  # type: ignore[arg-type]
    async with harness.sessionmaker() as session:
        key_row = await session.scalar(select(ApiKey).where(ApiKey.id == subject.key_id))
        assert key_row is not None
        short = await mint_token(
            session,
            harness.state.tokens,
            TEST_ACTOR,
            grant_type="client_credentials",
            scopes=frozenset({"predict"}),
            api_key_id=key_row.id,
            tenant_id=key_row.tenant_id,
            not_after=utcnow() + timedelta(seconds=2),
        )
        await session.commit()
    await patient.authenticate(short.access_token)
    await asyncio.sleep(short.expires_in + 0.1)
    with pytest.raises(Unauthenticated):
        await patient.authenticate(short.access_token)


def _claims(config: TokenConfig) -> dict[str, object]:
    now = int(time.time())
    return {
        "iss": config.issuer,
        "aud": config.audience,
        "sub": f"key:{uuid.uuid4()}",
        "jti": str(uuid.uuid4()),
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "scope": "predict",
        "tid": None,
    }


def test_a_rotated_secret_verifies_only_while_it_is_listed_as_previous() -> None:
    old, new = b"o" * 40, b"n" * 40
    options = {"issuer": "modelgate", "audience": "modelgate-api", "ttl_seconds": 900}
    before = TokenConfig.build(old, **options)  # type: ignore[arg-type]
    token = sign_token(before, _claims(before))
    assert jwt.get_unverified_header(token)["kid"] == key_id(old) != key_id(new)
    assert old.decode() not in key_id(old)
    during = TokenConfig.build(new, [old], **options)  # type: ignore[arg-type]
    assert verify_token(during, token).scopes == {"predict"}
    # New tokens are signed with the new secret only.
    assert jwt.get_unverified_header(sign_token(during, _claims(during)))["kid"] == key_id(new)
    after = TokenConfig.build(new, **options)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated):
        verify_token(after, token)


def test_production_refuses_short_previous_jwt_secrets(tmp_path: Path) -> None:
    values = {
        "env": "production",
        "redis_url": "redis://127.0.0.1:6379/0",
        "var_dir": tmp_path,
        "key_pepper": "p" * 40,
        "jwt_secret": "j" * 40,
    }
    check_production(Settings(_env_file=None, **values, jwt_previous_secrets="o" * 40), 1)  # type: ignore[call-arg]
    weak = Settings(_env_file=None, **values, jwt_previous_secrets="o" * 40 + ",short")  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="PREVIOUS_SECRETS"):
        check_production(weak, 1)
    assert load_secrets(weak).jwt_previous_secrets == (b"o" * 40, b"short")
