"""The model lifecycle in the registry: registering with an explicit version (joblib or ONNX),
several versions loaded at once, activation, no fallback, and the periodic self-check."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from auth.model_activation import MODEL_NAME_PATTERN, MODEL_VERSION_PATTERN
from ml import ModelNotFound, ModelRegistry, ModelUnavailable
from ml.manifest import NAME_PATTERN, VERSION_PATTERN
from ml.onnx_export import convert
from ml.train import register_model, register_onnx


def _load(model_dir: Path) -> ModelRegistry:
    registry = ModelRegistry(model_dir)
    registry.load()
    return registry


def _states(registry: ModelRegistry, name: str = "iris") -> dict[str, str]:
    return {status.version: status.state for status in registry.model_info(name).versions}


def _logistic(iris: Any) -> LogisticRegression:
    return LogisticRegression(max_iter=1000).fit(iris.data, iris.target)


def test_auth_checks_the_registry_s_own_name_and_version_patterns() -> None:
    # auth does not import ml: the activation service keeps a copy, which must not drift.
    assert MODEL_NAME_PATTERN == NAME_PATTERN
    assert MODEL_VERSION_PATTERN == VERSION_PATTERN


def test_register_with_an_explicit_version_writes_a_full_manifest_and_activates_nothing(
    model_dir: Path, iris: Any
) -> None:
    manifest = register_model(
        model_dir,
        "iris",
        _logistic(iris),
        feature_names=list(iris.feature_names),
        class_names=list(iris.target_names),
        reference=iris.data,
        version="7",
        activate=False,
        metrics={"accuracy": 0.97},
    )
    assert manifest.version == "7"
    assert manifest.runtime == "onnx"  # converted and checked against the reference rows
    assert manifest.metrics == {"accuracy": 0.97}
    assert manifest.framework_versions is not None
    assert {"scikit-learn", "onnxruntime", "numpy"} <= set(manifest.framework_versions)
    assert manifest.training_range is not None
    assert manifest.training_range[0].min == float(iris.data[:, 0].min())
    # Registering is not activating: version 1 stays the active one.
    assert (model_dir / "iris" / "ACTIVE").read_text().strip() == "1"
    registry = _load(model_dir)
    assert registry.get("iris").version == "1"
    assert registry.get("iris", "7").runtime == "onnx"


@pytest.mark.parametrize(
    ("name", "version"),
    [("../escape", "2"), ("iris", "../../2"), ("iris", "0"), ("iris/..", "2"), ("", "2")],
)
def test_register_refuses_a_name_or_version_that_is_not_a_registry_path(
    model_dir: Path, iris: Any, name: str, version: str
) -> None:
    before = sorted(str(p) for p in model_dir.parent.rglob("*"))
    with pytest.raises(ValueError, match="invalid"):
        register_model(
            model_dir,
            name,
            _logistic(iris),
            feature_names=list(iris.feature_names),
            class_names=list(iris.target_names),
            version=version,
        )
    assert sorted(str(p) for p in model_dir.parent.rglob("*")) == before


def test_register_refuses_a_version_that_exists(model_dir: Path, iris: Any) -> None:
    with pytest.raises(ValueError, match="already has a version 1"):
        register_model(
            model_dir,
            "iris",
            _logistic(iris),
            feature_names=list(iris.feature_names),
            class_names=list(iris.target_names),
            version="1",
        )


def test_an_onnx_file_is_registered_checked_and_served_without_a_pickle(
    model_dir: Path, iris: Any
) -> None:
    model_bytes = convert(_logistic(iris), iris.data)
    manifest = register_onnx(
        model_dir,
        "flowers",
        model_bytes,
        class_names=list(iris.target_names),
        reference=iris.data,
        version="3",
    )
    assert manifest.n_features == 4
    assert manifest.feature_names == [f"feature_{i}" for i in range(4)]
    assert manifest.artifact == manifest.onnx_artifact == "model.onnx"
    assert sorted(p.name for p in (model_dir / "flowers" / "3").iterdir()) == [
        "manifest.json",
        "model.onnx",
    ]
    model = _load(model_dir).get("flowers")
    assert model.runtime == "onnx"
    assert model.predict([iris.data[0].tolist()])[0].class_name == "setosa"


def test_an_onnx_file_that_is_not_a_classifier_is_refused(model_dir: Path) -> None:
    from ml import ConversionError

    with pytest.raises(ConversionError):
        register_onnx(model_dir, "junk", b"not an onnx model", version="1")
    assert not (model_dir / "junk" / "1").exists()


def test_a_request_may_pin_any_ready_version_while_another_is_active(
    registry: ModelRegistry, register_second_version: Callable[[], str]
) -> None:
    version = register_second_version()
    registry.load()
    assert registry.get("iris").version == version
    assert registry.get("iris", "1").version == "1"
    assert registry.get("iris", version).version == version


def test_set_active_switches_loads_on_demand_and_survives_a_reload(
    registry: ModelRegistry, register_second_version: Callable[[], str]
) -> None:
    assert registry.get("iris").version == "1"
    # Registered after the registry loaded: set_active loads it first.
    version = register_second_version()
    registry.set_active("iris", version)
    assert registry.get("iris").version == version
    assert registry.activations() == {"iris": version}
    registry.set_active("iris", "1")  # rollback
    assert registry.get("iris").version == "1"
    # The ACTIVE file now says 2; the activation still wins after a rescan.
    registry.load()
    assert registry.get("iris").version == "1"


def test_activating_a_broken_version_never_falls_back_to_another(
    registry: ModelRegistry, register_second_version: Callable[[], str], model_dir: Path
) -> None:
    version = register_second_version()
    onnx = model_dir / "iris" / version / "model.joblib"
    onnx.write_bytes(onnx.read_bytes() + b"x")
    with pytest.raises(ModelUnavailable, match="does not match the SHA-256"):
        registry.load_version("iris", version)
    registry.set_active("iris", version)
    with pytest.raises(
        ModelUnavailable, match=f"model 'iris' is unavailable: its active version {version}"
    ):
        registry.get("iris")
    assert registry.get("iris", "1").version == "1"
    assert [p.name for p in registry.problems()] == ["iris"]
    # A version the registry does not have at all: the same refusal, never version 1.
    registry.set_active("iris", "99")
    with pytest.raises(ModelUnavailable, match="not in the registry"):
        registry.get("iris")


@pytest.mark.parametrize(
    ("name", "version"),
    [("..", "1"), ("iris", ".."), ("iris", "1/../1"), ("../models/iris", "1"), ("iris", "-1")],
)
def test_load_version_reads_nothing_outside_the_registry(
    registry: ModelRegistry, name: str, version: str
) -> None:
    with pytest.raises(ModelNotFound):
        registry.load_version(name, version)
    registry.set_active(name, version)  # ignored
    assert registry.get("iris").version == "1"


def test_a_version_directory_linked_to_outside_the_registry_is_not_read(
    registry: ModelRegistry, model_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (model_dir / "iris" / "5").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelNotFound):
        registry.load_version("iris", "5")


def test_self_check_marks_a_tampered_version_unhealthy_and_serves_it_again_once_restored(
    model_dir: Path, register_second_version: Callable[[], str]
) -> None:
    version = register_second_version()  # served by scikit-learn (no reference rows)
    registry = _load(model_dir)
    artifact = model_dir / "iris" / version / "model.joblib"
    original = artifact.read_bytes()
    artifact.write_bytes(original + b"tampered")

    registry.self_check()

    assert _states(registry) == {"1": "ready", version: "unhealthy"}
    [failed] = registry.failed_versions()
    assert failed.error == "model artifact does not match the SHA-256 in its manifest"
    with pytest.raises(ModelUnavailable, match="is unhealthy"):
        registry.get("iris")  # the active version: never version 1 in its place
    with pytest.raises(ModelUnavailable):
        registry.get("iris", version)
    assert registry.get("iris", "1").version == "1"

    artifact.write_bytes(original)
    registry.self_check()
    assert _states(registry) == {"1": "ready", version: "ready"}
    assert registry.get("iris").version == version


def test_self_check_reloads_a_version_whose_canary_answer_changed(registry: ModelRegistry) -> None:
    broken = registry.get("iris")
    # The loaded model goes wrong in memory (its files are intact).
    broken._predict_proba = lambda matrix: np.full((len(matrix), 3), 1 / 3)  # type: ignore[misc]

    registry.self_check()

    reloaded = registry.get("iris")
    assert reloaded is not broken
    assert reloaded.version == "1"
    assert _states(registry) == {"1": "ready"}


def test_self_check_loads_versions_registered_since_the_last_scan(
    registry: ModelRegistry, register_second_version: Callable[[], str]
) -> None:
    version = register_second_version()
    registry.self_check()
    assert _states(registry) == {"1": "ready", version: "ready"}
    # Found, not activated: the active version changes only by an activation.
    assert registry.get("iris").version == "1"


def test_manifest_of_a_registered_version_is_valid_json_with_created_time(
    model_dir: Path, iris: Any
) -> None:
    register_model(
        model_dir,
        "iris",
        _logistic(iris),
        feature_names=list(iris.feature_names),
        class_names=list(iris.target_names),
        version="4",
        activate=False,
    )
    document = json.loads((model_dir / "iris" / "4" / "manifest.json").read_text())
    assert re.match(r"^\d{4}-\d\d-\d\dT", document["created_at"])
    assert document["class_names"] == list(iris.target_names)
