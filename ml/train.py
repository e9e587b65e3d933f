"""Training the default model and registering model versions on disk."""

import importlib
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
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

from ml.loading import load_verified_estimator
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
from ml.onnx_export import (
    PROBABILITIES_OUTPUT,
    ConversionError,
    convert,
    load_session,
    predict_probabilities,
)
from ml.registry import DEFAULT_MODEL

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


def train_default(model_dir: Path, version: str | None = None) -> Manifest:
    """Train the benchmark model (a 100-tree random forest on iris) and register it as ``iris``
    (version ``version``, else the next number in ``model_dir``)."""
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
        version=version,
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
    *,
    version: str | None = None,
    activate: bool = True,
    conversion_rows: npt.ArrayLike | None = None,
    metrics: dict[str, JsonValue] | None = None,
    source: str | None = None,
    source_version: str | None = None,
) -> Manifest:
    """Store a fitted classifier as a new version of ``name`` (the next number unless
    ``version`` is given) and, with ``activate``, make it the active one (its ``ACTIVE`` file).

    ``input_range`` (one ``(min, max)`` per feature) is what predictions may send; values
    outside it are refused. Without it, anything a float32 holds is accepted. The range of the
    ``reference`` rows is recorded as the training range, published but not enforced.

    With ``reference`` rows (the training data, say), or else ``conversion_rows``, the
    classifier is also converted to ONNX and the conversion is kept only if it matches
    scikit-learn on them; that version is then served by ONNX Runtime. Without them, or if the
    conversion is refused, scikit-learn serves it.

    ``class_names[i]`` names ``estimator.classes_[i]`` (the column order of ``predict_proba``).
    The version directory is assembled under a hidden temporary name and renamed into place, so
    a reader never sees a half-written version; ``ACTIVE`` is then replaced atomically.
    ``source`` and ``source_version`` record where a pulled version came from (ml.pull).
    Raises ``ValueError`` if the name or version is invalid or taken, or the estimator does not
    fit the names given.
    """
    _check_estimator(estimator, len(feature_names), len(class_names))
    accepted = (
        None
        if input_range is None
        else [FeatureRange(min=low, max=high) for low, high in input_range]
    )
    check_rows = reference if reference is not None else conversion_rows

    def write(staging: Path) -> dict[str, Any]:
        artifact = staging / ARTIFACT_FILE
        with artifact.open("wb") as fileobj:
            joblib.dump(estimator, fileobj)
            fileobj.flush()
            os.fsync(fileobj.fileno())
        onnx_digest = None
        if check_rows is not None:
            onnx_digest = _write_onnx(staging, name, estimator, check_rows)
        model_type, parameters = describe_estimator(estimator)
        return {
            "artifact": ARTIFACT_FILE,
            "sha256": sha256_file(artifact),
            "onnx_artifact": ONNX_ARTIFACT_FILE if onnx_digest else None,
            "onnx_sha256": onnx_digest,
            "model_type": model_type,
            "parameters": parameters,
        }

    return _store_version(
        model_dir,
        name,
        version,
        write,
        {
            "n_features": len(feature_names),
            "feature_names": list(feature_names),
            "class_names": list(class_names),
            "input_range": accepted,
            "training_range": None if reference is None else _observed_range(reference),
            "metrics": metrics,
            "source": source,
            "source_version": source_version,
        },
        activate=activate,
    )


def register_onnx(
    model_dir: Path,
    name: str,
    model_bytes: bytes,
    *,
    feature_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    reference: npt.ArrayLike | None = None,
    version: str | None = None,
    activate: bool = True,
    metrics: dict[str, JsonValue] | None = None,
    source: str | None = None,
    source_version: str | None = None,
) -> Manifest:
    """Store an ONNX classifier (float64 input of one row per instance, a ``probabilities``
    output) as a new version of ``name``; no pickle is involved.

    It is checked first: ONNX Runtime must load it, and on the ``reference`` rows (the training
    data, whose range is then recorded; else 2,000 seeded random rows) it must give one finite
    probability per class that sums to 1 for each row. Without ``feature_names`` or
    ``class_names``, the features and classes are numbered. Raises :class:`ConversionError` if
    the model fails a check, ``ValueError`` if the names, the name or the version are invalid.
    """
    n_features = onnx_feature_count(model_bytes)
    rows = synthetic_rows(n_features) if reference is None else np.asarray(reference, np.float64)
    if rows.ndim != 2 or rows.shape[1] != n_features:
        raise ValueError(f"reference rows must have {n_features} values each")
    n_classes = check_onnx(model_bytes, rows)
    features = list(feature_names or [f"feature_{i}" for i in range(n_features)])
    classes = list(class_names or [str(i) for i in range(n_classes)])
    if len(features) != n_features:
        raise ValueError(f"the model takes {n_features} features but {len(features)} names given")
    if len(classes) != n_classes:
        raise ValueError(f"the model has {n_classes} classes but {len(classes)} names given")

    def write(staging: Path) -> dict[str, Any]:
        atomic_write_bytes(staging / ONNX_ARTIFACT_FILE, model_bytes)
        digest = sha256_bytes(model_bytes)
        # The ONNX file is the version's only artifact: the registry serves it and never
        # looks for a pickle.
        return {
            "artifact": ONNX_ARTIFACT_FILE,
            "sha256": digest,
            "onnx_artifact": ONNX_ARTIFACT_FILE,
            "onnx_sha256": digest,
            "model_type": "onnx",
            "parameters": {},
        }

    return _store_version(
        model_dir,
        name,
        version,
        write,
        {
            "n_features": n_features,
            "feature_names": features,
            "class_names": classes,
            "training_range": None if reference is None else _observed_range(rows),
            "metrics": metrics,
            "source": source,
            "source_version": source_version,
        },
        activate=activate,
    )


def framework_versions() -> dict[str, str]:
    """The versions of the libraries that write and serve model versions, for the manifest."""
    import onnxruntime

    versions = {"scikit-learn": sklearn.__version__, "numpy": np.__version__}
    versions["onnxruntime"] = onnxruntime.__version__
    for module in ("onnx", "skl2onnx"):
        try:
            versions[module] = str(importlib.import_module(module).__version__)
        except (ImportError, AttributeError):  # pragma: no cover - both are dependencies
            continue
    return versions


def _store_version(
    model_dir: Path,
    name: str,
    version: str | None,
    write: Callable[[Path], dict[str, Any]],
    fields: dict[str, Any],
    *,
    activate: bool,
) -> Manifest:
    """Assemble a version in a hidden staging directory (``write`` puts its files there and
    returns their manifest fields), then rename it into place under ``version`` or the next
    free number."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}")
    if version is not None and not _VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid version {version!r} (a number from 1 to 999999999)")
    name_dir = Path(model_dir) / name
    name_dir.mkdir(parents=True, exist_ok=True)
    if version is not None and (name_dir / version).exists():
        raise ValueError(f"model {name!r} already has a version {version}")
    # Hidden and not all digits, so the registry never mistakes it for a version.
    staging = name_dir / f".tmp-{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        fields = {
            **fields,
            **write(staging),
            "name": name,
            "sklearn_version": sklearn.__version__,
            "framework_versions": framework_versions(),
            "created_at": datetime.now(UTC),
        }
        for _ in range(_MAX_VERSION_ATTEMPTS):
            number = version or str(_next_version(name_dir))
            manifest = Manifest(version=number, **fields)
            write_manifest(staging / MANIFEST_FILE, manifest)
            fsync_dir(staging)
            try:
                # Renaming onto an existing, non-empty directory fails, so a concurrent
                # registration that took this number first is detected rather than clobbered.
                staging.rename(name_dir / number)
            except OSError:
                if (name_dir / number).exists():
                    if version is not None:
                        raise ValueError(
                            f"model {name!r} already has a version {version}"
                        ) from None
                    continue
                raise
            break
        else:
            raise RuntimeError(f"could not allocate a version number for model {name!r}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(name_dir)
    if activate:
        atomic_write_text(name_dir / ACTIVE_FILE, manifest.version + "\n")
    logger.info(
        "registered model %s version %s%s", name, manifest.version, " as active" if activate else ""
    )
    return manifest


def synthetic_rows(n_features: int) -> npt.NDArray[np.float64]:
    """2,000 seeded random rows spread over [-10, 10]: what a conversion is checked against
    when no real data is given (a weaker check than real data)."""
    generator = np.random.default_rng(0)
    return generator.uniform(-10, 10, size=(2000, n_features))


def onnx_feature_count(model_bytes: bytes) -> int:
    """How many features an ONNX model takes (one float64 input of shape [batch, n]);
    raises :class:`ConversionError` if ONNX Runtime cannot load it or it takes another input."""
    try:
        session = load_session(model_bytes)
    except Exception as exc:
        raise ConversionError("ONNX Runtime cannot load the model") from exc
    inputs = session.get_inputs()
    shape = inputs[0].shape if len(inputs) == 1 else None
    if not shape or len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 1:
        raise ConversionError("the model must take one input of shape [batch, features]")
    if inputs[0].type != "tensor(double)":
        raise ConversionError("the model must take float64 input")
    if PROBABILITIES_OUTPUT not in {output.name for output in session.get_outputs()}:
        raise ConversionError(f"the model has no '{PROBABILITIES_OUTPUT}' output")
    return int(shape[1])


def check_onnx(model_bytes: bytes, rows: npt.NDArray[np.float64]) -> int:
    """Run the model on ``rows``: one finite probability per class for each, summing to 1.
    Returns the number of classes; raises :class:`ConversionError` otherwise."""
    try:
        probabilities = np.asarray(
            predict_probabilities(load_session(model_bytes), rows), dtype=np.float64
        )
    except Exception as exc:
        raise ConversionError("ONNX Runtime cannot run the model") from exc
    if probabilities.ndim != 2 or probabilities.shape[0] != len(rows) or probabilities.shape[1] < 2:
        raise ConversionError("the model's probabilities have the wrong shape")
    if not np.isfinite(probabilities).all():
        raise ConversionError("the model's probabilities are not finite")
    if np.abs(probabilities.sum(axis=1) - 1).max() > 1e-3:
        raise ConversionError("the model's probabilities do not sum to 1")
    return int(probabilities.shape[1])


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
        reference = synthetic_rows(manifest.n_features)
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
