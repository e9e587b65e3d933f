"""What the benchmark stands up: a fresh database, the model, a tenant and its key, and the
server processes (``modelgate serve`` and the bare echo app), always torn down again."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import redis.asyncio as aioredis
from sqlalchemy import delete, select, text
from sqlalchemy.engine import URL, make_url

from auth.db import create_engine
from auth.limits.plans import MAX_MONTHLY_QUOTA
from auth.models import ApiKey, MonthlyUsage, Tenant, UsageDaily, UsageRecord
from auth.usage.ledger import UsageEvent
from auth.usage.writer import UsageWriter
from bench import ROOT, BenchError
from ml.manifest import ACTIVE_FILE, MANIFEST_FILE, read_manifest, write_manifest

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
# Redis database 15, not 0: the test suite's workers use databases 0 and up on the same Redis, and
# a client address's failed-credential count lives there, so tests that present bad credentials
# from 127.0.0.1 while the bench runs had its server answer 429 auth-throttled.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
# Servers under load log at WARNING: one JSON line per request would otherwise cost more CPU than
# some of the routes being measured.
SERVER_LOG_LEVEL = "WARNING"
# A limit no benchmark run can reach, so that the limiter is checked on every request (as in
# production) but never refuses one.
BENCH_RATE_LIMIT = "100000000/minute"
# Likewise a monthly quota that is checked on every request but never reached (the largest a
# tenant may have).
BENCH_MONTHLY_QUOTA = MAX_MONTHLY_QUOTA
HOST = "127.0.0.1"
# The default model again, served by scikit-learn (no ONNX file): what micro-batching is for.
SKLEARN_MODEL = "iris-sklearn"
CONNECT_TIMEOUT_SECONDS = 5.0
# Limiter ids the micro-benchmarks count against, registered so that cleanup can find them.
MICRO_LIMITER_IDS: list[str] = []


@dataclass(frozen=True)
class BenchDatabase:
    """The Postgres server named by the URL, and the throwaway database made on it."""

    admin_url: URL  # the database named by MODELGATE_BENCH_DATABASE_URL (left untouched)
    url: URL  # ``<name>_bench`` on the same server

    @property
    def name(self) -> str:
        """The bench database's name."""
        return str(self.url.database)


def resolve_database(raw_url: str) -> BenchDatabase:
    """Parse the configured URL (``postgresql://`` is accepted) into the admin and bench URLs."""
    url = make_url(raw_url)
    if url.get_backend_name() != "postgresql":
        raise BenchError(
            f"MODELGATE_BENCH_DATABASE_URL must be a Postgres URL, got {url.drivername}"
        )
    url = url.set(drivername="postgresql+asyncpg")
    admin_db = url.database or "postgres"
    return BenchDatabase(admin_url=url, url=url.set(database=f"{admin_db}_bench"))


async def _pg_connect(url: URL, database: str | None = None) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        database=database or url.database,
        timeout=CONNECT_TIMEOUT_SECONDS,
    )


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def check_postgres(database: BenchDatabase) -> str:
    """Connect to the configured database; returns the server version, or raises ``BenchError``."""
    where = f"{database.admin_url.host}:{database.admin_url.port or 5432}"
    try:
        connection = await _pg_connect(database.admin_url)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise BenchError(
            f"Postgres is not reachable at {where} ({type(exc).__name__}: {exc}); start it or set "
            "MODELGATE_BENCH_DATABASE_URL"
        ) from None
    try:
        version: str = await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()
    return version


async def check_redis(url: str) -> str:
    """PING Redis; returns its version, or raises ``BenchError``."""
    client = aioredis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        await client.ping()
        info = await client.info("server")
    except Exception as exc:  # redis-py's errors do not share one base with OSError
        raise BenchError(
            f"Redis is not reachable at {url} ({type(exc).__name__}: {exc}); start it or set "
            "MODELGATE_BENCH_REDIS_URL"
        ) from None
    finally:
        await client.aclose()
    return str(info.get("redis_version", "?"))


async def create_database(database: BenchDatabase) -> None:
    """Drop the bench database if a previous run left it, and create it empty."""
    connection = await _pg_connect(database.admin_url)
    try:
        name = _quote_ident(database.name)
        # FORCE (Postgres 13+) ends the sessions of a server that a killed run left behind.
        await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await connection.execute(f"CREATE DATABASE {name}")
    finally:
        await connection.close()


async def drop_database(database: BenchDatabase) -> None:
    """Drop the bench database."""
    connection = await _pg_connect(database.admin_url)
    try:
        await connection.execute(
            f"DROP DATABASE IF EXISTS {_quote_ident(database.name)} WITH (FORCE)"
        )
    finally:
        await connection.close()


@dataclass
class BenchEnvironment:
    """Everything one run set up; ``env`` is the environment every child process gets."""

    database: BenchDatabase
    redis_url: str
    workdir: Path
    env: dict[str, str]
    api_key: str = ""
    tenant_id: str = ""

    @property
    def model_dir(self) -> Path:
        """Where ``modelgate models train`` put the default model."""
        return self.workdir / "models"

    @property
    def var_dir(self) -> Path:
        """Where the development secrets (key pepper, JWT secret) were generated."""
        return self.workdir / "var"


def child_environment(database_url: str, redis_url: str, workdir: Path) -> dict[str, str]:
    """The environment for the CLI and the servers: this process's, minus every other
    ``MODELGATE_*`` setting (so a developer's shell or ``.env`` cannot skew a run), plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELGATE_")}
    env.update(
        {
            "MODELGATE_ENV": "development",
            "MODELGATE_DATABASE_URL": database_url,
            "MODELGATE_REDIS_URL": redis_url,
            "MODELGATE_MODEL_DIR": str(workdir / "models"),
            "MODELGATE_VAR_DIR": str(workdir / "var"),
            "MODELGATE_LOG_LEVEL": SERVER_LOG_LEVEL,
            # The project need not be installed: children import it from the checkout.
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        }
    )
    return env


def modelgate_cli(env: BenchEnvironment, *args: str, timeout: float = 180) -> str:
    """Run ``modelgate ARGS`` (as ``python -m api.cli``, the same code) and return its stdout."""
    argv = [sys.executable, "-m", "api.cli", *args]
    completed = subprocess.run(
        argv,
        env=env.env,
        cwd=env.workdir,  # no stray .env from the checkout is read
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        lines = (completed.stderr or completed.stdout).strip().splitlines()
        raise BenchError(
            f"`modelgate {' '.join(args[:2])}` failed: {lines[-1] if lines else 'no output'}"
        )
    return completed.stdout


def provision(env: BenchEnvironment) -> None:
    """Migrate the fresh database, train the default model, create the tenant and its key."""
    modelgate_cli(env, "db", "upgrade")
    modelgate_cli(env, "models", "train")
    register_sklearn_copy(env.model_dir)
    tenant = json.loads(
        modelgate_cli(
            env,
            "tenants",
            "create",
            "--name",
            "bench",
            "--rate-limit",
            BENCH_RATE_LIMIT,
            "--monthly-quota",
            str(BENCH_MONTHLY_QUOTA),
        )
    )
    env.tenant_id = tenant["id"]
    output = modelgate_cli(
        env, "keys", "issue", "--tenant", env.tenant_id, "--scopes", "predict,usage:read"
    )
    env.api_key = output.strip().splitlines()[-1]


def register_sklearn_copy(model_dir: Path) -> None:
    """Register the trained ``iris`` version again as ``SKLEARN_MODEL`` version 1 without its
    ONNX file, so that scikit-learn serves it (the pickle and its hash are unchanged)."""
    source = model_dir / "iris" / "1"
    target = model_dir / SKLEARN_MODEL / "1"
    target.mkdir(parents=True)
    manifest = read_manifest(source / MANIFEST_FILE)
    shutil.copyfile(source / manifest.artifact, target / manifest.artifact)
    write_manifest(
        target / MANIFEST_FILE,
        manifest.model_copy(
            update={"name": SKLEARN_MODEL, "onnx_artifact": None, "onnx_sha256": None}
        ),
    )
    (model_dir / SKLEARN_MODEL / ACTIVE_FILE).write_text("1\n")


@contextlib.contextmanager
def bench_environment(database_url: str, redis_url: str) -> Iterator[BenchEnvironment]:
    """Create the database and the provisioned tenant; drop the database and delete this run's
    Redis keys on the way out, whatever happened."""
    database = resolve_database(database_url)
    with tempfile.TemporaryDirectory(prefix="modelgate-bench-") as tmp:
        workdir = Path(tmp)
        env = BenchEnvironment(
            database=database,
            redis_url=redis_url,
            workdir=workdir,
            env=child_environment(
                database.url.render_as_string(hide_password=False), redis_url, workdir
            ),
        )
        asyncio.run(create_database(database))
        try:
            provision(env)
            yield env
        finally:
            with contextlib.suppress(Exception):
                asyncio.run(_delete_redis_keys(env))
            asyncio.run(drop_database(database))


async def _delete_redis_keys(env: BenchEnvironment) -> None:
    """Delete the limiter keys of this run's API keys only: the Redis DB may be shared."""
    ids = [str(key_id) for key_id in await _api_key_ids(env)]
    ids.extend(MICRO_LIMITER_IDS)
    client = aioredis.from_url(env.redis_url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        for key_id in ids:
            async for name in client.scan_iter(match=f"*{key_id}*", count=1000):
                await client.delete(name)
    finally:
        await client.aclose()


async def _api_key_ids(env: BenchEnvironment) -> list[uuid.UUID]:
    engine = create_engine(env.database.url.render_as_string(hide_password=False))
    try:
        async with engine.connect() as connection:
            return list((await connection.scalars(select(ApiKey.id))).all())
    finally:
        await engine.dispose()


async def seed_usage(env: BenchEnvironment, records: int) -> int:
    """Replace the usage of the bench with ``records`` synthetic records of the bench tenant,
    spread over the current month, so that ``/me/usage`` reads the same amount of data in every
    run whatever the prediction runs before it wrote. They are written through the usage
    writer's own transaction (records, counters and the daily rollups the reports read).
    Returns the number of records seeded."""
    engine = create_engine(env.database.url.render_as_string(hide_password=False))
    try:
        tenant_id = uuid.UUID(env.tenant_id)
        async with engine.begin() as connection:
            key_id = await connection.scalar(
                select(ApiKey.id).where(ApiKey.tenant_id == tenant_id).limit(1)
            )
            plan_id = await connection.scalar(select(Tenant.plan_id).where(Tenant.id == tenant_id))
            if key_id is None:
                raise BenchError("the bench tenant's key is missing from the database")
            for table in (UsageRecord, UsageDaily, MonthlyUsage):
                await connection.execute(delete(table))
        now = datetime.now(UTC)
        first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        span = max(1.0, (now - first).total_seconds())
        rng = random.Random(0)  # noqa: S311 (synthetic data, not security)
        writer = UsageWriter(engine)
        for start in range(0, records, 5000):
            await writer.write_unmetered(
                [
                    UsageEvent(
                        request_id=uuid.uuid4(),
                        tenant_id=tenant_id,
                        api_key_id=key_id,
                        model="iris",
                        model_version=rng.choice(("1", "2")),
                        plan_id=plan_id,
                        units=rng.choice((1, 1, 1, 10)),
                        status_code=200,
                        latency_ms=1.0,
                        created_at=first + timedelta(seconds=rng.uniform(0, span)),
                    )
                    for _ in range(min(5000, records - start))
                ]
            )
        await writer.close()
        # The prediction cells before this one wrote (and this function deleted) tens of
        # thousands of rows; without a vacuum /me/usage would wade through their dead tuples and
        # measure the bench's own churn.
        async with engine.connect() as connection:
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(
                text("VACUUM ANALYZE usage_record, usage_daily, monthly_usage")
            )
        return records
    finally:
        await engine.dispose()


def free_port() -> int:
    """A TCP port that is free right now on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A server subprocess in its own process group, so that it and all its workers can be
    stopped together (and a Ctrl-C in the terminal reaches only the benchmark, which then stops
    them in order)."""

    def __init__(
        self, label: str, argv: list[str], env: BenchEnvironment, port: int, ready_path: str
    ) -> None:
        self.label = label
        self.argv = argv
        self.env = env
        self.port = port
        self.ready_path = ready_path
        self.base_url = f"http://{HOST}:{port}"
        self.log_path = env.workdir / f"{label.replace(' ', '-')}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process; its output goes to a log file (a pipe could fill up and stall it)."""
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.argv,
                env=self.env.env,
                cwd=self.env.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        """The server's process id (its workers are its children), once started."""
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self._process is not None and self._process.poll() is None

    def wait_ready(self, timeout_s: float) -> None:
        """Poll the readiness route until it answers 200; ``BenchError`` on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        url = self.base_url + self.ready_path
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.label} exited during startup: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (our URL)
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass  # not listening yet, or 503 while it loads
            time.sleep(0.2)
        raise BenchError(f"{self.label} was not ready within {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the server's output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after the timeout."""
        process = self._process
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers that outlived the supervisor are still in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        self._process = None


def modelgate_server(
    env: BenchEnvironment, workers: int, settings: dict[str, str] | None = None, label: str = ""
) -> Server:
    """``modelgate serve --workers N`` on a free port; ``settings`` adds ``MODELGATE_*``
    variables (a variant of the server, named ``label``)."""
    if settings:
        env = dataclasses.replace(env, env={**env.env, **settings})
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "api.cli",
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    name = f"modelgate{'-' + label if label else ''} w{workers}"
    return Server(name, argv, env, port, "/api/v1/health/ready")


def echo_server(env: BenchEnvironment, workers: int) -> Server:
    """The bare FastAPI echo app under uvicorn with ``modelgate serve``'s settings."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.echo_app:app",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
        # The same as `modelgate serve`: no proxy headers, no Server header, no access log.
        "--no-proxy-headers",
        "--no-server-header",
        "--no-access-log",
        "--log-level",
        SERVER_LOG_LEVEL.lower(),
    ]
    return Server(f"echo w{workers}", argv, env, port, "/health")


@contextlib.contextmanager
def running(server: Server, ready_timeout_s: float = 90) -> Iterator[Server]:
    """Start the server, wait until it is ready, and always stop it."""
    try:
        server.start()
        server.wait_ready(ready_timeout_s)
        yield server
    finally:
        server.stop()
