"""A model pull for an operator, shared by ``modelgate models pull`` and
``POST /admin/models/pull``: :func:`ml.pull.pull` in a thread (it downloads, converts and
checks), then its audit event (``model.pull``) and, when asked, the version's activation, in one
transaction. A pull that fails leaves no version; one whose activation fails leaves the version
registered and not active."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.schemas.pull import PullRequestBody, PullView
from auth.audit import Actor
from auth.errors import Conflict
from auth.model_activation import activate_version, record_pull
from auth.settings import Settings
from ml import ModelError, ModelRegistry
from ml.pull import PullRefused, PullRequest, pull
from ml.sources import SourceConfig


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
) -> PullView:
    """Pull ``body.source`` as a new version of ``body.name`` (audited), and with
    ``body.activate`` load it into ``registry`` (verified, warmed up) and record it as active.
    Raises :class:`PullFailed`, or, once the pull is recorded, the registry's error when the
    pulled version cannot be served (it stays registered, not active)."""
    request = PullRequest(
        source=body.source,
        name=body.name,
        version=body.version,
        sha256=body.sha256,
        allow_pickle=body.allow_pickle,
    )
    try:
        result = await asyncio.to_thread(pull, settings.model_dir, request, source_config(settings))
    except PullRefused as exc:
        raise PullFailed(str(exc)) from None
    manifest = result.manifest
    unservable: ModelError | None = None
    if body.activate:
        try:
            await asyncio.to_thread(registry.load_version, manifest.name, manifest.version)
        except ModelError as exc:
            unservable = exc  # the pull is still recorded; the activation is not
    view = PullView(
        name=manifest.name,
        version=manifest.version,
        runtime=manifest.runtime,
        source=manifest.source or body.source,
        source_version=manifest.source_version,
        artifact_kind=result.artifact_kind,
        artifact_sha256=result.artifact_sha256,
    )
    async with asyncio.timeout(settings.database_timeout_seconds):
        async with sessionmaker() as session:
            await record_pull(
                session,
                actor,
                manifest.name,
                {
                    "version": manifest.version,
                    "source": view.source,
                    "source_version": view.source_version,
                    "artifact_kind": view.artifact_kind,
                    "artifact_sha256": view.artifact_sha256,
                    "unpickled": result.unpickled,
                    "runtime": view.runtime,
                },
            )
            if body.activate and unservable is None:
                view.activation = await activate_version(
                    session, actor, manifest.name, manifest.version
                )
            await session.commit()
    if unservable is not None:
        raise unservable
    return view
