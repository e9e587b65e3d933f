"""Event endpoints: registered, listed, changed, deleted, their secret rotated, a test event
sent, their delivery log read and a delivery sent again; every change audited.

An endpoint belongs to a tenant (``tenant_id``: self-service with the ``webhooks:manage`` scope)
or to the operator (``tenant_id`` None: the admin routes). Every lookup is scoped to the owner,
so another owner's endpoint is not found (404, never 403)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import Actor, record_event
from auth.errors import Conflict, InvalidRequest, NotFound
from auth.events.outbox import EVENT_TYPES, TENANT_EVENT_TYPES, event_body
from auth.events.secrets import SecretBox, new_secret
from auth.events.targets import resolve_target
from auth.models import Event, EventDelivery, EventDeliveryAttempt, EventEndpoint, utcnow

# Endpoints one owner may have, and the longest rotation grace period.
MAX_ENDPOINTS_PER_OWNER = 20
MAX_SECRET_GRACE_SECONDS = 7 * 86_400


class EndpointView(BaseModel):
    """An event endpoint: never its secret."""

    id: uuid.UUID
    tenant_id: uuid.UUID | None
    url: str
    events: list[str]
    description: str
    status: str
    disabled_reason: str | None
    # While a rotation's grace period runs, the previous secret signs too until then.
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, endpoint: EventEndpoint) -> EndpointView:
        """The view of an endpoint row."""
        return cls(
            id=endpoint.id,
            tenant_id=endpoint.tenant_id,
            url=endpoint.url,
            events=sorted(endpoint.event_types),
            description=endpoint.description,
            status=endpoint.status,
            disabled_reason=endpoint.disabled_reason,
            previous_secret_expires_at=endpoint.previous_secret_expires_at,
            created_at=endpoint.created_at,
            updated_at=endpoint.updated_at,
        )


class EndpointWithSecret(EndpointView):
    """A new endpoint, or one whose secret was rotated: the secret is in this answer only."""

    secret: str


class AttemptView(BaseModel):
    """One delivery attempt, as the endpoint's owner reads it."""

    delivery_id: uuid.UUID
    event_id: uuid.UUID
    attempted_at: datetime
    outcome: str
    status_code: int | None
    latency_ms: float
    response_excerpt: str


class TargetPolicy(BaseModel):
    """What the address guard allows (from the settings)."""

    allow_private: bool
    production: bool


def _check_events(events: list[str], tenant_id: uuid.UUID | None) -> list[str]:
    allowed = TENANT_EVENT_TYPES if tenant_id is not None else EVENT_TYPES
    unknown = sorted(set(events) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown event types: {', '.join(unknown)}", loc=("events",))
    if not events:
        raise InvalidRequest("at least one event type is required", loc=("events",))
    return sorted(set(events))


async def _check_target(url: str, policy: TargetPolicy) -> None:
    await resolve_target(url, allow_private=policy.allow_private, production=policy.production)


def _host(url: str) -> str | None:
    """What the audit trail keeps of a URL: its host (a path or query may carry a token)."""
    return urlsplit(url).hostname


def _actor_target(endpoint: EventEndpoint) -> dict[str, Any]:
    return {"target_type": "event_endpoint", "target_id": str(endpoint.id)}


async def create_endpoint(
    session: AsyncSession,
    box: SecretBox,
    actor: Actor,
    policy: TargetPolicy,
    *,
    tenant_id: uuid.UUID | None,
    url: str,
    events: list[str],
    description: str = "",
) -> EndpointWithSecret:
    """Register an endpoint, audited as ``event_endpoint.create``; its secret is in the answer
    only (stored encrypted)."""
    event_types = _check_events(events, tenant_id)
    await _check_target(url, policy)
    count = len(
        (
            await session.scalars(
                select(EventEndpoint.id).where(_owned_by(tenant_id)).limit(MAX_ENDPOINTS_PER_OWNER)
            )
        ).all()
    )
    if count >= MAX_ENDPOINTS_PER_OWNER:
        raise Conflict(f"at most {MAX_ENDPOINTS_PER_OWNER} endpoints per owner")
    secret = new_secret()
    endpoint = EventEndpoint(
        tenant_id=tenant_id,
        url=url,
        description=description,
        event_types=event_types,
        secret_ciphertext=box.seal(secret),
        status="active",
    )
    session.add(endpoint)
    await session.flush()
    await record_event(
        session,
        actor,
        action="event_endpoint.create",
        tenant_id=tenant_id,
        detail={"host": _host(url), "events": event_types},
        **_actor_target(endpoint),
    )
    return EndpointWithSecret(**EndpointView.of(endpoint).model_dump(), secret=secret)


def _owned_by(tenant_id: uuid.UUID | None) -> Any:
    if tenant_id is None:
        return EventEndpoint.tenant_id.is_(None)
    return EventEndpoint.tenant_id == tenant_id


async def _endpoint(
    session: AsyncSession, endpoint_id: uuid.UUID, tenant_id: uuid.UUID | None
) -> EventEndpoint:
    endpoint = await session.scalar(
        select(EventEndpoint).where(EventEndpoint.id == endpoint_id, _owned_by(tenant_id))
    )
    if endpoint is None:
        raise NotFound("webhook endpoint not found")
    return endpoint


async def list_endpoints(session: AsyncSession, tenant_id: uuid.UUID | None) -> list[EndpointView]:
    """The owner's endpoints, oldest first."""
    rows = await session.scalars(
        select(EventEndpoint)
        .where(_owned_by(tenant_id))
        .order_by(EventEndpoint.created_at, EventEndpoint.id)
    )
    return [EndpointView.of(row) for row in rows]


async def get_endpoint(
    session: AsyncSession, endpoint_id: uuid.UUID, tenant_id: uuid.UUID | None
) -> EndpointView:
    """One of the owner's endpoints, or ``NotFound``."""
    return EndpointView.of(await _endpoint(session, endpoint_id, tenant_id))


async def update_endpoint(
    session: AsyncSession,
    actor: Actor,
    policy: TargetPolicy,
    endpoint_id: uuid.UUID,
    tenant_id: uuid.UUID | None,
    changes: dict[str, Any],
) -> EndpointView:
    """Change an endpoint's URL, events, description or status (``active`` again clears the
    reason it was disabled), audited as ``event_endpoint.update``."""
    endpoint = await _endpoint(session, endpoint_id, tenant_id)
    for name in ("url", "events", "description", "status"):
        if name in changes and changes[name] is None:
            raise InvalidRequest(f"{name} cannot be null", loc=(name,))
    if "url" in changes:
        await _check_target(changes["url"], policy)
        endpoint.url = changes["url"]
    if "events" in changes:
        endpoint.event_types = _check_events(changes["events"], tenant_id)
    if "description" in changes:
        endpoint.description = changes["description"]
    if "status" in changes:
        endpoint.status = changes["status"]
        if endpoint.status == "active":
            endpoint.disabled_reason = None
            endpoint.failing_since = None
        else:
            endpoint.disabled_reason = "disabled by its owner"
    await session.flush()
    await record_event(
        session,
        actor,
        action="event_endpoint.update",
        tenant_id=tenant_id,
        detail={
            **{k: v for k, v in changes.items() if k in ("events", "status")},
            **({"host": _host(changes["url"])} if "url" in changes else {}),
        },
        **_actor_target(endpoint),
    )
    await session.refresh(endpoint)
    return EndpointView.of(endpoint)


async def delete_endpoint(
    session: AsyncSession, actor: Actor, endpoint_id: uuid.UUID, tenant_id: uuid.UUID | None
) -> None:
    """Delete an endpoint with its deliveries and their log, audited as
    ``event_endpoint.delete``."""
    endpoint = await _endpoint(session, endpoint_id, tenant_id)
    await record_event(
        session,
        actor,
        action="event_endpoint.delete",
        tenant_id=tenant_id,
        detail={"host": _host(endpoint.url)},
        **_actor_target(endpoint),
    )
    # Explicitly, children first: SQLite enforces no cascade without its foreign-key pragma.
    await session.execute(
        delete(EventDeliveryAttempt).where(EventDeliveryAttempt.endpoint_id == endpoint.id)
    )
    await session.execute(delete(EventDelivery).where(EventDelivery.endpoint_id == endpoint.id))
    await session.execute(delete(EventEndpoint).where(EventEndpoint.id == endpoint.id))


async def rotate_secret(
    session: AsyncSession,
    box: SecretBox,
    actor: Actor,
    endpoint_id: uuid.UUID,
    tenant_id: uuid.UUID | None,
    *,
    grace_seconds: int,
) -> EndpointWithSecret:
    """Give the endpoint a new secret (in the answer only); the previous one keeps signing
    every delivery, beside the new, for ``grace_seconds``. Audited as
    ``event_endpoint.rotate_secret``."""
    if not 0 <= grace_seconds <= MAX_SECRET_GRACE_SECONDS:
        raise InvalidRequest(
            f"grace_seconds must be from 0 to {MAX_SECRET_GRACE_SECONDS}", loc=("grace_seconds",)
        )
    endpoint = await _endpoint(session, endpoint_id, tenant_id)
    secret = new_secret()
    if grace_seconds > 0:
        endpoint.previous_secret_ciphertext = endpoint.secret_ciphertext
        endpoint.previous_secret_expires_at = utcnow() + timedelta(seconds=grace_seconds)
    else:
        endpoint.previous_secret_ciphertext = None
        endpoint.previous_secret_expires_at = None
    endpoint.secret_ciphertext = box.seal(secret)
    await session.flush()
    await record_event(
        session,
        actor,
        action="event_endpoint.rotate_secret",
        tenant_id=tenant_id,
        detail={"grace_seconds": grace_seconds},
        **_actor_target(endpoint),
    )
    await session.refresh(endpoint)
    return EndpointWithSecret(**EndpointView.of(endpoint).model_dump(), secret=secret)


def signing_secrets(endpoint: EventEndpoint, box: SecretBox, now: datetime) -> list[str]:
    """The secrets that sign a delivery now: the current one, and the previous one while its
    rotation's grace period runs."""
    secrets = [box.open(endpoint.secret_ciphertext)]
    if (
        endpoint.previous_secret_ciphertext is not None
        and endpoint.previous_secret_expires_at is not None
        and endpoint.previous_secret_expires_at > now
    ):
        secrets.append(box.open(endpoint.previous_secret_ciphertext))
    return secrets


async def send_test_event(
    session: AsyncSession, actor: Actor, endpoint_id: uuid.UUID, tenant_id: uuid.UUID | None
) -> uuid.UUID:
    """Queue a ``webhook.test`` event for this endpoint alone; its id."""
    endpoint = await _endpoint(session, endpoint_id, tenant_id)
    now = utcnow()
    event = Event(
        type="webhook.test",
        tenant_id=tenant_id,
        payload=event_body("webhook.test", now, {"endpoint_id": str(endpoint.id)}),
        created_at=now,
        # Delivered to this endpoint only: no fan-out.
        fanned_out_at=now,
    )
    session.add(event)
    await session.flush()
    session.add(EventDelivery(event_id=event.id, endpoint_id=endpoint.id, next_attempt_at=now))
    await record_event(
        session,
        actor,
        action="event_endpoint.test",
        tenant_id=tenant_id,
        detail={"event_id": str(event.id)},
        **_actor_target(endpoint),
    )
    await session.flush()
    return event.id


async def list_attempts(
    session: AsyncSession,
    endpoint_id: uuid.UUID,
    tenant_id: uuid.UUID | None,
    *,
    limit: int,
    offset: int,
) -> list[AttemptView]:
    """The endpoint's delivery log, newest first."""
    endpoint = await _endpoint(session, endpoint_id, tenant_id)
    rows = await session.scalars(
        select(EventDeliveryAttempt)
        .where(EventDeliveryAttempt.endpoint_id == endpoint.id)
        .order_by(EventDeliveryAttempt.attempted_at.desc(), EventDeliveryAttempt.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [
        AttemptView(
            delivery_id=row.delivery_id,
            event_id=row.event_id,
            attempted_at=row.attempted_at,
            outcome=row.outcome,
            status_code=row.status_code,
            latency_ms=row.latency_ms,
            response_excerpt=row.response_excerpt,
        )
        for row in rows
    ]


async def redeliver(
    session: AsyncSession,
    actor: Actor,
    endpoint_id: uuid.UUID,
    tenant_id: uuid.UUID | None,
    delivery_id: uuid.UUID,
) -> None:
    """Send a delivery again now (whatever its state), with the same event id and body."""
    endpoint = await _endpoint(session, endpoint_id, tenant_id)
    delivery = await session.scalar(
        select(EventDelivery).where(
            EventDelivery.id == delivery_id, EventDelivery.endpoint_id == endpoint.id
        )
    )
    if delivery is None:
        raise NotFound("delivery not found")
    delivery.status = "pending"
    delivery.next_attempt_at = utcnow()
    await record_event(
        session,
        actor,
        action="event_endpoint.redeliver",
        tenant_id=tenant_id,
        detail={"delivery_id": str(delivery.id)},
        **_actor_target(endpoint),
    )
    await session.flush()
