"""The model registry: which versions of which models are on disk, each loaded through
:mod:`ml.loading`, which one is active for each model, and the periodic self-check.

Layout on disk::

    <model_dir>/<name>/<version>/manifest.json
    <model_dir>/<name>/<version>/model.joblib
    <model_dir>/<name>/<version>/model.onnx    (when converted: served instead of the pickle)
    <model_dir>/<name>/ACTIVE              (the active version number)

With a model store (:mod:`ml.store`), ``model_dir`` is this replica's cache of it: versions the
catalogue lists are fetched and verified by :mod:`ml.replica_cache` before they are loaded.

Thread-safety: :meth:`ModelRegistry.load` builds a complete new snapshot and swaps it in with a
single assignment, so ``get``/``models`` may run concurrently with a reload and always see one
consistent snapshot.
"""

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ml.errors import ModelNotFound, ModelUnavailable
from ml.loading import (
    NOT_IN_REGISTRY,
    Canary,
    LoadOutcome,
    VersionStatus,
    unfit_reason,
)
from ml.manifest import ACTIVE_FILE, NAME_PATTERN, VERSION_PATTERN, FeatureRange, Manifest
from ml.model import LoadedModel
from ml.replica_cache import ReplicaCache
from ml.store import ModelStore

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "iris"

_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(VERSION_PATTERN)


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
class _ModelEntry:
    name: str
    statuses: dict[str, VersionStatus]
    loaded: dict[str, LoadedModel]
    active: str | None = field(default=None)
    canaries: dict[str, Canary] = field(default_factory=dict)

    def with_version(
        self, status: VersionStatus, model: LoadedModel | None, canary: Canary | None
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


class ModelRegistry:
    """All model versions under ``model_dir``, each verified by SHA-256 before unpickling.

    Several versions of a model are loaded at once; one is active (served to requests that pin
    no version). It is the one set by :meth:`set_active` (the API applies the operator's
    activation, kept in the database), else the model's ``ACTIVE`` file, else its newest ready
    version. When the active version fails (at load or at a self-check), no other version is
    served in its place: requests that pin none are refused until another is activated.
    """

    def __init__(self, model_dir: Path, store: ModelStore | None = None) -> None:
        self.model_dir = Path(model_dir)
        # The catalogue's manifests, and fetches from the store into model_dir (a cache).
        self.cache = ReplicaCache(self.model_dir, store)
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
        # Catalogued but not on this replica yet: fetched (and loaded) in the background.
        if (
            version is not None
            and (entry is None or version not in entry.statuses)
            and self.cache.fetch_in_background(
                name, version, lambda: self.load_version(name, version)
            )
        ):
            raise ModelUnavailable(
                f"model '{name}' version '{version}' is being fetched; retry shortly"
            )
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
                missing = VersionStatus(name, version, "failed", NOT_IN_REGISTRY, None)
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
                problem = unfit_reason(model, entry.canaries.get(version), self._version_dir(model))
                if problem is None:
                    continue
                logger.error(
                    "model %s version %s failed its self-check (%s); reloading it",
                    name,
                    version,
                    problem,
                )
                status, new_model, canary = self._load(name, self._version_dir(model))
                if new_model is None:
                    status = VersionStatus(
                        name, version, "unhealthy", status.error, status.manifest
                    )
                self._publish(status, new_model, canary, replacing=model)
            for status in _sorted_statuses(entry):
                if status.state != "ready" and status.error != NOT_IN_REGISTRY:
                    self._retry(status)
        self._discover()

    def learn_catalogue(self, manifests: list[str]) -> int:
        """Learn catalogue manifests (JSON text from the database); returns how many were new.
        A catalogued version is served only from a local copy that agrees with them."""
        return self.cache.learn(manifests)

    def _load(self, name: str, version_dir: Path, *, quiet: bool = False) -> LoadOutcome:
        return self.cache.load(name, version_dir, quiet=quiet)

    def _version_dir(self, model: LoadedModel) -> Path:
        return self.model_dir / model.name / model.version

    def _retry(self, status: VersionStatus) -> None:
        """Load a failed or unhealthy version again, quietly unless it now loads."""
        version_dir = self.model_dir / status.name / status.version
        outcome = self._load(status.name, version_dir, quiet=True)
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
                    self._publish(*self._load(name_dir.name, version_dir), replacing=None)

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
        if not version_dir.is_dir() and not self.cache.fetchable(name, version):
            return None, None
        if version_dir.is_dir() and not _inside(version_dir, self.model_dir):
            logger.warning("model %s version %s: directory outside the registry", name, version)
            return None, None
        outcome = self._load(name, version_dir)
        self._publish(*outcome, replacing=None)
        return outcome[0], outcome[1]

    def _publish(
        self,
        status: VersionStatus,
        model: LoadedModel | None,
        canary: Canary | None,
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
            entry = entry.with_version(*self._load(name, version_dir))
        activated = self._activated.get(name)
        if activated is not None and activated not in entry.statuses:
            missing = VersionStatus(name, activated, "failed", NOT_IN_REGISTRY, None)
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
