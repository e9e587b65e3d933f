"""SECURITY.md lines 16-17, the slow case: a database that accepts connections and then stops
answering (a hung host, a stalled network) costs a request at most the configured timeout,
answered 503, and service resumes by itself once the database answers again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from api.cli import upgrade_database
from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    bearer,
    create_tenant_with_key,
    make_settings,
    running_app,
)

TIMEOUT = 1.0


class StallingProxy:
    """A TCP proxy to Postgres that can be told to stop forwarding (bytes are held, never
    refused or reset: to the client the server just goes quiet)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await source.read(65536):
                await self.flowing.wait()
                sink.write(data)
                await sink.drain()
        sink.close()


@contextlib.asynccontextmanager
async def stalling_proxy(database_url: str) -> AsyncIterator[tuple[StallingProxy, str]]:
    """A proxy in front of the database, and the URL that goes through it."""
    url = make_url(database_url)
    proxy = StallingProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    try:
        yield proxy, url.set(port=proxy.port).render_as_string(hide_password=False)
    finally:
        await proxy.close()


async def test_a_stalled_database_is_503_within_the_timeout_and_service_resumes(
    postgres_database: str, served_model_dir: Path, tmp_path: Path
) -> None:
    """SECURITY.md lines 16 and 17: a database that stalls costs a request at most the timeout
    (503 with Retry-After, never a served-but-unbilled prediction) and service resumes."""
    await asyncio.to_thread(upgrade_database, postgres_database)
    async with stalling_proxy(postgres_database) as (proxy, url):
        backend = Backend("postgres", url, "")
        settings = make_settings(
            backend,
            served_model_dir,
            tmp_path,
            database_timeout_seconds=TIMEOUT,
            usage_flush_timeout_seconds=TIMEOUT,
        )
        async with running_app(settings, backend) as app:
            _, key = await create_tenant_with_key(app)
            usage = "/api/v1/me/usage"
            assert (await app.client.get(usage, headers=bearer(key))).status_code == 200

            # The key is now cached: the report below waits on the stalled database itself
            # (bounded by the request's deadline), the prediction on its usage write (the
            # writer's flush timeout) and, once the cache lapses, on the credential lookup.
            proxy.flowing.clear()
            for method, path, body in (
                ("GET", usage, None),
                ("POST", "/api/v1/predict", {"features": IRIS_SETOSA}),
            ):
                started = time.monotonic()
                response = await app.client.request(method, path, json=body, headers=bearer(key))
                elapsed = time.monotonic() - started
                assert response.status_code == 503, response.text
                assert "Retry-After" in response.headers
                assert response.headers["content-type"].startswith("application/problem+json")
                # The request's deadline, plus the driver letting go of the cancelled statement
                # (a prediction: the usage writer's flush timeout, likewise).
                assert elapsed < 2 * TIMEOUT + 0.5, f"{path} took {elapsed:.1f} s"

            proxy.flowing.set()
            deadline = time.monotonic() + 10
            while True:
                response = await app.client.get(usage, headers=bearer(key))
                if response.status_code == 200:
                    break
                assert response.status_code == 503, response.text
                assert time.monotonic() < deadline, "service did not resume"
                await asyncio.sleep(0.2)
            predicted = await app.client.post(
                "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
            )
            assert predicted.status_code == 200, predicted.text


async def test_a_slow_statement_is_cancelled_by_the_server(postgres_database: str) -> None:
    """The server-side half of the bound: statement_timeout is set on every connection."""
    from sqlalchemy import text

    from auth.db import create_engine

    engine = create_engine(postgres_database, statement_timeout_seconds=0.3)
    try:
        async with engine.connect() as connection:
            setting = await connection.scalar(text("SHOW statement_timeout"))
            assert setting == "300ms"
            started = time.monotonic()
            with pytest.raises(Exception, match="statement timeout"):
                await connection.execute(text("SELECT pg_sleep(5)"))
            assert time.monotonic() - started < 2
    finally:
        await engine.dispose()
