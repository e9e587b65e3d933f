"""``modelgate webhooks``: event endpoints (outgoing, signed webhooks), the operator's own or a
tenant's (``--tenant``): add, list, show, update, remove, rotate the secret, send a test event,
read the delivery log. The same services as ``/admin/webhooks`` and ``/me/webhooks``."""

from __future__ import annotations

import uuid
from typing import Annotated

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from api.cli.common import echo_json, run_in_session, uuid_argument
from auth.audit import CLI_ACTOR
from auth.events.endpoints import (
    MAX_SECRET_GRACE_SECONDS,
    AttemptView,
    EndpointView,
    EndpointWithSecret,
    TargetPolicy,
    create_endpoint,
    delete_endpoint,
    get_endpoint,
    list_attempts,
    list_endpoints,
    rotate_secret,
    send_test_event,
    update_endpoint,
)
from auth.events.secrets import SecretBox
from auth.settings import Settings, get_settings, load_secrets

webhooks_app = typer.Typer(
    help="Event endpoints: signed webhooks modelgate sends (not the model webhooks it receives).",
    no_args_is_help=True,
)

TenantOption = Annotated[
    str | None, typer.Option(help="The tenant's id; omitted: the operator's own endpoints.")
]


def _owner(tenant: str | None) -> uuid.UUID | None:
    return uuid_argument(tenant, "--tenant") if tenant else None


def _policy(settings: Settings) -> TargetPolicy:
    return TargetPolicy(
        allow_private=settings.webhook_allow_private_targets, production=settings.is_production
    )


def _events(events: str) -> list[str]:
    return [e.strip() for e in events.split(",") if e.strip()]


@webhooks_app.command("add")
def webhooks_add(
    url: Annotated[str, typer.Option(help="Where events are POSTed.")],
    events: Annotated[str, typer.Option(help="Comma-separated event types.")],
    tenant: TenantOption = None,
    description: Annotated[str, typer.Option(help="What the endpoint is for.")] = "",
) -> None:
    """Register an endpoint; prints it as JSON with its secret (shown once)."""
    settings = get_settings()
    box = SecretBox(load_secrets(settings).key_pepper)
    owner = _owner(tenant)

    async def work(session: AsyncSession) -> EndpointWithSecret:
        return await create_endpoint(
            session,
            box,
            CLI_ACTOR,
            _policy(settings),
            tenant_id=owner,
            url=url,
            events=_events(events),
            description=description,
        )

    typer.echo("The endpoint's secret is shown once; store it now:", err=True)
    echo_json(run_in_session(settings, work))


@webhooks_app.command("list")
def webhooks_list(tenant: TenantOption = None) -> None:
    """Print the endpoints, one JSON object per line (never a secret)."""
    owner = _owner(tenant)

    async def work(session: AsyncSession) -> list[EndpointView]:
        return await list_endpoints(session, owner)

    for endpoint in run_in_session(get_settings(), work):
        echo_json(endpoint)


@webhooks_app.command("show")
def webhooks_show(
    endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id.")],
    tenant: TenantOption = None,
) -> None:
    """Print one endpoint as JSON."""
    parsed, owner = uuid_argument(endpoint_id, "the endpoint"), _owner(tenant)

    async def work(session: AsyncSession) -> EndpointView:
        return await get_endpoint(session, parsed, owner)

    echo_json(run_in_session(get_settings(), work))


@webhooks_app.command("update")
def webhooks_update(
    endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id.")],
    tenant: TenantOption = None,
    url: Annotated[str | None, typer.Option(help="A new URL.")] = None,
    events: Annotated[str | None, typer.Option(help="Comma-separated event types.")] = None,
    description: Annotated[str | None, typer.Option(help="A new description.")] = None,
    status: Annotated[str | None, typer.Option(help="active or disabled.")] = None,
) -> None:
    """Change an endpoint; prints it as JSON."""
    settings = get_settings()
    parsed, owner = uuid_argument(endpoint_id, "the endpoint"), _owner(tenant)
    changes: dict[str, object] = {}
    if url is not None:
        changes["url"] = url
    if events is not None:
        changes["events"] = _events(events)
    if description is not None:
        changes["description"] = description
    if status is not None:
        if status not in ("active", "disabled"):
            raise typer.BadParameter("status is active or disabled")
        changes["status"] = status

    async def work(session: AsyncSession) -> EndpointView:
        return await update_endpoint(session, CLI_ACTOR, _policy(settings), parsed, owner, changes)

    echo_json(run_in_session(settings, work))


@webhooks_app.command("remove")
def webhooks_remove(
    endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id.")],
    tenant: TenantOption = None,
) -> None:
    """Delete an endpoint with its delivery log."""
    parsed, owner = uuid_argument(endpoint_id, "the endpoint"), _owner(tenant)

    async def work(session: AsyncSession) -> None:
        await delete_endpoint(session, CLI_ACTOR, parsed, owner)

    run_in_session(get_settings(), work)


@webhooks_app.command("rotate-secret")
def webhooks_rotate_secret(
    endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id.")],
    tenant: TenantOption = None,
    grace_seconds: Annotated[
        int,
        typer.Option(
            min=0,
            max=MAX_SECRET_GRACE_SECONDS,
            help="How long the previous secret keeps signing beside the new one.",
        ),
    ] = 86_400,
) -> None:
    """Give the endpoint a new secret; prints it as JSON with the secret (shown once)."""
    settings = get_settings()
    box = SecretBox(load_secrets(settings).key_pepper)
    parsed, owner = uuid_argument(endpoint_id, "the endpoint"), _owner(tenant)

    async def work(session: AsyncSession) -> EndpointWithSecret:
        return await rotate_secret(
            session, box, CLI_ACTOR, parsed, owner, grace_seconds=grace_seconds
        )

    echo_json(run_in_session(settings, work))


@webhooks_app.command("test")
def webhooks_test(
    endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id.")],
    tenant: TenantOption = None,
) -> None:
    """Queue a webhook.test event for the endpoint (a running server delivers it); prints its
    id."""
    parsed, owner = uuid_argument(endpoint_id, "the endpoint"), _owner(tenant)

    async def work(session: AsyncSession) -> uuid.UUID:
        return await send_test_event(session, CLI_ACTOR, parsed, owner)

    typer.echo(str(run_in_session(get_settings(), work)))


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id.")],
    tenant: TenantOption = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
) -> None:
    """Print the endpoint's delivery log, newest first, one JSON object per line."""
    parsed, owner = uuid_argument(endpoint_id, "the endpoint"), _owner(tenant)

    async def work(session: AsyncSession) -> list[AttemptView]:
        return await list_attempts(session, parsed, owner, limit=limit, offset=0)

    for attempt in run_in_session(get_settings(), work):
        echo_json(attempt)
