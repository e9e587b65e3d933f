"""Loading model versions: hash verification, failures, active version, lookups."""

import hmac
import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import joblib
import pytest

from ml import ModelNotFound, ModelRegistry, ModelUnavailable, sha256_file


def _load(model_dir: Path) -> ModelRegistry:
    registry = ModelRegistry(model_dir)
    registry.load()
    return registry


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _append_bytes(path: Path) -> None:
    with path.open("ab") as fileobj:
        fileobj.write(b"\x00trailing")


@pytest.mark.parametrize("tamper", [_flip_a_byte, _append_bytes], ids=["flip", "append"])
def test_tampered_artifact_is_refused_before_unpickling(
    pickle_model_dir: Path,
    register_second_version: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    tamper: Callable[[Path], None],
) -> None:
    model_dir = pickle_model_dir
    register_second_version()
    tampered_dir = model_dir / "iris" / "2"
    tamper(tampered_dir / "model.joblib")

    real_load = joblib.load
    loaded_from: list[Path] = []

    def spy(fileobj: Any, *args: Any, **kwargs: Any) -> Any:
        source = Path(fileobj.name)
        if source.parent == tampered_dir:
            pytest.fail("joblib.load was called on an artifact whose SHA-256 does not match")
        loaded_from.append(source.parent)
        return real_load(fileobj, *args, **kwargs)

    # Patch the name exactly as ml.loading looks it up.
    monkeypatch.setattr("joblib.load", spy)
    registry = _load(model_dir)

    assert loaded_from == [model_dir / "iris" / "1"]
    failed = registry.failed_versions()
    assert [(s.name, s.version, s.state) for s in failed] == [("iris", "2", "failed")]
    assert failed[0].error == "model artifact does not match the SHA-256 in its manifest"
    with pytest.raises(ModelUnavailable):
        registry.get("iris", "2")
    # ACTIVE says 2, and 2 is failed: no other version serves in its place (issue 11), but a
    # request that pins version 1 is still served.
    with pytest.raises(
        ModelUnavailable, match=r"model 'iris' is unavailable: its active version 2"
    ):
        registry.get("iris")
    assert registry.get("iris", "1").version == "1"
    assert registry.active_version("iris") is None
    assert not registry.is_ready
    [problem] = registry.problems()
    assert (problem.name, problem.version) == ("iris", "2")
    assert "does not match the SHA-256" in problem.reason


def test_hash_is_compared_in_constant_time(
    pickle_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = pickle_model_dir
    calls: list[tuple[str, str]] = []
    real_compare = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr("ml.loading.hmac.compare_digest", spy)
    _load(model_dir)
    expected = sha256_file(model_dir / "iris" / "1" / "model.joblib")
    assert calls == [(expected, expected)]


def test_model_with_only_failed_versions_is_unavailable_and_not_ready(
    pickle_model_dir: Path,
) -> None:
    model_dir = pickle_model_dir
    _flip_a_byte(model_dir / "iris" / "1" / "model.joblib")
    registry = _load(model_dir)

    assert not registry.is_ready
    with pytest.raises(ModelUnavailable, match="its active version 1 is failed"):
        registry.get("iris")
    info = registry.model_info("iris")
    # Version 1 stays the active one (ACTIVE names it), and the description says why it is
    # not served.
    assert info.active_version == "1"
    assert info.unavailable_reason is not None
    assert "does not match the SHA-256" in info.unavailable_reason
    assert registry.active_version("iris") is None
    assert [v.state for v in info.versions] == ["failed"]
    # The schema is still described from the (trusted, matching) manifest.
    assert info.n_features == 4


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda d: (d / "model.joblib").unlink(), "model artifact is missing or unreadable"),
        (lambda d: (d / "manifest.json").unlink(), "manifest is missing"),
        (lambda d: (d / "manifest.json").write_text("{oops"), "manifest is unreadable or invalid"),
        (
            lambda d: (d / "manifest.json").write_text('{"name": "iris"}'),
            "manifest is unreadable or invalid",
        ),
    ],
    ids=["no-artifact", "no-manifest", "bad-json", "incomplete-manifest"],
)
def test_broken_version_is_failed_with_a_safe_message(
    pickle_model_dir: Path,
    register_second_version: Callable[[], str],
    damage: Callable[[Path], object],
    error: str,
) -> None:
    model_dir = pickle_model_dir
    register_second_version()
    damage(model_dir / "iris" / "1")
    registry = _load(model_dir)

    [status] = registry.failed_versions()
    assert status.version == "1"
    assert status.error == error
    assert str(model_dir) not in error
    assert registry.get("iris", "2").version == "2"


def test_artifact_that_is_not_a_pickle_is_failed(pickle_model_dir: Path) -> None:
    model_dir = pickle_model_dir
    version_dir = model_dir / "iris" / "1"
    (version_dir / "model.joblib").write_bytes(b"not a pickle at all")
    _rewrite_manifest(version_dir, sha256=sha256_file(version_dir / "model.joblib"))
    registry = _load(model_dir)
    [status] = registry.failed_versions()
    assert status.error == "model artifact could not be loaded"


def test_manifest_declaring_a_different_feature_count_is_failed(pickle_model_dir: Path) -> None:
    model_dir = pickle_model_dir
    _rewrite_manifest(
        model_dir / "iris" / "1", n_features=3, feature_names=["a", "b", "c"], training_range=None
    )
    registry = _load(model_dir)
    [status] = registry.failed_versions()
    assert status.error == "model expects 4 features but its manifest declares 3"


def test_manifest_whose_version_disagrees_with_its_directory_is_failed(model_dir: Path) -> None:
    (model_dir / "iris" / "1").rename(model_dir / "iris" / "3")
    registry = _load(model_dir)
    [status] = registry.failed_versions()
    assert (status.version, status.state) == ("3", "failed")
    assert status.error == "manifest name or version does not match its directory"
    assert status.manifest is None


def test_manifest_whose_name_disagrees_with_its_directory_is_failed(model_dir: Path) -> None:
    shutil.copytree(model_dir / "iris", model_dir / "other")
    registry = _load(model_dir)
    assert registry.get("iris").version == "1"
    [status] = registry.failed_versions()
    assert (status.name, status.version) == ("other", "1")
    with pytest.raises(ModelUnavailable):
        registry.get("other")


def test_half_written_temp_directory_and_stray_files_are_ignored(model_dir: Path) -> None:
    iris_dir = model_dir / "iris"
    staging = iris_dir / ".tmp-0123456789abcdef"
    staging.mkdir()
    (staging / "model.joblib").write_bytes(b"half written")
    (iris_dir / "notes.txt").write_text("hello")
    (iris_dir / "latest").mkdir()
    (iris_dir / "007").mkdir()
    (model_dir / "README").write_text("stray")
    (model_dir / ".hidden").mkdir()

    registry = _load(model_dir)
    [info] = registry.models()
    assert info.name == "iris"
    assert [v.version for v in info.versions] == ["1"]
    assert registry.failed_versions() == []


def test_active_file_selects_the_served_version(
    model_dir: Path, register_second_version: Callable[[], str]
) -> None:
    register_second_version()
    (model_dir / "iris" / "ACTIVE").write_text("1\n")
    assert _load(model_dir).get("iris").version == "1"

    (model_dir / "iris" / "ACTIVE").write_text("garbage")
    assert _load(model_dir).get("iris").version == "2"

    (model_dir / "iris" / "ACTIVE").unlink()
    assert _load(model_dir).get("iris").version == "2"


def test_unknown_model_or_version_raises_model_not_found(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFound, match=r"^model not found$"):
        registry.get("nope")
    with pytest.raises(ModelNotFound, match="has no such version"):
        registry.get("iris", "9")
    with pytest.raises(ModelNotFound, match="not found"):
        registry.model_info("nope")
    with pytest.raises(ModelNotFound) as caught:
        registry.get("<script>" * 20)
    assert "<script>" not in str(caught.value)


def test_models_describes_versions_and_input_schema(registry: ModelRegistry) -> None:
    [info] = registry.models()
    assert info.name == "iris"
    assert info.active_version == "1"
    assert [(v.version, v.state, v.error) for v in info.versions] == [("1", "ready", None)]
    assert info.n_features == 4
    assert info.feature_names == [
        "sepal length (cm)",
        "sepal width (cm)",
        "petal length (cm)",
        "petal width (cm)",
    ]
    assert info.class_names == ["setosa", "versicolor", "virginica"]


def test_registry_without_models_is_not_ready(tmp_path: Path) -> None:
    registry = _load(tmp_path / "missing")
    assert not registry.is_ready
    assert registry.models() == []
    assert registry.failed_versions() == []
    assert registry.active_version() is None
    with pytest.raises(ModelNotFound):
        registry.get("iris")


def test_reload_picks_up_new_versions(
    registry: ModelRegistry, register_second_version: Callable[[], str]
) -> None:
    held = registry.get("iris")
    register_second_version()
    assert registry.get("iris").version == "1"
    registry.load()
    assert registry.get("iris").version == "2"
    # A model obtained before the reload keeps working.
    assert held.predict([[5.1, 3.5, 1.4, 0.2]])[0].class_name == "setosa"


def _rewrite_manifest(version_dir: Path, **changes: Any) -> None:
    path = version_dir / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_loaded_model_records_when_this_process_loaded_it(model_dir: Path) -> None:
    before = datetime.now(UTC)
    model = _load(model_dir).get("iris")
    assert before <= model.loaded_at <= datetime.now(UTC)
    assert model.loaded_at.utcoffset() == timedelta(0)
