"""`modelgate models convert` brings a registry from before ONNX conversion onto ONNX Runtime."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_iris

from ml import ModelRegistry
from tests.e2e.servers import BIN, run_cli

pytestmark = pytest.mark.e2e


def test_convert_command_moves_a_pickle_only_version_to_onnx(
    served_model_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(served_model_dir, models)
    version_dir = models / "iris" / "1"
    (version_dir / "model.onnx").unlink()
    manifest = json.loads((version_dir / "manifest.json").read_text())
    del manifest["onnx_artifact"], manifest["onnx_sha256"]
    (version_dir / "manifest.json").write_text(json.dumps(manifest))
    reference = tmp_path / "iris.csv"
    np.savetxt(reference, load_iris().data, delimiter=",")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MODELGATE_")}
    environment.update(
        {
            "PATH": f"{BIN}{os.pathsep}{environment.get('PATH', '')}",
            "MODELGATE_MODEL_DIR": str(models),
            "MODELGATE_VAR_DIR": str(tmp_path / "var"),
        }
    )

    result = run_cli(environment, tmp_path, "models", "convert", "--reference", str(reference))

    assert "iris version 1: served by onnx" in result.stdout
    registry = ModelRegistry(models)
    registry.load()
    assert registry.get("iris").runtime == "onnx"
    again = run_cli(
        environment, tmp_path, "models", "convert", "--reference", "missing.csv", check=False
    )
    assert again.returncode != 0
    assert "cannot read" in again.stdout + again.stderr
