"""SECURITY.md lines 16 and 17: Redis down or slow, or the database down, means 503 with
Retry-After, never a 500 and never a served-but-unbilled prediction; service resumes by itself."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.engine import make_url

from api.cli import upgrade_database
from auth.identity.keys import generate_key
from auth.limits.limiter import RateLimiter
from auth.models import MonthlyUsage, UsageRecord
from tests.conftest import (
    IRIS_SETOSA,
    REQUIRE_SERVICES,
    Backend,
    admin_connection,
    bearer,
    create_tenant_with_key,
    make_settings,
    new_postgres_database,
    running_app,
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own, on a free port, that can be stopped and restarted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def pause(self, seconds: float) -> None:
        """Make the server answer nobody (every command waits) for ``seconds``: a slow Redis,
        as opposed to one that refuses connections."""
        with redis.Redis.from_url(self.url, socket_timeout=2) as client:
            client.execute_command("CLIENT", "PAUSE", str(int(seconds * 1000)), "ALL")


async def _unavailable_refusals(client: httpx.AsyncClient) -> float:
    """The 503 ``service-unavailable`` refusals ``/metrics`` has counted so far."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "modelgate_rejections_total"
        and sample.labels == {"status": "503", "reason": "service-unavailable"}
    )


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A private Redis, stopped at the end of the test whatever happens."""
    if shutil.which("redis-server") is None:
        if REQUIRE_SERVICES:
            pytest.fail(
                "redis-server is not installed (MODELGATE_TEST_REQUIRE_SERVICES=1)", pytrace=False
            )
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(_free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_outage_fails_closed_then_recovers(
    private_redis: PrivateRedis, served_model_dir: Path, tmp_path: Path
) -> None:
    backend = Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", private_redis.url)
    # Alembic's env runs its own event loop: keep it off this one.
    await asyncio.to_thread(upgrade_database, backend.database_url)
    settings = make_settings(backend, served_model_dir, tmp_path, redis_timeout_seconds=0.5)
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app)
        ok = await app.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert ok.status_code == 200

        private_redis.stop()
        refused_before = await _unavailable_refusals(app.client)
        started = time.monotonic()
        down = await app.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert time.monotonic() - started < 2.0
        assert down.status_code == 503, down.text
        assert down.json()["type"] == "service-unavailable"
        assert int(down.headers["Retry-After"]) >= 1
        # Counted as a refusal, as every 401, 403 and 429 is.
        assert await _unavailable_refusals(app.client) == refused_before + 1
        ready = await app.client.get("/api/v1/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"] == "unavailable"
        assert ready.json()["checks"]["database"] == "ok"

        private_redis.start()
        recovered = await app.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert recovered.status_code == 200, recovered.text
        assert (await app.client.get("/api/v1/health/ready")).status_code == 200
        usage = await app.client.get("/api/v1/me/usage", headers=bearer(key))
        assert usage.json()["total_requests"] == 2


async def test_slow_redis_fails_closed_within_the_timeout_then_recovers(
    private_redis: PrivateRedis, served_model_dir: Path, tmp_path: Path
) -> None:
    """Redis that accepts the connection but does not answer (the timeout branch, not a refused
    connection): prediction routes answer 503 with Retry-After after about the configured
    timeout, not after Redis comes back, and serve again by themselves once it does."""
    timeout = 0.5
    backend = Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", private_redis.url)
    await asyncio.to_thread(upgrade_database, backend.database_url)
    settings = make_settings(backend, served_model_dir, tmp_path, redis_timeout_seconds=timeout)
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app)
        ok = await app.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert ok.status_code == 200, ok.text

        pause = 6.0
        private_redis.pause(pause)
        paused_at = time.monotonic()
        for path, payload in (
            ("/api/v1/predict", {"features": IRIS_SETOSA}),
            ("/api/v1/predict/batch", {"instances": [IRIS_SETOSA] * 2}),
        ):
            started = time.monotonic()
            slow = await app.client.post(path, json=payload, headers=bearer(key))
            elapsed = time.monotonic() - started
            assert slow.status_code == 503, slow.text
            assert slow.json()["type"] == "service-unavailable"
            assert int(slow.headers["Retry-After"]) >= 1
            # It waited for Redis (this is the timeout, not a refusal) and no longer than the
            # timeout plus slack for a busy machine: far less than the pause.
            assert timeout * 0.8 <= elapsed <= timeout + 1.0, elapsed
        ready = await app.client.get("/api/v1/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"] == "unavailable"
        assert time.monotonic() - paused_at < pause - 1, "the checks outlasted the pause"

        await asyncio.sleep(max(0.0, paused_at + pause - time.monotonic()) + 0.2)
        recovered = await app.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert recovered.status_code == 200, recovered.text
        assert (await app.client.get("/api/v1/health/ready")).status_code == 200
        usage = await app.client.get("/api/v1/me/usage", headers=bearer(key))
        assert usage.json()["total_requests"] == 2


async def test_database_unreachable_from_the_start_is_503_not_500(
    served_model_dir: Path, tmp_path: Path
) -> None:
    closed_port = _free_port()  # nothing listens there
    backend = Backend(
        "postgres", f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port}/nothing", ""
    )
    settings = make_settings(backend, served_model_dir, tmp_path)
    async with running_app(settings, backend) as app:
        response = await app.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(generate_key())
        )
        assert response.status_code == 503, response.text
        assert response.json()["type"] == "service-unavailable"
        assert "Retry-After" in response.headers
        ready = await app.client.get("/api/v1/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "unavailable"


async def _alter_and_cut_off(database: str, *statements: str) -> None:
    """Run ``statements`` as the test server's superuser, then drop every session on
    ``database`` (the app's pool and the usage writer's own connection), so that the next
    ones start under the new settings."""
    connection = await admin_connection()
    try:
        for statement in statements:
            await connection.execute(statement)
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await connection.close()


@pytest.fixture
def private_postgres(services_problem: str | None) -> Iterator[str]:
    """A migrated Postgres database of this test's own, that it may cut off."""
    if services_problem:
        pytest.skip(services_problem)
    with new_postgres_database() as url:
        upgrade_database(url)
        yield url


async def test_database_failing_at_the_usage_write_is_503_never_2xx_then_recovers(
    private_postgres: str, served_model_dir: Path, tmp_path: Path
) -> None:
    """A valid key, so the request gets all the way to billing: first the database turns
    read-only (reads work, so authentication does; the usage write fails), then it refuses
    every connection. No 2xx, never a 500, nothing billed; then it resumes by itself."""
    database = make_url(private_postgres).database
    assert database is not None
    backend = Backend("postgres", private_postgres, "")
    settings = make_settings(backend, served_model_dir, tmp_path)
    async with running_app(settings, backend) as app:
        tenant, key = await create_tenant_with_key(app, monthly_quota=1000)

        async def predict() -> httpx.Response:
            return await app.client.post(
                "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
            )

        async def batch() -> httpx.Response:
            return await app.client.post(
                "/api/v1/predict/batch",
                json={"instances": [IRIS_SETOSA] * 3},
                headers=bearer(key),
            )

        warm = await predict()
        assert warm.status_code == 200, warm.text

        def assert_refused(responses: list[httpx.Response]) -> None:
            for response in responses:
                assert response.status_code == 503, response.text
                assert response.json()["type"] == "service-unavailable"
                assert "prediction" not in response.json()
                assert "predictions" not in response.json()
                assert int(response.headers["Retry-After"]) >= 1

        # 1. Read-only (a failover to a replica): the key is verified, the usage write fails.
        await _alter_and_cut_off(
            database, f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'
        )
        refused_before = await _unavailable_refusals(app.client)
        read_only = await asyncio.gather(*[predict() for _ in range(6)], batch())
        assert_refused(read_only)
        assert await _unavailable_refusals(app.client) == refused_before + 7
        # It was the usage write that failed (the writer's answer, not authentication's).
        assert {r.json()["detail"] for r in read_only} == {"usage could not be recorded"}
        assert app.state.usage_writer.interrupted_flushes > 0

        # 2. No connection at all.
        await _alter_and_cut_off(
            database, f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false'
        )
        unreachable = await asyncio.gather(*[predict() for _ in range(6)], batch())
        assert_refused(unreachable)
        ready = await app.client.get("/api/v1/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "unavailable"

        # 3. Back: the next request is served and billed, without a restart.
        await _alter_and_cut_off(
            database,
            f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true',
            f'ALTER DATABASE "{database}" RESET default_transaction_read_only',
        )
        recovered = await predict()
        assert recovered.status_code == 200, recovered.text
        assert (await app.client.get("/api/v1/health/ready")).status_code == 200
        async with app.sessionmaker() as session:
            billed = set(
                await session.scalars(
                    select(UsageRecord.request_id).where(UsageRecord.tenant_id == tenant.id)
                )
            )
            counter = await session.scalar(
                select(MonthlyUsage.units).where(MonthlyUsage.tenant_id == tenant.id)
            )
        served = {warm.json()["prediction_id"], recovered.json()["prediction_id"]}
        assert {str(request_id) for request_id in billed} == served
        assert counter == 2


async def test_fail_open_mode_applies_the_fallback_limit_during_an_outage_then_recovers(
    private_redis: PrivateRedis,
    served_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MODELGATE_RATE_LIMIT_ON_REDIS_FAILURE=open: while Redis is down each process applies the
    fallback limit per key in memory (never unlimited, never a 500, never a wait past the
    timeout), readiness stays 200 and names Redis as degraded, the outage is logged once, and
    the key's own limits are back, on Redis, once it returns."""
    backend = Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", private_redis.url)
    await asyncio.to_thread(upgrade_database, backend.database_url)
    settings = make_settings(
        backend,
        served_model_dir,
        tmp_path,
        redis_timeout_seconds=0.5,
        rate_limit_on_redis_failure="open",
        fallback_rate_limit="3/minute",
    )
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app)

        async def predict() -> httpx.Response:
            return await app.client.post(
                "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
            )

        ok = await predict()
        assert ok.status_code == 200, ok.text
        assert ok.headers["X-RateLimit-Limit"] == "1000"

        private_redis.stop()
        caplog.clear()
        statuses = []
        for _ in range(5):
            started = time.monotonic()
            response = await predict()
            assert time.monotonic() - started < 2.0
            statuses.append(response.status_code)
            assert response.headers["X-RateLimit-Limit"] == "3", response.text
        assert statuses == [200, 200, 200, 429, 429]
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["type"] == "rate-limited"
        outage_lines = [r for r in caplog.records if "redis unavailable" in str(r.msg)]
        assert len(outage_lines) == 1, [str(r.msg) for r in caplog.records]
        ready = await app.client.get("/api/v1/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["redis"] == "degraded"

        private_redis.start()
        await asyncio.sleep(1.1)  # the fail-open mode asks Redis again a second after a failure
        recovered = await predict()
        assert recovered.status_code == 200, recovered.text
        assert recovered.headers["X-RateLimit-Limit"] == "1000"
        assert not app.state.rate_limiter.redis_failing
        assert [r for r in caplog.records if "redis available again" in str(r.msg)]
        ready = await app.client.get("/api/v1/health/ready")
        assert ready.json()["checks"]["redis"] == "ok"


async def test_slow_redis_in_fail_open_mode_costs_one_timeout_not_one_per_request(
    private_redis: PrivateRedis, served_model_dir: Path, tmp_path: Path
) -> None:
    """Redis that accepts connections and answers nothing: the first request waits for the
    timeout and is served under the fallback limit; the next ones, for a second, do not ask
    Redis at all."""
    timeout = 0.5
    backend = Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", private_redis.url)
    await asyncio.to_thread(upgrade_database, backend.database_url)
    settings = make_settings(
        backend,
        served_model_dir,
        tmp_path,
        redis_timeout_seconds=timeout,
        rate_limit_on_redis_failure="open",
    )
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app)
        assert (
            await app.client.post(
                "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
            )
        ).status_code == 200
        private_redis.pause(4.0)
        elapsed = []
        for _ in range(3):
            started = time.monotonic()
            response = await app.client.post(
                "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
            )
            elapsed.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
            assert response.headers["X-RateLimit-Limit"] == "20"  # the default fallback
        assert elapsed[0] <= timeout + 1.0, elapsed
        assert max(elapsed[1:]) < timeout * 0.8, elapsed


async def test_fail_open_mode_asks_redis_again_after_the_configured_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MODELGATE_RATE_LIMIT_OPEN_RETRY_SECONDS: after a failed Redis call each limiter serves
    from its fallback without asking Redis until the interval has passed, then asks again; two
    limiters with different intervals, side by side, against a Redis that refuses connections."""
    unreachable = Backend("sqlite", "sqlite+aiosqlite://", f"redis://127.0.0.1:{_free_port()}/0")
    asked: dict[float, int] = {}
    limiters: dict[float, RateLimiter] = {}
    for interval in (0.3, 3.0):
        limiter = RateLimiter(
            make_settings(
                unreachable,
                tmp_path,
                tmp_path,
                rate_limit_on_redis_failure="open",
                rate_limit_open_retry_seconds=interval,
            )
        )
        assert limiter._redis is not None
        run = limiter._redis.pipeline.run
        asked[interval] = 0

        async def counting(keys: Any, args: Any, interval: float = interval, run: Any = run) -> Any:
            asked[interval] += 1
            return await run(keys, args)

        monkeypatch.setattr(limiter._redis.pipeline, "run", counting)
        limiters[interval] = limiter

    async def hit_each() -> None:
        for limiter in limiters.values():
            status = await limiter.hit("retry-key", None)
            assert status.limit == 20  # served under the default fallback limit

    try:
        await hit_each()  # asks, fails, falls back
        await hit_each()  # within both intervals: does not ask
        assert asked == {0.3: 1, 3.0: 1}
        await asyncio.sleep(0.5)
        await hit_each()  # past 0.3 s only
        assert asked == {0.3: 2, 3.0: 1}
        await hit_each()
        assert asked == {0.3: 2, 3.0: 1}
    finally:
        for limiter in limiters.values():
            await limiter.close()
