"""Event endpoints (outgoing, signed webhooks): a tenant's under ``/me/webhooks`` (scope
``webhooks:manage``), the operator's service-wide ones under ``/admin/webhooks``. The same routes
for both, built once by :func:`endpoint_routes`; only who owns the endpoints differs. (The
*incoming* model webhooks are ``api.routes.webhooks``.)"""

import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from api.http.deps import (
    AdminScope,
    DatabaseRoute,
    NoStore,
    SessionDep,
    StateDep,
    WebhooksScope,
    request_actor,
)
from api.http.errors import problem_responses
from api.schemas.fields import PageLimit, PageOffset
from api.services import AppState
from auth.events.endpoints import (
    MAX_SECRET_GRACE_SECONDS,
    AttemptView,
    EndpointView,
    EndpointWithSecret,
    TargetPolicy,
    create_endpoint,
    delete_endpoint,
    get_endpoint,
    list_attempts,
    list_endpoints,
    redeliver,
    rotate_secret,
    send_test_event,
    update_endpoint,
)
from auth.events.outbox import EVENT_TYPES, EventType
from auth.events.targets import MAX_URL_LENGTH
from auth.identity.authn import AuthSubject

EndpointUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        pattern=r"^https?://[^\x00-\x20\x7f]+$",
        description="where events are POSTed; https in production; it must resolve to public "
        "addresses only (unless MODELGATE_WEBHOOK_ALLOW_PRIVATE_TARGETS)",
    ),
]
EventList = Annotated[list[EventType], Field(min_length=1, max_length=len(EVENT_TYPES))]
# Printable characters (as names), empty allowed.
Description = Annotated[str, Field(max_length=500, pattern=r"^[^\x00-\x1f\x7f]*$")]


class EndpointCreate(BaseModel):
    """A new event endpoint; its signing secret is generated and shown once."""

    model_config = ConfigDict(extra="forbid")

    url: EndpointUrl
    events: EventList
    description: Description = ""


class EndpointUpdate(BaseModel):
    """Fields to change on an endpoint; omitted fields stay as they are."""

    model_config = ConfigDict(extra="forbid")

    url: EndpointUrl | SkipJsonSchema[None] = None
    events: EventList | SkipJsonSchema[None] = None
    description: Description | SkipJsonSchema[None] = None
    status: Literal["active", "disabled"] | SkipJsonSchema[None] = None


class SecretRotation(BaseModel):
    """A new signing secret; the previous one keeps signing beside it for ``grace_seconds``."""

    model_config = ConfigDict(extra="forbid")

    grace_seconds: int = Field(default=86_400, ge=0, le=MAX_SECRET_GRACE_SECONDS)


class EndpointList(BaseModel):
    """The owner's endpoints."""

    endpoints: list[EndpointView]


class AttemptList(BaseModel):
    """An endpoint's delivery log, newest first."""

    attempts: list[AttemptView]


class QueuedEvent(BaseModel):
    """An event queued for delivery."""

    event_id: uuid.UUID


class QueuedDelivery(BaseModel):
    """A delivery queued to be sent again."""

    delivery_id: uuid.UUID


def _policy(state: AppState) -> TargetPolicy:
    settings = state.settings
    return TargetPolicy(
        allow_private=settings.webhook_allow_private_targets, production=settings.is_production
    )


Owner = Callable[[AuthSubject], uuid.UUID | None]


def endpoint_routes(router: APIRouter, scope: Any, owner: Owner, prefix: str) -> None:
    """Add the endpoint routes under ``prefix`` to ``router``; ``scope`` is the credential
    dependency (an ``Annotated`` alias) and ``owner`` maps its subject to the owning tenant
    (None: the operator)."""
    # The alias's Depends(...), declared on each route's subject. (This module evaluates its
    # annotations when each route is defined, with no "from __future__ import annotations":
    # FastAPI could not resolve this local name from a string.)
    dependency = get_args(scope)[1]

    @router.get(
        prefix, response_model=EndpointList, responses=problem_responses(401, 403, 429, 503)
    )
    async def list_webhooks(
        subject: Annotated[AuthSubject, dependency], session: SessionDep
    ) -> EndpointList:
        """List the event endpoints (never their secrets)."""
        return EndpointList(endpoints=await list_endpoints(session, owner(subject)))

    @router.post(
        prefix,
        status_code=201,
        response_model=EndpointWithSecret,
        dependencies=[NoStore],
        responses=problem_responses(401, 403, 409, 422, 429, 503),
    )
    async def create_webhook(
        body: EndpointCreate,
        subject: Annotated[AuthSubject, dependency],
        session: SessionDep,
        state: StateDep,
        request: Request,
    ) -> EndpointWithSecret:
        """Register an endpoint, its secret shown once; 422 for a non-public URL, 409 past 20."""
        return await create_endpoint(
            session,
            state.event_secrets,
            request_actor(request, subject),
            _policy(state),
            tenant_id=owner(subject),
            url=body.url,
            events=list(body.events),
            description=body.description,
        )

    @router.get(
        prefix + "/{endpoint_id}",
        response_model=EndpointView,
        responses=problem_responses(401, 403, 404, 429, 503),
    )
    async def get_webhook(
        endpoint_id: uuid.UUID, subject: Annotated[AuthSubject, dependency], session: SessionDep
    ) -> EndpointView:
        """Show one event endpoint."""
        return await get_endpoint(session, endpoint_id, owner(subject))

    @router.patch(
        prefix + "/{endpoint_id}",
        response_model=EndpointView,
        responses=problem_responses(401, 403, 404, 422, 429, 503),
    )
    async def update_webhook(
        endpoint_id: uuid.UUID,
        body: EndpointUpdate,
        subject: Annotated[AuthSubject, dependency],
        session: SessionDep,
        state: StateDep,
        request: Request,
    ) -> EndpointView:
        """Change an endpoint's URL (checked as at registration), events, description or status."""
        return await update_endpoint(
            session,
            request_actor(request, subject),
            _policy(state),
            endpoint_id,
            owner(subject),
            body.model_dump(exclude_unset=True),
        )

    @router.delete(
        prefix + "/{endpoint_id}",
        status_code=204,
        response_class=Response,
        responses=problem_responses(401, 403, 404, 429, 503),
    )
    async def delete_webhook(
        endpoint_id: uuid.UUID,
        subject: Annotated[AuthSubject, dependency],
        session: SessionDep,
        request: Request,
    ) -> Response:
        """Delete an event endpoint with its delivery log."""
        await delete_endpoint(session, request_actor(request, subject), endpoint_id, owner(subject))
        return Response(status_code=204)

    @router.post(
        prefix + "/{endpoint_id}/rotate-secret",
        response_model=EndpointWithSecret,
        dependencies=[NoStore],
        responses=problem_responses(401, 403, 404, 422, 429, 503),
    )
    async def rotate_webhook_secret(
        endpoint_id: uuid.UUID,
        body: SecretRotation,
        subject: Annotated[AuthSubject, dependency],
        session: SessionDep,
        state: StateDep,
        request: Request,
    ) -> EndpointWithSecret:
        """Give the endpoint a new secret (in this response only); both sign during the grace."""
        return await rotate_secret(
            session,
            state.event_secrets,
            request_actor(request, subject),
            endpoint_id,
            owner(subject),
            grace_seconds=body.grace_seconds,
        )

    @router.post(
        prefix + "/{endpoint_id}/test",
        status_code=202,
        response_model=QueuedEvent,
        responses=problem_responses(401, 403, 404, 429, 503),
    )
    async def test_webhook(
        endpoint_id: uuid.UUID,
        subject: Annotated[AuthSubject, dependency],
        session: SessionDep,
        state: StateDep,
        request: Request,
    ) -> QueuedEvent:
        """Queue a webhook.test event for this endpoint alone."""
        event_id = await send_test_event(
            session, request_actor(request, subject), endpoint_id, owner(subject)
        )
        state.dispatcher.wake()
        return QueuedEvent(event_id=event_id)

    @router.get(
        prefix + "/{endpoint_id}/deliveries",
        response_model=AttemptList,
        responses=problem_responses(401, 403, 404, 429, 503),
    )
    async def list_webhook_deliveries(
        endpoint_id: uuid.UUID,
        subject: Annotated[AuthSubject, dependency],
        session: SessionDep,
        limit: Annotated[PageLimit, Query()] = 100,
        offset: Annotated[PageOffset, Query()] = 0,
    ) -> AttemptList:
        """The endpoint's delivery log (status, latency, first bytes of each answer)."""
        return AttemptList(
            attempts=await list_attempts(
                session, endpoint_id, owner(subject), limit=limit, offset=offset
            )
        )

    @router.post(
        prefix + "/{endpoint_id}/deliveries/{delivery_id}/redeliver",
        status_code=202,
        response_model=QueuedDelivery,
        responses=problem_responses(401, 403, 404, 429, 503),
    )
    async def redeliver_webhook(
        endpoint_id: uuid.UUID,
        delivery_id: uuid.UUID,
        subject: Annotated[AuthSubject, dependency],
        session: SessionDep,
        state: StateDep,
        request: Request,
    ) -> QueuedDelivery:
        """Send a delivery again now, with the same event id and body."""
        await redeliver(
            session, request_actor(request, subject), endpoint_id, owner(subject), delivery_id
        )
        state.dispatcher.wake()
        return QueuedDelivery(delivery_id=delivery_id)


def _tenant_owner(subject: AuthSubject) -> uuid.UUID | None:
    return subject.require_tenant().id


def _operator_owner(subject: AuthSubject) -> uuid.UUID | None:  # noqa: ARG001
    return None


# The tenant's own endpoints, at /me/webhooks.
me_router = APIRouter(route_class=DatabaseRoute, tags=["webhooks"])
endpoint_routes(me_router, WebhooksScope, _tenant_owner, "/me/webhooks")
# The operator's service-wide endpoints, at /admin/webhooks (inside the admin router).
admin_router = APIRouter(route_class=DatabaseRoute, tags=["admin"])
endpoint_routes(admin_router, AdminScope, _operator_owner, "/webhooks")
