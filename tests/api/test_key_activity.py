"""api_key.last_used_at: noted in memory on each request, written in one statement per flush
(every ``key_last_used_flush_seconds`` and at shutdown), never once per request; a failed flush
keeps its times for the next one and never reaches a request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from auth.db import create_engine, create_sessionmaker
from auth.identity.key_activity import KeyActivity
from auth.identity.keys import key_digest
from auth.models import ApiKey, utcnow
from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    make_settings,
    running_app,
)

PREDICT = "/api/v1/predict"


@contextmanager
def touch_statements(engine: AsyncEngine) -> Iterator[list[tuple[str, bool]]]:
    """Every statement that writes last_used_at on this engine: (SQL, executemany)."""
    seen: list[tuple[str, bool]] = []

    def listener(
        _conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, executemany: bool
    ) -> None:
        if statement.lstrip().upper().startswith("UPDATE") and "last_used_at" in statement:
            seen.append((statement, executemany))

    event.listen(engine.sync_engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", listener)


async def _last_used(harness: Harness, key: str) -> datetime | None:
    digest = key_digest(harness.state.secrets.key_pepper, key)
    async with harness.sessionmaker() as session:
        return await session.scalar(select(ApiKey.last_used_at).where(ApiKey.digest == digest))


async def test_many_requests_cost_one_update_per_flush(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    # An interval longer than the test: only the explicit flushes below write.
    settings = make_settings(backend, served_model_dir, tmp_path, key_last_used_flush_seconds=3600)
    async with running_app(settings, backend) as app:
        keys = [(await create_tenant_with_key(app))[1] for _ in range(3)]
        with touch_statements(app.state.engine) as statements:
            started = utcnow()
            for _ in range(10):
                for key in keys:
                    response = await app.client.post(
                        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
                    )
                    assert response.status_code == 200
            assert statements == []  # nothing written on the request path
            assert [await _last_used(app, key) for key in keys] == [None] * 3
            await app.state.key_activity.flush()
            assert len(statements) == 1  # one statement for the three keys
            assert statements[0][1]  # executemany: one row of parameters per key
            for key in keys:
                used = await _last_used(app, key)
                assert used is not None
                assert started <= used <= utcnow()
            # Nothing new to write: a flush costs nothing.
            await app.state.key_activity.flush()
            assert len(statements) == 1


async def test_last_used_at_is_shown_after_a_flush(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(backend, served_model_dir, tmp_path, key_last_used_flush_seconds=0.2)
    async with running_app(settings, backend) as app:
        tenant, key = await create_tenant_with_key(
            app, scopes=("predict", "usage:read", "keys:manage")
        )
        admin = await create_admin_key(app)
        before = utcnow()
        assert (await app.client.get("/api/v1/me", headers=bearer(key))).status_code == 200
        await asyncio.sleep(0.6)  # past a periodic flush
        admin_view = await app.client.get(
            f"/api/v1/admin/tenants/{tenant.id}/keys", headers=bearer(admin)
        )
        own_view = await app.client.get("/api/v1/me/keys", headers=bearer(key))
        for listing in (admin_view, own_view):
            assert listing.status_code == 200, listing.text
            (shown,) = listing.json()["keys"]
            used = datetime.fromisoformat(shown["last_used_at"])
            assert before <= used <= utcnow()


async def test_an_older_time_never_overwrites_a_newer_one(harness: Harness) -> None:
    """Several workers flush in any order: last_used_at only moves forward."""
    _, key = await create_tenant_with_key(harness)
    newer = utcnow() + timedelta(hours=1)
    digest = key_digest(harness.state.secrets.key_pepper, key)
    async with harness.sessionmaker() as session:
        await session.execute(
            update(ApiKey).where(ApiKey.digest == digest).values(last_used_at=newer)
        )
        await session.commit()
    response = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert response.status_code == 200
    await harness.state.key_activity.flush()
    assert await _last_used(harness, key) == newer


async def test_shutdown_flushes_what_is_pending(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(backend, served_model_dir, tmp_path, key_last_used_flush_seconds=3600)
    async with running_app(settings, backend) as app:
        _, key = await create_tenant_with_key(app)
        response = await app.client.post(
            PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert response.status_code == 200
        assert await _last_used(app, key) is None
        pepper = app.state.secrets.key_pepper
    # The app is gone; its last words are in the database.
    engine = create_engine(backend.database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            used = await session.scalar(
                select(ApiKey.last_used_at).where(ApiKey.digest == key_digest(pepper, key))
            )
    finally:
        await engine.dispose()
    assert used is not None


async def test_a_failed_flush_is_kept_for_the_next_one(harness: Harness) -> None:
    # A key the app itself never sees: only this recorder writes its last use.
    _, key = await create_tenant_with_key(harness)
    digest = key_digest(harness.state.secrets.key_pepper, key)
    activity = KeyActivity(harness.state.engine, interval_seconds=3600, timeout_seconds=0.3)
    async with harness.sessionmaker() as session:
        key_id = await session.scalar(select(ApiKey.id).where(ApiKey.digest == digest))
    assert key_id is not None
    before = utcnow()
    activity.touch(key_id)
    after = utcnow()
    # Another transaction holds the row (Postgres) or the database's write lock (SQLite)
    # longer than the flush may wait: the flush fails, and says so without raising.
    async with harness.sessionmaker() as blocker:
        await blocker.execute(update(ApiKey).where(ApiKey.id == key_id).values(name="busy"))
        await activity.flush()
        assert activity.failed_flushes == 1
        await blocker.rollback()
    assert await _last_used(harness, key) is None
    # The next flush writes the time noted before the failure.
    await activity.flush()
    assert activity.failed_flushes == 1
    used = await _last_used(harness, key)
    assert used is not None
    # (to the database's microsecond)
    assert before - timedelta(milliseconds=1) <= used <= after + timedelta(milliseconds=1)
