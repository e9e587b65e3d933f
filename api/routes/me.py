"""The caller's own tenant, keys and usage."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from api.http.deps import (
    REPLICA_LAG_RESPONSE,
    DatabaseRoute,
    KeysScope,
    NoStore,
    ReportSessionDep,
    SessionDep,
    StateDep,
    TenantCredential,
    UsageScope,
    request_actor,
)
from api.http.errors import problem_responses
from api.schemas.fields import KeyExpiry, Name, TenantScope
from api.schemas.keys import KeyRotate
from api.schemas.usage import EndDay, GroupBy, StartDay, UsageReport, usage_report
from auth.identity.keys import issue_tenant_key, list_tenant_keys, revoke_key, rotate_key
from auth.schemas import IssuedKey, KeyList, KeyView, TenantView
from auth.tenants import get_tenant
from auth.usage.ledger import DEFAULT_BREAKDOWNS, report_window, usage_summary

router = APIRouter(route_class=DatabaseRoute, tags=["me"])


class LimitsOut(BaseModel):
    """The limits that apply to the caller: its plan's, with its tenant's overrides and this
    key's own."""

    rate_limit: str = Field(
        description="every limit checked on each request, ';'-separated (e.g. "
        "`10/second;1000/hour`)"
    )
    monthly_quota: int | None = Field(description="units per UTC month; null: unlimited")
    max_in_flight: int | None = Field(
        description="requests of this key in flight at once; null: no bound"
    )
    models: list[str] | None = Field(description="the models the plan opens; null: every model")


class KeyOut(BaseModel):
    """The credential used for this request (never its secret)."""

    id: uuid.UUID
    name: str
    scopes: list[str]
    expires_at: datetime | None


class MeResponse(BaseModel):
    """Who the caller is and what limits apply."""

    tenant: TenantView
    limits: LimitsOut
    key: KeyOut


@router.get("/me", response_model=MeResponse, responses=problem_responses(401, 403, 429, 503))
async def me(subject: TenantCredential, state: StateDep, session: SessionDep) -> MeResponse:
    """Describe the caller's tenant, plan, limits and this key."""
    tenant = subject.require_tenant()
    return MeResponse(
        # The same view of a tenant as the operator's routes and the CLI give.
        tenant=await get_tenant(session, tenant.id),
        limits=LimitsOut(
            rate_limit=subject.rate_limits or state.settings.default_rate_limit,
            monthly_quota=tenant.monthly_quota,
            max_in_flight=subject.max_in_flight,
            models=sorted(tenant.models) if tenant.models is not None else None,
        ),
        key=KeyOut(
            id=subject.require_key_id(),
            name=subject.key_name,
            scopes=sorted(subject.scopes),
            expires_at=subject.expires_at,
        ),
    )


@router.get(
    "/me/usage",
    response_model=UsageReport,
    responses={**REPLICA_LAG_RESPONSE, **problem_responses(401, 403, 422, 429, 503)},
)
async def my_usage(
    subject: UsageScope,
    report: ReportSessionDep,
    start: StartDay = None,
    end: EndDay = None,
    group_by: GroupBy = None,
) -> UsageReport:
    """Report the caller's tenant usage by day, model or key, with the quota position."""
    # The tenant was read with the credential in this request: no need to read it again.
    tenant = subject.require_tenant()
    first, last = report_window(start, end)
    summary = await usage_summary(
        report.session, tenant.id, tenant.monthly_quota, first, last, group_by or DEFAULT_BREAKDOWNS
    )
    return usage_report(summary, tenant.usage_alert_thresholds)


class OwnKeyCreate(BaseModel):
    """A new key for the caller's own tenant; it may hold no scope the calling credential lacks."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    scopes: list[TenantScope] | None = Field(
        default=None,
        min_length=1,
        max_length=4,
        description="at most the calling credential's scopes (more: 403); omitted: all of them",
    )
    expires_at: KeyExpiry | None = Field(
        default=None,
        description="when the key stops working: at most when the calling credential's key "
        "does (later: 422); omitted: then, or never if that key never expires",
    )


@router.get("/me/keys", response_model=KeyList, responses=problem_responses(401, 403, 429, 503))
async def my_keys(subject: KeysScope, session: SessionDep) -> KeyList:
    """List the caller's tenant's keys (metadata only)."""
    return KeyList(keys=await list_tenant_keys(session, subject.require_tenant().id))


@router.post(
    "/me/keys",
    status_code=201,
    response_model=IssuedKey,
    dependencies=[NoStore],
    responses=problem_responses(401, 403, 422, 429, 503),
)
async def issue_my_key(
    body: OwnKeyCreate,
    subject: KeysScope,
    session: SessionDep,
    state: StateDep,
    request: Request,
) -> IssuedKey:
    """Issue a key for the caller's tenant; the key is in this response only."""
    # The new key never outlives the key behind the calling credential (the calling key, or the
    # key a JWT was minted from): a later expires_at is 422, none is that key's end (see
    # auth.identity.keys._bounded_by_creator).
    return await issue_tenant_key(
        session,
        state.secrets.key_pepper,
        request_actor(request, subject),
        tenant_id=subject.require_tenant().id,
        name=body.name,
        scopes=body.scopes if body.scopes is not None else sorted(subject.scopes),
        expires_at=body.expires_at,
        max_scopes=subject.scopes,
        created_by=subject.require_key_id(),
    )


@router.post(
    "/me/keys/{key_id}/revoke",
    response_model=KeyView,
    responses=problem_responses(401, 403, 404, 429, 503),
)
async def revoke_my_key(
    key_id: uuid.UUID, subject: KeysScope, session: SessionDep, request: Request
) -> KeyView:
    """Revoke one of the caller's tenant's keys now; another tenant's key is not found."""
    return await revoke_key(
        session, request_actor(request, subject), key_id, tenant_id=subject.require_tenant().id
    )


@router.post(
    "/me/keys/{key_id}/rotate",
    status_code=201,
    response_model=IssuedKey,
    dependencies=[NoStore],
    responses=problem_responses(401, 403, 404, 409, 422, 429, 503),
)
async def rotate_my_key(
    key_id: uuid.UUID,
    body: KeyRotate,
    subject: KeysScope,
    session: SessionDep,
    state: StateDep,
    request: Request,
) -> IssuedKey:
    """Rotate one of the caller's tenant's keys with a grace; the successor is shown once."""
    # The operator's rotation, held to the caller's tenant (another tenant's key, or an
    # operator's, is not found) and to what the caller could issue: the successor's secret
    # is handed to the caller, so a key with a scope it lacks, or one that outlives the key
    # behind it, is 403 (as issuing such a key is).
    return await rotate_key(
        session,
        state.secrets.key_pepper,
        request_actor(request, subject),
        key_id,
        grace_seconds=body.grace_seconds,
        tenant_id=subject.require_tenant().id,
        max_scopes=subject.scopes,
        created_by=subject.require_key_id(),
    )
