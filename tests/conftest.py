"""Shared fixtures: every API test runs twice, on Postgres + Redis and on the embedded default
(SQLite, in-process limiter).

Isolation: each backend's schema is migrated once per session into a template, and every test
module gets a database of its own copied from it (Postgres: CREATE DATABASE ... TEMPLATE; SQLite:
a copy of the file), dropped after the module; the module's tests share it and its app, and
create their own tenants and keys. No test sees another module's rows, so neither the order nor
the number of the tests can change an outcome. Redis is shared: what the app keeps there is keyed
by API-key id (random), and no test flushes it or counts its keys.

Parallel runs: ``make test`` spreads the suite over pytest-xdist workers, each a session of its
own (its own templates and module databases, tmp_path under its own basetemp) on a Redis database
of its own (the worker's number added to MODELGATE_TEST_REDIS_URL's), so that no worker meets
another's rate-limit or throttle counters. The one thing they share is the trained iris model,
trained once per run by whichever worker needs it first (``trained_iris``)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio
import redis
from fastapi import FastAPI
from sqlalchemy import update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app import create_app
from api.cli import upgrade_database
from api.services import AppState
from auth.audit import Actor
from auth.identity.keys import issue_admin_key, issue_tenant_key, key_digest
from auth.models import ApiKey
from auth.schemas import TenantView
from auth.settings import Settings, get_settings
from auth.tenants import create_tenant, get_or_create_admin
from ml.observe import batch_observer, set_batch_observer
from ml.train import train_default
from tests.promises import PromisedDelay, running, summarize

TEST_VARIABLE_PREFIX = "MODELGATE_TEST_"


def is_product_setting(name: str) -> bool:
    """Whether an environment variable configures modelgate itself (pydantic-settings matches
    ``MODELGATE_*`` names in any case) rather than this suite (``MODELGATE_TEST_*``)."""
    upper = name.upper()
    if upper.startswith(TEST_VARIABLE_PREFIX):
        return False
    # WEB_CONCURRENCY is how the app factory counts its workers (auth.settings.declared_workers);
    # the OTEL_* variables switch traces on (api.observability.tracing).
    return upper.startswith(("MODELGATE_", "OTEL_")) or upper == "WEB_CONCURRENCY"


# The suite is hermetic: the caller's shell chooses the test services (MODELGATE_TEST_*) and
# nothing else. An operator's exported settings (production secrets, MODELGATE_ENV=production, a
# real database URL, WEB_CONCURRENCY...) must neither break the tests nor be used by them, so they
# leave this process, and every server or CLI process it starts, before anything reads them. A
# test that needs one sets it itself (monkeypatch, or the environment it gives a subprocess).
for _name in [name for name in os.environ if is_product_setting(name)]:
    del os.environ[_name]
# Nor is a .env file read from the working directory: tests pass every setting explicitly
# (make_settings), and a Settings() built anywhere in this process (get_settings, the migrations'
# fallback) sees the embedded defaults. Subprocesses run in a fresh tmp_path (tests/e2e/servers.py).
Settings.model_config["env_file"] = None
get_settings.cache_clear()

POSTGRES_URL = os.environ.get(
    "MODELGATE_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
# The pytest-xdist worker this process is ("gw0", "gw1"...; empty when the suite runs in one
# process) and its number.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
WORKER_NUMBER = int(XDIST_WORKER.removeprefix("gw")) if XDIST_WORKER else 0


def worker_redis_url(url: str, worker: int) -> str:
    """``url`` with the worker's number added to its database number (redis://host:6379/0 is
    database 0 for gw0, 1 for gw1...): each worker's counters apart from every other's."""
    parts = urlsplit(url)
    database = int(parts.path.strip("/") or 0) + worker
    return urlunsplit(parts._replace(path=f"/{database}"))


REDIS_URL = worker_redis_url(
    os.environ.get("MODELGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"), WORKER_NUMBER
)
# In CI the services must be there: a missing one fails the run instead of skipping tests.
REQUIRE_SERVICES = os.environ.get("MODELGATE_TEST_REQUIRE_SERVICES") == "1"

# tests/test_hermetic_suite.py runs pytest on small test files to prove the hooks below;
# tests/parallel.py orders and locks the tests of a parallel run.
pytest_plugins = ["pytester", "tests.parallel"]

NOT_APPLICABLE = "not applicable: "


def not_applicable(reason: str) -> NoReturn:
    """Skip the current test because it does not apply to this configuration (a Postgres-only
    mechanism on SQLite, say): the one kind of skip that MODELGATE_TEST_REQUIRE_SERVICES=1
    allows. Better still, do not generate the test where it does not apply (``only_on``);
    ``pytest.mark.skipif(..., reason=NOT_APPLICABLE + "...")`` is the marker form."""
    pytest.skip(NOT_APPLICABLE + reason)


def only_on(*backends: str) -> pytest.MarkDecorator:
    """Run the test on these backends only (``@only_on("postgres")``): no test is generated for
    the others, to which it does not apply."""
    return pytest.mark.parametrize("backend", backends, indirect=True)


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


def _fail_a_needless_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    """Under MODELGATE_TEST_REQUIRE_SERVICES=1 everything a test needs (Postgres, Redis, a
    redis-server or Postgres binary, an optional module) must be there: a skip for anything
    but ``not_applicable`` is turned into a failure, so that CI never passes by doing less."""
    if not (REQUIRE_SERVICES and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if reason.startswith(NOT_APPLICABLE):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped ({reason}), but MODELGATE_TEST_REQUIRE_SERVICES=1 requires everything a test "
        "needs; a test that does not apply here is generated only where it does (only_on) or "
        "skips with not_applicable()"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Skips in setup, call or teardown (pytest.skip, skipif, importorskip)."""
    report = yield
    _fail_a_needless_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Skips of a whole module (pytest.importorskip or skip(allow_module_level=True) at import)."""
    report = yield
    _fail_a_needless_skip(report)
    return report


@dataclass(frozen=True)
class Backend:
    """Where one test configuration keeps its data."""

    name: str
    database_url: str
    redis_url: str


def _services_reachable() -> str | None:
    async def check_postgres() -> None:
        connection = await admin_connection(timeout=3)
        await connection.close()

    try:
        asyncio.run(check_postgres())
    except Exception as exc:
        return f"Postgres at {POSTGRES_URL} unreachable: {type(exc).__name__}"
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
    except Exception as exc:
        return f"Redis at {REDIS_URL} unreachable: {type(exc).__name__}"
    return None


@pytest.fixture(scope="session")
def services_problem() -> str | None:
    """Why the real services cannot be used (None when they can)."""
    problem = _services_reachable()
    if problem and REQUIRE_SERVICES:
        pytest.fail(f"{problem} (MODELGATE_TEST_REQUIRE_SERVICES=1)", pytrace=False)
    return problem


async def admin_connection(timeout: float = 60) -> asyncpg.Connection:
    """A connection to the test server's own database (MODELGATE_TEST_DATABASE_URL), as its
    superuser: for creating databases and for changing the server under a test."""
    url = make_url(POSTGRES_URL)
    return await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        database=url.database,
        password=url.password,
        timeout=timeout,
    )


@contextmanager
def new_postgres_database(template: str | None = None) -> Iterator[str]:
    """Create a Postgres database, empty or a copy of the database named ``template``; drop it
    on exit."""
    name = f"modelgate_test_{uuid.uuid4().hex[:10]}"

    async def run(sql: str) -> None:
        connection = await admin_connection()
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    copy = f' TEMPLATE "{template}"' if template else ""
    asyncio.run(run(f'CREATE DATABASE "{name}"{copy}'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_template(services_problem: str | None) -> Iterator[str]:
    """The name of a Postgres database migrated once for the session, which nothing connects
    to: the template of every module's database."""
    if services_problem:
        pytest.skip(services_problem)
    with new_postgres_database() as url:
        upgrade_database(url)  # its engine is disposed: no session is left on the template
        yield str(make_url(url).database)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once for the session: the template of every module's database."""
    path = tmp_path_factory.mktemp("sqlite-template") / "modelgate.db"
    upgrade_database(f"sqlite+aiosqlite:///{path}")
    return path


def copy_sqlite_database(template: Path, target: Path) -> None:
    """A consistent copy of a SQLite database (SQLite's backup API: pages still in the
    write-ahead log are included)."""
    with (
        closing(sqlite3.connect(template)) as source,
        closing(sqlite3.connect(target)) as copy,
    ):
        source.backup(copy)


@pytest.fixture(scope="module")
def postgres_database(postgres_template: str) -> Iterator[str]:
    """A fresh Postgres database for this module, migrated (a copy of the session's template),
    dropped after the module."""
    with new_postgres_database(template=postgres_template) as url:
        yield url


@pytest.fixture
def empty_database(backend: Backend, tmp_path: Path) -> Iterator[str]:
    """An empty database of the backend's kind, for a test that changes the schema."""
    if backend.name == "postgres":
        with new_postgres_database() as url:
            yield url
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    """Postgres + Redis, or the embedded default (SQLite, no Redis), with a freshly migrated
    database of this module's own."""
    if request.param == "postgres":
        return Backend("postgres", request.getfixturevalue("postgres_database"), REDIS_URL)
    path = tmp_path_factory.mktemp("sqlite") / "modelgate.db"
    copy_sqlite_database(request.getfixturevalue("sqlite_template"), path)
    return Backend("sqlite", f"sqlite+aiosqlite:///{path}", "")


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if absent): one process at a time, among
    the run's xdist workers, runs the block."""
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_temp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary directory of the whole run: the parent of every xdist worker's basetemp
    (each worker has its own), or the basetemp itself without xdist."""
    basetemp = tmp_path_factory.getbasetemp()
    return basetemp.parent if XDIST_WORKER else basetemp


@pytest.fixture(scope="session")
def trained_iris(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default iris model directory, trained once for the whole run (the first worker to
    need it trains it, the others wait for it). Never modified: fixtures copy it."""
    root = run_temp_root(tmp_path_factory)
    trained = root / "iris-trained"
    with exclusive(root / "iris-trained.lock"):
        if not (trained / "complete").exists():
            shutil.rmtree(trained, ignore_errors=True)
            train_default(trained / "models")
            (trained / "complete").touch()
    return trained / "models"


@pytest.fixture(scope="session")
def served_model_dir(trained_iris: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default iris model for the API tests: this session's copy of the run's trained one."""
    model_dir = tmp_path_factory.mktemp("served") / "models"
    shutil.copytree(trained_iris, model_dir)
    return model_dir


def make_settings(backend: Backend, model_dir: Path, var_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test app; nothing is read from the environment or a .env file."""
    values: dict[str, Any] = {
        "database_url": backend.database_url,
        "redis_url": backend.redis_url,
        "model_dir": model_dir,
        "var_dir": var_dir,
        "key_pepper": "test-pepper-" + "x" * 32,
        "jwt_secret": "test-jwt-secret-" + "y" * 32,
        "default_rate_limit": "1000/minute",
        # Every in-process test comes from the same address, on a Redis shared by every module
        # (and every run): failed credentials must not throttle one test for another's. The
        # throttle's own tests (tests/security/test_edge_throttle.py) set a budget of their own.
        "auth_failures_per_address": "999999/minute",
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Harness:
    """A running app (lifespan entered) and a client for it."""

    client: httpx.AsyncClient
    state: AppState
    backend: Backend

    @property
    def sessionmaker(self) -> async_sessionmaker[AsyncSession]:
        """Sessions on the app's database."""
        return self.state.sessionmaker


@asynccontextmanager
async def running_app(
    settings: Settings,
    backend: Backend,
    customize: Callable[[FastAPI], None] | None = None,
) -> AsyncIterator[Harness]:
    """Build the app (``customize`` may add test routes), enter its lifespan, and yield a client
    on it."""
    app = create_app(settings)
    if customize is not None:
        customize(app)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Harness(client=client, state=app.state.modelgate, backend=backend)


# Module-scoped like its database, on the session's event loop: the tests run on that loop
# (asyncio_default_test_loop_scope), and the app's engine and pools belong to the loop that
# opened them.
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def harness(
    backend: Backend, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    """The app on this backend and this module's database, shared by the module's tests."""
    settings = make_settings(backend, served_model_dir, tmp_path_factory.mktemp("var"))
    async with running_app(settings, backend) as running:
        yield running


@pytest.fixture
def client(harness: Harness) -> httpx.AsyncClient:
    """The HTTP client of the running app."""
    return harness.client


# Who the audit trail says made the changes a test makes behind the app's back.
TEST_ACTOR = Actor(name="test")


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def create_tenant_with_key(
    harness: Harness,
    *,
    scopes: tuple[str, ...] = ("predict", "usage:read"),
    **tenant_overrides: Any,
) -> tuple[TenantView, str]:
    """A new tenant (unique name unless given) and one API key for it."""
    tenant_overrides.setdefault("name", unique("tenant"))
    async with harness.sessionmaker() as session:
        tenant = await create_tenant(session, TEST_ACTOR, **tenant_overrides)
        issued = await issue_tenant_key(
            session,
            harness.state.secrets.key_pepper,
            TEST_ACTOR,
            tenant_id=tenant.id,
            name="test key",
            scopes=scopes,
        )
        await session.commit()
    return tenant, issued.key


async def create_admin_key(harness: Harness) -> str:
    """A new admin principal's API key."""
    async with harness.sessionmaker() as session:
        admin = await get_or_create_admin(session, unique("admin"))
        issued = await issue_admin_key(
            session,
            harness.state.secrets.key_pepper,
            TEST_ACTOR,
            admin_principal_id=admin.id,
            name="test",
        )
        await session.commit()
    return issued.key


async def update_key(harness: Harness, key: str, **values: Any) -> None:
    """Change columns of ``key``'s row (found by its digest) behind the app's back, as another
    worker or an operator would."""
    digest = key_digest(harness.state.secrets.key_pepper, key)
    async with harness.sessionmaker() as session:
        await session.execute(update(ApiKey).where(ApiKey.digest == digest).values(**values))
        await session.commit()


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for a credential."""
    return {"Authorization": f"Bearer {key}"}


async def recorded_units(database_url: str, tenant_id: str) -> int:
    """The units of every usage record of a tenant in a Postgres database (a server's, read
    from outside it)."""
    url = make_url(database_url)
    connection = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    try:
        return int(
            await connection.fetchval(
                "SELECT coalesce(sum(units), 0) FROM usage_record WHERE tenant_id = $1",
                uuid.UUID(tenant_id),
            )
        )
    finally:
        await connection.close()


@contextmanager
def recorded_batches() -> Iterator[list[tuple[str, int]]]:
    """The (runtime, rows) of every runtime call made inside the block, as ``ml.observe``
    reports them (the observer installed before, the metrics', is put back after)."""
    calls: list[tuple[str, int]] = []
    previous = batch_observer()
    set_batch_observer(lambda runtime, rows: calls.append((runtime, rows)))
    try:
        yield calls
    finally:
        set_batch_observer(previous)


def wrong_checksum(key: str) -> str:
    """``key`` with its last character changed, so that its checksum no longer holds (a fixed
    replacement would leave the key intact whenever it already ends with that character)."""
    return key[:-1] + ("A" if key[-1] != "A" else "B")


IRIS_SETOSA = [5.1, 3.5, 1.4, 0.2]
IRIS_VIRGINICA = [6.7, 3.0, 5.2, 2.3]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Which test is running, for ``PromisedDelay``'s reports."""
    with running(item):
        return (yield)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The promised delays this run measured (``tests.promises``)."""
    summarize(terminalreporter)


async def refused_within(
    harness: Harness, key: str, promised: float = 1.0, path: str = "/api/v1/predict"
) -> float:
    """Predict with ``key`` until it is refused (401 or 403), every request until then served
    (200): the key cache's promise, measured (``PromisedDelay``). Returns the delay."""

    async def refused() -> bool:
        response = await harness.client.post(
            path, json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        if response.status_code in (401, 403):
            return True
        assert response.status_code == 200, response.text
        return False

    return await PromisedDelay("credential refused", promised).until(refused)


@pytest.fixture
def model_copy(served_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the trained model directory that a test may tamper with."""
    copy = tmp_path / "models"
    shutil.copytree(served_model_dir, copy)
    return copy
