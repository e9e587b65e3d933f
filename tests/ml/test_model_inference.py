"""Predictions: correctness, input validation and running off the event loop."""

import asyncio
import threading
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from ml import InvalidFeatures, LoadedModel, ModelRegistry
from ml.model import INLINE_MAX_ROWS, Runtime
from ml.train import register_model


@pytest.mark.parametrize(
    ("directory", "runtime"),
    [("model_dir", "onnx"), ("pickle_model_dir", "sklearn")],
    ids=["onnx", "sklearn"],
)
def test_both_runtimes_match_scikit_learn_on_the_training_data(
    directory: str, runtime: str, iris: Any, request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue(directory)
    registry = ModelRegistry(model_dir)
    registry.load()
    model = registry.get("iris")
    assert model.runtime == runtime
    estimator = joblib.load(model_dir / "iris" / "1" / "model.joblib")
    rows = iris.data.tolist()

    predictions = model.predict(rows)

    expected = estimator.predict(iris.data)
    expected_proba = estimator.predict_proba(iris.data)
    assert [p.prediction for p in predictions] == expected.tolist()
    # Every class's probability, in the estimator's class order.
    for prediction, row in zip(predictions, expected_proba.tolist(), strict=True):
        assert prediction.probability == pytest.approx(row, abs=1e-6)
    assert [p.class_name for p in predictions] == [iris.target_names[i] for i in expected]
    assert all(type(p.prediction) is int for p in predictions)
    assert all(type(v) is float for p in predictions for v in p.probability)


def test_onnx_version_is_served_without_unpickling(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        pytest.fail("a version with an ONNX file was unpickled")

    monkeypatch.setattr("joblib.load", refuse)
    registry = ModelRegistry(model_dir)
    registry.load()
    assert registry.get("iris").runtime == "onnx"
    assert registry.get("iris").predict([[6.7, 3.0, 5.2, 2.3]])[0].class_name == "virginica"


def test_single_row_predicts_its_class(registry: ModelRegistry) -> None:
    [prediction] = registry.get("iris").predict([[6.7, 3.0, 5.2, 2.3]])
    assert (prediction.prediction, prediction.class_name) == (2, "virginica")
    assert len(prediction.probability) == 3
    assert sum(prediction.probability) == pytest.approx(1.0)
    assert max(prediction.probability) == prediction.probability[2]
    assert 0.5 < prediction.probability[2] <= 1.0


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


def _recorded(registry: ModelRegistry, model_dir: Path, runtime: Runtime) -> Any:
    loaded = registry.get("iris")
    recorder = _ThreadRecordingEstimator(joblib.load(model_dir / "iris" / "1" / "model.joblib"))
    return recorder, LoadedModel(loaded.manifest, recorder.predict_proba, runtime)


@pytest.mark.asyncio
async def test_predict_async_runs_scikit_learn_off_the_event_loop_thread(
    registry: ModelRegistry, model_dir: Path
) -> None:
    recorder, model = _recorded(registry, model_dir, "sklearn")

    predictions = await model.predict_async([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])

    assert [p.class_name for p in predictions] == ["setosa", "virginica"]
    assert len(recorder.threads) == 1
    assert recorder.threads[0] != threading.get_ident()


@pytest.mark.asyncio
async def test_predict_async_runs_onnx_inline_unless_the_batch_is_large(
    registry: ModelRegistry, model_dir: Path
) -> None:
    recorder, model = _recorded(registry, model_dir, "onnx")

    await model.predict_async([[5.1, 3.5, 1.4, 0.2]] * INLINE_MAX_ROWS)
    await model.predict_async([[5.1, 3.5, 1.4, 0.2]] * (INLINE_MAX_ROWS + 1))

    inline, threaded = recorder.threads
    assert inline == threading.get_ident()
    assert threaded != threading.get_ident()


@pytest.mark.asyncio
async def test_predict_async_rejects_bad_features_without_calling_the_estimator(
    registry: ModelRegistry, model_dir: Path
) -> None:
    recorder, model = _recorded(registry, model_dir, "sklearn")
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
        ([[1.0, 2.0, 3.0, float("nan")]], r"feature \d \(.*\) must be a finite number between"),
        ([[1.0, 2.0, 3.0, float("inf")]], r"feature \d \(.*\) must be a finite number between"),
        # Finite in JSON and float64, infinite in the float32 that scikit-learn's trees use.
        ([[1e300, 2.0, 3.0, 4.0]], r"feature \d \(.*\) must be a finite number between"),
        (
            [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, -1e39, 4.0]],
            r"instance 1: feature 2 \(.*\) must be a finite number",
        ),
        ([[1.0, 2.0, 3.0, float("-inf")]], r"feature \d \(.*\) must be a finite number between"),
        (
            [[1.0, 2.0, 3.0, np.float32("nan")]],
            r"feature \d \(.*\) must be a finite number between",
        ),
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


@pytest.mark.asyncio
async def test_concurrent_onnx_requests_share_one_call_and_keep_their_own_rows(
    registry: ModelRegistry, model_dir: Path
) -> None:
    recorder, model = _recorded(registry, model_dir, "onnx")
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]

    single, pair, other = await asyncio.gather(
        model.predict_async([rows[0]]),
        model.predict_async([rows[1], rows[2]]),
        model.predict_async([rows[2]]),
    )

    assert len(recorder.threads) == 1  # one runtime call for the three requests
    assert [p.class_name for p in single] == ["setosa"]
    assert [p.class_name for p in pair] == ["virginica", "versicolor"]
    assert [p.class_name for p in other] == ["versicolor"]


def test_training_range_is_recorded_and_not_enforced(registry: ModelRegistry, iris: Any) -> None:
    model = registry.get("iris")
    recorded = model.manifest.training_range
    assert recorded is not None
    assert [r.min for r in recorded] == [float(v) for v in iris.data.min(axis=0)]
    assert [r.max for r in recorded] == [float(v) for v in iris.data.max(axis=0)]
    # Far outside what training saw, inside what the model's input holds: served.
    assert model.predict([[100.0, -100.0, 1e30, 0.0]])[0].class_name in iris.target_names


def _register_with_range(model_dir: Path, iris: Any, bounds: list[tuple[float, float]]) -> None:
    """Register a cheap iris classifier as the next version, with operator bounds."""
    register_model(
        model_dir,
        "iris",
        LogisticRegression(max_iter=1000).fit(iris.data, iris.target),
        feature_names=list(iris.feature_names),
        class_names=list(iris.target_names),
        input_range=bounds,
    )


def test_operator_input_range_is_enforced_per_feature(model_dir: Path, iris: Any) -> None:
    bounds = [(0.0, 10.0), (0.0, 10.0), (0.5, 8.0), (0.0, 3.0)]
    _register_with_range(model_dir, iris, bounds)
    registry = ModelRegistry(model_dir)
    registry.load()
    model = registry.get("iris", "2")
    assert [(r.min, r.max) for r in model.manifest.accepted_range] == bounds
    assert model.predict([[5.0, 3.0, 0.5, 3.0]])  # the edges are inside
    with pytest.raises(InvalidFeatures, match=r"feature 2 \('petal length \(cm\)'\)") as caught:
        model.predict([[5.0, 3.0, 1.4, 0.2], [5.0, 3.0, 0.4, 0.2]])
    assert (caught.value.row, caught.value.feature) == (1, 2)
    with pytest.raises(InvalidFeatures, match="between 0 and 3"):
        model.predict([[5.0, 3.0, 1.4, 3.01]])
    # The first version keeps its own (default) range.
    assert registry.get("iris", "1").predict([[5.0, 3.0, 0.4, 3.5]])


def test_input_range_must_fit_the_float32_input(model_dir: Path, iris: Any) -> None:
    for bounds in ([(0.0, 1e39)] * 4, [(2.0, 1.0)] * 4, [(0.0, 1.0)] * 3):
        with pytest.raises(ValueError, match=r"less than or equal|n_features|min must not"):
            _register_with_range(model_dir, iris, bounds)
