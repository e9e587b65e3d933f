"""Operator routes for tenants and their API keys."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from api.http.deps import AdminScope, DatabaseRoute, NoStore, SessionDep, StateDep, request_actor
from api.http.errors import problem_responses
from api.schemas.fields import (
    AlertThresholds,
    KeyExpiry,
    MaxInFlight,
    MonthlyQuota,
    Name,
    PageLimit,
    PageOffset,
    PlanName,
    RateLimitText,
    TenantScope,
)
from api.schemas.keys import KeyRotate
from auth.identity.keys import (
    issue_tenant_key,
    list_tenant_keys,
    revoke_key,
    rotate_key,
    update_key_limits,
)
from auth.schemas import IssuedKey, KeyList, KeyView, TenantView
from auth.tenants import create_tenant, get_tenant, list_tenants, update_tenant

router = APIRouter(route_class=DatabaseRoute, tags=["admin"])


class TenantCreate(BaseModel):
    """A new tenant."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    plan: PlanName | None = Field(
        default=None,
        description="the name of an existing, active plan (another is refused with 422); "
        "omitted: the default plan, `standard`",
    )
    rate_limit: RateLimitText | None = Field(
        default=None, description="overrides the plan's rate limits; null: the plan's"
    )
    monthly_quota: MonthlyQuota | None = Field(
        default=None, description="overrides the plan's monthly quota; null: the plan's"
    )
    usage_alert_thresholds: AlertThresholds | None = Field(
        default=None, description="override of the plan's usage alert thresholds; null: the plan's"
    )


class TenantUpdate(BaseModel):
    """Fields to change on a tenant; omitted fields stay as they are. ``rate_limit`` and
    ``monthly_quota`` set to null make the plan's apply again; ``name``, ``plan`` and
    ``status`` cannot be null."""

    model_config = ConfigDict(extra="forbid")

    # Optional but not nullable: the schema shows no null, and the service refuses one.
    name: Name | SkipJsonSchema[None] = None
    plan: PlanName | SkipJsonSchema[None] = Field(
        default=None,
        description="move the tenant to this existing, active plan (another is refused with 422)",
    )
    rate_limit: RateLimitText | None = None
    monthly_quota: MonthlyQuota | None = None
    usage_alert_thresholds: AlertThresholds | None = Field(
        default=None, description="override of the plan's usage alert thresholds; null: the plan's"
    )
    status: Literal["active", "suspended"] | SkipJsonSchema[None] = None


class TenantList(BaseModel):
    """A page of tenants."""

    tenants: list[TenantView]


class KeyCreate(BaseModel):
    """A new API key for a tenant."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    scopes: list[TenantScope] = Field(default=["predict", "usage:read"], min_length=1, max_length=4)
    expires_at: KeyExpiry | None = Field(
        default=None, description="when the key stops working; omitted: never"
    )
    rate_limits: RateLimitText | None = Field(
        default=None,
        description="limits of this key alone, checked on top of its tenant's; null: none",
    )
    max_in_flight: MaxInFlight | None = Field(
        default=None, description="this key's bound on requests in flight; null: the plan's"
    )


class KeyUpdate(BaseModel):
    """A tenant key's own limits to change; omitted fields stay, null clears one."""

    model_config = ConfigDict(extra="forbid")

    rate_limits: RateLimitText | None = Field(
        default=None, description="checked on top of the tenant's; null: none of its own"
    )
    max_in_flight: MaxInFlight | None = Field(default=None, description="null: the plan's bound")


@router.post(
    "/tenants",
    status_code=201,
    response_model=TenantView,
    responses=problem_responses(401, 403, 409, 422, 429, 503),
)
async def create_tenant_route(
    body: TenantCreate, admin: AdminScope, session: SessionDep, request: Request
) -> TenantView:
    """Create a tenant."""
    return await create_tenant(
        session,
        request_actor(request, admin),
        name=body.name,
        plan=body.plan,
        rate_limit=body.rate_limit,
        monthly_quota=body.monthly_quota,
        usage_alert_thresholds=body.usage_alert_thresholds,
    )


@router.get("/tenants", response_model=TenantList, responses=problem_responses(401, 403, 429))
async def list_tenants_route(
    session: SessionDep,
    limit: Annotated[PageLimit, Query()] = 100,
    offset: Annotated[PageOffset, Query()] = 0,
) -> TenantList:
    """List tenants in creation order."""
    return TenantList(tenants=await list_tenants(session, limit=limit, offset=offset))


@router.get(
    "/tenants/{tenant_id}", response_model=TenantView, responses=problem_responses(401, 403, 404)
)
async def get_tenant_route(tenant_id: uuid.UUID, session: SessionDep) -> TenantView:
    """Show one tenant."""
    return await get_tenant(session, tenant_id)


@router.patch(
    "/tenants/{tenant_id}",
    response_model=TenantView,
    responses=problem_responses(401, 403, 404, 409, 422, 429),
)
async def update_tenant_route(
    tenant_id: uuid.UUID,
    body: TenantUpdate,
    admin: AdminScope,
    session: SessionDep,
    request: Request,
) -> TenantView:
    """Change a tenant's name, plan, limit overrides or status."""
    return await update_tenant(
        session, request_actor(request, admin), tenant_id, body.model_dump(exclude_unset=True)
    )


@router.post(
    "/tenants/{tenant_id}/keys",
    status_code=201,
    response_model=IssuedKey,
    dependencies=[NoStore],
    responses=problem_responses(401, 403, 404, 422, 429, 503),
)
async def issue_key_route(
    tenant_id: uuid.UUID,
    body: KeyCreate,
    admin: AdminScope,
    session: SessionDep,
    state: StateDep,
    request: Request,
) -> IssuedKey:
    """Issue an API key for a tenant; the key is in this response only."""
    return await issue_tenant_key(
        session,
        state.secrets.key_pepper,
        request_actor(request, admin),
        tenant_id=tenant_id,
        name=body.name,
        scopes=body.scopes,
        expires_at=body.expires_at,
        rate_limits=body.rate_limits,
        max_in_flight=body.max_in_flight,
    )


@router.get(
    "/tenants/{tenant_id}/keys", response_model=KeyList, responses=problem_responses(401, 403, 404)
)
async def list_keys_route(tenant_id: uuid.UUID, session: SessionDep) -> KeyList:
    """List a tenant's keys (metadata only)."""
    return KeyList(keys=await list_tenant_keys(session, tenant_id))


@router.post("/keys/{key_id}/revoke", response_model=KeyView, responses=problem_responses(404))
async def revoke_key_route(
    key_id: uuid.UUID, admin: AdminScope, session: SessionDep, request: Request
) -> KeyView:
    """Revoke a key now (it fails on every worker within a second); idempotent."""
    return await revoke_key(session, request_actor(request, admin), key_id)


@router.patch(
    "/keys/{key_id}",
    response_model=KeyView,
    responses=problem_responses(401, 403, 404, 422, 429, 503),
)
async def update_key_route(
    key_id: uuid.UUID, body: KeyUpdate, admin: AdminScope, session: SessionDep, request: Request
) -> KeyView:
    """Change a tenant key's own limits; every worker applies them within a second."""
    return await update_key_limits(
        session, request_actor(request, admin), key_id, body.model_dump(exclude_unset=True)
    )


@router.post(
    "/keys/{key_id}/rotate",
    status_code=201,
    response_model=IssuedKey,
    dependencies=[NoStore],
    responses=problem_responses(404, 409, 422, 503),
)
async def rotate_key_route(
    key_id: uuid.UUID,
    body: KeyRotate,
    admin: AdminScope,
    session: SessionDep,
    state: StateDep,
    request: Request,
) -> IssuedKey:
    """Rotate a key: its successor is in this response only; it works until the grace ends."""
    return await rotate_key(
        session,
        state.secrets.key_pepper,
        request_actor(request, admin),
        key_id,
        grace_seconds=body.grace_seconds,
    )
