"""SECURITY.md line 3 across processes: a key cached by both workers of a real server is
refused by both within 1 second of its revocation, and so is a suspended tenant's key (measured,
and failed only well past the promise: tests.conftest.PromisedDelay)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import IRIS_SETOSA, Backend, only_on
from tests.e2e.servers import run_cli, serve
from tests.parallel import quiet_from_here
from tests.promises import POLL_SECONDS, PromisedDelay

pytestmark = pytest.mark.e2e


async def _fire(port: int, key: str, count: int) -> list[int]:
    """``count`` concurrent predictions, each on its own connection (so both workers get some).
    One client that keeps no connection alive: a client each cost 17 ms of CPU (its TLS
    context), most of what these tests spent while the machine is shared."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:

        async def one() -> int:
            response = await client.post(
                "/predict",
                json={"features": IRIS_SETOSA},
                headers={"Authorization": f"Bearer {key}"},
            )
            return response.status_code

        return list(await asyncio.gather(*[one() for _ in range(count)]))


def _pids_answering(log_path: Path, status: int, since: int) -> set[int]:
    """The worker processes that logged a prediction with ``status`` after line ``since``."""
    pids = set()
    for line in log_path.read_text().splitlines()[since:]:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "request" and event.get("status") == status:
            pids.add(event["pid"])
    return pids


def _lines(log_path: Path) -> int:
    return len(log_path.read_text().splitlines())


async def _execute(database_url: str, sql: str) -> None:
    url = make_url(database_url)
    connection = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _until_both_workers(port: int, key: str, log_path: Path, status: int) -> set[int]:
    """Fire until both workers have answered with ``status`` (bounded)."""
    mark = _lines(log_path)
    for _ in range(10):
        statuses = asyncio.run(_fire(port, key, 24))
        assert statuses == [status] * 24, statuses
        pids = _pids_answering(log_path, status, mark)
        if len(pids) >= 2:
            return pids
    raise AssertionError("only one worker answered: the test would prove nothing")


def refused_on_both_workers(port: int, credential: str, log_path: Path, status: int) -> float:
    """Right after a change that revokes a cached ``credential``: fire until every request is
    refused with ``status`` (served with 200 until then) and both workers have refused it, within
    the promise's margin (``PromisedDelay``); from then on both workers refuse every request.
    Returns the delay.

    A round that one worker answered alone proves nothing of the other, whose cached entry may
    rightly live on for the rest of its second: the delay runs until both have refused."""
    delay = PromisedDelay("cached credential refused by both workers", 1.0)
    mark = _lines(log_path)
    while True:
        sent = delay.elapsed()
        statuses = asyncio.run(_fire(port, credential, 24))
        assert set(statuses) <= {200, status}, statuses
        if 200 in statuses:
            delay.not_yet(sent)
        elif len(_pids_answering(log_path, status, mark)) >= 2:
            break
        else:
            # No request missed the change; only the evidence of the second worker is missing.
            assert delay.elapsed() <= delay.limit, "only one worker answered: it proves nothing"
        time.sleep(POLL_SECONDS)
    seen = delay.seen()
    assert len(_until_both_workers(port, credential, log_path, status)) == 2
    return seen


# Two workers need Postgres and Redis.
@only_on("postgres")
@pytest.mark.parametrize(
    ("change", "refused_with"),
    [
        ("UPDATE api_key SET revoked_at = now() WHERE tenant_id = '{tenant}'", 401),
        ("UPDATE tenant SET status = 'suspended' WHERE id = '{tenant}'", 403),
    ],
    ids=["revoked-key", "suspended-tenant"],
)
def test_cached_key_is_refused_within_a_second_on_both_workers(
    backend: Backend,
    tour_environment: dict[str, str],
    tmp_path: Path,
    change: str,
    refused_with: int,
) -> None:
    environment = {
        **tour_environment,
        "MODELGATE_LOG_LEVEL": "INFO",
        # Polled until refused, up to 5 s (tests.promises): no rate limit may answer first.
        "MODELGATE_DEFAULT_RATE_LIMIT": "1000000/minute",
    }
    run_cli(environment, tmp_path, "db", "upgrade")
    tenant = json.loads(
        run_cli(environment, tmp_path, "tenants", "create", "--name", "cached").stdout
    )
    key = (
        run_cli(environment, tmp_path, "keys", "issue", "--tenant", tenant["id"])
        .stdout.strip()
        .splitlines()[-1]
    )
    log_path = tmp_path / "server.log"
    with serve(environment, tmp_path, workers=2, log_path=log_path) as port:
        quiet_from_here()
        # Both workers serve the key, so both hold it in their cache.
        assert len(_until_both_workers(port, key, log_path, 200)) == 2
        asyncio.run(
            _execute(environment["MODELGATE_DATABASE_URL"], change.format(tenant=tenant["id"]))
        )
        refused_on_both_workers(port, key, log_path, refused_with)
