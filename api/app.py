"""The FastAPI application factory and its lifespan."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig
from opentelemetry.trace import TracerProvider

from api.console import install_api_docs, install_console
from api.http.errors import install_error_handlers
from api.http.forwarded import TrustedProxies
from api.http.idempotency import Replay, replay_handler
from api.http.middleware import RequestContextMiddleware
from api.http.openapi import install_openapi
from api.observability import metrics
from api.observability.logging import configure_logging
from api.observability.tracing import instrumented, provider_from_environment
from api.routes import catalog, events, health, me, predict, root, token, v2, webhooks
from api.routes.admin import router as admin_router
from api.routes.metrics import install_metrics
from api.server.grpc_serving import start_grpc
from api.services import AppState
from auth.settings import Settings, check_production, declared_workers, get_settings, load_secrets

API_PREFIX = "/api/v1"
# Objects allocated and not yet freed before the collector looks for cycles among them (Python's
# default: 700). Set once the app has started (the lifespan), in every worker.
YOUNG_COLLECTION_THRESHOLD = 10_000


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the process's services (``api.services``), start them, and close them on exit."""
    settings: Settings = app.state.settings
    services = AppState.build(settings, load_secrets(settings))
    await services.start()
    app.state.modelgate = services
    # Everything loaded so far (models, libraries, metadata) lives as long as the process: move
    # it out of the collector's reach. Otherwise every full collection walks those millions of
    # objects and stalls every request in flight (p99 at 16 connections went from ~200 ms to
    # ~35 ms in the bench).
    gc.collect()
    gc.freeze()
    # What a request allocates is freed by reference counting when it is answered; the
    # collector's default (a young collection every 700 objects more allocated than freed)
    # fires on the objects of the requests merely in flight, and took about 8% of /predict's
    # CPU and put its pauses into the tail (docs/performance.md). Past the objects of a few
    # hundred requests in flight, it still runs, for cycles that something does leave.
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
    tracing = ExitStack()
    tracer_provider: TracerProvider | None = app.state.tracer_provider
    if tracer_provider is not None:
        tracing.enter_context(instrumented(tracer_provider, services.engine, services.redis.client))
    # The Open Inference Protocol over gRPC, when a port is set (api.server.grpc_serving).
    grpc_serving = None
    try:
        if settings.grpc_port is not None:
            # A port it cannot bind stops the worker's start (and closes what started).
            grpc_serving = await start_grpc(services, settings, app.title, app.version)
        yield
    finally:
        if grpc_serving is not None:
            await grpc_serving.close()  # its calls in flight end before the services close
        await services.close()
        tracing.close()
        metrics.worker_exiting()


def create_app(
    settings: Settings | None = None, *, tracer_provider: TracerProvider | None = None
) -> FastAPI:
    """Build the application; ``uvicorn --factory api.app:create_app`` calls this per worker.
    Traces go to ``tracer_provider`` if given, else to the one the ``OTEL_*`` variables configure
    (``api.observability.tracing``); with neither, tracing is off."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    # Here rather than only in `modelgate serve`: every way of starting the app (uvicorn or
    # gunicorn with --factory, a test) refuses the same production configurations.
    check_production(settings, declared_workers())
    tracer_provider = tracer_provider or provider_from_environment()
    if tracer_provider is not None:
        configure_logging(settings.log_level, settings.log_format, trace_ids=True)
    app = FastAPI(
        title="modelgate",
        version="0.1.0",
        summary="Multi-tenant machine-learning predictions, metered and rate-limited.",
        lifespan=lifespan,
        telemetry=_telemetry(tracer_provider),
        # Served from vendored assets by api.console, not FastAPI's pages that load a CDN's.
        docs_url=None,
        redoc_url=None,
    )
    app.state.tracer_provider = tracer_provider
    app.state.settings = settings
    # The one reading of X-Forwarded-For (api.http.deps.client_address); empty: the socket's peer.
    app.state.trusted_proxies = TrustedProxies(settings.trusted_proxy_networks)
    install_error_handlers(app)
    # A stored answer to an Idempotency-Key, sent instead of serving the request again.
    app.add_exception_handler(Replay, replay_handler)
    install_openapi(app)

    # Included straight into the app (not through an /api/v1 router of their own): every level
    # of nesting is one more router a request walks through. Predictions come first.
    # The model webhooks sit under /admin but are signed, not behind the admin credential.
    routers = (
        predict.router,
        health.router,
        catalog.router,
        me.router,
        events.me_router,
        token.router,
        admin_router,
        webhooks.router,
    )
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(root.router)
    install_metrics(app)
    app.include_router(v2.router)  # the Open Inference Protocol, at /v2 (no prefix)
    install_api_docs(app)
    install_console(app, settings)

    origins = settings.cors_origin_list
    if origins:
        # Bearer tokens, not cookies: credentials mode is never needed, so never allowed.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "PATCH"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=[
                "X-Request-ID",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "RateLimit-Policy",
                "RateLimit",
                "Retry-After",
            ],
        )
    # The request's context, deadline and body limit, in one layer (api.http.middleware). The
    # body limit is enforced when the body is read, so that a route that refuses a credential
    # before reading the body (api.http.deps.CredentialFirstRoute) answers 401 whatever the
    # Content-Length (api.http.body_limit), and it sits inside the context, as the deadline
    # does: their 413 and 503 carry a request id, are logged, and give the request's concurrency
    # slot back (FastAPI's own max_body_size sits outside every user middleware).
    app.add_middleware(
        RequestContextMiddleware,
        timeout_seconds=settings.request_timeout_seconds,
        max_body_size=settings.max_body_bytes,
    )
    return app


def _telemetry(tracer_provider: TracerProvider | None) -> TelemetryConfig:
    """FastAPI's native OpenTelemetry: request spans when there is a provider to give them to,
    and nothing else. Off, FastAPI tests one flag per request instead of asking the global
    providers whether they are configured. Its metrics stay off (Prometheus at /metrics is the
    one source of metrics), and so do its logs: they export exception messages, and a driver's
    message can quote a SQL parameter such as a key's digest. Its own exporter set-up from the
    environment stays off too: ``api.observability.tracing`` is the one that reads the OTEL_*
    variables."""
    return {
        "tracing": tracer_provider is not None,
        "tracer_provider": tracer_provider,
        "metrics": False,
        "logs": False,
        "auto_configure": False,
    }
