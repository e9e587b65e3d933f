"""Operator route for the model lifecycle: activate a version (or roll back to one)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from api.http.deps import AdminScope, CredentialFirstRoute, app_state, request_actor
from api.http.errors import problem_responses
from api.server.activations import activate_model_version
from auth.errors import Conflict
from auth.model_activation import (
    MODEL_NAME_PATTERN,
    MODEL_VERSION_PATTERN,
    ActivationView,
)
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
        # 404 (ModelNotFound) for a model or version neither the registry nor the catalogue has.
        return await activate_model_version(
            state.registry,
            state.sessionmaker,
            state.settings.database_timeout_seconds,
            request_actor(request, admin),
            name,
            body.version,
            state.catalogue,
        )
    except ModelUnavailable as exc:
        raise VersionUnavailable(exc.message) from None
