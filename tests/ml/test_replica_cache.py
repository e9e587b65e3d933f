"""Each replica's model directory as a verified cache of the store (ml.replica_cache through
ml.registry): a catalogued version not on this disk is fetched when it is loaded, activated or
pinned; a local copy that disagrees with the catalogue is not trusted; a copy corrupted after it
was loaded is fetched again by the self-check (bounded tries), and refused until it verifies."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml import ModelNotFound, ModelRegistry, ModelUnavailable, read_manifest
from ml.manifest import MANIFEST_FILE
from ml.observe import set_fetch_observer
from ml.store import LocalStore


@pytest.fixture
def published(model_dir: Path, tmp_path: Path) -> tuple[LocalStore, str]:
    """``iris`` version 1 in a store of its own, and its manifest's text (the catalogue's)."""
    store = LocalStore(tmp_path / "store")
    version_dir = model_dir / "iris" / "1"
    store.put_version(version_dir, read_manifest(version_dir / MANIFEST_FILE))
    return store, (version_dir / MANIFEST_FILE).read_text()


@pytest.fixture
def fetches() -> Iterator[list[tuple[str, str]]]:
    """Every fetch ml reports, as (model, outcome)."""
    seen: list[tuple[str, str]] = []
    set_fetch_observer(lambda model, outcome: seen.append((model, outcome)))
    yield seen
    set_fetch_observer(None)


def _replica(tmp_path: Path, store: LocalStore, manifest: str) -> ModelRegistry:
    """A replica with an empty model directory that knows the catalogue."""
    registry = ModelRegistry(tmp_path / "replica", store)
    registry.learn_catalogue([manifest])
    registry.cache.backoff_seconds = 0.01
    registry.load()
    return registry


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_activated_version_is_fetched_verified_and_served(
    published: tuple[LocalStore, str], tmp_path: Path, fetches: list[tuple[str, str]]
) -> None:
    store, manifest = published
    registry = _replica(tmp_path, store, manifest)
    assert registry.models() == []  # nothing on this disk yet

    registry.set_active("iris", "1")
    assert registry.active_version("iris") == "1"
    assert registry.get("iris").version == "1"
    local = tmp_path / "replica" / "iris" / "1"
    assert (local / MANIFEST_FILE).read_text() == manifest  # the catalogue's, byte for byte
    assert fetches == [("iris", "fetched")]
    # No staging directory is left behind.
    assert sorted(path.name for path in local.parent.iterdir()) == ["1"]


def test_a_version_the_catalogue_lacks_is_not_fetched(
    published: tuple[LocalStore, str], tmp_path: Path
) -> None:
    store, manifest = published
    registry = _replica(tmp_path, store, manifest)
    with pytest.raises(ModelNotFound):
        registry.load_version("iris", "2")
    with pytest.raises(ModelNotFound):
        registry.get("iris", "2")


def test_a_pinned_version_not_here_answers_unavailable_while_it_is_fetched(
    published: tuple[LocalStore, str], tmp_path: Path
) -> None:
    store, manifest = published
    registry = _replica(tmp_path, store, manifest)
    with pytest.raises(ModelUnavailable, match="being fetched"):
        registry.get("iris", "1")
    deadline = time.monotonic() + 30
    while True:
        try:
            assert registry.get("iris", "1").version == "1"
            break
        except ModelUnavailable:
            assert time.monotonic() < deadline, "the pinned version was never fetched"
            time.sleep(0.05)


def test_a_local_manifest_that_disagrees_with_the_catalogue_is_replaced_by_the_store_copy(
    published: tuple[LocalStore, str], model_dir: Path, tmp_path: Path
) -> None:
    store, manifest = published
    # This replica's disk has iris 1 with a manifest of its own (its files match it).
    local = tmp_path / "replica" / "iris" / "1"
    local.parent.mkdir(parents=True)
    (model_dir / "iris" / "1").rename(local)
    edited = json.loads((local / MANIFEST_FILE).read_text())
    edited["metrics"] = {"accuracy": 1.0}
    (local / MANIFEST_FILE).write_text(json.dumps(edited))

    registry = _replica(tmp_path, store, manifest)
    assert registry.get("iris", "1").manifest.metrics is None
    assert (local / MANIFEST_FILE).read_text() == manifest


def test_without_a_store_a_disagreeing_local_manifest_is_refused(
    published: tuple[LocalStore, str], model_dir: Path
) -> None:
    _, manifest = published
    edited = json.loads(manifest)
    edited["metrics"] = {"accuracy": 1.0}
    (model_dir / "iris" / "1" / MANIFEST_FILE).write_text(json.dumps(edited))
    registry = ModelRegistry(model_dir)
    registry.learn_catalogue([manifest])
    registry.load()
    [status] = registry.failed_versions()
    assert status.error == "its local manifest does not match the catalogue"


def test_a_copy_corrupted_after_loading_is_fetched_again_by_the_self_check(
    published: tuple[LocalStore, str], tmp_path: Path, fetches: list[tuple[str, str]]
) -> None:
    store, manifest = published
    registry = _replica(tmp_path, store, manifest)
    registry.set_active("iris", "1")
    onnx = tmp_path / "replica" / "iris" / "1" / "model.onnx"
    good = onnx.read_bytes()
    _corrupt(onnx)

    registry.self_check()
    assert onnx.read_bytes() == good
    assert registry.failed_versions() == []
    assert registry.get("iris").version == "1"
    assert fetches == [("iris", "fetched"), ("iris", "refetched")]


def test_a_copy_that_cannot_be_fetched_again_is_refused_until_it_verifies(
    published: tuple[LocalStore, str], tmp_path: Path, fetches: list[tuple[str, str]]
) -> None:
    store, manifest = published
    registry = _replica(tmp_path, store, manifest)
    registry.set_active("iris", "1")
    _corrupt(tmp_path / "replica" / "iris" / "1" / "model.onnx")
    stored = store.root / "iris" / "1" / "model.onnx"
    good = stored.read_bytes()
    _corrupt(stored)  # the store's copy too: every try is refused

    registry.self_check()
    with pytest.raises(ModelUnavailable):
        registry.get("iris")
    assert not (tmp_path / "replica" / "iris" / "1").exists()  # the corrupt copy is discarded
    [status] = registry.failed_versions()
    assert status.state == "unhealthy"
    assert status.error is not None
    assert "fetching it from the model store failed" in status.error
    assert [outcome for _, outcome in fetches] == ["fetched", "failed", "failed", "failed"]
    [problem] = registry.problems()
    assert "fetching it from the model store failed" in problem.reason

    stored.write_bytes(good)  # the store is repaired: the next check brings it back
    registry.self_check()
    assert registry.failed_versions() == []
    assert registry.get("iris").version == "1"
