"""``modelgate keys`` and ``modelgate tokens``: tenants' API keys (issue, list, revoke, rotate)
and the records of the access tokens minted from them."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from api.cli.common import echo_json, run_in_session, uuid_argument
from auth.audit import CLI_ACTOR
from auth.identity.keys import (
    DEFAULT_TENANT_SCOPES,
    MAX_ROTATION_GRACE_SECONDS,
    issue_tenant_key,
    list_tenant_keys,
    revoke_key,
    rotate_key,
)
from auth.schemas import IssuedKey, KeyView
from auth.settings import get_settings, load_secrets

keys_app = typer.Typer(help="Tenant API keys.", no_args_is_help=True)
tokens_app = typer.Typer(help="JWT access-token records.", no_args_is_help=True)


@keys_app.command("issue")
def keys_issue(
    tenant: Annotated[str, typer.Option(help="The tenant's id.")],
    name: Annotated[str, typer.Option(help="A name for the key.")] = "default",
    scopes: Annotated[str, typer.Option(help="Comma-separated scopes.")] = ",".join(
        DEFAULT_TENANT_SCOPES
    ),
) -> None:
    """Issue a tenant API key; the key alone is printed on the last line."""
    tenant_id = uuid_argument(tenant, "--tenant")
    settings = get_settings()
    pepper = load_secrets(settings).key_pepper
    scope_list = [s.strip() for s in scopes.split(",") if s.strip()]

    async def work(session: AsyncSession) -> str:
        issued = await issue_tenant_key(
            session, pepper, CLI_ACTOR, tenant_id=tenant_id, name=name, scopes=scope_list
        )
        return issued.key

    secret = run_in_session(settings, work)
    typer.echo(f"API key for tenant {tenant_id} (shown once; store it now):", err=True)
    typer.echo(secret)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str, typer.Option(help="The tenant's id.")],
) -> None:
    """Print a tenant's keys, newest first, one JSON object per line (never a secret)."""
    tenant_id = uuid_argument(tenant, "--tenant")

    async def work(session: AsyncSession) -> list[KeyView]:
        return await list_tenant_keys(session, tenant_id)

    for key in run_in_session(get_settings(), work):
        echo_json(key)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke a key now and print it as JSON; revoking a revoked key changes nothing."""
    parsed = uuid_argument(key_id, "the key")

    async def work(session: AsyncSession) -> KeyView:
        return await revoke_key(session, CLI_ACTOR, parsed)

    echo_json(run_in_session(get_settings(), work))


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="The key's id.")],
    grace_seconds: Annotated[
        int,
        typer.Option(
            min=0,
            max=MAX_ROTATION_GRACE_SECONDS,
            help="Seconds the old key keeps working (0: revoked now).",
        ),
    ] = 0,
) -> None:
    """Replace a key: prints the new key's metadata as JSON, then the new key alone on the last
    line."""
    parsed = uuid_argument(key_id, "the key")
    settings = get_settings()
    pepper = load_secrets(settings).key_pepper

    async def work(session: AsyncSession) -> IssuedKey:
        return await rotate_key(session, pepper, CLI_ACTOR, parsed, grace_seconds=grace_seconds)

    issued = run_in_session(settings, work)
    echo_json(KeyView.model_validate(issued.model_dump(exclude={"key"})))
    typer.echo(f"New key replacing {parsed} (shown once; store it now):", err=True)
    typer.echo(issued.key)


@tokens_app.command("prune")
def tokens_prune() -> None:
    """Delete the records of access tokens that expired more than an hour ago."""
    from auth.identity.tokens import prune_tokens

    typer.echo(f"pruned {run_in_session(get_settings(), prune_tokens)} token record(s)")
