"""Operator route that pulls a model version from MLflow, S3, https or a file (ml.pull)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.http.context import request_context
from api.http.deps import AdminScope, CredentialFirstRoute, app_state, request_actor
from api.http.errors import problem_responses
from api.http.timeout import commit_point
from api.pulls import pull_version
from api.schemas.pull import PullRequestBody, PullView
from auth.errors import Conflict, DatabaseTimedOut
from ml import ModelUnavailable

# Not a DatabaseRoute: a download and a conversion may take far longer than the database's
# timeout, which bounds only the recording of the pull here (api.pulls).
router = APIRouter(route_class=CredentialFirstRoute, tags=["admin"])


class PulledVersionUnavailable(Conflict):
    """The version was pulled but cannot be served, so it was not activated."""

    type = "version-unavailable"
    title = "Version unavailable"


@router.post(
    "/models/pull",
    response_model=PullView,
    responses=problem_responses(401, 403, 409, 422, 429, 503),
)
async def pull_model(body: PullRequestBody, admin: AdminScope, request: Request) -> PullView:
    """Pull a model version from a source, convert and check it (audited); optionally activate."""
    state = app_state(request)
    pulling = pull_version(
        state.settings,
        state.sessionmaker,
        state.registry,
        request_actor(request, admin),
        body,
        state.catalogue,
    )
    try:
        # A pull commits to its outcome (a new version) once it starts: the request's deadline
        # is lifted for it (each download and the database have bounds of their own), so that a
        # long pull is answered and audited instead of going on unseen after a 503.
        view = await commit_point(request_context(request.scope), pulling)
    except ModelUnavailable as exc:
        raise PulledVersionUnavailable(f"pulled, but not activated: {exc.message}") from None
    except TimeoutError:
        raise DatabaseTimedOut from None
    return view
