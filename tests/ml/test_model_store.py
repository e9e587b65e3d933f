"""The model store (ml.store): a version put in a directory or an S3 bucket (a real moto_server,
through boto3 with its defaults) and fetched back, each file verified against the manifest while
it streams, so that a store that hands back other bytes is refused and leaves nothing behind."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml import read_manifest
from ml.manifest import MANIFEST_FILE
from ml.s3 import s3_client
from ml.store import DigestMismatch, LocalStore, ModelStore, S3Store, StoreError, open_store
from tests.e2e.servers import MOTO_CREDENTIALS, moto_server


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """A moto_server for this module's tests."""
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard AWS chain's variables, moto's; nothing else of the caller's AWS set-up."""
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    for name, value in MOTO_CREDENTIALS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["local", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, moto_endpoint: str, aws_credentials: None
) -> ModelStore:
    """An empty store of each kind."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    s3_client(moto_endpoint).create_bucket(Bucket=bucket)
    return S3Store(bucket, "team/prod", moto_endpoint)


def _tamper(store: ModelStore, name: str, version: str, file_name: str) -> None:
    """Change one byte of a file in the store, behind its back."""
    if isinstance(store, LocalStore):
        path = store.root / name / version / file_name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return
    assert isinstance(store, S3Store)
    key = f"{store.prefix}/{name}/{version}/{file_name}"
    body = bytearray(store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(body))


def test_a_version_put_in_the_store_is_fetched_back_verified(
    store: ModelStore, model_dir: Path, tmp_path: Path
) -> None:
    version_dir = model_dir / "iris" / "1"
    manifest = read_manifest(version_dir / MANIFEST_FILE)
    assert not store.has_version("iris", "1")

    store.put_version(version_dir, manifest)
    assert store.has_version("iris", "1")
    assert not store.has_version("iris", "2")

    destination = tmp_path / "fetched"
    destination.mkdir()
    store.fetch_version(manifest, destination)
    # The artifacts only: the caller writes the catalogue's manifest beside them.
    assert sorted(path.name for path in destination.iterdir()) == ["model.joblib", "model.onnx"]
    for file_name in ("model.joblib", "model.onnx"):
        assert (destination / file_name).read_bytes() == (version_dir / file_name).read_bytes()


def test_a_file_changed_in_the_store_is_refused_while_streaming_and_not_kept(
    store: ModelStore, model_dir: Path, tmp_path: Path
) -> None:
    version_dir = model_dir / "iris" / "1"
    manifest = read_manifest(version_dir / MANIFEST_FILE)
    store.put_version(version_dir, manifest)
    _tamper(store, "iris", "1", "model.onnx")

    destination = tmp_path / "fetched"
    destination.mkdir()
    with pytest.raises(DigestMismatch, match="does not match the SHA-256 in the catalogue"):
        store.fetch_version(manifest, destination)
    assert not (destination / "model.onnx").exists()


def test_a_version_missing_from_the_store_is_a_store_error(
    store: ModelStore, model_dir: Path, tmp_path: Path
) -> None:
    manifest = read_manifest(model_dir / "iris" / "1" / MANIFEST_FILE)
    destination = tmp_path / "fetched"
    destination.mkdir()
    with pytest.raises(StoreError) as raised:
        store.fetch_version(manifest, destination)
    assert str(tmp_path) not in str(raised.value)
    assert list(destination.iterdir()) == []


def test_names_that_would_leave_the_store_are_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    for name, version in (("..", "1"), ("iris", "../1"), ("iris/../x", "1")):
        with pytest.raises(StoreError):
            store.has_version(name, version)


def test_the_store_setting_names_a_directory_a_file_url_or_a_bucket(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    assert open_store("", model_dir) is None
    assert open_store(str(model_dir), model_dir) is None  # the model directory is the store
    local = open_store(f"file://{tmp_path}/shared", model_dir)
    assert isinstance(local, LocalStore)
    assert local.root == tmp_path / "shared"
    assert isinstance(open_store(str(tmp_path / "other"), model_dir), LocalStore)
    s3 = open_store("s3://team-models/prod/models", model_dir, "http://127.0.0.1:9000")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == (
        "team-models",
        "prod/models",
        "http://127.0.0.1:9000",
    )
    for bad in ("s3://BAD_BUCKET/x", "https://example.com/models", "s3://bucket/../x"):
        with pytest.raises(ValueError, match=r"invalid|store is"):
            open_store(bad, model_dir)
