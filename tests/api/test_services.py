"""The composition root (``api.services.AppState.build``): one Redis connection, shared by every
component that counts on Redis, and closed when the app stops; and what the app's start sets for
the process."""

from __future__ import annotations

import gc
from pathlib import Path

from api.app import YOUNG_COLLECTION_THRESHOLD
from api.inference.cache import RedisBackend
from tests.conftest import Backend, make_settings, only_on, running_app


async def test_the_limiter_and_the_cache_share_the_one_redis_connection(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(backend, served_model_dir, tmp_path, prediction_cache_ttl_seconds=60)
    async with running_app(settings, backend) as app:
        connection, limiter, cache = (
            app.state.redis,
            app.state.rate_limiter,
            app.state.prediction_cache,
        )
        assert connection.uses_redis is bool(backend.redis_url)
        # The limiter counts on the connection's storage (memory without Redis), and its
        # scripts (and the concurrency limit's) go through the connection's client.
        assert limiter.storage is connection.storage
        assert limiter.client is connection.client
        assert cache is not None
        if connection.client is None:
            assert not isinstance(cache.backend, RedisBackend)
        else:
            assert isinstance(cache.backend, RedisBackend)
            assert cache.backend._client is connection.client


@only_on("postgres")  # with Redis; without it there is no connection to close
async def test_stopping_the_app_closes_its_redis_connections(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(backend, served_model_dir, tmp_path)
    async with running_app(settings, backend) as app:
        client = app.state.redis.client
        assert await client.ping()
        pool = client.connection_pool
        assert any(c.is_connected for c in pool._available_connections)
    connections = [*pool._available_connections, *pool._in_use_connections]
    assert connections
    assert not any(c.is_connected for c in connections)


@only_on("sqlite")  # the process's collector, whatever the database
async def test_a_started_app_leaves_the_objects_of_requests_in_flight_to_reference_counting(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    """The young generation's threshold is raised once the app has started (``api.app``):
    Python's default of 700 collected the objects of the requests merely in flight, about 8%
    of a prediction's CPU (docs/performance.md)."""
    settings = make_settings(backend, served_model_dir, tmp_path)
    saved = gc.get_threshold()
    gc.set_threshold(700, *saved[1:])
    try:
        async with running_app(settings, backend):
            assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, *saved[1:])
    finally:
        gc.set_threshold(*saved)
