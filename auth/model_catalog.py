"""The model catalogue: every published model version's manifest (as the registry wrote it: the
SHA-256 of each artifact that any replica verifies a fetched copy against), its source and who
published it. The artifacts themselves are in the model store (``ml.store``); a row here is the
commit point of a publication (``api.model_catalogue``). Rows are never changed or deleted.

Every worker reads the catalogue once a second with the activations (``api.server.activations``):
one small query of the keys, and the manifests of the versions it has not seen yet."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import select, tuple_
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import Actor, record_event
from auth.errors import Conflict, InvalidRequest
from auth.model_activation import MODEL_NAME_PATTERN, MODEL_VERSION_PATTERN
from auth.models import ModelVersion, utcnow

# ml.manifest.MAX_MANIFEST_BYTES: a manifest is a few kilobytes; nothing larger is recorded.
MAX_MANIFEST_CHARS = 1 << 20
MAX_SOURCE_URI_CHARS = 2000
MAX_SOURCE_VERSION_CHARS = 200
# At most this many manifests per read: a worker that starts against a large catalogue learns
# it over a few polls rather than in one huge answer.
MAX_ENTRIES_PER_READ = 500

CatalogKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One catalogued version (the manifest is JSON text; ``ml`` parses and checks it)."""

    name: str
    version: str
    manifest: str
    source_uri: str | None
    source_version: str | None
    registered_at: datetime
    registered_by: str

    @property
    def key(self) -> CatalogKey:
        """(name, version)."""
        return (self.name, self.version)


class VersionConflict(Conflict):
    """The version is already catalogued with another manifest: versions are immutable."""

    type = "version-exists"
    title = "Version exists"


def _entry(row: ModelVersion) -> CatalogEntry:
    return CatalogEntry(
        name=row.name,
        version=row.version,
        manifest=row.manifest,
        source_uri=row.source_uri,
        source_version=row.source_version,
        registered_at=row.registered_at,
        registered_by=row.registered_by,
    )


def public_source_uri(uri: str | None) -> str | None:
    """``uri`` without what may be a secret: user and password, query (a presigned URL's
    signature, a token) and fragment. The catalogue shows it to operators, and the audit trail
    keeps it. (``ml.sources.redact_url`` does the same for what ``ml`` records and says: the
    layers may not import each other, and the system of record redacts whatever its caller.)"""
    if uri is None:
        return None
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        raise InvalidRequest("source URI is not a URI", loc=("source_uri",)) from None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _parsed(manifest: str) -> Any:
    try:
        return json.loads(manifest)
    except ValueError:
        raise InvalidRequest("manifest is not JSON", loc=("manifest",)) from None


def _check(
    name: str, version: str, manifest: str, source_uri: str | None, source_version: str | None
) -> None:
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise InvalidRequest("invalid model name", loc=("name",))
    if not re.fullmatch(MODEL_VERSION_PATTERN, version):
        raise InvalidRequest("version must be a number from 1 to 999999999", loc=("version",))
    if len(manifest) > MAX_MANIFEST_CHARS:
        raise InvalidRequest("manifest is too large", loc=("manifest",))
    if source_uri is not None and len(source_uri) > MAX_SOURCE_URI_CHARS:
        raise InvalidRequest("source URI is too long", loc=("source_uri",))
    if source_version is not None and len(source_version) > MAX_SOURCE_VERSION_CHARS:
        raise InvalidRequest("source version is too long", loc=("source_version",))
    document = _parsed(manifest)
    if not isinstance(document, dict) or (document.get("name"), document.get("version")) != (
        name,
        version,
    ):
        raise InvalidRequest("manifest does not name this model and version", loc=("manifest",))


async def claim_version(
    session: AsyncSession,
    actor: Actor,
    name: str,
    version: str,
    manifest: str,
    *,
    source_uri: str | None = None,
    source_version: str | None = None,
) -> tuple[CatalogEntry, bool]:
    """Insert the version's row (flushed, not committed) and say whether it is new.

    The same name and version recorded again with the same manifest (compared as JSON) is
    idempotent: the existing row, ``False``. With another manifest: :class:`VersionConflict`
    (409). The row's insert holds the key until the transaction ends, so a concurrent
    publication of the same version waits for it and then sees it: put the files in the store
    between this and :func:`record_registration`, and commit."""
    _check(name, version, manifest, source_uri, source_version)
    source_uri = public_source_uri(source_uri)
    now = utcnow()
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    inserted = await session.execute(
        insert(ModelVersion)
        .values(
            name=name,
            version=version,
            manifest=manifest,
            source_uri=source_uri,
            source_version=source_version,
            registered_at=now,
            registered_by=actor.name,
        )
        .on_conflict_do_nothing(index_elements=[ModelVersion.name, ModelVersion.version])
    )
    if inserted.rowcount == 1:  # type: ignore[attr-defined]
        return (
            CatalogEntry(name, version, manifest, source_uri, source_version, now, actor.name),
            True,
        )
    existing = await catalog_entry(session, name, version)
    if existing is None:  # rows are never deleted; a conflict means it exists
        raise RuntimeError(f"no catalogue row for {name!r} {version!r} after a conflict on it")
    if _parsed(existing.manifest) != _parsed(manifest):
        raise VersionConflict(
            f"model '{name}' already has a version {version} with another manifest; "
            "publish a new version number"
        )
    return existing, False


async def record_registration(session: AsyncSession, actor: Actor, entry: CatalogEntry) -> None:
    """The audit event of a new catalogue row (``model.register``), in its transaction."""
    await record_event(
        session,
        actor,
        action="model.register",
        target_type="model",
        target_id=entry.name,
        detail={
            "version": entry.version,
            "source_uri": entry.source_uri,
            "source_version": entry.source_version,
        },
    )


async def record_version(
    session: AsyncSession,
    actor: Actor,
    name: str,
    version: str,
    manifest: str,
    *,
    source_uri: str | None = None,
    source_version: str | None = None,
) -> tuple[CatalogEntry, bool]:
    """Record a version whose files are already in the store, with its audit event
    (``model.register``) when it is new, in the session's transaction; see
    :func:`claim_version` for idempotence and conflicts."""
    entry, created = await claim_version(
        session,
        actor,
        name,
        version,
        manifest,
        source_uri=source_uri,
        source_version=source_version,
    )
    if created:
        await record_registration(session, actor, entry)
    return entry, created


async def catalog_entry(session: AsyncSession, name: str, version: str) -> CatalogEntry | None:
    """One catalogued version, or None."""
    row = await session.get(ModelVersion, (name, version), populate_existing=True)
    return None if row is None else _entry(row)


async def catalog_keys(session: AsyncSession) -> set[CatalogKey]:
    """Every catalogued (name, version): one small query."""
    rows = await session.execute(select(ModelVersion.name, ModelVersion.version))
    return {(row.name, row.version) for row in rows}


async def new_entries(session: AsyncSession, known: Collection[CatalogKey]) -> list[CatalogEntry]:
    """The catalogued versions not in ``known`` (at most :data:`MAX_ENTRIES_PER_READ`), by
    name and version. Rows never change, so a reader keeps what it has read and asks only
    for the rest: one small query of the keys, and one more only when something is new."""
    missing = sorted((await catalog_keys(session)) - set(known))[:MAX_ENTRIES_PER_READ]
    if not missing:
        return []
    rows = await session.scalars(
        select(ModelVersion).where(tuple_(ModelVersion.name, ModelVersion.version).in_(missing))
    )
    return sorted((_entry(row) for row in rows), key=lambda entry: entry.key)


async def model_entries(session: AsyncSession, name: str) -> list[CatalogEntry]:
    """Every catalogued version of ``name``."""
    rows = await session.scalars(select(ModelVersion).where(ModelVersion.name == name))
    return sorted((_entry(row) for row in rows), key=lambda entry: int(entry.version))
