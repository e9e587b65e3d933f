"""GET /metrics in one process: Prometheus' text format, labels that are route templates (never
a client's path or ids), predictions by model, version and runtime, refusals by reason, the
usage writer's and the registry's figures, and the optional bearer token."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from api.observability import metrics
from auth.models import UsageRecord
from auth.usage.writer import FlushStats
from ml import LoadedModel
from tests.conftest import (
    IRIS_SETOSA,
    IRIS_VIRGINICA,
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    running_app,
    wrong_checksum,
)

METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
METRICS_TOKEN = "metrics-token-" + "z" * 32


async def scrape(client: httpx.AsyncClient, **headers: str) -> str:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return response.text


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def family_names(text: str) -> set[str]:
    """The metric families of a scrape, by the names their HELP lines give."""
    return set(re.findall(r"^# HELP (\S+) ", text, flags=re.MULTILINE))


async def test_metrics_are_public_prometheus_text_by_default(harness: Harness) -> None:
    response = await harness.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = family_names(response.text)
    assert {
        "modelgate_http_requests_total",
        "modelgate_http_request_duration_seconds",
        "modelgate_usage_flush_records",
        "modelgate_model_active_version",
    } <= names


async def test_the_docs_list_every_metric_the_service_exports(harness: Harness) -> None:
    """The Metrics section of docs/operations.md names each family, one line each, and nothing
    else."""
    exported = {name for name in family_names(await scrape(harness.client)) if "modelgate_" in name}
    section = METRICS_DOC.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^- `(modelgate_[a-z_]+)`", section, flags=re.MULTILINE))
    assert listed == exported


async def test_requests_are_labelled_by_route_template_never_by_raw_path(
    harness: Harness,
) -> None:
    _, key = await create_tenant_with_key(harness)
    secret_name = f"n{uuid.uuid4().hex}"
    secret_path = f"p{uuid.uuid4().hex}"
    before = await scrape(harness.client)
    model = await harness.client.get(f"/api/v1/models/{secret_name}", headers=bearer(key))
    assert model.status_code == 404
    assert (await harness.client.get(f"/{secret_path}/x?q={secret_path}")).status_code == 404
    # A static file of the console is counted under its mount's path (api.console).
    assert (await harness.client.get(f"/console/{secret_path}.js")).status_code == 404
    after = await scrape(harness.client)
    assert secret_name not in after
    assert secret_path not in after
    for route in ("/api/v1/models/{name}", "unmatched", "/console"):
        labels = {"route": route, "method": "GET", "status": "404"}
        grown = value(after, "modelgate_http_requests_total", **labels) - value(
            before, "modelgate_http_requests_total", **labels
        )
        assert grown == 1, route
        observed = value(after, "modelgate_http_request_duration_seconds_count", **labels)
        assert observed - value(before, "modelgate_http_request_duration_seconds_count", **labels)
    assert 'route="/api/v1/models/{name}"' in after


async def test_a_request_method_outside_http_s_own_is_labelled_other(harness: Harness) -> None:
    before = await scrape(harness.client)
    response = await harness.client.request("BREW", "/api/v1/health/live")
    assert response.status_code == 405
    after = await scrape(harness.client)
    assert "BREW" not in after
    labels = {"route": "/api/v1/health/live", "method": "other", "status": "405"}
    assert (
        value(after, "modelgate_http_requests_total", **labels)
        - value(before, "modelgate_http_requests_total", **labels)
        == 1
    )


async def test_predictions_are_counted_with_their_rows_by_model_version_and_runtime(
    harness: Harness,
) -> None:
    _, key = await create_tenant_with_key(harness)
    version = harness.state.registry.active_version("iris")
    assert version is not None
    labels = {"model": "iris", "version": version, "runtime": "onnx"}
    before = await scrape(harness.client)
    one = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    batch = await harness.client.post(
        "/api/v1/predict/batch",
        json={"instances": [IRIS_SETOSA, IRIS_VIRGINICA, IRIS_SETOSA]},
        headers=bearer(key),
    )
    assert (one.status_code, batch.status_code) == (200, 200)
    # A refused prediction is not one.
    bad = await harness.client.post(
        "/api/v1/predict", json={"features": [1.0]}, headers=bearer(key)
    )
    assert bad.status_code == 422
    after = await scrape(harness.client)

    def grown(name: str, **extra: str) -> float:
        return value(after, name, **extra) - value(before, name, **extra)

    assert grown("modelgate_predictions_total", **labels) == 2
    assert grown("modelgate_prediction_rows_total", **labels) == 4
    # Each ONNX call's rows, and each usage transaction's records, were observed.
    assert grown("modelgate_inference_batch_rows_count", runtime="onnx") >= 1
    assert grown("modelgate_inference_batch_rows_sum", runtime="onnx") == 4
    assert grown("modelgate_usage_flush_records_count") >= 1
    assert grown("modelgate_usage_flush_records_sum") == 2
    assert grown("modelgate_usage_flush_duration_seconds_count") >= 1
    assert value(after, "modelgate_usage_queue_depth") >= 0


async def test_concurrent_onnx_predictions_are_observed_as_one_batch(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    before = await scrape(harness.client)
    responses = await asyncio.gather(
        *[
            harness.client.post(
                "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
            )
            for _ in range(8)
        ]
    )
    assert {response.status_code for response in responses} == {200}
    after = await scrape(harness.client)
    calls = value(after, "modelgate_inference_batch_rows_count", runtime="onnx") - value(
        before, "modelgate_inference_batch_rows_count", runtime="onnx"
    )
    rows = value(after, "modelgate_inference_batch_rows_sum", runtime="onnx") - value(
        before, "modelgate_inference_batch_rows_sum", runtime="onnx"
    )
    assert rows == 8
    assert 1 <= calls <= 8


async def test_refusals_are_counted_by_reason(harness: Harness) -> None:
    _, limited_key = await create_tenant_with_key(harness, rate_limit="1/minute")
    _, small_key = await create_tenant_with_key(harness, monthly_quota=1)
    before = await scrape(harness.client)
    predict = {"features": IRIS_SETOSA}
    client = harness.client
    unauthenticated = await client.get("/api/v1/me", headers=bearer(wrong_checksum(limited_key)))
    forbidden = await client.get("/api/v1/admin/tenants", headers=bearer(limited_key))
    first = await client.post("/api/v1/predict", json=predict, headers=bearer(limited_key))
    limited_out = await client.post("/api/v1/predict", json=predict, headers=bearer(limited_key))
    over_quota = await client.post(
        "/api/v1/predict/batch",
        json={"instances": [IRIS_SETOSA, IRIS_SETOSA]},
        headers=bearer(small_key),
    )
    statuses = [r.status_code for r in (unauthenticated, forbidden, first, limited_out, over_quota)]
    assert statuses == [401, 403, 200, 429, 429]
    assert over_quota.json()["type"] == "quota-exceeded"
    after = await scrape(harness.client)

    def grown(status: int, reason: str) -> float:
        labels = {"status": str(status), "reason": reason}
        name = "modelgate_rejections_total"
        return value(after, name, **labels) - value(before, name, **labels)

    assert grown(401, "unauthenticated") == 1
    assert grown(403, forbidden.json()["type"]) == 1
    assert grown(429, "rate-limited") == 1
    assert grown(429, "quota-exceeded") == 1


async def test_a_request_cancelled_before_its_answer_is_counted_499_and_billed_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that goes away and takes the request's task with it (a test client, a server
    that cancels): 499 (api.http.disconnect), not the 500 of an error; nothing billed. Against a
    real server: tests/e2e/test_client_disconnect.py."""
    tenant, key = await create_tenant_with_key(harness)
    entered, gate = asyncio.Event(), asyncio.Event()
    original = LoadedModel.infer_async

    async def slow_infer(self: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "infer_async", slow_infer)
    before = await scrape(harness.client)
    request = asyncio.ensure_future(
        harness.client.post(
            "/api/v1/predict", json={"features": IRIS_VIRGINICA}, headers=bearer(key)
        )
    )
    await asyncio.wait_for(entered.wait(), timeout=30)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    gate.set()
    after = await scrape(harness.client)

    def grown(status: str) -> float:
        labels = {"route": "/api/v1/predict", "status": status}
        name = "modelgate_http_requests_total"
        return value(after, name, **labels) - value(before, name, **labels)

    assert (grown("499"), grown("500")) == (1, 0)
    async with harness.sessionmaker() as session:
        records = await session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.tenant_id == tenant.id)
        )
    assert records == 0


async def test_the_active_version_of_each_model_is_reported(harness: Harness) -> None:
    text = await scrape(harness.client)
    info = harness.state.registry.model_info("iris")
    assert info.active_version is not None
    for status in info.versions:
        expected = 1 if status.version == info.active_version else 0
        labels = {"model": "iris", "version": status.version}
        assert value(text, "modelgate_model_active_version", **labels) == expected


async def test_cache_lookups_are_counted_through_the_recording_api(harness: Harness) -> None:
    before = await scrape(harness.client)
    metrics.record_cache(hit=True)
    metrics.record_cache(hit=True)
    metrics.record_cache(hit=False)
    after = await scrape(harness.client)
    hits = value(after, "modelgate_cache_hits_total") - value(before, "modelgate_cache_hits_total")
    misses = value(after, "modelgate_cache_misses_total") - value(
        before, "modelgate_cache_misses_total"
    )
    assert (hits, misses) == (2, 1)


async def test_metrics_token_is_required_when_set(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        backend, served_model_dir, tmp_path / "var", metrics_token=METRICS_TOKEN
    )
    async with running_app(settings, backend) as app:
        missing = await app.client.get("/metrics")
        wrong = await app.client.get("/metrics", headers=bearer(METRICS_TOKEN + "x"))
        other_scheme = await app.client.get(
            "/metrics", headers={"Authorization": f"Basic {METRICS_TOKEN}"}
        )
        for refused in (missing, wrong, other_scheme):
            assert refused.status_code == 401
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["type"] == "unauthenticated"
            assert METRICS_TOKEN not in refused.text
        granted = await app.client.get("/metrics", headers=bearer(METRICS_TOKEN))
        assert granted.status_code == 200
        assert "modelgate_http_requests_total" in granted.text
        assert METRICS_TOKEN not in granted.text


def test_a_short_metrics_token_is_refused_at_start(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="metrics_token"):
        make_settings(backend, served_model_dir, tmp_path, metrics_token="short")


async def test_a_model_version_that_fails_to_load_is_counted(
    backend: Backend, model_copy: Path, tmp_path: Path
) -> None:
    version_dir = next(path for path in (model_copy / "iris").iterdir() if path.is_dir())
    artifact = version_dir / "model.onnx"
    artifact.write_bytes(artifact.read_bytes() + b"tampered")
    labels = {"model": "iris", "version": version_dir.name}
    settings = make_settings(backend, model_copy, tmp_path / "var")
    async with running_app(settings, backend) as app:
        text = await scrape(app.client)
        failures = value(text, "modelgate_model_load_failures_total", **labels)
    # A second load of the same registry counts its failure again (each load counts once).
    async with running_app(settings, backend) as app:
        again = value(await scrape(app.client), "modelgate_model_load_failures_total", **labels)
    assert failures >= 1
    assert again == failures + 1


async def test_a_failing_flush_observer_never_stops_billing(
    backend: Backend,
    served_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[FlushStats] = []

    def broken(stats: FlushStats) -> Any:
        seen.append(stats)
        raise RuntimeError("observer bug")

    monkeypatch.setattr(metrics, "observe_usage_flush", broken)
    settings = make_settings(backend, served_model_dir, tmp_path / "var")
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app)
        for _ in range(3):
            response = await app.client.post(
                "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
            )
            assert response.status_code == 200
    assert len(seen) >= 1
    assert sum(stats.records for stats in seen) == 3
    assert not any(stats.failed for stats in seen)


async def test_the_event_loop_lag_is_measured(harness: Harness) -> None:
    before = await scrape(harness.client)
    count = value(before, "modelgate_event_loop_lag_seconds_count")
    total = value(before, "modelgate_event_loop_lag_seconds_sum")
    await asyncio.sleep(0.15)
    time.sleep(0.3)  # the point: the loop is blocked
    await asyncio.sleep(0.25)
    after = await scrape(harness.client)
    assert value(after, "modelgate_event_loop_lag_seconds_count") >= count + 2
    assert value(after, "modelgate_event_loop_lag_seconds_sum") - total >= 0.2
    assert value(after, "modelgate_event_loop_lag_seconds_bucket", le="0.1") < value(
        after, "modelgate_event_loop_lag_seconds_count"
    )
