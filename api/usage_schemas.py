"""The usage report shape shared by ``/me/usage`` and ``/admin/usage``."""

from __future__ import annotations

import uuid
from datetime import date

from pydantic import BaseModel, ConfigDict

from auth.usage import UsageSummary


class QuotaOut(BaseModel):
    """This month's quota position; ``None`` quota means unlimited."""

    monthly_quota: int | None
    used: int
    remaining: int | None


class DayOut(BaseModel):
    """Usage on one UTC day."""

    date: date
    requests: int
    units: int


class ModelUsageOut(BaseModel):
    """Usage of one model version."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    model_version: str
    requests: int
    units: int


class UsageReport(BaseModel):
    """A tenant's usage between two UTC days (inclusive)."""

    tenant_id: uuid.UUID
    start: date
    end: date
    total_requests: int
    total_units: int
    quota: QuotaOut
    by_day: list[DayOut]
    by_model: list[ModelUsageOut]


def usage_report(summary: UsageSummary) -> UsageReport:
    """The response model for a usage summary."""
    return UsageReport(
        tenant_id=summary.tenant_id,
        start=summary.start,
        end=summary.end,
        total_requests=summary.total_requests,
        total_units=summary.total_units,
        quota=QuotaOut(
            monthly_quota=summary.quota.monthly_quota,
            used=summary.quota.used,
            remaining=summary.quota.remaining,
        ),
        by_day=[DayOut(date=d.date, requests=d.requests, units=d.units) for d in summary.by_day],
        by_model=[
            ModelUsageOut(
                model=m.model, model_version=m.model_version, requests=m.requests, units=m.units
            )
            for m in summary.by_model
        ],
    )
