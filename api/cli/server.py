"""``modelgate serve`` and ``modelgate db``: migrating the database and serving the API."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from api.cli.common import fail
from api.cli.schema import upgrade_database
from auth.errors import ConfigurationError
from auth.settings import check_production, get_settings, load_secrets

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Migrate the database if needed, load the models and serve the API; on SIGTERM, drain
    and exit 0 (see the README's Shutdown)."""
    from api.model_catalogue import model_store
    from api.observability.tracing import check_environment as check_tracing_environment
    from api.server import supervisor as serving

    # gRPC (MODELGATE_GRPC_PORT) listens where HTTP does unless told otherwise; set before the
    # settings are first read (and cached).
    os.environ.setdefault("MODELGATE_GRPC_HOST", host)
    try:
        settings = get_settings()
    except ValidationError as exc:
        raise fail(_settings_error(exc)) from None
    try:
        check_production(settings, workers)
        check_tracing_environment(os.environ)
        load_secrets(settings)  # generate development secrets once, before workers race
        model_store(settings)  # a store that cannot be used stops the start, not a fetch
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    upgrade_database(settings.database_url)
    prepare_metrics_directory(workers)
    serving.run(host, port, workers, settings.shutdown_timeout_seconds)


def _settings_error(exc: ValidationError) -> str:
    """The first invalid setting, named by its environment variable, without its value (it
    may be a secret)."""
    error = exc.errors(include_input=False, include_url=False)[0]
    name = "_".join(str(part) for part in error["loc"]).upper()
    return f"MODELGATE_{name}: {error['msg']}" + (
        f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    )


# prometheus-client's variable: where each worker keeps its metrics' values
# (api.observability.metrics).
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_directory(workers: int) -> Path | None:
    """Before several workers start: point them at a fresh, empty directory for their metrics,
    inside ``$PROMETHEUS_MULTIPROC_DIR`` if the operator set it, else in the temp directory,
    removed when the server exits. Values left by an earlier run would be summed with this
    one's. One process keeps its metrics in memory and needs none."""
    if workers < 2:
        os.environ.pop(MULTIPROC_DIR, None)
        return None
    parent = os.environ.get(MULTIPROC_DIR) or None
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="modelgate-metrics-", dir=parent))
    os.environ[MULTIPROC_DIR] = str(directory)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all migrations (alembic upgrade head) to the configured database."""
    upgrade_database(get_settings().database_url)
    typer.echo("database is at the newest migration")
