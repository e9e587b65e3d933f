"""SECURITY.md lines 4-8: forged, malformed and revoked JWTs, key-locating headers, and brute
force of /auth/token. Each forged token below differs from a token the server accepts (the
control, checked first) by the one thing the line is about, so every test can fail."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import select

import auth.identity.admins
from auth.db import create_engine, create_sessionmaker
from auth.identity.admins import create_admin_user
from auth.identity.keys import generate_key
from auth.identity.tokens import REQUIRED_CLAIMS, TokenConfig, key_id, mint_token
from auth.models import ApiKey, AuditEvent
from tests.conftest import (
    IRIS_SETOSA,
    TEST_ACTOR,
    Backend,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    new_postgres_database,
    only_on,
    refused_within,
    unique,
)
from tests.e2e.servers import run_cli, serve, server_environment
from tests.parallel import quiet_from_here

ME = "/api/v1/me"
TOKEN = "/api/v1/auth/token"


def _client_from(harness: Harness, address: str) -> httpx.AsyncClient:
    app = harness.client._transport.app  # type: ignore[attr-defined]
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(address, 4000)),
        base_url="http://testserver",
    )


def _fresh_address() -> str:
    a, b, c = uuid.uuid4().bytes[:3]
    return f"10.{a}.{b}.{c}"


async def _real_token(harness: Harness) -> tuple[str, dict[str, Any]]:
    """A token the server accepts, and its claims."""
    _, key = await create_tenant_with_key(harness)
    async with _client_from(harness, _fresh_address()) as client:
        response = await client.post(
            TOKEN, data={"grant_type": "client_credentials", "client_secret": key}
        )
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    return token, jwt.decode(token, options={"verify_signature": False})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _assemble(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        (_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature))
    )


def _hmac_signed(
    header: dict[str, Any], claims: dict[str, Any], secret: bytes, digest: str = "sha256"
) -> str:
    """A JWS built by hand (PyJWT's encoder refuses some of the malformed claims tested)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.digest(secret, signing_input.encode(), digest)
    return f"{signing_input}.{_b64(signature)}"


def _sign(harness: Harness, claims: dict[str, Any], **header: Any) -> str:
    """Claims signed with the server's own secret, under its own kid unless ``header`` says
    otherwise."""
    secret = harness.state.secrets.jwt_secret
    return _hmac_signed(
        {"alg": "HS256", "typ": "JWT", "kid": key_id(secret), **header}, claims, secret
    )


async def _status(harness: Harness, token: str) -> int:
    response = await harness.client.get(ME, headers=bearer(token))
    if response.status_code == 401:
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["content-type"] == "application/problem+json"
    return response.status_code


async def test_jwt_with_alg_none_a_foreign_secret_or_a_tampered_payload_is_refused(
    harness: Harness,
) -> None:
    """SECURITY.md line 4: alg none, HS256 under another secret (even with our kid), our
    secret under another algorithm, and a payload changed under a valid signature are 401."""
    token, claims = await _real_token(harness)
    kid = key_id(harness.state.secrets.jwt_secret)
    assert await _status(harness, token) == 200
    assert await _status(harness, _sign(harness, claims)) == 200  # the control
    header_b64, _, signature = token.split(".")
    escalated = {**claims, "scope": "predict usage:read keys:manage admin"}
    forged = {
        "alg none": _assemble({"alg": "none", "typ": "JWT", "kid": kid}, claims),
        "alg None": _assemble({"alg": "None", "kid": kid}, claims),
        "alg none, our signature kept": token.replace(header_b64, _b64(b'{"alg":"none"}'), 1),
        "another secret": jwt.encode(
            claims, "an attacker's secret of 32 bytes!", algorithm="HS256", headers={"kid": kid}
        ),
        "our secret, HS512": _hmac_signed(
            {"alg": "HS512", "kid": kid}, claims, harness.state.secrets.jwt_secret, "sha512"
        ),
        "tampered payload": f"{header_b64}.{_b64(json.dumps(escalated).encode())}.{signature}",
        "truncated signature": token[:-4],
        "not base64": token.replace(".", ".!!!", 1),
    }
    for name, candidate in forged.items():
        assert await _status(harness, candidate) == 401, name


async def test_jwt_expired_not_yet_valid_or_with_wrong_claims_is_refused(harness: Harness) -> None:
    """SECURITY.md line 5: expired, not yet valid, wrong aud, wrong iss, an iss sharing a
    prefix, a missing exp, iat, nbf, sub, aud, iss or jti, are each 401."""
    _, claims = await _real_token(harness)
    assert await _status(harness, _sign(harness, claims)) == 200  # the control
    now = int(time.time())
    issuer, audience = claims["iss"], claims["aud"]
    variants: dict[str, dict[str, Any]] = {
        f"missing {claim}": {k: v for k, v in claims.items() if k != claim}
        for claim in REQUIRED_CLAIMS
    }
    variants.update(
        {
            "expired": {**claims, "exp": now - 60},
            "not yet valid": {**claims, "nbf": now + 60},
            "issued in the future": {**claims, "iat": now + 60},
            "wrong aud": {**claims, "aud": "someone-else"},
            "aud list without ours": {**claims, "aud": ["someone-else"]},
            "aud list with ours": {**claims, "aud": [audience, "someone-else"]},
            "aud prefix": {**claims, "aud": audience[:-1]},
            "wrong iss": {**claims, "iss": "https://evil.example"},
            "iss with a suffix": {**claims, "iss": issuer + "-evil"},
            "iss prefix": {**claims, "iss": issuer[:-1]},
            "iss first letter": {**claims, "iss": issuer[0]},
            "iss as a list": {**claims, "iss": [issuer]},
            "sub not a string": {**claims, "sub": 12345},
            "sub of another key": {**claims, "sub": f"key:{uuid.uuid4()}"},
            "huge exp": {**claims, "exp": 10**400},
            "exp a string": {**claims, "exp": "tomorrow"},
            "jti not a uuid": {**claims, "jti": "../../etc"},
            "unknown jti": {**claims, "jti": str(uuid.uuid4())},
        }
    )
    assert set(REQUIRED_CLAIMS) == {"exp", "iat", "nbf", "sub", "aud", "iss", "jti"}
    for name, variant in variants.items():
        assert await _status(harness, _sign(harness, variant)) == 401, name


class _CountingHandler(BaseHTTPRequestHandler):
    requests: list[str] = []  # noqa: RUF012 (shared with the test on purpose)

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        body = b'{"keys": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def key_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that would hand out keys, and the list of requests it got."""
    _CountingHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _CountingHandler.requests
    finally:
        server.shutdown()
        server.server_close()


async def test_jwt_kid_naming_a_file_or_sql_and_key_urls_are_refused_and_never_used(
    harness: Harness, tmp_path: Path, key_server: tuple[str, list[str]]
) -> None:
    """SECURITY.md line 6: a kid that is a file path (of a file whose content signed the token)
    or SQL, and jku/jwk/x5u/x5c headers (even on a token our secret signed), are 401, and
    nothing is read, fetched or looked up from them."""
    _, claims = await _real_token(harness)
    assert await _status(harness, _sign(harness, claims)) == 200  # the control
    attacker = "an attacker's secret of 32 bytes!"
    secret_file = tmp_path / "secret"
    secret_file.write_text(attacker)
    url, fetched = key_server
    jwk = {"kty": "oct", "k": _b64(attacker.encode()), "kid": "attacker"}

    def by_attacker(**header: Any) -> str:
        return _hmac_signed({"alg": "HS256", **header}, claims, attacker.encode())

    forged = {
        "kid is a file": by_attacker(kid=str(secret_file)),
        "kid is a relative path": by_attacker(kid="../" * 12 + str(secret_file).lstrip("/")),
        "kid is /dev/null": _hmac_signed({"alg": "HS256", "kid": "/dev/null"}, claims, b""),
        "kid is sql": _sign(harness, claims, kid="' OR '1'='1"),
        "kid drops a table": _sign(harness, claims, kid="x'; DROP TABLE access_token; --"),
        "kid is a url": by_attacker(kid=f"{url}/kid"),
        "kid is a number": _sign(harness, claims, kid=7),
        "no kid": _hmac_signed({"alg": "HS256"}, claims, harness.state.secrets.jwt_secret),
        "jku, our signature": _sign(harness, claims, jku=f"{url}/jwks.json"),
        "x5u, our signature": _sign(harness, claims, x5u=f"{url}/cert.pem"),
        "jwk, our signature": _sign(harness, claims, jwk=jwk),
        "x5c, our signature": _sign(harness, claims, x5c=["MIIB"]),
        "jku to the attacker's key": by_attacker(kid="attacker", jku=f"{url}/jwks.json"),
        "embedded jwk of the attacker": by_attacker(kid="attacker", jwk=jwk),
    }
    for name, candidate in forged.items():
        assert await _status(harness, candidate) == 401, name
    assert fetched == []
    # The SQL was never SQL: the table is there and the control still passes.
    assert await _status(harness, _sign(harness, claims)) == 200


async def test_jwt_minted_from_a_key_fails_within_a_second_of_the_key_revocation(
    harness: Harness,
) -> None:
    """SECURITY.md line 7: a JWT minted from a key that is then revoked is 401 within the
    credential cache's second, though the token itself has not expired."""
    token, claims = await _real_token(harness)
    admin = await create_admin_key(harness)
    served = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(token)
    )
    assert served.status_code == 200  # cached now
    key_id_ = claims["sub"].removeprefix("key:")
    revoked = await harness.client.post(
        f"/api/v1/admin/keys/{key_id_}/revoke", headers=bearer(admin)
    )
    assert revoked.status_code == 200
    await refused_within(harness, token, promised=1.0)
    assert claims["exp"] > time.time() + 60
    # And the revoked key can mint no new token.
    async with harness.sessionmaker() as session:
        key = await session.get(ApiKey, uuid.UUID(key_id_))
        assert key is not None
        assert key.revoked_at is not None


async def test_brute_force_of_the_token_endpoint_is_throttled_per_address_and_account(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SECURITY.md line 8: after a small number of failed logins from one address, or for one
    account from many, /auth/token answers 429 with Retry-After before looking anything up or
    verifying any password, even for the right credential; the burst is audited once."""
    settings = harness.state.settings
    per_address = int(settings.login_failures_per_address.split("/")[0])
    per_account = int(settings.login_failures_per_account.split("/")[0])
    assert (per_address, per_account) == (20, 5)
    _, good_key = await create_tenant_with_key(harness)
    address = _fresh_address()
    async with _client_from(harness, address) as client:
        for _ in range(per_address):
            # A well-formed key (valid checksum) that does not exist: a database lookup each.
            failed = await client.post(
                TOKEN, data={"grant_type": "client_credentials", "client_secret": generate_key()}
            )
            assert failed.status_code == 401
        throttled = await client.post(
            TOKEN, data={"grant_type": "client_credentials", "client_secret": good_key}
        )
    assert throttled.status_code == 429, throttled.text
    assert throttled.headers["content-type"] == "application/problem+json"
    assert 1 <= int(throttled.headers["retry-after"]) <= 60
    # Another address with the same good key is not affected: a success resets nothing and
    # one address's failures are its own.
    async with _client_from(harness, _fresh_address()) as client:
        fine = await client.post(
            TOKEN, data={"grant_type": "client_credentials", "client_secret": good_key}
        )
    assert fine.status_code == 200

    email = f"{unique('brute')}@example.com"
    async with harness.sessionmaker() as session:
        await create_admin_user(session, TEST_ACTOR, email, "the right password")
        await session.commit()
    verifications = 0
    original = auth.identity.admins.verify_password

    async def counting(password: str, password_hash: str) -> bool:
        nonlocal verifications
        verifications += 1
        return await original(password, password_hash)

    monkeypatch.setattr(auth.identity.admins, "verify_password", counting)
    for _ in range(per_account):
        async with _client_from(harness, _fresh_address()) as client:
            wrong = await client.post(
                TOKEN, data={"grant_type": "password", "username": email, "password": "guess!"}
            )
        assert wrong.status_code == 401
    assert verifications == per_account
    async with _client_from(harness, _fresh_address()) as client:
        right = await client.post(
            TOKEN,
            data={"grant_type": "password", "username": email, "password": "the right password"},
        )
    assert right.status_code == 429
    assert verifications == per_account  # refused before any password was verified

    async with harness.sessionmaker() as session:
        events = (
            await session.scalars(
                select(AuditEvent).where(AuditEvent.action == "auth.login_throttled")
            )
        ).all()
    by_address = [event for event in events if event.detail["address"] == address]
    by_account = [event for event in events if event.detail["account"] == f"user:{email}"]
    assert len(by_address) == 1
    assert by_address[0].detail["budgets"] == ["address"]
    assert len(by_account) == 1
    assert by_account[0].detail["budgets"] == ["account"]
    for event in events:
        assert "password" not in json.dumps(event.detail)
        assert good_key not in json.dumps(event.detail)


def _wait_for_workers(log_path: Path, count: int, timeout: float = 120) -> None:
    """Wait until ``count`` workers have finished starting: the server is ready as soon as one
    is, and on a loaded machine requests fired at that one starve the other's start (uvicorn
    then kills it as unresponsive and starts it again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = set()
        for line in log_path.read_text().splitlines():
            if "Application startup complete" in line:
                started.add(json.loads(line)["pid"])
        if len(started) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} workers started within {timeout} s")


# Two workers need Postgres and Redis.
@only_on("postgres")
@pytest.mark.e2e
@pytest.mark.parametrize(
    "change",
    [
        "UPDATE api_key SET revoked_at = now() WHERE tenant_id = '{tenant}'",
        "UPDATE access_token SET revoked_at = now() WHERE jti = '{jti}'",
    ],
    ids=["revoked-key", "revoked-token"],
)
def test_jwt_is_refused_within_a_second_on_both_workers_after_revocation(
    backend: Backend, served_model_dir: Path, tmp_path: Path, change: str
) -> None:
    """SECURITY.md line 7, across processes: a JWT cached by both workers of a real server is
    refused by both within 1 second of its key's revocation, or of its own."""
    from tests.e2e.test_key_cache_workers import (
        _execute,
        _until_both_workers,
        refused_on_both_workers,
    )

    models = tmp_path / "models"
    shutil.copytree(served_model_dir, models)
    secret = "e2e-jwt-secret-" + "z" * 32
    with new_postgres_database() as url:
        environment = server_environment(
            url,
            backend.redis_url,
            models,
            tmp_path / "var",
            MODELGATE_JWT_SECRET=secret,
            MODELGATE_LOG_LEVEL="INFO",
            # Every test's failed credentials come from 127.0.0.1 and share Redis: this one's
            # 401s must not be turned into 429s by the others' (as in tests/e2e/conftest.py).
            MODELGATE_AUTH_FAILURES_PER_ADDRESS="999999/minute",
            # Polled until refused, up to 5 s (tests.promises): no rate limit may answer first.
            MODELGATE_DEFAULT_RATE_LIMIT="1000000/minute",
        )
        run_cli(environment, tmp_path, "db", "upgrade")
        tenant = json.loads(
            run_cli(environment, tmp_path, "tenants", "create", "--name", "jwt").stdout
        )
        run_cli(environment, tmp_path, "keys", "issue", "--tenant", tenant["id"])

        async def mint() -> tuple[str, uuid.UUID]:
            # Minted in the database with the server's secret rather than at /auth/token: this
            # test is about revocation, not about the login throttle that other tests exercise
            # from this same address.
            engine = create_engine(url)
            try:
                async with create_sessionmaker(engine)() as session:
                    key = await session.scalar(
                        select(ApiKey).where(ApiKey.tenant_id == uuid.UUID(tenant["id"]))
                    )
                    assert key is not None
                    config = TokenConfig.build(
                        secret.encode(),
                        issuer="modelgate",
                        audience="modelgate-api",
                        ttl_seconds=900,
                    )
                    minted = await mint_token(
                        session,
                        config,
                        TEST_ACTOR,
                        grant_type="client_credentials",
                        scopes=key.scope_set,
                        api_key_id=key.id,
                        tenant_id=key.tenant_id,
                    )
                    await session.commit()
                    return minted.access_token, minted.jti
            finally:
                await engine.dispose()

        token, jti = asyncio.run(mint())
        log_path = tmp_path / "server.log"
        with serve(environment, tmp_path, workers=2, log_path=log_path) as port:
            _wait_for_workers(log_path, 2)
            quiet_from_here()
            assert len(_until_both_workers(port, token, log_path, 200)) == 2
            asyncio.run(_execute(url, change.format(tenant=tenant["id"], jti=jti)))
            refused_on_both_workers(port, token, log_path, 401)
