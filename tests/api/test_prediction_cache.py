"""The prediction cache: answers flagged and billed, isolated per tenant on both backends (Redis
and the in-process LRU), keyed by exact features, and failing safe. Its hits, misses and errors
are read where they are counted: Prometheus (``api.observability.metrics``)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from api.cli import upgrade_database
from api.inference.cache import MemoryBackend, PredictionCache, RedisBackend, cache_secret
from api.observability import metrics
from auth.models import UsageRecord
from ml import ModelRegistry, Prediction
from tests.conftest import (
    IRIS_SETOSA,
    IRIS_VIRGINICA,
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    running_app,
)
from tests.security.test_dependency_failures import PrivateRedis, private_redis  # noqa: F401

TTL_SECONDS = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def harness(
    backend: Backend, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    """The app with the prediction cache on (Redis on the Postgres backend, memory on SQLite)."""
    settings = make_settings(
        backend,
        served_model_dir,
        tmp_path_factory.mktemp("var"),
        prediction_cache_ttl_seconds=TTL_SECONDS,
    )
    async with running_app(settings, backend) as running:
        yield running


def cache_counts() -> dict[str, float]:
    """The prediction cache's hits, misses and errors so far, as /metrics reports them."""
    counts = dict.fromkeys(("hits", "misses", "errors"), 0.0)
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            for name in counts:
                if sample.name == f"modelgate_cache_{name}_total":
                    counts[name] += sample.value
    return counts


def _cache(harness: Harness) -> PredictionCache:
    cache = harness.state.prediction_cache
    assert cache is not None
    return cache


async def _predict(harness: Harness, key: str, features: list[float]) -> dict[str, object]:
    response = await harness.client.post(
        "/api/v1/predict", json={"features": features}, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    # Writes to Redis go out in the background: let them land before the next request.
    await _cache(harness).drain()
    body: dict[str, object] = response.json()
    return body


async def test_the_cache_lives_on_redis_when_configured_and_in_memory_otherwise(
    harness: Harness,
) -> None:
    backend = _cache(harness).backend
    expected = RedisBackend if harness.backend.redis_url else MemoryBackend
    assert isinstance(backend, expected)


async def test_a_repeated_prediction_is_cached_flagged_and_billed_like_any_other(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    before = cache_counts()

    first = await _predict(harness, key, IRIS_VIRGINICA)
    second = await _predict(harness, key, IRIS_VIRGINICA)

    assert first["cached"] is False
    assert second["cached"] is True
    for field in ("prediction", "probability", "class_name", "model", "model_version"):
        assert second[field] == first[field]
    assert second["prediction_id"] != first["prediction_id"]
    after = cache_counts()
    assert after["hits"] == before["hits"] + 1
    assert after["misses"] == before["misses"] + 1
    # Billed: one unit each, the cached answer included, under its own request id.
    async with harness.sessionmaker() as session:
        records = (
            await session.scalars(select(UsageRecord).where(UsageRecord.tenant_id == tenant.id))
        ).all()
    assert sorted(str(r.request_id) for r in records) == sorted(
        [str(first["prediction_id"]), str(second["prediction_id"])]
    )
    assert [r.units for r in records] == [1, 1]
    usage = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    assert usage.json()["total_units"] == 2


async def test_a_cached_answer_is_refused_whole_once_the_quota_is_spent(
    harness: Harness,
) -> None:
    _, key = await create_tenant_with_key(harness, monthly_quota=1)
    assert (await _predict(harness, key, IRIS_SETOSA))["cached"] is False
    hits = cache_counts()["hits"]

    refused = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )

    assert cache_counts()["hits"] == hits + 1  # the answer was there, and not given
    assert refused.status_code == 429, refused.text
    assert refused.json()["type"] == "quota-exceeded"
    assert "probability" not in refused.text


async def test_one_tenant_never_receives_or_sees_another_tenants_cached_answer(
    harness: Harness,
) -> None:
    tenant_a, key_a = await create_tenant_with_key(harness)
    _, key_b = await create_tenant_with_key(harness)
    features = [5.9, 3.0, 4.2, 1.5]
    # Plant a recognisably false answer under tenant A's entry for these features.
    model = harness.state.registry.get("iris")
    matrix = model.to_matrix([features])
    planted = Prediction(prediction=0, probability=[0.25, 0.25, 0.5], class_name="setosa")
    _cache(harness).put(tenant_a.id, model, matrix, planted)
    await _cache(harness).drain()

    seen_by_a = await _predict(harness, key_a, features)
    seen_by_b = await _predict(harness, key_b, features)

    # A's lookup reads A's entry (so the planted answer proves the cache is consulted)...
    assert seen_by_a["cached"] is True
    assert seen_by_a["probability"] == [0.25, 0.25, 0.5]
    # ...and B, asking the same question, neither gets A's answer nor learns it was asked.
    assert seen_by_b["cached"] is False
    assert seen_by_b["class_name"] == "versicolor"
    assert seen_by_b["probability"] != [0.25, 0.25, 0.5]
    # B's own answer is now cached for B alone.
    assert (await _predict(harness, key_b, features))["cached"] is True
    assert (await _predict(harness, key_a, features))["probability"] == [0.25, 0.25, 0.5]


async def test_the_cache_keys_on_the_feature_values_not_the_json_text(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    first = await harness.client.post(
        "/api/v1/predict",
        content=b'{"features": [5.1, 3.5, 1.4, 0.2]}',
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    await _cache(harness).drain()
    same_values = await harness.client.post(
        "/api/v1/predict",
        content=b'{"features":[5.10,3.50e0,1.400,0.2]}',
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    other_values = await _predict(harness, key, [5.1, 3.5, 1.4, 0.3])

    assert first.json()["cached"] is False
    assert same_values.json()["cached"] is True
    assert other_values["cached"] is False


async def test_batches_are_not_cached(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    await _predict(harness, key, IRIS_SETOSA)
    response = await harness.client.post(
        "/api/v1/predict/batch", json={"instances": [IRIS_SETOSA]}, headers=bearer(key)
    )
    assert response.json()["predictions"][0]["cached"] is False


def test_the_key_changes_with_tenant_version_artifact_features_and_shape(
    served_model_dir: Path,
) -> None:
    registry = ModelRegistry(served_model_dir)
    registry.load()
    model = registry.get("iris")
    cache = PredictionCache(MemoryBackend(60, 10), cache_secret(b"p" * 32))
    tenant = uuid.uuid4()
    matrix = model.to_matrix([IRIS_SETOSA])
    key = cache.key(tenant, model, matrix)
    other_manifest = model.manifest.model_copy(update={"version": "2"})
    other_artifact = model.manifest.model_copy(update={"onnx_sha256": "0" * 64})

    assert cache.key(tenant, model, model.to_matrix([IRIS_SETOSA])) == key
    assert cache.key(uuid.uuid4(), model, matrix) != key
    assert cache.key(tenant, model, model.to_matrix([IRIS_VIRGINICA])) != key
    assert cache.key(tenant, model, matrix.reshape(2, 2)) != key
    for manifest in (other_manifest, other_artifact):
        twin = type(model)(manifest, lambda m: m, model.runtime)
        assert cache.key(tenant, twin, matrix) != key
    # Another deployment's pepper gives other keys; none reveals the features or the tenant.
    assert (
        PredictionCache(MemoryBackend(60, 10), cache_secret(b"q" * 32)).key(tenant, model, matrix)
        != key
    )
    assert str(tenant).encode() not in key


async def test_the_memory_cache_forgets_after_its_ttl_and_keeps_the_most_recent() -> None:
    backend = MemoryBackend(ttl_seconds=0.2, max_entries=2)
    backend.set(b"a", b"1")
    backend.set(b"b", b"2")
    assert await backend.get(b"a") == b"1"  # now the most recently used
    backend.set(b"c", b"3")  # evicts b
    assert await backend.get(b"b") is None
    assert await backend.get(b"a") == b"1"
    await asyncio.sleep(0.3)
    assert await backend.get(b"a") is None
    assert await backend.get(b"c") is None


async def test_an_entry_that_does_not_parse_is_a_miss(served_model_dir: Path) -> None:
    registry = ModelRegistry(served_model_dir)
    registry.load()
    model = registry.get("iris")
    backend = MemoryBackend(60, 10)
    cache = PredictionCache(backend, cache_secret(b"p" * 32))
    tenant = uuid.uuid4()
    matrix = model.to_matrix([IRIS_SETOSA])
    errors = cache_counts()["errors"]
    for junk in (b"not json", b"[7, [0.5, 0.5, 0.0]]", b"[0, [1, 0, 0]]", b"[0, [0.5, 0.5]]"):
        backend.set(cache.key(tenant, model, matrix), junk)
        assert await cache.get(tenant, model, matrix) is None
    assert cache_counts()["errors"] == errors + 4


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_redis_is_a_quick_miss_never_an_error(
    served_model_dir: Path,
) -> None:
    registry = ModelRegistry(served_model_dir)
    registry.load()
    model = registry.get("iris")
    client = aioredis.from_url(
        f"redis://127.0.0.1:{_closed_port()}/0", socket_timeout=0.5, socket_connect_timeout=0.5
    )
    cache = PredictionCache(RedisBackend(client, 60, 0.5), cache_secret(b"p" * 32))
    tenant = uuid.uuid4()
    matrix = model.to_matrix([IRIS_SETOSA])
    errors = cache_counts()["errors"]
    try:
        started = time.monotonic()
        assert await cache.get(tenant, model, matrix) is None
        cache.put(tenant, model, matrix, model.predict([IRIS_SETOSA])[0])
        await cache.drain()
        assert await cache.get(tenant, model, matrix) is None
        assert time.monotonic() - started < 2.0
        assert cache_counts()["errors"] >= errors + 1
    finally:
        await client.aclose()


async def test_a_stalled_redis_costs_a_lookup_at_most_its_timeout(
    private_redis: PrivateRedis,  # noqa: F811
    served_model_dir: Path,
) -> None:
    registry = ModelRegistry(served_model_dir)
    registry.load()
    model = registry.get("iris")
    client = aioredis.from_url(private_redis.url, socket_timeout=5, socket_connect_timeout=5)
    timeout = 0.3
    cache = PredictionCache(RedisBackend(client, 60, timeout), cache_secret(b"p" * 32))
    tenant = uuid.uuid4()
    matrix = model.to_matrix([IRIS_SETOSA])
    try:
        assert await cache.get(tenant, model, matrix) is None  # connected, a plain miss
        private_redis.pause(3.0)
        started = time.monotonic()
        assert await cache.get(tenant, model, matrix) is None
        assert time.monotonic() - started < timeout + 1.0
        # Within the next second the cache does not even ask.
        started = time.monotonic()
        assert await cache.get(tenant, model, matrix) is None
        assert time.monotonic() - started < 0.1
    finally:
        await client.aclose()


async def test_predictions_are_served_while_redis_is_down_in_fail_open_mode(
    private_redis: PrivateRedis,  # noqa: F811
    served_model_dir: Path,
    tmp_path: Path,
) -> None:
    backend = Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", private_redis.url)
    await asyncio.to_thread(upgrade_database, backend.database_url)
    settings = make_settings(
        backend,
        served_model_dir,
        tmp_path,
        redis_timeout_seconds=0.3,
        rate_limit_on_redis_failure="open",
        prediction_cache_ttl_seconds=TTL_SECONDS,
    )
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app)
        assert (await _predict(app, key, IRIS_SETOSA))["cached"] is False
        assert (await _predict(app, key, IRIS_SETOSA))["cached"] is True

        private_redis.stop()
        started = time.monotonic()
        down = await app.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert down.status_code == 200, down.text
        assert down.json()["cached"] is False
        assert time.monotonic() - started < 3.0
