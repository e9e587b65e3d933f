"""Each worker's part in the model lifecycle: about once a second it learns the versions
published since (the catalogue, ``auth.model_catalog``) and applies the operator's activations
(``auth.model_activation``), both kept in the database, fetching an activated version from the
model store when this replica does not have it; and it checks every loaded model version every
``MODELGATE_MODEL_CHECK_INTERVAL_SECONDS`` (``ml.ModelRegistry.self_check``, which fetches a
corrupted copy again). And the one way a version is activated here (the admin route, the CLI,
pulls and the model webhooks): loaded first, then recorded (:func:`activate_model_version`)."""

from __future__ import annotations

import asyncio
import time

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.model_catalogue import sync_catalogue
from api.observability import metrics
from auth.audit import Actor
from auth.errors import DatabaseTimedOut, InvalidRequest, ModelgateError, NotFound
from auth.events.outbox import emit
from auth.model_activation import ActivationView, activate_version, active_versions
from auth.model_catalog import CatalogEntry, CatalogKey, catalog_entry
from auth.models import utcnow
from ml import ModelNotFound, ModelRegistry

logger = structlog.get_logger(__name__)

# An activation reaches every worker within this poll, plus the time to load the version: the
# contract's 2 seconds. One small query per worker per second.
ACTIVATION_POLL_SECONDS = 1.0
# A database that cannot be read is logged at most this often.
_WARN_EVERY_SECONDS = 60.0


async def apply_activations(
    registry: ModelRegistry,
    sessionmaker: async_sessionmaker[AsyncSession],
    timeout: float,
    catalogue: dict[CatalogKey, CatalogEntry] | None = None,
) -> None:
    """Learn the new catalogue entries (into ``catalogue`` and the registry), then make the
    registry's active versions those recorded in the database (loading a version in a thread
    when this worker has not loaded it yet, fetching it from the store first when this replica
    does not have it). Models without a record keep the registry's own choice."""
    async with asyncio.timeout(timeout), sessionmaker() as session:
        if catalogue is not None:
            await sync_catalogue(registry, session, catalogue)
        recorded = await active_versions(session)
    current = registry.activations()
    changed = False
    for name, version in sorted(recorded.items()):
        if current.get(name) != version:
            await asyncio.to_thread(registry.set_active, name, version)
            changed = True
    if changed:
        metrics.record_active_versions(registry)


async def follow_activations(
    registry: ModelRegistry,
    sessionmaker: async_sessionmaker[AsyncSession],
    timeout: float,
    interval: float = ACTIVATION_POLL_SECONDS,
    catalogue: dict[CatalogKey, CatalogEntry] | None = None,
) -> None:
    """Apply the recorded activations every ``interval`` seconds, until cancelled; a failed
    read keeps the versions this worker has (and is retried at the next tick)."""
    warned_at = -_WARN_EVERY_SECONDS
    while True:
        await asyncio.sleep(interval)
        try:
            await apply_activations(registry, sessionmaker, timeout, catalogue)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if time.monotonic() - warned_at >= _WARN_EVERY_SECONDS:
                warned_at = time.monotonic()
                logger.warning("model activations could not be read", error=type(exc).__name__)


async def check_models_periodically(
    registry: ModelRegistry,
    interval: float,
    sessionmaker: async_sessionmaker[AsyncSession] | None = None,
    timeout: float = 5.0,
) -> None:
    """Run the registry's self-check every ``interval`` seconds in a thread, until cancelled;
    with ``sessionmaker``, a version the check found unhealthy raises ``model.unhealthy`` for
    the operator (once per version and UTC day, whichever worker noticed it first)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(registry.self_check)
            metrics.record_registry(registry)
            if sessionmaker is not None:
                await _report_unhealthy(registry, sessionmaker, timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("model self-check raised")


async def _report_unhealthy(
    registry: ModelRegistry, sessionmaker: async_sessionmaker[AsyncSession], timeout: float
) -> None:
    unhealthy = [
        (info.name, status.version, status.error)
        for info in registry.models()
        for status in info.versions
        if status.state == "unhealthy"
    ]
    if not unhealthy:
        return
    day = utcnow().date().isoformat()
    async with asyncio.timeout(timeout), sessionmaker() as session:
        for name, version, error in unhealthy:
            await emit(
                session,
                "model.unhealthy",
                {"model": name, "version": version, "reason": (error or "")[:500]},
                dedupe_key=f"model.unhealthy:{name}:{version}:{day}",
            )
        await session.commit()


async def load_published_version(
    registry: ModelRegistry,
    sessionmaker: async_sessionmaker[AsyncSession],
    timeout: float,
    name: str,
    version: str,
    known: dict[CatalogKey, CatalogEntry] | None = None,
) -> None:
    """Load ``version`` of ``name`` in this process: fetched from the store if it is only
    catalogued (it may have been published a moment ago, before this process's once-a-second
    read of the catalogue), verified against the catalogue, warmed up, its canary asked.
    Raises :class:`ml.ModelNotFound`, :class:`ml.ModelUnavailable` (with the reason) or
    :class:`DatabaseTimedOut`."""
    try:
        async with asyncio.timeout(timeout), sessionmaker() as session:
            entry = await catalog_entry(session, name, version)
    except TimeoutError:
        raise DatabaseTimedOut from None
    if entry is not None:
        if known is not None:
            known[entry.key] = entry
        registry.learn_catalogue([entry.manifest])
    await asyncio.to_thread(registry.load_version, name, version)


async def _activation_failed(
    sessionmaker: async_sessionmaker[AsyncSession],
    timeout: float,
    name: str,
    version: str,
    exc: Exception,
) -> None:
    """Queue ``model.activation_failed`` (no activation record exists to write it with: it is
    the failure's own transaction). Best effort: the activation's own error is what the caller
    gets either way."""
    reason = exc.detail if isinstance(exc, ModelgateError) else type(exc).__name__
    try:
        async with asyncio.timeout(timeout), sessionmaker() as session:
            await emit(
                session,
                "model.activation_failed",
                {"model": name, "version": version, "reason": reason[:500]},
            )
            await session.commit()
    except Exception as failure:
        logger.warning("activation failure event not written", error=type(failure).__name__)


async def activate_model_version(
    registry: ModelRegistry,
    sessionmaker: async_sessionmaker[AsyncSession],
    timeout: float,
    actor: Actor,
    name: str,
    version: str,
    known: dict[CatalogKey, CatalogEntry] | None = None,
) -> ActivationView:
    """Make ``version`` the active version of ``name``, blue-green: this process loads it
    first (:func:`load_published_version`); only then is the activation recorded (audited)
    and switched to here, and every other worker follows the record within a second. A
    version that fails any step is not activated, and the version that served keeps serving.
    Raises as :func:`load_published_version` does; a version that fails to load raises an
    operator event ``model.activation_failed`` first."""
    try:
        await load_published_version(registry, sessionmaker, timeout, name, version, known)
    except (DatabaseTimedOut, InvalidRequest, NotFound, ModelNotFound):
        # Not an activation that failed: a version that does not exist, or a bad name.
        raise
    except Exception as exc:
        await _activation_failed(sessionmaker, timeout, name, version, exc)
        raise
    try:
        async with asyncio.timeout(timeout), sessionmaker() as session:
            view = await activate_version(session, actor, name, version)
            await session.commit()
    except TimeoutError:
        raise DatabaseTimedOut from None
    await asyncio.to_thread(registry.set_active, name, version)
    metrics.record_active_versions(registry)
    return view
