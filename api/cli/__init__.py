"""The ``modelgate`` command line."""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from alembic import command
from alembic.config import Config
from pydantic import JsonValue, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.audit import CLI_ACTOR, ChainReport, verify_chain
from auth.db import create_engine, create_sessionmaker
from auth.errors import ConfigurationError, ModelgateError
from auth.identity.keys import (
    DEFAULT_TENANT_SCOPES,
    MAX_ROTATION_GRACE_SECONDS,
    issue_admin_key,
    issue_tenant_key,
    list_tenant_keys,
    revoke_key,
    rotate_key,
)
from auth.models import utcnow
from auth.schemas import IssuedKey, KeyView, TenantView
from auth.settings import Settings, check_production, get_settings, load_secrets
from auth.tenants import create_tenant, get_or_create_admin
from auth.usage.ledger import prune_records, rebuild_rollups

app = typer.Typer(help="modelgate: multi-tenant ML predictions.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
admin_app = typer.Typer(help="Operator credentials.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
plans_app = typer.Typer(help="Plans: limits, quota, models and price.", no_args_is_help=True)
keys_app = typer.Typer(help="Tenant API keys.", no_args_is_help=True)
billing_app = typer.Typer(help="Billing exports.", no_args_is_help=True)
tokens_app = typer.Typer(help="JWT access-token records.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)
usage_app = typer.Typer(help="Usage records and their rollups.", no_args_is_help=True)
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
):
    app.add_typer(sub, name=name)

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def alembic_config(database_url: str) -> Config:
    """Alembic's configuration for the project, pointed at a database."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def upgrade_database(database_url: str) -> None:
    """Bring the schema to the newest migration (a no-op when it is already there)."""
    command.upgrade(alembic_config(database_url), "head")


def _run_with_sessions(
    settings: Settings, work: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]]
) -> T:
    """Run ``work`` with a session factory on the configured database; the project's errors
    become a one-line message and exit code 1."""

    async def main() -> T:
        engine = create_engine(settings.database_url)
        try:
            return await work(create_sessionmaker(engine))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except ModelgateError as exc:
        raise _fail(exc.detail) from None
    except ConfigurationError as exc:
        raise _fail(str(exc)) from None


def _run_in_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run ``work`` in one session and commit it."""

    async def in_session(sessionmaker: async_sessionmaker[AsyncSession]) -> T:
        async with sessionmaker() as session:
            result = await work(session)
            await session.commit()
            return result

    return _run_with_sessions(settings, in_session)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Migrate the database if needed, load the models and serve the API; on SIGTERM, drain
    and exit 0 (see the README's Shutdown)."""
    from api.observability.tracing import check_environment as check_tracing_environment
    from api.server import supervisor as serving

    try:
        settings = get_settings()
    except ValidationError as exc:
        raise _fail(_settings_error(exc)) from None
    try:
        check_production(settings, workers)
        check_tracing_environment(os.environ)
        load_secrets(settings)  # generate development secrets once, before workers race
    except ConfigurationError as exc:
        raise _fail(str(exc)) from None
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

    secret = _run_in_session(settings, work)
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

    typer.echo(f"admin user {_run_in_session(get_settings(), work)} created")


@admin_app.command("set-password")
def admin_set_password(
    email: Annotated[str, typer.Option(help="The admin user's e-mail address.")],
) -> None:
    """Set an admin user's password (from a prompt or stdin); the user's tokens are revoked."""
    from auth.identity.admins import set_password

    password = _read_password()

    async def work(session: AsyncSession) -> int:
        return await set_password(session, CLI_ACTOR, email, password)

    revoked = _run_in_session(get_settings(), work)
    typer.echo(f"password changed; {revoked} live token(s) revoked")


@tokens_app.command("prune")
def tokens_prune() -> None:
    """Delete the records of access tokens that expired more than an hour ago."""
    from auth.identity.tokens import prune_tokens

    typer.echo(f"pruned {_run_in_session(get_settings(), prune_tokens)} token record(s)")


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
) -> None:
    """Create a tenant and print it as JSON."""

    async def work(session: AsyncSession) -> TenantView:
        return await create_tenant(
            session,
            CLI_ACTOR,
            name=name,
            plan=plan,
            rate_limit=rate_limit,
            monthly_quota=monthly_quota,
        )

    typer.echo(_run_in_session(get_settings(), work).model_dump_json())


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
) -> None:
    """Create a plan and print it as JSON (its price never changes afterwards)."""
    from auth.limits.plans import PlanView, create_plan

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
        )

    typer.echo(_run_in_session(get_settings(), work).model_dump_json())


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

    for plan in _run_in_session(get_settings(), work):
        typer.echo(plan.model_dump_json())


@plans_app.command("update")
def plans_update(
    plan_id: Annotated[str, typer.Argument(help="The plan's id.")],
    rate_limits: Annotated[str | None, typer.Option(help='e.g. "10/second;1000/hour".')] = None,
    monthly_quota: Annotated[int | None, typer.Option(min=0, help="Units per month.")] = None,
    max_in_flight: Annotated[int | None, typer.Option(min=1, help="Requests in flight.")] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated model names.")] = None,
    status: Annotated[str | None, typer.Option(help="active or retired.")] = None,
) -> None:
    """Change a plan's limits, models or status (only the options given) and print it."""
    from auth.limits.plans import PlanView, update_plan

    identifier = _uuid_argument(plan_id, "the plan")
    changes = {
        field: value
        for field, value in (
            ("rate_limits", rate_limits),
            ("monthly_quota", monthly_quota),
            ("max_in_flight", max_in_flight),
            ("models", _model_list(models)),
            ("status", status),
        )
        if value is not None
    }
    if status is not None and status not in ("active", "retired"):
        raise _fail("--status is active or retired")

    async def work(session: AsyncSession) -> PlanView:
        return await update_plan(session, CLI_ACTOR, identifier, changes)

    typer.echo(_run_in_session(get_settings(), work).model_dump_json())


def _uuid_argument(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise _fail(f"{what} must be an id (UUID)") from None


@keys_app.command("issue")
def keys_issue(
    tenant: Annotated[str, typer.Option(help="The tenant's id.")],
    name: Annotated[str, typer.Option(help="A name for the key.")] = "default",
    scopes: Annotated[str, typer.Option(help="Comma-separated scopes.")] = ",".join(
        DEFAULT_TENANT_SCOPES
    ),
) -> None:
    """Issue a tenant API key; the key alone is printed on the last line."""
    tenant_id = _uuid_argument(tenant, "--tenant")
    settings = get_settings()
    pepper = load_secrets(settings).key_pepper
    scope_list = [s.strip() for s in scopes.split(",") if s.strip()]

    async def work(session: AsyncSession) -> str:
        issued = await issue_tenant_key(
            session, pepper, CLI_ACTOR, tenant_id=tenant_id, name=name, scopes=scope_list
        )
        return issued.key

    secret = _run_in_session(settings, work)
    typer.echo(f"API key for tenant {tenant_id} (shown once; store it now):", err=True)
    typer.echo(secret)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str, typer.Option(help="The tenant's id.")],
) -> None:
    """Print a tenant's keys, newest first, one JSON object per line (never a secret)."""
    tenant_id = _uuid_argument(tenant, "--tenant")

    async def work(session: AsyncSession) -> list[KeyView]:
        return await list_tenant_keys(session, tenant_id)

    for key in _run_in_session(get_settings(), work):
        typer.echo(key.model_dump_json())


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke a key now and print it as JSON; revoking a revoked key changes nothing."""
    parsed = _uuid_argument(key_id, "the key")

    async def work(session: AsyncSession) -> KeyView:
        return await revoke_key(session, CLI_ACTOR, parsed)

    typer.echo(_run_in_session(get_settings(), work).model_dump_json())


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
    parsed = _uuid_argument(key_id, "the key")
    settings = get_settings()
    pepper = load_secrets(settings).key_pepper

    async def work(session: AsyncSession) -> IssuedKey:
        return await rotate_key(session, pepper, CLI_ACTOR, parsed, grace_seconds=grace_seconds)

    issued = _run_in_session(settings, work)
    typer.echo(KeyView.model_validate(issued.model_dump(exclude={"key"})).model_dump_json())
    typer.echo(f"New key replacing {parsed} (shown once; store it now):", err=True)
    typer.echo(issued.key)


@billing_app.command("export")
def billing_export(
    month: Annotated[str, typer.Option(help="YYYY-MM (UTC).")],
    format: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    output: Annotated[Path | None, typer.Option(help="File to write; stdout if omitted.")] = None,
) -> None:
    """Export a month's billing rows (the same content as the HTTP export)."""
    from api.routes.admin.billing import billing_lines

    if format not in ("csv", "jsonl"):
        raise _fail("--format must be csv or jsonl")

    async def work(session: AsyncSession) -> None:
        handle = output.open("w", newline="") if output else sys.stdout
        try:
            async for line in billing_lines(session, month, format):  # type: ignore[arg-type]
                handle.write(line)
        finally:
            if output:
                handle.close()

    _run_in_session(get_settings(), work)


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit chain; exit 1 naming the first edited, deleted or moved event."""

    async def work(session: AsyncSession) -> ChainReport:
        return await verify_chain(session)

    report = _run_in_session(get_settings(), work)
    if not report.intact:
        raise _fail(f"audit chain broken at event {report.first_bad_id}: {report.problem}")
    typer.echo(f"audit chain intact: {report.events} events, head {report.head_hash}")


@usage_app.command("rebuild-rollups")
def usage_rebuild_rollups() -> None:
    """Recompute the daily usage rollups from the raw records (a repair; run it when quiet)."""

    async def work(session: AsyncSession) -> int:
        return await rebuild_rollups(session)

    rows = _run_in_session(get_settings(), work)
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
            raise _fail("--before must be a day, YYYY-MM-DD") from None
    elif settings.usage_retention_days is not None:
        cutoff = utcnow().date() - timedelta(days=settings.usage_retention_days)
    else:
        raise _fail("give --before or set MODELGATE_USAGE_RETENTION_DAYS")

    async def work(sessionmaker: async_sessionmaker[AsyncSession]) -> int:
        return await prune_records(sessionmaker, cutoff)

    deleted = _run_with_sessions(settings, work)
    typer.echo(f"deleted {deleted} usage records from before {cutoff}")


@models_app.command("train")
def models_train(
    if_absent: Annotated[
        bool, typer.Option("--if-absent", help="Do nothing if a model is already registered.")
    ] = False,
) -> None:
    """Train the default iris model from scikit-learn's bundled data and register it."""
    # Imported here: scikit-learn and ONNX take seconds to import, which every other command
    # (tenants, keys, audit) would otherwise pay.
    from ml import DEFAULT_MODEL, has_model, train_default

    model_dir = get_settings().model_dir
    if if_absent and has_model(model_dir, DEFAULT_MODEL):
        typer.echo(f"model {DEFAULT_MODEL!r} already present in {model_dir}")
        return
    manifest = train_default(model_dir)
    typer.echo(f"registered {manifest.name} version {manifest.version} in {model_dir}")


@models_app.command("convert")
def models_convert(
    name: Annotated[
        str | None, typer.Option("--name", help="Only this model (default: every model).")
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="CSV of reference rows (e.g. the training data) the conversion must match.",
        ),
    ] = None,
) -> None:
    """Add ONNX files to registered versions that have only a pickle (served by ONNX Runtime)."""
    import numpy as np

    from ml import ConversionError, convert_version

    model_dir = get_settings().model_dir
    rows = None
    if reference is not None:
        try:
            rows = np.loadtxt(reference, delimiter=",", dtype=np.float64, ndmin=2)
        except (OSError, ValueError) as exc:
            raise _fail(f"cannot read {reference}: {exc}") from None
    failures = 0
    for manifest_path in sorted(model_dir.glob("*/*/manifest.json")):
        version_dir = manifest_path.parent
        if name is not None and version_dir.parent.name != name:
            continue
        label = f"{version_dir.parent.name} version {version_dir.name}"
        try:
            manifest = convert_version(version_dir, rows)
        except (ConversionError, OSError, ValueError) as exc:
            failures += 1
            typer.echo(f"{label}: not converted, stays on scikit-learn ({exc})", err=True)
            continue
        typer.echo(f"{label}: served by {manifest.runtime}")
    if failures:
        raise typer.Exit(1)


# Metrics given at registration are a small JSON object (they end up in the manifest).
_MAX_METRICS_CHARS = 16_384


def _metrics_option(text: str | None) -> dict[str, JsonValue] | None:
    import json

    if text is None:
        return None
    if len(text) > _MAX_METRICS_CHARS:
        raise _fail(f"--metrics: at most {_MAX_METRICS_CHARS} characters")
    try:
        metrics = json.loads(text)
    except ValueError:
        raise _fail("--metrics: not JSON") from None
    if not isinstance(metrics, dict):
        raise _fail("--metrics: a JSON object, e.g. '{\"accuracy\": 0.97}'")
    return metrics


def _names_option(text: str | None) -> list[str] | None:
    return None if text is None else [name.strip() for name in text.split(",")]


@models_app.command("register")
def models_register(
    path: Annotated[Path, typer.Argument(help="A fitted classifier: .joblib or .onnx file.")],
    name: Annotated[str, typer.Option("--name", help="The model's name.")],
    version: Annotated[str, typer.Option("--version", help="The new version's number.")],
    metrics: Annotated[
        str | None, typer.Option(help="JSON object to record, e.g. '{\"accuracy\": 0.97}'.")
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="CSV of the training rows: their range is recorded and the ONNX conversion "
            "must match scikit-learn on them (default: 2,000 seeded random rows, no range)."
        ),
    ] = None,
    feature_names: Annotated[
        str | None, typer.Option(help="Comma-separated (default: the model's own, or numbered).")
    ] = None,
    class_names: Annotated[
        str | None, typer.Option(help="Comma-separated (default: the model's classes).")
    ] = None,
) -> None:
    """Copy a model file into the registry as a new version (converted to ONNX and checked as
    `train` does, with its manifest); `models activate` then serves it."""
    import numpy as np

    from ml import ConversionError, register_model
    from ml.manifest import NAME_PATTERN, VERSION_PATTERN
    from ml.train import register_onnx, synthetic_rows

    # Checked before anything is read: the name and version become directories of the registry.
    if not re.fullmatch(NAME_PATTERN, name):
        raise _fail("--name: letters, digits, '_' and '-' (at most 64, starting alphanumeric)")
    if not re.fullmatch(VERSION_PATTERN, version):
        raise _fail("--version: a number from 1 to 999999999")
    model_dir = get_settings().model_dir
    rows = None
    if reference is not None:
        try:
            rows = np.loadtxt(reference, delimiter=",", dtype=np.float64, ndmin=2)
        except (OSError, ValueError) as exc:
            raise _fail(f"cannot read {reference}: {exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".onnx":
            manifest = register_onnx(
                model_dir,
                name,
                path.read_bytes(),
                feature_names=_names_option(feature_names),
                class_names=_names_option(class_names),
                reference=rows,
                version=version,
                activate=False,
                metrics=_metrics_option(metrics),
            )
        elif suffix in (".joblib", ".pkl", ".pickle"):
            import joblib

            # The operator's own file, on the operator's command: unpickling it runs its code,
            # exactly as training would. Serving never unpickles it again once converted.
            estimator = joblib.load(path)
            n_features = int(getattr(estimator, "n_features_in_", 0) or 0)
            own_features = getattr(estimator, "feature_names_in_", None)
            features = _names_option(feature_names) or (
                [str(f) for f in own_features]
                if own_features is not None
                else [f"feature_{i}" for i in range(n_features)]
            )
            classes = _names_option(class_names) or [
                str(c) for c in getattr(estimator, "classes_", [])
            ]
            manifest = register_model(
                model_dir,
                name,
                estimator,
                feature_names=features,
                class_names=classes,
                reference=rows,
                version=version,
                activate=False,
                conversion_rows=synthetic_rows(n_features) if rows is None else None,
                metrics=_metrics_option(metrics),
            )
        else:
            raise _fail(f"{path}: expected a .joblib or .onnx file")
    except (ConversionError, OSError, ValueError) as exc:
        raise _fail(f"{path} not registered: {exc}") from None
    typer.echo(
        f"registered {manifest.name} version {manifest.version} ({manifest.runtime}) in "
        f"{model_dir}; serve it with: modelgate models activate {manifest.name} "
        f"{manifest.version}"
    )


@models_app.command("list")
def models_list() -> None:
    """Print every model, one JSON object per line: its versions, their state and input
    schema, and the active version (recorded activation, else the registry's choice)."""
    import json

    from auth.model_activation import active_versions
    from ml import ModelRegistry

    settings = get_settings()
    registry = ModelRegistry(settings.model_dir)
    registry.load()

    async def work(session: AsyncSession) -> dict[str, str]:
        return await active_versions(session)

    recorded = _run_in_session(settings, work)
    for info in registry.models():
        active = recorded.get(info.name, info.active_version)
        versions = [
            {
                "version": status.version,
                "state": status.state,
                "error": status.error,
                "runtime": status.runtime,
                "created_at": None
                if status.manifest is None
                else status.manifest.created_at.isoformat(),
                "n_features": None if status.manifest is None else status.manifest.n_features,
                "metrics": None if status.manifest is None else status.manifest.metrics,
            }
            for status in info.versions
        ]
        document = {
            "name": info.name,
            "active_version": active,
            "activated_in": "database" if info.name in recorded else "registry",
            "versions": versions,
        }
        typer.echo(json.dumps(document))


@models_app.command("activate")
def models_activate(
    name: Annotated[str, typer.Argument(help="The model's name.")],
    version: Annotated[str, typer.Argument(help="The version to serve.")],
) -> None:
    """Verify and warm up a version here, then record it as the model's active version (audited):
    every running worker serves it within 2 seconds. Rollback is the same command."""
    from auth.model_activation import ActivationView, activate_version
    from ml import ModelError, ModelRegistry

    settings = get_settings()
    try:
        ModelRegistry(settings.model_dir).load_version(name, version)
    except ModelError as exc:
        raise _fail(f"not activated: {exc.message}") from None

    async def work(session: AsyncSession) -> ActivationView:
        return await activate_version(session, CLI_ACTOR, name, version)

    typer.echo(_run_in_session(settings, work).model_dump_json())


def main() -> None:
    """Entry point for ``python -m api.cli``."""
    app()


if __name__ == "__main__":
    main()
