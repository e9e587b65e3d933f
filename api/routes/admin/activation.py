"""Operator route for the model lifecycle: activate a version (or roll back to one)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from api.http.deps import AdminScope, CredentialFirstRoute, app_state, request_actor
from api.http.errors import problem_responses
from api.observability import metrics
from auth.errors import Conflict, DatabaseTimedOut
from auth.model_activation import (
    MODEL_NAME_PATTERN,
    MODEL_VERSION_PATTERN,
    ActivationView,
    activate_version,
)
from auth.model_catalog import catalog_entry
from ml import ModelUnavailable

# Not a DatabaseRoute: loading a large version may take longer than the database's timeout,
# which bounds only the recording of the activation here.
router = APIRouter(route_class=CredentialFirstRoute, tags=["admin"])

ModelNamePath = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, max_length=64)]


class ActivateRequest(BaseModel):
    """The version to make active."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": "2"}]})

    version: Annotated[str, Field(pattern=MODEL_VERSION_PATTERN, max_length=9)]


class VersionUnavailable(Conflict):
    """The version exists but cannot be served (hash mismatch, failed load or warm-up)."""

    type = "version-unavailable"
    title = "Version unavailable"


@router.post(
    "/models/{name}/activate",
    response_model=ActivationView,
    responses=problem_responses(401, 403, 404, 409, 422, 429, 503),
)
async def activate_model(
    name: ModelNamePath, body: ActivateRequest, admin: AdminScope, request: Request
) -> ActivationView:
    """Verify, warm up and activate a model version on every worker (rollback: the same call)."""
    state = app_state(request)
    try:
        # A version published a moment ago may not have reached this worker's once-a-second
        # read of the catalogue: read its entry now, so that it is fetched if it is not here.
        async with asyncio.timeout(state.settings.database_timeout_seconds):
            async with state.sessionmaker() as session:
                entry = await catalog_entry(session, name, body.version)
    except TimeoutError:
        raise DatabaseTimedOut from None
    if entry is not None:
        state.catalogue[entry.key] = entry
        state.registry.learn_catalogue([entry.manifest])
    try:
        # 404 (ModelNotFound) for a model or version neither the registry nor the catalogue has.
        await asyncio.to_thread(state.registry.load_version, name, body.version)
    except ModelUnavailable as exc:
        raise VersionUnavailable(exc.message) from None
    try:
        async with asyncio.timeout(state.settings.database_timeout_seconds):
            async with state.sessionmaker() as session:
                view = await activate_version(
                    session, request_actor(request, admin), name, body.version
                )
                await session.commit()
    except TimeoutError:
        raise DatabaseTimedOut from None
    # This worker switches now; the others within a second (api.server.activations).
    await asyncio.to_thread(state.registry.set_active, name, body.version)
    metrics.record_active_versions(state.registry)
    return view
