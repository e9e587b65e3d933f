"""Predictions: correctness, input validation and running off the event loop."""

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from ml import InvalidFeatures, LoadedModel, ModelRegistry


def test_predictions_match_scikit_learn_on_iris(registry: ModelRegistry, iris: Any) -> None:
    model = registry.get("iris")
    estimator = model._estimator
    rows = iris.data.tolist()

    predictions = model.predict(rows)

    expected = estimator.predict(iris.data)
    expected_proba = estimator.predict_proba(iris.data).max(axis=1)
    assert [p.prediction for p in predictions] == expected.tolist()
    assert [p.probability for p in predictions] == pytest.approx(expected_proba.tolist())
    assert [p.class_name for p in predictions] == [iris.target_names[i] for i in expected]
    assert all(type(p.prediction) is int and type(p.probability) is float for p in predictions)


def test_single_row_predicts_its_class(registry: ModelRegistry) -> None:
    [prediction] = registry.get("iris").predict([[6.7, 3.0, 5.2, 2.3]])
    assert (prediction.prediction, prediction.class_name) == (2, "virginica")
    assert 0.5 < prediction.probability <= 1.0


def test_numpy_and_integer_values_are_accepted(registry: ModelRegistry) -> None:
    model = registry.get("iris")
    rows: Any = [[5, 3, 1, 0], [np.float32(5.1), np.int64(3), np.float64(1.4), 0.2]]
    assert [p.class_name for p in model.predict(rows)] == ["setosa", "setosa"]
    matrix: Any = np.array([[5.1, 3.5, 1.4, 0.2]])
    assert model.predict(matrix)[0].class_name == "setosa"


class _ThreadRecordingEstimator:
    """Wraps an estimator and records which thread ran predict_proba."""

    def __init__(self, estimator: Any) -> None:
        self._estimator = estimator
        self.threads: list[int] = []

    def predict_proba(self, matrix: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self._estimator.predict_proba(matrix)


@pytest.mark.asyncio
async def test_predict_async_runs_the_estimator_off_the_event_loop_thread(
    registry: ModelRegistry,
) -> None:
    loaded = registry.get("iris")
    recorder = _ThreadRecordingEstimator(loaded._estimator)
    model = LoadedModel(loaded.manifest, recorder)

    predictions = await model.predict_async([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])

    assert [p.class_name for p in predictions] == ["setosa", "virginica"]
    assert len(recorder.threads) == 1
    assert recorder.threads[0] != threading.get_ident()


@pytest.mark.asyncio
async def test_predict_async_rejects_bad_features_without_calling_the_estimator(
    registry: ModelRegistry,
) -> None:
    loaded = registry.get("iris")
    recorder = _ThreadRecordingEstimator(loaded._estimator)
    model = LoadedModel(loaded.manifest, recorder)
    with pytest.raises(InvalidFeatures, match="expected 4 features, got 3"):
        await model.predict_async([[1.0, 2.0, 3.0]])
    assert recorder.threads == []


def test_concurrent_predictions_from_many_threads_agree(registry: ModelRegistry, iris: Any) -> None:
    model = registry.get("iris")
    rows = iris.data.tolist()
    expected = model.predict(rows)

    async def run_many() -> list[list[Any]]:
        return list(await asyncio.gather(*(model.predict_async(rows) for _ in range(8))))

    assert all(result == expected for result in asyncio.run(run_many()))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[1.0, 2.0, 3.0]], "expected 4 features, got 3"),
        ([[1.0, 2.0, 3.0, 4.0, 5.0]], "expected 4 features, got 5"),
        ([[]], "expected 4 features, got 0"),
        ([[1.0, 2.0, 3.0, float("nan")]], "features must be finite numbers"),
        ([[1.0, 2.0, 3.0, float("inf")]], "features must be finite numbers"),
        ([[1.0, 2.0, 3.0, float("-inf")]], "features must be finite numbers"),
        ([[1.0, 2.0, 3.0, np.float32("nan")]], "features must be finite numbers"),
        ([[1.0, 2.0, 3.0, 10**400]], "features must be finite numbers"),
        ([[1.0, 2.0, 3.0, "4.0"]], "features must be finite numbers"),
        ([[1.0, 2.0, 3.0, None]], "features must be finite numbers"),
        ([[1.0, 2.0, 3.0, True]], "features must be finite numbers"),
        ([[False, 2.0, 3.0, 4.0]], "features must be finite numbers"),
        ([[1.0, 2.0, 3.0, np.bool_(True)]], "features must be finite numbers"),
        ([[1.0, 2.0, 3.0, [4.0]]], "features must be finite numbers"),
        ([[1.0, 2.0, 3.0, 1j]], "features must be finite numbers"),
        (["1234"], "features must be a list of numbers"),
        ([1.0, 2.0, 3.0, 4.0], "features must be a list of numbers"),
        ("abcd", "features must be a list of rows"),
        ([], "at least one row"),
    ],
)
def test_invalid_features_are_rejected(registry: ModelRegistry, rows: Any, message: str) -> None:
    with pytest.raises(InvalidFeatures, match=message):
        registry.get("iris").predict(rows)


def test_batch_error_names_the_offending_instance(registry: ModelRegistry) -> None:
    rows = [[5.1, 3.5, 1.4, 0.2], [5.1, 3.5, 1.4]]
    with pytest.raises(InvalidFeatures, match=r"^instance 1: expected 4 features, got 3$"):
        registry.get("iris").predict(rows)
