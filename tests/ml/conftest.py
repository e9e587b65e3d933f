"""Fixtures for the model layer: the real iris model, trained once per session."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from ml import ModelRegistry
from ml.train import register_model


@pytest.fixture(scope="session")
def trained_model_dir(trained_iris: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding ``iris`` version 1, trained once (tests.conftest.trained_iris)
    and never modified."""
    model_dir = tmp_path_factory.mktemp("trained") / "models"
    shutil.copytree(trained_iris, model_dir)
    return model_dir


@pytest.fixture
def model_dir(trained_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the trained model directory that a test may tamper with."""
    copy = tmp_path / "models"
    shutil.copytree(trained_model_dir, copy)
    return copy


@pytest.fixture
def pickle_model_dir(model_dir: Path) -> Path:
    """The private copy with its ONNX file removed: version 1 is served by scikit-learn, as a
    registry from before ONNX conversion is."""
    version_dir = model_dir / "iris" / "1"
    (version_dir / "model.onnx").unlink()
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest.pop("onnx_artifact")
    manifest.pop("onnx_sha256")
    (version_dir / "manifest.json").write_text(json.dumps(manifest))
    return model_dir


@pytest.fixture(scope="session")
def iris() -> Any:
    """scikit-learn's bundled iris data set."""
    return load_iris()


@pytest.fixture
def register_second_version(model_dir: Path, iris: Any) -> Any:
    """Register a different, cheap classifier as the next ``iris`` version."""

    def register() -> str:
        estimator = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
        manifest = register_model(
            model_dir,
            "iris",
            estimator,
            feature_names=list(iris.feature_names),
            class_names=list(iris.target_names),
        )
        return manifest.version

    return register


@pytest.fixture
def registry(model_dir: Path) -> ModelRegistry:
    """A registry loaded from the private model directory."""
    loaded = ModelRegistry(model_dir)
    loaded.load()
    return loaded
