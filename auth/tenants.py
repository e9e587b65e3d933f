"""Tenants and admin principals: the services every entry point calls; each change is audited."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import Actor, record_event
from auth.errors import Conflict, InvalidRequest, NotFound
from auth.limits.limiter import parse_rate_limit
from auth.models import AdminPrincipal, Tenant
from auth.schemas import TenantView

# A monthly quota larger than this is not a limit; it also keeps every sum of units far
# inside a 64-bit column.
MAX_MONTHLY_QUOTA = 10**12


def _check_quota(monthly_quota: int | None) -> None:
    if monthly_quota is not None and not 0 <= monthly_quota <= MAX_MONTHLY_QUOTA:
        raise InvalidRequest(
            f"monthly_quota must be between 0 and {MAX_MONTHLY_QUOTA}", loc=("monthly_quota",)
        )


async def create_tenant(
    session: AsyncSession,
    actor: Actor,
    *,
    name: str,
    rate_limit: str | None = None,
    monthly_quota: int | None = None,
) -> TenantView:
    """Create an active tenant (the name must be unique); audited as ``tenant.create``."""
    if rate_limit is not None:
        parse_rate_limit(rate_limit)
    _check_quota(monthly_quota)
    if await session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise Conflict(f"a tenant named {name!r} already exists")
    tenant = Tenant(name=name, rate_limit=rate_limit, monthly_quota=monthly_quota)
    session.add(tenant)
    try:
        await session.flush()
    except IntegrityError:
        # A concurrent create won the race for the unique name.
        raise Conflict(f"a tenant named {name!r} already exists") from None
    await record_event(
        session,
        actor,
        action="tenant.create",
        target_type="tenant",
        target_id=str(tenant.id),
        tenant_id=tenant.id,
        detail={"name": name, "rate_limit": rate_limit, "monthly_quota": monthly_quota},
    )
    return TenantView.of(tenant)


async def update_tenant(
    session: AsyncSession, actor: Actor, tenant_id: uuid.UUID, changes: dict[str, Any]
) -> TenantView:
    """Apply changes to a tenant. ``rate_limit``/``monthly_quota`` set to None restore the
    default limit and unlimited usage; ``name`` and ``status`` cannot be None. Audited as
    ``tenant.suspend`` or ``tenant.reactivate`` when the status changes, else ``tenant.update``."""
    tenant = await _tenant_row(session, tenant_id)
    previous_status = tenant.status
    if changes.get("rate_limit") is not None:
        parse_rate_limit(changes["rate_limit"])
    _check_quota(changes.get("monthly_quota"))
    if changes.get("name") not in (None, tenant.name):
        taken = await session.scalar(select(Tenant.id).where(Tenant.name == changes["name"]))
        if taken is not None:
            raise Conflict(f"a tenant named {changes['name']!r} already exists")
    for field in ("name", "status"):
        if field in changes and changes[field] is None:
            raise InvalidRequest(f"{field} cannot be null", loc=(field,))
    for field, value in changes.items():
        setattr(tenant, field, value)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict("the change conflicts with another tenant") from None
    await session.refresh(tenant)
    action = "tenant.update"
    if tenant.status != previous_status:
        action = "tenant.suspend" if tenant.status == "suspended" else "tenant.reactivate"
    await record_event(
        session,
        actor,
        action=action,
        target_type="tenant",
        target_id=str(tenant.id),
        tenant_id=tenant.id,
        detail=changes,
    )
    return TenantView.of(tenant)


async def _tenant_row(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("tenant not found")
    return tenant


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> TenantView:
    """One tenant, or ``NotFound``."""
    return TenantView.of(await _tenant_row(session, tenant_id))


async def list_tenants(session: AsyncSession, *, limit: int, offset: int) -> list[TenantView]:
    """Tenants in creation order."""
    result = await session.scalars(
        select(Tenant).order_by(Tenant.created_at, Tenant.id).limit(limit).offset(offset)
    )
    return [TenantView.of(tenant) for tenant in result]


async def get_or_create_admin(session: AsyncSession, name: str) -> AdminPrincipal:
    """The admin principal with this name, created if absent."""
    admin = await session.scalar(select(AdminPrincipal).where(AdminPrincipal.name == name))
    if admin is None:
        admin = AdminPrincipal(name=name)
        session.add(admin)
        await session.flush()
    return admin
