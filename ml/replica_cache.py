"""This replica's model directory as a verified cache of the model store (:mod:`ml.store`).

The registry (:mod:`ml.registry`) learns the catalogue's manifests (the database's, read by the
API layer) through :meth:`ReplicaCache.learn`. Before it loads a catalogued version it asks
:meth:`ReplicaCache.prepare`: a version that is not on this disk, or whose local manifest
disagrees with the catalogue's (a local manifest is then not trusted), is fetched from the store
into a hidden directory, each file verified against the catalogue's SHA-256 while it streams,
the catalogue's manifest written beside them, and renamed into place; loading then hashes the
files again and warms the version up, and only then is it served. When a catalogued version's
local files no longer match (the self-check's re-hash, or a failed load), :meth:`refetch`
discards them and fetches again: a bounded number of tries, with backoff.

Without a store (``MODELGATE_MODEL_STORE`` unset) nothing is ever fetched: the model directory
is the store, as it always was, and a catalogued version whose local manifest disagrees is
refused.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ml import observe
from ml.loading import LoadOutcome, VersionStatus, load_verified_version
from ml.manifest import (
    MANIFEST_FILE,
    NAME_PATTERN,
    VERSION_PATTERN,
    Manifest,
    read_manifest,
    sha256_file,
)
from ml.manifest import fsync_dir as _fsync_dir
from ml.store import ModelStore, StoreError, artifact_files

logger = logging.getLogger("ml.registry")

# A version whose fetch fails is tried this many times, waiting FETCH_BACKOFF_SECONDS, then
# twice that, between tries; the next self-check tries again.
FETCH_ATTEMPTS = 3
FETCH_BACKOFF_SECONDS = 0.5

_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(VERSION_PATTERN)

Key = tuple[str, str]


class ReplicaCache:
    """The catalogue's manifests as this replica knows them, and the fetches from the store."""

    def __init__(
        self,
        model_dir: Path,
        store: ModelStore | None = None,
        *,
        attempts: int = FETCH_ATTEMPTS,
        backoff_seconds: float = FETCH_BACKOFF_SECONDS,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.store = store
        self.attempts = max(1, attempts)
        self.backoff_seconds = backoff_seconds
        # (name, version) -> the catalogue's manifest, parsed, and its JSON text as recorded.
        self._catalogue: dict[Key, tuple[Manifest, str]] = {}
        self._lock = threading.Lock()
        self._fetching: set[Key] = set()
        # One fetch of a version at a time in this process (the follower, a pinned request's
        # background fetch and the self-check may all want it): the others wait, then find it.
        self._version_locks: dict[Key, threading.RLock] = {}

    def learn(self, manifests: Iterable[str]) -> int:
        """Add catalogue manifests (JSON text, as recorded); returns how many were new. One
        that is not a valid manifest is skipped (and logged): it is never fetched or served."""
        learned = 0
        for text in manifests:
            try:
                manifest = Manifest.model_validate_json(text)
            except ValueError:
                logger.error("a catalogue manifest is not a valid manifest; skipped")
                continue
            key = (manifest.name, manifest.version)
            if key not in self._catalogue:
                with self._lock:
                    self._catalogue = {**self._catalogue, key: (manifest, text)}
                learned += 1
        return learned

    def known(self) -> set[Key]:
        """Every (name, version) learned from the catalogue."""
        return set(self._catalogue)

    def catalogued(self, name: str, version: str) -> bool:
        """Whether the catalogue has the version."""
        return (name, version) in self._catalogue

    def fetchable(self, name: str, version: str) -> bool:
        """Whether the version can be fetched: it is catalogued and there is a store."""
        return self.store is not None and (name, version) in self._catalogue

    def prepare(self, name: str, version: str) -> str | None:
        """Make the local copy of a catalogued version agree with the catalogue (fetching it
        when it is absent or its manifest disagrees); None when it does (or the version is not
        catalogued: the disk is then all there is), else why not (client-safe)."""
        known = self._catalogue.get((name, version))
        if known is None:
            return None
        if self._local_manifest(name, version) == known[0]:
            return None
        if self.store is None:
            if (self.model_dir / name / version).exists():
                return "its local manifest does not match the catalogue"
            return None  # not on this disk, and no store to fetch it from: not in the registry
        with self._version_lock(name, version):
            if self._local_manifest(name, version) == known[0]:
                return None  # fetched by another thread meanwhile
            return self.refetch(name, version, outcome="fetched")

    def load(self, name: str, version_dir: Path, *, quiet: bool = False) -> LoadOutcome:
        """Load a version for the registry: a catalogued version is fetched first if it is
        not here (or its local manifest disagrees with the catalogue), and fetched again if its
        local files fail their hash; every load goes through :func:`load_verified_version`."""
        version = version_dir.name
        problem = self.prepare(name, version)
        if problem is None:
            outcome = load_verified_version(name, version_dir, quiet=quiet)
            if outcome[1] is not None or not self.fetchable(name, version):
                return outcome
            if self.intact(name, version):
                return outcome  # the files are the catalogue's: fetching them again won't help
            logger.error("model %s version %s: local copy is corrupt; refetching", name, version)
            with self._version_lock(name, version):
                self._discard(name, version)
                problem = self.refetch(name, version)
            if problem is None:
                return load_verified_version(name, version_dir, quiet=quiet)
        if not quiet:
            logger.warning("model %s version %s cannot be loaded: %s", name, version, problem)
        return VersionStatus(name, version, "failed", problem, None), None, None

    def intact(self, name: str, version: str) -> bool:
        """Whether the local copy's artifact files have the catalogue's SHA-256s."""
        known = self._catalogue.get((name, version))
        if known is None:
            return True
        directory = self.model_dir / name / version
        try:
            return all(
                sha256_file(directory / file_name) == sha256
                for file_name, sha256 in artifact_files(known[0])
            )
        except OSError:
            return False

    def refetch(self, name: str, version: str, outcome: str = "refetched") -> str | None:
        """Discard the local copy and fetch the version again from the store (blocking): up to
        ``attempts`` tries with backoff. None once it is in place, else why not. Each try is
        reported to :func:`ml.observe.fetch_done` (``outcome`` when it succeeds)."""
        known = self._catalogue.get((name, version))
        if known is None or self.store is None:
            return "version is not in the model store"
        with self._version_lock(name, version):
            return self._fetch_with_retries(known, outcome)

    def _version_lock(self, name: str, version: str) -> threading.RLock:
        with self._lock:
            return self._version_locks.setdefault((name, version), threading.RLock())

    def _fetch_with_retries(self, known: tuple[Manifest, str], outcome: str) -> str | None:
        name, version = known[0].name, known[0].version
        problem = "version could not be fetched from the model store"
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            try:
                self._fetch(known[0], known[1])
            except (StoreError, OSError) as exc:
                problem = f"fetching it from the model store failed: {_reason(exc)}"
                logger.warning(
                    "model %s version %s: fetch %d of %d failed (%s)",
                    name,
                    version,
                    attempt + 1,
                    self.attempts,
                    _reason(exc),
                )
                observe.fetch_done(name, "failed")
                continue
            logger.info("model %s version %s fetched from the model store", name, version)
            observe.fetch_done(name, outcome)
            return None
        return problem

    def fetch_in_background(self, name: str, version: str, then: Callable[[], object]) -> bool:
        """Start fetching (and then ``then``: loading) a catalogued version in a thread, unless
        that is already under way; False if it cannot be fetched."""
        if not self.fetchable(name, version):
            return False
        key = (name, version)
        with self._lock:
            if key in self._fetching:
                return True
            self._fetching.add(key)

        def work() -> None:
            try:
                then()
            except Exception as exc:
                logger.warning("model %s version %s: background fetch raised %s", *key, exc)
            finally:
                with self._lock:
                    self._fetching.discard(key)

        threading.Thread(target=work, name=f"fetch-{name}-{version}", daemon=True).start()
        return True

    def _discard(self, name: str, version: str) -> None:
        """Remove the local copy (moved aside first, so no reader sees it half deleted)."""
        target = self.model_dir / name / version
        discarded = self.model_dir / name / f".discard-{secrets.token_hex(8)}"
        try:
            target.rename(discarded)
        except OSError:
            return  # gone already (another worker of this machine), or never here
        shutil.rmtree(discarded, ignore_errors=True)

    def _local_manifest(self, name: str, version: str) -> Manifest | None:
        try:
            return read_manifest(self.model_dir / name / version / MANIFEST_FILE)
        except (OSError, ValueError):
            return None

    def _fetch(self, manifest: Manifest, text: str) -> None:
        """Fetch into a hidden directory beside the version's, verified, then rename it into
        place (a copy already there is moved aside first and deleted)."""
        if self.store is None:  # pragma: no cover - refetch checks it
            raise StoreError("no model store")
        name, version = manifest.name, manifest.version
        if not (_NAME_RE.fullmatch(name) and _VERSION_RE.fullmatch(version)):
            raise StoreError("invalid model name or version")
        name_dir = self.model_dir / name
        name_dir.mkdir(parents=True, exist_ok=True)
        # Hidden and not all digits: the registry never takes it for a version.
        staging = name_dir / f".fetch-{secrets.token_hex(8)}"
        staging.mkdir()
        try:
            self.store.fetch_version(manifest, staging)
            # The catalogue's manifest, byte for byte: the one the database vouches for.
            (staging / MANIFEST_FILE).write_text(text, encoding="utf-8")
            _fsync_dir(staging)
            target = name_dir / version
            if target.exists():
                self._discard(name, version)
            try:
                staging.rename(target)
            except OSError:
                # Another worker of this machine renamed its own verified copy first.
                if self._local_manifest(name, version) != manifest:
                    raise
            _fsync_dir(name_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _reason(exc: BaseException) -> str:
    # StoreError messages are written to be shown; an OSError's may hold a path.
    return str(exc) if isinstance(exc, StoreError) else "the local disk refused the copy"
