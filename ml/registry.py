"""The model registry: verified loading of model versions from disk, and inference.

Layout on disk::

    <model_dir>/<name>/<version>/manifest.json
    <model_dir>/<name>/<version>/model.joblib
    <model_dir>/<name>/<version>/model.onnx    (when converted: served instead of the pickle)
    <model_dir>/<name>/ACTIVE              (the active version number)

Thread-safety: :meth:`ModelRegistry.load` builds a complete new snapshot and swaps it in with a
single assignment, so ``get``/``models`` may run concurrently with a reload and always see one
consistent snapshot. :class:`LoadedModel` is immutable after loading and ``predict`` may be called
from many threads at once (scikit-learn's ``predict_proba`` does not mutate the estimator).
"""

import asyncio
import hmac
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import joblib
import numpy as np
import numpy.typing as npt
import sklearn

from ml.batching import DIRECT, BatchPolicy, MicroBatcher
from ml.errors import InvalidFeatures, ModelNotFound, ModelUnavailable
from ml.manifest import (
    ACTIVE_FILE,
    MANIFEST_FILE,
    NAME_PATTERN,
    VERSION_PATTERN,
    FeatureRange,
    Manifest,
    read_manifest,
    sha256_bytes,
    sha256_fileobj,
)
from ml.onnx_export import PROBABILITIES_OUTPUT, load_session, predict_probabilities

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "iris"

_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(VERSION_PATTERN)
_NUMBER_TYPES = (int, float, np.integer, np.floating)
_BOOL_TYPES = (bool, np.bool_)
_ROW_TYPES = (Sequence, np.ndarray)
_TEXT_TYPES = (str, bytes, bytearray)
_NOT_NUMBERS = "features must be finite numbers"

FeatureMatrix = npt.NDArray[np.float64]
Runtime = Literal["onnx", "sklearn"]
# Batches up to this size run inline on ONNX Runtime (under 0.1 ms for the default forest);
# larger ones go to a thread so that one client's batch cannot stall the event loop.
INLINE_MAX_ROWS = 16


@dataclass(frozen=True, slots=True)
class Prediction:
    """One prediction: the most probable class's index, every class's probability (in the
    manifest's ``class_names`` order), and the predicted class's name."""

    prediction: int
    probability: list[float]
    class_name: str


class LoadedModel:
    """A verified, warmed-up model version ready to predict, served by ONNX Runtime when the
    version has an ONNX file and by scikit-learn otherwise."""

    __slots__ = (
        "_batcher",
        "_bounds",
        "_class_names",
        "_lower",
        "_n_features",
        "_pending",
        "_predict_proba",
        "_upper",
        "loaded_at",
        "manifest",
        "runtime",
    )

    def __init__(
        self,
        manifest: Manifest,
        predict_proba: Callable[[FeatureMatrix], Any],
        runtime: Runtime,
    ) -> None:
        self.manifest = manifest
        self.runtime: Runtime = runtime
        # When this process loaded the version (the tutorial's ``loaded_at``).
        self.loaded_at = datetime.now(UTC)
        self._predict_proba = predict_proba
        self._n_features = manifest.n_features
        self._class_names = tuple(manifest.class_names)
        accepted = manifest.accepted_range
        self._lower = np.array([r.min for r in accepted], dtype=np.float64)
        self._upper = np.array([r.max for r in accepted], dtype=np.float64)
        # The same bounds as Python floats, for the common case checked value by value.
        self._bounds = tuple((r.min, r.max) for r in accepted)
        # Rows of concurrent requests waiting for this event-loop turn's ONNX call.
        self._pending: list[tuple[FeatureMatrix, asyncio.Future[list[Prediction]]]] = []
        # Concurrent scikit-learn requests sharing one predict_proba call (ml.batching).
        self._batcher: MicroBatcher[Prediction] = MicroBatcher(self._infer)

    @property
    def name(self) -> str:
        """The model's name (``manifest.name``)."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """The model's version (``manifest.version``)."""
        return self.manifest.version

    def predict(self, rows: Sequence[Sequence[float]]) -> list[Prediction]:
        """Validate ``rows`` and predict them in one call of the runtime (blocking).

        Raises :class:`InvalidFeatures` before touching the runtime if any row has the wrong
        number of values or a value that is not a finite real number (bools are refused).
        """
        return self._infer(self.to_matrix(rows))

    async def predict_async(
        self, rows: Sequence[Sequence[float]], batching: BatchPolicy = DIRECT
    ) -> list[Prediction]:
        """Like :meth:`predict`, without stalling the event loop (see :meth:`infer_async`)."""
        return await self.infer_async(self.to_matrix(rows), batching)

    async def infer_async(
        self, matrix: FeatureMatrix, batching: BatchPolicy = DIRECT
    ) -> list[Prediction]:
        """Predict the rows of a matrix that :meth:`to_matrix` returned, off the event loop.

        ONNX Runtime answers a forest in tens of microseconds: less than a hop to a thread and
        back costs, so it runs inline (``bench`` measures both), and the rows of every request
        that reaches this point in the same event-loop turn go to one ONNX call (a call's fixed
        cost is most of it: 10 rows cost about twice one). scikit-learn takes milliseconds of
        CPU per call and would stall every other request, so it runs in a worker thread; with
        ``batching`` enabled, concurrent requests of up to ``batching.max_size`` rows share
        that call (:class:`ml.batching.MicroBatcher`).
        """
        if self.runtime == "onnx" and len(matrix) <= INLINE_MAX_ROWS:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[list[Prediction]] = loop.create_future()
            self._pending.append((matrix, future))
            if len(self._pending) == 1:
                loop.call_soon(self._infer_pending)
            return await future
        if self.runtime == "sklearn" and batching.enabled and len(matrix) <= batching.max_size:
            return await self._batcher.submit(matrix, batching)
        return await asyncio.to_thread(self._infer, matrix)

    def _infer_pending(self) -> None:
        pending, self._pending = self._pending, []
        matrices = [matrix for matrix, _ in pending]
        try:
            predictions = self._infer(
                matrices[0] if len(matrices) == 1 else np.concatenate(matrices)
            )
        except Exception as exc:
            for _, future in pending:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for matrix, future in pending:
            end = start + len(matrix)
            if not future.done():
                future.set_result(predictions[start:end])
            start = end

    def to_matrix(self, rows: Sequence[Sequence[float]]) -> FeatureMatrix:
        """``rows`` validated for this version, as a float64 matrix (one row per instance).

        Raises :class:`InvalidFeatures` naming the first offending row and feature.
        """
        n_features = self._n_features
        if isinstance(rows, _TEXT_TYPES) or not isinstance(rows, _ROW_TYPES):
            raise InvalidFeatures("features must be a list of rows of numbers")
        if len(rows) == 0:
            raise InvalidFeatures("at least one row of features is required")
        batch = len(rows) > 1
        bounds = self._bounds
        unchecked = False
        for index, row in enumerate(rows):
            # In a batch, say which instance is wrong; a single row needs no prefix.
            where = f"instance {index}: " if batch else ""
            if isinstance(row, _TEXT_TYPES) or not isinstance(row, _ROW_TYPES):
                raise InvalidFeatures(f"{where}features must be a list of numbers", row=index)
            if len(row) != n_features:
                raise InvalidFeatures(
                    f"{where}expected {n_features} features, got {len(row)}", row=index
                )
            for position, (value, (lower, upper)) in enumerate(zip(row, bounds, strict=True)):
                if type(value) is float:
                    # The common case (what JSON parses to), checked here: NaN fails both
                    # comparisons. A few comparisons cost less than numpy's call overhead.
                    if not lower <= value <= upper:
                        raise self._out_of_range(index if batch else None, position)
                    continue
                # bool is an int subclass, but True as a feature is a client bug, not 1.0.
                if isinstance(value, _BOOL_TYPES) or not isinstance(value, _NUMBER_TYPES):
                    raise InvalidFeatures(f"{where}{_NOT_NUMBERS}", row=index, feature=position)
                unchecked = True
        try:
            matrix = np.asarray(rows, dtype=np.float64)
        except (OverflowError, TypeError, ValueError):
            raise InvalidFeatures(_NOT_NUMBERS) from None
        if unchecked:
            # Integers and numpy scalars, checked once converted: every value against its
            # feature's range in one comparison.
            in_range = (matrix >= self._lower) & (matrix <= self._upper)
            if not in_range.all():
                row_index, feature = (int(i) for i in np.argwhere(~in_range)[0])
                raise self._out_of_range(row_index if batch else None, feature)
        return matrix

    def _out_of_range(self, row: int | None, feature: int) -> InvalidFeatures:
        where = "" if row is None else f"instance {row}: "
        name = self.manifest.feature_names[feature]
        lower, upper = self._lower[feature], self._upper[feature]
        return InvalidFeatures(
            # The name is the operator's (from the manifest), never the client's.
            f"{where}feature {feature} ('{name}') must be a finite number "
            f"between {lower:.9g} and {upper:.9g}",
            row=row or 0,
            feature=feature,
        )

    def _infer(self, matrix: FeatureMatrix) -> list[Prediction]:
        proba = np.asarray(self._predict_proba(matrix), dtype=np.float64)
        names = self._class_names
        # Two C-level conversions to Python lists, then one object per row.
        return [
            Prediction(prediction=index, probability=row, class_name=names[index])
            for index, row in zip(proba.argmax(axis=1).tolist(), proba.tolist(), strict=True)
        ]


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """Load outcome of one version; ``error`` is client-safe, ``manifest`` is None if untrusted."""

    name: str
    version: str
    state: Literal["ready", "failed"]
    error: str | None
    manifest: Manifest | None
    runtime: Runtime | None = None  # what serves it, once it is ready


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Description of one model: its versions and input schema (from the active manifest)."""

    name: str
    active_version: str | None
    versions: list[VersionStatus]
    n_features: int | None
    feature_names: list[str]
    class_names: list[str]
    # Per feature: what a prediction may send (enforced), and what training saw (published).
    input_range: list[FeatureRange]
    training_range: list[FeatureRange] | None


@dataclass(frozen=True, slots=True)
class _ModelEntry:
    name: str
    statuses: dict[str, VersionStatus]
    loaded: dict[str, LoadedModel]
    active: str | None = field(default=None)


class _LoadFailure(ValueError):
    """A version could not be loaded; ``reason`` is safe to show to clients."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ModelRegistry:
    """All model versions under ``model_dir``, each verified by SHA-256 before unpickling."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._entries: dict[str, _ModelEntry] = {}
        # Two overlapping reloads would waste work and could publish the older scan last.
        self._load_lock = threading.Lock()

    def load(self) -> None:
        """Scan ``model_dir`` and load every version (blocking: call it from a thread).

        A version that fails (bad manifest, hash mismatch, unloadable artifact, failed warm-up)
        is recorded as failed and does not stop the others. Calling it again reloads.
        """
        with self._load_lock:
            entries = self._scan()
            self._entries = entries
        ready = sum(1 for entry in entries.values() if entry.active is not None)
        logger.info(
            "model registry loaded: %d model(s), %d with a ready version", len(entries), ready
        )

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The loaded model ``name`` at ``version``, or its active version if None.

        Raises :class:`ModelNotFound` for an unknown name or version and
        :class:`ModelUnavailable` for a failed version or a model with no ready version.
        """
        # A name or version that is not in the registry came from the client, and could be
        # anything (a key pasted in the wrong field): it is never echoed back.
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound("model not found")
        if version is None:
            if entry.active is None:
                raise ModelUnavailable(f"model '{name}' has no ready version")
            return entry.loaded[entry.active]
        if version not in entry.statuses:
            raise ModelNotFound(f"model '{name}' has no such version")
        model = entry.loaded.get(version)
        if model is None:
            raise ModelUnavailable(f"model '{name}' version '{version}' is unavailable")
        return model

    def models(self) -> list[ModelInfo]:
        """Every model found on disk, by name, with versions and input schema."""
        entries = self._entries
        return [_describe(entries[name]) for name in sorted(entries)]

    def model_info(self, name: str) -> ModelInfo:
        """One model's description; raises :class:`ModelNotFound` if it is unknown."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound("model not found")
        return _describe(entry)

    def active_version(self, name: str = DEFAULT_MODEL) -> str | None:
        """The active ready version of ``name``, or None if it has none or is unknown."""
        entry = self._entries.get(name)
        return None if entry is None else entry.active

    @property
    def is_ready(self) -> bool:
        """True if at least one model has an active, ready version."""
        return any(entry.active is not None for entry in self._entries.values())

    def failed_versions(self) -> list[VersionStatus]:
        """Every version that failed to load, for readiness reporting."""
        entries = self._entries
        return [
            status
            for name in sorted(entries)
            for status in _sorted_statuses(entries[name])
            if status.state == "failed"
        ]

    def _scan(self) -> dict[str, _ModelEntry]:
        try:
            name_dirs = sorted(self.model_dir.iterdir())
        except OSError:
            logger.warning("model directory %s cannot be read; no models loaded", self.model_dir)
            return {}
        entries: dict[str, _ModelEntry] = {}
        for name_dir in name_dirs:
            if not name_dir.is_dir() or not _NAME_RE.fullmatch(name_dir.name):
                continue
            entry = self._scan_model(name_dir)
            if entry is not None:
                entries[entry.name] = entry
        return entries

    def _scan_model(self, name_dir: Path) -> _ModelEntry | None:
        name = name_dir.name
        try:
            # Temp directories (".tmp-*") and stray files are not versions; skipping them is
            # what makes an interrupted registration invisible.
            version_dirs = [
                path
                for path in name_dir.iterdir()
                if _VERSION_RE.fullmatch(path.name) and path.is_dir()
            ]
        except OSError:
            logger.warning("model %s: directory cannot be read; skipped", name)
            return None
        if not version_dirs:
            return None
        statuses: dict[str, VersionStatus] = {}
        loaded: dict[str, LoadedModel] = {}
        for version_dir in sorted(version_dirs, key=lambda path: int(path.name)):
            status, model = _load_version(name, version_dir)
            statuses[status.version] = status
            if model is not None:
                loaded[status.version] = model
        active = _choose_active(name_dir, loaded)
        return _ModelEntry(name=name, statuses=statuses, loaded=loaded, active=active)


def _load_version(name: str, version_dir: Path) -> tuple[VersionStatus, LoadedModel | None]:
    version = version_dir.name
    manifest: Manifest | None = None
    try:
        manifest = _read_matching_manifest(name, version, version_dir)
        model = _load_verified(manifest, version_dir)
    except _LoadFailure as failure:
        # The reason is our own fixed text: never file contents, paths inside data, or digests.
        logger.warning("model %s version %s failed to load: %s", name, version, failure.reason)
        return VersionStatus(name, version, "failed", failure.reason, manifest), None
    logger.info("model %s version %s loaded (%s)", name, version, model.runtime)
    return VersionStatus(name, version, "ready", None, manifest, model.runtime), model


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


def _load_verified(manifest: Manifest, version_dir: Path) -> LoadedModel:
    """Load a version through its hash check: the ONNX file when there is one, else the pickle."""
    if manifest.onnx_artifact is not None and manifest.onnx_sha256 is not None:
        model = _load_onnx(manifest, version_dir, manifest.onnx_artifact, manifest.onnx_sha256)
    else:
        model = _load_pickle(manifest, version_dir)
    try:
        # The first call pays one-off costs (lazy imports, allocations); pay them at startup.
        # Zero, or the nearest value the version accepts.
        model.predict([[min(max(0.0, r.min), r.max) for r in manifest.accepted_range]])
    except Exception as exc:
        logger.warning(
            "model %s version %s: warm-up raised %s",
            manifest.name,
            manifest.version,
            type(exc).__name__,
        )
        raise _LoadFailure("warm-up prediction failed") from None
    return model


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
            return joblib.load(fileobj)
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
    if manifest.sklearn_version != sklearn.__version__:
        # Pickles usually survive patch releases; say so loudly rather than refuse to serve.
        logger.warning(
            "model %s version %s was saved with scikit-learn %s, running %s",
            manifest.name,
            manifest.version,
            manifest.sklearn_version,
            sklearn.__version__,
        )
    return LoadedModel(manifest, estimator.predict_proba, "sklearn")


def _choose_active(name_dir: Path, loaded: dict[str, LoadedModel]) -> str | None:
    requested = _read_active(name_dir)
    if requested is not None and requested in loaded:
        return requested
    fallback = max(loaded, key=int) if loaded else None
    if requested is not None:
        logger.warning(
            "model %s: ACTIVE version %s is not ready; serving %s instead",
            name_dir.name,
            requested,
            fallback,
        )
    return fallback


def _read_active(name_dir: Path) -> str | None:
    try:
        with (name_dir / ACTIVE_FILE).open("rb") as fileobj:
            raw = fileobj.read(64)
    except FileNotFoundError:
        return None
    except OSError:
        logger.warning("model %s: ACTIVE cannot be read", name_dir.name)
        return None
    text = raw.decode("ascii", errors="replace").strip()
    if not _VERSION_RE.fullmatch(text):
        logger.warning("model %s: ACTIVE does not hold a version number", name_dir.name)
        return None
    return text


def _sorted_statuses(entry: _ModelEntry) -> list[VersionStatus]:
    return [entry.statuses[version] for version in sorted(entry.statuses, key=int)]


def _describe(entry: _ModelEntry) -> ModelInfo:
    statuses = _sorted_statuses(entry)
    # The schema comes from the active version; if nothing is ready, from the newest trusted
    # manifest, so clients can still see what the model would expect.
    reference: Manifest | None = None
    if entry.active is not None:
        reference = entry.loaded[entry.active].manifest
    else:
        trusted = [status.manifest for status in statuses if status.manifest is not None]
        reference = trusted[-1] if trusted else None
    return ModelInfo(
        name=entry.name,
        active_version=entry.active,
        versions=statuses,
        n_features=None if reference is None else reference.n_features,
        feature_names=[] if reference is None else list(reference.feature_names),
        class_names=[] if reference is None else list(reference.class_names),
        input_range=[] if reference is None else reference.accepted_range,
        training_range=None if reference is None else reference.training_range,
    )
