"""ONNX Runtime serving: hash-checked before parsing, faithful to scikit-learn, and a conversion
that is not faithful is never served."""

import hmac
import json
from pathlib import Path
from typing import Any

import joblib
import pytest
from sklearn.linear_model import LogisticRegression

from ml import (
    Manifest,
    ModelRegistry,
    ModelUnavailable,
    onnx_export,
    read_manifest,
)
from ml.manifest import sha256_file
from ml.train import convert_version, register_model


def _load(model_dir: Path) -> ModelRegistry:
    registry = ModelRegistry(model_dir)
    registry.load()
    return registry


@pytest.mark.parametrize("offset", [0.5, -1], ids=["middle", "last-byte"])
def test_tampered_onnx_file_is_refused_before_parsing(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, offset: float
) -> None:
    path = model_dir / "iris" / "1" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset)] ^= 0x01
    path.write_bytes(bytes(data))
    parsed: list[bytes] = []
    monkeypatch.setattr("ml.loading.load_session", lambda model_bytes: parsed.append(model_bytes))

    registry = _load(model_dir)

    assert parsed == []
    [status] = registry.failed_versions()
    assert status.error == "ONNX artifact does not match the SHA-256 in its manifest"
    with pytest.raises(ModelUnavailable):
        registry.get("iris")


def test_onnx_hash_is_compared_in_constant_time(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real_compare = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr("ml.loading.hmac.compare_digest", spy)
    _load(model_dir)
    expected = sha256_file(model_dir / "iris" / "1" / "model.onnx")
    assert calls == [(expected, expected)]


def test_missing_onnx_file_fails_the_version_rather_than_unpickling(model_dir: Path) -> None:
    (model_dir / "iris" / "1" / "model.onnx").unlink()
    [status] = _load(model_dir).failed_versions()
    assert status.error == "ONNX artifact is missing or unreadable"


def test_convert_adds_onnx_to_a_pickle_only_version(pickle_model_dir: Path, iris: Any) -> None:
    version_dir = pickle_model_dir / "iris" / "1"
    assert _load(pickle_model_dir).get("iris").runtime == "sklearn"

    manifest = convert_version(version_dir, iris.data)

    assert manifest.runtime == "onnx"
    assert read_manifest(version_dir / "manifest.json").onnx_sha256 == sha256_file(
        version_dir / "model.onnx"
    )
    model = _load(pickle_model_dir).get("iris")
    assert model.runtime == "onnx"
    estimator = joblib.load(version_dir / "model.joblib")
    assert [p.prediction for p in model.predict(iris.data)] == estimator.predict(iris.data).tolist()


def test_convert_describes_a_version_whose_manifest_predates_model_type(
    pickle_model_dir: Path, iris: Any
) -> None:
    version_dir = pickle_model_dir / "iris" / "1"
    old = json.loads((version_dir / "manifest.json").read_text())
    old.pop("model_type")
    old.pop("parameters")
    (version_dir / "manifest.json").write_text(json.dumps(old))

    manifest = convert_version(version_dir, iris.data)

    assert manifest.model_type == "RandomForestClassifier"
    assert manifest.parameters is not None
    assert manifest.parameters["n_estimators"] == 100
    assert read_manifest(version_dir / "manifest.json") == manifest


def _register_logistic_regression(model_dir: Path, iris: Any) -> tuple[Any, Manifest]:
    estimator = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
    manifest = register_model(
        model_dir,
        "iris",
        estimator,
        feature_names=list(iris.feature_names),
        class_names=list(iris.target_names),
        reference=iris.data,
    )
    return estimator, manifest


def test_unfaithful_conversion_keeps_scikit_learn(
    model_dir: Path, iris: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tolerance no conversion can meet stands in for a converter that changes the results.
    monkeypatch.setattr(onnx_export, "PROBABILITY_TOLERANCE", -1.0)
    _, manifest = _register_logistic_regression(model_dir, iris)
    assert manifest.onnx_artifact is None
    assert not (model_dir / "iris" / manifest.version / "model.onnx").exists()
    assert _load(model_dir).get("iris", manifest.version).runtime == "sklearn"


def test_logistic_regression_converts_faithfully(model_dir: Path, iris: Any) -> None:
    estimator, manifest = _register_logistic_regression(model_dir, iris)
    model = _load(model_dir).get("iris", manifest.version)
    assert model.runtime == "onnx"
    expected = estimator.predict_proba(iris.data)
    for prediction, row in zip(model.predict(iris.data), expected.tolist(), strict=True):
        assert prediction.probability == pytest.approx(row, abs=1e-6)


def test_convert_refuses_a_tampered_pickle_without_unpickling_it(
    pickle_model_dir: Path, iris: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    version_dir = pickle_model_dir / "iris" / "1"
    with (version_dir / "model.joblib").open("ab") as fileobj:
        fileobj.write(b"tampered")
    monkeypatch.setattr(
        "joblib.load", lambda *_a, **_k: pytest.fail("a tampered pickle was loaded")
    )

    with pytest.raises(ValueError, match="does not match the SHA-256"):
        convert_version(version_dir, iris.data)
    assert not (version_dir / "model.onnx").exists()
