"""The ``modelgate`` command line (the entry point ``modelgate = "api.cli:app"``).

One module per group of sub-commands: :mod:`api.cli.server` (``serve``, ``db``),
:mod:`api.cli.admin`, :mod:`api.cli.tenants` (``tenants``, ``plans``), :mod:`api.cli.keys`
(``keys``, ``tokens``), :mod:`api.cli.records` (``billing``, ``usage``, ``audit``) and
:mod:`api.cli.models`; what they share is in :mod:`api.cli.common`, and the schema's migrations
in :mod:`api.cli.schema`.
"""

from __future__ import annotations

import typer

from api.cli.admin import admin_app
from api.cli.keys import keys_app, tokens_app
from api.cli.models import models_app
from api.cli.records import audit_app, billing_app, usage_app
from api.cli.schema import alembic_config, upgrade_database
from api.cli.server import db_app, serve
from api.cli.tenants import plans_app, tenants_app
from api.cli.webhooks import webhooks_app

# The tests and the benchmark migrate their databases as the CLI does.
__all__ = ["alembic_config", "app", "main", "upgrade_database"]

app = typer.Typer(help="modelgate: multi-tenant ML predictions.", no_args_is_help=True)
for sub, name in (
    (db_app, "db"),
    (admin_app, "admin"),
    (tenants_app, "tenants"),
    (plans_app, "plans"),
    (keys_app, "keys"),
    (billing_app, "billing"),
    (models_app, "models"),
    (audit_app, "audit"),
    (usage_app, "usage"),
    (tokens_app, "tokens"),
    (webhooks_app, "webhooks"),
):
    app.add_typer(sub, name=name)
app.command()(serve)


def main() -> None:
    """Entry point for ``python -m api.cli``."""
    app()
