"""Operator routes for plans: what tenants are sold (limits, quota, models, price)."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from api.http.deps import AdminScope, DatabaseRoute, SessionDep, request_actor
from api.http.errors import problem_responses
from api.schemas.fields import (
    AlertThresholds,
    MaxInFlight,
    MonthlyQuota,
    PlanModels,
    PlanName,
    PricePer1000Units,
    RateLimitText,
)
from auth.limits.plans import PlanView, create_plan, get_plan, list_plans, update_plan

router = APIRouter(route_class=DatabaseRoute, tags=["admin"])

Currency = Annotated[
    str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code of the price's currency")
]


class PlanCreate(BaseModel):
    """A new plan. Its price and currency never change afterwards: usage is billed at the price
    of the plan it was served under, so a month's export is the same whenever it is taken."""

    model_config = ConfigDict(extra="forbid")

    name: PlanName
    rate_limits: RateLimitText | None = Field(
        default=None, description="null: the server's default rate limit"
    )
    monthly_quota: MonthlyQuota | None = Field(default=None, description="null: unlimited")
    max_in_flight: MaxInFlight | None = Field(default=None, description="null: no bound")
    models: PlanModels | None = None
    usage_alert_thresholds: AlertThresholds | None = Field(
        default=None, description="null: 50, 80, 90 and 100 % of the monthly quota"
    )
    price_per_1000_units: PricePer1000Units = 0
    currency: Currency = "USD"


class PlanUpdate(BaseModel):
    """Fields to change on a plan (never its price or currency); omitted fields stay as they
    are. Every tenant on the plan sees the change within a second."""

    model_config = ConfigDict(extra="forbid")

    # Optional but not nullable: the schema shows no null, and the service refuses one.
    name: PlanName | SkipJsonSchema[None] = None
    rate_limits: RateLimitText | None = None
    monthly_quota: MonthlyQuota | None = None
    max_in_flight: MaxInFlight | None = None
    models: PlanModels | None = None
    usage_alert_thresholds: AlertThresholds | None = None
    status: Literal["active", "retired"] | SkipJsonSchema[None] = None


class PlanList(BaseModel):
    """Every plan."""

    plans: list[PlanView]


@router.post(
    "/plans",
    status_code=201,
    response_model=PlanView,
    responses=problem_responses(401, 403, 409, 422, 429, 503),
)
async def create_plan_route(
    body: PlanCreate, admin: AdminScope, session: SessionDep, request: Request
) -> PlanView:
    """Create a plan."""
    return await create_plan(session, request_actor(request, admin), **body.model_dump())


@router.get("/plans", response_model=PlanList, responses=problem_responses(401, 403, 429, 503))
async def list_plans_route(session: SessionDep) -> PlanList:
    """List every plan, by name."""
    return PlanList(plans=await list_plans(session))


@router.get(
    "/plans/{plan_id}", response_model=PlanView, responses=problem_responses(401, 403, 404, 429)
)
async def get_plan_route(plan_id: uuid.UUID, session: SessionDep) -> PlanView:
    """Show one plan."""
    return await get_plan(session, plan_id)


@router.patch(
    "/plans/{plan_id}",
    response_model=PlanView,
    responses=problem_responses(401, 403, 404, 409, 422, 429, 503),
)
async def update_plan_route(
    plan_id: uuid.UUID, body: PlanUpdate, admin: AdminScope, session: SessionDep, request: Request
) -> PlanView:
    """Change a plan's limits, models, name or status; its tenants see it within a second."""
    return await update_plan(
        session, request_actor(request, admin), plan_id, body.model_dump(exclude_unset=True)
    )
