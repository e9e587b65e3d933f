"""The edge of the service (issue 9): failed credentials are throttled per client address before
they reach the database, the client address is the socket's peer unless a trusted proxy vouches
for another, and a credential is checked before a request's body is read.

Each test comes from addresses of its own (the throttle's counts live on a Redis shared by every
test), on an app with a small failure budget and one trusted proxy network."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import event, select

from auth.errors import DependencyUnavailable, Unauthenticated
from auth.identity.authn import KeyAuthenticator
from auth.identity.keys import generate_key
from auth.models import AccessToken, utcnow
from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    make_settings,
    only_on,
    running_app,
    update_key,
    wrong_checksum,
)
from tests.security.test_dependency_failures import PrivateRedis, private_redis  # noqa: F401
from tests.security.test_jwt import _real_token, _sign
from tests.security.test_key_cache import GatedSessions

PREDICT = "/api/v1/predict"
ME = "/api/v1/me"
TOKEN = "/api/v1/auth/token"
BUDGET = 6
PROXIES = "10.250.0.0/16"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def edge(
    backend: Backend, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    """The app with a failure budget of ``BUDGET`` a minute per address and ``PROXIES``
    trusted."""
    settings = make_settings(
        backend,
        served_model_dir,
        tmp_path_factory.mktemp("var"),
        auth_failures_per_address=f"{BUDGET}/minute",
        trusted_proxies=PROXIES,
    )
    async with running_app(settings, backend) as running:
        yield running


def client_address() -> str:
    """An address no other test uses, outside the trusted proxies."""
    a, b, c = uuid.uuid4().bytes[:3]
    return f"172.{16 + a % 16}.{b}.{c}"


def proxy_address() -> str:
    """An address among the trusted proxies."""
    b, c = uuid.uuid4().bytes[:2]
    return f"10.250.{b}.{c}"


def client_from(app: Harness, address: str) -> httpx.AsyncClient:
    """A client whose requests reach the app from ``address`` (the socket's peer)."""
    asgi = app.client._transport.app  # type: ignore[attr-defined]
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi, client=(address, 40000)),
        base_url="http://testserver",
    )


@contextmanager
def key_lookups(app: Harness) -> Iterator[list[str]]:
    """The credential lookups the app sends to its database meanwhile (SELECTs of api_key or
    access_token), as a list that grows."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        text = statement.lstrip().upper()
        if text.startswith("SELECT") and ("FROM API_KEY" in text or "FROM ACCESS_TOKEN" in text):
            seen.append(statement)

    engine = app.state.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def assert_throttled(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "auth-throttled"
    assert 1 <= int(response.headers["retry-after"]) <= 60


async def predict(client: httpx.AsyncClient, credential: str, **headers: str) -> httpx.Response:
    return await client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers={**bearer(credential), **headers}
    )


async def test_unknown_keys_from_one_address_cost_at_most_the_budget_in_lookups_then_429(
    edge: Harness,
) -> None:
    """Well-formed keys that match nothing each cost a lookup until the address's budget is
    spent; then every uncached credential from it is 429 auth-throttled without a query,
    whatever its kind, while another address is unaffected."""
    async with client_from(edge, client_address()) as client:
        with key_lookups(edge) as lookups:
            for _ in range(BUDGET):
                assert (await predict(client, generate_key())).status_code == 401
            assert len(lookups) == BUDGET
            for credential in (generate_key(), wrong_checksum(generate_key()), "not-a-key"):
                assert_throttled(await predict(client, credential))
            assert len(lookups) == BUDGET
    async with client_from(edge, client_address()) as other:
        assert (await predict(other, generate_key())).status_code == 401


async def test_concurrent_guesses_from_one_address_never_exceed_the_budget_in_lookups(
    edge: Harness,
) -> None:
    """A burst of distinct guesses sent at once cannot all pass before the first is counted:
    the checks in flight for one address never outnumber the failures it has left."""
    async with client_from(edge, client_address()) as client:
        with key_lookups(edge) as lookups:
            responses = await asyncio.gather(
                *[predict(client, generate_key()) for _ in range(5 * BUDGET)]
            )
    statuses = [response.status_code for response in responses]
    assert set(statuses) == {401, 429}
    assert statuses.count(401) == len(lookups) <= BUDGET
    assert edge.state.authenticator._throttle.checks_in_flight == 0  # type: ignore[union-attr]


@only_on("postgres")  # the backend with Redis, which the two instances share
async def test_a_burst_spread_over_two_instances_gets_the_budget_in_total(
    edge: Harness, served_model_dir: Path, tmp_path: Path
) -> None:
    """Distinct guesses from one address sent at once to two app instances sharing Redis (as
    two workers or two replicas behind a load balancer): each check takes one of the address's
    failures atomically before its lookup, so the two together look up and refuse with 401
    exactly the budget, not the budget each; after it both answer 429."""
    settings = make_settings(
        edge.backend,
        served_model_dir,
        tmp_path,
        auth_failures_per_address=f"{BUDGET}/minute",
        trusted_proxies=PROXIES,
    )
    address = client_address()
    async with (
        running_app(settings, edge.backend) as other,
        client_from(edge, address) as first,
        client_from(other, address) as second,
    ):
        with key_lookups(edge) as lookups, key_lookups(other) as other_lookups:
            responses = await asyncio.gather(
                *[
                    predict(client, generate_key())
                    for _ in range(2 * BUDGET)
                    for client in (first, second)
                ]
            )
        statuses = [response.status_code for response in responses]
        assert statuses.count(401) == BUDGET, statuses
        assert statuses.count(429) == 3 * BUDGET, statuses
        assert len(lookups) + len(other_lookups) == BUDGET
        for client in (first, second):
            assert_throttled(await predict(client, generate_key()))
        for app in (edge, other):
            assert app.state.authenticator._throttle.checks_in_flight == 0  # type: ignore[union-attr]


async def test_a_burst_with_one_uncached_live_key_is_not_taken_for_guessing(
    edge: Harness,
) -> None:
    """Many concurrent requests with the same key that this worker has not verified yet share
    one lookup and hold one of the address's failures, however many they are."""
    _, key = await create_tenant_with_key(edge)
    async with client_from(edge, client_address()) as client:
        with key_lookups(edge) as lookups:
            responses = await asyncio.gather(*[predict(client, key) for _ in range(5 * BUDGET)])
    assert [response.status_code for response in responses] == [200] * (5 * BUDGET)
    assert len(lookups) == 1


async def test_live_credentials_give_back_the_failure_their_check_reserved(
    edge: Harness,
) -> None:
    """Each uncached credential reserves one of the address's failures before its lookup; a
    live one gives it back: more live keys than the budget, one after the other from one
    address, are all served, and the budget is still whole for failures afterwards."""
    keys = [(await create_tenant_with_key(edge))[1] for _ in range(BUDGET + 2)]
    throttle = edge.state.authenticator._throttle
    assert throttle is not None
    async with client_from(edge, client_address()) as client:
        for key in keys:
            assert (await predict(client, key)).status_code == 200
        for _ in range(100):  # the give-backs run in the background
            if not throttle._giving_back:
                break
            await asyncio.sleep(0.01)
        for _ in range(BUDGET):
            assert (await predict(client, generate_key())).status_code == 401
        assert_throttled(await predict(client, generate_key()))


async def test_every_kind_of_failed_credential_counts_against_the_address(
    edge: Harness,
) -> None:
    """Bad checksum, unknown key, revoked key, expired key, bad JWT signature and unknown jti
    each spend one failure of the address's budget; the next uncached credential, a live key
    included, is 429."""
    _, revoked = await create_tenant_with_key(edge)
    await update_key(edge, revoked, revoked_at=utcnow() - timedelta(minutes=1))
    _, expired = await create_tenant_with_key(edge)
    await update_key(edge, expired, expires_at=utcnow() - timedelta(minutes=1))
    _, claims = await _real_token(edge)
    key = generate_key()
    failures = {
        "bad checksum": wrong_checksum(key),
        "unknown key": generate_key(),
        "revoked key": revoked,
        "expired key": expired,
        "bad JWT signature": _sign(edge, claims)[:-4] + "AAAA",
        "unknown jti": _sign(edge, {**claims, "jti": str(uuid.uuid4())}),
    }
    assert len(failures) == BUDGET
    _, live = await create_tenant_with_key(edge)
    async with client_from(edge, client_address()) as client:
        for kind, credential in failures.items():
            response = await client.get(ME, headers=bearer(credential))
            assert response.status_code == 401, kind
        assert_throttled(await client.get(ME, headers=bearer(live)))


async def test_a_cached_key_keeps_working_from_a_throttled_address(edge: Harness) -> None:
    """A tenant behind the attacker's NAT keeps a key that this worker has verified (and
    remembers for at most a second); a key it has not verified is refused with 429 there, and
    costs no lookup."""
    _, live = await create_tenant_with_key(edge)
    _, uncached = await create_tenant_with_key(edge)
    nat = client_address()
    async with client_from(edge, nat) as attacker:
        for _ in range(BUDGET):
            assert (await predict(attacker, generate_key())).status_code == 401
        assert_throttled(await predict(attacker, generate_key()))
    async with (
        client_from(edge, client_address()) as elsewhere,
        client_from(edge, nat) as tenant,
    ):
        # Verified from another address (a lookup) and so cached; at once from the NAT.
        assert (await predict(elsewhere, live)).status_code == 200
        with key_lookups(edge) as lookups:
            assert (await predict(tenant, live)).status_code == 200
            assert_throttled(await predict(tenant, uncached))
        assert lookups == []


async def test_forwarded_for_from_an_untrusted_peer_changes_nothing(edge: Harness) -> None:
    """SECURITY.md line 13: X-Forwarded-For from a peer that is not a trusted proxy is
    ignored: failures with a new forged address each time all count against the peer, and the
    audit trail records the peer."""
    peer = client_address()
    async with client_from(edge, peer) as client:
        for i in range(BUDGET):
            forged = {"X-Forwarded-For": f"198.51.100.{i}"}
            assert (await predict(client, generate_key(), **forged)).status_code == 401
        assert_throttled(await predict(client, generate_key(), **{"X-Forwarded-For": "1.2.3.4"}))
    _, key = await create_tenant_with_key(edge)
    assert await minted_from(edge, key, peer=client_address(), forwarded="192.0.2.44") != (
        "192.0.2.44"
    )


async def minted_from(app: Harness, key: str, *, peer: str, forwarded: str) -> str | None:
    """Mint a token for ``key`` from ``peer`` with ``X-Forwarded-For: forwarded``; the client
    address its record (and its audit event) names."""
    async with client_from(app, peer) as client:
        response = await client.post(
            TOKEN,
            data={"grant_type": "client_credentials", "client_secret": key},
            headers={"X-Forwarded-For": forwarded},
        )
    assert response.status_code == 200, response.text
    jti = _real_claims(response.json()["access_token"])["jti"]
    async with app.sessionmaker() as session:
        record = await session.scalar(select(AccessToken).where(AccessToken.jti == uuid.UUID(jti)))
    assert record is not None
    return record.client_addr


def _real_claims(token: str) -> dict[str, Any]:
    import jwt

    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


async def test_a_trusted_proxy_forwards_the_rightmost_untrusted_address(edge: Harness) -> None:
    """SECURITY.md line 13: through a trusted proxy (and a second one behind it), the address
    throttled and audited is the rightmost X-Forwarded-For entry that is not a trusted proxy;
    another client of the same proxy is not throttled."""
    proxy, inner_proxy = proxy_address(), proxy_address()
    attacker, neighbour = client_address(), client_address()
    async with client_from(edge, proxy) as via_proxy:
        for _ in range(BUDGET):
            chain = {"X-Forwarded-For": f"{attacker}, {inner_proxy}"}
            assert (await predict(via_proxy, generate_key(), **chain)).status_code == 401
        assert_throttled(await predict(via_proxy, generate_key(), **{"X-Forwarded-For": attacker}))
        response = await predict(via_proxy, generate_key(), **{"X-Forwarded-For": neighbour})
        assert response.status_code == 401
    # The proxy's own address was never counted.
    async with client_from(edge, proxy) as direct:
        assert (await predict(direct, generate_key())).status_code == 401
    _, key = await create_tenant_with_key(edge)
    assert await minted_from(edge, key, peer=proxy, forwarded=f"203.0.113.9, {neighbour}") == (
        neighbour
    )


async def test_a_spoofed_leftmost_entry_through_a_trusted_proxy_does_not_help(
    edge: Harness,
) -> None:
    """SECURITY.md line 13: a client behind a trusted proxy that writes X-Forwarded-For itself
    only adds entries to the left of the one the proxy appends: rotating them changes nothing."""
    proxy, attacker = proxy_address(), client_address()
    async with client_from(edge, proxy) as via_proxy:
        for i in range(BUDGET):
            spoofed = {"X-Forwarded-For": f"198.51.100.{i}, {attacker}"}
            assert (await predict(via_proxy, generate_key(), **spoofed)).status_code == 401
        spoofed = {"X-Forwarded-For": f"{client_address()}, {proxy_address()}, {attacker}"}
        assert_throttled(await predict(via_proxy, generate_key(), **spoofed))


async def asgi_post(
    app: Harness, path: str, headers: dict[str, str], declared_length: int, method: str = "POST"
) -> tuple[int, dict[str, str], int]:
    """``method`` to the app with ``Content-Length: declared_length`` and a body that is never
    there: the status, the response headers, and how many times the app asked for the body."""
    asgi = app.client._transport.app  # type: ignore[attr-defined]
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"{", "more_body": True}

    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(declared_length).encode()),
        *[(name.lower().encode(), value.encode()) for name, value in headers.items()],
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw_headers,
        "client": (client_address(), 40000),
        "server": ("testserver", 80),
    }
    await asgi(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    response_headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], response_headers, reads


async def test_a_bad_or_missing_credential_is_refused_before_a_large_body_is_read(
    edge: Harness,
) -> None:
    """A prediction or an operator's change with no credential, a bad one, or a throttled
    address, and 10 MB announced (over the limit, or under a larger one), is answered before
    the app reads a byte of the body, and the connection is closed; an authenticated request
    over the limit is still 413, also without reading it."""
    ten_mb = 10 * 1024 * 1024
    admin = await create_admin_key(edge)
    for path in (PREDICT, f"{PREDICT}/batch", "/api/v1/admin/tenants", "/api/v1/me/keys"):
        for headers in ({}, bearer(generate_key()), bearer("garbage"), bearer("x" * 9000)):
            status, response_headers, reads = await asgi_post(edge, path, headers, ten_mb)
            assert (status, reads) == (401, 0), (path, headers.keys())
            assert response_headers["connection"] == "close"
            assert response_headers["www-authenticate"] == "Bearer"
    _, key = await create_tenant_with_key(edge)
    for path, credential in ((PREDICT, key), ("/api/v1/admin/tenants", admin)):
        status, response_headers, reads = await asgi_post(edge, path, bearer(credential), ten_mb)
        assert (status, reads) == (413, 0), path
        assert response_headers["content-type"] == "application/problem+json"
        assert response_headers["connection"] == "close"


async def test_every_route_that_takes_a_body_and_a_credential_checks_it_first(
    edge: Harness,
) -> None:
    """The OpenAPI document's every operation with a request body and a security requirement
    answers 401 to a request without a credential before reading its body."""
    document = (await edge.client.get("/openapi.json")).json()
    checked = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method != "post" and method != "patch":
                continue
            if "requestBody" not in operation or not operation.get("security"):
                continue
            concrete = path.replace("{tenant_id}", str(uuid.uuid4())).replace(
                "{key_id}", str(uuid.uuid4())
            )
            status, _, reads = await asgi_post(edge, concrete, {}, 10 * 1024 * 1024, method.upper())
            assert (status, reads) == (401, 0), f"{method.upper()} {path}"
            checked.append(f"{method.upper()} {path}")
    assert "POST /api/v1/predict" in checked
    assert "POST /api/v1/admin/tenants" in checked


async def test_the_rate_limit_still_counts_each_request_once(
    edge: Harness,
) -> None:
    """Authenticated before the body and again (from the request's context) by the dependency:
    the key's rate limit is hit once per request."""
    _, key = await create_tenant_with_key(edge, rate_limit="3/minute")
    async with client_from(edge, client_address()) as client:
        remaining = [(await predict(client, key)).headers["x-ratelimit-remaining"] for _ in "abc"]
        assert remaining == ["2", "1", "0"]
        assert (await predict(client, key)).status_code == 429


async def test_the_failure_throttle_fails_closed_when_redis_is_down(
    private_redis: PrivateRedis,  # noqa: F811
    served_model_dir: Path,
    tmp_path: Path,
) -> None:
    """Redis unreachable: an uncached credential is 503 with Retry-After (the throttle cannot
    say), never a lookup the throttle did not allow, and never a 500."""
    from api.cli import upgrade_database

    backend = Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", private_redis.url)
    await asyncio.to_thread(upgrade_database, backend.database_url)
    settings = make_settings(
        backend, served_model_dir, tmp_path, auth_failures_per_address=f"{BUDGET}/minute"
    )
    async with running_app(settings, backend) as app:
        assert (await predict(app.client, generate_key())).status_code == 401
        private_redis.stop()
        with key_lookups(app) as lookups:
            down = await predict(app.client, generate_key())
        assert down.status_code == 503, down.text
        assert int(down.headers["retry-after"]) >= 1
        assert lookups == []
        private_redis.start()
        assert (await predict(app.client, generate_key())).status_code == 401


async def test_failed_logins_count_against_the_client_a_trusted_proxy_names(
    edge: Harness,
) -> None:
    """SECURITY.md line 8 behind a trusted proxy: failed logins at /auth/token are throttled
    per forwarded client (not per proxy, and not per spoofed entry); a key that fails there
    also spends the client's failed-credential budget, as on any other route."""
    per_address = int(edge.state.settings.login_failures_per_address.split("/")[0])
    proxy, attacker = proxy_address(), client_address()

    def wrong() -> dict[str, str]:
        # A new account each time: only the address's budget is under test.
        email = f"{uuid.uuid4().hex}@example.com"
        return {"grant_type": "password", "username": email, "password": "guess!"}

    async with client_from(edge, proxy) as via_proxy:
        for i in range(per_address):
            forwarded = {"X-Forwarded-For": f"198.51.100.{i}, {attacker}"}
            response = await via_proxy.post(TOKEN, data=wrong(), headers=forwarded)
            assert response.status_code == 401
        throttled = await via_proxy.post(
            TOKEN, data=wrong(), headers={"X-Forwarded-For": f"{client_address()}, {attacker}"}
        )
        assert throttled.status_code == 429
        assert throttled.json()["type"] == "login-throttled"
        other = await via_proxy.post(
            TOKEN, data=wrong(), headers={"X-Forwarded-For": client_address()}
        )
        assert other.status_code == 401

        guesser = {"X-Forwarded-For": client_address()}
        for _ in range(BUDGET):
            form = {"grant_type": "client_credentials", "client_secret": generate_key()}
            response = await via_proxy.post(TOKEN, data=form, headers=guesser)
            assert response.status_code == 401
        assert_throttled(await via_proxy.get(ME, headers={**bearer(generate_key()), **guesser}))


async def test_distinct_lookups_in_flight_are_bounded(edge: Harness) -> None:
    """Garbage from many addresses cannot grow the single-flight map without bound: past
    ``max_lookups`` distinct credentials being looked up, a miss is 503 at once; a request for
    a credential already being looked up still joins it; the map empties as lookups end."""
    sessions = GatedSessions(edge.sessionmaker)
    authenticator = KeyAuthenticator(
        sessions,  # type: ignore[arg-type]
        edge.state.secrets.key_pepper,
        max_lookups=3,
    )
    keys = [generate_key() for _ in range(3)]
    waiting = [asyncio.ensure_future(authenticator.authenticate(key)) for key in keys]
    await asyncio.sleep(0.05)  # the three lookups wait at the gate
    with pytest.raises(DependencyUnavailable):
        await authenticator.authenticate(generate_key())
    joined = asyncio.ensure_future(authenticator.authenticate(keys[0]))
    await asyncio.sleep(0.01)
    sessions.gate.set()
    for outcome in await asyncio.gather(*waiting, joined, return_exceptions=True):
        assert isinstance(outcome, Unauthenticated)
    assert sessions.opened == 3
    assert authenticator._lookups == {}
