"""Manifest validation, hashing and atomic writes."""

import hashlib
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ml import Manifest, read_manifest, sha256_file, write_manifest


def _fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": "iris",
        "version": "1",
        "artifact": "model.joblib",
        "sha256": "a" * 64,
        "sklearn_version": "1.9.1",
        "n_features": 2,
        "feature_names": ["a", "b"],
        "class_names": ["x", "y"],
        "created_at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    }
    fields.update(overrides)
    return fields


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom((1 << 20) * 2 + 123)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_manifest_round_trips_through_a_file(tmp_path: Path) -> None:
    manifest = Manifest(**_fields())
    path = tmp_path / "manifest.json"
    write_manifest(path, manifest)
    assert read_manifest(path) == manifest


def test_manifest_from_before_model_type_and_parameters_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(Manifest(**_fields()).model_dump_json(exclude={"model_type", "parameters"}))
    manifest = read_manifest(path)
    assert (manifest.model_type, manifest.parameters) == (None, None)


def test_manifest_keeps_model_type_and_json_parameters(tmp_path: Path) -> None:
    parameters = {"n_estimators": 100, "max_depth": None, "class_weight": {"0": 1.5}}
    manifest = Manifest(**_fields(model_type="RandomForestClassifier", parameters=parameters))
    path = tmp_path / "manifest.json"
    write_manifest(path, manifest)
    assert read_manifest(path).parameters == parameters
    with pytest.raises(ValidationError):
        Manifest(**_fields(parameters={"estimator": object()}))


def test_manifest_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        Manifest(**_fields(extra_field=1))


def test_manifest_requires_timezone_aware_created_at_and_stores_utc() -> None:
    with pytest.raises(ValidationError):
        Manifest(**_fields(created_at=datetime(2025, 1, 1)))
    plus_two = timezone(timedelta(hours=2))
    manifest = Manifest(**_fields(created_at=datetime(2025, 1, 1, 12, tzinfo=plus_two)))
    assert manifest.created_at == datetime(2025, 1, 1, 10, tzinfo=UTC)
    assert manifest.created_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize("artifact", ["../model.joblib", "/etc/passwd", "sub/model.joblib", ".x"])
def test_manifest_rejects_artifact_paths_outside_its_directory(artifact: str) -> None:
    with pytest.raises(ValidationError):
        Manifest(**_fields(artifact=artifact))


@pytest.mark.parametrize(
    "overrides",
    [
        {"feature_names": ["a"]},
        {"n_features": 0, "feature_names": []},
        {"sha256": "A" * 64},
        {"sha256": "a" * 63},
        {"version": "0"},
        {"version": "v1"},
        {"name": "../iris"},
        {"class_names": []},
    ],
)
def test_manifest_rejects_inconsistent_or_malformed_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Manifest(**_fields(**overrides))


def test_read_manifest_rejects_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="Invalid JSON"):
        read_manifest(path)


def test_failed_manifest_write_keeps_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "manifest.json"
    old = Manifest(**_fields())
    write_manifest(path, old)

    def failing_replace(*_args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(path, Manifest(**_fields(version="2")))
    assert read_manifest(path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
