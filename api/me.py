"""The caller's own tenant, key and usage."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import DatabaseRoute, SessionDep, StateDep, TenantCredential, UsageScope
from api.errors import problem_responses
from api.fields import DAY_BOUNDS, DAY_RANGE
from api.usage_schemas import UsageReport, usage_report
from auth.schemas import TenantView
from auth.tenants import get_tenant
from auth.usage import MAX_REPORT_DAYS, report_window, usage_summary

router = APIRouter(route_class=DatabaseRoute, tags=["me"])


class LimitsOut(BaseModel):
    """The limits that apply to the caller."""

    rate_limit: str
    monthly_quota: int | None


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
            rate_limit=tenant.rate_limit or state.settings.default_rate_limit,
            monthly_quota=tenant.monthly_quota,
        ),
        key=KeyOut(
            id=subject.require_key_id(),
            name=subject.key_name,
            scopes=sorted(subject.scopes),
            expires_at=subject.expires_at,
        ),
    )


@router.get(
    "/me/usage", response_model=UsageReport, responses=problem_responses(401, 403, 422, 429, 503)
)
async def my_usage(
    subject: UsageScope,
    session: SessionDep,
    start: Annotated[
        date | None,
        Query(
            description=f"First day: {DAY_RANGE}; default: the first of end's month. The "
            f"window spans at most {MAX_REPORT_DAYS} days and start may not follow end.",
            **DAY_BOUNDS,
        ),
    ] = None,
    end: Annotated[
        date | None,
        Query(description=f"Last day, inclusive: {DAY_RANGE}; default: today", **DAY_BOUNDS),
    ] = None,
) -> UsageReport:
    """Report the caller's tenant usage by day and by model, with the quota position."""
    # The tenant was read with the credential in this request: no need to read it again.
    tenant = subject.require_tenant()
    first, last = report_window(start, end)
    return usage_report(await usage_summary(session, tenant.id, tenant.monthly_quota, first, last))
