"""``modelgate billing``, ``modelgate usage`` and ``modelgate audit``: the records modelgate
keeps (billing exports, raw usage records and their daily rollups, the audit chain)."""

from __future__ import annotations

import sys
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.cli.common import fail, run_in_session, run_with_sessions
from auth.audit import ChainReport, verify_chain
from auth.models import utcnow
from auth.settings import get_settings
from auth.usage.ledger import prune_records, rebuild_rollups

billing_app = typer.Typer(help="Billing exports.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)
usage_app = typer.Typer(help="Usage records and their rollups.", no_args_is_help=True)


@billing_app.command("export")
def billing_export(
    month: Annotated[str, typer.Option(help="YYYY-MM (UTC).")],
    format: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    output: Annotated[Path | None, typer.Option(help="File to write; stdout if omitted.")] = None,
) -> None:
    """Export a month's billing rows (the same content as the HTTP export)."""
    from api.routes.admin.billing import billing_lines

    if format not in ("csv", "jsonl"):
        raise fail("--format must be csv or jsonl")

    async def work(session: AsyncSession) -> None:
        handle = output.open("w", newline="") if output else sys.stdout
        try:
            async for line in billing_lines(session, month, format):  # type: ignore[arg-type]
                handle.write(line)
        finally:
            if output:
                handle.close()

    run_in_session(get_settings(), work)


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit chain; exit 1 naming the first edited, deleted or moved event."""

    async def work(session: AsyncSession) -> ChainReport:
        return await verify_chain(session)

    report = run_in_session(get_settings(), work)
    if not report.intact:
        raise fail(f"audit chain broken at event {report.first_bad_id}: {report.problem}")
    typer.echo(f"audit chain intact: {report.events} events, head {report.head_hash}")


@usage_app.command("rebuild-rollups")
def usage_rebuild_rollups() -> None:
    """Recompute the daily usage rollups from the raw records (a repair; run it when quiet)."""

    async def work(session: AsyncSession) -> int:
        return await rebuild_rollups(session)

    rows = run_in_session(get_settings(), work)
    typer.echo(f"rebuilt {rows} daily rollup rows from the usage records")


@usage_app.command("prune")
def usage_prune(
    before: Annotated[
        str | None,
        typer.Option(
            help="Delete raw records of the UTC days before this one (YYYY-MM-DD); default: "
            "keep MODELGATE_USAGE_RETENTION_DAYS days."
        ),
    ] = None,
) -> None:
    """Delete old raw usage records; rollups, counters, reports and exports keep their days."""
    settings = get_settings()
    if before is not None:
        try:
            cutoff = date.fromisoformat(before)
        except ValueError:
            raise fail("--before must be a day, YYYY-MM-DD") from None
    elif settings.usage_retention_days is not None:
        cutoff = utcnow().date() - timedelta(days=settings.usage_retention_days)
    else:
        raise fail("give --before or set MODELGATE_USAGE_RETENTION_DAYS")

    async def work(sessionmaker: async_sessionmaker[AsyncSession]) -> int:
        return await prune_records(sessionmaker, cutoff)

    deleted = run_with_sessions(settings, work)
    typer.echo(f"deleted {deleted} usage records from before {cutoff}")
