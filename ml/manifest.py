"""The manifest that describes one model version on disk, and safe file-writing helpers."""

import contextlib
import hashlib
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, BinaryIO

import numpy as np
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

MANIFEST_FILE = "manifest.json"
ARTIFACT_FILE = "model.joblib"
ONNX_ARTIFACT_FILE = "model.onnx"
ACTIVE_FILE = "ACTIVE"

# Names become directory names and appear in client-facing messages, so keep them boring.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
VERSION_PATTERN = r"^[1-9][0-9]{0,8}$"
# A bare file name that starts with an alphanumeric: no separators, so no "../" escapes.
ARTIFACT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# The longest source URI a manifest records (``modelgate models pull``).
MAX_SOURCE_CHARS = 2048

# The largest magnitude a feature may have by default: what a float32 holds. scikit-learn's
# trees compute in float32, where anything larger becomes infinite.
FLOAT32_MAX = float(np.finfo(np.float32).max)

# A manifest is a few hundred bytes; refusing huge files keeps a corrupt one from eating memory.
MAX_MANIFEST_BYTES = 1 << 20
_CHUNK_SIZE = 1 << 20


class FeatureRange(BaseModel):
    """The closed interval of values one feature takes (or may take)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX, allow_inf_nan=False)]
    max: Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX, allow_inf_nan=False)]

    @model_validator(mode="after")
    def _ordered(self) -> "FeatureRange":
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


DEFAULT_FEATURE_RANGE = FeatureRange(min=-FLOAT32_MAX, max=FLOAT32_MAX)


class Manifest(BaseModel):
    """Metadata of one model version; ``sha256`` pins the exact artifact that may be unpickled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    version: Annotated[str, Field(pattern=VERSION_PATTERN)]
    artifact: Annotated[str, Field(pattern=ARTIFACT_PATTERN)] = ARTIFACT_FILE
    sha256: Annotated[str, Field(pattern=SHA256_PATTERN)]
    # The ONNX conversion of the artifact, when one exists: served instead of the pickle.
    onnx_artifact: Annotated[str, Field(pattern=ARTIFACT_PATTERN)] | None = None
    onnx_sha256: Annotated[str, Field(pattern=SHA256_PATTERN)] | None = None
    sklearn_version: Annotated[str, Field(min_length=1, max_length=64)]
    n_features: Annotated[int, Field(ge=1)]
    feature_names: list[str]
    class_names: Annotated[list[str], Field(min_length=1)]
    created_at: AwareDatetime
    # What a prediction may send, per feature: set by the operator at registration, or else
    # what the model's float32 input holds. Enforced.
    input_range: list[FeatureRange] | None = None
    # What the training data held, per feature: published so that clients can see when they
    # leave it, never enforced.
    training_range: list[FeatureRange] | None = None
    # What the artifact is (the estimator's class name) and its hyperparameters (JSON-safe),
    # recorded when it is registered so that describing a version never needs its pickle.
    # Manifests written before these fields existed have neither.
    model_type: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    parameters: dict[str, JsonValue] | None = None
    # The libraries that wrote the version ("scikit-learn", "onnx", "skl2onnx", "numpy"...), and
    # the metrics the operator gave at registration (accuracy on a test set, say); published.
    framework_versions: dict[str, Annotated[str, Field(max_length=64)]] | None = None
    metrics: dict[str, JsonValue] | None = None
    # Where a pulled version came from (``modelgate models pull``): the source URI without any
    # credentials (no userinfo, no query), and the source's own id for it (MLflow's version
    # number, an S3 object version or ETag). None for a version trained or registered here.
    source: Annotated[str, Field(min_length=1, max_length=MAX_SOURCE_CHARS)] | None = None
    source_version: Annotated[str, Field(min_length=1, max_length=200)] | None = None

    @field_validator("created_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _feature_names_match_count(self) -> "Manifest":
        if len(self.feature_names) != self.n_features:
            raise ValueError("feature_names must have exactly n_features entries")
        if (self.onnx_artifact is None) != (self.onnx_sha256 is None):
            raise ValueError("onnx_artifact and onnx_sha256 go together")
        for field in ("input_range", "training_range"):
            ranges = getattr(self, field)
            if ranges is not None and len(ranges) != self.n_features:
                raise ValueError(f"{field} must have exactly n_features entries")
        return self

    @property
    def accepted_range(self) -> list[FeatureRange]:
        """The range each feature must be in for a prediction to be served."""
        return list(self.input_range or [DEFAULT_FEATURE_RANGE] * self.n_features)

    @property
    def runtime(self) -> str:
        """What serves this version: ``onnx`` when it has an ONNX file, else ``sklearn``."""
        return "onnx" if self.onnx_artifact is not None else "sklearn"


def sha256_fileobj(fileobj: BinaryIO) -> str:
    """Hex SHA-256 of everything from the current position of a binary file, read in chunks."""
    digest = hashlib.sha256()
    while chunk := fileobj.read(_CHUNK_SIZE):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes already in memory."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file, streamed so large artifacts never sit in memory whole."""
    with Path(path).open("rb") as fileobj:
        return sha256_fileobj(fileobj)


def read_manifest(path: Path) -> Manifest:
    """Read and validate a manifest file.

    Raises ``OSError`` if it cannot be read and ``ValueError`` (including pydantic's
    ``ValidationError``) if it is too large or not a valid manifest.
    """
    with path.open("rb") as fileobj:
        data = fileobj.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError("manifest file is too large")
    return Manifest.model_validate_json(data)


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write a manifest as indented JSON, atomically."""
    atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a mix.

    The temporary file lives in the same directory because ``os.replace`` is only atomic within
    one file system; it is fsynced before the rename so a crash cannot leave an empty file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # os.open with 0o666 honours the umask, unlike mkstemp's fixed 0600, so another service
    # account can still read what we publish.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fileobj:
            fileobj.write(data)
            fileobj.flush()
            os.fsync(fileobj.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text variant of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename into it survives a crash (best effort off POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        # Some platforms and file systems refuse fsync on directories; durability there is
        # whatever the OS gives us.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
