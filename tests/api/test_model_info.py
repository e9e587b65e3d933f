"""GET /api/v1/model/info: the default model described from its manifest, never its pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    running_app,
)


async def test_model_info_needs_a_credential(harness: Harness) -> None:
    response = await harness.client.get("/api/v1/model/info")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("layout", ["no-model", "failed-version"])
async def test_model_info_is_503_without_a_loaded_default_model(
    backend: Backend, model_copy: Path, tmp_path: Path, layout: str
) -> None:
    if layout == "no-model":
        model_dir = tmp_path / "empty"
        model_dir.mkdir()
    else:
        model_dir = model_copy
        (model_dir / "iris" / "1" / "model.onnx").write_bytes(b"tampered")
    async with running_app(make_settings(backend, model_dir, tmp_path / "var"), backend) as app:
        _, key = await create_tenant_with_key(app)
        response = await app.client.get("/api/v1/model/info", headers=bearer(key))
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "Retry-After" in response.headers
    body = response.json()
    assert (body["status"], body["type"]) == (503, "service-unavailable")
    assert body["request_id"] == response.headers["X-Request-ID"]


async def test_a_manifest_from_before_model_type_is_described_without_unpickling(
    backend: Backend, model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest_path = model_copy / "iris" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["model_type"], manifest["parameters"]
    manifest_path.write_text(json.dumps(manifest))

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        pytest.fail("the pickle was opened at serve time")

    monkeypatch.setattr("joblib.load", refuse)
    async with running_app(make_settings(backend, model_copy, tmp_path / "var"), backend) as app:
        _, key = await create_tenant_with_key(app)
        response = await app.client.get("/api/v1/model/info", headers=bearer(key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"]) == ("iris", "1")
    assert (body["model_type"], body["parameters"]) == ("unknown", {})
