"""MERGE (issue 19): the deployer until pull, publish and store-backed activation exist.

The lead replaces this module with the deployer that pulls (``modelgate models pull``'s
sources), publishes to the store and activates blue-green; the receivers and the
:class:`~api.webhooks.deploy.DeployRequest` they hand over stay as they are.

Until then it does only what exists on main: a ``file://`` source (the generic hook) is
registered as ``models register`` does (``ml.model_files.register_file``), and activated, when
asked, as ``POST /admin/models/{name}/activate`` does (load, verify and warm up, record, switch;
every other worker follows the record). Only ``.onnx`` files: a pickle is refused, since
unpickling runs code and a webhook is not an operator at a terminal. A ``models:/`` source
(MLflow) is reported as not available yet, in the log and the audit trail.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.observability import metrics
from api.webhooks.deploy import DeployOutcome, DeployRequest
from auth.audit import Actor
from auth.model_activation import activate_version
from ml import ModelRegistry, ModelUnavailable
from ml.model_files import ONNX_SUFFIXES, register_file


class InterimDeployer:
    """Registers ``file://`` ONNX sources and activates them; nothing else yet (see module)."""

    def __init__(
        self,
        registry: ModelRegistry,
        sessionmaker: async_sessionmaker[AsyncSession],
        database_timeout_seconds: float,
    ) -> None:
        self.registry = registry
        self._sessionmaker = sessionmaker
        self._timeout = database_timeout_seconds

    async def deploy(self, request: DeployRequest) -> DeployOutcome:
        """Register the request's file and activate it if asked (see the module)."""
        scheme = urlsplit(request.source_uri).scheme.lower()
        if scheme == "models":
            return DeployOutcome(
                "unsupported",
                "pulling from MLflow (models:/) is not available in this version yet; "
                "register the version by hand (modelgate models register)",
            )
        if scheme != "file":
            return DeployOutcome(
                "unsupported", f"source scheme {scheme or '(none)'!r} is not served"
            )
        path = _local_path(request.source_uri)
        if path is None:
            return DeployOutcome("refused", "a file:// source must be an absolute local path")
        if path.suffix.lower() not in ONNX_SUFFIXES:
            return DeployOutcome(
                "refused",
                "only .onnx files are registered from a webhook: unpickling a file runs its code",
            )
        model_dir = self.registry.model_dir
        if (model_dir / request.name / request.version).exists():
            registered = "already registered"
        else:
            # Blocking: hashing, ONNX checks and the file writes.
            await asyncio.to_thread(register_file, model_dir, path, request.name, request.version)
            registered = "registered"
        try:
            # Verified, warmed up and canaried in this worker now (the others find it at their
            # next self-check, or load it when it is activated).
            await asyncio.to_thread(self.registry.load_version, request.name, request.version)
        except ModelUnavailable as exc:
            return DeployOutcome("refused", f"{registered}, but it cannot serve: {exc.message}")
        if not request.activate:
            return DeployOutcome("deployed", f"{registered} and loaded")
        async with asyncio.timeout(self._timeout), self._sessionmaker() as session:
            await activate_version(
                session,
                Actor(name=f"webhook:{request.via}", request_id=request.delivery_id),
                request.name,
                request.version,
            )
            await session.commit()
        # This worker switches now; the others within a second (api.server.activations).
        await asyncio.to_thread(self.registry.set_active, request.name, request.version)
        metrics.record_active_versions(self.registry)
        return DeployOutcome("deployed", f"{registered} and activated", activated=True)


def _local_path(uri: str) -> Path | None:
    """The absolute path a ``file://`` URI names on this host, or None."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        return None
    path = Path(unquote(parts.path))
    return path if path.is_absolute() else None
