"""``modelgate models``: the model registry (train the default model, register a model file,
import the versions already on disk into the catalogue, pull one from MLflow, S3, https or a
file, convert pickles to ONNX, list, activate). The model logic is in :mod:`ml`, publication in
:mod:`api.model_catalogue`; these commands parse their arguments, call them and print."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.cli.common import echo_json, fail, run_in_session, run_with_sessions
from auth.audit import CLI_ACTOR
from auth.errors import ConfigurationError
from auth.model_catalog import CatalogEntry, catalog_entry, model_entries
from auth.settings import Settings, get_settings

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ml import Manifest
    from ml.store import ModelStore

    FloatMatrix = npt.NDArray[np.float64]

# scikit-learn and ONNX take seconds to import, which every other command (tenants, keys,
# audit) would otherwise pay: ml is imported inside the commands that need it.

models_app = typer.Typer(help="The model registry.", no_args_is_help=True)


@models_app.command("train")
def models_train(
    if_absent: Annotated[
        bool, typer.Option("--if-absent", help="Do nothing if a model is already registered.")
    ] = False,
) -> None:
    """Train the default iris model from scikit-learn's bundled data and register it."""
    from ml import DEFAULT_MODEL
    from ml.train import has_model, train_default

    settings = get_settings()
    model_dir = settings.model_dir
    if _model_store(settings) is None:
        # No store: the model directory is the store, and training writes there as it always
        # did, without the database (the image trains at build time); `models import` records
        # it in the catalogue.
        if if_absent and has_model(model_dir, DEFAULT_MODEL):
            typer.echo(f"model {DEFAULT_MODEL!r} already present in {model_dir}")
            return
        manifest = train_default(model_dir)
        typer.echo(f"registered {manifest.name} version {manifest.version} in {model_dir}")
        return
    catalogued = run_in_session(settings, lambda session: model_entries(session, DEFAULT_MODEL))
    if if_absent and catalogued:
        typer.echo(f"model {DEFAULT_MODEL!r} already in the catalogue")
        return
    version = str(max((int(entry.version) for entry in catalogued), default=0) + 1)
    manifest = _publish(
        settings,
        lambda staging: train_default(staging, version=version),
        source_uri="modelgate:train",
    )
    typer.echo(f"published {manifest.name} version {manifest.version} to the model store")


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
    from ml.model_files import convert_versions

    model_dir = get_settings().model_dir
    rows = _reference_rows(reference)
    failures = 0
    for outcome in convert_versions(model_dir, rows, name):
        label = f"{outcome.name} version {outcome.version}"
        if outcome.manifest is None:
            failures += 1
            typer.echo(f"{label}: not converted, stays on scikit-learn ({outcome.error})", err=True)
            continue
        typer.echo(f"{label}: served by {outcome.manifest.runtime}")
    if failures:
        raise typer.Exit(1)


# Metrics given at registration are a small JSON object (they end up in the manifest).
_MAX_METRICS_CHARS = 16_384


def _metrics_option(text: str | None) -> dict[str, JsonValue] | None:
    if text is None:
        return None
    if len(text) > _MAX_METRICS_CHARS:
        raise fail(f"--metrics: at most {_MAX_METRICS_CHARS} characters")
    try:
        metrics = json.loads(text)
    except ValueError:
        raise fail("--metrics: not JSON") from None
    if not isinstance(metrics, dict):
        raise fail("--metrics: a JSON object, e.g. '{\"accuracy\": 0.97}'")
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
    from ml import ConversionError
    from ml.manifest import NAME_PATTERN, VERSION_PATTERN
    from ml.model_files import UnsupportedModelFile, register_file

    # Checked before anything is read: the name and version become directories of the registry.
    if not re.fullmatch(NAME_PATTERN, name):
        raise fail("--name: letters, digits, '_' and '-' (at most 64, starting alphanumeric)")
    if not re.fullmatch(VERSION_PATTERN, version):
        raise fail("--version: a number from 1 to 999999999")
    settings = get_settings()
    rows = _reference_rows(reference)
    recorded_metrics = _metrics_option(metrics)
    if run_in_session(settings, lambda session: catalog_entry(session, name, version)):
        raise fail(f"model {name!r} already has a version {version} in the catalogue")

    def stage(model_dir: Path) -> Manifest:
        try:
            return register_file(
                model_dir,
                path,
                name,
                version,
                feature_names=_names_option(feature_names),
                class_names=_names_option(class_names),
                reference=rows,
                metrics=recorded_metrics,
            )
        except UnsupportedModelFile as exc:
            raise fail(str(exc)) from None
        except (ConversionError, OSError, ValueError) as exc:
            raise fail(f"{path} not registered: {exc}") from None

    manifest = _publish(settings, stage, source_uri=path.resolve().as_uri())
    typer.echo(
        f"registered {manifest.name} version {manifest.version} ({manifest.runtime}) in "
        f"{_where(settings)}; serve it with: modelgate models activate {manifest.name} "
        f"{manifest.version}"
    )


def _where(settings: Settings) -> str:

    store = _model_store(settings)
    return str(settings.model_dir) if store is None else f"the model store {store.location}"


def _publish(
    settings: Settings, stage: Callable[[Path], Manifest], *, source_uri: str | None
) -> Manifest:
    """Stage a version with ``stage(staging_root)`` and publish it (``api.model_catalogue``):
    staged in a temporary directory that is then put in the store, or, without a store, in the
    model directory itself (the store), where a failed publication removes it again."""
    from api.model_catalogue import discard_unpublished, publish_version, staging_root
    from ml.store import StoreError

    store = _model_store(settings)
    with staging_root(settings.model_dir, store) as root:
        manifest = stage(root)
        staged = root / manifest.name / manifest.version

        async def work(session: AsyncSession) -> Manifest:
            return await publish_version(
                session, store, staged, CLI_ACTOR, source_uri=source_uri, source_version=None
            )

        try:
            return run_in_session(settings, work)
        except BaseException as exc:
            # Not published (the transaction rolled back: no catalogue row, no version).
            discard_unpublished(settings.model_dir, store, manifest)
            if isinstance(exc, StoreError):
                raise fail(f"not published: {exc}") from None
            raise


@models_app.command("import")
def models_import() -> None:
    """Record every version on this machine's model directory that the catalogue lacks (and
    put its files in the model store): one line per version. Run it once after upgrading."""
    from api.model_catalogue import publish_version
    from auth.errors import ModelgateError
    from ml.manifest import MANIFEST_FILE, NAME_PATTERN, VERSION_PATTERN
    from ml.store import StoreError

    settings = get_settings()
    store = _model_store(settings)
    failures = 0
    for manifest_path in sorted(settings.model_dir.glob(f"*/*/{MANIFEST_FILE}")):
        version_dir = manifest_path.parent
        name, version = version_dir.parent.name, version_dir.name
        if not (re.fullmatch(NAME_PATTERN, name) and re.fullmatch(VERSION_PATTERN, version)):
            continue

        async def work(session: AsyncSession, version_dir: Path = version_dir) -> str | None:
            before = await catalog_entry(session, version_dir.parent.name, version_dir.name)
            try:
                await publish_version(
                    session, store, version_dir, CLI_ACTOR, source_uri=None, source_version=None
                )
            except (ModelgateError, StoreError) as exc:
                await session.rollback()
                why = exc.detail if isinstance(exc, ModelgateError) else str(exc)
                typer.echo(
                    f"{version_dir.parent.name} version {version_dir.name}: not imported ({why})",
                    err=True,
                )
                return None
            return "already in the catalogue" if before is not None else "imported"

        outcome = run_in_session(settings, work)
        if outcome is None:
            failures += 1
            continue
        typer.echo(f"{name} version {version}: {outcome}")
    if failures:
        raise typer.Exit(1)


@models_app.command("pull")
def models_pull(
    source: Annotated[
        str,
        typer.Argument(
            help="models:/<name>/<version>, models:/<name>@<alias> (MLflow), s3://bucket/key, "
            "https://... (needs --sha256), file:///path or a path: an .onnx, .skops or pickle."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="The model's name here.")],
    version: Annotated[
        str | None,
        typer.Option(help="The new version's number (default: MLflow's, else the next free)."),
    ] = None,
    sha256: Annotated[
        str | None, typer.Option(help="The artifact's SHA-256 (hex): the pull checks it.")
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Accept a pickle artifact (it runs code when read); needs --sha256. Audited.",
        ),
    ] = False,
    activate: Annotated[
        bool, typer.Option("--activate", help="Activate it once pulled, as `activate` does.")
    ] = False,
) -> None:
    """Fetch a model from MLflow, S3, https or a file, convert and check it as `register` does,
    and add it as a new version (audited: model.pull); prints it as JSON."""
    from pydantic import ValidationError

    from api.pulls import pull_version
    from api.schemas.pull import PullRequestBody, PullView
    from auth.errors import ModelgateError
    from ml import ModelError, ModelRegistry

    try:
        body = PullRequestBody(
            source=source,
            name=name,
            version=version,
            sha256=sha256.lower() if sha256 else None,
            allow_pickle=allow_pickle,
            activate=activate,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        raise fail(f"--{'-'.join(map(str, error['loc']))}: {error['msg']}") from None
    settings = get_settings()
    registry = ModelRegistry(settings.model_dir, _model_store(settings))

    async def work(sessionmaker: async_sessionmaker[AsyncSession]) -> PullView:
        try:
            return await pull_version(settings, sessionmaker, registry, CLI_ACTOR, body)
        except ModelError as exc:
            raise fail(f"pulled, but not activated: {exc.message}") from None
        except ModelgateError as exc:
            raise fail(exc.detail) from None

    echo_json(run_with_sessions(settings, work))


@models_app.command("list")
def models_list() -> None:
    """Print every model, one JSON object per line: its versions, their state and input
    schema, and the active version (recorded activation, else the registry's choice)."""
    from auth.model_activation import active_versions
    from auth.model_catalog import new_entries
    from ml import ModelRegistry

    settings = get_settings()
    registry = ModelRegistry(settings.model_dir)

    async def work(session: AsyncSession) -> tuple[dict[str, str], list[CatalogEntry]]:
        return await active_versions(session), await new_entries(session, ())

    recorded, entries = run_in_session(settings, work)
    catalogue = {entry.key: entry for entry in entries}
    registry.learn_catalogue([entry.manifest for entry in entries])
    registry.load()
    infos = {info.name: info for info in registry.models()}
    for name in sorted(set(infos) | {entry.name for entry in entries}):
        info = infos.get(name)
        statuses = {} if info is None else {status.version: status for status in info.versions}
        versions = []
        for version in sorted(set(statuses) | {v for n, v in catalogue if n == name}, key=int):
            status, entry = statuses.get(version), catalogue.get((name, version))
            manifest = status.manifest if status is not None else None
            versions.append(
                {
                    "version": version,
                    # "catalogued": published, not on this machine's disk (replicas fetch it
                    # from the model store when it is activated or pinned).
                    "state": "catalogued" if status is None else status.state,
                    "error": None if status is None else status.error,
                    "runtime": None if status is None else status.runtime,
                    "created_at": None if manifest is None else manifest.created_at.isoformat(),
                    "n_features": None if manifest is None else manifest.n_features,
                    "metrics": None if manifest is None else manifest.metrics,
                    "source": None if entry is None else entry.source_uri,
                    "source_version": None if entry is None else entry.source_version,
                }
            )
        document = {
            "name": name,
            "active_version": recorded.get(name, None if info is None else info.active_version),
            "activated_in": "database" if name in recorded else "registry",
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
    from api.server.activations import activate_model_version
    from auth.model_activation import ActivationView
    from ml import ModelError, ModelRegistry

    settings = get_settings()
    # Checked here as a replica would: a catalogued version this machine does not have is
    # fetched from the store and verified against the catalogue, then warmed up.
    registry = ModelRegistry(settings.model_dir, _model_store(settings))

    async def work(sessionmaker: async_sessionmaker[AsyncSession]) -> ActivationView:
        try:
            return await activate_model_version(
                registry, sessionmaker, settings.database_timeout_seconds, CLI_ACTOR, name, version
            )
        except ModelError as exc:
            raise fail(f"not activated: {exc.message}") from None

    echo_json(run_with_sessions(settings, work))


def _model_store(settings: Settings) -> ModelStore | None:
    """The configured model store, or a one-line error."""
    from api.model_catalogue import model_store

    try:
        return model_store(settings)
    except ConfigurationError as exc:
        raise fail(str(exc)) from None


def _reference_rows(reference: Path | None) -> FloatMatrix | None:
    """The rows of ``--reference`` (None without it), or a one-line error."""
    if reference is None:
        return None
    from ml.model_files import read_rows

    try:
        return read_rows(reference)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read {reference}: {exc}") from None
