"""Training the default model and registering model versions on disk."""

import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
import sklearn
from pydantic import JsonValue
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier

from ml.manifest import (
    ACTIVE_FILE,
    ARTIFACT_FILE,
    MANIFEST_FILE,
    NAME_PATTERN,
    ONNX_ARTIFACT_FILE,
    VERSION_PATTERN,
    FeatureRange,
    Manifest,
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    read_manifest,
    sha256_bytes,
    sha256_file,
    write_manifest,
)
from ml.onnx_export import ConversionError, convert
from ml.registry import DEFAULT_MODEL, load_verified_estimator

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(VERSION_PATTERN)
# Concurrent registrations of the same model race for the next number; give up eventually.
_MAX_VERSION_ATTEMPTS = 100
# Bounds on the hyperparameters recorded in a manifest (read back whole, at most 1 MiB): a
# parameter whose JSON is longer than _MAX_PARAMETER_CHARS is recorded as its clipped repr.
_MAX_PARAMETERS = 500
_MAX_PARAMETER_CHARS = 1000
_MAX_TEXT_CHARS = 200
_MAX_ITEMS = 100
_MAX_DEPTH = 3


def train_default(model_dir: Path) -> Manifest:
    """Train the benchmark model (a 100-tree random forest on iris) and register it as ``iris``."""
    iris = load_iris()
    estimator = RandomForestClassifier(n_estimators=100, random_state=0)
    estimator.fit(iris.data, iris.target)
    manifest = register_model(
        model_dir,
        DEFAULT_MODEL,
        estimator,
        feature_names=[str(name) for name in iris.feature_names],
        class_names=[str(name) for name in iris.target_names],
        reference=iris.data,
    )
    logger.info("trained model %s version %s", manifest.name, manifest.version)
    return manifest


def register_model(
    model_dir: Path,
    name: str,
    estimator: Any,
    feature_names: Sequence[str],
    class_names: Sequence[str],
    reference: npt.ArrayLike | None = None,
    input_range: Sequence[tuple[float, float]] | None = None,
) -> Manifest:
    """Store a fitted classifier as the next version of ``name`` and make it the active one.

    ``input_range`` (one ``(min, max)`` per feature) is what predictions may send; values
    outside it are refused. Without it, anything a float32 holds is accepted. The range of the
    ``reference`` rows is recorded as the training range, published but not enforced.

    With ``reference`` rows (the training data, say), the classifier is also converted to ONNX
    and the conversion is kept only if it matches scikit-learn on them; that version is then
    served by ONNX Runtime. Without them, or if the conversion is refused, scikit-learn serves it.

    ``class_names[i]`` names ``estimator.classes_[i]`` (the column order of ``predict_proba``).
    The version directory is assembled under a hidden temporary name and renamed into place, so
    a reader never sees a half-written version; ``ACTIVE`` is then replaced atomically.
    Raises ``ValueError`` if the name is invalid or the estimator does not fit the names given.
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}")
    _check_estimator(estimator, len(feature_names), len(class_names))
    accepted = (
        None
        if input_range is None
        else [FeatureRange(min=low, max=high) for low, high in input_range]
    )
    seen = None if reference is None else _observed_range(reference)

    name_dir = Path(model_dir) / name
    name_dir.mkdir(parents=True, exist_ok=True)
    # Hidden and not all digits, so the registry never mistakes it for a version.
    staging = name_dir / f".tmp-{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        artifact = staging / ARTIFACT_FILE
        with artifact.open("wb") as fileobj:
            joblib.dump(estimator, fileobj)
            fileobj.flush()
            os.fsync(fileobj.fileno())
        digest = sha256_file(artifact)
        onnx_digest = None
        if reference is not None:
            onnx_digest = _write_onnx(staging, name, estimator, reference)
        model_type, parameters = describe_estimator(estimator)
        created_at = datetime.now(UTC)
        for _ in range(_MAX_VERSION_ATTEMPTS):
            version = str(_next_version(name_dir))
            manifest = Manifest(
                name=name,
                version=version,
                artifact=ARTIFACT_FILE,
                sha256=digest,
                onnx_artifact=ONNX_ARTIFACT_FILE if onnx_digest else None,
                onnx_sha256=onnx_digest,
                sklearn_version=sklearn.__version__,
                n_features=len(feature_names),
                feature_names=list(feature_names),
                class_names=list(class_names),
                created_at=created_at,
                input_range=accepted,
                training_range=seen,
                model_type=model_type,
                parameters=parameters,
            )
            write_manifest(staging / MANIFEST_FILE, manifest)
            fsync_dir(staging)
            try:
                # Renaming onto an existing, non-empty directory fails, so a concurrent
                # registration that took this number first is detected rather than clobbered.
                staging.rename(name_dir / version)
            except OSError:
                if (name_dir / version).exists():
                    continue
                raise
            break
        else:
            raise RuntimeError(f"could not allocate a version number for model {name!r}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(name_dir)
    atomic_write_text(name_dir / ACTIVE_FILE, manifest.version + "\n")
    logger.info("registered model %s version %s as active", name, manifest.version)
    return manifest


def _observed_range(rows: npt.ArrayLike) -> list[FeatureRange]:
    """Each feature's smallest and largest value in ``rows``."""
    matrix = np.asarray(rows, dtype=np.float64)
    return [
        FeatureRange(min=float(low), max=float(high))
        for low, high in zip(matrix.min(axis=0), matrix.max(axis=0), strict=True)
    ]


def _write_onnx(directory: Path, name: str, estimator: Any, reference: npt.ArrayLike) -> str | None:
    """Convert and write ``model.onnx`` into ``directory``; its SHA-256, or None if refused."""
    try:
        model_bytes = convert(estimator, np.asarray(reference, dtype=np.float64))
    except ConversionError as exc:
        logger.warning("model %s stays on scikit-learn: %s", name, exc)
        return None
    atomic_write_bytes(directory / ONNX_ARTIFACT_FILE, model_bytes)
    return sha256_bytes(model_bytes)


def convert_version(version_dir: Path, reference: npt.ArrayLike | None = None) -> Manifest:
    """Add an ONNX file to an existing (joblib-only) version, checked against ``reference``.

    Without reference rows, 2,000 seeded random rows spread over [-10, 10] are used: a weaker
    check than real data, so pass the training data when you have it. Raises
    :class:`ConversionError` if the model cannot be converted faithfully, ``ValueError`` if the
    pickle does not match its manifest.
    """
    manifest = read_manifest(version_dir / MANIFEST_FILE)
    if manifest.onnx_artifact is not None:
        return manifest
    # Unpickled here, in an operator's command, through the registry's hash check; never at
    # serve time once the ONNX file exists.
    estimator = load_verified_estimator(manifest, version_dir)
    if reference is None:
        generator = np.random.default_rng(0)
        reference = generator.uniform(-10, 10, size=(2000, manifest.n_features))
    model_bytes = convert(estimator, np.asarray(reference, dtype=np.float64))
    atomic_write_bytes(version_dir / ONNX_ARTIFACT_FILE, model_bytes)
    update: dict[str, Any] = {
        "onnx_artifact": ONNX_ARTIFACT_FILE,
        "onnx_sha256": sha256_bytes(model_bytes),
    }
    if manifest.model_type is None:
        # A manifest older than these fields: the estimator is at hand, so describe it now.
        update["model_type"], update["parameters"] = describe_estimator(estimator)
    updated = manifest.model_copy(update=update)
    write_manifest(version_dir / MANIFEST_FILE, updated)
    return updated


def describe_estimator(estimator: Any) -> tuple[str, dict[str, JsonValue]]:
    """The estimator's class name and its hyperparameters (``get_params()``) as JSON-safe
    values, for the manifest: serving reads them from there and never unpickles to describe a
    version.

    Numbers, strings, booleans and None are kept (numpy scalars and small arrays become their
    Python equivalents, NaN and infinities their names), lists, tuples and dicts are converted
    item by item, and anything else (a nested estimator, a random state) becomes its clipped
    ``repr``. An estimator without ``get_params`` is described by its type alone.
    """
    model_type = type(estimator).__name__
    get_params = getattr(estimator, "get_params", None)
    if not callable(get_params):
        return model_type, {}
    try:
        raw = get_params()
    except Exception as exc:
        logger.warning(
            "%s.get_params raised %s; no parameters recorded", model_type, type(exc).__name__
        )
        return model_type, {}
    if not isinstance(raw, dict):
        return model_type, {}
    parameters: dict[str, JsonValue] = {}
    for key in sorted(raw, key=str)[:_MAX_PARAMETERS]:
        value = _json_safe(raw[key], 0)
        if len(json.dumps(value)) > _MAX_PARAMETER_CHARS:
            value = _clipped_repr(raw[key])
        parameters[str(key)] = value
    return model_type, parameters


def _json_safe(value: Any, depth: int) -> JsonValue:
    if isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, np.ndarray) and value.size <= _MAX_ITEMS:
        value = value.tolist()
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        # JSON has no NaN or infinity.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value[:_MAX_TEXT_CHARS]
    if depth < _MAX_DEPTH:
        if isinstance(value, list | tuple) and len(value) <= _MAX_ITEMS:
            return [_json_safe(item, depth + 1) for item in value]
        if isinstance(value, dict) and len(value) <= _MAX_ITEMS:
            return {str(key): _json_safe(item, depth + 1) for key, item in value.items()}
    return _clipped_repr(value)


def _clipped_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _MAX_TEXT_CHARS else text[: _MAX_TEXT_CHARS - 3] + "..."


def has_model(model_dir: Path, name: str = DEFAULT_MODEL) -> bool:
    """Whether ``name`` has at least one version directory with a manifest and an artifact.

    This only looks at the files (no hash check); it answers "train if absent".
    """
    name_dir = Path(model_dir) / name
    try:
        candidates = list(name_dir.iterdir())
    except OSError:
        return False
    return any(
        _VERSION_RE.fullmatch(path.name)
        and (path / MANIFEST_FILE).is_file()
        and (path / ARTIFACT_FILE).is_file()
        for path in candidates
    )


def _next_version(name_dir: Path) -> int:
    """One more than the highest existing version directory (failed versions count too)."""
    versions = [
        int(path.name)
        for path in name_dir.iterdir()
        if path.is_dir() and _VERSION_RE.fullmatch(path.name)
    ]
    return max(versions, default=0) + 1


def _check_estimator(estimator: Any, n_features: int, n_classes: int) -> None:
    """Refuse to register something the registry would later mark failed."""
    if not callable(getattr(estimator, "predict_proba", None)):
        raise ValueError("estimator must be a fitted classifier with predict_proba")
    n_in = getattr(estimator, "n_features_in_", None)
    if n_in is None:
        raise ValueError("estimator must be fitted (it has no n_features_in_)")
    if int(n_in) != n_features:
        raise ValueError(f"estimator expects {n_in} features but {n_features} names were given")
    classes = getattr(estimator, "classes_", None)
    if classes is not None and len(classes) != n_classes:
        raise ValueError(
            f"estimator has {len(classes)} classes but {n_classes} class names were given"
        )
