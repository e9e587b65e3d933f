"""Training the default model and registering versions."""

import json
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import sklearn
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from ml import ModelRegistry, sha256_file
from ml.train import describe_estimator, has_model, register_model, train_default


def test_training_writes_artifact_and_manifest_with_matching_sha256(model_dir: Path) -> None:
    version_dir = model_dir / "iris" / "1"
    manifest = json.loads((version_dir / "manifest.json").read_text())

    assert manifest["name"] == "iris"
    assert manifest["version"] == "1"
    assert manifest["artifact"] == "model.joblib"
    assert manifest["sha256"] == sha256_file(version_dir / "model.joblib")
    assert manifest["onnx_artifact"] == "model.onnx"
    assert manifest["onnx_sha256"] == sha256_file(version_dir / "model.onnx")
    assert manifest["sklearn_version"] == sklearn.__version__
    assert manifest["n_features"] == 4
    assert len(manifest["feature_names"]) == 4
    assert manifest["class_names"] == ["setosa", "versicolor", "virginica"]
    assert (model_dir / "iris" / "ACTIVE").read_text().strip() == "1"


def test_training_leaves_no_temporary_files(model_dir: Path) -> None:
    assert sorted(p.name for p in (model_dir / "iris").iterdir()) == ["1", "ACTIVE"]
    assert sorted(p.name for p in (model_dir / "iris" / "1").iterdir()) == [
        "manifest.json",
        "model.joblib",
        "model.onnx",
    ]


def test_train_default_returns_utc_manifest(tmp_path: Path) -> None:
    manifest = train_default(tmp_path)
    assert manifest.version == "1"
    assert manifest.created_at.tzinfo is not None
    assert manifest.created_at.utcoffset() == UTC.utcoffset(None)


def test_manifest_records_the_estimator_type_and_hyperparameters(model_dir: Path) -> None:
    manifest = json.loads((model_dir / "iris" / "1" / "manifest.json").read_text())
    assert manifest["model_type"] == "RandomForestClassifier"
    parameters = manifest["parameters"]
    assert parameters == RandomForestClassifier(n_estimators=100, random_state=0).get_params()
    assert (parameters["n_estimators"], parameters["random_state"]) == (100, 0)


def test_described_parameters_are_json_safe_and_bounded() -> None:
    imputer = SimpleImputer(missing_values=np.nan, fill_value=np.float32(1.5))
    pipeline = make_pipeline(imputer, LogisticRegression(C=np.float64(0.5), class_weight={0: 2}))
    model_type, parameters = describe_estimator(pipeline)
    assert model_type == "Pipeline"
    # Strict JSON: no NaN, no numpy types, no objects.
    json.dumps(parameters, allow_nan=False)
    assert parameters["simpleimputer__missing_values"] == "nan"
    assert parameters["simpleimputer__fill_value"] == 1.5
    assert parameters["logisticregression__C"] == 0.5
    assert parameters["logisticregression__class_weight"] == {"0": 2}
    assert (
        parameters["logisticregression"]
        == "LogisticRegression(C=np.float64(0.5), class_weight={0: 2})"
    )
    assert parameters["steps"][0] == ["simpleimputer", repr(imputer)]

    class Odd:
        def get_params(self) -> dict[str, Any]:
            return {"big": list(range(10_000)), "long": "x" * 10_000, "inf": float("-inf")}

    assert describe_estimator(Odd()) == (
        "Odd",
        {"big": repr(list(range(10_000)))[:197] + "...", "inf": "-inf", "long": "x" * 200},
    )
    assert describe_estimator(object()) == ("object", {})


def test_default_model_is_the_100_tree_random_forest_benchmark(model_dir: Path) -> None:
    estimator = joblib.load(model_dir / "iris" / "1" / "model.joblib")
    assert isinstance(estimator, RandomForestClassifier)
    assert estimator.n_estimators == 100
    assert len(estimator.estimators_) == 100
    assert estimator.random_state == 0


def test_second_registration_becomes_version_2_and_active(
    model_dir: Path, register_second_version: Callable[[], str]
) -> None:
    assert register_second_version() == "2"
    assert (model_dir / "iris" / "ACTIVE").read_text().strip() == "2"
    registry = ModelRegistry(model_dir)
    registry.load()
    assert registry.get("iris").manifest.version == "2"


def test_both_versions_are_servable_at_once(
    model_dir: Path, register_second_version: Callable[[], str], iris: Any
) -> None:
    register_second_version()
    registry = ModelRegistry(model_dir)
    registry.load()

    first = registry.get("iris", "1")
    second = registry.get("iris", "2")
    row = [list(iris.data[0])]
    assert first.version == "1"
    assert second.version == "2"
    assert first.predict(row)[0].class_name == "setosa"
    assert second.predict(row)[0].class_name == "setosa"
    # Different estimators: the forest is certain of this row, logistic regression is not.
    assert first.predict(row)[0].probability != second.predict(row)[0].probability


def test_next_version_follows_the_highest_existing_one(
    model_dir: Path, register_second_version: Callable[[], str]
) -> None:
    (model_dir / "iris" / "7").mkdir()
    assert register_second_version() == "8"


def test_has_model_needs_a_complete_version_directory(tmp_path: Path, model_dir: Path) -> None:
    assert has_model(model_dir)
    assert not has_model(model_dir, "other")
    assert not has_model(tmp_path / "missing")

    half = tmp_path / "half"
    (half / "iris" / ".tmp-abc").mkdir(parents=True)
    (half / "iris" / ".tmp-abc" / "model.joblib").write_bytes(b"partial")
    (half / "iris" / "2").mkdir()
    assert not has_model(half)


def test_register_model_refuses_names_that_do_not_fit_the_estimator(
    tmp_path: Path, iris: Any
) -> None:
    estimator = joblib.load  # anything without predict_proba
    with pytest.raises(ValueError, match="predict_proba"):
        register_model(tmp_path, "iris", estimator, ["a"], ["x"])

    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(iris.data, iris.target)
    with pytest.raises(ValueError, match="expects 4 features"):
        register_model(tmp_path, "iris", forest, ["a", "b"], list(iris.target_names))
    with pytest.raises(ValueError, match="3 classes"):
        register_model(tmp_path, "iris", forest, list(iris.feature_names), ["only-one"])
    with pytest.raises(ValueError, match="invalid model name"):
        register_model(tmp_path, "../evil", forest, list(iris.feature_names), ["a", "b", "c"])
    assert not (tmp_path / "iris").exists() or not any((tmp_path / "iris").iterdir())


def test_failed_registration_leaves_no_version_behind(
    tmp_path: Path, iris: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(iris.data, iris.target)

    def failing_dump(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(joblib, "dump", failing_dump)
    with pytest.raises(OSError, match="disk full"):
        register_model(tmp_path, "iris", forest, list(iris.feature_names), list(iris.target_names))
    assert list((tmp_path / "iris").iterdir()) == []
