"""``modelgate admin``: operators' credentials (an admin API key, an admin user who logs in
with a password)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from api.cli.common import run_in_session
from auth.audit import CLI_ACTOR
from auth.identity.keys import issue_admin_key
from auth.settings import get_settings, load_secrets
from auth.tenants import get_or_create_admin

admin_app = typer.Typer(help="Operator credentials.", no_args_is_help=True)


@admin_app.command("create-key")
def admin_create_key(
    name: Annotated[str, typer.Option(help="The operator's name.")],
) -> None:
    """Create an admin API key; the key alone is printed on the last line."""
    settings = get_settings()
    pepper = load_secrets(settings).key_pepper

    async def work(session: AsyncSession) -> str:
        admin = await get_or_create_admin(session, name)
        issued = await issue_admin_key(
            session, pepper, CLI_ACTOR, admin_principal_id=admin.id, name=f"{name} (cli)"
        )
        return issued.key

    secret = run_in_session(settings, work)
    typer.echo(f"Admin key for {name!r} (shown once; store it now):", err=True)
    typer.echo(secret)


def _read_password() -> str:
    """A password from a hidden prompt with confirmation, or the first line of stdin when it
    is not a terminal; never from the command line (argv is visible to every local user)."""
    if sys.stdin.isatty():
        return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))
    return sys.stdin.readline().rstrip("\r\n")


@admin_app.command("create-user")
def admin_create_user(
    email: Annotated[str, typer.Option(help="The admin user's e-mail address.")],
) -> None:
    """Create an admin user who logs in at /auth/token; the password is read from a prompt or
    stdin."""
    from auth.identity.admins import create_admin_user

    password = _read_password()

    async def work(session: AsyncSession) -> str:
        admin = await create_admin_user(session, CLI_ACTOR, email, password)
        return admin.name

    typer.echo(f"admin user {run_in_session(get_settings(), work)} created")


@admin_app.command("set-password")
def admin_set_password(
    email: Annotated[str, typer.Option(help="The admin user's e-mail address.")],
) -> None:
    """Set an admin user's password (from a prompt or stdin); the user's tokens are revoked."""
    from auth.identity.admins import set_password

    password = _read_password()

    async def work(session: AsyncSession) -> int:
        return await set_password(session, CLI_ACTOR, email, password)

    revoked = run_in_session(get_settings(), work)
    typer.echo(f"password changed; {revoked} live token(s) revoked")
