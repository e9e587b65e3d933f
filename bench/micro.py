"""Micro-benchmarks: the hot-path pieces of an authenticated prediction, each in isolation.

They use the components exactly as a server builds them: ``create_app(settings)`` is created and
its lifespan entered, and the timed calls go to ``app.state.modelgate`` (the authenticator, the
limiter, the session factory, the model registry), against the bench database and Redis.
Each figure is the median over several repeats of the mean time per operation, in microseconds.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text

from api.app import create_app
from api.state import AppState
from auth.keys import has_valid_checksum, key_digest
from auth.limits import RateLimiter
from auth.models import utcnow
from auth.settings import Settings
from auth.usage import UsageEvent, record_usage
from bench import IRIS_ROW
from bench.services import BENCH_RATE_LIMIT, MICRO_LIMITER_IDS, SERVER_LOG_LEVEL, BenchEnvironment

REPEATS = 5
# Each repeat runs for about this long; the iteration count is calibrated per benchmark.
REPEAT_SECONDS = 0.2
MAX_ITERATIONS = 200_000


@dataclass(frozen=True)
class MicroResult:
    """One micro-benchmark's figure (or why it was skipped)."""

    name: str
    description: str
    us_per_op: float | None = None  # median over the repeats
    min_us_per_op: float | None = None
    max_us_per_op: float | None = None
    iterations: int = 0  # per repeat
    repeats: int = 0
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the results file."""
        return asdict(self)


def _calibrate(probe_seconds: float) -> int:
    return max(10, min(MAX_ITERATIONS, int(REPEAT_SECONDS / max(probe_seconds, 1e-9))))


def time_sync(name: str, description: str, operation: Callable[[], object]) -> MicroResult:
    """Time a blocking call."""
    started = time.perf_counter_ns()
    for _ in range(10):
        operation()
    iterations = _calibrate((time.perf_counter_ns() - started) / 10 / 1e9)
    per_op: list[float] = []
    for _ in range(REPEATS):
        started = time.perf_counter_ns()
        for _ in range(iterations):
            operation()
        per_op.append((time.perf_counter_ns() - started) / iterations / 1000)
    return _result(name, description, per_op, iterations)


async def time_async(
    name: str, description: str, operation: Callable[[], Awaitable[object]]
) -> MicroResult:
    """Time an awaited call, one at a time (latency of one operation, not throughput)."""
    started = time.perf_counter_ns()
    for _ in range(10):
        await operation()
    iterations = _calibrate((time.perf_counter_ns() - started) / 10 / 1e9)
    per_op: list[float] = []
    for _ in range(REPEATS):
        started = time.perf_counter_ns()
        for _ in range(iterations):
            await operation()
        per_op.append((time.perf_counter_ns() - started) / iterations / 1000)
    return _result(name, description, per_op, iterations)


def _result(name: str, description: str, per_op: list[float], iterations: int) -> MicroResult:
    return MicroResult(
        name=name,
        description=description,
        us_per_op=round(statistics.median(per_op), 2),
        min_us_per_op=round(min(per_op), 2),
        max_us_per_op=round(max(per_op), 2),
        iterations=iterations,
        repeats=len(per_op),
    )


def bench_settings(env: BenchEnvironment, **overrides: Any) -> Settings:
    """The settings the bench servers run with, as an object."""
    values: dict[str, Any] = {
        "env": "development",
        "database_url": env.env["MODELGATE_DATABASE_URL"],
        "redis_url": env.redis_url,
        "model_dir": env.model_dir,
        "var_dir": env.var_dir,
        "log_level": SERVER_LOG_LEVEL,
    }
    values.update(overrides)
    # As for the servers (bench.services.child_environment): no MODELGATE_* variable of this
    # shell and no .env may change what is measured, so only the values given here count.
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("MODELGATE_")}
    try:
        return Settings(_env_file=None, **values)
    finally:
        os.environ.update(saved)


async def _jwt_for(app: FastAPI, api_key: str) -> tuple[str | None, str]:
    """A JWT from ``POST /auth/token`` (in process), or None and why not."""
    try:
        import httpx
    except ImportError:
        return None, "httpx is not installed (pip install -e '.[dev]')"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        response = await client.post(
            "/api/v1/auth/token",
            data={"grant_type": "client_credentials", "client_secret": api_key},
        )
    if response.status_code in (404, 405):
        return None, "POST /api/v1/auth/token does not exist yet"
    if response.status_code != 200:
        return None, f"POST /api/v1/auth/token answered {response.status_code}"
    token = response.json().get("access_token")
    return (token, "") if isinstance(token, str) else (None, "no access_token in the response")


async def run_micro(env: BenchEnvironment, log: Callable[[str], None]) -> list[MicroResult]:
    """Run every micro-benchmark against the bench database and Redis."""
    settings = bench_settings(env)
    app = create_app(settings)
    results: list[MicroResult] = []

    def add(result: MicroResult) -> None:
        results.append(result)
        figure = f"{result.us_per_op:.1f} µs/op" if result.us_per_op is not None else "skipped"
        log(f"  micro {result.name:<24} {figure}")

    async with app.router.lifespan_context(app):
        state: AppState = app.state.modelgate
        key = env.api_key
        pepper = state.secrets.key_pepper

        add(
            time_sync(
                "key.checksum", "has_valid_checksum (no I/O)", lambda: has_valid_checksum(key)
            )
        )
        add(
            time_sync(
                "key.digest",
                "key_digest: HMAC-SHA256 with the pepper",
                lambda: key_digest(pepper, key),
            )
        )

        async def select_one() -> None:
            async with state.sessionmaker() as session:
                await session.execute(text("SELECT 1"))

        # The floor under every database step below: a pooled session and one round trip.
        add(await time_async("db.select1", "session + SELECT 1 (the per-query floor)", select_one))
        add(
            await time_async(
                "key.authenticate",
                "KeyAuthenticator.authenticate: checksum, digest, Postgres lookup",
                lambda: state.authenticator.authenticate(key),
            )
        )
        subject = await state.authenticator.authenticate(key)

        token, why_not = await _jwt_for(app, key)
        if token is None:
            add(MicroResult("jwt.verify", "JWT verification", skipped=why_not))
        else:
            try:
                await state.authenticator.authenticate(token)
            except Exception as exc:
                add(
                    MicroResult(
                        "jwt.verify",
                        "JWT verification",
                        skipped=f"authenticator refused the JWT ({type(exc).__name__})",
                    )
                )
            else:
                add(
                    await time_async(
                        "jwt.verify",
                        "authenticator.authenticate with a JWT from /auth/token",
                        lambda: state.authenticator.authenticate(token),
                    )
                )

        limiter_id = f"bench-micro-{uuid.uuid4()}"
        MICRO_LIMITER_IDS.append(limiter_id)
        add(
            await time_async(
                "limiter.hit.redis",
                "RateLimiter.hit on Redis (hit + window stats)",
                lambda: state.rate_limiter.hit(limiter_id, BENCH_RATE_LIMIT),
            )
        )
        memory_limiter = RateLimiter(bench_settings(env, redis_url=""))
        try:
            add(
                await time_async(
                    "limiter.hit.memory",
                    "RateLimiter.hit in process memory",
                    lambda: memory_limiter.hit(limiter_id, BENCH_RATE_LIMIT),
                )
            )
        finally:
            await memory_limiter.close()

        tenant = subject.require_tenant()

        async def write_usage() -> None:
            async with state.sessionmaker() as session:
                event = UsageEvent(
                    request_id=uuid.uuid4(),
                    tenant_id=tenant.id,
                    api_key_id=subject.key_id,
                    model="iris",
                    model_version="1",
                    units=1,
                    status_code=200,
                    latency_ms=1.0,
                    created_at=utcnow(),
                )
                await record_usage(session, event, tenant.monthly_quota)
                await session.commit()

        add(
            await time_async(
                "usage.write", "record_usage + commit on Postgres (own session)", write_usage
            )
        )

        model = state.registry.get("iris")
        one = [IRIS_ROW]
        ten = [IRIS_ROW] * 10
        add(time_sync("model.predict.1", "LoadedModel.predict, 1 row", lambda: model.predict(one)))
        add(
            time_sync(
                "model.predict.10", "LoadedModel.predict, 10 rows", lambda: model.predict(ten)
            )
        )
        add(
            await time_async(
                "model.predict_async.1",
                "LoadedModel.predict_async, 1 row (with the thread hop)",
                lambda: model.predict_async(one),
            )
        )
    return results


def run_micro_sync(env: BenchEnvironment, log: Callable[[str], None]) -> list[MicroResult]:
    """``run_micro`` on uvloop when it is installed (as uvicorn would use), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_micro(env, log))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_micro(env, log))
