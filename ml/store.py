"""The model store: where published versions' files live, shared by every replica
(``MODELGATE_MODEL_STORE``): a directory (local or shared) or an S3 bucket (AWS, MinIO, Ceph,
GCS's S3 endpoint). Each replica's model directory is a cache of it (:mod:`ml.replica_cache`).

Layout, the registry's own::

    <root or s3://bucket/prefix>/<name>/<version>/<artifact files>
    <root or s3://bucket/prefix>/<name>/<version>/manifest.json   (written last)

The store is never trusted: a fetch verifies each file's SHA-256, as it streams, against the
manifest the caller passes (the one recorded in the database's catalogue), and a file that
differs is deleted and the fetch refused. The manifest in the store is written last, so a
version whose put was interrupted has none; but the commit point of a publication is its row in
the catalogue, not the store.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from ml.manifest import MANIFEST_FILE, NAME_PATTERN, VERSION_PATTERN, Manifest, fsync_dir

logger = logging.getLogger(__name__)

_CHUNK_SIZE = 1 << 20
# No artifact is larger: a store that streams more is refused before it fills the disk.
MAX_ARTIFACT_BYTES = 8 << 30
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-/]{0,512}$")


class StoreError(Exception):
    """A version could not be put in or fetched from the store; the message is client-safe
    (no path, key, credential or digest)."""


class DigestMismatch(StoreError):
    """A file fetched from the store does not have the SHA-256 its manifest records."""


def artifact_files(manifest: Manifest) -> list[tuple[str, str]]:
    """The version's artifact files and their SHA-256s (each file once)."""
    files = {manifest.artifact: manifest.sha256}
    if manifest.onnx_artifact is not None and manifest.onnx_sha256 is not None:
        files[manifest.onnx_artifact] = manifest.onnx_sha256
    return sorted(files.items())


def _checked(name: str, version: str) -> tuple[str, str]:
    # Names and versions become path segments and keys: never anything but the registry's own.
    if not (re.fullmatch(NAME_PATTERN, name) and re.fullmatch(VERSION_PATTERN, version)):
        raise StoreError("invalid model name or version")
    return name, version


def _write_verified(chunks: Iterable[bytes], destination: Path, expected: str) -> None:
    """Write ``chunks`` to ``destination``, hashing them on the way; keep the file only if its
    SHA-256 is ``expected``. Raises :class:`DigestMismatch` (the file is removed)."""
    digest = hashlib.sha256()
    size = 0
    try:
        with destination.open("xb") as fileobj:
            for chunk in chunks:
                size += len(chunk)
                if size > MAX_ARTIFACT_BYTES:
                    raise DigestMismatch("a file in the store is larger than any artifact")
                digest.update(chunk)
                fileobj.write(chunk)
            fileobj.flush()
            os.fsync(fileobj.fileno())
        if not hmac.compare_digest(digest.hexdigest(), expected):
            raise DigestMismatch(
                "a file fetched from the store does not match the SHA-256 in the catalogue"
            )
    except BaseException:
        destination.unlink(missing_ok=True)
        raise


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fileobj:
        while chunk := fileobj.read(_CHUNK_SIZE):
            yield chunk


class ModelStore(Protocol):
    """Where published versions' files are kept."""

    @property
    def location(self) -> str:
        """Where the store is, for logs and messages (never a credential)."""
        ...

    def put_version(self, version_dir: Path, manifest: Manifest) -> None:
        """Copy a staged version's files into the store: its artifacts first, its manifest last.
        Raises :class:`StoreError`."""
        ...

    def fetch_version(self, manifest: Manifest, destination: Path) -> None:
        """Write the version's artifact files into the existing directory ``destination``, each
        verified against ``manifest`` while it streams (not the manifest file: the caller writes
        the catalogue's). Raises :class:`DigestMismatch` or :class:`StoreError`."""
        ...

    def has_version(self, name: str, version: str) -> bool:
        """Whether the store holds the version completely (its manifest, written last)."""
        ...


class LocalStore:
    """A directory as the store: on this machine, or a shared mount."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def location(self) -> str:
        """The directory."""
        return str(self.root)

    def _dir(self, name: str, version: str) -> Path:
        name, version = _checked(name, version)
        return self.root / name / version

    def put_version(self, version_dir: Path, manifest: Manifest) -> None:
        """Copy the files (each under a hidden name, then renamed), the manifest last."""
        target = self._dir(manifest.name, manifest.version)
        if target.resolve() == Path(version_dir).resolve():
            return  # the version was staged in the store itself (no store: the model directory)
        try:
            self._put(version_dir, manifest, target)
        except OSError as exc:
            logger.warning("model store: writing failed (%s)", type(exc).__name__)
            raise StoreError("the version could not be written to the model store") from None

    def _put(self, version_dir: Path, manifest: Manifest, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for file_name, sha256 in [*artifact_files(manifest), (MANIFEST_FILE, None)]:
            temporary = target / f".{file_name}.{secrets.token_hex(8)}.tmp"
            source = Path(version_dir) / file_name
            try:
                if sha256 is None:
                    _write_verified(_file_chunks(source), temporary, _sha256_of(source))
                else:
                    _write_verified(_file_chunks(source), temporary, sha256)
                os.replace(temporary, target / file_name)
            finally:
                temporary.unlink(missing_ok=True)
        fsync_dir(target)

    def fetch_version(self, manifest: Manifest, destination: Path) -> None:
        """Copy and verify each artifact file."""
        source = self._dir(manifest.name, manifest.version)
        for file_name, sha256 in artifact_files(manifest):
            try:
                _write_verified(_file_chunks(source / file_name), destination / file_name, sha256)
            except FileNotFoundError:
                raise StoreError("the version's files are not in the model store") from None
            except OSError:
                raise StoreError("the model store could not be read") from None
        fsync_dir(destination)

    def has_version(self, name: str, version: str) -> bool:
        """Whether the version's manifest is in the directory."""
        return (self._dir(name, version) / MANIFEST_FILE).is_file()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


class S3Store:
    """An S3 bucket (and key prefix) as the store, through boto3 (:func:`ml.s3.s3_client`)."""

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client: Any = None
    ) -> None:
        if not _BUCKET_RE.fullmatch(bucket):
            raise ValueError("invalid S3 bucket name")
        if not _PREFIX_RE.fullmatch(prefix) or ".." in prefix.split("/"):
            raise ValueError("invalid S3 key prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self._client = client

    @property
    def location(self) -> str:
        """The bucket and prefix."""
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use (boto3 is imported only then)."""
        if self._client is None:
            from ml.s3 import s3_client

            self._client = s3_client(self.endpoint_url)
        return self._client

    def _key(self, name: str, version: str, file_name: str) -> str:
        name, version = _checked(name, version)
        return "/".join(part for part in (self.prefix, name, version, file_name) if part)

    def put_version(self, version_dir: Path, manifest: Manifest) -> None:
        """Upload the artifacts, then the manifest."""
        files = [name for name, _ in artifact_files(manifest)] + [MANIFEST_FILE]
        for file_name in files:
            key = self._key(manifest.name, manifest.version, file_name)
            try:
                self.client.upload_file(str(Path(version_dir) / file_name), self.bucket, key)
            except Exception as exc:
                logger.warning("model store: upload failed (%s)", type(exc).__name__)
                raise StoreError("the version could not be written to the model store") from None

    def fetch_version(self, manifest: Manifest, destination: Path) -> None:
        """Stream each artifact from S3 to ``destination``, verified on the way."""
        for file_name, sha256 in artifact_files(manifest):
            key = self._key(manifest.name, manifest.version, file_name)
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except Exception as exc:
                logger.warning("model store: download failed (%s)", type(exc).__name__)
                raise StoreError(
                    "the version's files could not be read from the model store"
                ) from None
            try:
                _write_verified(body.iter_chunks(_CHUNK_SIZE), destination / file_name, sha256)
            except StoreError:
                raise
            except Exception as exc:
                logger.warning("model store: download failed (%s)", type(exc).__name__)
                raise StoreError(
                    "the version's files could not be read from the model store"
                ) from None
            finally:
                body.close()
        fsync_dir(destination)

    def has_version(self, name: str, version: str) -> bool:
        """Whether the version's manifest object exists."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name, version, MANIFEST_FILE))
        except Exception as exc:
            response = getattr(exc, "response", None) or {}
            if str(response.get("Error", {}).get("Code")) in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise StoreError("the model store could not be read") from None
        return True


def open_store(
    location: str, model_dir: Path, endpoint_url: str | None = None
) -> ModelStore | None:
    """The store ``MODELGATE_MODEL_STORE`` names: ``s3://bucket/prefix``, ``file:///path`` or a
    path; None when it is empty (the model directory is the store: nothing is fetched). Raises
    ``ValueError`` for anything else."""
    location = location.strip()
    if not location:
        return None
    parts = urlsplit(location)
    if parts.scheme == "s3":
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("an s3:// store is s3://bucket/prefix, nothing else")
        return S3Store(parts.netloc, parts.path.lstrip("/"), endpoint_url or None)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ValueError("a file:// store is file:///absolute/path")
        root = Path(unquote(parts.path))
    elif parts.scheme == "" or re.fullmatch(r"[A-Za-z]", parts.scheme):
        root = Path(location)  # a path (a one-letter scheme is a Windows drive)
    else:
        raise ValueError("the model store is a path, a file:// URL or an s3:// URL")
    if Path(root).resolve() == Path(model_dir).resolve():
        return None  # the model directory itself: exactly as without a store
    return LocalStore(root)
