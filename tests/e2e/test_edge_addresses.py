"""The client address and the failed-credential throttle on real ``modelgate serve`` processes
(two workers sharing Postgres and Redis): X-Forwarded-For changes nothing unless a trusted proxy
sends it, and a credential is refused before the body it announces is sent.

Each test's clients connect from loopback addresses of their own (the whole of 127.0.0.0/8 is
this machine), so the throttle's counts, on a Redis shared by every test and run, are theirs."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import httpx
import jwt
import pytest

from auth.identity.keys import generate_key
from tests.conftest import IRIS_SETOSA, Backend, only_on
from tests.e2e.servers import run_cli, serve

pytestmark = pytest.mark.e2e

BUDGET = 5


def loopback() -> str:
    """A loopback address no other test uses."""
    a, b, c = uuid.uuid4().bytes[:3]
    return f"127.{1 + a % 250}.{b}.{c}"


def remote() -> str:
    """A client address beyond the proxy that no other test uses."""
    a, b, c = uuid.uuid4().bytes[:3]
    return f"198.{18 + a % 2}.{b}.{c}"


def client(port: int, source: str) -> httpx.Client:
    """A client whose connections come from ``source``."""
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        transport=httpx.HTTPTransport(local_address=source),
    )


def predict(http: httpx.Client, key: str, forwarded: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    return http.post("/predict", json={"features": IRIS_SETOSA}, headers=headers).status_code


def setup(environment: dict[str, str], cwd: Path) -> tuple[str, str]:
    """Migrate; an admin key and a tenant key."""
    run_cli(environment, cwd, "db", "upgrade")
    admin = run_cli(environment, cwd, "admin", "create-key", "--name", "ops").stdout
    tenant = json.loads(run_cli(environment, cwd, "tenants", "create", "--name", "edge").stdout)
    key = run_cli(environment, cwd, "keys", "issue", "--tenant", tenant["id"]).stdout
    return admin.strip().splitlines()[-1], key.strip().splitlines()[-1]


def token_address(port: int, source: str, key: str, admin: str, forwarded: str) -> str | None:
    """Mint a token for ``key`` from ``source`` claiming ``forwarded``; the client address
    its record names (GET /admin/tokens)."""
    with client(port, source) as http:
        minted = http.post(
            "/auth/token",
            data={"grant_type": "client_credentials", "client_secret": key},
            headers={"X-Forwarded-For": forwarded},
        )
        assert minted.status_code == 200, minted.text
        records = http.get("/admin/tokens", headers={"Authorization": f"Bearer {admin}"})
    assert records.status_code == 200, records.text
    # Found by its jti: records are listed by issue time, which has whole seconds only, so two
    # tokens of the same second may come in either order.
    jti = jwt.decode(minted.json()["access_token"], options={"verify_signature": False})["jti"]
    [record] = [r for r in records.json()["tokens"] if r["jti"] == jti]
    address: str | None = record["client_addr"]
    return address


@only_on("postgres")
def test_forwarded_for_from_an_untrusted_peer_is_ignored_on_every_worker(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    """SECURITY.md line 13, without MODELGATE_TRUSTED_PROXIES: failed credentials with a new
    forged X-Forwarded-For each time all count against the socket's address, across both
    workers; another address is unaffected; the audit trail records the socket's address."""
    environment = {**tour_environment, "MODELGATE_AUTH_FAILURES_PER_ADDRESS": f"{BUDGET}/minute"}
    admin, key = setup(environment, tmp_path)
    attacker, other = loopback(), loopback()
    with serve(environment, tmp_path, workers=2) as port:
        with client(port, attacker) as http:
            statuses = [predict(http, generate_key(), f"198.51.100.{i}") for i in range(BUDGET)]
            assert statuses == [401] * BUDGET
        # New connections (either worker), new forged origins: still the same address.
        for i in range(4):
            with client(port, attacker) as fresh:
                assert predict(fresh, generate_key(), f"203.0.113.{i}") == 429
        with client(port, other) as http:
            assert predict(http, generate_key()) == 401
            assert predict(http, key) == 200
        assert token_address(port, other, key, admin, "192.0.2.1") == other


@only_on("postgres")
def test_a_trusted_proxy_names_the_client_that_is_throttled_and_audited(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    """SECURITY.md line 13, with MODELGATE_TRUSTED_PROXIES: through the proxy, the rightmost
    untrusted X-Forwarded-For address is the one throttled (a spoofed leftmost entry does not
    help) and audited; the proxy's other clients, and the proxy itself, are unaffected."""
    proxy = loopback()
    environment = {
        **tour_environment,
        "MODELGATE_AUTH_FAILURES_PER_ADDRESS": f"{BUDGET}/minute",
        "MODELGATE_TRUSTED_PROXIES": proxy,
    }
    admin, key = setup(environment, tmp_path)
    attacker, neighbour, audited = remote(), remote(), remote()
    with serve(environment, tmp_path, workers=2) as port, client(port, proxy) as via_proxy:
        for i in range(BUDGET):
            assert predict(via_proxy, generate_key(), f"198.51.100.{i}, {attacker}") == 401
        assert predict(via_proxy, generate_key(), f"{remote()}, {attacker}") == 429
        # A live key that no worker has verified yet is refused there too, before any lookup.
        assert predict(via_proxy, key, attacker) == 429
        assert predict(via_proxy, generate_key(), neighbour) == 401
        assert predict(via_proxy, generate_key()) == 401  # the proxy's own address
        assert token_address(port, proxy, key, admin, f"{remote()}, {audited}") == audited
        # A peer that is not the proxy is not believed.
        outsider = loopback()
        assert token_address(port, outsider, key, admin, remote()) == outsider


def _raw_post(port: int, source: str, authorization: str | None, length: int) -> bytes:
    """Send only the headers of a POST /predict announcing ``length`` bytes of body, and read
    what the server answers without sending any of it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        head = (
            "POST /api/v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n"
        )
        if authorization is not None:
            head += f"Authorization: {authorization}\r\n"
        s.sendall((head + "\r\n").encode())
        answer = b""
        while chunk := s.recv(65536):  # the server closes the connection after its answer
            answer += chunk
        return answer


def test_a_bad_credential_is_answered_before_the_body_is_sent(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    """A prediction announcing 10 MB (under a 16 MB limit) or 20 MB (over it), with no
    credential or a bad one, is answered 401 and the connection closed while the client has
    not sent a byte of the body; an authenticated one over the limit gets 413 the same way."""
    environment = {**tour_environment, "MODELGATE_MAX_BODY_BYTES": str(16 * 1024 * 1024)}
    _, key = setup(environment, tmp_path)
    source = loopback()
    with serve(environment, tmp_path) as port:
        for length in (10 * 1024 * 1024, 20 * 1024 * 1024):
            for authorization in (None, f"Bearer {generate_key()}", "Bearer garbage"):
                answer = _raw_post(port, source, authorization, length)
                assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
                assert b"\r\nconnection: close\r\n" in answer.lower()
        answer = _raw_post(port, source, f"Bearer {key}", 20 * 1024 * 1024)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"application/problem+json" in answer
