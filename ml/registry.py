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
    sha256_file,
    sha256_fileobj,
)
from ml.observe import batch_done
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
        self._batcher: MicroBatcher[Prediction] = MicroBatcher(self._infer, runtime)

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
        batch_done(self.runtime, len(matrix))
        return await asyncio.to_thread(self._infer, matrix)

    def _infer_pending(self) -> None:
        pending, self._pending = self._pending, []
        matrices = [matrix for matrix, _ in pending]
        try:
            batch = matrices[0] if len(matrices) == 1 else np.concatenate(matrices)
            batch_done(self.runtime, len(batch))
            predictions = self._infer(batch)
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
class ModelInfo:
    """Description of one model: its versions and input schema (from the active manifest)."""

    name: str
    # The version requests that pin none are served by: the operator's activation, else the
    # registry's own choice. It may be failed or unhealthy: no other version serves in its place.
    active_version: str | None
    versions: list[VersionStatus]
    n_features: int | None
    feature_names: list[str]
    class_names: list[str]
    # Per feature: what a prediction may send (enforced), and what training saw (published).
    input_range: list[FeatureRange]
    training_range: list[FeatureRange] | None
    # Why requests that pin no version are refused (None while the active version serves).
    unavailable_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ModelProblem:
    """A model whose requests that pin no version cannot be served, and why (client-safe)."""

    name: str
    version: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class _Canary:
    """The row a version predicted when it was loaded, and what it answered: the self-check
    asks again and expects the same answer."""

    row: list[float]
    probabilities: FeatureMatrix


@dataclass(frozen=True, slots=True)
class _ModelEntry:
    name: str
    statuses: dict[str, VersionStatus]
    loaded: dict[str, LoadedModel]
    active: str | None = field(default=None)
    canaries: dict[str, _Canary] = field(default_factory=dict)

    def with_version(
        self, status: VersionStatus, model: LoadedModel | None, canary: _Canary | None
    ) -> "_ModelEntry":
        """This entry with one version's outcome replaced."""
        version = status.version
        loaded = {v: m for v, m in self.loaded.items() if v != version}
        canaries = {v: c for v, c in self.canaries.items() if v != version}
        if model is not None and canary is not None:
            loaded[version] = model
            canaries[version] = canary
        return _ModelEntry(
            self.name, {**self.statuses, version: status}, loaded, self.active, canaries
        )

    def with_active(self, active: str | None) -> "_ModelEntry":
        """This entry with another active version."""
        return _ModelEntry(self.name, self.statuses, self.loaded, active, self.canaries)


class _LoadFailure(ValueError):
    """A version could not be loaded; ``reason`` is safe to show to clients."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_NOT_IN_REGISTRY = "version is not in the registry"
_Outcome = tuple[VersionStatus, LoadedModel | None, _Canary | None]


class ModelRegistry:
    """All model versions under ``model_dir``, each verified by SHA-256 before unpickling.

    Several versions of a model are loaded at once; one is active (served to requests that pin
    no version). It is the one set by :meth:`set_active` (the API applies the operator's
    activation, kept in the database), else the model's ``ACTIVE`` file, else its newest ready
    version. When the active version fails (at load or at a self-check), no other version is
    served in its place: requests that pin none are refused until another is activated.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._entries: dict[str, _ModelEntry] = {}
        # Activations applied through set_active: they outlive a rescan.
        self._activated: dict[str, str] = {}
        # Every change builds a new snapshot from the current one and publishes it with one
        # assignment; writers (reloads, activations, self-checks) take turns, readers never wait.
        self._load_lock = threading.Lock()

    def load(self) -> None:
        """Scan ``model_dir`` and load every version (blocking: call it from a thread).

        A version that fails (bad manifest, hash mismatch, unloadable artifact, failed warm-up)
        is recorded as failed and does not stop the others. Calling it again reloads.
        """
        with self._load_lock:
            entries = self._scan()
            self._entries = entries
        ready = sum(1 for entry in entries.values() if entry.active in entry.loaded)
        logger.info(
            "model registry loaded: %d model(s), %d with a ready version", len(entries), ready
        )

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The loaded model ``name`` at ``version``, or its active version if None.

        Raises :class:`ModelNotFound` for an unknown name or version and
        :class:`ModelUnavailable` for a failed or unhealthy version, or (without ``version``)
        when the active version is not ready: another version never serves in its place.
        """
        # A name or version that is not in the registry came from the client, and could be
        # anything (a key pasted in the wrong field): it is never echoed back.
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound("model not found")
        if version is None:
            model = entry.loaded.get(entry.active) if entry.active is not None else None
            if model is None:
                raise ModelUnavailable(_unavailable_reason(entry) or "model is unavailable")
            return model
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
        """The version that serves ``name``'s requests that pin none; None if it is unknown or
        its active version is not ready."""
        entry = self._entries.get(name)
        if entry is None or entry.active not in entry.loaded:
            return None
        return entry.active

    def activations(self) -> dict[str, str | None]:
        """Each model's active version, ready or not (None: no version is active)."""
        return {name: entry.active for name, entry in self._entries.items()}

    @property
    def is_ready(self) -> bool:
        """True if at least one model's active version is ready."""
        return any(entry.active in entry.loaded for entry in self._entries.values())

    def failed_versions(self) -> list[VersionStatus]:
        """Every version that failed to load or its self-check, for readiness reporting."""
        entries = self._entries
        return [
            status
            for name in sorted(entries)
            for status in _sorted_statuses(entries[name])
            if status.state != "ready"
        ]

    def problems(self) -> list[ModelProblem]:
        """Every model whose requests that pin no version are refused, and why."""
        entries = self._entries
        problems = []
        for name in sorted(entries):
            reason = _unavailable_reason(entries[name])
            if reason is not None:
                problems.append(ModelProblem(name, entries[name].active, reason))
        return problems

    def load_version(self, name: str, version: str) -> LoadedModel:
        """``name`` at ``version``, loaded, verified and warmed up now if it is not loaded yet
        (blocking). Only a directory of the registry named by a valid name and version is ever
        read.

        Raises :class:`ModelNotFound` if the registry has no such version and
        :class:`ModelUnavailable` (with the reason) if it cannot be loaded.
        """
        status, model = self._ensure_loaded(name, version)
        if status is None:
            raise ModelNotFound("model or version not found")
        if model is None:
            raise ModelUnavailable(
                f"model '{name}' version '{version}' cannot be served: {status.error}"
            )
        return model

    def set_active(self, name: str, version: str) -> None:
        """Make ``version`` the active version of ``name`` (blocking: it is loaded first if it
        is not loaded yet), and keep it so across reloads. The switch is one assignment:
        requests in flight finish on the version they started with. A version that cannot be
        loaded is still made active, and then nothing serves ``name`` without a pinned version
        (never another version in its place); an invalid name or version is ignored."""
        if not (_NAME_RE.fullmatch(name) and _VERSION_RE.fullmatch(version)):
            logger.warning("activation of an invalid model name or version ignored")
            return
        status, _ = self._ensure_loaded(name, version)
        with self._load_lock:
            entries = self._entries
            entry = entries.get(name) or _ModelEntry(name=name, statuses={}, loaded={})
            if status is None and version not in entry.statuses:
                missing = VersionStatus(name, version, "failed", _NOT_IN_REGISTRY, None)
                entry = entry.with_version(missing, None, None)
            previous = entry.active
            self._activated[name] = version
            self._entries = {**entries, name: entry.with_active(version)}
        if previous != version:
            ready = version in entry.loaded or (status is not None and status.state == "ready")
            log = logger.info if ready else logger.error
            log(
                "model %s: version %s is now active (was %s)%s",
                name,
                version,
                previous,
                "" if ready else "; it is not ready, so requests that pin no version are refused",
            )

    def self_check(self) -> None:
        """Check every version (blocking: run it in a thread): each loaded one answers its
        canary prediction as it did when it was loaded and its served file still has the
        SHA-256 of its manifest; one that fails is reloaded from the registry, and marked
        ``unhealthy`` (not served) if that fails too. Versions that failed are tried again,
        and versions added to the registry since the last scan are loaded (not activated)."""
        for name, entry in sorted(self._entries.items()):
            for version, model in sorted(entry.loaded.items()):
                problem = _check(model, entry.canaries.get(version), self._version_dir(model))
                if problem is None:
                    continue
                logger.error(
                    "model %s version %s failed its self-check (%s); reloading it",
                    name,
                    version,
                    problem,
                )
                status, new_model, canary = _load_version(name, self._version_dir(model))
                if new_model is None:
                    status = VersionStatus(
                        name, version, "unhealthy", status.error, status.manifest
                    )
                self._publish(status, new_model, canary, replacing=model)
            for status in _sorted_statuses(entry):
                if status.state != "ready" and status.error != _NOT_IN_REGISTRY:
                    self._retry(status)
        self._discover()

    def _version_dir(self, model: LoadedModel) -> Path:
        return self.model_dir / model.name / model.version

    def _retry(self, status: VersionStatus) -> None:
        """Load a failed or unhealthy version again, quietly unless it now loads."""
        version_dir = self.model_dir / status.name / status.version
        outcome = _load_version(status.name, version_dir, quiet=True)
        if outcome[1] is not None:
            logger.info("model %s version %s is ready again", status.name, status.version)
            self._publish(*outcome, replacing=None)

    def _discover(self) -> None:
        """Load the versions (and models) added to the registry since it was last scanned."""
        try:
            name_dirs = [
                path
                for path in self.model_dir.iterdir()
                if _NAME_RE.fullmatch(path.name) and path.is_dir()
            ]
        except OSError:
            return
        for name_dir in sorted(name_dirs):
            known = self._entries.get(name_dir.name)
            if known is None:
                entry = self._scan_model(name_dir)
                if entry is not None:
                    with self._load_lock:
                        if name_dir.name not in self._entries:
                            self._entries = {**self._entries, entry.name: entry}
                continue
            for version_dir in _version_dirs(name_dir):
                if version_dir.name not in known.statuses:
                    self._publish(*_load_version(name_dir.name, version_dir), replacing=None)

    def _ensure_loaded(
        self, name: str, version: str
    ) -> tuple[VersionStatus | None, LoadedModel | None]:
        """The version's status and model, loading it if it is not loaded; (None, None) if the
        registry has no such version directory (nothing outside the registry is ever read)."""
        if not (_NAME_RE.fullmatch(name) and _VERSION_RE.fullmatch(version)):
            return None, None
        entry = self._entries.get(name)
        if entry is not None and version in entry.loaded:
            return entry.statuses[version], entry.loaded[version]
        version_dir = self.model_dir / name / version
        if not version_dir.is_dir():
            return None, None
        if not _inside(version_dir, self.model_dir):
            logger.warning("model %s version %s: directory outside the registry", name, version)
            return None, None
        outcome = _load_version(name, version_dir)
        self._publish(*outcome, replacing=None)
        return outcome[0], outcome[1]

    def _publish(
        self,
        status: VersionStatus,
        model: LoadedModel | None,
        canary: _Canary | None,
        replacing: LoadedModel | None,
    ) -> None:
        """Publish one version's outcome in a new snapshot. With ``replacing``, only if that
        model is still the one loaded (a concurrent activation may have replaced it)."""
        with self._load_lock:
            entries = self._entries
            entry = entries.get(status.name)
            if entry is None:
                entry = _ModelEntry(name=status.name, statuses={}, loaded={})
            if replacing is not None and entry.loaded.get(status.version) is not replacing:
                return
            self._entries = {**entries, status.name: entry.with_version(status, model, canary)}

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
            version_dirs = _version_dirs(name_dir)
        except OSError:
            logger.warning("model %s: directory cannot be read; skipped", name)
            return None
        if not version_dirs:
            return None
        entry = _ModelEntry(name=name, statuses={}, loaded={})
        for version_dir in version_dirs:
            entry = entry.with_version(*_load_version(name, version_dir))
        activated = self._activated.get(name)
        if activated is not None and activated not in entry.statuses:
            missing = VersionStatus(name, activated, "failed", _NOT_IN_REGISTRY, None)
            entry = entry.with_version(missing, None, None)
        return entry.with_active(activated or _choose_active(name_dir, entry.loaded))


def _version_dirs(name_dir: Path) -> list[Path]:
    """A model's version directories, by version number (raises ``OSError``)."""
    # Temp directories (".tmp-*") and stray files are not versions; skipping them is what makes
    # an interrupted registration invisible.
    return sorted(
        (path for path in name_dir.iterdir() if _VERSION_RE.fullmatch(path.name) and path.is_dir()),
        key=lambda path: int(path.name),
    )


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (symbolic links followed) to somewhere inside ``root``."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _load_version(name: str, version_dir: Path, *, quiet: bool = False) -> _Outcome:
    version = version_dir.name
    manifest: Manifest | None = None
    try:
        if not version_dir.is_dir():
            raise _LoadFailure(_NOT_IN_REGISTRY)
        manifest = _read_matching_manifest(name, version, version_dir)
        model, canary = _load_verified(manifest, version_dir)
    except _LoadFailure as failure:
        # The reason is our own fixed text: never file contents, paths inside data, or digests.
        if not quiet:
            logger.warning("model %s version %s failed to load: %s", name, version, failure.reason)
        return VersionStatus(name, version, "failed", failure.reason, manifest), None, None
    logger.info("model %s version %s loaded (%s)", name, version, model.runtime)
    return VersionStatus(name, version, "ready", None, manifest, model.runtime), model, canary


def _check(model: LoadedModel, canary: _Canary | None, version_dir: Path) -> str | None:
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


def _load_verified(manifest: Manifest, version_dir: Path) -> tuple[LoadedModel, _Canary]:
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
    return model, _Canary(row, probabilities)


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
    """The registry's own choice: the version its ``ACTIVE`` file names (ready or not: no other
    version serves in its place), else the newest ready version."""
    requested = _read_active(name_dir)
    if requested is None:
        return max(loaded, key=int) if loaded else None
    if requested not in loaded:
        logger.error(
            "model %s: ACTIVE version %s is not ready; requests that pin no version are refused "
            "until a version is activated",
            name_dir.name,
            requested,
        )
    return requested


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


def _unavailable_reason(entry: _ModelEntry) -> str | None:
    """Why ``entry``'s requests that pin no version are refused (client-safe), or None."""
    name, active = entry.name, entry.active
    if active is None:
        return f"model '{name}' has no ready version"
    if active in entry.loaded:
        return None
    status = entry.statuses.get(active)
    why = "is not loaded" if status is None else f"is {status.state} ({status.error})"
    return (
        f"model '{name}' is unavailable: its active version {active} {why}; pin another "
        "version or have an operator activate one"
    )


def _describe(entry: _ModelEntry) -> ModelInfo:
    statuses = _sorted_statuses(entry)
    # The schema comes from the active version; if it has no trusted manifest, from the newest
    # trusted one, so clients can still see what the model would expect.
    reference: Manifest | None = None
    if entry.active is not None and entry.active in entry.statuses:
        reference = entry.statuses[entry.active].manifest
    if reference is None:
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
        unavailable_reason=_unavailable_reason(entry),
    )
