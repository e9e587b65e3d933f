"""Plans: what the operator sells (rate limits, a monthly quota, a concurrency bound, the models
it opens, a price), and the limits a credential ends up with once its tenant's overrides and its
key's own limits are applied. Every change is audited."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import Actor, record_event
from auth.errors import Conflict, InvalidRequest, NotFound
from auth.events.outbox import DEFAULT_THRESHOLDS
from auth.limits.policy import MAX_LIMITS as MAX_RATE_LIMITS
from auth.limits.policy import parse_rate_limits
from auth.models import ApiKey, Plan, Tenant

# The plan new tenants get when none is named, created by the migration that introduced plans.
DEFAULT_PLAN = "standard"
# A monthly quota larger than this is not a limit; it also keeps every sum of units far
# inside a 64-bit column.
MAX_MONTHLY_QUOTA = 10**12
MAX_IN_FLIGHT = 10_000
# Per 1,000 units, in the currency's minor unit. Amounts are Python integers (exact at any
# size); the bound keeps a price a price and not a typo.
MAX_PRICE_PER_1000_UNITS = 10**9
MAX_PLAN_MODELS = 100
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# One limit as clients write it: "100/minute", "10/2 seconds", "10 per 2 seconds". The pattern
# is the whole bound: amounts below 10^9, windows of at most 99 hours or 31 days (so every
# counter and every Redis expiry stays small), and the OpenAPI document states it.
RATE_LIMIT_PATTERN = (
    r"[1-9][0-9]{0,8}( per |/)"
    r"((([1-9][0-9]?) )?(second|minute|hour)|(([1-9]|[12][0-9]|3[01]) )?day)s?"
)
# Several, separated by ";" (limits' own separator).
RATE_LIMITS_PATTERN = rf"^{RATE_LIMIT_PATTERN}(;{RATE_LIMIT_PATTERN}){{0,{MAX_RATE_LIMITS - 1}}}$"


def check_rate_limits(value: str, field: str = "rate_limits") -> str:
    """The limits, validated where a client or an operator sets them: ``RATE_LIMITS_PATTERN``
    (which the OpenAPI document states), then the limiter's own reading of them (422 naming
    ``field`` otherwise). Returned unchanged."""
    if not re.fullmatch(RATE_LIMITS_PATTERN, value):
        raise InvalidRequest(
            f"{field}: expected up to {MAX_RATE_LIMITS} limits like '100/minute' or "
            "'10/second;1000/hour' (windows of at most 99 hours or 31 days)",
            loc=(field,),
        )
    parse_rate_limits(value)
    return value


def check_monthly_quota(quota: int | None) -> None:
    """422 unless the quota is None (unlimited) or 0..MAX_MONTHLY_QUOTA units."""
    if quota is not None and not 0 <= quota <= MAX_MONTHLY_QUOTA:
        raise InvalidRequest(
            f"monthly_quota must be between 0 and {MAX_MONTHLY_QUOTA}", loc=("monthly_quota",)
        )


def check_max_in_flight(bound: int | None) -> None:
    """422 unless the bound is None (none) or 1..MAX_IN_FLIGHT requests."""
    if bound is not None and not 1 <= bound <= MAX_IN_FLIGHT:
        raise InvalidRequest(
            f"max_in_flight must be between 1 and {MAX_IN_FLIGHT}", loc=("max_in_flight",)
        )


# Usage alert thresholds: at most this many, each a percentage of the monthly quota.
MAX_ALERT_THRESHOLDS = 10


def check_alert_thresholds(thresholds: list[int] | None) -> list[int] | None:
    """422 unless None or up to MAX_ALERT_THRESHOLDS percentages from 1 to 100; the stored
    form (sorted, each once; empty: no alerts)."""
    if thresholds is None:
        return None
    if len(thresholds) > MAX_ALERT_THRESHOLDS or not all(
        isinstance(p, int) and 1 <= p <= 100 for p in thresholds
    ):
        raise InvalidRequest(
            f"usage_alert_thresholds holds at most {MAX_ALERT_THRESHOLDS} percentages "
            "from 1 to 100",
            loc=("usage_alert_thresholds",),
        )
    return sorted(set(thresholds))


def _check_bounds(values: dict[str, Any]) -> None:
    """Every bound a plan's value must keep, whatever entry point set it."""
    check_alert_thresholds(values.get("usage_alert_thresholds"))
    if values.get("rate_limits") is not None:
        check_rate_limits(values["rate_limits"])
    check_monthly_quota(values.get("monthly_quota"))
    check_max_in_flight(values.get("max_in_flight"))
    price = values.get("price_per_1000_units")
    if price is not None and not 0 <= price <= MAX_PRICE_PER_1000_UNITS:
        raise InvalidRequest(
            f"price_per_1000_units must be between 0 and {MAX_PRICE_PER_1000_UNITS}",
            loc=("price_per_1000_units",),
        )
    currency = values.get("currency")
    if currency is not None and not _CURRENCY.fullmatch(currency):
        raise InvalidRequest("currency must be an ISO 4217 code such as USD", loc=("currency",))
    models = values.get("models")
    if models is not None:
        if len(models) > MAX_PLAN_MODELS:
            raise InvalidRequest(f"models lists at most {MAX_PLAN_MODELS} names", loc=("models",))
        if not all(_MODEL_NAME.fullmatch(name) for name in models):
            raise InvalidRequest("models holds model names ([A-Za-z0-9_.-])", loc=("models",))


class PlanView(BaseModel):
    """A plan as the operator sees it."""

    id: uuid.UUID
    name: str
    rate_limits: str | None
    monthly_quota: int | None
    max_in_flight: int | None
    models: list[str] | None
    # Percentages of the monthly quota that raise usage.threshold (null: 50, 80, 90, 100).
    usage_alert_thresholds: list[int] | None = None
    price_per_1000_units: int
    currency: str
    status: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, plan: Plan) -> PlanView:
        """The view of a plan row."""
        return cls.model_validate(plan, from_attributes=True)


async def create_plan(session: AsyncSession, actor: Actor, **values: Any) -> PlanView:
    """Create an active plan (its name must be unique); audited as ``plan.create``."""
    _check_bounds(values)
    if values.get("models") is not None:
        values["models"] = sorted(set(values["models"]))
    if values.get("usage_alert_thresholds") is not None:
        values["usage_alert_thresholds"] = check_alert_thresholds(values["usage_alert_thresholds"])
    name = values["name"]
    if await session.scalar(select(Plan.id).where(Plan.name == name)) is not None:
        raise Conflict(f"a plan named {name!r} already exists")
    plan = Plan(**values)
    session.add(plan)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(f"a plan named {name!r} already exists") from None
    await session.refresh(plan)
    view = PlanView.of(plan)
    await record_event(
        session,
        actor,
        action="plan.create",
        target_type="plan",
        target_id=str(plan.id),
        detail=view.model_dump(mode="json", exclude={"id", "created_at", "updated_at"}),
    )
    return view


# What a plan's update may change: never its price or currency, which price the usage already
# recorded under it (create a new plan and move the tenants instead).
PLAN_CHANGEABLE = frozenset(
    {
        "name",
        "rate_limits",
        "monthly_quota",
        "max_in_flight",
        "models",
        "status",
        "usage_alert_thresholds",
    }
)


async def update_plan(
    session: AsyncSession, actor: Actor, plan_id: uuid.UUID, changes: dict[str, Any]
) -> PlanView:
    """Change a plan's limits, models, name or status; audited as ``plan.update``. Every tenant
    on it sees the change within the key cache's TTL (one second)."""
    unknown = set(changes) - PLAN_CHANGEABLE
    if unknown:
        raise InvalidRequest(f"a plan's {', '.join(sorted(unknown))} cannot change")
    for field in ("name", "status"):
        if field in changes and changes[field] is None:
            raise InvalidRequest(f"{field} cannot be null", loc=(field,))
    _check_bounds(changes)
    if changes.get("models") is not None:
        changes = {**changes, "models": sorted(set(changes["models"]))}
    if changes.get("usage_alert_thresholds") is not None:
        thresholds = check_alert_thresholds(changes["usage_alert_thresholds"])
        changes = {**changes, "usage_alert_thresholds": thresholds}
    plan = await _plan_row(session, plan_id)
    if changes.get("name") not in (None, plan.name):
        taken = await session.scalar(select(Plan.id).where(Plan.name == changes["name"]))
        if taken is not None:
            raise Conflict(f"a plan named {changes['name']!r} already exists")
    for field, value in changes.items():
        setattr(plan, field, value)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict("the change conflicts with another plan") from None
    await session.refresh(plan)
    await record_event(
        session,
        actor,
        action="plan.update",
        target_type="plan",
        target_id=str(plan.id),
        detail=changes,
    )
    return PlanView.of(plan)


async def _plan_row(session: AsyncSession, plan_id: uuid.UUID) -> Plan:
    plan = await session.get(Plan, plan_id)
    if plan is None:
        raise NotFound("plan not found")
    return plan


async def get_plan(session: AsyncSession, plan_id: uuid.UUID) -> PlanView:
    """One plan, or ``NotFound``."""
    return PlanView.of(await _plan_row(session, plan_id))


async def list_plans(session: AsyncSession) -> list[PlanView]:
    """Every plan, by name (an operator has a handful)."""
    result = await session.scalars(select(Plan).order_by(Plan.name))
    return [PlanView.of(plan) for plan in result]


async def plan_for_tenant(session: AsyncSession, name: str | None) -> Plan:
    """The active plan a tenant is put on: the one named, or the default; 422 if it does not
    exist or is retired."""
    name = name or DEFAULT_PLAN
    plan = await session.scalar(select(Plan).where(Plan.name == name))
    if plan is None:
        raise InvalidRequest(f"no plan named {name!r}", loc=("plan",))
    if plan.status != "active":
        raise InvalidRequest(
            f"the plan {name!r} is retired and takes no new tenants", loc=("plan",)
        )
    return plan


@dataclass(frozen=True)
class EffectiveLimits:
    """What a credential is held to, from its plan, its tenant's overrides and its key."""

    rate_limits: str | None
    monthly_quota: int | None
    max_in_flight: int | None
    models: frozenset[str] | None
    # Percentages of monthly_quota that raise usage.threshold events (auth.events.outbox).
    usage_alert_thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS


def effective_limits(
    plan: Plan, tenant: Tenant, key: ApiKey | None, default_rate_limit: str
) -> EffectiveLimits:
    """The tenant's override, else the plan's, else the server's default; a key's own limits
    are checked on top (so a key can only ever be held tighter than its tenant). ``rate_limits``
    is None when the default alone applies."""
    tenant_limits = tenant.rate_limit or plan.rate_limits
    key_limits = key.rate_limits if key is not None else None
    if key_limits:
        rate_limits: str | None = f"{tenant_limits or default_rate_limit};{key_limits}"
    else:
        rate_limits = tenant_limits
    bounds = [
        bound
        for bound in (plan.max_in_flight, key.max_in_flight if key is not None else None)
        if bound is not None
    ]
    return EffectiveLimits(
        rate_limits=rate_limits,
        monthly_quota=(
            tenant.monthly_quota if tenant.monthly_quota is not None else plan.monthly_quota
        ),
        max_in_flight=min(bounds, default=None),
        models=frozenset(plan.models) if plan.models is not None else None,
        usage_alert_thresholds=tuple(
            sorted(
                tenant.usage_alert_thresholds
                if tenant.usage_alert_thresholds is not None
                else plan.usage_alert_thresholds
                if plan.usage_alert_thresholds is not None
                else DEFAULT_THRESHOLDS
            )
        ),
    )
