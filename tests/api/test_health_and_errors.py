"""Health routes, request ids, problem JSON, body limits and CORS."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    running_app,
)


async def test_health_reports_model_and_uptime(harness: Harness) -> None:
    response = await harness.client.get("/api/v1/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["model_loaded"] is True
    assert body["model_version"] == "1"
    assert body["uptime_seconds"] >= 0


async def test_liveness_and_readiness(harness: Harness) -> None:
    assert (await harness.client.get("/api/v1/health/live")).json() == {"status": "ok"}
    ready = await harness.client.get("/api/v1/health/ready")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["models"] == "ok"
    expected_redis = "ok" if harness.backend.redis_url else "not_configured"
    assert checks["redis"] == expected_redis


async def test_every_response_has_a_request_id_and_errors_are_problems(harness: Harness) -> None:
    missing = await harness.client.get("/api/v1/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    body = missing.json()
    assert set(body) == {"type", "title", "status", "detail", "request_id"}
    assert body["request_id"] == missing.headers["X-Request-ID"]
    wrong_method = await harness.client.get("/api/v1/predict")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["status"] == 405
    ok = await harness.client.get("/api/v1/health/live")
    assert len(ok.headers["X-Request-ID"]) == 36
    assert ok.headers["X-Request-ID"] != missing.headers["X-Request-ID"]


async def test_malformed_json_is_422_without_echoing_input(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.post(
        "/api/v1/predict",
        content=b'{"features": [1, 2, 3, 4], "secret": "hunter2"',
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert "hunter2" not in response.text
    assert key not in response.text


# Looks like a live key; pydantic would put it in each error's "input" (and "ctx") if let.
SECRET_LOOKING = "mg_live_SECRETLOOKING0123456789abcdefghijklmnopqrstuvw"


@pytest.mark.parametrize(
    ("path", "payload", "location"),
    [
        ("/api/v1/predict", {"features": [SECRET_LOOKING, 3.5, 1.4, 0.2]}, ["features", 0]),
        ("/api/v1/predict", {"features": IRIS_SETOSA, "api_key": SECRET_LOOKING}, ["api_key"]),
        ("/api/v1/predict", {"features": IRIS_SETOSA, "model": SECRET_LOOKING + "!"}, ["model"]),
        ("/api/v1/predict/batch", {"instances": [IRIS_SETOSA, [SECRET_LOOKING]]}, ["instances"]),
    ],
)
async def test_validation_error_never_echoes_a_submitted_value(
    harness: Harness, path: str, payload: dict[str, object], location: list[object]
) -> None:
    """Well-formed JSON whose bad field holds a secret: the 422 names the field, not its value."""
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.post(path, json=payload, headers=bearer(key))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"] == "validation-error"
    # The error is really about the field that holds the secret...
    assert any(error["loc"][1 : 1 + len(location)] == location for error in body["errors"]), body
    # ...and neither that value, any part of it, nor the credential is anywhere in the answer.
    assert "SECRETLOOKING" not in response.text
    assert "mg_live" not in response.text
    assert key not in response.text
    assert all(set(error) == {"loc", "msg", "type"} for error in body["errors"]), body


async def test_body_over_the_limit_is_413(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    huge = b'{"features": [' + b"1.0," * 100_000 + b"1.0]}"
    response = await harness.client.post(
        "/api/v1/predict",
        content=huge,
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_cors_never_echoes_an_unknown_origin(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        backend, served_model_dir, tmp_path, cors_origins="https://app.example"
    )
    async with running_app(settings, backend) as app:
        evil = await app.client.options(
            "/api/v1/predict",
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert "access-control-allow-origin" not in evil.headers
        assert evil.headers.get("access-control-allow-credentials") != "true"
        simple = await app.client.get("/api/v1/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in simple.headers
        good = await app.client.get("/api/v1/health", headers={"Origin": "https://app.example"})
        assert good.headers["access-control-allow-origin"] == "https://app.example"
        assert good.headers.get("access-control-allow-credentials") != "true"


async def test_tampered_model_is_failed_reported_and_503(
    backend: Backend, model_copy: Path, tmp_path: Path
) -> None:
    """SECURITY.md line 19: never unpickled (tests/ml proves that), readiness says so, 503."""
    artifact = model_copy / "iris" / "1" / "model.onnx"
    artifact.write_bytes(artifact.read_bytes() + b"tampered")
    settings = make_settings(backend, model_copy, tmp_path)
    async with running_app(settings, backend) as app:
        ready = await app.client.get("/api/v1/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["models"] == "unavailable"
        assert ready.json()["failed_model_versions"] == ["iris/1"]
        _, key = await create_tenant_with_key(app)
        response = await app.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert response.status_code == 503
        assert "Retry-After" in response.headers
