"""``modelgate tenants`` and ``modelgate plans``: who may predict, and on what terms."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from api.cli.common import echo_json, fail, run_in_session, uuid_argument
from auth.audit import CLI_ACTOR
from auth.schemas import TenantView
from auth.settings import get_settings
from auth.tenants import create_tenant

tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
plans_app = typer.Typer(help="Plans: limits, quota, models and price.", no_args_is_help=True)


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Option(help="Unique tenant name.")],
    plan: Annotated[str | None, typer.Option(help="The plan's name (default: standard).")] = None,
    rate_limit: Annotated[
        str | None, typer.Option(help='Overrides the plan\'s, e.g. "100/minute".')
    ] = None,
    monthly_quota: Annotated[
        int | None, typer.Option(min=0, help="Overrides the plan's units per month.")
    ] = None,
    alert_thresholds: AlertThresholds = None,
) -> None:
    """Create a tenant and print it as JSON."""
    thresholds = _thresholds(alert_thresholds)

    async def work(session: AsyncSession) -> TenantView:
        return await create_tenant(
            session,
            CLI_ACTOR,
            name=name,
            plan=plan,
            rate_limit=rate_limit,
            monthly_quota=monthly_quota,
            usage_alert_thresholds=thresholds,
        )

    echo_json(run_in_session(get_settings(), work))


@plans_app.command("create")
def plans_create(
    name: Annotated[str, typer.Option(help="Unique plan name.")],
    rate_limits: Annotated[
        str | None, typer.Option(help='e.g. "10/second;1000/hour" (default: the server\'s).')
    ] = None,
    monthly_quota: Annotated[
        int | None, typer.Option(min=0, help="Units per month (default: unlimited).")
    ] = None,
    max_in_flight: Annotated[
        int | None, typer.Option(min=1, help="Requests of one key in flight at once.")
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated model names (default: every model).")
    ] = None,
    price_per_1000_units: Annotated[
        int, typer.Option(min=0, help="Price of 1,000 units in the currency's minor unit.")
    ] = 0,
    currency: Annotated[str, typer.Option(help="ISO 4217 code.")] = "USD",
    alert_thresholds: AlertThresholds = None,
) -> None:
    """Create a plan and print it as JSON (its price never changes afterwards)."""
    from auth.limits.plans import PlanView, create_plan

    thresholds = _thresholds(alert_thresholds)

    async def work(session: AsyncSession) -> PlanView:
        return await create_plan(
            session,
            CLI_ACTOR,
            name=name,
            rate_limits=rate_limits,
            monthly_quota=monthly_quota,
            max_in_flight=max_in_flight,
            models=_model_list(models),
            price_per_1000_units=price_per_1000_units,
            currency=currency,
            usage_alert_thresholds=thresholds,
        )

    echo_json(run_in_session(get_settings(), work))


# The usage alert thresholds' option (auth.events.outbox: usage.threshold events).
AlertThresholds = Annotated[
    str | None,
    typer.Option(
        help='Percentages of the monthly quota that send usage.threshold, e.g. "50,80,90,100".'
    ),
]


def _thresholds(value: str | None) -> list[int] | None:
    """``--alert-thresholds``' comma-separated percentages (bounded by the service)."""
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise fail("--alert-thresholds is comma-separated whole percentages") from None


def _model_list(models: str | None) -> list[str] | None:
    if models is None:
        return None
    return [name.strip() for name in models.split(",") if name.strip()]


@plans_app.command("list")
def plans_list() -> None:
    """Print every plan, one JSON object per line."""
    from auth.limits.plans import PlanView, list_plans

    async def work(session: AsyncSession) -> list[PlanView]:
        return await list_plans(session)

    for plan in run_in_session(get_settings(), work):
        echo_json(plan)


@plans_app.command("update")
def plans_update(
    plan_id: Annotated[str, typer.Argument(help="The plan's id.")],
    rate_limits: Annotated[str | None, typer.Option(help='e.g. "10/second;1000/hour".')] = None,
    monthly_quota: Annotated[int | None, typer.Option(min=0, help="Units per month.")] = None,
    max_in_flight: Annotated[int | None, typer.Option(min=1, help="Requests in flight.")] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated model names.")] = None,
    status: Annotated[str | None, typer.Option(help="active or retired.")] = None,
    alert_thresholds: AlertThresholds = None,
) -> None:
    """Change a plan's limits, models or status (only the options given) and print it."""
    from auth.limits.plans import PlanView, update_plan

    identifier = uuid_argument(plan_id, "the plan")
    changes = {
        field: value
        for field, value in (
            ("rate_limits", rate_limits),
            ("monthly_quota", monthly_quota),
            ("max_in_flight", max_in_flight),
            ("models", _model_list(models)),
            ("status", status),
            ("usage_alert_thresholds", _thresholds(alert_thresholds)),
        )
        if value is not None
    }
    if status is not None and status not in ("active", "retired"):
        raise fail("--status is active or retired")

    async def work(session: AsyncSession) -> PlanView:
        return await update_plan(session, CLI_ACTOR, identifier, changes)

    echo_json(run_in_session(get_settings(), work))
