"""Tenants and admin principals: the services every entry point calls; each change is audited."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import Actor, record_event
from auth.errors import Conflict, InvalidRequest, NotFound
from auth.events.outbox import emit
from auth.limits.plans import (
    EffectiveLimits,
    check_alert_thresholds,
    check_monthly_quota,
    check_rate_limits,
    effective_limits,
    plan_for_tenant,
)
from auth.models import AdminPrincipal, Plan, Tenant
from auth.schemas import TenantView


def _check_overrides(values: dict[str, Any]) -> None:
    if values.get("rate_limit") is not None:
        check_rate_limits(values["rate_limit"], "rate_limit")
    check_monthly_quota(values.get("monthly_quota"))
    if values.get("usage_alert_thresholds") is not None:
        values["usage_alert_thresholds"] = check_alert_thresholds(values["usage_alert_thresholds"])


async def create_tenant(
    session: AsyncSession,
    actor: Actor,
    *,
    name: str,
    plan: str | None = None,
    rate_limit: str | None = None,
    monthly_quota: int | None = None,
    usage_alert_thresholds: list[int] | None = None,
) -> TenantView:
    """Create an active tenant (the name must be unique) on the named plan (the default plan
    when None); audited as ``tenant.create``."""
    overrides: dict[str, Any] = {
        "rate_limit": rate_limit,
        "monthly_quota": monthly_quota,
        "usage_alert_thresholds": usage_alert_thresholds,
    }
    _check_overrides(overrides)
    plan_row = await plan_for_tenant(session, plan)
    if await session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise Conflict(f"a tenant named {name!r} already exists")
    tenant = Tenant(
        name=name,
        plan_id=plan_row.id,
        rate_limit=rate_limit,
        monthly_quota=monthly_quota,
        usage_alert_thresholds=overrides["usage_alert_thresholds"],
    )
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
        detail={
            "name": name,
            "plan": plan_row.name,
            "rate_limit": rate_limit,
            "monthly_quota": monthly_quota,
            "usage_alert_thresholds": overrides["usage_alert_thresholds"],
        },
    )
    return TenantView.of(tenant, plan_row)


async def update_tenant(
    session: AsyncSession, actor: Actor, tenant_id: uuid.UUID, changes: dict[str, Any]
) -> TenantView:
    """Apply changes to a tenant. ``plan`` names the plan to move it to (an active one);
    ``rate_limit``/``monthly_quota`` set to None make the plan's apply again; ``name``,
    ``plan`` and ``status`` cannot be None. Audited as ``tenant.suspend`` or
    ``tenant.reactivate`` when the status changes, else ``tenant.update``."""
    tenant = await _tenant_row(session, tenant_id)
    previous_status = tenant.status
    for field in ("name", "status", "plan"):
        if field in changes and changes[field] is None:
            raise InvalidRequest(f"{field} cannot be null", loc=(field,))
    _check_overrides(changes)
    if changes.get("name") not in (None, tenant.name):
        taken = await session.scalar(select(Tenant.id).where(Tenant.name == changes["name"]))
        if taken is not None:
            raise Conflict(f"a tenant named {changes['name']!r} already exists")
    values = dict(changes)
    if "plan" in values:
        values["plan_id"] = (await plan_for_tenant(session, values.pop("plan"))).id
    for field, value in values.items():
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
    if action == "tenant.suspend":
        await emit(
            session,
            "tenant.suspended",
            {"tenant_id": str(tenant.id), "name": tenant.name},
            tenant_id=tenant.id,
        )
    return TenantView.of(tenant, await _plan_of(session, tenant))


async def tenant_limits(session: AsyncSession, tenant_id: uuid.UUID) -> EffectiveLimits:
    """What a tenant is held to (its overrides, else its plan's), for a report on any tenant:
    its monthly quota and alert thresholds; ``NotFound`` if there is no such tenant."""
    tenant = await _tenant_row(session, tenant_id)
    # No key: the server's default rate limit is never needed.
    return effective_limits(await _plan_of(session, tenant), tenant, None, default_rate_limit="")


async def _tenant_row(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("tenant not found")
    return tenant


async def _plan_of(session: AsyncSession, tenant: Tenant) -> Plan:
    plan = await session.get(Plan, tenant.plan_id)
    if plan is None:  # the foreign key makes this impossible
        raise NotFound("plan not found")
    return plan


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> TenantView:
    """One tenant, or ``NotFound``."""
    tenant = await _tenant_row(session, tenant_id)
    return TenantView.of(tenant, await _plan_of(session, tenant))


async def list_tenants(session: AsyncSession, *, limit: int, offset: int) -> list[TenantView]:
    """Tenants in creation order."""
    result = await session.execute(
        select(Tenant, Plan)
        .join(Plan, Plan.id == Tenant.plan_id)
        .order_by(Tenant.created_at, Tenant.id)
        .limit(limit)
        .offset(offset)
    )
    return [TenantView.of(tenant, plan) for tenant, plan in result]


async def get_or_create_admin(session: AsyncSession, name: str) -> AdminPrincipal:
    """The admin principal with this name, created if absent."""
    admin = await session.scalar(select(AdminPrincipal).where(AdminPrincipal.name == name))
    if admin is None:
        admin = AdminPrincipal(name=name)
        session.add(admin)
        await session.flush()
    return admin
