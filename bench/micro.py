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
from dataclasses import asdict, dataclass, replace
from typing import Any

import joblib
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.app import create_app
from api.cli import upgrade_database
from api.inference.cache import MemoryBackend, PredictionCache, RedisBackend, cache_secret
from api.services import AppState
from auth.audit import Actor
from auth.db import create_engine, create_sessionmaker
from auth.identity.keys import has_valid_checksum, issue_tenant_key, key_digest
from auth.identity.tokens import verify_token
from auth.limits.limiter import RateLimiter
from auth.models import utcnow
from auth.settings import Settings
from auth.tenants import create_tenant
from auth.usage.ledger import UsageEvent
from auth.usage.writer import INSERT_RECORDS, RECORD_COLUMNS, UsageWriter
from bench import IRIS_ROW
from bench.services import BENCH_RATE_LIMIT, MICRO_LIMITER_IDS, SERVER_LOG_LEVEL, BenchEnvironment
from ml import LoadedModel
from ml.batching import BatchPolicy

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
    # This process's CPU per operation (median): what an operation that waits on Postgres or
    # Redis costs the worker, as its wall time (us_per_op) does not say.
    cpu_us_per_op: float | None = None

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
    cpu_per_op: list[float] = []
    for _ in range(REPEATS):
        started, cpu_started = time.perf_counter_ns(), time.process_time_ns()
        for _ in range(iterations):
            operation()
        per_op.append((time.perf_counter_ns() - started) / iterations / 1000)
        cpu_per_op.append((time.process_time_ns() - cpu_started) / iterations / 1000)
    return _result(name, description, per_op, iterations, cpu_per_op)


async def time_async(
    name: str, description: str, operation: Callable[[], Awaitable[object]]
) -> MicroResult:
    """Time an awaited call, one at a time (latency of one operation, not throughput)."""
    started = time.perf_counter_ns()
    for _ in range(10):
        await operation()
    iterations = _calibrate((time.perf_counter_ns() - started) / 10 / 1e9)
    per_op: list[float] = []
    cpu_per_op: list[float] = []
    for _ in range(REPEATS):
        started, cpu_started = time.perf_counter_ns(), time.process_time_ns()
        for _ in range(iterations):
            await operation()
        per_op.append((time.perf_counter_ns() - started) / iterations / 1000)
        cpu_per_op.append((time.process_time_ns() - cpu_started) / iterations / 1000)
    return _result(name, description, per_op, iterations, cpu_per_op)


async def time_amortized(
    name: str,
    description: str,
    operation: Callable[[], Awaitable[object]],
    concurrency: int = 64,
) -> MicroResult:
    """Time ``concurrency`` concurrent calls and report the time per call: what batching
    (a shared pipeline or commit) costs each request under load."""

    async def gathered() -> None:
        await asyncio.gather(*(operation() for _ in range(concurrency)))

    return _scaled(await time_async(name, description, gathered), concurrency)


async def time_concurrent(
    name: str,
    description: str,
    operation: Callable[[], Awaitable[object]],
    concurrency: int = 64,
    repeats: int = 3,
) -> MicroResult:
    """Time ``concurrency`` concurrent calls a few times (after one warm-up round), per call:
    for operations too slow for :func:`time_amortized`'s calibration (scikit-learn)."""
    await asyncio.gather(*(operation() for _ in range(concurrency)))
    per_op: list[float] = []
    cpu_per_op: list[float] = []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter_ns(), time.process_time_ns()
        await asyncio.gather(*(operation() for _ in range(concurrency)))
        per_op.append((time.perf_counter_ns() - started) / concurrency / 1000)
        cpu_per_op.append((time.process_time_ns() - cpu_started) / concurrency / 1000)
    return _result(name, description, per_op, concurrency, cpu_per_op)


def _sklearn_runtime(model: LoadedModel, env: BenchEnvironment) -> LoadedModel:
    """The served version on scikit-learn (its verified pickle), for comparison."""
    version_dir = env.model_dir / model.name / model.version
    estimator = joblib.load(version_dir / model.manifest.artifact)
    return LoadedModel(model.manifest, estimator.predict_proba, "sklearn")


def _result(
    name: str, description: str, per_op: list[float], iterations: int, cpu_per_op: list[float]
) -> MicroResult:
    return MicroResult(
        name=name,
        description=description,
        us_per_op=round(statistics.median(per_op), 2),
        min_us_per_op=round(min(per_op), 2),
        max_us_per_op=round(max(per_op), 2),
        iterations=iterations,
        repeats=len(per_op),
        cpu_us_per_op=round(statistics.median(cpu_per_op), 2),
    )


def _scaled(result: MicroResult, operations: int) -> MicroResult:
    """``result`` (measured per group of ``operations``) per operation."""

    def per(value: float | None) -> float | None:
        return None if value is None else round(value / operations, 2)

    return replace(
        result,
        us_per_op=per(result.us_per_op),
        min_us_per_op=per(result.min_us_per_op),
        max_us_per_op=per(result.max_us_per_op),
        cpu_us_per_op=per(result.cpu_us_per_op),
        iterations=result.iterations * operations,
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
                "KeyAuthenticator.authenticate, cached (the steady state)",
                lambda: state.authenticator.authenticate(key),
            )
        )

        async def uncached() -> object:
            state.authenticator.forget()
            return await state.authenticator.authenticate(key)

        add(
            await time_async(
                "key.authenticate.miss",
                "KeyAuthenticator.authenticate, cache miss: Postgres lookup (once a second)",
                uncached,
            )
        )
        subject = await state.authenticator.authenticate(key)

        token, why_not = await _jwt_for(app, key)
        if token is None:
            add(MicroResult("jwt.authenticate", "JWT verification", skipped=why_not))
        else:
            try:
                await state.authenticator.authenticate(token)
            except Exception as exc:
                add(
                    MicroResult(
                        "jwt.authenticate",
                        "JWT verification",
                        skipped=f"authenticator refused the JWT ({type(exc).__name__})",
                    )
                )
            else:
                add(
                    time_sync(
                        "jwt.verify_token",
                        "verify_token alone: header, kid, HS256 signature, claims (no I/O)",
                        lambda: verify_token(state.tokens, token),
                    )
                )
                add(
                    await time_async(
                        "jwt.authenticate",
                        "authenticator.authenticate with a JWT, cached (the steady state)",
                        lambda: state.authenticator.authenticate(token),
                    )
                )

                async def token_uncached() -> object:
                    state.authenticator.forget()
                    return await state.authenticator.authenticate(token)

                add(
                    await time_async(
                        "jwt.authenticate.miss",
                        "authenticator.authenticate with a JWT, cache miss: one joined lookup",
                        token_uncached,
                    )
                )

        limiter_id = f"bench-micro-{uuid.uuid4()}"
        MICRO_LIMITER_IDS.append(limiter_id)
        # The per-request check (leases off, as for a key that is not leased), then the app's
        # limiter, which leases the bench key's permits (auth.limits.leases).
        per_request = RateLimiter(bench_settings(env, rate_limit_lease_max=0))
        try:
            add(
                await time_async(
                    "limiter.hit.redis",
                    f"RateLimiter.hit on Redis, one round trip ({settings.rate_limit_strategy})",
                    lambda: per_request.hit(limiter_id, BENCH_RATE_LIMIT),
                )
            )
            add(
                await time_amortized(
                    "limiter.hit.redis.x64",
                    "the same, 64 concurrent checks (one pipeline), per check",
                    lambda: per_request.hit(limiter_id, BENCH_RATE_LIMIT),
                )
            )
            stacked = ";".join((BENCH_RATE_LIMIT, "1000000000/hour", "1000000000/day"))
            add(
                await time_async(
                    "limiter.hit.redis.3limits",
                    "RateLimiter.hit on Redis with three limits, tested then counted in one script",
                    lambda: per_request.hit(limiter_id, stacked),
                )
            )
        finally:
            await per_request.close()
        leased_id = f"bench-micro-{uuid.uuid4()}"
        MICRO_LIMITER_IDS.append(leased_id)
        add(
            await time_amortized(
                "limiter.hit.leased.x64",
                "RateLimiter.hit of a busy key, 64 concurrent: permits leased in blocks of up to "
                "64, one round trip per block (auth.limits.leases), per check",
                lambda: state.rate_limiter.hit(leased_id, BENCH_RATE_LIMIT),
            )
        )

        async def in_flight() -> None:
            # The slot is taken by the rate-limit check, in its round trip (RateLimiter.hit).
            slot = state.concurrency.slot(limiter_id, 1_000_000)
            await state.rate_limiter.hit(limiter_id, BENCH_RATE_LIMIT, slot=slot)
            await slot.release()

        add(
            await time_async(
                "concurrency.redis",
                "RateLimiter.hit taking a concurrency slot, then the slot given back (two round "
                "trips; only for keys with max_in_flight)",
                in_flight,
            )
        )
        for strategy in ("moving-window", "fixed-window"):
            other = RateLimiter(
                bench_settings(env, rate_limit_strategy=strategy, rate_limit_lease_max=0)
            )
            other_id = f"bench-micro-{uuid.uuid4()}"
            MICRO_LIMITER_IDS.append(other_id)
            try:
                add(
                    await time_async(
                        f"limiter.hit.redis.{strategy}",
                        f"RateLimiter.hit on Redis with {strategy} (limit {BENCH_RATE_LIMIT})",
                        lambda other=other, other_id=other_id: other.hit(  # type: ignore[misc]
                            other_id, BENCH_RATE_LIMIT
                        ),
                    )
                )
            finally:
                await other.close()
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

        key_id = subject.require_key_id()

        def usage_event() -> UsageEvent:
            return _usage_event(tenant.id, key_id, tenant.plan_id)

        writer = state.usage_writer
        add(
            await time_async(
                "usage.write",
                "UsageWriter.charge alone: one record, its quota update and commit",
                lambda: writer.charge(usage_event(), tenant.monthly_quota),
            )
        )
        add(
            await time_amortized(
                "usage.write.x64",
                "the same, 64 concurrent requests (group commit), per record",
                lambda: writer.charge(usage_event(), tenant.monthly_quota),
            )
        )

        for result in await _record_inserts(state.engine, tenant.id, key_id, tenant.plan_id):
            add(result)

        for mode in ("NORMAL", "FULL"):
            for result in await _sqlite_usage_writes(env, mode):
                add(result)

        model = state.registry.get("iris")
        one = [IRIS_ROW]
        ten = [IRIS_ROW] * 10
        add(
            time_sync(
                "model.predict.1",
                f"LoadedModel.predict, 1 row ({model.runtime})",
                lambda: model.predict(one),
            )
        )
        add(
            time_sync(
                "model.predict.10",
                f"LoadedModel.predict, 10 rows ({model.runtime})",
                lambda: model.predict(ten),
            )
        )
        add(
            await time_async(
                "model.predict_async.1",
                f"LoadedModel.predict_async, 1 row ({model.runtime}: inline)",
                lambda: model.predict_async(one),
            )
        )
        add(
            await time_async(
                "model.predict_thread.1",
                f"LoadedModel.predict in a thread, 1 row ({model.runtime}: the hop it avoids)",
                lambda: asyncio.to_thread(model.predict, one),
            )
        )
        sklearn_model = _sklearn_runtime(model, env)
        add(
            time_sync(
                "model.predict.sklearn.1",
                "the same version on scikit-learn, 1 row",
                lambda: sklearn_model.predict(one),
            )
        )
        add(
            time_sync(
                "model.predict.sklearn.10",
                "the same version on scikit-learn, 10 rows",
                lambda: sklearn_model.predict(ten),
            )
        )
        for result in await _batching_and_cache(state, model, sklearn_model, tenant.id):
            add(result)
        for result in await _http_stack(app, key):
            add(result)
    return results


async def _asgi_request(
    app: Any, method: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> int:
    """One request straight through an ASGI app, no socket and no HTTP client (whose own CPU
    would be counted): its status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    sent = False
    # After the body, the client stays: receive() waits, as a server's does.
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _http_stack(app: FastAPI, key: str) -> list[MicroResult]:
    """The CPU a request costs inside the ASGI app, 64 concurrent, without uvicorn's share
    (what the load cells' server µs per request add to these is the server's): the echo app,
    modelgate's stack with a route that does nothing (middlewares, routing), and ``/predict``
    (the same plus the route class, dependencies, credential, limit, inference and billing)."""
    from bench.echo_app import app as echo_app

    body = b'{"features": [5.1, 3.5, 1.4, 0.2]}'
    json_headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    with_key = [*json_headers, (b"authorization", f"Bearer {key}".encode())]
    cells = [
        (
            "http.echo.x64",
            "the echo app's POST /echo in process, 64 concurrent",
            echo_app,
            "POST",
            "/echo",
            body,
            json_headers,
        ),
        (
            "http.live.x64",
            "modelgate's GET /api/v1/health/live in process, 64 concurrent",
            app,
            "GET",
            "/api/v1/health/live",
            b"",
            [(b"host", b"bench")],
        ),
        (
            "http.predict.x64",
            "modelgate's POST /api/v1/predict in process, 64 concurrent",
            app,
            "POST",
            "/api/v1/predict",
            body,
            with_key,
        ),
    ]
    results = []
    for name, description, target, method, path, payload, headers in cells:
        status = await _asgi_request(target, method, path, payload, headers)
        if status != 200:
            results.append(MicroResult(name, description, skipped=f"answered {status}"))
            continue

        def one(
            t: Any = target,
            m: str = method,
            p: str = path,
            b: bytes = payload,
            h: list[tuple[bytes, bytes]] = headers,
        ) -> Awaitable[int]:
            return _asgi_request(t, m, p, b, h)

        results.append(await time_amortized(name, description, one))
    return results


async def _batching_and_cache(
    state: AppState, model: LoadedModel, sklearn_model: LoadedModel, tenant_id: uuid.UUID
) -> list[MicroResult]:
    """Micro-batching (ONNX and scikit-learn, 64 concurrent single rows, per request) and the
    prediction cache's hit (Redis and memory) against the ONNX prediction it replaces."""
    one = [IRIS_ROW]
    policy = state.batching  # the server's default: MODELGATE_BATCH_MAX_SIZE, _MAX_WAIT_MS
    wait_ms = policy.max_wait_seconds * 1000
    # The ONNX session's function behind the batcher, as scikit-learn's would be.
    onnx_batched = LoadedModel(model.manifest, model._predict_proba, "sklearn")
    onnx_policy = BatchPolicy(max_size=64, max_wait_seconds=policy.max_wait_seconds)
    results = [
        await time_amortized(
            "model.onnx.x64.direct",
            "64 concurrent 1-row predict_async on ONNX (inline, one call per loop turn), "
            "per request",
            lambda: model.predict_async(one),
        ),
        await time_amortized(
            "model.onnx.x64.batcher",
            f"the same through the micro-batcher (a thread, up to 64 rows, {wait_ms:g} ms "
            "wait), per request",
            lambda: onnx_batched.predict_async(one, onnx_policy),
        ),
        await time_concurrent(
            "model.sklearn.x64.direct",
            "64 concurrent 1-row predict_async on scikit-learn, one call each, per request",
            lambda: sklearn_model.predict_async(one),
        ),
        await time_concurrent(
            "model.sklearn.x64.batched",
            f"the same micro-batched (up to {policy.max_size} rows, {wait_ms:g} ms wait), "
            "per request",
            lambda: sklearn_model.predict_async(one, policy),
        ),
    ]
    secret = cache_secret(state.secrets.key_pepper)
    timeout = state.settings.redis_timeout_seconds
    matrix = model.to_matrix(one)
    answer = model.predict(one)[0]
    for label, backend in (
        ("redis", RedisBackend(state.redis.client, 60, timeout)),
        ("memory", MemoryBackend(60, 1000)),
    ):
        cache = PredictionCache(backend, secret)
        cache.put(tenant_id, model, matrix, answer)
        await cache.drain()
        results.append(
            await time_async(
                f"cache.{label}.hit",
                f"PredictionCache.get, a hit ({label}): key HMAC, lookup, decode",
                lambda cache=cache: cache.get(tenant_id, model, matrix),  # type: ignore[misc]
            )
        )
    return results


def _usage_event(tenant_id: uuid.UUID, key_id: uuid.UUID, plan_id: uuid.UUID) -> UsageEvent:
    """One billable prediction of the bench tenant, now."""
    return UsageEvent(
        request_id=uuid.uuid4(),
        tenant_id=tenant_id,
        api_key_id=key_id,
        model="iris",
        model_version="1",
        plan_id=plan_id,
        units=1,
        status_code=200,
        latency_ms=1.0,
        created_at=utcnow(),
    )


# A flush's records in one statement: as many as 64 concurrent requests hand the writer.
FLUSH_ROWS = 64


async def _record_inserts(
    engine: AsyncEngine, tenant_id: uuid.UUID, key_id: uuid.UUID, plan_id: uuid.UUID
) -> list[MicroResult]:
    """How the usage writer's flush could insert its records on Postgres (issue 21: the writer's
    client CPU): the prepared INSERT it sends through ``executemany`` today against COPY
    (asyncpg's ``copy_records_to_table``), 64 rows in a transaction rolled back each time, per
    row (the BEGIN and ROLLBACK, the same for both, included)."""
    if engine.dialect.name != "postgresql":
        return []

    def rows() -> list[tuple[Any, ...]]:
        now = utcnow()
        return [
            (uuid.uuid4(), tenant_id, key_id, "iris", "1", plan_id, 1, 200, 1.0, now)
            for _ in range(FLUSH_ROWS)
        ]

    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection

        async def rolled_back(write: Callable[[list[tuple[Any, ...]]], Awaitable[object]]) -> None:
            transaction = driver.transaction()
            await transaction.start()
            try:
                await write(rows())
            finally:
                await transaction.rollback()

        results = [
            await time_async(
                "usage.insert.executemany.x64",
                "a flush's 64 usage records as the writer inserts them (prepared INSERT, "
                "executemany), per record",
                lambda: rolled_back(lambda batch: driver.executemany(INSERT_RECORDS, batch)),
            ),
            await time_async(
                "usage.insert.copy.x64",
                "the same 64 records by COPY (copy_records_to_table), per record",
                lambda: rolled_back(
                    lambda batch: driver.copy_records_to_table(
                        "usage_record", records=batch, columns=RECORD_COLUMNS
                    )
                ),
            ),
        ]
    return [_scaled(result, FLUSH_ROWS) for result in results]


async def _sqlite_usage_writes(env: BenchEnvironment, synchronous: str) -> list[MicroResult]:
    """The usage writer on the embedded default (a SQLite file in the bench's work directory),
    with the given ``PRAGMA synchronous``: what durability of each commit costs (FULL is the
    product's setting; NORMAL can lose the last commits to an operating-system crash)."""
    url = f"sqlite+aiosqlite:///{env.workdir / f'usage-{synchronous.lower()}.db'}"
    await asyncio.to_thread(upgrade_database, url)
    engine = create_engine(url, sqlite_synchronous=synchronous)
    actor = Actor(name="bench")
    try:
        async with create_sessionmaker(engine)() as session:
            tenant = await create_tenant(session, actor, name=f"bench-{uuid.uuid4()}")
            key = await issue_tenant_key(
                session, b"bench-pepper", actor, tenant_id=tenant.id, name="bench"
            )
            await session.commit()
        writer = UsageWriter(engine)
        writer.start()

        def event() -> UsageEvent:
            return _usage_event(tenant.id, key.id, tenant.plan_id)

        name = f"usage.write.sqlite.{synchronous.lower()}"
        try:
            return [
                await time_async(
                    name,
                    f"UsageWriter.charge alone on SQLite, synchronous={synchronous}",
                    lambda: writer.charge(event(), None),
                ),
                await time_amortized(
                    f"{name}.x64",
                    "the same, 64 concurrent requests (group commit), per record",
                    lambda: writer.charge(event(), None),
                ),
            ]
        finally:
            await writer.close()
    finally:
        await engine.dispose()


def run_micro_sync(env: BenchEnvironment, log: Callable[[str], None]) -> list[MicroResult]:
    """``run_micro`` on uvloop when it is installed (as uvicorn would use), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_micro(env, log))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_micro(env, log))
