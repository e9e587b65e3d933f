"""The usage report shape and query parameters shared by ``/me/usage`` and ``/admin/usage``."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Annotated

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from api.schemas.fields import DAY_BOUNDS, DAY_RANGE
from auth.events.outbox import DEFAULT_THRESHOLDS, crossed_so_far
from auth.usage.ledger import MAX_REPORT_DAYS, Breakdown, UsageSummary


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


class DayModelUsageOut(BaseModel):
    """Usage of one model version on one UTC day."""

    model_config = ConfigDict(protected_namespaces=())

    date: date
    model: str
    model_version: str
    requests: int
    units: int


class KeyUsageOut(BaseModel):
    """Usage of one API key (its name and display prefix, never the key)."""

    api_key_id: uuid.UUID
    name: str
    prefix: str
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
    thresholds_crossed: list[int] = Field(
        default_factory=list,
        description="the usage alert thresholds (percent of the monthly quota) the current "
        "month has crossed; each raised one usage.threshold event",
    )
    by_day: list[DayOut] = Field(description="by UTC day; empty unless group_by has day")
    by_model: list[ModelUsageOut] = Field(
        description="by model version; empty unless group_by has model"
    )
    by_key: list[KeyUsageOut] = Field(description="by API key; empty unless group_by has key")
    by_day_and_model: list[DayModelUsageOut] = Field(
        description="by UTC day and model version, ordered by day, model and version (days "
        "without usage left out); empty unless group_by has both day and model",
    )


def usage_report(
    summary: UsageSummary, thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
) -> UsageReport:
    """The response model for a usage summary; ``thresholds``: the tenant's usage alert
    thresholds."""
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
        thresholds_crossed=crossed_so_far(
            summary.quota.used, summary.quota.monthly_quota, thresholds
        ),
        by_day=[DayOut(date=d.date, requests=d.requests, units=d.units) for d in summary.by_day],
        by_model=[
            ModelUsageOut(
                model=m.model, model_version=m.model_version, requests=m.requests, units=m.units
            )
            for m in summary.by_model
        ],
        by_key=[
            KeyUsageOut(
                api_key_id=k.api_key_id,
                name=k.name,
                prefix=k.prefix,
                requests=k.requests,
                units=k.units,
            )
            for k in summary.by_key
        ],
        by_day_and_model=[
            DayModelUsageOut(
                date=p.date,
                model=p.model,
                model_version=p.model_version,
                requests=p.requests,
                units=p.units,
            )
            for p in summary.by_day_and_model
        ],
    )


# The query parameters of both usage reports.
StartDay = Annotated[
    date | None,
    Query(
        description=f"First day: {DAY_RANGE}; default: the first of end's month. The "
        f"window spans at most {MAX_REPORT_DAYS} days and start may not follow end.",
        **DAY_BOUNDS,
    ),
]
EndDay = Annotated[
    date | None,
    Query(description=f"Last day, inclusive: {DAY_RANGE}; default: today", **DAY_BOUNDS),
]
GroupBy = Annotated[
    list[Breakdown] | None,
    Query(
        max_length=3,
        description="the breakdowns to report, repeatable (`group_by=day&group_by=key`): "
        "`day`, `model`, `key`; default: day and model",
    ),
]
