"""Fixtures for the model layer: the real iris model, trained once per session."""

import shutil
from pathlib import Path
from typing import Any

import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from ml import ModelRegistry, register_model, train_default


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding ``iris`` version 1, trained once and never modified."""
    model_dir = tmp_path_factory.mktemp("trained") / "models"
    train_default(model_dir)
    return model_dir


@pytest.fixture
def model_dir(trained_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the trained model directory that a test may tamper with."""
    copy = tmp_path / "models"
    shutil.copytree(trained_model_dir, copy)
    return copy


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
