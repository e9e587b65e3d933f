"""MODELGATE_DATABASE_READ_URL: the reports read a real Postgres streaming replica, say how
stale they may be (Replica-Lag), and read the primary when the replica is stopped or too far
behind; the credential check, the usage writes and the audit chain's verification stay on the
primary."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from pydantic import ValidationError

from api.app import create_app
from api.cli import upgrade_database
from api.http.deps import REPLICA_LAG_HEADER
from auth.read_replica import CHECK_TIMEOUT_SECONDS
from auth.settings import Settings
from tests.conftest import (
    Backend,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    make_settings,
    running_app,
)
from tests.factories import insert_usage, utc_at
from tests.pg_replica import PostgresPair, streaming_replica

CLOSED_MONTH = "2026-03"
WINDOW = {"start": "2026-03-01", "end": "2026-03-31"}


@pytest.fixture(scope="module")
def pair() -> Iterator[PostgresPair]:
    """A private primary, migrated, and its streaming standby."""
    with streaming_replica() as running:
        upgrade_database(running.primary_url)
        yield running


def _settings(pair: PostgresPair, model_dir: Path, var_dir: Path, **overrides: Any) -> Settings:
    # No background write on the primary (keys' last use) between a test's writes and its
    # reports: a caught-up replica then stays caught up while the test reads it.
    return make_settings(
        Backend("postgres", pair.primary_url, ""),
        model_dir,
        var_dir,
        key_last_used_flush_seconds=3600,
        **overrides,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicated(
    pair: PostgresPair, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    """The app with the standby as its read replica."""
    settings = _settings(
        pair, served_model_dir, tmp_path_factory.mktemp("var"), database_read_url=pair.replica_url
    )
    async with running_app(settings, Backend("postgres", pair.primary_url, "")) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def primary_only(
    pair: PostgresPair, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    """The app on the same primary without a replica: the reports as the primary has them."""
    settings = _settings(pair, served_model_dir, tmp_path_factory.mktemp("var"))
    async with running_app(settings, Backend("postgres", pair.primary_url, "")) as running:
        yield running


async def _reports(
    harness: Harness, tenant_id: uuid.UUID, key: str, admin: str
) -> list[httpx.Response]:
    """The four reports the replica may serve, for one tenant."""
    client = harness.client
    return [
        await client.get("/api/v1/me/usage", params=WINDOW, headers=bearer(key)),
        await client.get(
            "/api/v1/admin/usage",
            params={**WINDOW, "tenant_id": str(tenant_id)},
            headers=bearer(admin),
        ),
        await client.get(
            "/api/v1/admin/audit", params={"tenant_id": str(tenant_id)}, headers=bearer(admin)
        ),
        await client.get(
            "/api/v1/admin/billing/export",
            params={"month": CLOSED_MONTH, "format": "jsonl"},
            headers=bearer(admin),
        ),
    ]


def _bodies(responses: list[httpx.Response]) -> list[str]:
    assert [r.status_code for r in responses] == [200] * len(responses), responses[-1].text
    return [r.text for r in responses]


async def _tenant_with_usage(harness: Harness, units: int = 3) -> tuple[uuid.UUID, str]:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=1000)
    await insert_usage(harness, [(tenant.id, utc_at("2026-03-02"), "iris", "1", units)])
    return tenant.id, key


async def _replay(pair: PostgresPair, pause: bool) -> None:
    standby = await asyncpg.connect(host="127.0.0.1", port=pair.replica_port, user="postgres")
    try:
        await standby.execute(f"SELECT pg_wal_replay_{'pause' if pause else 'resume'}()")
    finally:
        await standby.close()


async def test_reports_from_a_caught_up_replica_equal_the_primarys(
    pair: PostgresPair, replicated: Harness, primary_only: Harness
) -> None:
    tenant_id, key = await _tenant_with_usage(replicated)
    admin = await create_admin_key(replicated)
    await pair.wait_caught_up()
    from_replica = await _reports(replicated, tenant_id, key, admin)
    from_primary = await _reports(primary_only, tenant_id, key, admin)
    assert _bodies(from_replica) == _bodies(from_primary)
    assert from_replica[0].json()["total_units"] == 3
    assert all(REPLICA_LAG_HEADER not in r.headers for r in from_primary)
    # Caught up and still streaming: no lag, however long ago the last commit was.
    assert [r.headers[REPLICA_LAG_HEADER] for r in from_replica] == ["0.000"] * 4
    # The current month's export still grows: it reads the primary.
    current = await replicated.client.get(
        "/api/v1/admin/billing/export", params={"month": "2026-12"}, headers=bearer(admin)
    )
    assert current.status_code == 200
    assert REPLICA_LAG_HEADER not in current.headers


async def test_a_lagging_replica_says_so_and_past_the_bound_the_primary_answers(
    pair: PostgresPair, replicated: Harness, primary_only: Harness
) -> None:
    tenant_id, key = await _tenant_with_usage(replicated, units=5)
    await pair.wait_caught_up()
    await _replay(pair, pause=True)
    try:
        # Written on the primary, received by the standby, not replayed there yet. The key
        # was checked on the primary: the credential never waits for the replica.
        await insert_usage(replicated, [(tenant_id, utc_at("2026-03-03"), "iris", "1", 7)])
        stale = await replicated.client.get("/api/v1/me/usage", params=WINDOW, headers=bearer(key))
        fresh = await primary_only.client.get(
            "/api/v1/me/usage", params=WINDOW, headers=bearer(key)
        )
        assert stale.status_code == fresh.status_code == 200
        assert (stale.json()["total_units"], fresh.json()["total_units"]) == (5, 12)
        assert float(stale.headers[REPLICA_LAG_HEADER]) > 0
        # Past MODELGATE_DATABASE_READ_MAX_LAG_SECONDS the report reads the primary.
        replica = replicated.state.read_replica
        assert replica is not None
        bound = replica.max_lag_seconds
        replica.max_lag_seconds = float(stale.headers[REPLICA_LAG_HEADER]) / 2
        try:
            bounded = await replicated.client.get(
                "/api/v1/me/usage", params=WINDOW, headers=bearer(key)
            )
        finally:
            replica.max_lag_seconds = bound
        assert bounded.status_code == 200
        assert bounded.json()["total_units"] == 12
        assert REPLICA_LAG_HEADER not in bounded.headers
    finally:
        await _replay(pair, pause=False)
    await pair.wait_caught_up()
    caught_up = await replicated.client.get("/api/v1/me/usage", params=WINDOW, headers=bearer(key))
    assert caught_up.json()["total_units"] == 12
    assert caught_up.headers[REPLICA_LAG_HEADER] == "0.000"


async def test_the_chains_verification_reads_the_primary_not_a_lagging_replica(
    pair: PostgresPair, replicated: Harness, primary_only: Harness
) -> None:
    """GET /admin/audit/verify walks the chain as the primary holds it: with the replica's
    replay paused, the events written since are verified too, and no lag is reported."""
    admin = await create_admin_key(replicated)
    await pair.wait_caught_up()
    await _replay(pair, pause=True)
    try:
        # Events on the primary that the standby has not replayed.
        await create_tenant_with_key(replicated)
        stale = await replicated.client.get(
            "/api/v1/admin/audit", params={"limit": 1}, headers=bearer(admin)
        )
        assert float(stale.headers[REPLICA_LAG_HEADER]) > 0
        verified = await replicated.client.get("/api/v1/admin/audit/verify", headers=bearer(admin))
        on_primary = await primary_only.client.get(
            "/api/v1/admin/audit/verify", headers=bearer(admin)
        )
        newest = await primary_only.client.get(
            "/api/v1/admin/audit", params={"limit": 1}, headers=bearer(admin)
        )
    finally:
        await _replay(pair, pause=False)
    assert verified.status_code == 200, verified.text
    assert REPLICA_LAG_HEADER not in verified.headers
    assert verified.json()["intact"] is True
    assert verified.json() == on_primary.json()
    assert verified.json()["events"] == newest.json()["events"][0]["id"]
    assert stale.json()["events"][0]["id"] < verified.json()["events"]


async def test_a_stopped_replica_falls_back_to_the_primary_and_is_used_again_once_back(
    pair: PostgresPair, replicated: Harness, primary_only: Harness
) -> None:
    tenant_id, key = await _tenant_with_usage(replicated)
    admin = await create_admin_key(replicated)
    await pair.wait_caught_up()
    replica = replicated.state.read_replica
    assert replica is not None
    replica.retry_seconds = 0  # asked again on the next report once it is back
    pair.stop("replica")
    try:
        fallen_back = await _reports(replicated, tenant_id, key, admin)
        assert _bodies(fallen_back) == _bodies(await _reports(primary_only, tenant_id, key, admin))
        assert all(REPLICA_LAG_HEADER not in r.headers for r in fallen_back)
    finally:
        pair.replica_start()
    await pair.wait_caught_up()
    back = await replicated.client.get("/api/v1/me/usage", params=WINDOW, headers=bearer(key))
    assert back.status_code == 200
    # Caught up again: a restarted standby that replayed everything is not said to lag.
    assert back.headers[REPLICA_LAG_HEADER] == "0.000"


@pytest.mark.parametrize(
    ("primary", "replica"),
    [
        ("sqlite+aiosqlite:///./var/modelgate.db", "postgresql+asyncpg://u:s3cret@replica/db"),
        ("postgresql+asyncpg://u:s3cret@primary/db", "sqlite+aiosqlite:///./var/copy.db"),
        ("postgresql+asyncpg://u:s3cret@primary/db", "not a url s3cret"),
    ],
)
def test_the_setting_is_refused_without_postgres_and_never_shows_the_url(
    primary: str, replica: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, database_url=primary, database_read_url=replica)  # type: ignore[call-arg]
    [error] = refused.value.errors(include_input=False, include_url=False)
    assert error["loc"] == ("database_read_url",)
    assert "s3cret" not in error["msg"]


def test_the_openapi_document_declares_the_lag_header_on_the_four_reports(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    paths = create_app(settings).openapi()["paths"]
    for path in ("/api/v1/me/usage", "/api/v1/admin/usage", "/api/v1/admin/audit"):
        assert REPLICA_LAG_HEADER in paths[path]["get"]["responses"]["200"]["headers"], path
    export = paths["/api/v1/admin/billing/export"]["get"]["responses"]["200"]
    assert REPLICA_LAG_HEADER in export["headers"]


async def test_a_replica_that_hangs_costs_one_check_timeout_then_is_left_alone(
    pair: PostgresPair, served_model_dir: Path, tmp_path: Path
) -> None:
    # A listener that accepts connections and never answers: a hung host.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        hung_url = pair.url(hung.getsockname()[1])
        settings = _settings(pair, served_model_dir, tmp_path, database_read_url=hung_url)
        async with running_app(settings, Backend("postgres", pair.primary_url, "")) as app:
            _, key = await _tenant_with_usage(app)
            timings = []
            for _ in range(2):
                started = time.monotonic()
                response = await app.client.get(
                    "/api/v1/me/usage", params=WINDOW, headers=bearer(key)
                )
                timings.append(time.monotonic() - started)
                assert response.status_code == 200, response.text
                assert response.json()["total_units"] == 3
                assert REPLICA_LAG_HEADER not in response.headers
    first, second = timings
    # The first report waited for the check's timeout, then read the primary; the next one
    # did not ask the replica at all.
    assert CHECK_TIMEOUT_SECONDS <= first < CHECK_TIMEOUT_SECONDS + 1.5
    assert second < CHECK_TIMEOUT_SECONDS / 2
