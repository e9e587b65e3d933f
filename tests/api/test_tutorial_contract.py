"""The tutorial's contract: a client written against "Model Serving with FastAPI" works unchanged
but for its ``Authorization`` header.

The response models below are written from that contract, not imported from ``api/``: every
tutorial field is required and strictly typed, and modelgate's own fields are allowed on top
(``extra="allow"``). Every answer of the five tutorial routes is parsed with them, on both
backends.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from tests.conftest import (
    IRIS_SETOSA,
    IRIS_VIRGINICA,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
)

IRIS_VERSICOLOR = [5.9, 3.0, 4.2, 1.5]
# Between versicolor and virginica: the forest is not unanimous about it.
IRIS_BORDERLINE = [6.0, 2.7, 5.1, 1.6]
ROWS = [IRIS_SETOSA, IRIS_VIRGINICA, IRIS_VERSICOLOR, IRIS_BORDERLINE, IRIS_SETOSA]
CLASS_NAMES = ["setosa", "versicolor", "virginica"]


def _utc(value: datetime) -> datetime:
    if value.utcoffset() != timedelta(0):
        raise ValueError("not UTC")
    return value


def _class_distribution(value: list[float]) -> list[float]:
    if len(value) != len(CLASS_NAMES):
        raise ValueError(f"{len(value)} probabilities for {len(CLASS_NAMES)} classes")
    if not all(0.0 <= p <= 1.0 for p in value) or not math.isclose(sum(value), 1.0, abs_tol=1e-6):
        raise ValueError("not a probability distribution")
    return value


UtcTimestamp = Annotated[AwareDatetime, AfterValidator(_utc)]
ClassProbabilities = Annotated[list[float], AfterValidator(_class_distribution)]
NonNegative = Annotated[float, Field(ge=0)]


class Contract(BaseModel):
    """Strict parsing of JSON answers; fields beyond the contract are modelgate's extras."""

    model_config = ConfigDict(extra="allow", strict=True, protected_namespaces=())


class TutorialPrediction(Contract):
    """``POST /api/v1/predict``."""

    prediction: int
    probability: ClassProbabilities
    class_name: str
    model_version: str
    prediction_id: Annotated[str, Field(min_length=1)]
    timestamp: UtcTimestamp
    inference_time_ms: NonNegative


class TutorialBatchItem(TutorialPrediction):
    """One element of ``predictions``: a full prediction object, modelgate's fields included."""

    model: str
    cached: bool


class TutorialBatch(Contract):
    """``POST /api/v1/predict/batch``."""

    predictions: list[TutorialBatchItem]
    batch_size: int
    total_time_ms: NonNegative


class TutorialHealth(Contract):
    """``GET /api/v1/health``."""

    status: str
    model_loaded: bool
    model_version: str | None
    uptime_seconds: NonNegative
    timestamp: UtcTimestamp


class TutorialModelInfo(Contract):
    """``GET /api/v1/model/info``."""

    model_name: str
    model_version: str
    model_type: str
    loaded_at: UtcTimestamp
    parameters: dict[str, Any]


class TutorialRoot(Contract):
    """``GET /``."""

    name: str
    version: str
    docs: str


def _ok(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.content


def _consistent(prediction: TutorialPrediction) -> None:
    """The predicted class is the most probable one, named in the model's class order."""
    probabilities = prediction.probability
    assert probabilities[prediction.prediction] == max(probabilities)
    assert prediction.class_name == CLASS_NAMES[prediction.prediction]


async def _predict(harness: Harness, key: str, row: list[float]) -> TutorialPrediction:
    response = await harness.client.post(
        "/api/v1/predict", json={"features": row}, headers=bearer(key)
    )
    return TutorialPrediction.model_validate_json(_ok(response))


async def test_predict_answers_the_tutorial_fields(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    before = datetime.now(UTC)
    response = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    after = datetime.now(UTC)

    prediction = TutorialPrediction.model_validate_json(_ok(response))

    _consistent(prediction)
    assert (prediction.prediction, prediction.class_name) == (0, "setosa")
    assert prediction.model_version == "1"
    assert before <= prediction.timestamp <= after
    assert prediction.prediction_id == response.headers["X-Request-ID"]
    assert prediction.model_extra == {"model": "iris", "cached": False}


async def test_predict_with_the_tutorials_model_version_field(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.post(
        "/api/v1/predict",
        json={"features": IRIS_BORDERLINE, "model_version": "1"},
        headers=bearer(key),
    )
    prediction = TutorialPrediction.model_validate_json(_ok(response))
    _consistent(prediction)
    assert prediction.model_version == "1"
    # Not a one-hot answer: the list really is every class's probability.
    assert sum(p > 0 for p in prediction.probability) >= 2


async def test_batch_answers_a_full_prediction_object_per_instance(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    before = datetime.now(UTC)
    response = await harness.client.post(
        "/api/v1/predict/batch", json={"instances": ROWS}, headers=bearer(key)
    )
    after = datetime.now(UTC)

    batch = TutorialBatch.model_validate_json(_ok(response))

    assert batch.batch_size == len(batch.predictions) == len(ROWS)
    ids = [item.prediction_id for item in batch.predictions]
    assert len(set(ids)) == len(ids)
    request_id = response.headers["X-Request-ID"]
    assert ids == [f"{request_id}-{index}" for index in range(len(ROWS))]
    for item in batch.predictions:
        _consistent(item)
        assert (item.model, item.model_version, item.cached) == ("iris", "1", False)
        assert before <= item.timestamp <= after
        assert item.model_extra == {}
    # modelgate's extras of the batch as a whole.
    assert batch.model_extra == {"model": "iris", "model_version": "1", "prediction_id": request_id}


async def test_each_batch_item_is_what_predict_answers_for_its_row(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.post(
        "/api/v1/predict/batch", json={"instances": ROWS}, headers=bearer(key)
    )
    batch = TutorialBatch.model_validate_json(_ok(response))

    for row, item in zip(ROWS, batch.predictions, strict=True):
        single = await _predict(harness, key, row)
        assert (item.prediction, item.class_name, item.probability) == (
            single.prediction,
            single.class_name,
            single.probability,
        )
        assert item.prediction_id != single.prediction_id


async def test_health_answers_the_tutorial_fields(harness: Harness) -> None:
    before = datetime.now(UTC)
    health = TutorialHealth.model_validate_json(_ok(await harness.client.get("/api/v1/health")))
    assert (health.status, health.model_loaded, health.model_version) == ("ok", True, "1")
    assert before <= health.timestamp <= datetime.now(UTC)


async def test_model_info_answers_the_tutorial_fields(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.get("/api/v1/model/info", headers=bearer(key))

    info = TutorialModelInfo.model_validate_json(_ok(response))

    assert (info.model_name, info.model_version) == ("iris", "1")
    assert info.model_type == "RandomForestClassifier"
    assert info.parameters["n_estimators"] == 100
    assert info.parameters["random_state"] == 0
    # Loaded by this app's lifespan, before the request.
    assert info.loaded_at <= datetime.now(UTC)
    assert info.model_extra == {}


async def test_model_info_takes_any_credential(harness: Harness) -> None:
    _, usage_only = await create_tenant_with_key(harness, scopes=("usage:read",))
    admin = await create_admin_key(harness)
    answers = [
        TutorialModelInfo.model_validate_json(
            _ok(await harness.client.get("/api/v1/model/info", headers=bearer(key)))
        )
        for key in (usage_only, admin)
    ]
    # One worker, one load: the same answer for everybody.
    assert answers[0] == answers[1]


async def test_root_names_the_service_and_its_docs(harness: Harness) -> None:
    root = TutorialRoot.model_validate_json(_ok(await harness.client.get("/")))
    assert (root.name, root.version, root.docs) == ("modelgate", "0.1.0", "/docs")
    docs = await harness.client.get(root.docs)
    assert docs.status_code == 200
