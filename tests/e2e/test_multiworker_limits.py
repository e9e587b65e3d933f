"""SECURITY.md line 13 across processes: one key's limit holds exactly over two workers sharing
Redis, whatever socket address or X-Forwarded-For its requests come with; another key behind the
same addresses is unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import IRIS_SETOSA, Backend, only_on
from tests.e2e.servers import run_cli, serve

pytestmark = pytest.mark.e2e


def _cli(environment: dict[str, str], cwd: Path, *args: str) -> str:
    return run_cli(environment, cwd, *args).stdout


# Loopback addresses the requests are sent from (all of 127.0.0.0/8 is local on Linux): the
# server sees several socket addresses as well as several X-Forwarded-For values.
SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


async def _fire(port: int, key: str, count: int) -> list[int]:
    """``count`` concurrent predictions with ``key``, spread over the source addresses, each
    claiming another origin in X-Forwarded-For."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}/api/v1",
                    transport=httpx.AsyncHTTPTransport(local_address=source),
                )
            )
            for source in SOURCES
        ]

        async def one(index: int) -> int:
            headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": f"10.0.0.{index}"}
            response = await clients[index % len(clients)].post(
                "/predict", json={"features": IRIS_SETOSA}, headers=headers
            )
            return response.status_code

        return await asyncio.gather(*[one(i) for i in range(count)])


# Several workers need the shared Redis limiter: the embedded default refuses them.
@only_on("postgres")
def test_rate_limit_is_exact_across_two_workers(
    backend: Backend, tour_environment: dict[str, str], tmp_path: Path
) -> None:
    _cli(tour_environment, tmp_path, "db", "upgrade")
    tenant = json.loads(
        _cli(
            tour_environment,
            tmp_path,
            "tenants",
            "create",
            "--name",
            "limited",
            "--rate-limit",
            "10/minute",
        )
    )
    keys = [
        _cli(tour_environment, tmp_path, "keys", "issue", "--tenant", tenant["id"])
        .strip()
        .splitlines()[-1]
        for _ in range(2)
    ]
    with serve(tour_environment, tmp_path, workers=2) as port:
        # One key from three socket addresses and thirty claimed origins: one limit.
        statuses = asyncio.run(_fire(port, keys[0], 30))
        assert statuses.count(200) == 10, statuses
        assert statuses.count(429) == 20
        # Another key from the very same addresses and claimed origins: its own limit.
        other = asyncio.run(_fire(port, keys[1], 12))
        assert sorted(other) == [200] * 10 + [429] * 2, other
