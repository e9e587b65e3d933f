"""Verified loading of one model version: its manifest must match its directory, its file must
have the SHA-256 the manifest records before anything parses or unpickles it, the ONNX file is
served when there is one (else the pickle, on scikit-learn), and a canary prediction warms it up
and must be a probability per class. The self-check asks the same canary again later
(:func:`unfit_reason`).

Every reason a version fails is our own fixed, client-safe text: never file contents, paths
inside data, or digests.
"""

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ml.errors import ModelUnavailable
from ml.manifest import (
    MANIFEST_FILE,
    Manifest,
    read_manifest,
    sha256_bytes,
    sha256_file,
    sha256_fileobj,
)
from ml.model import FeatureMatrix, LoadedModel, Runtime
from ml.onnx_export import PROBABILITIES_OUTPUT, load_session, predict_probabilities

# The registry's logger, as before loading had a module of its own: operators filter on it.
logger = logging.getLogger("ml.registry")

VersionState = Literal["ready", "failed", "unhealthy"]


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """Load outcome of one version; ``error`` is client-safe, ``manifest`` is None if untrusted.

    ``failed``: it could not be loaded. ``unhealthy``: it was served, then failed its
    self-check (a canary prediction or the re-hash of its files) and could not be reloaded.
    Neither is ever served.
    """

    name: str
    version: str
    state: VersionState
    error: str | None
    manifest: Manifest | None
    runtime: Runtime | None = None  # what serves it, once it is ready


@dataclass(frozen=True, slots=True)
class Canary:
    """The row a version predicted when it was loaded, and what it answered: the self-check
    asks again and expects the same answer."""

    row: list[float]
    probabilities: FeatureMatrix


class _LoadFailure(ValueError):
    """A version could not be loaded; ``reason`` is safe to show to clients."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


NOT_IN_REGISTRY = "version is not in the registry"
LoadOutcome = tuple[VersionStatus, LoadedModel | None, Canary | None]


def load_verified_version(name: str, version_dir: Path, *, quiet: bool = False) -> LoadOutcome:
    version = version_dir.name
    manifest: Manifest | None = None
    try:
        if not version_dir.is_dir():
            raise _LoadFailure(NOT_IN_REGISTRY)
        manifest = _read_matching_manifest(name, version, version_dir)
        model, canary = _load_verified(manifest, version_dir)
    except _LoadFailure as failure:
        # The reason is our own fixed text: never file contents, paths inside data, or digests.
        if not quiet:
            logger.warning("model %s version %s failed to load: %s", name, version, failure.reason)
        return VersionStatus(name, version, "failed", failure.reason, manifest), None, None
    logger.info("model %s version %s loaded (%s)", name, version, model.runtime)
    return VersionStatus(name, version, "ready", None, manifest, model.runtime), model, canary


def unfit_reason(model: LoadedModel, canary: Canary | None, version_dir: Path) -> str | None:
    """Why a loaded version is no longer fit to serve (a client-safe reason), or None."""
    manifest = model.manifest
    if manifest.onnx_artifact is not None and manifest.onnx_sha256 is not None:
        artifact, expected = manifest.onnx_artifact, manifest.onnx_sha256
    else:
        artifact, expected = manifest.artifact, manifest.sha256
    try:
        digest = sha256_file(version_dir / artifact)
    except OSError:
        return "model artifact is missing or unreadable"
    if not hmac.compare_digest(digest, expected):
        return "model artifact does not match the SHA-256 in its manifest"
    if canary is None:
        return "no canary recorded"
    try:
        [answer] = model.predict([canary.row])
    except Exception as exc:
        logger.warning("model %s canary raised %s", manifest.name, type(exc).__name__)
        return "canary prediction failed"
    if not np.allclose(answer.probability, canary.probabilities, rtol=0, atol=1e-9):
        return "canary prediction changed"
    return None


def _read_matching_manifest(name: str, version: str, version_dir: Path) -> Manifest:
    try:
        manifest = read_manifest(version_dir / MANIFEST_FILE)
    except FileNotFoundError:
        raise _LoadFailure("manifest is missing") from None
    except (OSError, ValueError):
        raise _LoadFailure("manifest is unreadable or invalid") from None
    # A manifest copied into the wrong directory would make the URL lie about what is served.
    if manifest.name != name or manifest.version != version:
        raise _LoadFailure("manifest name or version does not match its directory")
    return manifest


def _load_verified(manifest: Manifest, version_dir: Path) -> tuple[LoadedModel, Canary]:
    """Load a version through its hash check (the ONNX file when there is one, else the
    pickle), and warm it up with its canary prediction, which must be a probability per class."""
    if manifest.onnx_artifact is not None and manifest.onnx_sha256 is not None:
        model = _load_onnx(manifest, version_dir, manifest.onnx_artifact, manifest.onnx_sha256)
    else:
        model = _load_pickle(manifest, version_dir)
    row = _canary_row(manifest)
    try:
        # The first call pays one-off costs (lazy imports, allocations); pay them at startup.
        [answer] = model.predict([row])
    except Exception as exc:
        logger.warning(
            "model %s version %s: warm-up raised %s",
            manifest.name,
            manifest.version,
            type(exc).__name__,
        )
        raise _LoadFailure("warm-up prediction failed") from None
    probabilities = np.asarray(answer.probability, dtype=np.float64)
    if (
        probabilities.shape != (len(manifest.class_names),)
        or not np.isfinite(probabilities).all()
        or abs(float(probabilities.sum()) - 1.0) > 1e-3
    ):
        raise _LoadFailure("warm-up prediction is not a probability per class")
    return model, Canary(row, probabilities)


def _canary_row(manifest: Manifest) -> list[float]:
    """The middle of what training saw when it is recorded, else zero, each moved to the
    nearest value the version accepts."""
    seen = manifest.training_range
    centre = [0.0] * manifest.n_features if seen is None else [(r.min + r.max) / 2 for r in seen]
    return [
        min(max(value, r.min), r.max)
        for value, r in zip(centre, manifest.accepted_range, strict=True)
    ]


def _load_onnx(manifest: Manifest, version_dir: Path, artifact: str, sha256: str) -> LoadedModel:
    try:
        # Read once, hash those bytes and hand the same bytes to ONNX Runtime: a file swapped
        # after the check is never parsed.
        model_bytes = (version_dir / artifact).read_bytes()
    except OSError:
        raise _LoadFailure("ONNX artifact is missing or unreadable") from None
    if not hmac.compare_digest(sha256_bytes(model_bytes), sha256):
        raise _LoadFailure("ONNX artifact does not match the SHA-256 in its manifest")
    try:
        session = load_session(model_bytes)
    except Exception as exc:
        logger.warning(
            "model %s version %s: ONNX Runtime refused the model (%s)",
            manifest.name,
            manifest.version,
            type(exc).__name__,
        )
        raise _LoadFailure("ONNX artifact could not be loaded") from None
    inputs = session.get_inputs()
    shape = inputs[0].shape if len(inputs) == 1 else None
    if not shape or len(shape) != 2 or shape[1] != manifest.n_features:
        raise _LoadFailure(f"ONNX model does not take {manifest.n_features} features")
    if inputs[0].type != "tensor(double)":
        raise _LoadFailure("ONNX model does not take float64 input")
    outputs = {output.name for output in session.get_outputs()}
    if PROBABILITIES_OUTPUT not in outputs:
        raise _LoadFailure("ONNX model has no probabilities output")
    n_classes = len(manifest.class_names)

    def predict_proba(matrix: FeatureMatrix) -> Any:
        probabilities = predict_probabilities(session, matrix)
        if probabilities.shape[1] != n_classes:
            raise ModelUnavailable("model output does not match its manifest's classes")
        return probabilities

    return LoadedModel(manifest, predict_proba, "onnx")


# joblib and scikit-learn are imported by the pickle path only: a server of ONNX versions never
# unpickles, and importing scikit-learn (with SciPy and pandas) costs every process that starts,
# the supervisor and each worker, about a second of CPU (tests/test_startup_imports.py).
def _joblib() -> Any:
    import joblib

    return joblib


def _sklearn_version() -> str:
    import sklearn

    return str(sklearn.__version__)


def load_verified_estimator(manifest: Manifest, version_dir: Path) -> Any:
    """Unpickle a version's artifact, only if its bytes match the manifest's SHA-256.

    Raises ``ValueError`` (with a client-safe reason) if the file is missing, differs from the
    manifest or cannot be unpickled.
    """
    try:
        fileobj = (version_dir / manifest.artifact).open("rb")
    except OSError:
        raise _LoadFailure("model artifact is missing or unreadable") from None
    with fileobj:
        # Hash and unpickle through the same open file, so swapping the file between the check
        # and the load cannot smuggle in an unverified pickle.
        try:
            digest = sha256_fileobj(fileobj)
            fileobj.seek(0)
        except OSError:
            raise _LoadFailure("model artifact is missing or unreadable") from None
        if not hmac.compare_digest(digest, manifest.sha256):
            raise _LoadFailure("model artifact does not match the SHA-256 in its manifest")
        try:
            # Unpickling is code execution: it is safe only because the SHA-256 of these exact
            # bytes was verified against the manifest just above. (ruff's S301 does not flag
            # joblib.load, so no noqa is needed; RUF100 would reject an unused one.)
            return _joblib().load(fileobj)
        except Exception as exc:
            logger.warning(
                "model %s version %s: unpickling raised %s",
                manifest.name,
                manifest.version,
                type(exc).__name__,
            )
            raise _LoadFailure("model artifact could not be loaded") from None


def _load_pickle(manifest: Manifest, version_dir: Path) -> LoadedModel:
    estimator = load_verified_estimator(manifest, version_dir)
    if not callable(getattr(estimator, "predict_proba", None)):
        raise _LoadFailure("model artifact is not a classifier with predict_proba")
    n_in = getattr(estimator, "n_features_in_", None)
    if n_in is None or int(n_in) != manifest.n_features:
        raise _LoadFailure(
            f"model expects {n_in} features but its manifest declares {manifest.n_features}"
        )
    classes = getattr(estimator, "classes_", None)
    if classes is not None and len(classes) != len(manifest.class_names):
        raise _LoadFailure(
            f"model has {len(classes)} classes but its manifest names {len(manifest.class_names)}"
        )
    sklearn_version = _sklearn_version()
    if manifest.sklearn_version != sklearn_version:
        # Pickles usually survive patch releases; say so loudly rather than refuse to serve.
        logger.warning(
            "model %s version %s was saved with scikit-learn %s, running %s",
            manifest.name,
            manifest.version,
            manifest.sklearn_version,
            sklearn_version,
        )
    return LoadedModel(manifest, estimator.predict_proba, "sklearn")
