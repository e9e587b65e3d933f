"""Micro-batching through /predict: concurrent requests for a scikit-learn version share calls,
answer exactly as one at a time, and a refused request fails alone."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ml import ModelRegistry
from tests.conftest import (
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    recorded_batches,
    running_app,
)

SKLEARN_MODEL = "iris-sklearn"


@pytest.fixture(scope="module")
def sklearn_model_dir(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served models plus ``iris-sklearn``: the same forest without its ONNX file."""
    model_dir = tmp_path_factory.mktemp("batching") / "models"
    shutil.copytree(served_model_dir, model_dir)
    source, target = model_dir / "iris" / "1", model_dir / SKLEARN_MODEL / "1"
    target.mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text())
    shutil.copyfile(source / manifest["artifact"], target / manifest["artifact"])
    manifest.update(name=SKLEARN_MODEL, onnx_artifact=None, onnx_sha256=None)
    (target / "manifest.json").write_text(json.dumps(manifest))
    (model_dir / SKLEARN_MODEL / "ACTIVE").write_text("1\n")
    return model_dir


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def harness(
    backend: Backend, sklearn_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    """The app with a scikit-learn version and a generous wait, so that concurrent requests
    of a loaded machine still meet in one call."""
    settings = make_settings(
        backend,
        sklearn_model_dir,
        tmp_path_factory.mktemp("var"),
        batch_max_size=16,
        batch_max_wait_ms=10,
    )
    async with running_app(settings, backend) as running:
        yield running


def _rows(count: int) -> list[list[float]]:
    return [[4.5 + 0.1 * i, 3.0 - 0.02 * i, 1.0 + 0.2 * i, 0.1 + 0.08 * i] for i in range(count)]


async def test_concurrent_predictions_share_calls_and_answer_as_one_at_a_time(
    harness: Harness, sklearn_model_dir: Path
) -> None:
    _, key = await create_tenant_with_key(harness)
    rows = _rows(24)
    unbatched = ModelRegistry(sklearn_model_dir)
    unbatched.load()
    model = unbatched.get(SKLEARN_MODEL)
    assert model.runtime == "sklearn"
    expected = [model.predict([row])[0] for row in rows]
    with recorded_batches() as calls:
        responses = await asyncio.gather(
            *(
                harness.client.post(
                    "/api/v1/predict",
                    json={"features": row, "model": SKLEARN_MODEL},
                    headers=bearer(key),
                )
                for row in rows
            )
        )

    assert [r.status_code for r in responses] == [200] * len(rows)
    bodies = [r.json() for r in responses]
    assert [b["class_name"] for b in bodies] == [p.class_name for p in expected]
    assert [[v.hex() for v in b["probability"]] for b in bodies] == [
        [v.hex() for v in p.probability] for p in expected
    ]
    sizes = [size for runtime, size in calls if runtime == "sklearn"]
    assert sum(sizes) == len(rows)
    assert len(sizes) < len(rows)
    assert max(sizes) <= 16


async def test_a_refused_request_fails_alone_among_concurrent_ones(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    payloads: list[dict[str, object]] = [
        {"features": row, "model": SKLEARN_MODEL} for row in _rows(6)
    ]
    payloads[2] = {"features": [1.0, 2.0, 3.0], "model": SKLEARN_MODEL}

    responses = await asyncio.gather(
        *(
            harness.client.post("/api/v1/predict", json=payload, headers=bearer(key))
            for payload in payloads
        )
    )

    assert [r.status_code for r in responses] == [200, 200, 422, 200, 200, 200]
    assert "expected 4 features" in responses[2].json()["detail"]
