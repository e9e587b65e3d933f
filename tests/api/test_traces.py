"""Traces (api.observability.tracing): one trace per request, with its database statements and
Redis commands inside it; nothing traced, and nothing to pay, when the OTEL_* variables ask for
nothing."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from api.app import create_app
from api.observability.tracing import traces_requested
from auth.identity.keys import key_digest
from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    only_on,
    running_app,
)


@asynccontextmanager
async def traced_app(
    backend: Backend, model_dir: Path, var_dir: Path, provider: TracerProvider
) -> AsyncIterator[Harness]:
    # Leases off: every request checks its rate limit in Redis, so every trace has a Redis span
    # (a request spending a leased permit, auth.limits.leases, rightly makes no Redis call).
    settings = make_settings(backend, model_dir, var_dir, rate_limit_lease_max=0)
    app = create_app(settings, tracer_provider=provider)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Harness(client=client, state=app.state.modelgate, backend=backend)


def _db_system(span: ReadableSpan) -> object:
    attributes = span.attributes or {}
    return attributes.get("db.system.name", attributes.get("db.system"))


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    chain = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span)
    return chain


@only_on("postgres")
async def test_each_request_is_one_trace_with_its_database_and_redis_spans(
    backend: Backend, served_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with traced_app(backend, served_model_dir, tmp_path, provider) as app:
        _, key = await create_tenant_with_key(app)
        exporter.clear()  # the test's own set-up is no request
        with caplog.at_level(logging.INFO):
            responses = [
                await app.client.post(
                    "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
                )
                for _ in range(3)
            ]
            me = await app.client.get("/api/v1/me", headers=bearer(key))
        pepper = app.state.secrets.key_pepper
        assert _instrumented(app)
    assert not _instrumented(app)  # undone with the lifespan
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert me.status_code == 200
    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    traces: defaultdict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        traces[span.context.trace_id].append(span)

    servers = [span for span in spans if span.kind is SpanKind.SERVER]
    # One server span per request, each the root of a trace of its own.
    assert sorted(span.name for span in servers) == [
        "GET /api/v1/me",
        *["POST /api/v1/predict"] * 3,
    ]
    assert len({span.context.trace_id for span in servers}) == 4
    assert all(span.parent is None for span in servers)
    for server in servers:
        inside = [s for s in traces[server.context.trace_id] if s is not server]
        # Every span of the trace hangs from the request's span.
        assert all(server in _ancestors(span, by_id) for span in inside)
        systems = {_db_system(span) for span in inside}
        assert "redis" in systems, [s.name for s in inside]  # the rate-limit check
        assert (server.attributes or {}).get("http.route") == server.name.split(" ")[1]
    # The first request looked its key up in the database (later ones hit the key cache).
    first = min(
        (s for s in servers if s.name == "POST /api/v1/predict"), key=lambda s: s.start_time or 0
    )
    assert "postgresql" in {_db_system(s) for s in traces[first.context.trace_id]}

    # Each request's access line names its trace: from the log to the trace.
    access = {
        record.msg["request_id"]: record.msg
        for record in caplog.records
        if isinstance(record.msg, dict) and record.msg.get("event") == "request"
    }
    for response in [*responses, me]:
        line = access[response.headers["X-Request-ID"]]
        (server,) = [s for s in servers if format(s.context.trace_id, "032x") == line["trace_id"]]
        assert server.name.endswith(line["route"])

    # No span carries the key or its digest (the SQL text has placeholders, Redis's arguments
    # are "?").
    text = repr([(span.name, dict(span.attributes or {}), span.events) for span in spans])
    assert key not in text
    assert key_digest(pepper, key) not in text


@pytest.mark.parametrize(
    ("environ", "requested"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "modelgate"}, False),  # names the service, asks for nothing
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://192.0.2.1:4318"}, True),  # what .ci/run sets
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_only_the_standard_variables_switch_traces_on(
    environ: dict[str, str], requested: bool
) -> None:
    assert traces_requested(environ) is requested


async def test_without_otel_variables_nothing_is_traced(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    """The suite runs without OTEL_* variables (tests/conftest.py): FastAPI's telemetry is off
    (one flag per request) and neither the engine nor the Redis client is instrumented."""
    apps: list[FastAPI] = []
    settings = make_settings(backend, served_model_dir, tmp_path)
    async with running_app(settings, backend, customize=apps.append) as app:
        response = await app.client.get("/api/v1/health/live")
        assert response.status_code == 200
        assert apps[0].state.tracer_provider is None
        assert apps[0]._native_telemetry.enabled() is False
        assert not _instrumented(app)


def _instrumented(app: Harness) -> bool:
    """Whether the app's engine or Redis client reports to OpenTelemetry."""
    client = app.state.redis.client
    if client is not None and hasattr(client.execute_command, "__wrapped__"):
        return True
    listeners = app.state.engine.sync_engine.dispatch.before_cursor_execute
    return any("opentelemetry" in getattr(fn, "__module__", "") for fn in listeners)
