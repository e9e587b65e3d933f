"""Operator routes for tenants and their API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from api.deps import AdminScope, DatabaseRoute, SessionDep, StateDep
from api.errors import problem_responses
from api.fields import KeyExpiry, MonthlyQuota, Name, PageLimit, PageOffset, RateLimitText
from auth.audit import record_event
from auth.keys import issue_tenant_key, list_tenant_keys, revoke_key
from auth.models import ApiKey, Tenant
from auth.tenants import create_tenant, get_tenant, list_tenants, update_tenant

router = APIRouter(route_class=DatabaseRoute, tags=["admin"])

TenantScope = Literal["predict", "usage:read", "keys:manage"]


class TenantCreate(BaseModel):
    """A new tenant."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    rate_limit: RateLimitText | None = None
    monthly_quota: MonthlyQuota | None = None


class TenantUpdate(BaseModel):
    """Fields to change on a tenant; omitted fields stay as they are. ``rate_limit`` and
    ``monthly_quota`` set to null restore the default limit and unlimited usage; ``name`` and
    ``status`` cannot be null."""

    model_config = ConfigDict(extra="forbid")

    # Optional but not nullable: the schema shows no null, and the service refuses one.
    name: Name | SkipJsonSchema[None] = None
    rate_limit: RateLimitText | None = None
    monthly_quota: MonthlyQuota | None = None
    status: Literal["active", "suspended"] | SkipJsonSchema[None] = None


class TenantOut(BaseModel):
    """A tenant as operators see it."""

    id: uuid.UUID
    name: str
    plan: str
    rate_limit: str | None
    monthly_quota: int | None
    status: str
    created_at: datetime
    updated_at: datetime


class TenantList(BaseModel):
    """A page of tenants."""

    tenants: list[TenantOut]


class KeyCreate(BaseModel):
    """A new API key for a tenant."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    scopes: list[TenantScope] = Field(default=["predict", "usage:read"], min_length=1, max_length=3)
    expires_at: KeyExpiry | None = Field(
        default=None, description="when the key stops working; omitted: never"
    )


class KeyOut(BaseModel):
    """An API key's metadata: never the key, never its digest."""

    id: uuid.UUID
    tenant_id: uuid.UUID | None
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    """A newly issued key; ``key`` is shown in this response only."""

    key: str


class KeyList(BaseModel):
    """A tenant's keys."""

    keys: list[KeyOut]


def _tenant_out(tenant: Tenant) -> TenantOut:
    return TenantOut.model_validate(tenant, from_attributes=True)


def _key_fields(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "tenant_id": key.tenant_id,
        "name": key.name,
        "prefix": key.display_prefix,
        "scopes": sorted(key.scope_set),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
    }


def _client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


@router.post(
    "/tenants",
    status_code=201,
    response_model=TenantOut,
    responses=problem_responses(401, 403, 409, 422, 429, 503),
)
async def create_tenant_route(
    body: TenantCreate, admin: AdminScope, session: SessionDep, request: Request
) -> TenantOut:
    """Create a tenant."""
    tenant = await create_tenant(
        session, name=body.name, rate_limit=body.rate_limit, monthly_quota=body.monthly_quota
    )
    await record_event(
        session,
        actor=admin.actor,
        actor_key_id=admin.key_id,
        action="tenant.create",
        target_type="tenant",
        target_id=str(tenant.id),
        tenant_id=tenant.id,
        remote_addr=_client_address(request),
        detail=body.model_dump(),
    )
    return _tenant_out(tenant)


@router.get("/tenants", response_model=TenantList, responses=problem_responses(401, 403, 429))
async def list_tenants_route(
    session: SessionDep,
    limit: Annotated[PageLimit, Query()] = 100,
    offset: Annotated[PageOffset, Query()] = 0,
) -> TenantList:
    """List tenants in creation order."""
    tenants = await list_tenants(session, limit=limit, offset=offset)
    return TenantList(tenants=[_tenant_out(t) for t in tenants])


@router.get(
    "/tenants/{tenant_id}", response_model=TenantOut, responses=problem_responses(401, 403, 404)
)
async def get_tenant_route(tenant_id: uuid.UUID, session: SessionDep) -> TenantOut:
    """Show one tenant."""
    return _tenant_out(await get_tenant(session, tenant_id))


@router.patch(
    "/tenants/{tenant_id}",
    response_model=TenantOut,
    responses=problem_responses(401, 403, 404, 409, 422, 429),
)
async def update_tenant_route(
    tenant_id: uuid.UUID,
    body: TenantUpdate,
    admin: AdminScope,
    session: SessionDep,
    request: Request,
) -> TenantOut:
    """Change a tenant's name, rate limit, monthly quota or status."""
    changes = body.model_dump(exclude_unset=True)
    tenant = await update_tenant(session, tenant_id, changes)
    await record_event(
        session,
        actor=admin.actor,
        actor_key_id=admin.key_id,
        action="tenant.update",
        target_type="tenant",
        target_id=str(tenant.id),
        tenant_id=tenant.id,
        remote_addr=_client_address(request),
        detail=changes,
    )
    return _tenant_out(tenant)


@router.post(
    "/tenants/{tenant_id}/keys",
    status_code=201,
    response_model=KeyCreated,
    responses=problem_responses(401, 403, 404, 422, 429, 503),
)
async def issue_key_route(
    tenant_id: uuid.UUID,
    body: KeyCreate,
    admin: AdminScope,
    session: SessionDep,
    state: StateDep,
    request: Request,
    response: Response,
) -> KeyCreated:
    """Issue an API key for a tenant; the key is in this response only."""
    # The key is in this body: no cache on the way may keep it.
    response.headers["Cache-Control"] = "no-store"
    key, secret = await issue_tenant_key(
        session,
        state.secrets.key_pepper,
        tenant_id=tenant_id,
        name=body.name,
        scopes=body.scopes,
        expires_at=body.expires_at,
    )
    await record_event(
        session,
        actor=admin.actor,
        actor_key_id=admin.key_id,
        action="key.issue",
        target_type="api_key",
        target_id=str(key.id),
        tenant_id=tenant_id,
        remote_addr=_client_address(request),
        detail={"name": body.name, "scopes": sorted(key.scope_set), "prefix": key.display_prefix},
    )
    return KeyCreated(**_key_fields(key), key=secret)


@router.get(
    "/tenants/{tenant_id}/keys", response_model=KeyList, responses=problem_responses(401, 403, 404)
)
async def list_keys_route(tenant_id: uuid.UUID, session: SessionDep) -> KeyList:
    """List a tenant's keys (metadata only)."""
    keys = await list_tenant_keys(session, tenant_id)
    return KeyList(keys=[KeyOut(**_key_fields(k)) for k in keys])


@router.post("/keys/{key_id}/revoke", response_model=KeyOut, responses=problem_responses(404))
async def revoke_key_route(
    key_id: uuid.UUID, admin: AdminScope, session: SessionDep, request: Request
) -> KeyOut:
    """Revoke a key now (it fails on every worker within a second); idempotent."""
    key, changed = await revoke_key(session, key_id)
    if changed:
        await record_event(
            session,
            actor=admin.actor,
            actor_key_id=admin.key_id,
            action="key.revoke",
            target_type="api_key",
            target_id=str(key.id),
            tenant_id=key.tenant_id,
            remote_addr=_client_address(request),
            detail={"prefix": key.display_prefix},
        )
    return KeyOut(**_key_fields(key))
