"""Where ``modelgate models pull`` gets a model: a SOURCE (``models:/`` from MLflow, ``s3://``,
``https://``, ``file://`` or a path) resolved into one downloaded artifact in a temporary
directory, with its SHA-256 checked against the one the operator gave and the one the source
publishes (an S3 object's SHA-256 checksum), before anything reads it.

What the artifact is (ONNX, skops or a pickle) is decided here, from MLflow's flavor or the file's
suffix; :mod:`ml.pull` decides what may be done with it.
"""

from __future__ import annotations

import hmac
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ml.manifest import sha256_file
from ml.sources.mlflow import fetch_mlflow
from ml.sources.remote import download_https, download_s3
from ml.sources.uri import ArtifactKind, Source, SourceError, parse_source, redact_url

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Fetched",
    "Source",
    "SourceConfig",
    "SourceError",
    "fetch",
    "parse_source",
    "redact_url",
]

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
_SUFFIX_KINDS: dict[str, ArtifactKind] = {
    ".onnx": "onnx",
    ".skops": "skops",
    ".joblib": "pickle",
    ".pkl": "pickle",
    ".pickle": "pickle",
}


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """Where the sources are: the MLflow tracking server, the S3 endpoint (None: AWS), and the
    largest artifact a pull downloads."""

    mlflow_tracking_uri: str | None = None
    s3_endpoint_url: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True, slots=True)
class Fetched:
    """One downloaded artifact, its digest verified where one was given or published."""

    path: Path
    kind: ArtifactKind
    sha256: str
    source: str  # the URI as recorded: no credentials
    source_version: str | None  # MLflow's version number, the S3 version id or ETag
    version_hint: str | None  # the version number to use by default (MLflow's)


def fetch(
    source: Source, workdir: Path, config: SourceConfig, *, expected_sha256: str | None
) -> Fetched:
    """Download ``source`` into ``workdir`` (a fresh temporary directory the caller removes) and
    check its SHA-256. Raises :class:`SourceError`."""
    published: str | None = None
    source_version: str | None = None
    hint: str | None = None
    if source.kind == "mlflow":
        artifact = fetch_mlflow(source, workdir, config.mlflow_tracking_uri)
        path, kind = artifact.path, artifact.kind
        source_version = hint = artifact.version
    else:
        name = urlsplit(source.location).path if source.kind == "https" else source.location
        kind = _kind_of(name)
        path = workdir / f"artifact{Path(name).suffix.lower()}"
        if source.kind == "https":
            if expected_sha256 is None:
                raise SourceError("an https:// source needs --sha256 (its artifact's SHA-256)")
            download_https(source.location, path, config.max_bytes)
        elif source.kind == "s3":
            assert source.bucket is not None  # noqa: S101 - parse_source sets it for s3
            published, source_version = download_s3(
                source.bucket, source.location, path, config.max_bytes, config.s3_endpoint_url
            )
        else:
            _copy_local(Path(source.location), path, config.max_bytes)
    if path.stat().st_size > config.max_bytes:
        raise SourceError(f"the artifact is larger than {config.max_bytes} bytes: refused")
    digest = sha256_file(path)
    if expected_sha256 is not None and not hmac.compare_digest(digest, expected_sha256):
        raise SourceError("the artifact's SHA-256 is not the one given (--sha256): refused")
    if published is not None and not hmac.compare_digest(digest, published):
        raise SourceError("the artifact's SHA-256 is not the one its store publishes: refused")
    return Fetched(path, kind, digest, source.recorded, source_version, hint)


def _kind_of(location: str) -> ArtifactKind:
    suffix = Path(location).suffix.lower()
    kind = _SUFFIX_KINDS.get(suffix)
    if kind is None:
        raise SourceError(
            "the artifact's name must end in .onnx or .skops (or .joblib/.pkl/.pickle, "
            "a pickle, refused without --allow-pickle)"
        )
    return kind


def _copy_local(origin: Path, target: Path, max_bytes: int) -> None:
    try:
        if not origin.is_file():
            raise SourceError(f"{origin}: no such file")
        if origin.stat().st_size > max_bytes:
            raise SourceError(f"{origin} is larger than {max_bytes} bytes: refused")
        shutil.copyfile(origin, target)
    except OSError as exc:
        raise SourceError(f"cannot read {origin}: {exc.strerror or type(exc).__name__}") from None
