"""SECURITY.md, the lines whose deeper tests live with their features (tests/api, tests/e2e):
one named test each here, on Postgres + Redis and on the embedded default, and an index that
holds tests/security to a named test for every line of the threat model in force today."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import httpx

from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    running_app,
)

PREDICT = "/api/v1/predict"
# SECURITY.md (the shared threat model, kept outside this repository) numbers its attacks 1-20;
# lines 4-8 (JWTs and /auth/token) are proved in test_jwt.py.
LINES_IN_FORCE = set(range(1, 21))


def test_every_threat_model_line_in_force_has_a_named_test() -> None:
    """Each line of SECURITY.md in force is cited ("SECURITY.md line N") by a test here."""
    cited: set[int] = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef) and node.name.startswith(
                "test_"
            ):
                doc = ast.get_docstring(node) or ""
                for match in re.finditer(r"SECURITY\.md lines? ([\d, and-]+)", doc):
                    for number in re.findall(r"\d+", match.group(1)):
                        cited.add(int(number))
    assert LINES_IN_FORCE - cited == set()


async def test_tenant_ids_in_query_or_body_never_reach_another_tenant(harness: Harness) -> None:
    """SECURITY.md line 10: tenant A's credential sees A's data whatever ids it sends, and
    another tenant's record is not found (404), never forbidden."""
    tenant_a, key_a = await create_tenant_with_key(harness)
    tenant_b, _ = await create_tenant_with_key(harness)
    usage = await harness.client.get(
        f"/api/v1/me/usage?tenant_id={tenant_b.id}", headers=bearer(key_a)
    )
    assert usage.status_code == 200
    assert usage.json()["tenant_id"] == str(tenant_a.id)
    me = await harness.client.get(f"/api/v1/me?tenant_id={tenant_b.id}", headers=bearer(key_a))
    assert me.json()["tenant"]["id"] == str(tenant_a.id)
    for path in (f"/api/v1/me/usage/{tenant_b.id}", f"/api/v1/me/{tenant_b.id}"):
        assert (await harness.client.get(path, headers=bearer(key_a))).status_code == 404


async def test_the_rate_limit_is_per_key_whatever_the_client_address(
    harness: Harness, backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    """SECURITY.md line 13: one key's limit is shared by every address it comes from, a second
    key behind the same address has its own, and X-Forwarded-For changes nothing, even from
    trusted proxies (it may name the client, never split a key's limit). The client address
    that X-Forwarded-For may name (failed credentials, the audit trail) is proved in
    test_edge_throttle.py and tests/e2e/test_edge_addresses.py."""
    # The clients below are the trusted proxies: their X-Forwarded-For is believed.
    settings = make_settings(backend, served_model_dir, tmp_path, trusted_proxies="10.0.0.0/29")
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app, rate_limit="4/minute")
        _, neighbour = await create_tenant_with_key(app, rate_limit="4/minute")
        app_under_test = app.client._transport.app  # type: ignore[attr-defined]
        clients = [
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app_under_test, client=(f"10.0.0.{i}", 1000 + i)),
                base_url="http://testserver",
            )
            for i in range(1, 5)
        ]
        try:
            statuses = []
            for i, client in enumerate(clients + clients[:1]):
                response = await client.post(
                    PREDICT,
                    json={"features": IRIS_SETOSA},
                    headers={**bearer(key), "X-Forwarded-For": f"192.0.2.{i}"},
                )
                statuses.append(response.status_code)
            assert statuses == [200, 200, 200, 200, 429]
            # Same address as the key's last request: the neighbour's budget is untouched.
            other = await clients[0].post(
                PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(neighbour)
            )
            assert other.status_code == 200
            assert other.headers["X-RateLimit-Remaining"] == "3"
        finally:
            for client in clients:
                await client.aclose()


async def test_a_request_that_would_cross_the_quota_is_refused_whole(harness: Harness) -> None:
    """SECURITY.md line 14: a batch that does not fit in what is left is refused with 429
    quota-exceeded and bills nothing; what fits is still served."""
    _, key = await create_tenant_with_key(harness, monthly_quota=3)
    two = {"instances": [IRIS_SETOSA, IRIS_SETOSA]}
    assert (
        await harness.client.post(f"{PREDICT}/batch", json=two, headers=bearer(key))
    ).status_code == 200
    crossing = await harness.client.post(f"{PREDICT}/batch", json=two, headers=bearer(key))
    assert crossing.status_code == 429
    assert crossing.json()["type"] == "quota-exceeded"
    assert "Retry-After" in crossing.headers
    usage = (await harness.client.get("/api/v1/me/usage", headers=bearer(key))).json()
    assert usage["quota"] == {"monthly_quota": 3, "used": 2, "remaining": 1}
    last = await harness.client.post(PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key))
    assert last.status_code == 200


async def test_oversized_overlong_and_non_numeric_input_is_refused(harness: Harness) -> None:
    """SECURITY.md line 15: a body over the limit is 413, a batch over the maximum and features
    that are NaN, infinite, of the wrong count or type are 422; none is billed."""
    _, key = await create_tenant_with_key(harness)
    limit = harness.state.settings.max_body_bytes
    too_large = await harness.client.post(
        PREDICT,
        content=b'{"features": [' + b"1.0," * (limit // 4) + b"1.0]}",
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    assert too_large.status_code == 413
    assert too_large.headers["content-type"].startswith("application/problem+json")
    batch = {"instances": [IRIS_SETOSA] * (harness.state.settings.max_batch_size + 1)}
    assert (
        await harness.client.post(f"{PREDICT}/batch", json=batch, headers=bearer(key))
    ).status_code == 422
    for features in ("[NaN, 1, 1, 1]", "[Infinity, 1, 1, 1]", "[1, 1, 1]", '["1", 1, 1, 1]'):
        refused = await harness.client.post(
            PREDICT,
            content='{"features": ' + features + "}",
            headers={**bearer(key), "Content-Type": "application/json"},
        )
        assert refused.status_code == 422, features
        assert refused.json()["errors"]
    usage = (await harness.client.get("/api/v1/me/usage", headers=bearer(key))).json()
    assert usage["total_requests"] == 0


async def test_a_foreign_origin_gets_no_cors_grant(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    """SECURITY.md line 18: Origin https://evil.example with credentials gets no
    Access-Control-Allow-Origin echo and never Access-Control-Allow-Credentials: true."""
    settings = make_settings(
        backend, served_model_dir, tmp_path, cors_origins="https://app.example"
    )
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app)
        evil = {"Origin": "https://evil.example", "Cookie": "session=1", **bearer(key)}
        preflight = await app.client.options(
            PREDICT,
            headers={**evil, "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
        simple = await app.client.post(PREDICT, json={"features": IRIS_SETOSA}, headers=evil)
        assert "access-control-allow-origin" not in simple.headers
        assert "access-control-allow-credentials" not in simple.headers
        good = await app.client.post(
            PREDICT,
            json={"features": IRIS_SETOSA},
            headers={"Origin": "https://app.example", **bearer(key)},
        )
        assert good.headers["access-control-allow-origin"] == "https://app.example"
        assert good.headers.get("access-control-allow-credentials") != "true"


async def test_a_tampered_artifact_fails_its_version_and_is_never_served(
    backend: Backend, model_copy: Path, tmp_path: Path
) -> None:
    """SECURITY.md line 19: an artifact whose SHA-256 differs from the manifest marks the
    version failed, readiness says so, and predictions for it are 503 (tests/ml proves the
    pickle is never unpickled)."""
    onnx = model_copy / "iris" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\x00")
    settings = make_settings(backend, model_copy, tmp_path)
    async with running_app(settings, backend) as app:
        ready = await app.client.get("/api/v1/health/ready")
        assert ready.status_code == 503
        assert ready.json()["failed_model_versions"] == ["iris/1"]
        _, key = await create_tenant_with_key(app)
        for model_version in (None, "1"):
            body = {"features": IRIS_SETOSA, "model_version": model_version}
            response = await app.client.post(PREDICT, json=body, headers=bearer(key))
            assert response.status_code == 503
            assert "Retry-After" in response.headers
