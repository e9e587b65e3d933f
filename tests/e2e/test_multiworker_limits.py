"""SECURITY.md line 13 across processes: one key's limit holds exactly over two workers sharing
Redis; another key is unaffected; X-Forwarded-For changes nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import IRIS_SETOSA, Backend, only_on
from tests.e2e.servers import run_cli, serve

pytestmark = pytest.mark.e2e


def _cli(environment: dict[str, str], cwd: Path, *args: str) -> str:
    return run_cli(environment, cwd, *args).stdout


async def _fire(port: int, key: str, count: int, spoof: bool) -> list[int]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/api/v1") as client:

        async def one(index: int) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            if spoof:
                headers["X-Forwarded-For"] = f"10.0.0.{index}"
            response = await client.post(
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
        statuses = asyncio.run(_fire(port, keys[0], 30, spoof=True))
        assert statuses.count(200) == 10, statuses
        assert statuses.count(429) == 20
        other = asyncio.run(_fire(port, keys[1], 5, spoof=False))
        assert other == [200] * 5
