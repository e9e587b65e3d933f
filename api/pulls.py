"""A model pull for an operator, shared by ``modelgate models pull`` and
``POST /admin/models/pull``: :func:`ml.pull.pull` in a thread (it downloads, converts and
checks, staged outside the model directory when there is a store), its publication with its audit
event (``model.pull``) in one transaction, and, when asked, the version's blue-green activation.
A pull that fails leaves no version; one whose activation fails leaves the version published and
not active. The model webhooks' deployer (``api.webhooks``) pulls through here too."""

from __future__ import annotations

import asyncio

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.model_catalogue import (
    discard_unpublished,
    model_store,
    next_free_version,
    publish_version,
    staging_root,
)
from api.schemas.pull import PullRequestBody, PullView
from api.server.activations import activate_model_version
from auth.audit import Actor, record_event
from auth.errors import Conflict
from auth.model_activation import record_pull
from auth.model_catalog import CatalogEntry, CatalogKey
from auth.settings import Settings
from ml import ModelRegistry
from ml.pull import PullRefused, PullRequest, PullResult, pull
from ml.sources import SourceConfig, SourceError, parse_source
from ml.store import StoreError

logger = structlog.get_logger(__name__)


class PullFailed(Conflict):
    """The source could not be fetched, or its artifact was refused; nothing was registered."""

    type = "pull-refused"
    title = "Pull refused"


def source_config(settings: Settings) -> SourceConfig:
    """Where the configured sources are (ml.sources), from the settings."""
    return SourceConfig(
        mlflow_tracking_uri=settings.mlflow_tracking_uri or None,
        s3_endpoint_url=settings.s3_endpoint_url or None,
        max_bytes=settings.pull_max_bytes,
    )


async def pull_version(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    registry: ModelRegistry,
    actor: Actor,
    body: PullRequestBody,
    known: dict[CatalogKey, CatalogEntry] | None = None,
) -> PullView:
    """:func:`_pull_version`, with each refusal audited too (``model.pull_refused``: the
    source without credentials, the version asked for and the reason), so that every pull an
    operator or a webhook tried is in the audit trail, served or not."""
    try:
        return await _pull_version(settings, sessionmaker, registry, actor, body, known)
    except PullFailed as exc:
        await _audit_refusal(settings, sessionmaker, actor, body, exc.detail)
        raise


async def _audit_refusal(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    actor: Actor,
    body: PullRequestBody,
    reason: str,
) -> None:
    try:
        source = parse_source(body.source).recorded
    except SourceError:
        source = "(not a source modelgate reads)"
    try:
        async with asyncio.timeout(settings.database_timeout_seconds), sessionmaker() as session:
            await record_event(
                session,
                actor,
                action="model.pull_refused",
                target_type="model",
                target_id=body.name,
                detail={"source": source, "version": body.version, "reason": reason[:300]},
            )
            await session.commit()
    except Exception as exc:
        # The refusal is still answered; only its audit event is missing, which the log says.
        logger.error("refused model pull not audited", error=type(exc).__name__)


async def _pull_version(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    registry: ModelRegistry,
    actor: Actor,
    body: PullRequestBody,
    known: dict[CatalogKey, CatalogEntry] | None = None,
) -> PullView:
    """Pull ``body.source`` as a new version of ``body.name`` and publish it (the model store
    and the catalogue, with the pull's audit event, in one transaction: the catalogue row is
    the commit point), and with ``body.activate`` activate it blue-green
    (:func:`api.server.activations.activate_model_version`: this process fetches, verifies and
    warms it up before the activation is recorded). Raises :class:`PullFailed`, or, once the
    pull is published, the registry's error when the version cannot be served (it stays
    published, not active, and the version that served keeps serving)."""
    store = model_store(settings)
    try:
        kind = parse_source(body.source).kind
    except SourceError as exc:
        raise PullFailed(str(exc)) from None
    version = body.version
    if version is None and kind != "mlflow":
        # MLflow's own version number is the default for models:/; for the others the next one
        # free in the catalogue (which a staging directory outside the model directory cannot
        # see). A concurrent pull of the same number loses at the catalogue's key (409).
        async with asyncio.timeout(settings.database_timeout_seconds), sessionmaker() as session:
            version = await next_free_version(session, settings.model_dir, body.name)
    request = PullRequest(
        source=body.source,
        name=body.name,
        version=version,
        sha256=body.sha256,
        allow_pickle=body.allow_pickle,
    )
    with staging_root(settings.model_dir, store) as root:
        try:
            result = await asyncio.to_thread(pull, root, request, source_config(settings))
        except PullRefused as exc:
            raise PullFailed(str(exc)) from None
        manifest = result.manifest
        view = PullView(
            name=manifest.name,
            version=manifest.version,
            runtime=manifest.runtime,
            source=manifest.source or body.source,
            source_version=manifest.source_version,
            artifact_kind=result.artifact_kind,
            artifact_sha256=result.artifact_sha256,
        )
        try:
            async with (
                asyncio.timeout(settings.database_timeout_seconds),
                sessionmaker() as session,
            ):
                await publish_version(
                    session,
                    store,
                    root / manifest.name / manifest.version,
                    actor,
                    source_uri=view.source,
                    source_version=view.source_version,
                )
                await record_pull(session, actor, manifest.name, _pull_detail(view, result))
                await session.commit()
        except BaseException as exc:
            discard_unpublished(settings.model_dir, store, manifest)
            if isinstance(exc, StoreError):
                raise PullFailed(f"the model store refused the version: {exc}") from None
            raise
    if body.activate:
        view.activation = await activate_model_version(
            registry,
            sessionmaker,
            settings.database_timeout_seconds,
            actor,
            manifest.name,
            manifest.version,
            known,
        )
    return view


def _pull_detail(view: PullView, result: PullResult) -> dict[str, object]:
    """The pull's audit detail: never a credential (the source is recorded without them)."""
    return {
        "version": view.version,
        "source": view.source,
        "source_version": view.source_version,
        "artifact_kind": view.artifact_kind,
        "artifact_sha256": view.artifact_sha256,
        "unpickled": result.unpickled,
        "runtime": view.runtime,
    }
