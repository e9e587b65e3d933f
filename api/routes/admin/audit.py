"""The audit trail, for operators: who did what to which tenant or key, when, from where."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.http.deps import REPLICA_LAG_RESPONSE, DatabaseRoute, ReportSessionDep, SessionDep
from api.http.errors import problem_responses
from api.schemas.fields import PRINTABLE_PATTERN, Moment, PageLimit
from auth.audit import EventFilter, list_events, verify_chain
from auth.models import AuditEvent

router = APIRouter(route_class=DatabaseRoute, tags=["admin"])

# Event ids are chain positions: positive 64-bit integers.
MAX_EVENT_ID = 2**63 - 1


class AuditEventOut(BaseModel):
    """One event of the chain, as stored (``hash`` and ``prev_hash`` let a client check it)."""

    id: int
    created_at: datetime
    actor: str
    actor_key_id: uuid.UUID | None
    action: str
    target_type: str
    target_id: str
    tenant_id: uuid.UUID | None
    client_addr: str | None
    user_agent: str | None
    request_id: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEventOut:
        """The view of an event row."""
        return cls(
            id=event.id,
            created_at=event.created_at,
            actor=event.actor,
            actor_key_id=event.actor_key_id,
            action=event.action,
            target_type=event.target_type,
            target_id=event.target_id,
            tenant_id=event.tenant_id,
            client_addr=event.remote_addr,
            user_agent=event.user_agent,
            request_id=event.request_id,
            detail=event.detail,
            prev_hash=event.prev_hash,
            hash=event.hash,
        )


class AuditPage(BaseModel):
    """A page of events, newest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    events: list[AuditEventOut]
    next_cursor: int | None = Field(description="null on the last page")


@router.get(
    "/audit",
    response_model=AuditPage,
    responses={**REPLICA_LAG_RESPONSE, **problem_responses(401, 403, 422, 429, 503)},
)
async def list_audit_events(
    report: ReportSessionDep,
    tenant_id: Annotated[uuid.UUID | None, Query(description="events about this tenant")] = None,
    actor: Annotated[
        str | None,
        Query(
            max_length=200,
            pattern=PRINTABLE_PATTERN,
            description='who acted, e.g. "admin:ops", "tenant:<id>" or "cli"',
        ),
    ] = None,
    action: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=r"^[a-z_]+(\.[a-z_]+)+$",
            description='e.g. "key.revoke", "tenant.create"',
        ),
    ] = None,
    since: Annotated[Moment | None, Query(description="from this moment, inclusive")] = None,
    until: Annotated[Moment | None, Query(description="before this moment")] = None,
    cursor: Annotated[
        int | None,
        Query(ge=1, le=MAX_EVENT_ID, description="the previous page's next_cursor"),
    ] = None,
    limit: Annotated[PageLimit, Query()] = 100,
) -> AuditPage:
    """List audit events, newest first, filtered by tenant, actor, action and time."""
    where = EventFilter(tenant_id=tenant_id, actor=actor, action=action, since=since, until=until)
    events = await list_events(report.session, where, before_id=cursor, limit=limit)
    next_cursor = events[-1].id if len(events) == limit else None
    return AuditPage(events=[AuditEventOut.of(e) for e in events], next_cursor=next_cursor)


class ChainVerification(BaseModel):
    """What ``modelgate audit verify`` finds: the whole chain recomputed from its first event to
    its recorded end."""

    intact: bool = Field(description="whether no event was edited, deleted or moved")
    events: int = Field(
        description="the events verified in order before the first bad one (all "
        "of them when intact)"
    )
    head: str = Field(
        description="the hash of the last event verified: when intact, the chain's head, to "
        "keep elsewhere and compare later"
    )
    first_bad_id: int | None = Field(description="the first event found bad; null when intact")
    problem: str | None = Field(description="what is wrong with it; null when intact")


@router.get(
    "/audit/verify",
    response_model=ChainVerification,
    responses=problem_responses(401, 403, 429, 503),
)
async def verify_audit_chain(session: SessionDep) -> ChainVerification:
    """Recompute the whole audit chain on the primary, as ``modelgate audit verify`` does."""
    # Not the replica: a verification must see the chain and its recorded end as the primary
    # holds them. It reads every event once (see docs/api.md for the cost).
    report = await verify_chain(session)
    return ChainVerification(
        intact=report.intact,
        events=report.events,
        head=report.head_hash,
        first_bad_id=report.first_bad_id,
        problem=report.problem,
    )
