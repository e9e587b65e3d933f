"""Any tenant's usage, for operators: the same report as ``/me/usage``."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from api.http.deps import REPLICA_LAG_RESPONSE, DatabaseRoute, ReportSessionDep
from api.http.errors import problem_responses
from api.schemas.usage import EndDay, GroupBy, StartDay, UsageReport, usage_report
from auth.tenants import tenant_limits
from auth.usage.ledger import DEFAULT_BREAKDOWNS, report_window, usage_summary

router = APIRouter(route_class=DatabaseRoute, tags=["admin"])


@router.get(
    "/usage",
    response_model=UsageReport,
    responses={**REPLICA_LAG_RESPONSE, **problem_responses(401, 403, 404, 422, 429, 503)},
)
async def tenant_usage(
    report: ReportSessionDep,
    tenant_id: Annotated[uuid.UUID, Query(description="the tenant to report on")],
    start: StartDay = None,
    end: EndDay = None,
    group_by: GroupBy = None,
) -> UsageReport:
    """Report a tenant's usage by day, model or key, with its quota position."""
    session = report.session
    # The quota and thresholds the tenant is held to: its overrides, else its plan's.
    limits = await tenant_limits(session, tenant_id)
    first, last = report_window(start, end)
    summary = await usage_summary(
        session, tenant_id, limits.monthly_quota, first, last, group_by or DEFAULT_BREAKDOWNS
    )
    return usage_report(summary, limits.usage_alert_thresholds)
