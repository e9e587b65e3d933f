"""Prediction routes: shapes, validation, billing before the response."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from auth.models import UsageRecord
from tests.conftest import (
    IRIS_SETOSA,
    IRIS_VIRGINICA,
    Harness,
    bearer,
    create_tenant_with_key,
)


async def _usage_rows(harness: Harness, tenant_id: uuid.UUID) -> list[UsageRecord]:
    async with harness.sessionmaker() as session:
        result = await session.scalars(
            select(UsageRecord).where(UsageRecord.tenant_id == tenant_id)
        )
        return list(result.all())


async def test_predict_returns_the_contract_shape_and_bills_one_unit(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    response = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "prediction",
        "probability",
        "class_name",
        "model",
        "model_version",
        "prediction_id",
        "timestamp",
        "inference_time_ms",
        "cached",
    }
    assert body["class_name"] == "setosa"
    assert body["prediction"] == 0
    # Every class's probability, in the model's class order.
    assert len(body["probability"]) == 3
    assert 0.5 < body["probability"][0] <= 1.0
    assert max(body["probability"]) == body["probability"][0]
    assert body["model"] == "iris"
    assert body["model_version"] == "1"
    assert body["cached"] is False
    assert body["prediction_id"] == response.headers["X-Request-ID"]
    # The record is visible from another session as soon as the response is received.
    [record] = await _usage_rows(harness, tenant.id)
    assert record.units == 1
    assert str(record.request_id) == body["prediction_id"]
    assert record.model == "iris"
    assert record.model_version == "1"
    assert record.status_code == 200
    assert record.created_at.tzinfo is not None


async def test_predict_batch_bills_one_unit_per_instance(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    response = await harness.client.post(
        "/api/v1/predict/batch",
        json={"instances": [IRIS_SETOSA, IRIS_VIRGINICA, IRIS_SETOSA]},
        headers=bearer(key),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["batch_size"] == 3
    assert [p["class_name"] for p in body["predictions"]] == ["setosa", "virginica", "setosa"]
    assert body["total_time_ms"] > 0
    request_id = response.headers["X-Request-ID"]
    assert body["prediction_id"] == request_id
    assert [p["prediction_id"] for p in body["predictions"]] == [
        f"{request_id}-0",
        f"{request_id}-1",
        f"{request_id}-2",
    ]
    [record] = await _usage_rows(harness, tenant.id)
    assert record.units == 3


async def test_predict_with_explicit_model_version(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.post(
        "/api/v1/predict",
        json={"features": IRIS_VIRGINICA, "model": "iris", "model_version": "1"},
        headers=bearer(key),
    )
    assert response.status_code == 200
    assert response.json()["class_name"] == "virginica"


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"features": [1.0, 2.0, 3.0]}, "expected 4 features"),
        ({"features": [1.0, 2.0, 3.0, 4.0, 5.0]}, "expected 4 features"),
        ({"features": ["1.0", 2.0, 3.0, 4.0]}, None),
        ({"features": [True, 2.0, 3.0, 4.0]}, None),
        ({"features": [None, 2.0, 3.0, 4.0]}, None),
        ({"features": []}, None),
        ({"features": "1,2,3,4"}, None),
        ({}, None),
        ({"features": IRIS_SETOSA, "tenant_id": str(uuid.uuid4())}, None),
    ],
)
async def test_invalid_features_are_422_problems(
    harness: Harness, payload: dict[str, object], needle: str | None
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    response = await harness.client.post("/api/v1/predict", json=payload, headers=bearer(key))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == 422
    assert body["request_id"] == response.headers["X-Request-ID"]
    if needle:
        assert needle in body["detail"]
    else:
        assert body["errors"]
    assert await _usage_rows(harness, tenant.id) == []


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e300", "-3.5e38"])
async def test_non_finite_features_are_refused(harness: Harness, literal: str) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.post(
        "/api/v1/predict",
        content=f'{{"features": [{literal}, 1.0, 1.0, 1.0]}}',
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text


async def test_empty_and_oversized_batches_are_422(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    for instances in ([], [IRIS_SETOSA] * 101):
        response = await harness.client.post(
            "/api/v1/predict/batch", json={"instances": instances}, headers=bearer(key)
        )
        assert response.status_code == 422, response.text
    full = await harness.client.post(
        "/api/v1/predict/batch", json={"instances": [IRIS_SETOSA] * 100}, headers=bearer(key)
    )
    assert full.status_code == 200
    assert full.json()["batch_size"] == 100
    assert [r.units for r in await _usage_rows(harness, tenant.id)] == [100]


async def test_batch_with_one_bad_row_is_refused_whole(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    response = await harness.client.post(
        "/api/v1/predict/batch",
        json={"instances": [IRIS_SETOSA, [1.0, 2.0]]},
        headers=bearer(key),
    )
    assert response.status_code == 422
    assert "instance 1" in response.json()["detail"]
    assert await _usage_rows(harness, tenant.id) == []


@pytest.mark.parametrize(
    "payload",
    [
        {"features": IRIS_SETOSA, "model": "nope"},
        {"features": IRIS_SETOSA, "model_version": "99"},
    ],
)
async def test_unknown_model_or_version_is_404(
    harness: Harness, payload: dict[str, object]
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    response = await harness.client.post("/api/v1/predict", json=payload, headers=bearer(key))
    assert response.status_code == 404
    assert response.json()["type"] == "not-found"
    assert await _usage_rows(harness, tenant.id) == []


async def test_models_lists_versions_and_input_schema(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.get("/api/v1/models", headers=bearer(key))
    assert response.status_code == 200
    [iris] = response.json()["models"]
    assert iris["name"] == "iris"
    assert iris["active_version"] == "1"
    assert iris["n_features"] == 4
    assert iris["class_names"] == ["setosa", "versicolor", "virginica"]
    one = await harness.client.get("/api/v1/models/iris", headers=bearer(key))
    assert one.json() == iris
    missing = await harness.client.get("/api/v1/models/nope", headers=bearer(key))
    assert missing.status_code == 404


async def test_count_of_usage_rows_matches_successes_only(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    for payload in ({"features": IRIS_SETOSA}, {"features": [1]}, {"features": IRIS_SETOSA}):
        await harness.client.post("/api/v1/predict", json=payload, headers=bearer(key))
    async with harness.sessionmaker() as session:
        count = await session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.tenant_id == tenant.id)
        )
    assert count == 2
