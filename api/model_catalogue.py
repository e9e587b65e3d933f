"""Publishing a model version, the one way for every entry point (``models register``,
``models train``, ``models import``, and the pulls and webhooks that build on it): its files
into the model store (``ml.store``), its manifest into the catalogue (``auth.model_catalog``).
And the other direction: each process learning the catalogue (``api.server.activations``).

The catalogue's row is the commit point. :func:`publish_version` inserts it (which holds the
key: a concurrent publication of the same version waits, then gets 409), puts the files in the
store, appends the audit event and leaves the commit to the caller. A put that fails or is
interrupted rolls the row back: the version does not exist, whatever files reached the store,
and nothing served changes (a version is served only once catalogued, fetched, verified and
activated)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import Actor
from auth.errors import ConfigurationError, InvalidRequest
from auth.model_catalog import (
    CatalogEntry,
    CatalogKey,
    claim_version,
    model_entries,
    new_entries,
    record_registration,
)
from auth.settings import Settings
from ml import Manifest, ModelRegistry, read_manifest, sha256_file
from ml.manifest import MANIFEST_FILE
from ml.s3 import boto3_installed
from ml.store import ModelStore, S3Store, artifact_files, open_store


def model_store(settings: Settings) -> ModelStore | None:
    """The store ``MODELGATE_MODEL_STORE`` names (None: the model directory is the store).
    Raises :class:`ConfigurationError` if it cannot be used (an invalid location, or an
    ``s3://`` one without boto3)."""
    try:
        store = open_store(
            settings.model_store, settings.model_dir, settings.s3_endpoint_url or None
        )
    except ValueError as exc:
        raise ConfigurationError(f"MODELGATE_MODEL_STORE: {exc}") from None
    if isinstance(store, S3Store) and not boto3_installed():
        raise ConfigurationError(
            "MODELGATE_MODEL_STORE is an s3:// location: install the s3 extra "
            "(pip install 'modelgate[s3]')"
        )
    return store


def _read_staged(staged_version_dir: Path) -> tuple[Manifest, str]:
    """The staged version's manifest and its text, once its files match it (a staged copy is
    ours, but a torn or tampered one must not be published)."""
    path = staged_version_dir / MANIFEST_FILE
    try:
        manifest = read_manifest(path)
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        raise InvalidRequest("the staged version has no valid manifest") from None
    if (manifest.name, manifest.version) != (
        staged_version_dir.parent.name,
        staged_version_dir.name,
    ):
        raise InvalidRequest("the staged manifest does not name its directory's version")
    for file_name, sha256 in artifact_files(manifest):
        try:
            matches = hmac.compare_digest(sha256_file(staged_version_dir / file_name), sha256)
        except OSError:
            matches = False
        if not matches:
            raise InvalidRequest("a staged file does not match its manifest")
    return manifest, text


async def publish_version(
    session: AsyncSession,
    store: ModelStore | None,
    staged_version_dir: Path,
    actor: Actor,
    *,
    source_uri: str | None,
    source_version: str | None,
) -> Manifest:
    """Publish the version staged in ``staged_version_dir`` (``<name>/<version>/``, as
    ``ml.train`` writes it): catalogue row, files in the store, audit event ``model.register``,
    all in ``session``'s transaction, which the caller commits (the commit point). Publishing
    the same version again with the same manifest changes nothing; with another, 409
    (:class:`auth.model_catalog.VersionConflict`). ``store`` None: the model directory is the
    store, and the version must be staged in it."""
    manifest, text = _read_staged(staged_version_dir)
    entry, created = await claim_version(
        session,
        actor,
        manifest.name,
        manifest.version,
        text,
        source_uri=source_uri,
        source_version=source_version,
    )
    if created:
        if store is not None:
            await asyncio.to_thread(store.put_version, staged_version_dir, manifest)
        await record_registration(session, actor, entry)
    return manifest


async def sync_catalogue(
    registry: ModelRegistry, session: AsyncSession, known: dict[CatalogKey, CatalogEntry]
) -> bool:
    """Read the catalogue entries this process has not seen (one small query, and one more
    when there are new ones), add them to ``known`` and teach them to the registry; True if
    there were any."""
    entries = await new_entries(session, known.keys())
    for entry in entries:
        known[entry.key] = entry
    if entries:
        registry.learn_catalogue([entry.manifest for entry in entries])
    return bool(entries)


@contextlib.contextmanager
def staging_root(model_dir: Path, store: ModelStore | None) -> Iterator[Path]:
    """Where a version is staged (as ``<name>/<version>/``) before :func:`publish_version`: a
    new temporary directory, removed afterwards, when there is a store; else the model
    directory itself, which is the store (a version staged there that is not published must
    be removed again: :func:`discard_unpublished`)."""
    if store is not None:
        root = Path(tempfile.mkdtemp(prefix="modelgate-staging-"))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        yield model_dir


def discard_unpublished(model_dir: Path, store: ModelStore | None, manifest: Manifest) -> None:
    """Remove a version staged in the model directory (no store) whose publication failed:
    without its catalogue row it does not exist, and must not be served from this disk."""
    if store is None:
        shutil.rmtree(model_dir / manifest.name / manifest.version, ignore_errors=True)


async def next_free_version(session: AsyncSession, model_dir: Path, name: str) -> str:
    """One more than the newest version of ``name`` in the catalogue or on this disk."""
    catalogued = [int(entry.version) for entry in await model_entries(session, name)]
    try:
        local = [int(p.name) for p in (model_dir / name).iterdir() if p.name.isdigit()]
    except OSError:
        local = []
    return str(max([*catalogued, *local], default=0) + 1)
