"""OpenTelemetry traces: optional (the ``otel`` extra), and off unless the standard ``OTEL_*``
variables ask for them.

One mechanism per layer: FastAPI's native telemetry makes the request's server span (and its
dependency, endpoint and serialization spans); SQLAlchemy's and Redis's instrumentations add the
database statements and the Redis commands made inside it, as its children. The span of a Redis
pipeline that carries the limit checks of several concurrent requests (auth.limits.limiter) is the
child of the first of them. Work outside any request is not part of a request's trace: the
usage writer's group commit (it writes through the driver's own connection, which SQLAlchemy's
events do not see), the periodic write of the keys' last use, the pruning of tokens.

Off (no ``OTEL_*`` variable asks for traces), nothing is built or instrumented, and FastAPI's
telemetry is switched off at construction: a request costs nothing more than without this module.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import structlog
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncEngine

from auth.errors import ConfigurationError

logger = structlog.get_logger(__name__)

SERVICE_NAME = "modelgate"
# What OTEL_TRACES_EXPORTER may name here (comma-separated; "none" switches traces off).
EXPORTERS = ("otlp", "console")
OTLP_PROTOCOLS = ("http/protobuf", "grpc")


def traces_requested(environ: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for traces: an exporter named in
    ``OTEL_TRACES_EXPORTER`` (other than ``none``), or an OTLP endpoint; never when
    ``OTEL_SDK_DISABLED=true``."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(
        exporters
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


@functools.cache
def provider_from_environment() -> trace.TracerProvider | None:
    """The process's tracer provider when the ``OTEL_*`` variables ask for traces, else None.

    Built once per process (each worker builds its own) and made the global provider. A provider
    someone else already made global (``opentelemetry-instrument modelgate serve``) is used as
    it is. Without the ``otel`` extra, one warning and no traces: a missing optional package
    does not stop the API."""
    if not traces_requested(os.environ):
        return None
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        return current
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning(
            "OTEL_* variables ask for traces, but the otel extra is not installed "
            "(pip install 'modelgate[otel]'): no traces"
        )
        return None
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read here; OTEL_TRACES_SAMPLER by the
    # provider, OTEL_BSP_* by the batch processor, OTEL_EXPORTER_OTLP_* by the exporter.
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for exporter in _exporters(os.environ):
        # Batched, in a thread of its own: an exporter that is slow or unreachable delays no
        # request (spans beyond OTEL_BSP_MAX_QUEUE_SIZE are dropped, not waited for).
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse (ConfigurationError, one line naming the variable) an exporter or an OTLP protocol
    this module cannot build, before any worker starts; nothing when traces are off."""
    if traces_requested(environ):
        _exporter_names(environ)
        _otlp_protocol(environ)


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    names = [
        name.strip()
        for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")
        if name.strip()
    ] or ["otlp"]
    unknown = sorted(set(names) - set(EXPORTERS))
    if unknown:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not one of {', '.join(EXPORTERS)}"
        )
    return list(dict.fromkeys(names))


def _otlp_protocol(environ: Mapping[str, str]) -> str:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in OTLP_PROTOCOLS:
        raise ConfigurationError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol} is not one of {', '.join(OTLP_PROTOCOLS)}"
        )
    return protocol


def _exporters(environ: Mapping[str, str]) -> list[Any]:
    exporters: list[Any] = []
    for name in _exporter_names(environ):
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif _otlp_protocol(environ) == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            exporters.append(GrpcSpanExporter())
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
    return exporters


@contextlib.contextmanager
def instrumented(
    provider: trace.TracerProvider, engine: AsyncEngine, redis_client: Any | None
) -> Iterator[None]:
    """Trace the engine's statements and the Redis client's commands with ``provider`` while
    the block runs (the app's lifespan). Only the SQL text is recorded, never its parameters (a
    parameter can be a key's digest); Redis commands are recorded as ``EVALSHA ? ? ...``."""
    try:
        from opentelemetry.instrumentation.redis import RedisInstrumentor
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except ImportError:
        # A provider configured by someone else, without the otel extra: requests are traced,
        # their database and Redis calls are not.
        logger.warning(
            "the otel extra is not installed (pip install 'modelgate[otel]'): "
            "database and Redis calls are not traced"
        )
        yield
        return
    # Instrumented already (by `opentelemetry-instrument`, which instruments every installed
    # library for the whole process): left as it is, so that no call is traced twice.
    sqlalchemy = SQLAlchemyInstrumentor()
    ours_sql = not sqlalchemy.is_instrumented_by_opentelemetry
    ours_redis: Any = None  # the client, when it is ours to instrument
    if redis_client is not None and not RedisInstrumentor().is_instrumented_by_opentelemetry:
        ours_redis = redis_client
    if ours_sql:
        # The instrumentation declares SQLAlchemy < 2.1 and would otherwise refuse 2.1, whose
        # engine events it listens to are unchanged (tests/api/test_traces.py proves the spans).
        sqlalchemy.instrument(
            engine=engine.sync_engine, tracer_provider=provider, skip_dep_check=True
        )
    if ours_redis is not None:
        RedisInstrumentor.instrument_client(ours_redis, tracer_provider=provider)
    try:
        yield
    finally:
        if ours_redis is not None:
            RedisInstrumentor.uninstrument_client(ours_redis)
        if ours_sql:
            sqlalchemy.uninstrument()
