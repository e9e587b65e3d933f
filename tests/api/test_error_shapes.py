"""One error shape everywhere: every response carries X-Request-ID, every error is problem
JSON (a 500 and readiness included), every 422 has ``errors``, and an unexpected error leaves
nothing but its type and location in the log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from tests.conftest import (
    Backend,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    make_settings,
    running_app,
)

SECRET_IN_MESSAGE = "mg_secret_in_an_exception_message_0123456789"


def _add_failing_routes(app: FastAPI) -> None:
    async def fails() -> None:
        raise RuntimeError(SECRET_IN_MESSAGE)

    async def overflows() -> None:
        raise OverflowError(SECRET_IN_MESSAGE)

    # Ahead of the 404 catch-all, as a real route would be.
    app.router.routes.insert(0, APIRoute("/boom", fails))
    app.router.routes.insert(0, APIRoute("/overflow", overflows))


async def test_unexpected_error_is_a_500_problem_with_request_id_and_a_clean_log(
    backend: Backend,
    served_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(backend, served_model_dir, tmp_path)
    async with running_app(settings, backend, customize=_add_failing_routes) as app:
        with caplog.at_level(logging.INFO):
            response = await app.client.get("/boom")
        assert response.status_code == 500
        assert response.headers["content-type"].startswith("application/problem+json")
        body = response.json()
        assert body["type"] == "internal-error"
        assert body["request_id"] == response.headers["X-Request-ID"]
        assert SECRET_IN_MESSAGE not in response.text
        logged = [r for r in caplog.records if "unhandled error" in r.getMessage()]
        assert logged, "the unexpected error must be logged"
        text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
        assert "RuntimeError" in text
        assert "test_error_shapes.py" in text  # where it was raised
        assert SECRET_IN_MESSAGE not in text
        # An overflow is a value past a bound: 422, never a 5xx.
        overflow = await app.client.get("/overflow")
        assert overflow.status_code == 422
        assert overflow.json()["errors"]
        # The app keeps serving.
        assert (await app.client.get("/api/v1/health/live")).status_code == 200


async def test_readiness_503_is_a_problem_naming_the_dependency(
    backend: Backend, model_copy: Path, tmp_path: Path
) -> None:
    (model_copy / "iris" / "1" / "model.onnx").write_bytes(b"tampered")
    settings = make_settings(backend, model_copy, tmp_path)
    async with running_app(settings, backend) as app:
        ready = await app.client.get("/api/v1/health/ready")
    assert ready.status_code == 503
    assert ready.headers["content-type"].startswith("application/problem+json")
    assert "Retry-After" in ready.headers
    body = ready.json()
    assert {"type", "title", "status", "detail", "request_id"} <= set(body)
    assert body["request_id"] == ready.headers["X-Request-ID"]
    assert body["checks"]["models"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert "models" in body["detail"]


async def test_422_raised_by_a_service_has_errors(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.get(
        "/api/v1/me/usage?start=2026-02-01&end=2026-01-01", headers=bearer(key)
    )
    assert response.status_code == 422
    body = response.json()
    assert body["errors"] == [
        {"loc": ["start"], "msg": "start must not be after end", "type": "value_error"}
    ]
    assert body["request_id"] == response.headers["X-Request-ID"]


async def test_every_response_forbids_content_sniffing(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    responses = [
        await harness.client.get("/api/v1/health"),
        await harness.client.get("/api/v1/nope"),
        await harness.client.post("/api/v1/predict", json={"features": [1.0]}, headers=bearer(key)),
        await harness.client.post(
            "/api/v1/predict",
            content=b"x" * (harness.state.settings.max_body_bytes + 1),
            headers={**bearer(key), "Content-Type": "application/json"},
        ),
        await harness.client.get("/api/v1/me"),
    ]
    assert [r.status_code for r in responses] == [200, 404, 422, 413, 401]
    for response in responses:
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_response_carrying_a_new_key_is_never_cached(harness: Harness) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    created = await harness.client.post(
        f"/api/v1/admin/tenants/{tenant.id}/keys", json={"name": "fresh"}, headers=bearer(admin)
    )
    assert created.status_code == 201
    assert created.headers["Cache-Control"] == "no-store"
