"""The deployer behind the model webhooks: a version announced by MLflow or by a Standard
Webhooks sender is pulled and published the way an operator's ``modelgate models pull`` does
(``api.pulls``: fetched, its digest checked, converted and checked, put in the model store and
the catalogue, audited ``model.pull``), and, when the delivery asks for it (MLflow's activation
alias, or ``"activate": true``), activated blue-green through the one activation step
(``api.server.activations.activate_model_version``): this process fetches, verifies, warms the
version up and asks its canary before the activation is recorded, so the old version serves
until then, and keeps serving if the new one fails. Every other worker follows the record.

A webhook is not an operator at a terminal: it never consents to a pickle (unpickling runs
code), so a pickle artifact is refused with its reason.
"""

from __future__ import annotations

import asyncio

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.pulls import PullFailed, pull_version
from api.schemas.pull import PullRequestBody
from api.server.activations import activate_model_version, load_published_version
from api.webhooks.deploy import DeployOutcome, DeployRequest
from auth.audit import Actor
from auth.model_catalog import CatalogEntry, CatalogKey, VersionConflict, catalog_entry
from auth.settings import Settings
from ml import ModelError, ModelRegistry
from ml.sources import SourceError, parse_source


class PullDeployer:
    """Pulls and publishes an announced version (unless the catalogue has it already), then
    activates it blue-green when asked (see the module)."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        sessionmaker: async_sessionmaker[AsyncSession],
        known: dict[CatalogKey, CatalogEntry],
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._sessionmaker = sessionmaker
        self._known = known

    async def deploy(self, request: DeployRequest) -> DeployOutcome:
        """Pull ``request``'s version if it is not published yet, and activate it if asked."""
        actor = Actor(name=f"webhook:{request.via}", request_id=request.delivery_id)
        try:
            recorded_source = parse_source(request.source_uri).recorded
        except SourceError as exc:
            return DeployOutcome("refused", f"not pulled: {exc}")
        entry = await self._entry(request)
        if entry is None:
            try:
                body = PullRequestBody(
                    source=request.source_uri,
                    name=request.name,
                    version=request.version,
                    sha256=request.sha256,
                )
                await pull_version(
                    self._settings, self._sessionmaker, self._registry, actor, body, self._known
                )
            except ValidationError as exc:
                return DeployOutcome("refused", f"not pulled: {exc.errors()[0]['msg']}")
            except PullFailed as exc:
                return DeployOutcome("refused", f"not pulled: {exc.detail}")
            except VersionConflict:
                # Published meanwhile by another delivery (MLflow announces a version, then
                # its alias: two deliveries, perhaps on two replicas): the same version if it
                # came from the same source.
                entry = await self._entry(request)
                if entry is None or entry.source_uri != recorded_source:
                    return DeployOutcome(
                        "refused",
                        f"version {request.version} of {request.name!r} is already published "
                        "from another source",
                    )
            published = "already published" if entry is not None else "pulled and published"
        elif entry.source_uri != recorded_source:
            return DeployOutcome(
                "refused",
                f"version {request.version} of {request.name!r} is already published from "
                "another source",
            )
        else:
            published = "already published"
        timeout = self._settings.database_timeout_seconds
        try:
            if not request.activate:
                # Loaded here (verified, warmed up, its canary asked): a version that cannot
                # serve is said so now, and requests that pin it are served at once.
                await load_published_version(
                    self._registry,
                    self._sessionmaker,
                    timeout,
                    request.name,
                    request.version,
                    self._known,
                )
                return DeployOutcome("deployed", f"{published} and loaded; not activated")
            await activate_model_version(
                self._registry,
                self._sessionmaker,
                timeout,
                actor,
                request.name,
                request.version,
                self._known,
            )
        except ModelError as exc:
            if not request.activate:
                return DeployOutcome("refused", f"{published}, but it cannot serve: {exc.message}")
            return DeployOutcome(
                "refused",
                f"{published}, but not activated: {exc.message}; the active version keeps serving",
            )
        return DeployOutcome("deployed", f"{published} and activated", activated=True)

    async def _entry(self, request: DeployRequest) -> CatalogEntry | None:
        async with (
            asyncio.timeout(self._settings.database_timeout_seconds),
            self._sessionmaker() as session,
        ):
            return await catalog_entry(session, request.name, request.version)
